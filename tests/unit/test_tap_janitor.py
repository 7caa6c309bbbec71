"""``twistd sna``'s stall timeout and snapshot janitor, as the options wire them."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from sna.jobs.janitor import SnapshotJanitor
from sna.tap import Options, makeService
from tests.unit.test_process import REQUEST


def test_the_stall_timeout_defaults_to_ten_minutes_and_reaches_the_client() -> None:
    options = Options()
    options.parseOptions([])
    assert options["stall-timeout"] == 600.0
    assert "--stall-timeout" in str(Options())
    options = Options()
    options.parseOptions(["--stall-timeout", "90"])
    assert options["stall-timeout"] == 90.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_stall_timeout_that_is_no_duration_stops_startup(value: str) -> None:
    with pytest.raises(usage.UsageError, match="--stall-timeout"):
        Options().parseOptions(["--stall-timeout", value])


def test_the_client_is_told_the_daemon_s_stall_timeout(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--stall-timeout", "42.5"])
    service = makeService(options, MemoryReactorClock())
    [janitor] = [s for s in service if isinstance(s, SnapshotJanitor)]  # type: ignore[attr-defined]
    assert janitor.pending() == []
    command = service.manager._launcher.command  # type: ignore[attr-defined]
    assert "--stall-timeout=42.5" in command.arguments(REQUEST)
