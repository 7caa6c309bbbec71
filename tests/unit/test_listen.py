"""Where and how the API listens: the loopback check, the token file, the connection options."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import _parse as twisted_parse
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python import usage

from sna.api.auth import check_secret_file, read_token
from sna.api.http import ApiSite, ConnectionLimits
from sna.tap import Options, _loopback_only, endpoint_arguments, makeService

# -- the no-token warning ----------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("tcp:8081:interface=127.0.0.1", True),
        ("tcp:8081:interface=127.0.0.1:interface=0.0.0.0", False),
        ("tcp:8081:interface=0.0.0.0:interface=127.0.0.1", True),
        ("tcp:8081:127.0.0.1", True),
        ("tcp:8081:0.0.0.0", False),
        ("tcp:8081:interface=127.9.8.7", True),
        ("tcp:8081:interface=localhost", True),
        ("tcp:8081:interface=LOCALHOST", True),
        ("tcp:8081:interface=localhost.example.com", False),
        ("tcp:8081:interface=", False),
        ("tcp:8081", False),
        ("tcp6:8081", False),
        ("tcp6:8081:interface=\\:\\:1", True),
        ("tcp6:8081:interface=\\:\\:", False),
        ("tcp6:8081:interface=\\:\\:ffff\\:127.0.0.1", True),
        ("tcp6:8081:50:\\:\\:1", True),
        ("tcp6:8081:\\:\\:1", False),  # the second positional of tcp6 is the backlog
        ("ssl:8443:privateKey=k.pem:certKey=c.pem", False),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1", True),
        ("ssl:8443:privateKey=k.pem:interface=127.0.0.1:interface=0.0.0.0", False),
        ("ssl:8443:k.pem:c.pem:TLSv1_2_METHOD:127.0.0.1", True),
        ("unix:/run/sna.sock", True),
        ("systemd:domain=INET:index=0", False),
        ("onion:8081", False),
        ("tcp:8081:127.0.0.1:interface=127.0.0.1", False),  # refused by Twisted anyway
        ("", False),
    ],
)
def test_loopback_is_read_as_twisted_reads_the_description(listen: str, loopback: bool) -> None:
    assert _loopback_only(listen) is loopback


description_parts = st.text(st.sampled_from(list("tcp:=\\ai0.1")), max_size=30)


@given(description_parts)
def test_descriptions_split_as_twisted_splits_them(description: str) -> None:
    try:
        expected = twisted_parse(description)
    except (RuntimeError, StopIteration):  # a trailing backslash
        return
    assert endpoint_arguments(description) == expected


def test_the_warning_for_an_interface_given_twice(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(
        [
            "--state-dir",
            str(tmp_path),
            "--listen",
            "tcp:0:interface=127.0.0.1:interface=0.0.0.0",
            "--spare-clients",
            "0",
        ]
    )
    with capturedLogs() as logged:
        makeService(options, MemoryReactorClock())
    warnings = [e for e in logged if "without --auth-token-file" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["listen"] == "tcp:0:interface=127.0.0.1:interface=0.0.0.0"


# -- the token file -------------------------------------------------------------------


def token_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o200 | 0o400])
def test_a_token_only_its_owner_can_read_is_taken(tmp_path: Path, mode: int) -> None:
    assert read_token(str(token_file(tmp_path, mode))) == b"s3cret"


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o644, "others"),
        (0o604, "others"),
        (0o666, "others"),
        (0o660, "its group"),
        (0o620, "its group"),
    ],
    ids=lambda v: oct(v) if isinstance(v, int) else v,
)
def test_a_token_others_can_read_stops_the_start_in_one_line(
    tmp_path: Path, mode: int, who: str
) -> None:
    path = token_file(tmp_path, mode)
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(["--auth-token-file", str(path)])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"--auth-token-file: {path} can be read or changed by {who}")
    assert f"mode {mode:04o}" in message and "chmod 600" in message
    assert "s3cret" not in message


def _status(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, 0, 7, 0, 0, 0))


def test_root_may_give_the_token_to_the_service_group(monkeypatch: Any) -> None:
    """PostgreSQL's rule for its key: owner only, or root's and readable by its group."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    check_secret_file("t", _status(0o640, uid=0))
    check_secret_file("t", _status(0o600, uid=1000))
    with pytest.raises(ValueError, match="its group"):
        check_secret_file("t", _status(0o640, uid=1000))
    with pytest.raises(ValueError, match="its group"):
        check_secret_file("t", _status(0o660, uid=0))
    with pytest.raises(ValueError, match="belongs to user 1001"):
        check_secret_file("t", _status(0o600, uid=1001))
    with pytest.raises(ValueError, match="not a regular file"):
        check_secret_file("t", os.stat_result((stat.S_IFDIR | 0o700, 0, 0, 1, 1000, 0, 7, 0, 0, 0)))


# -- connection options -----------------------------------------------------------------


def test_connection_limits_default_and_reach_the_site(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--spare-clients", "0"])
    assert options["limits"] == ConnectionLimits()
    assert ConnectionLimits() == ConnectionLimits(256, 128, 30.0, 60.0)
    options = Options()
    options.parseOptions(
        [
            "--state-dir",
            str(tmp_path),
            "--spare-clients",
            "0",
            "--max-connections",
            "10",
            "--max-client-connections",
            "4",
            "--request-timeout",
            "2.5",
            "--idle-timeout",
            "7",
        ]
    )
    limits = ConnectionLimits(10, 4, 2.5, 7.0)
    assert options["limits"] == limits
    reactor = MemoryReactorClock()
    service = makeService(options, reactor)
    service.startService()
    try:
        site = reactor.tcpServers[0][1]
        assert isinstance(site, ApiSite)
        assert site.limits == limits and site.timeOut == 7.0
    finally:
        service.stopService()


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-connections", "0"],
        ["--max-connections", "many"],
        ["--max-connections", "70000"],
        ["--max-client-connections", "0"],
        ["--max-client-connections", "300"],  # more than --max-connections
        ["--request-timeout", "0"],
        ["--request-timeout", "-1"],
        ["--request-timeout", "nan"],
        ["--request-timeout", "4000"],
        ["--idle-timeout", "soon"],
    ],
)
def test_bad_connection_options(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError, match=argv[0]):
        Options().parseOptions(argv)


# -- what --listen names ------------------------------------------------------------------


def test_a_listen_description_twisted_cannot_use_stops_the_start(tmp_path: Path) -> None:
    for listen, reason in [
        ("tcp:http", "invalid literal"),
        ("tcp:8081:interface=127.0.0.1:bogus=1", "bogus"),
        ("nonsense:8081", "nonsense"),
        (f"ssl:8443:privateKey={tmp_path}/missing.pem", "No such file"),
    ]:
        with pytest.raises(usage.UsageError) as raised:
            Options().parseOptions(["--listen", listen])
        message = str(raised.value)
        assert message.startswith(f"--listen {listen}: ") and reason in message
        assert "\n" not in message


def test_the_tls_key_is_a_secret_like_the_token(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    key.chmod(0o644)
    with pytest.raises(usage.UsageError, match="can be read or changed by others"):
        Options().parseOptions(["--listen", f"ssl:8443:privateKey={key}"])
    key.chmod(0o600)
    # Protected, it is read, and found not to be a key.
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(["--listen", f"ssl:8443:{key}"])
    assert "can be read" not in str(raised.value)
