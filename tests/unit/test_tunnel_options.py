"""The ``--tunnel-*`` options, the tunnel in makeService, and what the API and metrics say of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure

from sna.tap import Options, makeService
from sna.testing import FakeProcessReactor
from sna.tunnel.settings import TunnelSettings
from sna.tunnel.supervisor import TunnelSupervisor


@pytest.fixture
def keys(tmp_path: Path) -> tuple[str, str]:
    identity = tmp_path / "id"
    identity.write_text("not read by the options, only checked\n")
    identity.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text("[sha.example.internal]:443 ssh-ed25519 AAAA\n")
    return str(identity), str(known)


def tunnel_argv(identity: str, known: str, *more: str) -> list[str]:
    return [
        "--tunnel-host",
        "sha.example.internal",
        "--tunnel-identity",
        identity,
        "--tunnel-known-hosts",
        known,
        *more,
    ]


def test_no_tunnel_options_no_tunnel() -> None:
    options = Options()
    options.parseOptions([])
    assert options["tunnel"] is None
    assert options["sha-url"] is None


def test_tunnel_options_make_settings_and_default_the_sha_url(keys: tuple[str, str]) -> None:
    options = Options()
    options.parseOptions(
        [
            "--listen",
            "tcp:18081:interface=127.0.0.1",
            "--nbd-ports",
            "20100-20103",
            *tunnel_argv(*keys, "--tunnel-sha-api-port", "28082", "--tunnel-port", "2222"),
        ]
    )
    settings = options["tunnel"]
    assert isinstance(settings, TunnelSettings)
    assert (settings.host, settings.port, settings.user) == (
        "sha.example.internal",
        2222,
        "vma_tunnel",
    )
    assert (settings.api_port, settings.sha_api_port, settings.reverse_port) == (18081, 28082, 9081)
    assert str(settings.nbd_ports) == "20100-20103"
    assert settings.identity == keys[0] and settings.proxy_command is None
    assert options["sha-url"] == "http://127.0.0.1:28082"


def test_an_explicit_sha_url_is_kept(keys: tuple[str, str]) -> None:
    options = Options()
    options.parseOptions([*tunnel_argv(*keys), "--sha-url", "http://localhost:9999"])
    assert options["sha-url"] == "http://localhost:9999"


@pytest.mark.parametrize("left_out", ["--tunnel-host", "--tunnel-identity", "--tunnel-known-hosts"])
def test_tunnel_options_come_together(keys: tuple[str, str], left_out: str) -> None:
    argv = tunnel_argv(*keys)
    i = argv.index(left_out)
    del argv[i : i + 2]
    with pytest.raises(usage.UsageError, match=f"^{left_out} is required with "):
        Options().parseOptions(argv)


def test_an_open_identity_is_refused_in_one_line(keys: tuple[str, str]) -> None:
    Path(keys[0]).chmod(0o644)
    with pytest.raises(usage.UsageError, match=r"--tunnel-identity: .*mode 0644.*ssh refuses"):
        Options().parseOptions(tunnel_argv(*keys))


@pytest.mark.parametrize(
    "listen",
    ["tcp:8081", "tcp:8081:interface=0.0.0.0", "unix:/run/sna.sock", "tcp6:8081:interface=\\:\\:1"],
)
def test_the_reverse_forward_needs_a_loopback_tcp_api(keys: tuple[str, str], listen: str) -> None:
    with pytest.raises(usage.UsageError, match="needs the API on a loopback TCP port"):
        Options().parseOptions(["--listen", listen, *tunnel_argv(*keys)])


@pytest.mark.parametrize(
    "extra",
    [["--tunnel-port", "0"], ["--tunnel-sha-api-port", "x"], ["--tunnel-reverse-port", "70000"]],
)
def test_tunnel_ports_are_ports(keys: tuple[str, str], extra: list[str]) -> None:
    with pytest.raises(usage.UsageError, match=f"^{extra[0]} must be a port"):
        Options().parseOptions([*tunnel_argv(*keys), *extra])


def test_the_sha_api_port_is_not_an_nbd_port(keys: tuple[str, str]) -> None:
    with pytest.raises(usage.UsageError, match="--tunnel-sha-api-port must not be one of"):
        Options().parseOptions([*tunnel_argv(*keys), "--tunnel-sha-api-port", "10150"])


def result(d: Deferred[Any]) -> Any:
    """What an already fired Deferred holds (StubTreq answers at once)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _tunnel_of(service: object) -> TunnelSupervisor:
    (tunnel,) = [s for s in service if isinstance(s, TunnelSupervisor)]  # type: ignore[attr-defined]
    return tunnel


def test_make_service_always_has_a_tunnel_and_starts_ssh_only_when_configured(
    tmp_path: Path, keys: tuple[str, str]
) -> None:
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path / "a")])
    assert _tunnel_of(makeService(options, MemoryReactorClock())).state().state == "not_configured"
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path / "b"), *tunnel_argv(*keys)])
    tunnel = _tunnel_of(makeService(options, FakeProcessReactor()))
    assert tunnel.state().state == "stopped"
    assert tunnel.state().settings == options["tunnel"]


def test_routes_health_and_metrics_follow_the_tunnel(tmp_path: Path, keys: tuple[str, str]) -> None:
    from treq.testing import StubTreq

    options = Options()
    options.parseOptions(
        ["--state-dir", str(tmp_path), "--log-dir", str(tmp_path / "log"), *tunnel_argv(*keys)]
    )
    reactor = FakeProcessReactor()
    service = makeService(options, reactor)
    tunnel = _tunnel_of(service)
    from sna.tap import ApiListener

    (listener,) = [s for s in service if isinstance(s, ApiListener)]  # type: ignore[attr-defined]
    treq = StubTreq(listener.factory.resource)

    def fetch(path: str) -> bytes:
        body = result(treq.content(result(treq.get(f"http://127.0.0.1:8081{path}"))))
        assert isinstance(body, bytes)
        return body

    def get(path: str) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(fetch(path))
        return answer

    tunnel.startService()
    ((ssh, argv, env),) = reactor.spawned
    assert argv[0] == "ssh" and "SSH_AUTH_SOCK" not in env
    state = get("/api/v1/tunnel")
    assert state["state"] == "connecting" and state["host"] == "sha.example.internal"
    assert state["pid"] == ssh.pid
    assert keys[0] not in json.dumps(state) and keys[1] not in json.dumps(state)
    health = get("/api/v1/health")
    assert health["status"] == "degraded"
    assert health["tunnel"] == {
        "configured": True,
        "state": "connecting",
        "since": state["since"],
        "reason": "connecting",
        "reconnects": 0,
    }
    ssh.protocol.errReceived(
        b'Authenticated to sha.example.internal ([192.0.2.1]:443) using "publickey".\n'
        b"debug1: forwarding_success: all expected forwarding replies received\n"
    )
    health = get("/api/v1/health")
    assert health["tunnel"]["state"] == "up" and health["tunnel"]["reason"] is None
    # (The storage is not set up here: only the tunnel's part of the reason is checked.)
    assert "tunnel" not in (health["reason"] or "")
    text = fetch("/metrics").decode()
    assert "sna_tunnel_up 1.0" in text
    assert 'sna_tunnel_state{state="up"} 1.0' in text
    assert "sna_tunnel_reconnects_total 0.0" in text
    tunnel.stopService()
