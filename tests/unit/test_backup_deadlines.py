"""The client's deadlines and its stall watchdog, in memory.

vCenter calls run on a :class:`~sna.testing.HeldThreadPool` (a call the test
does not run is a vCenter that does not answer); time is a
:class:`~twisted.internet.task.Clock`; events are read back with sna's own
parser.  The real thing (a paused simulator, a paused qemu-nbd) is in
``tests/integration/test_outages.py``.
"""

from __future__ import annotations

import io
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sna.backup.events import EventWriter
from sna.backup.job import BackupJob
from sna.backup.options import JobOptions
from sna.backup.reactor import ClientReactor
from sna.contract.targets import NbdTarget
from sna.contract.vcenter import TimedOut
from sna.sbc import events
from sna.sbc.parse import JsonLineParser
from sna.testing import HeldThreadPool, SameThread

OPTIONS = JobOptions(
    host="vc.example",
    port=443,
    user="u",
    password="pw",
    vm_path="/DC/vm/vm",
    job_id="j",
    targets=(NbdTarget("2000", "127.0.0.1", 10100, "vm-disk0"),),
    stall_timeout=60.0,
    vcenter_timeout=30.0,
)


class Pool(HeldThreadPool):
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Bench:
    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.pool = Pool()
        self.out = io.BytesIO()
        reactor = ClientReactor(
            clock=self.clock,
            tcp=None,  # type: ignore[arg-type]
            unix=None,  # type: ignore[arg-type]
            fds=None,  # type: ignore[arg-type]
            processes=None,  # type: ignore[arg-type]
            threads=SameThread(),
            pool=self.pool,  # type: ignore[arg-type]
        )
        self.job = BackupJob(reactor, attrs.evolve(OPTIONS, **options), EventWriter(self.out))

    def events(self) -> list[events.Event]:
        parser = JsonLineParser()
        return [e for line in self.out.getvalue().decode().splitlines() for e in parser.parse(line)]

    def seconds(self, n: int) -> None:
        """``n`` seconds pass, the watchdog looking once a second."""
        for _ in range(n):
            self.clock.advance(1)
            self.job._tick()


def test_a_vcenter_call_that_does_not_answer_fails_at_its_deadline() -> None:
    bench = Bench()
    call = Deferred.fromCoroutine(bench.job._call("finding VM '/DC/vm/vm'", lambda: "vm"))
    bench.clock.advance(29.9)
    assert not call.called
    bench.clock.advance(0.1)
    failure = SynchronousTestCase().failureResultOf(call, TimedOut)
    assert str(failure.value) == (
        "vCenter vc.example:443 did not answer within 30 s (finding VM '/DC/vm/vm')"
    )
    # The call given up ends later on its thread: nothing more happens.
    assert bench.pool.run() == 1


def test_the_stall_timeout_bounds_a_call_too() -> None:
    bench = Bench(stall_timeout=4.0)
    call = Deferred.fromCoroutine(bench.job._call("logging in as u", lambda: None))
    bench.clock.advance(4)
    SynchronousTestCase().failureResultOf(call, TimedOut)


def test_a_vcenter_wait_is_reported_as_a_stall_and_its_end_as_a_resume() -> None:
    bench = Bench()
    call = Deferred.fromCoroutine(bench.job._call("removing snapshot sbak-j", lambda: None))
    bench.seconds(14)
    assert bench.events() == []
    bench.seconds(1)
    [stall] = bench.events()
    assert isinstance(stall, events.Stall)
    assert (stall.on, stall.seconds) == ("vcenter", 15.0)
    assert stall.message == "vCenter vc.example:443: removing snapshot sbak-j, no end after 15 s"
    bench.seconds(5)
    assert len(bench.events()) == 1  # said once
    bench.pool.run()
    assert call.called
    bench.seconds(1)
    assert isinstance(bench.events()[-1], events.Resume)


@pytest.mark.parametrize(("stall_timeout", "notice"), [(600.0, 15), (6.0, 3)])
def test_a_stall_is_told_within_half_the_stall_timeout_and_15_s(
    stall_timeout: float, notice: int
) -> None:
    bench = Bench(stall_timeout=stall_timeout)
    Deferred.fromCoroutine(bench.job._call("finding VM", lambda: None))
    bench.seconds(notice - 1)
    assert bench.events() == []
    bench.seconds(1)
    assert [type(e) for e in bench.events()] == [events.Stall]
