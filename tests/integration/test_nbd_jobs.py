"""Backup jobs and their NBD targets: the probe, the relays and a hub that drops.

Real ``twistd -n sna`` daemons, real NBD servers (qemu-nbd on fresh qcow2s,
from ``nbd_fixtures``) and odd listeners made here, and the client double in
its ``write``/``slowwrite`` modes, which writes a known payload through the
relay with ``nbdcopy``.  The servers run on free ports, so these daemons
allow any port.  Nothing here asserts how long anything took.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from sna.contract.argv import option_value
from tests.integration.harness import (
    Daemon,
    JobIds,
    Response,
    backup_body,
    cmdline,
    double_invocation,
    doubles_of,
    metric,
    reaped,
    wait_for,
)
from tests.integration.nbd_fixtures import (
    HOST,
    MiB,
    NbdServerProcess,
    QemuNbd,
    free_port,
    image_compare,
    listening,
    nbdkit_factory_fixture,  # noqa: F401  (the nbdkit_factory fixture)
    qemu_nbd_factory_fixture,  # noqa: F401  (the qemu_nbd_factory fixture)
)
from tests.sbc_double import PAYLOAD_SIZE, SLOW_PIECES, payload

pytestmark = pytest.mark.integration

DaemonFactory = Callable[..., Daemon]
QemuNbdFactory = Callable[..., QemuNbd]
NbdkitFactory = Callable[..., NbdServerProcess]

#: The servers here listen on free ports, outside the default NBD range.
ANY_PORT = ("--nbd-ports", "1024-65535")
DISK_SIZE = 8 * MiB
FINAL = ("completed", "failed", "cancelled", "interrupted")
#: Two of the ``slowwrite`` double's pieces: data is flowing, most is still to come.
MID_TRANSFER = 2 * -(-PAYLOAD_SIZE // SLOW_PIECES)


# -- odd listeners --------------------------------------------------------------


class SilentServer:
    """Accepts every connection and never sends a byte; keeps it open until ``hang_up``."""

    def __init__(self) -> None:
        self._server = socket.create_server((HOST, 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def hang_up(self) -> None:
        """Close the connections accepted so far, without a word."""
        for conn in self.accepted:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


# -- helpers ---------------------------------------------------------------------


def probe_failures(daemon: Daemon, reason: str) -> float:
    return metric(daemon, "sna_nbd_probe_failures_total", reason=reason)


def relays(daemon: Daemon, job_id: Optional[str] = None) -> list[dict[str, Any]]:
    answer = daemon.api.get("/api/v1/relays")
    assert answer.status == 200, answer
    body = answer.json()
    assert body["count"] == len(body["relays"])
    return [r for r in body["relays"] if job_id is None or r["job_id"] == job_id]


def wait_relays_gone(daemon: Daemon, job_id: str) -> None:
    wait_for(lambda: not relays(daemon, job_id), f"the relays of job {job_id} to close")


def nbd_target(key: str, port: int, export: str) -> str:
    return f"{key}:nbd://{HOST}:{port}/{export}"


def expected_image(directory: Path, disk_key: str, size: int = DISK_SIZE) -> Path:
    """A raw image of what a disk must hold after the double wrote it: payload, then zeros."""
    path = directory / f"expected-{disk_key}.raw"
    data = payload(disk_key)
    path.write_bytes(data + bytes(size - len(data)))
    return path


def check_image(tmp_path: Path, server: QemuNbd, disk_key: str) -> None:
    # qemu-nbd caches qcow2 metadata: stop it before reading the file.
    server.stop()
    compared = image_compare(expected_image(tmp_path, disk_key), server.qcow2_path)
    assert compared.returncode == 0, (compared.stdout + compared.stderr).decode()


def check_served(tmp_path: Path, server: NbdServerProcess, disk_key: str) -> None:
    """Read the whole export back from the server itself (not through a relay) and compare."""
    copy = tmp_path / f"served-{disk_key}.raw"
    read = subprocess.run(
        ["nbdcopy", "--", server.url, str(copy)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert read.returncode == 0, read.stderr.decode()
    expected = expected_image(tmp_path, disk_key).read_bytes()
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()


def nbdcopies_to(port: int) -> list[int]:
    """Pids of live nbdcopy processes writing to loopback ``port``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name))
            if argv[:1] == ["nbdcopy"] and any(f"{HOST}:{port}/" in a for a in argv):
                found.append(int(entry.name))
    return found


