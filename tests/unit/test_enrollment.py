"""The enrollment in memory: keys, the request's checks, the state machine on a Clock, the store.

The hub here is a scripted fake (each call answers the next scripted outcome and
is counted); the real exchange, over HTTPS with the hub double, is in
tests/integration/test_enrollment.py.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath

from sna.api.http import ApiError
from sna.config import PortRange
from sna.enrollment import model
from sna.enrollment.files import EnrollmentFiles
from sna.enrollment.hub import Enrolled, HubClient, HubError, HubTrust
from sna.enrollment.keys import (
    InvalidChallenge,
    InvalidHostKey,
    NodeKey,
    comment_for,
    parse_host_key,
)
from sna.enrollment.request import EnrollRequest, parse_enroll_request
from sna.enrollment.service import (
    ENROLL_RETRY_WINDOW,
    EnrollmentConflict,
    EnrollmentService,
    TunnelByHand,
)
from sna.jobs.store import SCHEMA_VERSION, SQLiteJobStore
from sna.tap import Options
from sna.testing import SteppingClock
from sna.tunnel.settings import TunnelSettings

CODE = "AX7K-PJ3F-TH2Q"


def host_key_line() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


# -- keys ------------------------------------------------------------------------


def test_the_node_key_is_openssh_and_its_fingerprint_is_sha256_of_the_blob() -> None:
    key = NodeKey.generate(comment_for("node 01/ä"))
    assert key.comment == "sna-node-01"
    kind, data, comment = key.public_line.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "sna-node-01")
    assert "\n" not in key.public_line
    digest = hashlib.sha256(base64.b64decode(data)).digest()
    assert key.fingerprint == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert len(key.fingerprint) == 50
    private = key.private_openssh()
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    again = NodeKey.load(private, key.comment)
    assert again.public_line == key.public_line


def test_the_challenge_is_signed_as_base64_decoded_bytes() -> None:
    key = NodeKey.generate("sna-n")
    challenge = "1652aeca" * 8  # 64 hex digits, as the stock hub sends
    signature = base64.b64decode(key.sign_challenge(challenge), validate=True)
    assert len(signature) == 64
    message = base64.b64decode(challenge)
    assert len(message) == 48
    key.private.public_key().verify(signature, message)  # raises if not
    with pytest.raises(InvalidChallenge):
        key.sign_challenge("not base64!")


def test_host_keys_are_parsed() -> None:
    line = host_key_line()
    kind, data = line.split()
    key = parse_host_key(f"  {line} root@hub\n")
    assert (key.type, key.data) == (kind, data)
    assert parse_host_key(f"[hub]:443 {line}") == key  # ssh-keyscan's form
    assert key.known_hosts_line("hub.example", 443) == f"[hub.example]:443 {kind} {data}\n"
    assert key.known_hosts_line("hub.example", 22) == f"hub.example {kind} {data}\n"
    digest = hashlib.sha256(base64.b64decode(data)).digest()
    assert key.fingerprint == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    for bad in (
        "",
        "ssh-ed25519",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
        "ssh-ed25519 notbase64!",
        f"ssh-rsa {data}",  # an ed25519 blob named otherwise
        "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00").decode(),
    ):
        with pytest.raises(InvalidHostKey):
            parse_host_key(bad)


# -- the request -------------------------------------------------------------------


def body(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "oma_host": "Hub.Example.",
        "pairing_code": CODE,
        "tls_pin_sha256": "ab" * 32,
        "ssh_host_key": host_key_line(),
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def test_defaults_of_a_request() -> None:
    parsed = parse_enroll_request(body())
    assert (parsed.oma_host, parsed.oma_port, parsed.ssh_host) == (
        "hub.example",
        443,
        "hub.example",
    )
    assert (parsed.ssh_port, parsed.ssh_user) == (443, "vma_tunnel")
    assert parsed.trust == HubTrust(pin_sha256=":".join(["AB"] * 32))
    assert CODE not in repr(parsed)
    plain = parse_enroll_request(body(tls_pin_sha256=None, plain_http=True, oma_host="::1"))
    assert (plain.oma_port, plain.oma_host, plain.trust.plain_http) == (8082, "::1", True)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("oma_host", {"oma_host": None}),
        ("oma_host", {"oma_host": "http://hub"}),
        ("oma_host", {"oma_host": "hub:443"}),
        ("oma_port", {"oma_port": 0}),
        ("oma_port", {"oma_port": True}),
        ("pairing_code", {"pairing_code": None}),
        ("pairing_code", {"pairing_code": "AX7K PJ3F"}),
        ("pairing_code", {"pairing_code": 1234}),
        ("tls_pin_sha256", {"tls_pin_sha256": None}),
        ("tls_pin_sha256", {"tls_pin_sha256": "ab" * 20}),
        ("plain_http", {"plain_http": "yes"}),
        ("tls_ca_file", {"tls_pin_sha256": None, "tls_ca_file": "relative.pem"}),
        ("ssh_host", {"ssh_host": "-oProxyCommand=x"}),
        ("ssh_port", {"ssh_port": 65536}),
        ("ssh_user", {"ssh_user": "-l"}),
        ("ssh_host_key", {"ssh_host_key": None}),
        ("ssh_host_key", {"ssh_host_key": "ssh-ed25519 AAAA\nssh-rsa AAAA"}),
        ("vma_name", {"vma_name": "a\x1b[31m"}),
        ("colour", {"colour": "blue"}),
    ],
)
def test_bad_requests_name_the_field_and_never_the_code(field: str, change: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        parse_enroll_request(
            {**body(), **change} if None not in change.values() else body(**change)
        )
    assert (caught.value.status, caught.value.field) == (400, field)
    assert CODE not in caught.value.message and "PJ3F" not in caught.value.message


def test_a_ca_file_must_hold_certificates(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing\n")
    with pytest.raises(ApiError) as caught:
        parse_enroll_request(body(tls_pin_sha256=None, tls_ca_file=str(empty)))
    assert caught.value.field == "tls_ca_file"


# -- the state machine ---------------------------------------------------------------

Outcome = Union[Exception, Any]


class FakeHub:
    """Answers each call with the next scripted outcome (the last one repeats); counts calls."""

    def __init__(self) -> None:
        self.script: dict[str, list[Outcome]] = {
            "enroll": [Enrolled("hub-1", "00" * 32, "pending_verification")],
            "verify": ["awaiting_approval"],
            "result": ["awaiting_approval"],
        }
        self.calls: dict[str, int] = {"enroll": 0, "verify": 0, "result": 0}
        self.codes: list[str] = []
        self.signatures: list[str] = []

    def _next(self, route: str) -> Any:
        self.calls[route] += 1
        script = self.script[route]
        outcome = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def enroll(self, code: str, public_key: str, name: str, version: str, fp: str) -> Any:
        self.codes.append(code)
        return self._next("enroll")

    async def verify(self, enrollment_id: str, signature: str) -> Any:
        self.signatures.append(signature)
        return self._next("verify")

    async def result(self, enrollment_id: str) -> Any:
        return self._next("result")


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.now = SteppingClock()
        self.hub = FakeHub()
        self.tunnels: list[Optional[TunnelSettings]] = []
        self.store = SQLiteJobStore(FilePath(str(tmp_path / "sna.sqlite")))
        self.files = EnrollmentFiles.under(str(tmp_path))
        self.service = self.make()

    def make(self, tunnel_by_hand: Optional[str] = None) -> EnrollmentService:
        return EnrollmentService(
            self.store,
            self.files,
            self.clock,
            self.now,
            api_port=8081,
            nbd_ports=lambda: PortRange(10100, 10102),
            hub_factory=lambda url, trust: self.hub,
            random=lambda: 0.5,
            use_tunnel=self.tunnels.append,
            tunnel_by_hand=tunnel_by_hand,
        )

    def restart(self) -> EnrollmentService:
        self.service.stopService()
        self.store.close()
        self.service = self.make()
        self.service.startService()
        return self.service

    def state(self) -> str:
        return str(self.service.status()["state"])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    w.service.startService()
    yield w
    w.service.stopService()
    w.store.close()


def request(**overrides: Any) -> EnrollRequest:
    return parse_enroll_request(body(ssh_port=2222, **overrides))


def test_enrolled_verified_polled_and_approved(world: World) -> None:
    world.hub.script["enroll"][:0] = [HubError("HTTP 503", final=False, status=503)] * 2
    world.hub.script["result"] = ["awaiting_approval", "awaiting_approval", "approved"]
    enrollment = world.service.enroll(request())
    assert world.state() == "enrolling" and world.hub.calls["enroll"] == 1
    assert world.service.status()["last_error"] == "HTTP 503"
    world.clock.advance(2.0)  # first retry after 2 s (x1.0 jitter)
    assert world.hub.calls["enroll"] == 2
    world.clock.advance(3.9)
    assert world.hub.calls["enroll"] == 2
    world.clock.advance(0.1)  # second after 4 s
    assert world.hub.calls == {"enroll": 3, "verify": 1, "result": 1}
    assert world.hub.codes == [CODE] * 3
    assert world.state() == "awaiting_approval"
    world.clock.advance(7.4)
    assert world.hub.calls["result"] == 1
    world.clock.advance(0.1)  # 5 s + 5 s x 0.5
    assert world.hub.calls["result"] == 2
    world.clock.advance(7.5)
    status = world.service.status()
    assert status["state"] == "approved" and status["enrollment_id"] == "hub-1"
    assert world.hub.calls["verify"] == 1
    assert world.tunnels == [
        TunnelSettings(
            host="hub.example",
            identity=world.files.private_key,
            known_hosts=world.files.known_hosts,
            api_port=8081,
            port=2222,
            user="vma_tunnel",
            nbd_ports=PortRange(10100, 10102),
            enrollment_id="hub-1",
        )
    ]
    world.clock.advance(60)
    assert world.hub.calls["result"] == 3  # polling stopped
    # The signature is over b64decode(challenge), with the key on disk.
    key = NodeKey.load(Path(world.files.private_key).read_bytes(), enrollment.key_comment)
    key.private.public_key().verify(
        base64.b64decode(world.hub.signatures[0]), base64.b64decode("00" * 32)
    )
    assert stat.S_IMODE(Path(world.files.directory).stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(world.files.private_key).stat().st_mode) == 0o600
    record = world.store.load_enrollment()
    assert record is not None and CODE not in str(record)
    assert record["challenge"] is None


def test_a_401_is_final(world: World) -> None:
    world.hub.script["enroll"] = [
        HubError("HTTP 401 from the hub: Invalid pairing code", True, 401)
    ]
    world.service.enroll(request())
    status = world.service.status()
    assert status["state"] == "failed"
    assert "wrong, expired or already used" in status["reason"]
    world.clock.advance(3600)
    assert world.hub.calls == {"enroll": 1, "verify": 0, "result": 0}
    # A failed enrollment may be replaced.
    world.hub.script["enroll"] = [Enrolled("hub-2", "00" * 32, "pending_verification")]
    world.service.enroll(request())
    assert world.state() == "awaiting_approval"


def test_the_enroll_call_is_retried_only_while_a_code_may_live(world: World) -> None:
    world.hub.script["enroll"] = [HubError("no answer", final=False)]
    world.service.enroll(request())
    world.clock.pump([60.0] * int(ENROLL_RETRY_WINDOW / 60 + 2))
    status = world.service.status()
    assert status["state"] == "failed" and "new code" in status["reason"]
    calls = world.hub.calls["enroll"]
    world.clock.advance(600)
    assert world.hub.calls["enroll"] == calls


def test_verify_is_retried_until_its_first_200_then_never_again(world: World) -> None:
    world.hub.script["verify"] = [HubError("HTTP 502", False, 502), "awaiting_approval"]
    world.hub.script["result"] = ["pending_verification"]
    world.service.enroll(request())
    assert world.state() == "pending_verification" and world.hub.calls["verify"] == 1
    world.clock.advance(2.0)
    assert world.state() == "awaiting_approval" and world.hub.calls["verify"] == 2
    world.clock.pump([10.0] * 20)
    assert world.hub.calls["verify"] == 2 and world.hub.calls["result"] > 10


def test_verify_refused_is_final(world: World) -> None:
    world.hub.script["verify"] = [
        HubError("HTTP 404 from the hub: Enrollment not found", True, 404)
    ]
    world.service.enroll(request())
    assert world.state() == "failed"
    assert "no longer knows" in world.service.status()["reason"]


@pytest.mark.parametrize(
    ("answer", "state"),
    [("rejected", "rejected"), ("expired", "failed"), (HubError("404", True, 404), "failed")],
)
def test_polling_stops_on_a_final_answer(world: World, answer: Outcome, state: str) -> None:
    world.hub.script["result"] = [answer]
    world.service.enroll(request())
    assert world.state() == state
    world.clock.advance(600)
    assert world.hub.calls["result"] == 1
    assert world.tunnels == []


def test_polling_goes_on_through_errors(world: World) -> None:
    world.hub.script["result"] = [HubError("HTTP 500", False, 500), "awaiting_approval", "approved"]
    world.service.enroll(request())
    assert world.service.status()["last_error"] == "HTTP 500"
    world.clock.advance(7.5)
    assert world.state() == "awaiting_approval"
    assert world.service.status()["last_error"] is None
    world.clock.advance(7.5)
    assert world.state() == "approved"


def test_a_restart_while_awaiting_approval_polls_without_verifying(world: World) -> None:
    world.service.enroll(request())
    assert world.state() == "awaiting_approval"
    world.hub.script["result"] = ["approved"]
    service = world.restart()
    assert service.status()["state"] == "approved"
    assert world.hub.calls == {"enroll": 1, "verify": 1, "result": 2}
    assert len(world.tunnels) == 1
    world.restart()  # an approved enrollment's tunnel is given again at each start
    assert len(world.tunnels) == 2 and world.hub.calls["result"] == 2


def test_a_restart_before_the_hub_answered_fails_it(world: World) -> None:
    world.hub.script["enroll"] = [HubError("no answer", final=False)]
    world.service.enroll(request())
    assert world.state() == "enrolling"
    world.restart()
    status = world.service.status()
    assert status["state"] == "failed"
    assert "restarted before the hub answered" in status["reason"]
    world.clock.advance(600)
    assert world.hub.calls["enroll"] == 1


def test_a_restart_with_a_challenge_verifies(world: World) -> None:
    world.hub.script["verify"] = [HubError("HTTP 503", False, 503)]
    world.service.enroll(request())
    assert world.state() == "pending_verification"
    world.hub.script["verify"] = ["awaiting_approval"]
    world.restart()
    assert world.state() == "awaiting_approval"
    assert world.hub.calls["enroll"] == 1 and world.hub.calls["verify"] == 2


def test_the_tunnel_makes_it_active_and_can_take_it_back(world: World) -> None:
    world.hub.script["result"] = ["approved"]
    world.service.enroll(request())
    world.service.tunnel_changed("connecting")
    assert world.state() == "approved"
    # Logged in with the key, a forward still refused: active, and the tunnel says so.
    world.service.tunnel_changed("forward_refused", authenticated=True)
    status = world.service.status()
    assert (status["state"], status["tunnel"]) == ("active", "forward_refused")
    world.service.tunnel_changed("up", authenticated=True)
    assert world.state() == "active" and world.service.status()["tunnel"] == "up"
    world.service.tunnel_changed("down")
    assert world.state() == "active"
    world.service.tunnel_changed("unenrolled")
    status = world.service.status()
    assert (status["state"], status["tunnel"]) == ("approved", "unenrolled")
    assert "revoked" in status["reason"]
    world.service.tunnel_changed("up")
    assert world.state() == "active" and world.service.status()["reason"] is None
    assert world.restart().status()["state"] == "active"


def test_conflicts_and_forgetting(world: World) -> None:
    world.hub.script["result"] = ["approved"]
    world.service.enroll(request())
    with pytest.raises(EnrollmentConflict):
        world.service.enroll(request())
    forgotten = world.service.forget()
    assert forgotten is not None and forgotten.state == "approved"
    assert world.tunnels[-1] is None
    assert world.state() == "not_enrolled"
    assert world.store.load_enrollment() is None
    assert not Path(world.files.private_key).exists()
    assert world.service.forget() is None


def test_a_tunnel_configured_by_hand_is_never_replaced(world: World) -> None:
    world.hub.script["result"] = ["approved"]
    world.service.enroll(request())
    world.clock.advance(1)
    assert world.state() == "approved" and len(world.tunnels) == 1
    world.service.stopService()
    world.service = world.make(tunnel_by_hand="hub.example")
    world.service.startService()
    # The stored approved enrollment does not take the tunnel over at start...
    assert len(world.tunnels) == 1 and world.state() == "approved"
    world.service.forget()
    # ...and no new enrollment starts while the options configure it.
    with pytest.raises(TunnelByHand, match=r"--tunnel-host hub\.example"):
        world.service.enroll(request())
    assert world.state() == "not_enrolled"


def test_forgetting_stops_the_polling(world: World) -> None:
    world.service.enroll(request())
    world.service.forget()
    world.clock.advance(600)
    assert world.hub.calls["result"] == 1 and world.tunnels == []


def test_states_are_the_documented_ones() -> None:
    assert set(model.STATES) == {
        "not_enrolled",
        "enrolling",
        "pending_verification",
        "awaiting_approval",
        "approved",
        "active",
        "rejected",
        "failed",
    }


# -- the store -------------------------------------------------------------------


def test_a_version_4_database_gets_the_enrollment_table(tmp_path: Path) -> None:
    path = tmp_path / "sna.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " started_at TEXT NOT NULL, last_update TEXT NOT NULL, record TEXT NOT NULL);"
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE vcenter_pins (host TEXT NOT NULL, port INTEGER NOT NULL,"
        " thumbprint TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (host, port));"
        "INSERT INTO vcenter_pins VALUES ('vc', 443, 'AA', '2026-01-01T00:00:00+00:00');"
        "PRAGMA user_version=4;"
    )
    db.close()
    store = SQLiteJobStore(FilePath(str(path)))
    assert store.load_enrollment() is None
    assert [pin.host for pin in store.load_pins()] == ["vc"]
    store.save_enrollment({"id": "a", "state": "enrolling", "x": 1})
    store.save_enrollment({"id": "b", "state": "failed", "x": 2})
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 5
    assert db.execute("SELECT id, state FROM enrollment").fetchall() == [("b", "failed")]
    db.close()
    again = SQLiteJobStore(FilePath(str(path)))
    assert again.load_enrollment() == {"id": "b", "state": "failed", "x": 2}
    again.delete_enrollment()
    assert again.load_enrollment() is None
    again.close()


# -- the hub client, without a network ----------------------------------------------


def _outcome(d: Any) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_a_call_the_hub_never_answers_times_out_and_may_be_retried() -> None:
    reactor = MemoryReactorClock()
    client = HubClient(reactor, "http://127.0.0.1:9", HubTrust(plain_http=True), timeout=15)
    seen = _outcome(ensureDeferred(client.result("hub-1")))
    assert reactor.tcpClients and reactor.tcpClients[0][:2] == ("127.0.0.1", 9)
    reactor.advance(14.9)
    assert seen == []
    reactor.advance(0.2)
    [failure] = seen
    assert isinstance(failure.value, HubError) and not failure.value.final
    assert "no answer" in failure.value.message and "within 15 s" in failure.value.message


def test_a_cancelled_call_is_a_cancel_not_a_hub_error() -> None:
    reactor = MemoryReactorClock()
    client = HubClient(reactor, "http://127.0.0.1:9", HubTrust(plain_http=True))
    d = ensureDeferred(client.enroll(CODE, "ssh-ed25519 AAAA", "n", "v", "SHA256:x"))
    seen = _outcome(d)
    d.cancel()
    [failure] = seen
    assert failure.check(CancelledError), failure


def test_an_answer_after_the_enrollment_was_forgotten_changes_nothing(world: World) -> None:
    from twisted.internet.defer import Deferred

    late: list[Deferred[str]] = []

    async def result(enrollment_id: str) -> str:
        # A call that answers even when cancelled: the answer must find nothing to change.
        d: Deferred[str] = Deferred(lambda d: d.callback("approved"))
        late.append(d)
        return await d

    world.hub.result = result  # type: ignore[method-assign]
    world.service.enroll(request())
    assert world.state() == "awaiting_approval" and late
    world.service.forget()
    assert world.state() == "not_enrolled"
    assert world.tunnels == [] and world.store.load_enrollment() is None
    world.clock.advance(600)
    assert len(late) == 1


@pytest.mark.parametrize(
    ("status", "sha_url"), [("active", True), ("approved", True), ("failed", False)]
)
def test_an_enrolled_node_without_sha_url_gets_its_tunnel_s_from_the_start(
    tmp_path: Path, status: str, sha_url: bool
) -> None:
    files = EnrollmentFiles.under(str(tmp_path))
    files.prepare()
    files.write_record({"id": "x", "status": status})
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path)])
    assert options["sha-url"] == ("http://127.0.0.1:8082" if sha_url else None)
    # An operator's own --sha-url is kept.
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--sha-url", "http://127.0.0.1:9999"])
    assert options["sha-url"] == "http://127.0.0.1:9999"
