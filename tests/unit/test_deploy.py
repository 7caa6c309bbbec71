"""deploy/: the systemd unit, sysusers, tmpfiles and options files, read against sna itself.

Each file is parsed the way systemd reads it (the subset these files use:
sections, repeated keys, ``$VAR`` and ``${VAR}`` in ``ExecStart=``,
environment files) and checked against what sna and the install do: the
options the unit passes are parsed by twistd's and sna's own option parsers,
the directories are the defaults of ``twistd sna``, the stop timeout covers
the daemon's longest stop, and docs/operations.md describes every setting.
tests/integration/test_deploy.py installs and runs them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

import pytest
from twisted.scripts.twistd import ServerOptions

from sna import logging as sna_logging
from sna.api.http import ConnectionLimits
from sna.service import SHA_PUSH_GRACE
from sna.tap import Options
from sna.vmware.sessions import CALL_TIMEOUT

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OPERATIONS = REPO / "docs" / "operations.md"
#: Where ``make install`` puts everything by default (Makefile ``PREFIX``).
PREFIX = "/opt/sna"

Unit = dict[str, dict[str, list[str]]]


# -- reading the files as systemd does ------------------------------------------------------------


def read_unit(path: Path) -> Unit:
    """``{section: {key: [values in order]}}``; comments and blank lines dropped."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    [value] = unit[section][key]
    return value


def environment(unit: Unit) -> dict[str, str]:
    """The unit's ``Environment=`` assignments (each value may hold several)."""
    env = {}
    for value in unit["Service"].get("Environment", []):
        for assignment in shlex.split(value):
            name, _, setting = assignment.partition("=")
            env[name] = setting
    return env


def read_env_file(path: Path) -> dict[str, str]:
    """An ``EnvironmentFile=``: ``NAME=value`` lines, comments, optional quotes."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path.name}: {raw!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[name] = value
    return env


def exec_start(unit: Unit, env: Mapping[str, str]) -> list[str]:
    """``ExecStart=`` as systemd runs it: ``$VAR`` splits into words, ``${VAR}`` is one."""
    argv: list[str] = []
    for word in shlex.split(one(unit, "Service", "ExecStart")):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def referenced(unit: Unit) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)\}?", one(unit, "Service", "ExecStart")))


def option(argv: list[str], name: str) -> str:
    [value] = [word.split("=", 1)[1] for word in argv if word.startswith(f"{name}=")]
    return value


@pytest.fixture(scope="module")
def unit() -> Unit:
    return read_unit(DEPLOY / "sna.service")


@pytest.fixture(scope="module")
def argv(unit: Unit) -> list[str]:
    return exec_start(unit, environment(unit))


def twistd_options(argv: list[str]) -> ServerOptions:
    """``argv`` after the program, parsed by twistd and by ``twistd sna``'s own options."""
    config = ServerOptions()
    config.parseOptions(argv[1:])
    return config


# -- the tests ----------------------------------------------------------------------------------


def test_the_unit_runs_the_installs_twistd_on_sna_s_default_directories(
    unit: Unit, argv: list[str]
) -> None:
    assert re.search(rf"^PREFIX \?= {PREFIX}$", (REPO / "Makefile").read_text(), re.M)
    assert argv[0] == f"{PREFIX}/venv/bin/twistd"
    config = twistd_options(argv)
    assert config["nodaemon"] and config["pidfile"] == ""
    assert config.subCommand == "sna"
    sna = config.subOptions
    defaults = Options()
    assert option(argv, "--state-dir") == defaults["state-dir"] == sna["state-dir"]
    assert option(argv, "--log-dir") == defaults["log-dir"] == sna["log-dir"]
    assert sna["listen"] == "tcp:8081:interface=127.0.0.1"
    # The tunnel's -L 127.0.0.1:8082:127.0.0.1:8082 (enrollment-tunnel.md, section 5).
    assert sna["sha-url"] == "http://127.0.0.1:8082"


def test_the_directories_are_made_for_the_user_the_unit_runs_as(unit: Unit) -> None:
    user, group = one(unit, "Service", "User"), one(unit, "Service", "Group")
    [entry] = [
        shlex.split(line)
        for line in (DEPLOY / "sna.sysusers").read_text().splitlines()
        if line.startswith("u ")
    ]
    _, name, uid, _gecos, home, shell = entry
    assert (name, uid, home, shell) == (user, "-", Options()["state-dir"], "/usr/sbin/nologin")
    assert group == user  # sysusers makes a group of the user's name
    made = {}
    for line in (DEPLOY / "sna.tmpfiles").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, path, mode, owner, owner_group, age = line.split()
            made[path] = (kind, mode, owner, owner_group, age)
    state, logs = Options()["state-dir"], Options()["log-dir"]
    assert made[state] == made[logs] == ("d", "0750", user, group, "-")
    assert set(one(unit, "Service", "ReadWritePaths").split()) == {state, logs}