def refused_start(
    daemon: Daemon, job_ids: JobIds, body: dict[str, Any], status: int
) -> dict[str, Any]:
    """POST ``body``, expect ``status`` and nbd_target_unreachable, and check nothing started."""
    answer = daemon.api.post("/api/v1/backup/start", body)
    assert answer.status == status, answer
    refused: dict[str, Any] = answer.json()
    assert refused["error"] == "nbd_target_unreachable", refused
    assert refused["message"]
    job_id = body["job_id"]
    assert daemon.api.jobs()["jobs"] == []
    assert daemon.api.get(f"/api/v1/status/{job_id}").status == 404
    assert daemon.job_logs() == set()
    assert doubles_of(job_ids.made) == []
    assert relays(daemon) == []
    return refused


def started_writing(daemon: Daemon, job_id: str) -> dict[str, Any]:
    """Poll until the job is well into writing through its relays, not just past the handshake."""
    return wait_for(
        lambda: (
            ((s := daemon.api.status(job_id))["relay_bytes_to_hub"] >= MID_TRANSFER and s) or None
        ),
        f"job {job_id} to write {MID_TRANSFER} bytes through its relays",
    )


# -- the probe -------------------------------------------------------------------


def test_closed_port_is_refused(daemon_factory: DaemonFactory, job_ids: JobIds) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    port = free_port()
    before = probe_failures(daemon, "refused")
    job_id = job_ids("closed")
    body = backup_body(job_id, nbd_targets=nbd_target("2000", port, "pgtest1-disk0"))
    refused = refused_start(daemon, job_ids, body, 502)
    [target] = refused["targets"]
    assert target["disk_key"] == "2000"
    assert (target["host"], target["port"], target["export"]) == (HOST, port, "pgtest1-disk0")
    assert target["reason"] == "refused"
    assert str(port) in target["message"]
    assert probe_failures(daemon, "refused") == before + 1


def test_a_target_that_listens_a_moment_late_is_waited_for(
    daemon_factory: DaemonFactory, job_ids: JobIds, qemu_nbd_factory: QemuNbdFactory
) -> None:
    """The SHA starts qemu-nbd and calls backup/start without waiting for it to listen."""
    daemon = daemon_factory(extra=ANY_PORT)
    server = qemu_nbd_factory(DISK_SIZE, "pgtest1-disk0")
    late = free_port()
    forwarder: list[subprocess.Popen[bytes]] = []

    def listen_later() -> None:
        time.sleep(0.3)
        forwarder.append(
            subprocess.Popen(
                [
                    "socat",
                    f"TCP-LISTEN:{late},bind={HOST},reuseaddr,fork",
                    f"TCP:{HOST}:{server.port}",
                ]
            )
        )

    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        job_id = job_ids("late")
        body = backup_body(job_id, nbd_targets=nbd_target("2000", late, "pgtest1-disk0"))
        answer = daemon.api.post("/api/v1/backup/start", body)
        assert answer.status == 200, answer
        assert daemon.api.wait_status(job_id, "completed", "failed")["status"] == "completed"
    finally:
        thread.join()
        for process in forwarder:
            process.terminate()
            process.wait()


def test_missing_export(
    daemon_factory: DaemonFactory, job_ids: JobIds, qemu_nbd_factory: QemuNbdFactory
) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    server = qemu_nbd_factory(DISK_SIZE, "other")
    before = probe_failures(daemon, "export_missing")
    body = backup_body(job_ids("noexport"), nbd_targets=nbd_target("2000", server.port, "wanted"))
    refused = refused_start(daemon, job_ids, body, 502)
    [target] = refused["targets"]
    assert (target["port"], target["export"], target["reason"]) == (
        server.port,
        "wanted",
        "export_missing",
    )
    assert "wanted" in target["message"]
    assert probe_failures(daemon, "export_missing") == before + 1
    assert server.alive()


