"""The janitor: every snapshot an ended job left is removed, with backoff, until vCenter confirms.

vCenter is a fake whose answers the test gives one at a time; time is a
:class:`~twisted.internet.task.Clock`; the records the janitor writes are
collected as the manager would receive them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from sna.jobs.janitor import SnapshotJanitor
from sna.jobs.model import (
    SNAPSHOT_PENDING,
    SNAPSHOT_REMOVED,
    BackupRequest,
    Job,
    SnapshotState,
)
from sna.sbc import events
from sna.testing import FakeVSphere
from sna.vmware.interface import (
    AuthenticationFailed,
    Credentials,
    NotFound,
    TimedOut,
    Unreachable,
)
from tests.unit.test_process import REQUEST

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class VCenter(FakeVSphere):
    """``remove_job_snapshots`` answers from ``script`` in order (a Deferred left
    unfired is a call under way); the credentials of each call are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[Any] = []
        self.held: list[Deferred[dict[str, Any]]] = []

    def remove_job_snapshots(
        self, credentials: Credentials, vm_path: str, job_id: Optional[str]
    ) -> Deferred[dict[str, Any]]:
        self.calls.append(("remove_job_snapshots", (credentials, vm_path, job_id)))
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            return fail(answer)
        if answer is None:
            d: Deferred[dict[str, Any]] = Deferred()
            self.held.append(d)
            return d
        return succeed(answer)

    def who(self, call: int) -> tuple[str, str, str]:
        credentials, _, job_id = self.calls[call][1]
        assert job_id is not None
        return credentials.user, credentials.password, job_id


class Bench:
    def __init__(self) -> None:
        self.vcenter = VCenter()
        self.clock = Clock()
        self.records: list[tuple[str, datetime, SnapshotState]] = []
        #: VM path -> the job backing it up now.
        self.busy: dict[str, str] = {}
        self.janitor = SnapshotJanitor(
            self.vcenter,
            self.clock,
            lambda: T0 + timedelta(seconds=self.clock.seconds()),
            lambda job_id, started, state: self.records.append((job_id, started, state)),
            delays=(2.0, 8.0),
            vm_busy=self.busy.get,
        )
        self.janitor.startService()

    @property
    def last(self) -> SnapshotState:
        return self.records[-1][2]


def ended_job(request: BackupRequest = REQUEST, signal: Optional[int] = 9) -> Job:
    """The job of ``request``, its client killed (its snapshot pending) or exited 1."""
    job = Job.from_request(request, T0)
    if signal is None:
        job = job.apply(events.Snapshot(f"sbak-{request.job_id}", "created"), T0)
        return job.ended(T0, 1, None, None)
    return job.ended(T0, None, signal, None)


def test_the_snapshot_of_a_killed_client_is_removed_with_the_request_s_credentials() -> None:
    bench = Bench()
    bench.vcenter.script = [{"removed": ["sbak-backup-vm-1"]}]
    fired: list[object] = []
    bench.janitor.job_ended(ended_job(), REQUEST).addBoth(fired.append)
    assert fired == [None]
    assert bench.vcenter.who(0) == ("admin", "pa55 word", "backup-vm-1")
    [(job_id, started, state)] = bench.records
    assert (job_id, started) == ("backup-vm-1", T0)
    assert state == SnapshotState(
        "sbak-backup-vm-1",
        SNAPSHOT_REMOVED,
        attempts=1,
        removed_by="sna",
        removed_at=T0,
    )
    assert bench.janitor.pending() == []