def test_the_install_s_client_comes_first_on_the_unit_s_path(unit: Unit) -> None:
    path = environment(unit)["PATH"].split(":")
    assert path[0] == f"{PREFIX}/venv/bin"
    # Before /usr/local/bin, where the legacy Go client of the same name may live,
    # and with /usr/bin, where Debian puts nbdkit (the VDDK path).
    assert path.index(f"{PREFIX}/venv/bin") < path.index("/usr/local/bin")
    assert {"/usr/sbin", "/usr/bin", "/bin"} <= set(path)
    assert "--sbc" not in " ".join(exec_start(unit, environment(unit)))


def test_the_options_file_documents_every_variable_and_matches_the_unit(unit: Unit) -> None:
    text = (DEPLOY / "sna.env").read_text()
    options = read_env_file(DEPLOY / "sna.env")
    defaults = environment(unit)
    variables = referenced(unit)
    assert variables == set(options)
    for name in variables:
        assert options[name] == defaults[name], name
        # Each variable is explained by the comment lines right above it.
        above = text.split(f"\n{name}=")[0].rstrip("\n").splitlines()[-1]
        assert above.startswith("#"), f"{name} has no comment above it"
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/sna/sna.env"


def test_the_options_file_s_examples_are_options_sna_and_twistd_take(unit: Unit) -> None:
    text = (DEPLOY / "sna.env").read_text()
    [logger] = re.findall(r"TWISTD_OPTIONS=(--logger=\S+)", text)
    examples = re.findall(r"^#\s+(--[a-z-]+=\S+(?: --[a-z-]+=\S+)*)", text, re.M)
    assert examples, "no example options in sna.env"
    # Those naming files that exist only on an installed node are left out.
    needs_files = ("auth-token-file", "ca-file", "tunnel-")
    kept = [e for e in examples if not any(name in e for name in needs_files)]
    assert any("--tunnel-host=" in e for e in examples)
    env = {**environment(unit), "TWISTD_OPTIONS": logger, "SNA_OPTIONS": " ".join(kept)}
    config = twistd_options(exec_start(unit, env))
    assert config["logger"] is sna_logging.json_observer
    assert config.subOptions["max-jobs"] == 8 and config.subOptions["spare-clients"] == 1
    # Empty: no --sha-url at all.
    config = twistd_options(exec_start(unit, {**environment(unit), "SNA_SHA_URL": ""}))
    assert config.subOptions["sha-url"] is None


def test_stopping_waits_longer_than_the_daemon_s_longest_stop(unit: Unit) -> None:
    assert one(unit, "Service", "KillMode") == "mixed"
    timeout = float(one(unit, "Service", "TimeoutStopSec").removesuffix("s"))
    # docs/operations.md, "Cancel and shutdown": the kill grace, then up to 60 s of
    # vCenter logouts and 5 s for messages to the SHA.
    longest = float(Options()["kill-grace"]) + CALL_TIMEOUT + SHA_PUSH_GRACE
    assert timeout >= longest + 5


def test_open_files_cover_the_documented_limits(unit: Unit) -> None:
    limits, defaults = ConnectionLimits(), Options()
    jobs, spares = int(defaults["max-jobs"]), 16
    disks = 64  # a VM's disks: one relay per disk, its listener and two sockets each
    per_job = 3 * disks + 3 + 1  # the client's pipes and its job log
    budget = limits.max_connections + jobs * per_job + spares * 3 + 64  # database, vCenter, SHA
    assert int(one(unit, "Service", "LimitNOFILE")) >= budget


def test_the_service_runs_unprivileged_and_restarts_on_failure(unit: Unit) -> None:
    service = unit["Service"]
    assert one(unit, "Service", "User") != "root"
    assert service["CapabilityBoundingSet"] == [""] and service["NoNewPrivileges"] == ["yes"]
    assert one(unit, "Service", "UMask") == "0027"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert float(one(unit, "Service", "RestartSec").removesuffix("s")) > 0
    assert int(one(unit, "Unit", "StartLimitBurst")) > 1
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one(unit, "Service", "Type") in ("exec", "simple")  # twistd -n does not fork


def test_operations_md_describes_the_files_instead_of_copying_them(unit: Unit) -> None:
    docs = OPERATIONS.read_text()
    for name in ("sna.service", "sna.sysusers", "sna.tmpfiles", "sna.env"):
        assert f"deploy/{name}" in docs, name
    # A unit copied into the docs would drift: if there is one, it is the file.
    for block in re.findall(r"```ini\n(.*?)```", docs, re.S):
        if "[Service]" in block:
            assert block == (DEPLOY / "sna.service").read_text()
    # Every setting of the unit is explained there.
    for section in unit.values():
        for key in section:
            assert f"{key}=" in docs, f"docs/operations.md does not explain {key}="