def test_non_nbd_server(daemon_factory: DaemonFactory, job_ids: JobIds, http_port: int) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    before = probe_failures(daemon, "not_nbd")
    body = backup_body(job_ids("http"), nbd_targets=nbd_target("2000", http_port, "d0"))
    refused = refused_start(daemon, job_ids, body, 502)
    [target] = refused["targets"]
    assert (target["port"], target["reason"]) == (http_port, "not_nbd")
    assert probe_failures(daemon, "not_nbd") == before + 1


def test_silent_server_times_out(
    daemon_factory: DaemonFactory, job_ids: JobIds, silent: SilentServer
) -> None:
    daemon = daemon_factory(extra=(*ANY_PORT, "--nbd-probe-timeout", "0.5"))
    silent_port = silent.port
    before = probe_failures(daemon, "timeout")
    body = backup_body(job_ids("silent"), nbd_targets=nbd_target("2000", silent_port, "d0"))
    refused = refused_start(daemon, job_ids, body, 503)
    [target] = refused["targets"]
    assert (target["port"], target["reason"]) == (silent_port, "timeout")
    assert probe_failures(daemon, "timeout") == before + 1

    # A timeout with another kind of failure is no longer "try later".
    closed = free_port()
    body = backup_body(
        job_ids("mixed"),
        nbd_targets=",".join(
            [nbd_target("2000", silent_port, "d0"), nbd_target("2001", closed, "d1")]
        ),
    )
    refused = refused_start(daemon, job_ids, body, 502)
    assert sorted((t["disk_key"], t["port"], t["reason"]) for t in refused["targets"]) == [
        ("2000", silent_port, "timeout"),
        ("2001", closed, "refused"),
    ]
    assert probe_failures(daemon, "timeout") == before + 2
    assert probe_failures(daemon, "refused") == 1
    # Each probe did connect: "timeout" here is a silent server, not an unreachable one.
    wait_for(lambda: len(silent.accepted) == 2, "the two probes' connections to be accepted")


def test_a_start_being_probed_holds_its_job_id_and_ports(
    daemon_factory: DaemonFactory,
    job_ids: JobIds,
    silent: SilentServer,
    qemu_nbd_factory: QemuNbdFactory,
) -> None:
    """While its targets are probed a start is no job yet, but it conflicts like one.

    The probe is held by a server that stays silent until the test hangs up,
    well within a probe timeout long enough never to be reached.
    """
    daemon = daemon_factory(extra=(*ANY_PORT, "--nbd-probe-timeout", "60"))
    first = job_ids("probing")
    answers: list[Response] = []
    request = threading.Thread(
        target=lambda: answers.append(
            daemon.api.post(
                "/api/v1/backup/start",
                backup_body(first, nbd_targets=nbd_target("2000", silent.port, "d0")),
            )
        )
    )
    request.start()
    try:
        wait_for(lambda: silent.accepted, "the probe to connect")
        assert daemon.api.jobs()["count"] == 0
        busy = daemon.api.post(
            "/api/v1/backup/start",
            backup_body(job_ids("other"), nbd_targets=nbd_target("2000", silent.port, "d1")),
        )
        assert busy.status == 409, busy
        assert busy.json()["error"] == "port_in_use"
        again = daemon.api.post(
            "/api/v1/backup/start",
            backup_body(first, nbd_targets=nbd_target("2000", free_port(), "d0")),
        )
        assert again.status == 409, again
        assert again.json()["error"] == "job_already_running"
    finally:
        silent.hang_up()
        request.join(30)
    [answer] = answers
    assert answer.status == 502, answer
    assert [t["reason"] for t in answer.json()["targets"]] == ["handshake_error"]
    assert len(silent.accepted) == 1, "the conflicting starts probed nothing"

    # Once its probe has failed the start leaves nothing behind: the id is free again.
    server = qemu_nbd_factory(DISK_SIZE, "write-disk0", shared=1)
    daemon.api.start(
        backup_body(first, vm="write", nbd_targets=nbd_target("2000", server.port, server.export))
    )
    assert daemon.api.wait_status(first, *FINAL)["status"] == "completed"
    assert daemon.api.job_ids() == [first]


