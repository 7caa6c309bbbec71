"""A client that echoes its password in every form, through a real ``twistd -n sna``: the
password is in no answer, no job log, not in the daemon's log nor in its database.

The double's ``echo`` mode prints the password raw, JSON-escaped (with and without
``ensure_ascii``), URL-encoded, shell-quoted and as Python reprs, on both streams and
in its events; a ``hang`` job gets it pushed back in the Go client's progress route.
The forms, and the fuzzing of the masker itself, are ``tests/unit/test_masking.py``.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Callable
from urllib.parse import quote

import pytest

from sna.contract.events import MASK
from tests.integration.harness import Daemon, JobIds, backup_body
from tests.unit.test_masking import leaks

pytestmark = pytest.mark.integration

DaemonFactory = Callable[..., Daemon]


def hard_password() -> str:
    """Quotes, backslashes, non-ASCII and spaces, and a part no other run has."""
    return f"pa\"ss\\wörd it's {uuid.uuid4().hex[:8]} €😀 $(x)"


def answers(daemon: Daemon, *job_ids: str) -> dict[str, str]:
    """Every answer about ``job_ids`` or listing them, by path."""
    paths = ["/api/v1/jobs", "/api/v1/health", "/api/v1/config", "/api/v1/relays", "/metrics"]
    for job_id in job_ids:
        name = quote(job_id, safe="")
        paths += [
            f"/api/v1/status/{name}",
            f"/api/v1/jobs/{name}/status",
            f"/api/v1/progress/{name}",
        ]
    found = {}
    for path in paths:
        answer = daemon.api.get(path)
        assert answer.status == 200, (path, answer)
        found[path] = answer.text
    return found


def test_a_password_echoed_in_every_form_is_masked_everywhere(
    daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    daemon = daemon_factory()
    passwords = [hard_password(), hard_password().replace("'", '"')]
    jobs: dict[str, str] = {}
    for password in passwords:
        echo, hang = job_ids("echo"), job_ids("hang")
        jobs[echo] = jobs[hang] = password
        daemon.api.start(backup_body(echo, vm="echo", password=password))
        daemon.api.start(backup_body(hang, vm="hang", password=password))
        failed = daemon.api.wait_status(echo, "failed", "completed")
        assert failed["status"] == "failed", failed
        assert MASK in failed["error"], "the reason quotes the password, masked"
        daemon.api.wait_progress(hang)
        push = {
            "stage": f"Transfer as {json.dumps(password)}",
            "status": f"login {urllib.parse.quote_plus(password)} refused",
            "bytes_transferred": 1,
            "total_bytes": 10,
        }
        answer = daemon.api.post(f"/api/v1/progress/{quote(hang, safe='')}/update", push)
        assert answer.status == 200, answer
        for path, text in answers(daemon, echo, hang).items():
            assert not leaks(text, password), (path, text)
        assert daemon.api.post(f"/api/v1/jobs/{quote(hang, safe='')}/cancel").status == 202
        daemon.api.wait_status(hang, "cancelled")

    for job_id, password in jobs.items():
        text = daemon.job_log(job_id).read_text("utf-8")
        assert not leaks(text, password), (job_id, text)
        for path, answer in answers(daemon, job_id).items():
            assert not leaks(answer, password), (path, answer)
    echoed = daemon.job_log(next(iter(jobs))).read_text("utf-8")
    assert echoed.count(MASK) >= 10, "every form was printed, and masked"

    daemon.stop()
    output = daemon.output()
    assert "backup/start" in output, "the daemon's log holds the access log"
    files = [p for p in daemon.state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "sna.sqlite" for p in files)
    for password in set(jobs.values()):
        assert not leaks(output, password), output
        for path in files:
            assert not leaks(path.read_bytes().decode("utf-8", "replace"), password), path
