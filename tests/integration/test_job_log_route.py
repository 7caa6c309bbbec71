"""``GET /api/v1/jobs/{job_id}/log`` on a real daemon: reading a job's log in pieces,
following it with long polls to the job's end, the text form for curl, and the
bound on requests that wait.

The backup client is the test double (``tests/sbc_double.py``); what the route
answers is checked against the log file the daemon wrote.  Nothing here asserts
on how long anything took.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from typing import Any, Optional
from urllib.parse import quote

import pytest

from tests.integration.harness import Daemon, JobIds, backup_body, wait_for

pytestmark = pytest.mark.integration

#: Long polls ask for this; the route allows up to 30 s.
WAIT = 20


def log_path(job_id: str, query: str = "") -> str:
    return f"/api/v1/jobs/{quote(job_id, safe='')}/log{query}"


def read(sna: Daemon, job_id: str, query: str = "") -> dict[str, Any]:
    answer = sna.api.request("GET", log_path(job_id, query), timeout=60)
    assert answer.status == 200, answer
    body: dict[str, Any] = answer.json()
    return body


def own_part(sna: Daemon, job_id: str) -> bytes:
    """The job's part of its log file: from its ``sna starting`` line on."""
    data = sna.job_log(job_id).read_bytes()
    starts = [i for i in range(len(data)) if data.startswith(b" sna starting ", i)]
    begin = data.rfind(b"\n", 0, starts[-1]) + 1
    return data[begin:]


