"""Enrollment with the hub, end to end: ``twistd sna`` and the hub double as real processes.

The double (``tests/integration/hub_double.py``) serves the hub's enrollment
routes over HTTPS on loopback with a certificate made here, checks the
node's signature and fingerprint strictly, and counts every call.  No sshd
and no tunnel here: the node's files, states and the exchange with the hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.integration.harness import Daemon, free_port, wait_for
from tests.integration.hub_double import HubDoubleProcess, make_certificate

STATUS = "/api/v1/enrollment/status"
#: Where the approved enrollments' tunnels go: a loopback port nothing listens on.
SSH_PORT = free_port()
ENROLL = "/api/v1/enrollment/enroll"


def host_key_line() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDoubleProcess]:
    directory = tmp_path / "hub"
    directory.mkdir()
    double = HubDoubleProcess(str(directory), authorized_keys=str(directory / "authorized_keys"))
    yield double
    double.stop()


def enroll_body(hub: HubDoubleProcess, code: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "oma_host": "127.0.0.1",
        "oma_port": hub.port,
        "pairing_code": code,
        "vma_name": "node 01",
        "vma_version": "1.4.0-test",
        "tls_pin_sha256": hub.pin,
        "ssh_port": SSH_PORT,
        "ssh_host_key": host_key_line(),
    }
    body.update(overrides)
    return body


def wait_state(sna: Daemon, *states: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> Any:
        nonlocal last
        answer = sna.api.get(STATUS)
        assert answer.status == 200, answer
        last = answer.json()
        return last if last["state"] in states else None

    try:
        result: dict[str, Any] = wait_for(check, f"enrollment to be {'/'.join(states)}", 30)
    except pytest.fail.Exception:
        pytest.fail(f"enrollment never became {'/'.join(states)}; last: {last}")
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrollment_end_to_end(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    assert sna.api.get(STATUS).json()["state"] == "not_enrolled"
    code = hub.pairing_code()
    body = enroll_body(hub, code)
    answer = sna.api.post(ENROLL, body)
    assert answer.status == 202, answer
    started = answer.json()
    assert started["state"] == "enrolling"
    assert started["hub_url"] == f"https://127.0.0.1:{hub.port}"

    status = wait_state(sna, "awaiting_approval")
    enrollment_id = status["enrollment_id"]
    assert hub.calls()["enrollments"] == {enrollment_id: "awaiting_approval"}
    again = sna.api.post(ENROLL, enroll_body(hub, hub.pairing_code()))
    assert again.status == 409 and again.json()["error"] == "enrollment_exists", again

    hub.approve(enrollment_id)
    status = wait_state(sna, "approved")
    calls = hub.calls()
    assert calls["calls"]["enroll"] == 1 and calls["verify_by_id"] == {enrollment_id: 1}

    # The files: modes, and contents OpenSSH takes.
    directory = sna.state_dir / "enrollment"
    key, pub = directory / "sha_tunnel_ed25519", directory / "sha_tunnel_ed25519.pub"
    known, record = directory / "known_hosts", directory / "enrollment.json"
    assert mode(directory) == 0o700
    assert (mode(key), mode(pub), mode(known), mode(record)) == (0o600, 0o644, 0o644, 0o600)
    line = pub.read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.strip() == status["public_key"] == started["public_key"]
    assert line.split()[2] == "sna-node-01"
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert derived[:2] == line.split()[:2]
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert printed[1] == status["fingerprint"] == started["fingerprint"]
    host_key = body["ssh_host_key"].split()
    assert known.read_text() == f"[127.0.0.1]:{SSH_PORT} {host_key[0]} {host_key[1]}\n"
    blob = base64.b64decode(host_key[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert status["host_key_fingerprint"] == "SHA256:" + digest
    assert json.loads(record.read_text()) == {
        "id": status["id"],
        "enrollment_id": enrollment_id,
        "hub": f"https://127.0.0.1:{hub.port}",
        "fingerprint": status["fingerprint"],
        "status": "approved",
    }
    # The hub's key line for sshd: the node's key with the forwards it may use.
    installed = (Path(hub.directory) / "authorized_keys").read_text()
    assert host_key[1] not in installed
    assert " ".join(line.split()[:2]) in installed
    assert 'permitlisten="127.0.0.1:9081"' in installed

    assert (status["ssh_host"], status["ssh_port"], status["ssh_user"]) == (
        "127.0.0.1",
        SSH_PORT,
        "vma_tunnel",
    )
    assert code not in sna.output()
    assert code.encode() not in _database_bytes(sna)

    forgotten = sna.api.request("DELETE", "/api/v1/enrollment")
    assert forgotten.status == 200 and forgotten.json()["previous_state"] == "approved"
    assert sna.api.get(STATUS).json()["state"] == "not_enrolled"
    assert not key.exists() and not known.exists()
    assert sna.api.request("DELETE", "/api/v1/enrollment").status == 404


def _database_bytes(sna: Daemon) -> bytes:
    """Every byte of the job database and its WAL, as a reader of the disk would see them."""
    found = b""
    for path in sna.state_dir.glob("sna.sqlite*"):
        found += path.read_bytes()
    return found


def test_a_bad_code_fails_at_once_and_is_not_retried(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    answer = sna.api.post(ENROLL, enroll_body(hub, "ZZZZ-ZZZZ-ZZZZ"))
    assert answer.status == 202, answer
    status = wait_state(sna, "failed")
    assert "pairing code" in status["reason"] and "new code" in status["reason"]
    assert hub.calls()["calls"] == {"enroll": 1}
    assert "ZZZZ-ZZZZ-ZZZZ" not in sna.output()
    # A failed enrollment may be replaced without forgetting it first.
    retry = sna.api.post(ENROLL, enroll_body(hub, hub.pairing_code()))
    assert retry.status == 202, retry
    wait_state(sna, "awaiting_approval")


def test_a_used_code_is_refused_and_5xx_is_retried(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    code = hub.pairing_code()
    hub.fail_next("enroll", 503, count=1)
    assert sna.api.post(ENROLL, enroll_body(hub, code)).status == 202
    wait_state(sna, "awaiting_approval")
    assert hub.calls()["calls"]["enroll"] == 2
    sna.api.request("DELETE", "/api/v1/enrollment")
    assert sna.api.post(ENROLL, enroll_body(hub, code)).status == 202
    assert "already used" in wait_state(sna, "failed")["reason"]


def test_rejected(daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess) -> None:
    sna = daemon_factory()
    assert sna.api.post(ENROLL, enroll_body(hub, hub.pairing_code())).status == 202
    status = wait_state(sna, "awaiting_approval")
    hub.reject(status["enrollment_id"])
    status = wait_state(sna, "rejected")
    assert "rejected" in status["reason"]
    assert hub.calls()["verify_by_id"] == {status["enrollment_id"]: 1}


def test_restart_while_awaiting_approval_polls_again_without_verifying(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    code = hub.pairing_code()
    assert sna.api.post(ENROLL, enroll_body(hub, code)).status == 202
    status = wait_state(sna, "awaiting_approval")
    enrollment_id = status["enrollment_id"]
    sna.stop()
    polls = hub.calls()["calls"]["result"]
    hub.approve(enrollment_id)
    sna.start()
    status = wait_state(sna, "approved")
    calls = hub.calls()
    assert calls["calls"]["result"] > polls
    assert calls["calls"]["enroll"] == 1 and calls["verify_by_id"] == {enrollment_id: 1}
    assert status["enrollment_id"] == enrollment_id
    assert code not in sna.output()
    assert code.encode() not in _database_bytes(sna)


def test_the_hub_forgetting_the_enrollment_fails_it(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    assert sna.api.post(ENROLL, enroll_body(hub, hub.pairing_code())).status == 202
    status = wait_state(sna, "awaiting_approval")
    hub.forget(status["enrollment_id"])
    status = wait_state(sna, "failed")
    assert "no longer knows" in status["reason"]


def test_a_wrong_tls_pin_fails_with_the_reason(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    wrong = "ab" * 32
    answer = sna.api.post(ENROLL, enroll_body(hub, hub.pairing_code(), tls_pin_sha256=wrong))
    assert answer.status == 202, answer
    status = wait_state(sna, "failed")
    assert hub.pin is not None
    assert "not the pinned" in status["reason"], status
    assert hub.pin.upper()[:2] in status["reason"].replace(":", "")
    assert hub.calls()["calls"] == {}


def test_a_ca_file_is_trusted(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess, tmp_path: Path
) -> None:
    sna = daemon_factory()
    body = enroll_body(hub, hub.pairing_code(), tls_ca_file=hub.cert)
    del body["tls_pin_sha256"]
    assert sna.api.post(ENROLL, body).status == 202
    wait_state(sna, "awaiting_approval")


def test_a_ca_file_that_did_not_sign_the_hub_fails_with_the_reason(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess, tmp_path: Path
) -> None:
    other, _, _ = make_certificate(str(tmp_path), "other")
    sna = daemon_factory()
    body = enroll_body(hub, hub.pairing_code(), tls_ca_file=other)
    del body["tls_pin_sha256"]
    assert sna.api.post(ENROLL, body).status == 202
    status = wait_state(sna, "failed")
    assert "certificate" in status["reason"] and "not trusted" in status["reason"], status
    assert hub.calls()["calls"] == {}


def test_bad_requests_name_the_field(
    daemon_factory: Callable[..., Daemon], hub: HubDoubleProcess
) -> None:
    sna = daemon_factory()
    code = "SECR-ETCO-DE22"
    cases = {
        "oma_host": {"oma_host": "https://hub"},
        "oma_port": {"oma_port": 70000},
        "ssh_host_key": {"ssh_host_key": "ssh-ed25519 notbase64!"},
        "ssh_port": {"ssh_port": "22"},
        "ssh_user": {"ssh_user": "Root user"},
        "tls_pin_sha256": {"tls_pin_sha256": "abcd"},
        "plain_http": {"plain_http": True},
        "tls_ca_file": {"tls_pin_sha256": None, "tls_ca_file": "/nonexistent/ca.pem"},
    }
    for field, change in cases.items():
        answer = sna.api.post(ENROLL, enroll_body(hub, code, **change))
        assert answer.status == 400, (field, answer)
        error = answer.json()
        assert error["field"] == field, (field, error)
        assert code not in answer.text
    assert sna.api.get(STATUS).json()["state"] == "not_enrolled"
    assert os.path.exists(sna.state_dir / "enrollment") is False
    assert hub.calls()["calls"] == {}
    assert code not in sna.output()
    db = sqlite3.connect(sna.state_dir / "sna.sqlite")
    try:
        assert db.execute("SELECT COUNT(*) FROM enrollment").fetchone()[0] == 0
    finally:
        db.close()
