"""What sna tells the SHA and when, against an in-memory SHA (StubTreq) and a Clock.

The bodies are checked against the SHA's own structs (reference/sha-contract.md
§2): integers are JSON integers, disks are named by their index, statuses are
those its columns hold.  The end-to-end checks against a strict SHA double
are in tests/integration/test_sha_e2e.py.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Optional

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sna.jobs.model import Job, JobStatus
from sna.jobs.store import OutboxRow, StoreError
from sna.sbc import events
from sna.sha import messages
from sna.sha.client import ShaClient
from sna.sha.hub import Lookup, ShaHub
from sna.sha.live import IDLE_INTERVAL, MIN_SPACING, MOVING_INTERVAL, LiveTelemetry
from sna.sha.outbox import BACKOFF, RECORD_RETRY, Outbox, summary
from sna.testing import MemoryJobStore, SteppingClock
from tests.unit.test_model import T0, make_job

INT_FIELDS = ("bytes_transferred", "total_bytes", "transfer_speed_bps", "eta_seconds")


class FakeSha(Resource):
    """Answers each request with the next scripted status (200 when none is left)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[int] = []
        self.requests: list[tuple[str, str, Any]] = []
        #: When set, requests wait until it fires.
        self.hold: Optional[Deferred[None]] = None
        self.bodies: dict[str, bytes] = {}

    def render(self, request: Request) -> Any:
        assert request.content is not None
        raw = request.content.read()
        path = request.uri.decode()
        self.requests.append((request.method.decode(), path, json.loads(raw) if raw else None))
        code = self.codes.pop(0) if self.codes else 200
        body = self.bodies.get(path.partition("?")[0], b'{"status":"success"}')

        def answer(_: object = None) -> None:
            request.setResponseCode(code)
            request.write(body)
            request.finish()

        if self.hold is not None:
            self.hold.addCallback(answer)
            return NOT_DONE_YET
        request.setResponseCode(code)
        return body

    def posts(self, prefix: str = "") -> list[tuple[str, Any]]:
        return [(p, b) for m, p, b in self.requests if m == "POST" and p.startswith(prefix)]


@pytest.fixture
def sha() -> FakeSha:
    return FakeSha()


def client(sha: FakeSha, clock: Clock) -> tuple[ShaClient, StubTreq]:
    treq = StubTreq(sha)
    return ShaClient(treq, "http://127.0.0.1:8082/", clock), treq


def two_disk_job(job_id: str = "backup-SQL Server 01-1796166100") -> Job:
    job = attrs.evolve(make_job(("2000", "2001")), job_id=job_id)
    job = job.apply(events.DiskPlan("2000", "full", 600, vmware_disk_key="16000"), T0)
    return job.apply(events.DiskPlan("2001", "incremental", 400, vmware_disk_key="2000"), T0)


# -- bodies -----------------------------------------------------------------------------------


def test_paths_percent_encode_the_job_id_byte_for_byte() -> None:
    job_id = "backup-Büro (alt) 50%/x-1"
    assert messages.complete_path(job_id) == (
        "/api/v1/backups/backup-B%C3%BCro%20%28alt%29%2050%25%2Fx-1/complete"
    )
    assert messages.telemetry_path("a b") == "/api/v1/telemetry/backup/a%20b"
    assert messages.changeid_path("SQL Server ü", 1) == (
        "/api/v1/backups/changeid?vm_name=SQL%20Server%20%C3%BC&disk_id=1"
    )