def test_one_bad_target_starts_nothing_and_leaves_the_good_one_free(
    daemon_factory: DaemonFactory,
    job_ids: JobIds,
    qemu_nbd_factory: QemuNbdFactory,
    tmp_path: Path,
) -> None:
    """Only the failing target is named; the healthy one's probe left no session open.

    qemu-nbd with ``--shared=1`` serves one connection at a time, so a
    probe connection left open would make the next job's probe time out.
    """
    daemon = daemon_factory(extra=ANY_PORT)
    good = qemu_nbd_factory(DISK_SIZE, "write-disk0", shared=1)
    closed = free_port()
    body = backup_body(
        job_ids("half"),
        vm="write",
        nbd_targets=",".join(
            [nbd_target("2000", good.port, "write-disk0"), nbd_target("2001", closed, "d1")]
        ),
    )
    refused = refused_start(daemon, job_ids, body, 502)
    assert [(t["disk_key"], t["reason"]) for t in refused["targets"]] == [("2001", "refused")]

    job_id = job_ids("write")
    daemon.api.start(
        backup_body(job_id, vm="write", nbd_targets=nbd_target("2000", good.port, "write-disk0"))
    )
    status = daemon.api.wait_status(job_id, *FINAL)
    assert status["status"] == "completed", status
    check_image(tmp_path, good, "2000")


# -- the relays ------------------------------------------------------------------


@pytest.mark.parametrize("hub", ["qemu-nbd", "nbdkit"])
def test_written_bytes_cross_the_relay_unchanged(
    daemon_factory: DaemonFactory,
    job_ids: JobIds,
    qemu_nbd_factory: QemuNbdFactory,
    nbdkit_factory: NbdkitFactory,
    tmp_path: Path,
    hub: str,
) -> None:
    """Two NBD server implementations, which split and answer requests differently."""
    daemon = daemon_factory(extra=ANY_PORT)
    servers: list[NbdServerProcess] = [
        qemu_nbd_factory(DISK_SIZE, f"write-disk{i}", shared=1)
        if hub == "qemu-nbd"
        else nbdkit_factory(["memory", str(DISK_SIZE)], export=f"write-disk{i}")
        for i in range(2)
    ]
    keys = ["2000", "2001"]
    job_id = job_ids("write")
    daemon.api.start(
        backup_body(
            job_id,
            vm="write",
            nbd_targets=",".join(
                nbd_target(key, s.port, s.export) for key, s in zip(keys, servers, strict=True)
            ),
        )
    )
    status = daemon.api.wait_status(job_id, *FINAL)
    assert status["status"] == "completed", status
    assert status["exit_code"] == 0

    disks = status["disks"]
    assert [d["disk_key"] for d in disks] == keys
    assert [d["nbd_port"] for d in disks] == [s.port for s in servers]
    for disk in disks:
        assert isinstance(disk["relay_port"], int), disk
        assert disk["relay_port"] not in (disk["nbd_port"], *[s.port for s in servers])
        # The payload, plus NBD request headers; replies and the handshake come back.
        assert disk["bytes_to_hub"] >= PAYLOAD_SIZE, disk
        assert disk["bytes_from_hub"] > 0, disk
        assert disk["target_error"] is None
        assert disk["status"] == "completed"
    assert status["relay_bytes_to_hub"] == sum(d["bytes_to_hub"] for d in disks)
    assert status["relay_bytes_from_hub"] == sum(d["bytes_from_hub"] for d in disks)
    assert status["relay_bytes_to_hub"] >= 2 * PAYLOAD_SIZE

    # The client was given the relays, never the hub's ports.
    argv = double_invocation(daemon.job_log(job_id).read_text())["argv"]
    assert option_value(argv, "--nbd-targets") == ",".join(
        nbd_target(d["disk_key"], d["relay_port"], d["export"]) for d in disks
    )

    wait_relays_gone(daemon, job_id)
    for disk in disks:
        # The counter keeps the bytes of closed relays, and saw at least what the job did.
        relayed = metric(
            daemon, "sna_relay_bytes_total", port=str(disk["nbd_port"]), direction="to_hub"
        )
        assert relayed >= disk["bytes_to_hub"], (relayed, disk)
    for key, server in zip(keys, servers, strict=True):
        if isinstance(server, QemuNbd):
            check_image(tmp_path, server, key)
        else:
            check_served(tmp_path, server, key)

    # The counts are part of the job's record, not only of the live relays.
    daemon.restart()
    assert daemon.api.status(job_id)["disks"] == disks


