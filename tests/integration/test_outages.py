"""Hung and lost peers, for real: the vCenter simulator and qemu-nbd paused with SIGSTOP.

A paused process is a peer that does not answer: the kernel still accepts
its connections, nothing comes back.  The backup client, run as a process
(as in ``test_backup_client.py``), must bound every vCenter call, say what
it waits on (``stall`` events) well before it gives up, end a run stalled
for ``--stall-timeout`` with that reason, and remove its snapshot once
vCenter answers again, retrying with backoff, or say it left it
(``snapshot`` ``remains``).  Through the daemon (``twistd -n sna``),
``/status`` shows the stall while the job runs, and a snapshot the client
left ``pending`` until sna's janitor has removed it.

Timeouts are shortened with flags; pauses end when an event or ``/status``
says what the test waits for, never after a fixed sleep, and nothing
asserts how long anything took.  Each pause is resumed in a ``with`` block,
so a failing test leaves the module's testbed running.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backup_helpers import (
    SBC,
    MiB,
    assert_completed,
    backup_request,
    by_key,
    client_gone,
    compare,
    follow,
    snapshots,
    wait_running_until,
)
from tests.integration.harness import Daemon, JobIds, Response, doubles_of, metric, wait_for
from tests.integration.test_backup_client import Run, run_client
from tests.testbed import Testbed, testbed_fixture
from tests.testbed.procs import Paused

pytestmark = pytest.mark.integration

HUB_PORTS = range(10800, 10900)
#: The hub of the testbed whose simulator a test kills.
LONE_PORTS = range(10900, 10950)
DATA = 96 * MiB

SPEC: dict[str, Any] = {
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [
        {"name": "hungvm", "cbt_enabled": True, "disks": [{"capacity_bytes": 4 * MiB}]},
        {"name": "readvm", "cbt_enabled": True, "disks": [{"capacity_bytes": DATA}]},
        {"name": "hubvm", "cbt_enabled": True, "disks": [{"capacity_bytes": DATA}]},
        {"name": "e2ehub", "cbt_enabled": True, "disks": [{"capacity_bytes": DATA}]},
        {"name": "e2evc", "cbt_enabled": True, "disks": [{"capacity_bytes": DATA}]},
        {"name": "e2enext", "cbt_enabled": True, "disks": [{"capacity_bytes": DATA}]},
    ],
}

testbed = testbed_fixture(SPEC)
#: A testbed of one test's own: its simulator is killed.
lone_testbed = testbed_fixture(
    {
        "hub": {"ports": [LONE_PORTS.start, LONE_PORTS.stop - 1]},
        "vms": [{"name": "lonevm", "cbt_enabled": True, "disks": [{"capacity_bytes": DATA}]}],
    },
    scope="function",
)

#: Short deadlines for the client, so an outage plays out in seconds.
QUICK = ("--io-timeout=1", "--vcenter-timeout=1", "--chunk-size=1048576")


@pytest.fixture(scope="module")
def data(testbed: Testbed) -> Iterator[Testbed]:
    for vm in ("readvm", "hubvm", "e2ehub", "e2evc"):
        testbed.write(vm, 2000, 0, DATA, seed=7)
    testbed.write("hungvm", 2000, 0, 1 * MiB, seed=8)
    yield testbed


def targets_of(tb: Testbed, vm: str) -> dict[int, dict[str, Any]]:
    return {2000: tb.add_target(vm, 2000)}


def urls(targets: dict[int, dict[str, Any]]) -> dict[int, str]:
    return {key: target["nbd_url"] for key, target in targets.items()}


def kinds(run: Run) -> list[str]:
    return [e["event"] for e in run.events]


# -- the client on its own -------------------------------------------------------------------


def test_a_hung_vcenter_is_told_as_a_stall_and_fails_the_run_at_the_call_s_deadline(
    data: Testbed,
) -> None:
    """vCenter paused before the run: the login's deadline ends it, and a ``stall`` on
    vCenter says what it waited for first.  (It once took 484 s to surface.)"""
    tb = data
    with tb.pause_vcenter():
        run = run_client(
            tb,
            "hungvm",
            urls(targets_of(tb, "hungvm")),
            # The stall timeout bounds a call too: told after 2 s, given up after 4.
            "--vcenter-timeout=6",
            "--stall-timeout=4",
            job_id="hung-login",
        )
    assert run.returncode == 1, run.stderr
    [stall] = run.of("stall")
    assert stall["on"] == "vcenter" and "logging in" in stall["message"], stall
    assert run.of("resume"), run.events
    error = run.events[kinds(run).index("error")]
    assert error["message"].startswith(f"vCenter {tb.vcenter['host']}:"), error
    assert "did not answer within 4 s (logging in as" in error["message"], error
    # No snapshot was taken, so none is spoken of.
    assert not run.of("snapshot")
    assert snapshots(tb, "hungvm") == []


def test_vcenter_paused_mid_copy_the_cause_is_the_error_and_the_snapshot_goes_once_it_is_back(
    data: Testbed,
) -> None:
    """vCenter stops answering mid-copy: the run fails naming the source that gave no
    bytes; the removal of its snapshot, stalled on vCenter, is retried with backoff and
    succeeds once vCenter answers again.  (It once ended naming the removal, with the
    snapshot left on the VM.)"""
    tb = data
    pauses: list[Paused] = []

    def on_event(event: dict[str, Any], _: Any) -> None:
        if event["event"] == "disk_start" and not pauses:
            pauses.append(tb.pause_vcenter())
        elif event["event"] == "stall" and event["on"] == "vcenter" and pauses:
            # The removal waits on vCenter: let it come back.
            pauses[0].resume()

    try:
        run = run_client(
            tb,
            "readvm",
            urls(targets_of(tb, "readvm")),
            *QUICK,
            "--stall-timeout=4",
            "--cleanup-timeout=60",
            job_id="read-pause",
            on_event=on_event,
        )
    finally:
        for pause in pauses:
            pause.resume()
    assert pauses, "the copy never started"
    assert run.returncode == 1, run.stderr
    sequence = kinds(run)
    # A stall on the source while copying, told before the run gave up.
    first = run.of("stall")[0]
    assert (first["on"], first["disk_key"]) == ("source_read", "2000"), first
    assert sequence.index("stall") < sequence.index("error")
    [error] = run.of("error")
    assert error["disk_key"] == "2000", error
    assert "no progress for 4 s, waiting on the source" in error["message"], error
    assert "snapshot" not in error["message"], error
    # The snapshot: taken, then removed after vCenter came back.
    assert [(e["state"]) for e in run.of("snapshot")] == ["created", "removed"]
    assert any(e["on"] == "vcenter" for e in run.of("stall")), run.events
    assert "removing snapshot sbak-read-pause failed (attempt 1)" in run.stderr
    assert snapshots(tb, "readvm") == []


def test_a_hung_hub_is_told_as_a_stall_and_ends_the_run_at_the_stall_timeout(
    data: Testbed,
) -> None:
    """qemu-nbd paused mid-copy: ``stall`` on the hub's writes, then the run ends with
    that reason after ``--stall-timeout`` and removes its snapshot.  (It once took 600 s,
    and said nothing meanwhile.)"""
    tb = data
    targets = targets_of(tb, "hubvm")
    pauses: list[Paused] = []

    def on_event(event: dict[str, Any], _: Any) -> None:
        if event["event"] == "disk_start" and not pauses:
            pauses.append(tb.pause_target(targets[2000]["export"]))

    try:
        run = run_client(
            tb,
            "hubvm",
            urls(targets),
            *QUICK,
            "--stall-timeout=4",
            job_id="hub-pause",
            on_event=on_event,
        )
    finally:
        for pause in pauses:
            pause.resume()
    assert pauses, "the copy never started"
    assert run.returncode == 1, run.stderr
    stall = run.of("stall")[0]
    assert (stall["on"], stall["disk_key"]) == ("hub_write", "2000"), stall
    assert targets[2000]["export"] in stall["message"], stall
    [error] = run.of("error")
    assert (
        "no progress for 4 s, waiting on the target's write acknowledgements" in (error["message"])
    ), error
    assert not run.of("disk_done")
    assert [e["state"] for e in run.of("snapshot")] == ["created", "removed"]
    assert snapshots(tb, "hubvm") == []


# -- through the daemon ---------------------------------------------------------------------


def quick_sna(daemon_factory: Callable[..., Daemon], *extra: str, name: str) -> Daemon:
    """A daemon whose client has short vCenter and cleanup deadlines."""
    return daemon_factory(
        name=name,
        sbc=" ".join([SBC, *(shlex.quote(a) for a in (*QUICK, "--cleanup-timeout=2"))]),
        extra=(
            "--nbd-ports",
            f"{HUB_PORTS.start}-{LONE_PORTS.stop - 1}",
            "--kill-grace",
            "30",
            *extra,
        ),
    )


def copying(status: dict[str, Any]) -> bool:
    """The disk's copy has begun (as early as can be seen: it may be short)."""
    return bool(by_key(status)[2000]["status"] == "running")


