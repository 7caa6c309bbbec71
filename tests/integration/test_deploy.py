"""``make install`` and deploy/, for real: the staged tree, systemd's own checks, a backup run by it.

``make install DESTDIR=<stage> PREFIX=<tmp>/root/opt/sna`` stages the venv
and the unit, sysusers, tmpfiles and options files, as a package build
would.  The venv's scripts must then name PREFIX, where they will run, not
the stage; the test makes PREFIX a link to the staged tree, so that the
unit's ``ExecStart=`` resolves, and then:

- ``systemd-analyze verify`` checks the installed unit (and, to show that it
  checks, refuses one whose ``ExecStart=`` is missing);
- ``systemd-sysusers`` and ``systemd-tmpfiles`` make the user and the
  directories in a scratch root;
- the installed twistd runs as the unit starts it (its ``ExecStart=`` and
  ``Environment=``, nothing else of this process's environment), under the
  unit's ``NoNewPrivileges=``, ``MemoryDenyWriteExecute=`` and
  ``RestrictAddressFamilies=`` done with seccomp as systemd does them, and
  backs up a VM of the vCenter simulator into a qemu-nbd target with the
  installed ``sendense-backup-client`` it finds with the default ``--sbc``.

Everything runs on loopback and in temporary directories; the daemon is
stopped by pid (its process group, which holds its clients), the testbed by
its fixture.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.integration.backup_helpers import (
    MiB,
    assert_completed,
    backup_request,
    compare,
    run_backup,
)
from tests.integration.harness import Api, free_port, wait_for
from tests.testbed import Testbed, testbed_fixture
from tests.unit.test_deploy import environment, exec_start, read_env_file, read_unit

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: Ports of this module's hub targets: no other module's range.
HUB_PORTS = range(10950, 11000)
SPEC: dict[str, Any] = {
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [{"name": "deployvm", "cbt_enabled": True, "disks": [{"capacity_bytes": 24 * MiB}]}],
}
testbed = testbed_fixture(SPEC)

#: systemd's MemoryDenyWriteExecute= and RestrictAddressFamilies=AF_UNIX AF_INET
#: AF_INET6 as seccomp filters (x86-64), after NoNewPrivileges=; then exec argv[1:].
#: The same rules as systemd's: no mmap that is both writable and executable, no
#: mprotect/pkey_mprotect to executable, no shmat with SHM_EXEC, and socket() and
#: socketpair() refused for any other family.
SANDBOX = r"""
import ctypes, errno, os, struct, sys

LD, JEQ, JSET, RET, AND = 0x20, 0x15, 0x45, 0x06, 0x54
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
ARG0, ARG2 = 16, 32  # the low 32 bits of args[0] and args[2] in struct seccomp_data
PROT_EXEC, PROT_WX, SHM_EXEC = 4, 6, 0o100000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
# (code, jump if true, jump if false, k): jumps count instructions after the next one.
prog = [
    (LD, 0, 0, 4),                 #  0 arch
    (JEQ, 1, 0, 0xC000003E),       #  1 x86-64: 3
    (RET, 0, 0, ALLOW),            #  2
    (LD, 0, 0, 0),                 #  3 syscall number
    (JEQ, 0, 5, 9),                #  4 mmap: 5, else 10
    (LD, 0, 0, ARG2),              #  5 prot
    (AND, 0, 0, PROT_WX),          #  6
    (JEQ, 0, 1, PROT_WX),          #  7 writable and executable: 8, else 9
    (RET, 0, 0, ERRNO | errno.EPERM),  # 8
    (RET, 0, 0, ALLOW),            #  9
    (JEQ, 1, 0, 10),               # 10 mprotect: 12
    (JEQ, 0, 4, 329),              # 11 pkey_mprotect: 12, else 16
    (LD, 0, 0, ARG2),              # 12 prot
    (JSET, 0, 1, PROT_EXEC),       # 13 executable: 14, else 15
    (RET, 0, 0, ERRNO | errno.EPERM),  # 14
    (RET, 0, 0, ALLOW),            # 15
    (JEQ, 0, 4, 30),               # 16 shmat: 17, else 21
    (LD, 0, 0, ARG2),              # 17 flags
    (JSET, 0, 1, SHM_EXEC),        # 18 SHM_EXEC: 19, else 20
    (RET, 0, 0, ERRNO | errno.EPERM),  # 19
    (RET, 0, 0, ALLOW),            # 20
    (JEQ, 1, 0, 41),               # 21 socket: 23
    (JEQ, 0, 5, 53),               # 22 socketpair: 23, else 28
    (LD, 0, 0, ARG0),              # 23 family
    (JEQ, 3, 0, AF_UNIX),          # 24 allowed: 28
    (JEQ, 2, 0, AF_INET),          # 25
    (JEQ, 1, 0, AF_INET6),         # 26
    (RET, 0, 0, ERRNO | errno.EAFNOSUPPORT),  # 27
    (RET, 0, 0, ALLOW),            # 28
]
code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
buffer = ctypes.create_string_buffer(code, len(code))
fprog = ctypes.create_string_buffer(struct.pack("HL", len(prog), ctypes.addressof(buffer)))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS
    sys.exit("no_new_privs: " + os.strerror(ctypes.get_errno()))