def test_live_telemetry_has_every_disk_by_index_and_integers_only() -> None:
    job = two_disk_job()
    job = job.apply(events.DiskStart("2000", "full", bytes_total=600), T0)
    job = job.apply(events.Progress(150, 600, "2000", throughput_bps=50.7), T0)
    body = messages.telemetry(job, T0, rate=50.7)
    assert body["status"] == "running" and body["current_phase"] == "transferring"
    assert (body["bytes_transferred"], body["total_bytes"]) == (150, 1000)
    assert (body["transfer_speed_bps"], body["eta_seconds"]) == (50, 16)
    for field in INT_FIELDS:
        assert type(body[field]) is int, field
    assert body["disks"] == [
        {
            "disk_index": 0,
            "bytes_transferred": 150,
            "total_bytes": 600,
            "status": "running",
            "progress_percent": 25.0,
        },
        {
            "disk_index": 1,
            "bytes_transferred": 0,
            "total_bytes": 400,
            "status": "pending",
            "progress_percent": 0.0,
        },
    ]
    assert "error" not in body


def test_a_copied_disk_is_not_completed_by_telemetry() -> None:
    """Only /complete may complete a disk row: it carries the change ID."""
    job = two_disk_job().apply(events.DiskDone("2000", "52 aa/1", 600, 600), T0)
    [first, _] = messages.telemetry(job, T0)["disks"]
    assert (first["status"], first["progress_percent"]) == ("running", 100.0)


def test_final_states() -> None:
    job = two_disk_job().apply(events.Progress(100, 600, "2000"), T0)
    completed = messages.telemetry(job.ended(T0, 0, None, None), T0)
    assert (completed["status"], completed["progress_percent"], completed["disks"]) == (
        "completed",
        100.0,
        [],
    )
    failed = messages.telemetry(job.ended(T0, 3, None, "Error: boom"), T0)
    assert failed["status"] == "failed"
    assert failed["error"]["message"] == "backup client exited with code 3: Error: boom"
    assert {d["status"] for d in failed["disks"]} == {"failed"}
    cancelled = messages.telemetry(job.cancelling(T0).ended(T0, 143, None, None), T0)
    assert cancelled["status"] == "cancelled" and "error" not in cancelled
    killed = messages.telemetry(job.ended(T0, None, 9, None), T0)
    assert killed["error"]["code"] == "CLIENT_KILLED"
    interrupted = messages.telemetry(job.interrupted(T0, "sna stopped"), T0)
    assert (interrupted["status"], interrupted["error"]["code"]) == ("failed", "INTERRUPTED")


def test_completions_one_per_disk_in_index_order_only_when_completed() -> None:
    job = two_disk_job()
    job = job.apply(events.DiskDone("2001", "52 bb/2", 10, 400), T0)
    job = job.apply(events.DiskDone("2000", "52 aa/1", 600, 600), T0)
    assert messages.completions(job.ended(T0, 1, None, None)) == []
    found = messages.completions(job.ended(T0, 0, None, None))
    assert [json.loads(m.body) for m in found] == [
        {"disk_id": 0, "change_id": "52 aa/1", "bytes_transferred": 600},
        {"disk_id": 1, "change_id": "52 bb/2", "bytes_transferred": 10},
    ]
    assert {m.path for m in found} == {messages.complete_path(job.job_id)}


def test_no_completion_at_all_when_a_disk_has_no_change_id() -> None:
    job = two_disk_job().apply(events.DiskDone("2000", "52 aa/1", 600, 600), T0)
    [message, final] = messages.final_messages(job.ended(T0, 0, None, None), T0)
    assert message.not_sent is not None and "2001" in message.not_sent
    # The SHA could neither restore nor continue a job completed without its disks.
    body = json.loads(final.body)
    assert (body["status"], body["error"]["code"]) == ("failed", "NO_CHANGE_ID")
    store = MemoryJobStore()
    store.save(job, [message, final])
    report = summary(store.outbox())
    assert report is not None and report["completion"]["state"] == "not_sent"
    assert report["completion"]["error"].startswith("the completions: the backup client")


@pytest.mark.parametrize(
    "kind, code, outcome",
    [
        ("complete", 200, "delivered"),
        ("complete", 404, "refused"),
        ("complete", 400, "refused"),
        ("complete", 500, "retry"),
        ("complete", 503, "retry"),
        ("complete", 429, "retry"),
        ("telemetry", 500, "unknown_job"),
        ("telemetry", 502, "retry"),
    ],
)
def test_outcomes(kind: str, code: int, outcome: str) -> None:
    assert messages.outcome(kind, code) == outcome