def follow(sna: Daemon, job_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Every line of the job's log, by long polls from its start to ``complete``."""
    lines: list[str] = []
    answers = []
    offset: Optional[int] = None
    for _ in range(1000):
        query = f"?wait={WAIT}" + (f"&offset={offset}" if offset is not None else "")
        body = read(sna, job_id, query)
        answers.append(body)
        assert offset is None or body["offset"] == offset
        lines += body["lines"]
        offset = body["next_offset"]
        if body["complete"]:
            return lines, answers
    pytest.fail(f"the log of {job_id} never said complete: {answers[-3:]}")


def test_following_a_job_by_long_polls_gets_every_line_once(sna: Daemon, job_ids: JobIds) -> None:
    job = job_ids("slow")
    sna.api.start(backup_body(job, vm="slow", disks=2))
    lines, answers = follow(sna, job)
    assert sna.api.status(job)["status"] == "completed"
    expected = own_part(sna, job).decode().splitlines()
    assert lines == expected
    assert " sna starting " in lines[0]
    assert "process ended: exit_code=0" in lines[-1]
    events = [json.loads(line.split(" stdout ", 1)[1]) for line in lines if " stdout " in line]
    assert [e["event"] for e in events].count("disk_done") == 2
    # It was followed, not read at once at the end.
    assert len(answers) > 2, answers
    assert all(not a["complete"] for a in answers[:-1])
    assert {a["status"] for a in answers[:-1]} == {"running"}
    last = answers[-1]
    assert (last["status"], last["next_offset"], last["size"]) == (
        "completed",
        last["size"],
        sna.job_log(job).stat().st_size,
    )


def test_a_long_poll_answers_when_the_job_ends(sna: Daemon, job_ids: JobIds) -> None:
    job = job_ids("hang")
    sna.api.start(backup_body(job, vm="hang"))
    wait_for(lambda: "stalled, waiting" in sna.job_log(job).read_text(), "the double to hang")
    now = read(sna, job)
    assert now["lines"] and not now["complete"]
    answered: dict[str, Any] = {}

    def poll() -> None:
        answered.update(read(sna, job, f"?offset={now['next_offset']}&wait=30"))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        answer = sna.api.post(f"/api/v1/jobs/{quote(job, safe='')}/cancel")
        assert answer.status == 202, answer
    finally:
        poller.join(60)
    assert answered["lines"], answered
    rest = read(sna, job, f"?offset={answered['next_offset']}")
    lines = answered["lines"] + rest["lines"]
    assert any("got SIGTERM" in line for line in lines), lines
    assert "process ended: exit_code=143" in lines[-1], lines
    assert rest["complete"] and rest["status"] == "cancelled"
    # Nothing more will come: a wait on a complete log answers at once, empty.
    again = read(sna, job, f"?offset={rest['next_offset']}&wait=30")
    assert (again["lines"], again["complete"]) == ([], True)


def test_the_text_form_and_a_job_id_used_twice(sna: Daemon, job_ids: JobIds) -> None:
    job = job_ids("twice")
    for _ in range(2):
        sna.api.start(backup_body(job))
        sna.api.wait_status(job, "completed")
    whole = sna.job_log(job).read_bytes()
    assert whole.count(b" sna starting ") == 2
    mine = own_part(sna, job)
    answer = sna.api.get(log_path(job, "?format=text"))
    assert answer.status == 200, answer
    assert answer.headers.get_content_type() == "text/plain"
    assert answer.body == mine
    assert answer.headers["X-Sna-Next-Offset"] == str(len(whole))
    assert answer.headers["X-Sna-Log-Complete"] == "true"
    # From the start of the file: the first job's lines too.
    body = read(sna, job, "?offset=0")
    assert "\n".join(body["lines"]) + "\n" == whole.decode()
    # From the middle of it.
    middle = len(whole) - len(mine)
    body = read(sna, job, f"?offset={middle}")
    assert body["offset"] == middle and " sna starting " in body["lines"][0]


def test_refusals(sna: Daemon, job_ids: JobIds) -> None:
    job = job_ids("ok")
    sna.api.start(backup_body(job))
    sna.api.wait_status(job, "completed")
    size = sna.job_log(job).stat().st_size
    answer = sna.api.get(log_path("no-such-job"))
    assert (answer.status, answer.json()["error"]) == (404, "job_not_found")
    for query, field in [
        ("?offset=-1", "offset"),
        ("?offset=x", "offset"),
        (f"?offset={size + 1}", "offset"),
        ("?wait=31", "wait"),
        ("?wait=nan", "wait"),
        ("?format=html", "format"),
        ("?follow=1", "follow"),
    ]:
        answer = sna.api.get(log_path(job, query))
        body = answer.json()
        assert (answer.status, body["error"], body["field"]) == (400, "invalid_request", field), (
            query,
            body,
        )
    sna.job_log(job).unlink()
    for query in ("", "?format=text"):
        answer = sna.api.get(log_path(job, query))
        body = answer.json()
        assert (answer.status, body["error"]) == (410, "job_log_gone"), body
        assert str(sna.job_log(job)) in body["message"]


class Waiter(threading.Thread):
    """One long poll on its own connection, which the test may close mid-wait."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(daemon=True)
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.path = path
        self.status: Optional[int] = None
        self.body: Any = None

    def run(self) -> None:
        try:
            self.connection.request("GET", self.path)
            answer = self.connection.getresponse()
            self.status, self.body = answer.status, json.loads(answer.read())
        except (OSError, http.client.HTTPException, ValueError):
            self.status = -1


def test_waiting_requests_are_bounded_and_freed_by_disconnects(
    daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    sna = daemon_factory(name="waits")
    job = job_ids("hang")
    sna.api.start(backup_body(job, vm="hang"))
    wait_for(lambda: "stalled, waiting" in sna.job_log(job).read_text(), "the double to hang")
    end = read(sna, job)["next_offset"]
    path = log_path(job, f"?offset={end}&wait=30")
    waiters = [Waiter(sna.port, path) for _ in range(17)]
    for waiter in waiters:
        waiter.start()
    # One too many: it is refused, the others wait (the job prints nothing more).
    wait_for(lambda: [w for w in waiters if w.status is not None], "a wait to be refused")
    [refused] = [w for w in waiters if w.status is not None]
    assert refused.status == 503 and refused.body["error"] == "too_many_waits", refused.body
    waiters.remove(refused)
    assert [w.status for w in waiters] == [None] * 16
    # The clients go away: their places are free again.
    for waiter in waiters:
        waiter.connection.sock.shutdown(socket.SHUT_RDWR)
    for waiter in waiters:
        waiter.join(60)

    # (Well before their 30 s would have run out.)
    def accepted() -> Optional[dict[str, Any]]:
        answer = sna.api.request("GET", log_path(job, f"?offset={end}&wait=0.5"), timeout=60)
        return answer.json() if answer.status == 200 else None

    assert wait_for(accepted, "a wait to be accepted again", deadline=15)["lines"] == []
    # Other routes were answered all along.
    assert sna.api.get("/api/v1/health").status == 200