def test_relay_is_listed_while_the_job_writes(
    daemon_factory: DaemonFactory,
    job_ids: JobIds,
    qemu_nbd_factory: QemuNbdFactory,
    tmp_path: Path,
) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    server = qemu_nbd_factory(DISK_SIZE, "slowwrite-disk0", shared=1)
    job_id = job_ids("slowwrite")
    daemon.api.start(
        backup_body(
            job_id, vm="slowwrite", nbd_targets=nbd_target("2000", server.port, server.export)
        )
    )
    status = started_writing(daemon, job_id)
    assert status["status"] == "running", status
    [disk] = status["disks"]

    def live_relay() -> Optional[dict[str, Any]]:
        found = relays(daemon, job_id)
        return found[0] if found and found[0]["active_connections"] >= 1 else None

    relay = wait_for(live_relay, "the job's relay to show its connection")
    assert len(relays(daemon, job_id)) == 1
    assert (relay["disk_key"], relay["export"]) == ("2000", server.export)
    assert (relay["nbd_port"], relay["listen_port"]) == (server.port, disk["relay_port"])
    assert relay["state"] == "connected"
    assert relay["connections"] >= 1
    assert relay["bytes_to_hub"] >= MID_TRANSFER and relay["bytes_from_hub"] > 0
    assert relay["upstream_error"] is None
    port = str(server.port)
    assert metric(daemon, "sna_relay_bytes_total", port=port, direction="to_hub") > 0
    assert metric(daemon, "sna_relay_connections", port=port) >= 1
    assert metric(daemon, "sna_jobs", status="running") == 1

    final = daemon.api.wait_status(job_id, *FINAL)
    assert final["status"] == "completed", final
    assert final["relay_bytes_to_hub"] >= PAYLOAD_SIZE
    assert final["relay_bytes_to_hub"] >= relay["bytes_to_hub"]
    wait_relays_gone(daemon, job_id)
    assert relays(daemon) == []
    assert metric(daemon, "sna_relay_bytes_total", port=port, direction="to_hub") >= PAYLOAD_SIZE
    assert metric(daemon, "sna_jobs", status="completed") == 1
    check_image(tmp_path, server, "2000")


def test_hub_dropping_mid_job_fails_it_and_names_the_port(
    daemon_factory: DaemonFactory, job_ids: JobIds, qemu_nbd_factory: QemuNbdFactory
) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    server = qemu_nbd_factory(DISK_SIZE, "slowwrite-disk0", shared=1)
    job_id = job_ids("drop")
    pid = daemon.api.start(
        backup_body(
            job_id, vm="slowwrite", nbd_targets=nbd_target("2000", server.port, server.export)
        )
    )["pid"]
    started_writing(daemon, job_id)
    os.kill(server.pid, signal.SIGKILL)
    assert server.wait_exit() == -signal.SIGKILL

    status = daemon.api.wait_status(job_id, *FINAL)
    assert status["status"] == "failed", status
    assert status["exit_code"] == 1
    [disk] = status["disks"]
    assert disk["status"] == "failed"
    target_error = disk["target_error"]
    assert isinstance(target_error, str), disk
    assert str(server.port) in target_error and "dropped" in target_error, target_error
    assert target_error in status["error"], status
    assert disk["bytes_to_hub"] >= MID_TRANSFER
    wait_relays_gone(daemon, job_id)
    wait_for(lambda: reaped(pid, job_id), f"double {pid} to be reaped")
    assert nbdcopies_to(disk["relay_port"]) == []
    assert metric(daemon, "sna_jobs", status="failed") == 1


