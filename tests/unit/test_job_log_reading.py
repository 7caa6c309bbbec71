"""Reading job logs back (sna.sbc.joblog's reading side) and the route's waits over a
Clock (sna.api.joblog_route): whole lines only, where a job's own lines begin in a
file earlier jobs of its id wrote, and a wait that ends by itself or with its client.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.python.filepath import FilePath
from twisted.web.test.requesthelper import DummyRequest

from sna.api.app import SnaAPI
from sna.api.joblog_route import MAX_WAIT, POLL, JobLogs
from sna.contract.ids import log_file_name
from sna.nbd.relay import RelayRegistry
from sna.sbc.joblog import LogDirectory, job_start, read_lines
from sna.telemetry.metrics import Metrics
from sna.testing import FakeVSphere, failure_of, result_of
from tests.unit.conftest import Harness, backup_body

JOB = "backup-pgtest1-1760099954"


def log_file(tmp_path: Path, text: bytes) -> FilePath[str]:
    path = tmp_path / "backup-x.log"
    path.write_bytes(text)
    return FilePath(str(path))


def test_whole_lines_only_until_the_job_ends(tmp_path: Path) -> None:
    path = log_file(tmp_path, b"one\ntwo\nthr")
    piece = read_lines(path, 0, 1024, ended=False)
    assert (piece.lines, piece.next_offset, piece.size) == (["one", "two"], 8, 11)
    # The third line is still being written: left for the next answer.
    assert read_lines(path, 8, 1024, ended=False).lines == []
    # Nothing will finish it once the job has ended (a write the disk cut short).
    assert read_lines(path, 8, 1024, ended=True).lines == ["thr"]
    assert read_lines(path, 11, 1024, ended=True).lines == []


def test_an_answer_ends_at_a_line_within_its_limit(tmp_path: Path) -> None:
    path = log_file(tmp_path, b"aaaa\nbbbb\ncccc\n")
    piece = read_lines(path, 0, 12, ended=True)
    assert (piece.lines, piece.next_offset) == (["aaaa", "bbbb"], 10)
    # A line longer than the limit alone is cut there rather than never sent.
    piece = read_lines(log_file(tmp_path, b"x" * 40 + b"\n"), 0, 16, ended=False)
    assert (piece.lines, piece.next_offset) == (["x" * 16], 16)


def test_bytes_that_are_not_utf8_read_as_replacement_characters(tmp_path: Path) -> None:
    path = log_file(tmp_path, b"ok \xff\xfe end\n")
    assert read_lines(path, 0, 1024, ended=False).lines == ["ok \ufffd\ufffd end"]


def test_a_job_s_lines_begin_after_those_of_earlier_jobs_of_its_id(tmp_path: Path) -> None:
    earlier = (
        b"2026-11-26T09:00:00.000Z sna starting client\n"
        b"2026-11-26T09:00:01.500Z stdout {}\n"
        b"a cut line without a time\n"
        b"2026-11-26T09:30:00.000Z sna process ended: exit_code=0 signal=None\n"
    )
    later = b"2026-11-26T10:00:00.123Z sna starting client\n2026-11-26T10:00:00.200Z sna pid 7\n"
    path = log_file(tmp_path, earlier + later)
    # The job started within the millisecond its first line carries.
    started = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
    assert job_start(path, started) == len(earlier)
    assert job_start(path, datetime(2026, 11, 26, 8, 0, tzinfo=UTC)) == 0
    assert job_start(path, datetime(2026, 11, 26, 11, 0, tzinfo=UTC)) == len(earlier + later)
    # A last line without its newline is a line too.
    cut = log_file(tmp_path, earlier + b"2026-11-26T10:00:00.123Z sna starting")
    assert job_start(cut, started) == len(earlier)


def test_a_log_is_found_in_either_directory(tmp_path: Path) -> None:
    preferred, fallback = FilePath(str(tmp_path / "a")), FilePath(str(tmp_path / "b"))
    logs = LogDirectory(preferred, fallback)
    logs.resolve()
    fallback.makedirs()
    fallback.child(log_file_name("j 1")).setContent(b"x\n")
    assert logs.find("j 1") == fallback.child(log_file_name("j 1"))
    assert logs.find("j 2") == preferred.child(log_file_name("j 2"))


@pytest.fixture
def logs_api(harness: Harness, tmp_path: Path) -> tuple[Harness, JobLogs, StubTreq]:
    directory = FilePath(str(tmp_path)).child("log")
    job_logs = JobLogs(LogDirectory(directory, directory), harness.manager.get, harness.clock, 2)
    api = SnaAPI(
        harness.manager,
        harness.now,
        harness.clock.seconds,
        Metrics(harness.manager.counts, RelayRegistry(), process=False),
        FakeVSphere(),
        job_logs=job_logs,
    )
    return harness, job_logs, StubTreq(api.resource())


def get(treq: StubTreq, query: str) -> Any:
    d = treq.get(f"http://sna/api/v1/jobs/{JOB}/log{query}")
    treq.flush()
    return d


def body(d: Any) -> tuple[int, Any]:
    response = result_of(d)
    return response.code, json.loads(result_of(response.content()))


def test_a_wait_ends_with_nothing_after_its_time(
    logs_api: tuple[Harness, JobLogs, StubTreq],
) -> None:
    harness, job_logs, treq = logs_api
    harness.request("POST", "/api/v1/backup/start", backup_body())
    code, first = body(get(treq, ""))
    assert code == 200 and first["lines"] and not first["complete"]
    d = get(treq, f"?offset={first['next_offset']}&wait=5")
    assert job_logs.waiting == 1
    harness.clock.advance(4.9)
    treq.flush()
    assert job_logs.waiting == 1
    harness.clock.advance(POLL)
    treq.flush()
    code, answer = body(d)
    assert (code, answer["lines"], answer["complete"]) == (200, [], False)
    assert job_logs.waiting == 0


def test_a_wait_ends_when_a_line_comes_and_when_the_job_ends(
    logs_api: tuple[Harness, JobLogs, StubTreq],
) -> None:
    harness, _, treq = logs_api
    harness.request("POST", "/api/v1/backup/start", backup_body())
    end = body(get(treq, ""))[1]["next_offset"]
    d = get(treq, f"?offset={end}&wait={MAX_WAIT:g}")
    transport = harness.launcher.transports[JOB]
    transport.protocol.errReceived(b"copying\n")
    harness.clock.advance(POLL)
    treq.flush()
    code, answer = body(d)
    assert code == 200 and answer["lines"][0].endswith(" stderr copying"), answer
    d = get(treq, f"?offset={answer['next_offset']}&wait=30")
    transport.exit(0)
    harness.clock.advance(POLL)
    treq.flush()
    code, answer = body(d)
    assert answer["complete"] and answer["status"] == "completed", answer
    assert "process ended" in answer["lines"][-1]


def test_waits_are_bounded_and_a_gone_client_frees_its_place(
    logs_api: tuple[Harness, JobLogs, StubTreq],
) -> None:
    harness, job_logs, treq = logs_api
    harness.request("POST", "/api/v1/backup/start", backup_body())
    end = body(get(treq, ""))[1]["next_offset"]
    waits = [get(treq, f"?offset={end}&wait=30") for _ in range(2)]
    response = result_of(get(treq, f"?offset={end}&wait=30"))
    assert response.code == 503
    assert response.headers.getRawHeaders(b"Retry-After") == [b"1"]
    assert json.loads(result_of(response.content()))["error"] == "too_many_waits"
    harness.clock.advance(30)
    treq.flush()
    assert [body(d)[0] for d in waits] == [200, 200] and job_logs.waiting == 0
    # Klein cancels a request's Deferred when its client goes away: its place is free.
    waiting = ensureDeferred(
        job_logs.answer(DummyRequest([b""]), JOB, {"offset": [str(end)], "wait": ["30"]})
    )
    assert job_logs.waiting == 1
    waiting.cancel()
    assert job_logs.waiting == 0
    assert isinstance(failure_of(waiting, CancelledError), CancelledError)