def test_vcenter_away_is_retried_with_backoff_until_it_confirms() -> None:
    bench = Bench()
    away = Unreachable("cannot reach vCenter vcenter.example.local:443: connection refused")
    bench.vcenter.script = [away, TimedOut("no answer"), away, away, {"removed": []}]
    fired: list[object] = []
    bench.janitor.job_ended(ended_job(signal=None), REQUEST).addBoth(fired.append)
    # The first attempt is over (the manager waits for no more than that).
    assert fired == [None]
    assert bench.last.state == SNAPSHOT_PENDING
    assert (bench.last.attempts, bench.last.reason) == (1, away.message)
    assert bench.last.next_attempt == T0 + timedelta(seconds=2)
    pauses = []
    while bench.vcenter.script:
        before = len(bench.vcenter.calls)
        waited = 0.0
        while len(bench.vcenter.calls) == before:
            bench.clock.advance(0.5)
            waited += 0.5
        pauses.append(waited)
    # Doubled each time, up to the longest.
    assert pauses == [2.0, 4.0, 8.0, 8.0]
    assert bench.last.state == SNAPSHOT_REMOVED
    assert bench.last.attempts == 5 and bench.last.reason is None
    assert [r[2].state for r in bench.records] == [SNAPSHOT_PENDING] * 4 + [SNAPSHOT_REMOVED]
    bench.clock.advance(1000)
    assert len(bench.vcenter.calls) == 5


def test_nothing_is_done_for_a_job_whose_snapshot_is_not_pending() -> None:
    bench = Bench()
    job = Job.from_request(REQUEST, T0)
    removed = job.apply(events.Snapshot("sbak-backup-vm-1", "removed"), T0)
    for ended in (job.ended(T0, 1, None, None), removed.ended(T0, None, 9, None)):
        bench.janitor.job_ended(ended, REQUEST)
    assert bench.vcenter.calls == [] and bench.records == []


def test_after_a_restart_it_waits_for_credentials_for_the_same_vcenter_and_user() -> None:
    bench = Bench()
    stored = ended_job()
    bench.janitor.stored(stored)
    assert bench.vcenter.calls == []
    assert bench.last.state == SNAPSHOT_PENDING and bench.last.needs_credentials
    assert bench.last.next_attempt is None
    bench.clock.advance(1000)
    assert bench.vcenter.calls == []

    # Another user's job, or another vCenter's, brings nothing usable.
    other_user = attrs.evolve(REQUEST, job_id="backup-vm-2", vcenter_user="someone")
    other_vcenter = attrs.evolve(REQUEST, job_id="backup-vm-3", vcenter_host="vc2.example")
    for request in (other_user, other_vcenter):
        bench.janitor.job_started(request)
    assert bench.vcenter.calls == []

    # A job of the same user on the same vCenter (written another way): its password serves.
    bench.vcenter.script = [Unreachable("down"), {"removed": ["sbak-backup-vm-1"]}]
    same = attrs.evolve(
        REQUEST,
        job_id="backup-vm-4",
        vcenter_host="https://VCENTER.example.local/sdk",
        vcenter_password="new pass",
    )
    bench.janitor.job_started(same)
    assert bench.vcenter.who(0) == ("admin", "new pass", "backup-vm-1")
    assert not bench.last.needs_credentials and bench.last.attempts == 1
    # Kept in memory while the removal is pending: the retry uses it too.
    bench.clock.advance(2)
    assert bench.vcenter.who(1) == ("admin", "new pass", "backup-vm-1")
    assert bench.last.state == SNAPSHOT_REMOVED


def test_refused_credentials_wait_for_others() -> None:
    bench = Bench()
    bench.vcenter.script = [AuthenticationFailed("cannot log in: InvalidLogin")]
    bench.janitor.job_ended(ended_job(), REQUEST)
    assert bench.last.needs_credentials and bench.last.next_attempt is None
    assert bench.last.reason == "cannot log in: InvalidLogin"
    bench.clock.advance(1000)
    assert len(bench.vcenter.calls) == 1
    bench.vcenter.script = [{"removed": []}]
    offered = Credentials("vcenter.example.local", 443, "admin", "right")
    bench.janitor.offer(offered)
    assert bench.vcenter.who(1) == ("admin", "right", "backup-vm-1")
    assert bench.last.state == SNAPSHOT_REMOVED