def test_cancel_while_writing_closes_the_relays(
    daemon_factory: DaemonFactory, job_ids: JobIds, qemu_nbd_factory: QemuNbdFactory
) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    servers = [qemu_nbd_factory(DISK_SIZE, f"slowwrite-disk{i}", shared=1) for i in range(2)]
    job_id = job_ids("cancel")
    pid = daemon.api.start(
        backup_body(
            job_id,
            vm="slowwrite",
            nbd_targets=",".join(
                nbd_target(f"200{i}", s.port, s.export) for i, s in enumerate(servers)
            ),
        )
    )["pid"]
    status = started_writing(daemon, job_id)
    assert len(relays(daemon, job_id)) == 2
    relay_ports = [d["relay_port"] for d in status["disks"]]

    answer = daemon.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status == 202, answer
    final = daemon.api.wait_status(job_id, *FINAL)
    assert final["status"] == "cancelled", final
    assert final["exit_code"] == 143
    assert all(d["target_error"] is None for d in final["disks"]), final
    assert final["relay_bytes_to_hub"] >= MID_TRANSFER
    wait_relays_gone(daemon, job_id)
    assert relays(daemon) == []
    wait_for(lambda: reaped(pid, job_id), f"double {pid} to be reaped")
    wait_for(
        lambda: not any(nbdcopies_to(port) for port in relay_ports),
        "the double's nbdcopy to be gone",
    )
    # The relays are closed, not just unlisted: nothing listens on their ports.
    assert not any(listening(port) for port in relay_ports)
    # The hub is unharmed: its servers still run.
    assert all(s.alive() for s in servers)


def test_stopping_sna_mid_write_closes_the_relays_and_keeps_the_counts(
    daemon_factory: DaemonFactory, job_ids: JobIds, qemu_nbd_factory: QemuNbdFactory
) -> None:
    daemon = daemon_factory(extra=ANY_PORT)
    server = qemu_nbd_factory(DISK_SIZE, "slowwrite-disk0", shared=1)
    job_id = job_ids("stop")
    pid = daemon.api.start(
        backup_body(
            job_id, vm="slowwrite", nbd_targets=nbd_target("2000", server.port, server.export)
        )
    )["pid"]
    [disk] = started_writing(daemon, job_id)["disks"]

    # twistd re-raises the signal it stopped on, so -SIGTERM is a clean exit.
    assert daemon.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert reaped(pid, job_id)
    assert not listening(disk["relay_port"])
    wait_for(lambda: not nbdcopies_to(disk["relay_port"]), "the double's nbdcopy to be gone")

    daemon.start()
    status = daemon.api.status(job_id)
    assert status["status"] == "interrupted", status
    [stored] = status["disks"]
    assert stored["relay_port"] == disk["relay_port"]
    assert stored["bytes_to_hub"] >= MID_TRANSFER, stored
    assert stored["target_error"] is None
    assert relays(daemon) == []
    assert server.alive()


def test_target_lost_before_the_client_connects_names_that_disk(
    daemon_factory: DaemonFactory, job_ids: JobIds, qemu_nbd_factory: QemuNbdFactory
) -> None:
    """The second disk's hub dies while the first is written: its relay cannot connect."""
    daemon = daemon_factory(extra=ANY_PORT)
    servers = [qemu_nbd_factory(DISK_SIZE, f"slowwrite-disk{i}", shared=1) for i in range(2)]
    job_id = job_ids("second")
    daemon.api.start(
        backup_body(
            job_id,
            vm="slowwrite",
            nbd_targets=",".join(
                nbd_target(f"200{i}", s.port, s.export) for i, s in enumerate(servers)
            ),
        )
    )
    started_writing(daemon, job_id)
    os.kill(servers[1].pid, signal.SIGKILL)
    assert servers[1].wait_exit() == -signal.SIGKILL

    status = daemon.api.wait_status(job_id, *FINAL)
    assert status["status"] == "failed", status
    first, second = status["disks"]
    assert (first["status"], first["target_error"]) == ("completed", None)
    assert first["bytes_to_hub"] >= PAYLOAD_SIZE
    assert second["status"] == "failed"
    assert str(servers[1].port) in second["target_error"], second
    assert "dropped" in second["target_error"]
    assert second["bytes_to_hub"] == 0
    assert second["target_error"] in status["error"]
    wait_relays_gone(daemon, job_id)