if libc.prctl(22, 2, fprog, 0, 0):  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


@attrs.frozen
class Installed:
    stage: Path
    prefix: Path

    def staged(self, path: str | Path) -> Path:
        """Where the stage holds what the install puts at ``path``."""
        return self.stage / Path(path).relative_to("/")

    @property
    def unit(self) -> Path:
        return self.staged("/etc/systemd/system/sna.service")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    stage, prefix = base / "stage", base / "root" / "opt" / "sna"
    make = run(["make", "-C", str(REPO), "install", f"DESTDIR={stage}", f"PREFIX={prefix}"])
    assert make.returncode == 0, f"make install failed:\n{make.stdout[-4000:]}{make.stderr[-4000:]}"
    # What a package manager does: the staged files end up at PREFIX.
    prefix.parent.mkdir(parents=True)
    prefix.symlink_to(stage / prefix.relative_to("/"))
    return Installed(stage, prefix)


def shebang(script: Path) -> str:
    first = script.read_text().splitlines()[0]
    assert first.startswith("#!"), script
    return first[2:].strip()


def test_the_unit_s_twistd_and_client_are_where_the_install_put_them(
    installed: Installed,
) -> None:
    unit = read_unit(installed.unit)
    env = environment(unit)
    argv = exec_start(unit, env)
    venv_bin = installed.prefix / "venv" / "bin"
    assert argv[0] == str(venv_bin / "twistd")
    assert env["PATH"].split(":")[0] == str(venv_bin)
    for program in ("twistd", "sendense-backup-client"):
        staged = installed.staged(venv_bin / program)
        assert staged.is_file() and os.access(staged, os.X_OK), staged
        # The scripts name PREFIX, where they run, not the stage.
        interpreter = shebang(staged)
        assert interpreter == str(venv_bin / "python"), interpreter
        assert os.access(installed.staged(interpreter), os.X_OK)
    # Nothing of the stage's own path is left in any text file of the venv.
    leftovers = run(["grep", "-rlIF", str(installed.stage), str(installed.staged(venv_bin.parent))])
    assert leftovers.stdout == "", leftovers.stdout
    # The unit is deploy/sna.service with PREFIX in it; the other files as they are.
    expected = (
        (REPO / "deploy" / "sna.service").read_text().replace("/opt/sna/", f"{installed.prefix}/")
    )
    assert installed.unit.read_text() == expected
    for source, target in [
        ("sna.sysusers", "/etc/sysusers.d/sna.conf"),
        ("sna.tmpfiles", "/etc/tmpfiles.d/sna.conf"),
        ("sna.env", "/etc/sna/sna.env"),
    ]:
        assert installed.staged(target).read_text() == (REPO / "deploy" / source).read_text()
    for path in (installed.unit, installed.staged("/etc/sna/sna.env")):
        assert path.stat().st_mode & 0o777 == 0o644
    # twistd finds the plugin from any directory, with the cache made at install time.
    plugins = installed.staged(venv_bin.parent) / "lib"
    assert list(plugins.glob("python3*/site-packages/twisted/plugins/dropin.cache"))
    listed = run([str(venv_bin / "twistd"), "--help"], cwd="/", env={"PATH": env["PATH"]})
    assert listed.returncode == 0 and " sna " in listed.stdout, listed


