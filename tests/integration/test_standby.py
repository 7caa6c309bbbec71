"""``sendense-backup-client standby``: the real client as a spare, driven through its stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sna.contract import standby

pytestmark = pytest.mark.integration

CLIENT = str(Path(sys.executable).with_name("sendense-backup-client"))
MIGRATE = [
    "migrate",
    "--vmware-endpoint",
    "127.0.0.1:9",
    "--vmware-username",
    "u",
    "--vmware-path",
    "/DC0/vm/x",
    "--nbd-targets",
    "2000:nbd://127.0.0.1:10100/x",
    "--job-id",
    "standby-1",
]


def spare(*prefix: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [CLIENT, *prefix, "standby", "--spare-id", "t1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ["PATH"]},
    )
    assert process.stdout is not None
    assert process.stdout.readline() == standby.READY_LINE + b"\n"
    return process


def events(out: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_end_of_file_means_not_needed() -> None:
    process = spare()
    out, err = process.communicate(b"", timeout=30)
    assert (process.returncode, out, err) == (0, b"", b"")


def test_a_line_that_is_no_job_is_a_usage_error() -> None:
    process = spare()
    out, _ = process.communicate(b"not a job\n", timeout=30)
    assert process.returncode == 2
    [error] = events(out)
    assert error["event"] == "error" and "not JSON" in str(error["message"])


def test_the_words_before_standby_apply_to_the_job() -> None:
    # --chunk-size 3 is refused: proof that the prefix joined the job's argv.
    process = spare("--chunk-size", "3")
    job = standby.encode_job(MIGRATE, {"SNA_VCENTER_PASSWORD": "s3cret-standby"})
    out, err = process.communicate(job, timeout=30)
    assert process.returncode == 2
    [error] = events(out)
    assert "--chunk-size must be a multiple of 4096" in str(error["message"])
    assert b"s3cret-standby" not in out + err


def test_a_job_runs_with_the_password_from_stdin() -> None:
    # Nothing listens on port 9: the job fails at login, after parsing its argv and password.
    process = spare()
    job = standby.encode_job(MIGRATE, {"SNA_VCENTER_PASSWORD": "s3cret-standby"})
    out, err = process.communicate(job, timeout=60)
    assert process.returncode == 1, err
    [error] = [e for e in events(out) if e["event"] == "error"]
    assert events(out)[0]["event"] == "phase"
    assert "cannot reach vCenter 127.0.0.1:9" in str(error["message"])
    assert b"s3cret-standby" not in out + err
