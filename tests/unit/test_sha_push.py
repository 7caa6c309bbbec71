"""The final-state push to the SHA, against an in-memory SHA (StubTreq)."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from sna.jobs.model import JobStatus
from sna.sbc import events
from sna.telemetry.sha import RESEND_INTERVAL, RETRY_DELAYS, ShaNotifier, telemetry
from sna.testing import MemoryJobStore
from tests.unit.test_model import T0, make_job


class FakeSha(Resource):
    isLeaf = True

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.posts: list[tuple[bytes, dict[str, Any]]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.posts.append((request.path, json.loads(request.content.read())))
        if self.failures:
            self.failures -= 1
            request.setResponseCode(503)
            return b"busy"
        return b'{"status":"ok"}'


def test_a_failed_job_is_pushed_with_its_error() -> None:
    job = make_job().apply(events.DiskDone("2000", change_id="52 aa/3"), T0)
    job = job.ended(T0, 3, None, "Error: NBD write failed")
    body = telemetry(job)
    assert body["status"] == "failed"
    assert body["job_type"] == "backup"
    assert body["error"]["message"] == "backup client exited with code 3: Error: NBD write failed"
    assert [d["change_id"] for d in body["disks"]] == ["52 aa/3", None]


def test_a_completed_job_has_no_error() -> None:
    job = make_job().ended(T0, 0, None, None)
    body = telemetry(job)
    assert (body["status"], body["current_phase"], body["progress_percent"]) == (
        "completed",
        "completed",
        100.0,
    )
    assert "error" not in body


def test_push_retries_until_the_sha_takes_it() -> None:
    sha = FakeSha(failures=2)
    clock = Clock()
    notifier = ShaNotifier(StubTreq(sha), "http://sha.example.local:8082/", clock)
    job = make_job().ended(T0, 0, None, None)
    notifier.job_ended(job)
    assert len(sha.posts) == 1
    clock.advance(RETRY_DELAYS[0])
    assert len(sha.posts) == 2
    clock.advance(RETRY_DELAYS[1])
    assert len(sha.posts) == 3
    done: list[object] = []
    notifier.wait().addCallback(done.append)
    assert done, "nothing is pending once the SHA answered 200"
    clock.advance(sum(RETRY_DELAYS))
    assert len(sha.posts) == 3
    path, body = sha.posts[-1]
    assert path == b"/api/v1/telemetry/backup/j1"
    assert body["status"] == "completed"


def test_a_sha_that_stays_down_is_given_up_on() -> None:
    sha = FakeSha(failures=100)
    clock = Clock()
    notifier = ShaNotifier(StubTreq(sha), "http://sha.example.local:8082", clock)
    notifier.job_ended(make_job().interrupted(T0, "sna stopped"))
    for delay in RETRY_DELAYS:
        clock.advance(delay)
    assert len(sha.posts) == 1 + len(RETRY_DELAYS)
    assert sha.posts[0][1]["status"] == "failed"
    assert sha.posts[0][1]["current_phase"] == JobStatus.INTERRUPTED.value
    clock.advance(3600)
    assert len(sha.posts) == 1 + len(RETRY_DELAYS)


# -- the outbox: what the SHA has not taken survives a restart ---------------------------------


def test_a_taken_push_leaves_nothing_in_the_outbox() -> None:
    store = MemoryJobStore()
    notifier = ShaNotifier(StubTreq(FakeSha()), "http://sha.example.local", Clock(), store)
    notifier.job_ended(make_job().ended(T0, 0, None, None))
    assert store.outbox == {}


def test_a_sha_that_stays_down_gets_it_again_later_and_after_a_restart() -> None:
    store = MemoryJobStore()
    sha = FakeSha(failures=1 + len(RETRY_DELAYS))
    clock = Clock()
    notifier = ShaNotifier(StubTreq(sha), "http://sha.example.local", clock, store)
    notifier.start()
    notifier.job_ended(make_job().ended(T0, 0, None, None))
    for delay in RETRY_DELAYS:
        clock.advance(delay)
    assert len(sha.posts) == 1 + len(RETRY_DELAYS)
    assert list(store.outbox) == ["j1"], "kept after the retries"

    # Still down at the next periodic send; then the daemon stops.
    sha.failures = 100
    clock.advance(RESEND_INTERVAL - sum(RETRY_DELAYS))
    assert len(sha.posts) == 2 + len(RETRY_DELAYS)
    notifier.stop()
    clock.advance(RESEND_INTERVAL * 3)
    assert len(sha.posts) == 2 + len(RETRY_DELAYS), "nothing is sent once stopped"
    assert list(store.outbox) == ["j1"]

    # The next start sends it at once; the SHA is back.
    sha.failures = 0
    again = ShaNotifier(StubTreq(sha), "http://sha.example.local", Clock(), store)
    again.start()
    assert sha.posts[-1][0] == b"/api/v1/telemetry/backup/j1"
    assert sha.posts[-1][1]["status"] == "completed"
    assert store.outbox == {}


def test_a_refused_push_is_not_sent_again() -> None:
    class Refusing(FakeSha):
        def render_POST(self, request: Request) -> bytes:
            super().render_POST(request)
            request.setResponseCode(400)
            return b'{"error":"unknown job"}'

    store = MemoryJobStore()
    sha = Refusing()
    clock = Clock()
    notifier = ShaNotifier(StubTreq(sha), "http://sha.example.local", clock, store)
    notifier.start()
    notifier.job_ended(make_job().ended(T0, 0, None, None))
    clock.advance(RESEND_INTERVAL * 2)
    assert len(sha.posts) == 1
    assert store.outbox == {}


def test_a_job_being_pushed_is_not_sent_twice_at_once() -> None:
    store = MemoryJobStore()
    sha = FakeSha(failures=1)
    clock = Clock()
    notifier = ShaNotifier(StubTreq(sha), "http://sha.example.local", clock, store)
    notifier.job_ended(make_job().ended(T0, 0, None, None))
    notifier.start()  # the outbox holds j1, whose push is waiting for its retry
    assert len(sha.posts) == 1
    clock.advance(RETRY_DELAYS[0])
    assert len(sha.posts) == 2 and store.outbox == {}