def test_status_says_stalled_on_the_hub_and_the_job_ends_with_that_reason(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """The hub's qemu-nbd paused mid-copy: ``/status`` says ``stalled`` on ``hub_write``,
    since when, while the job runs; sna's ``--stall-timeout`` reaches the client and
    ends the job with the stall as its error; the snapshot is removed."""
    tb = data
    sna = quick_sna(daemon_factory, "--stall-timeout", "4", name="stall-hub")
    targets = targets_of(tb, "e2ehub")
    job = job_ids("hubstall")
    started = sna.api.start(backup_request(tb, "e2ehub", job, targets, "full"))
    wait_running_until(sna.api, job, copying, "the copy to begin")
    with tb.pause_target(targets[2000]["export"]):
        status = wait_running_until(
            sna.api, job, lambda s: s["stalled"] is not None, "a stall in /status"
        )
        run = follow(sna.api, job)
    stalled = status["stalled"]
    assert (stalled["on"], stalled["disk_key"]) == ("hub_write", "2000"), stalled
    assert stalled["since"] <= status["last_update"], status
    # The hub's own port, not the relay's the client writes to.
    assert f":{targets[2000]['port']}/" in stalled["message"], stalled
    final = run.final
    assert final["status"] == "failed", final
    assert final["stalled"] is None, final
    assert (
        "no progress for 4 s, waiting on the target's write acknowledgements" in (final["error"])
    ), final
    assert final["snapshot"]["state"] == "removed", final
    assert final["snapshot"]["removed_by"] == "client", final
    assert snapshots(tb, "e2ehub") == []
    wait_for(lambda: client_gone(started["pid"], job), "the stalled client to be reaped")


def test_a_snapshot_the_client_could_not_remove_is_pending_until_the_janitor_has(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """vCenter paused mid-copy and for longer than the client's cleanup: the job fails
    naming its cause, ``/status`` shows the snapshot ``pending``; once vCenter answers
    again sna's janitor removes it and ``/status`` says so."""
    tb = data
    sna = quick_sna(daemon_factory, name="janitor")
    targets = targets_of(tb, "e2evc")
    job = job_ids("vcpause")
    started = sna.api.start(backup_request(tb, "e2evc", job, targets, "full"))
    wait_running_until(sna.api, job, copying, "the copy to begin")
    with tb.pause_vcenter():
        run = follow(sna.api, job)
        final = run.final
        assert final["status"] == "failed", final
        assert "snapshot" not in final["error"], final
        assert "reading" in final["error"] and "/folder" in final["error"], final
        assert final["snapshot"]["state"] == "pending", final
        assert final["snapshot"]["name"] == f"sbak-{job}", final
        assert "could not be removed" in final["snapshot"]["reason"], final
        assert not final["snapshot"]["needs_credentials"], final
        # An operator sees it without knowing the job: /health and /metrics count it.
        assert sna.api.get("/api/v1/health").json()["snapshots_pending"] == 1
        assert metric(sna, "sna_snapshots_pending") == 1
        wait_for(lambda: client_gone(started["pid"], job), "the failed client to be reaped")
    # vCenter answers again: the janitor's attempt goes through, or its next one.
    removed = wait_for(
        lambda: (
            sna.api.status(job)["snapshot"]
            if sna.api.status(job)["snapshot"]["state"] == "removed"
            else None
        ),
        "the janitor to remove the snapshot",
        deadline=90.0,
    )
    assert removed["removed_by"] == "sna", removed
    assert removed["removal_attempts"] >= 1, removed
    assert snapshots(tb, "e2evc") == []
    assert sna.api.get("/api/v1/health").json()["snapshots_pending"] == 0
    assert metric(sna, "sna_snapshots_pending") == 0


def test_the_next_backup_of_the_vm_removes_the_pending_snapshot_first_and_completes(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """A job ends with its snapshot pending (vCenter paused); the SHA starts the next
    backup of the same VM before the janitor got it removed: the start waits for the
    removal, then the job runs and its copy is byte-exact.  (The next backup used to
    start at once, on the delta disk the old snapshot left.)"""
    tb = data
    tb.write("e2enext", 2000, 0, DATA, seed=11)
    sna = quick_sna(daemon_factory, name="next")
    old = job_ids("leftover")
    started = sna.api.start(backup_request(tb, "e2enext", old, targets_of(tb, "e2enext"), "full"))
    wait_running_until(sna.api, old, copying, "the copy to begin")
    new = job_ids("next")
    targets = targets_of(tb, "e2enext")
    answers: list[Response] = []
    start = threading.Thread(
        target=lambda: answers.append(
            sna.api.post(
                "/api/v1/backup/start",
                backup_request(tb, "e2enext", new, targets, "full"),
                timeout=120.0,
            )
        ),
        # A failing test does not wait for the answer.
        daemon=True,
    )
    with tb.pause_vcenter():
        final = follow(sna.api, old).final
        assert final["status"] == "failed", final
        assert final["snapshot"]["state"] == "pending", final
        wait_for(lambda: client_gone(started["pid"], old), "the failed client to be reaped")
        start.start()
        # The start waits for vCenter to remove the old snapshot; nothing of it runs yet.
        wait_for(
            lambda: f"job {new} is to back up VM" in sna.output(),
            "sna to remove the old snapshot before the new job",
        )
        assert f"removing snapshot sbak-{old} of job {old} first" in sna.output()
        assert not answers and new not in sna.api.job_ids()
    start.join(timeout=150.0)
    [answer] = answers
    assert answer.status == 200, answer
    removed = sna.api.status(old)["snapshot"]
    assert (removed["state"], removed["removed_by"]) == ("removed", "sna"), removed
    run = follow(sna.api, new)
    assert_completed(run)
    assert run.final["snapshot"]["state"] == "removed", run.final
    compare(tb, "e2enext", 2000, targets[2000]["qcow2"])
    assert snapshots(tb, "e2enext") == []


def test_a_killed_vcenter_leaves_the_snapshot_pending_and_the_janitor_trying(
    lone_testbed: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """vCenter killed mid-copy (connections refused from then on): the job fails naming
    what it could not read; the snapshot stays ``pending`` in ``/status`` while the
    janitor tries again and again, each attempt counted, the next one announced."""
    tb = lone_testbed
    tb.write("lonevm", 2000, 0, DATA, seed=9)
    sna = quick_sna(daemon_factory, name="killed")
    targets = targets_of(tb, "lonevm")
    job = job_ids("vckill")
    started = sna.api.start(backup_request(tb, "lonevm", job, targets, "full"))
    wait_running_until(sna.api, job, copying, "the copy to begin")
    [vcsim] = [r for r in tb.running() if r.role == "vcsim"]
    os.kill(vcsim.pid, signal.SIGKILL)
    final = follow(sna.api, job).final
    assert final["status"] == "failed", final
    assert "reading" in final["error"] and "snapshot" not in final["error"], final
    assert final["snapshot"]["state"] == "pending", final
    wait_for(lambda: client_gone(started["pid"], job), "the failed client to be reaped")

    def retried() -> Any:
        snapshot = sna.api.status(job)["snapshot"]
        return snapshot if snapshot["removal_attempts"] >= 2 else None

    snapshot = wait_for(retried, "the janitor to try again", deadline=60.0)
    assert snapshot["state"] == "pending", snapshot
    assert snapshot["next_attempt"] is not None, snapshot
    assert f"{tb.vcenter['host']}:{tb.vcenter['port']}" in snapshot["reason"], snapshot
    assert not snapshot["needs_credentials"], snapshot

    # The next backup of the VM, before the janitor's next attempt: it tries the removal
    # at once, vCenter does not answer, and it is refused with nothing started.
    sna.api.wait_spare_ready()
    spares = sna.api.spares_ready()
    new = job_ids("vckill-next")
    answer = sna.api.post(
        "/api/v1/backup/start", backup_request(tb, "lonevm", new, targets_of(tb, "lonevm"), "full")
    )
    assert answer.status == 409, answer
    refusal = answer.json()
    assert refusal["error"] == "snapshot_pending", refusal
    message = refusal["message"]
    assert message.startswith(f"VM {tb.vm('lonevm')['path']} still has a snapshot"), message
    assert f"snapshot sbak-{job} of job {job} could not be removed" in message, message
    assert f"{tb.vcenter['host']}:{tb.vcenter['port']}" in message, message
    assert message.endswith("; nothing was started"), message
    assert tb.vcenter["password"] not in message
    assert sna.api.status(job)["snapshot"]["removal_attempts"] > snapshot["removal_attempts"]
    assert sna.api.get(f"/api/v1/status/{new}").status == 404
    assert new not in sna.api.job_ids()
    assert not [r for r in sna.api.get("/api/v1/relays").json()["relays"] if r["job_id"] == new]
    assert doubles_of({new}) == []
    assert sna.api.spares_ready() == spares
    assert f"job {new} refused: VM " in sna.output()
