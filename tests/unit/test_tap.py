"""``twistd sna`` options and the service they build."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from sna.config import PortRange
from sna.sbc.spare import SparePool
from sna.service import SnaService
from sna.tap import Options, makeService


def test_defaults() -> None:
    options = Options()
    options.parseOptions([])
    assert options["listen"] == "tcp:8081:interface=127.0.0.1"
    assert options["log-dir"] == "/var/log/sendense"
    assert options["nbd-ports"] == PortRange(10100, 10200)
    assert options["nbd-hosts"] == ("127.0.0.1", "::1", "localhost")
    assert options["max-jobs"] == 8
    assert options["sbc"].argv == ("sendense-backup-client",)
    assert not options["sbc"].legacy
    assert options["spare-clients"] == 1


def test_help_names_every_option() -> None:
    text = str(Options())
    for name in (
        "--listen",
        "--state-dir",
        "--log-dir",
        "--sbc",
        "--sbc-legacy",
        "--nbd-ports",
        "--nbd-hosts",
        "--max-jobs",
        "--kill-grace",
        "--spare-clients",
    ):
        assert name in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--nbd-ports", "10200-10100"],
        ["--nbd-ports", "many"],
        ["--max-jobs", "0"],
        ["--kill-grace", "-3"],
        ["--sbc", ""],
        ["--nbd-hosts", ","],
        ["--max-jobs", "2000"],
        ["--max-jobs", "many"],
        ["--kill-grace", "7200"],
        ["--job-retention-days", "-1"],
        ["--sha-url", "ftp://sha"],
        ["--sha-url", "localhost:8082"],
        ["--vcenter-ca-file", "/nonexistent/ca.pem"],
        ["--spare-clients", "-1"],
        ["--spare-clients", "17"],
        ["--spare-clients", "one"],
    ],
)
def test_bad_options(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError, match=argv[0]):
        Options().parseOptions(argv)


def test_make_service_does_no_io(tmp_path: Path) -> None:
    options = Options()
    state = tmp_path / "state"
    options.parseOptions(["--state-dir", str(state), "--log-dir", str(tmp_path / "log")])
    reactor = MemoryReactorClock()
    service = makeService(options, reactor)
    assert isinstance(service, SnaService)
    assert not state.exists()
    assert reactor.tcpServers == []


@pytest.mark.parametrize(
    ("argv", "spares"),
    [([], 1), (["--spare-clients", "3"], 3), (["--spare-clients", "0"], 0)],
)
def test_spare_clients_are_a_child_service(tmp_path: Path, argv: list[str], spares: int) -> None:
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), *argv])
    service = makeService(options, MemoryReactorClock())
    pools = [s for s in service if isinstance(s, SparePool)]  # type: ignore[attr-defined]
    assert [p.size for p in pools] == ([spares] if spares else [])


def test_the_legacy_client_gets_no_spares(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--sbc-legacy", "--sbc", "/opt/mk"])
    service = makeService(options, MemoryReactorClock())
    assert not [s for s in service if isinstance(s, SparePool)]  # type: ignore[attr-defined]


def test_start_and_stop(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--log-dir",
            "/proc/forbidden/log",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--spare-clients",
            "0",
        ]
    )
    reactor = MemoryReactorClock()
    service = makeService(options, reactor)
    service.startService()
    assert (tmp_path / "state" / "sna.sqlite").exists()
    # /proc cannot hold a directory: job logs fall back under the state dir.
    assert (tmp_path / "state" / "log").is_dir()
    assert reactor.tcpServers[0][0] == 0
    d = service.stopService()
    results: list[object] = []
    d.addBoth(results.append)
    assert results == [None]