def test_a_vm_no_longer_at_its_path_ends_the_retries_and_says_what_to_check() -> None:
    bench = Bench()
    bench.vcenter.script = [NotFound("no VM at /DC1/vm/vm on vCenter vcenter.example.local")]
    bench.janitor.job_ended(ended_job(), REQUEST)
    state = bench.last
    assert (state.state, state.attempts, state.next_attempt) == (SNAPSHOT_PENDING, 1, None)
    assert state.reason is not None and state.reason.startswith("no VM at /DC1/vm/vm")
    assert "remove snapshot sbak-backup-vm-1 from it in vCenter" in state.reason
    assert bench.janitor.pending() == []
    bench.clock.advance(10_000)
    assert len(bench.vcenter.calls) == 1
    # Credentials offered later do not start it again either.
    bench.janitor.offer(Credentials("vcenter.example.local", 443, "admin", "pa55 word"))
    assert len(bench.vcenter.calls) == 1


def test_a_job_started_again_takes_over_its_own_snapshot() -> None:
    bench = Bench()
    bench.vcenter.script = [Unreachable("down"), None]
    bench.janitor.job_ended(ended_job(), REQUEST)
    assert bench.janitor.pending() == ["backup-vm-1"]
    # Its client removes a leftover snapshot of its name before it takes its own.
    bench.janitor.job_started(REQUEST)
    assert bench.janitor.pending() == []
    records = len(bench.records)
    bench.clock.advance(1000)
    assert len(bench.vcenter.calls) == 1 and len(bench.records) == records


def test_an_attempt_under_way_for_an_older_job_of_the_same_id_is_not_recorded() -> None:
    bench = Bench()
    bench.vcenter.script = [Unreachable("down"), None]
    bench.janitor.job_ended(ended_job(), REQUEST)
    bench.clock.advance(2)
    [held] = bench.vcenter.held
    bench.janitor.job_started(REQUEST)
    records = len(bench.records)
    assert held.called  # cancelled
    assert len(bench.records) == records


def test_stopping_ends_the_retries_and_attempts_under_way() -> None:
    bench = Bench()
    bench.vcenter.script = [Unreachable("down"), None]
    bench.janitor.job_ended(ended_job(), REQUEST)
    bench.clock.advance(2)
    [held] = bench.vcenter.held
    records = len(bench.records)
    bench.janitor.stopService()
    assert held.called
    bench.clock.advance(1000)
    assert len(bench.vcenter.calls) == 2 and len(bench.records) == records

    # A client that ends during the shutdown still gets one attempt (the manager waits
    # for it before the store closes), but no retry.
    bench.vcenter.script = [Unreachable("down")]
    other = attrs.evolve(REQUEST, job_id="backup-vm-9")
    fired: list[object] = []
    bench.janitor.job_ended(ended_job(other), other).addBoth(fired.append)
    assert fired == [None]
    assert bench.last.state == SNAPSHOT_PENDING and bench.last.next_attempt is None
    bench.clock.advance(1000)
    assert len(bench.vcenter.calls) == 3


def test_a_vcenter_host_that_names_no_vcenter_is_said_so() -> None:
    bench = Bench()
    bad = attrs.evolve(REQUEST, vcenter_host="ftp://nowhere")
    bench.janitor.job_ended(ended_job(bad), bad)
    assert bench.vcenter.calls == []
    assert bench.last.state == SNAPSHOT_PENDING
    assert "names no vCenter" in (bench.last.reason or "")
    assert bench.janitor.pending() == []


def test_a_vm_being_backed_up_is_left_alone_until_its_job_ends() -> None:
    bench = Bench()
    bench.busy[REQUEST.vm_path] = "backup-vm-2"
    bench.janitor.job_ended(ended_job(), REQUEST)
    assert bench.vcenter.calls == []
    assert bench.last.state == SNAPSHOT_PENDING and bench.last.attempts == 0
    assert bench.last.reason == (
        "job backup-vm-2 is backing up VM /DC1/vm/vm and uses its snapshot; "
        "waiting until it has ended"
    )
    assert bench.last.next_attempt == T0 + timedelta(seconds=2)
    bench.clock.advance(2)
    assert bench.vcenter.calls == []
    del bench.busy[REQUEST.vm_path]
    bench.vcenter.script = [{"removed": ["sbak-backup-vm-1"]}]
    bench.clock.advance(4)
    assert len(bench.vcenter.calls) == 1
    assert bench.last.state == SNAPSHOT_REMOVED and bench.last.attempts == 1