def test_changeid_answers() -> None:
    found = b'{"backup_job_id":"b","change_id":"52 aa/1","disk_id":"0","message":"m","vm_name":"v"}'
    assert messages.previous_change_id(found) == "52 aa/1"
    assert messages.previous_change_id(b'{"change_id":"","disk_id":"0"}') is None
    for bad in (b"nope", b"[]", b'{"change_id": 5}'):
        with pytest.raises(messages.BadAnswer):
            messages.previous_change_id(bad)


# -- live telemetry ---------------------------------------------------------------------------


@attrs.define
class Running:
    jobs: list[Job]

    def __call__(self) -> list[Job]:
        return self.jobs


def live(sha: FakeSha) -> tuple[LiveTelemetry, Running, Clock, StubTreq]:
    clock = Clock()
    http, treq = client(sha, clock)
    running = Running([])
    return LiveTelemetry(http, clock, lambda: T0, running), running, clock, treq


def advance(clock: Clock, treq: StubTreq, seconds: float, step: float = 0.5) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)
        treq.flush()


def test_a_job_is_pushed_at_its_start_then_at_the_cadence(sha: FakeSha) -> None:
    pusher, running, clock, treq = live(sha)
    pusher.start()
    job = two_disk_job()
    running.jobs = [job]
    pusher.job_started(job)
    treq.flush()
    assert len(sha.posts()) == 1
    assert sha.posts()[0][0] == messages.telemetry_path(job.job_id)
    # Nothing moves: the next push is the heartbeat, within 30 s.
    advance(clock, treq, IDLE_INTERVAL - 1)
    assert len(sha.posts()) == 1
    advance(clock, treq, 2)
    assert len(sha.posts()) == 2
    # Bytes move: a push at least every 5 s.
    times = []
    for n in range(20):
        running.jobs = [job.apply(events.Progress(n * 10, 600, "2000"), T0)]
        before = len(sha.posts())
        advance(clock, treq, 1)
        if len(sha.posts()) > before:
            times.append(clock.seconds())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and all(MOVING_INTERVAL <= gap <= 5.0 for gap in gaps), gaps


def test_a_new_phase_goes_promptly_but_never_twice_within_a_second(sha: FakeSha) -> None:
    pusher, running, clock, treq = live(sha)
    pusher.start()
    job = two_disk_job()
    running.jobs = [job]
    pusher.job_started(job)
    treq.flush()
    running.jobs = [job.apply(events.Phase("snapshot"), T0)]
    advance(clock, treq, 1.0)
    assert len(sha.posts()) == 1  # not within MIN_SPACING of the first
    advance(clock, treq, MIN_SPACING)
    assert len(sha.posts()) == 2
    assert sha.posts()[1][1]["current_phase"] == "snapshot"


def test_one_push_at_a_time(sha: FakeSha) -> None:
    pusher, running, clock, treq = live(sha)
    sha.hold = Deferred()
    pusher.start()
    job = two_disk_job()
    running.jobs = [job]
    pusher.job_started(job)
    # Bytes move, but the push under way has not been answered (nor timed out, at 10 s).
    for n in range(9):
        running.jobs = [job.apply(events.Progress(n, 600, "2000"), T0)]
        clock.advance(1)
    assert len(sha.requests) == 1
    finished = pusher.finished(job.job_id)
    assert not finished.called
    sha.hold.callback(None)
    treq.flush()
    assert finished.called


