"""backup/start's NBD side over fakes: the probe guards the start, relays follow the job."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from sna.nbd.probe import ProbeFailed, ProbeResult
from tests.unit.conftest import Harness, backup_body

JOB = "backup-pgtest1-1760099954"


def test_a_target_that_does_not_answer_starts_nothing(harness: Harness) -> None:
    harness.gateway.failures[10101] = ProbeFailed(
        "refused", "127.0.0.1:10101 refused the connection (export pgtest1-disk1)"
    )
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body())
    assert code == 502
    assert body["error"] == "nbd_target_unreachable"
    assert "disk 2001" in body["message"] and "refused" in body["message"]
    assert body["targets"] == [
        {
            "disk_key": "2001",
            "host": "127.0.0.1",
            "port": 10101,
            "export": "pgtest1-disk1",
            "reason": "refused",
            "message": "127.0.0.1:10101 refused the connection (export pgtest1-disk1)",
        }
    ]
    assert harness.launcher.requests == {}
    assert harness.gateway.open == {}
    assert harness.request("GET", "/api/v1/jobs")[1]["count"] == 0
    metrics = harness.treq.get("http://sna/metrics")
    harness.treq.flush()
    text = _text(metrics)
    assert 'sna_nbd_probe_failures_total{reason="refused"} 1.0' in text


def test_only_timeouts_answer_503(harness: Harness) -> None:
    for port in (10100, 10101):
        harness.gateway.failures[port] = ProbeFailed("timeout", f"127.0.0.1:{port} timed out")
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body())
    assert (code, body["error"]) == (503, "nbd_target_unreachable")
    assert [t["reason"] for t in body["targets"]] == ["timeout", "timeout"]


def test_relays_close_with_the_job_and_keep_their_counts(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    harness.gateway.counts[JOB] = {"2000": (1000, 20), "2001": (500, 10)}
    status = harness.request("GET", f"/api/v1/status/{JOB}")[1]
    assert (status["relay_bytes_to_hub"], status["relay_bytes_from_hub"]) == (1500, 30)
    relays = harness.request("GET", "/api/v1/relays")[1]
    assert relays["count"] == 2
    assert {r["disk_key"] for r in relays["relays"]} == {"2000", "2001"}
    harness.launcher.transports[JOB].exit(0)
    assert harness.gateway.open == {}
    status = harness.request("GET", f"/api/v1/status/{JOB}")[1]
    assert [d["bytes_to_hub"] for d in status["disks"]] == [1000, 500]
    assert harness.store.jobs[JOB]["disks"][0]["bytes_to_hub"] == 1000


def test_a_dropped_target_is_named_in_the_job(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    harness.gateway.lost[JOB]("2001", "connection reset by the hub")
    harness.launcher.transports[JOB].protocol.errReceived(b"Error: NBD write failed\n")
    harness.launcher.transports[JOB].exit(1)
    status = harness.request("GET", f"/api/v1/status/{JOB}")[1]
    assert status["status"] == "failed"
    assert status["disks"][1]["target_error"] == (
        "NBD target 10101 (pgtest1-disk1) dropped: connection reset by the hub"
    )
    assert status["error"] == (
        "backup client exited with code 1: disk 2001: NBD target 10101 (pgtest1-disk1) "
        "dropped: connection reset by the hub; Error: NBD write failed"
    )


def test_a_start_in_progress_holds_its_job_id_and_ports(harness: Harness) -> None:
    pending: Deferred[list[ProbeResult[object]]] = Deferred()
    harness.gateway.probe = lambda targets, timeout: pending  # type: ignore[method-assign]
    first = harness.treq.post(
        "http://sna/api/v1/backup/start",
        json=backup_body(),
    )
    harness.treq.flush()
    code, body = harness.request(
        "POST", "/api/v1/backup/start", backup_body(nbd_targets="2000:nbd://127.0.0.1:10150/x")
    )
    assert (code, body["error"]) == (409, "job_already_running")
    code, body = harness.request(
        "POST",
        "/api/v1/backup/start",
        backup_body(job_id="other", nbd_targets="2000:nbd://127.0.0.1:10101/x"),
    )
    assert (code, body["error"]) == (409, "port_in_use")
    del harness.gateway.probe
    pending.callback([ProbeResult(t, info=None) for t in harness.manager._starting[JOB].targets])
    harness.treq.flush()
    results: list[object] = []
    first.addBoth(results.append)
    assert getattr(results[0], "code", None) == 200


def _text(d: Deferred[object]) -> str:
    results: list[object] = []
    d.addCallback(lambda response: response.text()).addBoth(results.append)  # type: ignore[attr-defined]
    return str(results[0])


def test_a_caller_that_hangs_up_mid_probe_leaves_nothing(harness: Harness) -> None:
    from twisted.internet.defer import CancelledError, ensureDeferred

    from sna.api.validation import parse_backup_request

    cancelled: list[bool] = []
    pending: Deferred[list[ProbeResult[object]]] = Deferred(lambda d: cancelled.append(True))
    harness.gateway.probe = lambda targets, timeout: pending  # type: ignore[method-assign]
    request = parse_backup_request(backup_body(), harness.manager.settings)
    d = ensureDeferred(harness.manager.start(request))
    d.cancel()
    failures: list[object] = []
    d.addErrback(failures.append)
    assert cancelled == [True]
    assert getattr(failures[0], "type", None) is CancelledError
    assert harness.manager._starting == {}
    assert harness.launcher.requests == {} and harness.gateway.open == {}


def test_bytes_relayed_after_the_clients_exit_are_counted(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    harness.gateway.counts[JOB] = {"2000": (1000, 20), "2001": (500, 10)}
    closing: Deferred[object] = Deferred()
    real_close = harness.gateway.close_relays

    def close_later(job_id: str) -> Deferred[object]:
        return closing.addCallback(lambda _: real_close(job_id))  # type: ignore[return-value]

    harness.gateway.close_relays = close_later  # type: ignore[method-assign]
    harness.launcher.transports[JOB].exit(0)
    assert harness.request("GET", f"/api/v1/status/{JOB}")[1]["relay_bytes_to_hub"] == 1500
    # The relay flushes what it still held towards the hub, then closes.
    harness.gateway.counts[JOB] = {"2000": (1300, 20), "2001": (500, 10)}
    closing.callback(None)
    status = harness.request("GET", f"/api/v1/status/{JOB}")[1]
    assert status["relay_bytes_to_hub"] == 1800
    assert harness.store.jobs[JOB]["disks"][0]["bytes_to_hub"] == 1300
