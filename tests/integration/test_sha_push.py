"""What ended jobs owe the SHA, through a real daemon and its restarts, to the SHA double.

The backup client is the test double (``tests/sbc_double.py``), so these run
in a second; the SHA double holds the job rows the SHA would have made
(``/_double/jobs``) and answers with the SHA's strictness.  The full path
with the real client and the testbed is ``test_sha_e2e.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.integration.harness import Daemon, JobIds, backup_body, wait_for
from tests.shadouble.client import ShaDouble
from tests.shadouble.fixtures import sha_double_fixture

pytestmark = pytest.mark.integration

sha = sha_double_fixture()


def pushes(double: ShaDouble, job_id: str) -> list[dict[str, object]]:
    """The telemetry the SHA took for ``job_id``, oldest first."""
    return [
        json.loads(r["body"])
        for r in double.requests(f"/api/v1/telemetry/backup/{job_id}")
        if r["status"] == 200
    ]


def test_a_final_state_the_sha_missed_is_sent_after_a_restart(
    daemon_factory: Callable[..., Daemon], job_ids: JobIds, sha: ShaDouble
) -> None:
    daemon = daemon_factory(extra=("--sha-url", sha.url))
    done = job_ids("ok")
    sha.jobs(done, "pgtest1")
    daemon.api.start(backup_body(done))
    assert daemon.api.wait_status(done, "completed", "failed")["status"] == "completed"
    wait_for(
        lambda: [p for p in pushes(sha, done) if p["status"] == "completed"],
        "the final state of a completed job",
    )
    assert ShaDouble.job(sha.state(), done)["status"] == "completed"

    # The SHA goes down; a job fails; the daemon stops before the SHA is back.
    missed = job_ids("fail")
    sha.jobs(missed, "fail")
    sha.down()
    try:
        daemon.api.start(backup_body(missed, vm="fail"))
        assert daemon.api.wait_status(missed, "completed", "failed")["status"] == "failed"
        wait_for(
            lambda: daemon.api.status(missed)["sha"]["final_state"]["attempts"] >= 1,
            "a first, refused, attempt",
        )
        daemon.stop()
    finally:
        sha.up()
    daemon.start()
    state = sha.wait(
        lambda s: s if ShaDouble.job(s, missed)["status"] == "failed" else None,
        "the failed state after the restart",
    )
    assert ShaDouble.job(state, missed)["error_message"]
    assert sha.requests(f"/api/v1/backups/{missed}/complete") == []
    wait_for(
        lambda: daemon.api.status(missed)["sha"]["final_state"]["state"] == "delivered",
        "the daemon to record it delivered",
    )
    taken = len(sha.requests(f"/api/v1/telemetry/backup/{missed}"))
    completions = len(sha.requests(f"/api/v1/backups/{done}/complete"))
    assert completions == 1
    daemon.stop()
    daemon.start()
    # A start sends what is pending at once: a wrong re-send would come before the
    # final state of a job started after it.
    later = job_ids("later")
    sha.jobs(later, "pgtest1")
    daemon.api.start(backup_body(later))
    wait_for(
        lambda: [p for p in pushes(sha, later) if p["status"] == "completed"],
        "the final state of a job started after the restart",
    )
    assert len(sha.requests(f"/api/v1/telemetry/backup/{missed}")) == taken
    assert len(sha.requests(f"/api/v1/backups/{done}/complete")) == completions