def test_a_job_the_sha_does_not_know_stops_being_pushed(sha: FakeSha) -> None:
    pusher, running, clock, treq = live(sha)
    sha.codes = [500] * 10
    pusher.start()
    job = two_disk_job()
    running.jobs = [job]
    pusher.job_started(job)
    treq.flush()
    advance(clock, treq, 3 * IDLE_INTERVAL + 10)
    assert len(sha.posts()) == 3
    state = pusher.state(job.job_id)
    assert state is not None and state.stopped is not None and "500" in state.stopped
    advance(clock, treq, 2 * IDLE_INTERVAL)
    assert len(sha.posts()) == 3


def test_only_500s_in_a_row_stop_the_pushes(sha: FakeSha) -> None:
    pusher, running, clock, treq = live(sha)
    sha.codes = [500, 500, 503, 500, 500, 502, 500, 500]
    pusher.start()
    job = two_disk_job()
    running.jobs = [job]
    pusher.job_started(job)
    treq.flush()
    advance(clock, treq, 8 * IDLE_INTERVAL + 10)
    state = pusher.state(job.job_id)
    assert state is not None and state.stopped is None and len(sha.posts()) >= 9


def test_a_sha_that_is_down_never_fails_the_job(sha: FakeSha) -> None:
    pusher, running, clock, treq = live(sha)
    sha.codes = [503, 503]
    pusher.start()
    job = two_disk_job()
    running.jobs = [job]
    pusher.job_started(job)
    treq.flush()
    state = pusher.state(job.job_id)
    assert state is not None and state.failing == 'HTTP 503: {"status":"success"}'
    advance(clock, treq, 2 * IDLE_INTERVAL + 2)
    assert state.failing is None and state.delivered == 1 and state.stopped is None


# -- the outbox -------------------------------------------------------------------------------


def ended_job() -> Job:
    job = two_disk_job()
    job = job.apply(events.DiskDone("2000", "52 aa/1", 600, 600), T0)
    job = job.apply(events.DiskDone("2001", "52 bb/2", 400, 400), T0)
    return job.ended(T0, 0, None, None)


def outbox(sha: FakeSha, store: MemoryJobStore) -> tuple[Outbox, Clock, StubTreq]:
    clock = Clock()
    http, treq = client(sha, clock)
    return Outbox(http, store, clock), clock, treq


def test_completions_then_the_final_state_in_order(sha: FakeSha) -> None:
    store = MemoryJobStore()
    job = ended_job()
    store.save(job, messages.final_messages(job, T0))
    box, _, treq = outbox(sha, store)
    closed: Deferred[None] = Deferred()
    box.deliver(job.job_id, after=closed)
    treq.flush()
    assert sha.requests == [], "nothing before the disks are disconnected"
    closed.callback(None)
    treq.flush()
    posts = sha.posts()
    assert [p for p, _ in posts] == [
        messages.complete_path(job.job_id),
        messages.complete_path(job.job_id),
        messages.telemetry_path(job.job_id),
    ]
    assert [b.get("disk_id") for _, b in posts[:2]] == [0, 1]
    assert posts[2][1]["status"] == "completed"
    assert {r.state for r in store.outbox()} == {"delivered"}
    report = summary(store.outbox(job.job_id))
    assert report is not None and report["completion"]["state"] == "delivered"


def test_a_sha_that_is_down_gets_everything_later_once(sha: FakeSha) -> None:
    store = MemoryJobStore()
    job = ended_job()
    store.save(job, messages.final_messages(job, T0))
    box, clock, treq = outbox(sha, store)
    sha.codes = [503] * 8
    box.deliver(job.job_id)
    treq.flush()
    for delay in (*BACKOFF, 60.0, 60.0):
        clock.advance(delay)
        treq.flush()
    posts = sha.posts()
    assert len(posts) == 8 + 3
    # Each message was delivered once: the retries were of the first, then in order.
    delivered = [p for p in posts[8:]]
    assert [b.get("disk_id", "final") for _, b in delivered] == [0, 1, "final"]
    assert [r.attempts for r in store.outbox()] == [9, 1, 1]