def test_systemd_analyze_verifies_the_installed_unit(installed: Installed, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make deps` installs Debian's systemd"
    verified = run([analyze, "verify", str(installed.unit)])
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == "", verified.stderr
    # It does look at ExecStart=: a unit naming a missing program fails.
    broken = tmp_path / "sna.service"
    broken.write_text(installed.unit.read_text().replace("/venv/bin/twistd", "/venv/bin/nothing"))
    refused = run([analyze, "verify", str(broken)])
    assert refused.returncode != 0 and "nothing" in refused.stderr, refused


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must be root to chown")
def test_sysusers_and_tmpfiles_make_the_user_and_the_directories(
    installed: Installed, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    users = run(
        ["systemd-sysusers", f"--root={root}", str(installed.staged("/etc/sysusers.d/sna.conf"))]
    )
    assert users.returncode == 0, users.stderr
    [passwd] = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    name, _, uid, gid, _, home, shell = passwd
    assert (name, home, shell) == ("sna", "/var/lib/sendense/sna", "/usr/sbin/nologin")
    assert (root / "etc/group").read_text().startswith(f"sna:x:{gid}:")
    dirs = run(
        [
            "systemd-tmpfiles",
            f"--root={root}",
            "--create",
            str(installed.staged("/etc/tmpfiles.d/sna.conf")),
        ]
    )
    assert dirs.returncode == 0, dirs.stderr
    for path in ("var/lib/sendense/sna", "var/log/sendense"):
        made = (root / path).stat()
        assert (made.st_mode & 0o7777, made.st_uid, made.st_gid) == (0o750, int(uid), int(gid))
    assert (root / "var/lib/sendense").stat().st_mode & 0o7777 == 0o755


@pytest.fixture
def unit_daemon(installed: Installed, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment systemd would give the installed unit, with scratch
    directories, a free port and the testbed's hub ports."""
    unit = read_unit(installed.unit)
    env = {**environment(unit), **read_env_file(installed.staged("/etc/sna/sna.env"))}
    env.update(
        SNA_LISTEN=f"--listen=tcp:{free_port()}:interface=127.0.0.1",
        # Nothing of ours listens on the tunnel's 127.0.0.1:8082 here.
        SNA_SHA_URL="",
        SNA_OPTIONS=f"--nbd-ports={HUB_PORTS.start}-{HUB_PORTS.stop - 1}",
    )
    argv = exec_start(unit, env)
    state, logs = tmp_path / "state", tmp_path / "log"
    argv = [
        f"--state-dir={state}"
        if word.startswith("--state-dir=")
        else f"--log-dir={logs}"
        if word.startswith("--log-dir=")
        else word
        for word in argv
    ]
    # What systemd gives a service: the unit's variables and the user's HOME, nothing else.
    return argv, {"PATH": env["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}


@pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the seccomp filter here is written for x86-64"
)
def test_the_installed_unit_backs_up_a_vm_under_its_hardening(
    installed: Installed,
    testbed: Testbed,
    tmp_path: Path,
    unit_daemon: tuple[list[str], dict[str, str]],
) -> None:
    argv, env = unit_daemon
    port = int(next(w for w in argv if w.startswith("--listen=")).split(":")[1])
    output = tmp_path / "twistd.log"
    with open(output, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-c", SANDBOX, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,  # its clients stay in its process group
        )
    try:
        api = Api(port)

        def healthy() -> bool:
            if daemon.poll() is not None:
                pytest.fail(f"twistd exited with {daemon.returncode}:\n{output.read_text()}")
            try:
                return api.get("/api/v1/health").status == 200
            except OSError:
                return False

        wait_for(healthy, "the installed daemon to answer /health", 60)
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        assert "\nNoNewPrivs:\t1\n" in status and "\nSeccomp:\t2\n" in status, status
        client = installed.prefix / "venv" / "bin" / "sendense-backup-client"
        text = output.read_text()
        assert f"backup client {client} (sna's own client, 1 spare(s))" in text, text
        assert "no --sha-url" in text
        # The spare is the installed client, started under the same filters: it imported
        # everything (pyVmomi, Twisted, ssl) and said it is ready.
        wait_for(lambda: api.spares_ready() > 0, "the installed client's spare to be ready", 60)

        vm, key = "deployvm", testbed.vm("deployvm")["disks"][0]["key"]
        testbed.write(vm, key, 0, 2 * MiB, seed=3)
        testbed.write(vm, key, 20 * MiB, 1 * MiB, seed=4)
        target = testbed.target(vm, key)
        body = backup_request(testbed, vm, "deploy-full-1", {key: target}, "full")
        _, followed = run_backup(api, body)
        assert_completed(followed)
        compare(testbed, vm, key, target["qcow2"])
        assert "handed to spare backup client" in output.read_text()
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(5)
        try:
            os.killpg(daemon.pid, signal.SIGKILL)  # any client it left
        except ProcessLookupError:
            pass
    text = output.read_text()
    assert "sna stopped" in text, text
    assert "Traceback" not in text, text