def test_refused_is_final_and_said_and_the_rest_still_goes(sha: FakeSha) -> None:
    store = MemoryJobStore()
    job = ended_job()
    store.save(job, messages.final_messages(job, T0))
    box, _, treq = outbox(sha, store)
    sha.codes = [404]
    box.deliver(job.job_id)
    treq.flush()
    assert len(sha.posts()) == 3
    report = summary(store.outbox(job.job_id))
    assert report is not None
    completion = report["completion"]
    assert completion["state"] == "refused"
    assert completion["error"].startswith("the completion of disk 0: HTTP 404")
    assert report["final_state"]["state"] == "delivered"


def test_a_final_state_of_an_unknown_job_is_given_up(sha: FakeSha) -> None:
    store = MemoryJobStore()
    job = make_job().ended(T0, 2, None, None)
    store.save(job, messages.final_messages(job, T0))
    box, clock, treq = outbox(sha, store)
    sha.codes = [500] * 10
    box.deliver(job.job_id)
    for _ in range(10):
        treq.flush()
        clock.advance(60)
    assert len(sha.posts()) == 3
    assert store.outbox()[0].state == "given_up"


def test_waiting_for_deliveries_does_not_wait_for_a_sha_that_is_down(sha: FakeSha) -> None:
    """At shutdown the daemon waits for messages being sent, not for retries to come."""
    store = MemoryJobStore()
    job = ended_job()
    store.save(job, messages.final_messages(job, T0))
    box, clock, treq = outbox(sha, store)
    sha.hold = Deferred()
    box.deliver(job.job_id)
    waited = box.wait()
    assert not waited.called, "a request is under way"
    sha.codes = [503]
    sha.hold.callback(None)
    treq.flush()
    assert waited.called, "backing off: nothing under way"
    sha.hold = None
    clock.advance(BACKOFF[0])
    treq.flush()
    assert {r.state for r in store.outbox()} == {"delivered"}


def test_a_job_delivered_again_waits_for_its_new_gate(sha: FakeSha) -> None:
    """A new job of the same id ends while the old one's delivery backs off."""
    store = MemoryJobStore()
    job = make_job().ended(T0, 1, None, None)
    store.save(job, messages.final_messages(job, T0))
    box, clock, treq = outbox(sha, store)
    sha.codes = [503]
    box.deliver(job.job_id)
    treq.flush()
    store.outbox_forget(job.job_id)
    again = make_job().ended(T0, 2, None, None)
    store.save(again, messages.final_messages(again, T0))
    closed: Deferred[None] = Deferred()
    box.deliver(again.job_id, after=closed)
    clock.advance(60)
    treq.flush()
    assert len(sha.posts()) == 1, "not before the new job's connections are closed"
    closed.callback(None)
    treq.flush()
    assert len(sha.posts()) == 2 and store.outbox()[0].state == "delivered"


def test_what_a_stopped_daemon_left_goes_at_the_next_start(sha: FakeSha) -> None:
    store = MemoryJobStore()
    job = ended_job()
    store.save(job, messages.final_messages(job, T0))
    box, _, treq = outbox(sha, store)
    sha.codes = [503]
    box.deliver(job.job_id)
    treq.flush()
    box.stop()
    treq.flush()
    assert box.wait().called
    assert [r.state for r in store.outbox()] == ["pending"] * 3
    again, _, treq2 = outbox(sha, store)
    again.start()
    treq2.flush()
    assert [b.get("disk_id", "final") for _, b in sha.posts()[1:]] == [0, 1, "final"]
    assert {r.state for r in store.outbox()} == {"delivered"}


# -- the hub ----------------------------------------------------------------------------------


def hub(sha: FakeSha, legacy: bool = False) -> tuple[ShaHub, MemoryJobStore, StubTreq]:
    clock = Clock()
    http, treq = client(sha, clock)
    store = MemoryJobStore()
    return ShaHub(http, store, clock, SteppingClock(), list, legacy=legacy), store, treq


def resolve(d: Deferred[Any], treq: StubTreq) -> Any:
    treq.flush()
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not answered"
    return results[0]


def test_lookups_ask_per_disk_index(sha: FakeSha) -> None:
    shahub, _, treq = hub(sha)
    sha.bodies["/api/v1/backups/changeid"] = b'{"change_id":"52 aa/1","disk_id":"0"}'
    found = resolve(shahub.previous_change_ids("SQL Server 01", [0, 1]), treq)
    assert found == {0: Lookup("52 aa/1"), 1: Lookup("52 aa/1")}
    assert [p for _, p, _ in sha.requests] == [
        "/api/v1/backups/changeid?vm_name=SQL%20Server%2001&disk_id=0",
        "/api/v1/backups/changeid?vm_name=SQL%20Server%2001&disk_id=1",
    ]


def test_a_lookup_that_fails_says_why(sha: FakeSha) -> None:
    shahub, _, treq = hub(sha)
    sha.codes = [500]
    found = resolve(shahub.previous_change_ids("vm", [0]), treq)
    assert found[0].change_id is None and "HTTP 500" in (found[0].error or "")


def test_the_legacy_client_asks_and_completes_by_itself(sha: FakeSha) -> None:
    shahub, _, treq = hub(sha, legacy=True)
    assert resolve(shahub.previous_change_ids("vm", [0]), treq) == {}
    kinds = [m.kind for m in shahub.ended_messages(ended_job())]
    assert kinds == ["telemetry"]
    assert sha.requests == []


def test_report_joins_live_pushes_and_deliveries(sha: FakeSha) -> None:
    shahub, store, treq = hub(sha)
    job = ended_job()
    assert shahub.report(job.job_id) is None
    shahub.job_started(attrs.evolve(job, status=JobStatus.RUNNING))
    treq.flush()
    store.save(job, shahub.ended_messages(job))
    shahub.job_ended(job.job_id, succeed(None))
    treq.flush()
    report = shahub.report(job.job_id)
    assert report is not None
    assert report["telemetry"]["pushes"] == 1
    assert report["completion"]["state"] == "delivered"
    assert report["final_state"]["state"] == "delivered"


class FullStore(MemoryJobStore):
    """A store whose writes fail while ``full``."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def outbox_update(self, seq: int, state: str, attempts: int, reason: Optional[str]) -> None:
        if self.full:
            raise StoreError("database or disk is full", full=True)
        super().outbox_update(seq, state, attempts, reason)


def test_a_database_that_will_not_record_a_delivery_never_causes_a_second_one(
    sha: FakeSha,
) -> None:
    store = FullStore()
    job = ended_job()
    store.save(job, messages.final_messages(job, T0))
    box, clock, treq = outbox(sha, store)
    store.full = True
    box.deliver(job.job_id)
    treq.flush()
    # Each message went once, though none of it could be recorded.
    assert [b.get("disk_id", "final") for _, b in sha.posts()] == [0, 1, "final"]
    assert {r.state for r in store.outbox()} == {"pending"}
    store.full = False
    clock.advance(RECORD_RETRY)
    assert {r.state for r in store.outbox()} == {"delivered"}
    assert len(sha.posts()) == 3


class BrokenStore(MemoryJobStore):
    """A store with a bug: reading the outbox raises what no caller expects."""

    def outbox(self, job_id: Optional[str] = None) -> list[OutboxRow]:
        raise RuntimeError("the outbox table is gone")


def test_an_unexpected_error_that_stops_a_delivery_is_logged(sha: FakeSha) -> None:
    store = BrokenStore()
    box, _, treq = outbox(sha, store)
    with capturedLogs() as events:
        box.deliver("backup-broken-1")
        treq.flush()
    [event] = [e for e in events if "delivering to the SHA stopped" in e.get("log_format", "")]
    assert event["job_id"] == "backup-broken-1"
    assert event["log_failure"].check(RuntimeError)
    assert sha.posts() == []
