"""The supervised SSH tunnel end to end: real twistd, real ssh, Debian's sshd as the hub.

The hub runs in a network namespace of the test's own and the node on this
machine's loopback with shifted ports (tests/integration/sshhub.py says why).
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.integration.harness import Daemon, metric, targets, wait_for
from tests.integration.sshhub import REVERSE_PORT, SshHub, missing_tools
from tests.integration.test_ctl import ctl_env, run_ctl

#: How many NBD ports the shifted tests forward.
SMALL_RANGE = 4
TUNNEL_DEADLINE = 60.0


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> tuple[range, int]:
    """``count`` consecutive free loopback ports for NBD, and one more for the hub's API."""
    for _ in range(200):
        base = random.randrange(21000, 29000)
        wanted = range(base, base + count + 1)
        if all(_free(port) for port in wanted):
            return range(base, base + count), base + count
    pytest.fail("no free range of loopback ports for the tunnel's forwards")


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., SshHub]]:
    missing = missing_tools()
    if missing is not None:
        pytest.skip(missing)
    hubs: list[SshHub] = []

    def make(nbd_ports: range, sha_api_port: int, permit_nbd: bool = True) -> SshHub:
        hub = SshHub(tmp_path / f"hub{len(hubs)}", nbd_ports, sha_api_port, permit_nbd)
        hubs.append(hub)
        return hub.start()

    yield make
    for hub in hubs:
        hub.close()


def tunnel_options(hub: SshHub) -> tuple[str, ...]:
    return (
        "--nbd-ports",
        f"{hub.nbd_ports.start}-{hub.nbd_ports.stop - 1}",
        "--tunnel-host",
        "127.0.0.1",
        "--tunnel-user",
        "root",
        "--tunnel-identity",
        str(hub.node_key),
        "--tunnel-known-hosts",
        str(hub.known_hosts),
        "--tunnel-sha-api-port",
        str(hub.sha_api_port),
        "--tunnel-reverse-port",
        str(REVERSE_PORT),
        "--tunnel-proxy-command",
        hub.proxy_command,
    )


def tunnel(daemon: Daemon) -> dict[str, Any]:
    answer = daemon.api.get("/api/v1/tunnel")
    assert answer.status == 200, answer
    state: dict[str, Any] = answer.json()
    return state


def wait_state(daemon: Daemon, *states: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        nonlocal last
        last = tunnel(daemon)
        return last if last["state"] in states else None

    try:
        return wait_for(check, f"the tunnel to be {'/'.join(states)}", TUNNEL_DEADLINE, 0.1)
    except pytest.fail.Exception:
        pytest.fail(
            f"the tunnel never became {'/'.join(states)}: {last}\n{daemon.output()[-4000:]}"
        )


def send(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)


def spawn_lines(daemon: Daemon) -> list[str]:
    return re.findall(r"tunnel: ssh \d+ to .*", daemon.output())


def check_up_end_to_end(daemon: Daemon, hub: SshHub, ports: list[int]) -> None:
    state = wait_state(daemon, "up")
    assert state["authenticated"] is True and state["pid"]
    for port in ports:
        payload = f"byte for {port}".encode()
        send(port, payload)
        wait_for(
            lambda port=port, payload=payload: hub.received(port) == payload or None,
            f"the hub to receive on {port}",
        )
    # The hub reaches the node's API through its own 127.0.0.1:9081.
    code, body = hub.get_inside(f"http://127.0.0.1:{REVERSE_PORT}/api/v1/health")
    assert code == 200
    health = json.loads(body)
    assert health["status"] == "healthy" and health["tunnel"]["state"] == "up"
    assert metric(daemon, "sna_tunnel_up", missing=None) == 1


# -- the tests -----------------------------------------------------------------


def test_tunnel_up_carries_nbd_bytes_and_the_hub_reaches_the_api(
    hub_factory: Callable[..., SshHub], daemon_factory: Callable[..., Daemon]
) -> None:
    nbd, api = free_ports(SMALL_RANGE)
    hub = hub_factory(nbd, api)
    daemon = daemon_factory(extra=tunnel_options(hub))
    check_up_end_to_end(daemon, hub, [nbd.start, nbd.stop - 1])
    state = tunnel(daemon)
    assert state["forwards"] == {
        "count": SMALL_RANGE + 2,
        "nbd_ports": f"{nbd.start}-{nbd.stop - 1}",
        "sha_api_port": api,
        "reverse_port": REVERSE_PORT,
        "api_port": daemon.port,
    }
    # ssh's argv names no secret: only paths and forwards.
    argv = Path(f"/proc/{state['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"-F" in argv and f"127.0.0.1:{nbd.start}:127.0.0.1:{nbd.start}".encode() in argv
    assert b"127.0.0.1:9081:127.0.0.1:" + str(daemon.port).encode() in argv
    # With no --sha-url, the SHA is the tunnel's forwarded API.
    assert f"the SHA at http://127.0.0.1:{api}" in daemon.output()


# All 101 + 1 production forwards (10100-10200, 8082) and 9081, with the node in a
# network namespace of its own so that nothing else on this machine holds them:
# tests/integration/test_enrollment_tunnel.py.


def test_sshd_killed_and_restarted_reconnects(
    hub_factory: Callable[..., SshHub], daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    nbd, api = free_ports(SMALL_RANGE)
    hub = hub_factory(nbd, api)
    daemon = daemon_factory(extra=tunnel_options(hub))
    first = wait_state(daemon, "up")
    assert first["reconnects"] == 0
    hub.stop_sshd()
    down = wait_state(daemon, "down")
    assert down["last_error"].startswith("ssh exited")
    health = daemon.api.get("/api/v1/health").json()
    assert health["status"] == "degraded" and "the tunnel to the hub is not up" in health["reason"]
    assert metric(daemon, "sna_tunnel_up", missing=None) == 0
    # The operator's console says so too, and fails the check.
    told = run_ctl(["health"], ctl_env(daemon, tmp_path))
    assert told.returncode == 1, told
    assert re.search(r"^tunnel    down since \S+: ssh exited", told.stdout, re.M), told.stdout
    shown = run_ctl(["tunnel"], ctl_env(daemon, tmp_path))
    assert shown.returncode == 1, shown
    assert re.search(r"^state +down since ", shown.stdout, re.M), shown.stdout
    assert re.search(r"^error +ssh exited", shown.stdout, re.M), shown.stdout
    hub.start_sshd()
    again = wait_state(daemon, "up")
    assert again["reconnects"] >= 1 and again["pid"] != first["pid"]
    shown = run_ctl(["tunnel"], ctl_env(daemon, tmp_path))
    assert shown.returncode == 0, shown
    assert re.search(rf"^ssh pid +{again['pid']}$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^logged in +yes$", shown.stdout, re.M), shown.stdout
    assert metric(daemon, "sna_tunnel_reconnects_total", missing=None) >= 1
    send(nbd.start, b"after the restart")
    wait_for(lambda: hub.received(nbd.start) == b"after the restart" or None, "bytes after")


def test_a_wrong_host_key_stops_and_says_why(
    hub_factory: Callable[..., SshHub], daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    nbd, api = free_ports(SMALL_RANGE)
    hub = hub_factory(nbd, api)
    impostor = tmp_path / "impostor"
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    hub.pin(impostor)
    daemon = daemon_factory(extra=tunnel_options(hub))
    state = wait_state(daemon, "host_key_mismatch")
    assert "not the one pinned" in state["last_error"] and state["pid"] is None
    # No respawn loop: the first backoff (2 s) passes and no new ssh starts.
    time.sleep(3)
    assert len(spawn_lines(daemon)) == 1
    assert tunnel(daemon)["state"] == "host_key_mismatch"
    # A backup to a forwarded port is refused naming the tunnel as the reason.
    answer = daemon.api.post(
        "/api/v1/backup/start",
        {
            "job_id": "it-tunnel-hostkey-1",
            "vm_name": "pgtest1",
            "vcenter_host": "vcenter.example.local",
            "vcenter_user": "administrator@vsphere.local",
            "vcenter_password": "vc-password-not-secret",
            "vm_path": "/DC1/vm/pgtest1",
            "backup_type": "full",
            "nbd_targets": targets([nbd.start], export="pgtest1"),
        },
    )
    assert answer.status in (502, 503), answer
    (target,) = answer.json()["targets"]
    assert target["message"].startswith("the tunnel to the hub is down (")


def test_a_revoked_key_is_unenrolled(
    hub_factory: Callable[..., SshHub], daemon_factory: Callable[..., Daemon]
) -> None:
    nbd, api = free_ports(SMALL_RANGE)
    hub = hub_factory(nbd, api)
    daemon = daemon_factory(extra=tunnel_options(hub))
    wait_state(daemon, "up")
    hub.revoke()
    # A live session survives the removal: end it, as a hub operator revoking must.
    hub.kill_sessions()
    state = wait_state(daemon, "unenrolled")
    assert "Permission denied (publickey)" in state["last_error"]
    assert state["authenticated"] is False
    health = daemon.api.get("/api/v1/health").json()
    assert health["tunnel"]["state"] == "unenrolled" and health["status"] == "degraded"


def test_a_hub_that_does_not_permit_the_nbd_ports_is_reported_per_port(
    hub_factory: Callable[..., SshHub], daemon_factory: Callable[..., Daemon]
) -> None:
    nbd, api = free_ports(SMALL_RANGE)
    hub = hub_factory(nbd, api, permit_nbd=False)
    daemon = daemon_factory(extra=tunnel_options(hub))
    wait_state(daemon, "up")
    port = nbd.start + 1
    send(port, b"refused")
    state = wait_state(daemon, "forward_refused")
    assert state["refused_ports"] == [port]
    assert f"port {port} (administratively prohibited)" in state["last_error"]
    assert hub.received(port) == b""
    health = daemon.api.get("/api/v1/health").json()
    assert health["status"] == "degraded" and f"port {port}" in health["reason"]


def test_a_busy_local_port_is_named(
    hub_factory: Callable[..., SshHub], daemon_factory: Callable[..., Daemon]
) -> None:
    nbd, api = free_ports(SMALL_RANGE)
    hub = hub_factory(nbd, api)
    busy = nbd.start + 2
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        daemon = daemon_factory(extra=tunnel_options(hub))
        state = wait_state(daemon, "local_port_busy")
    assert f"port 127.0.0.1:{busy} of the node is already in use by pid " in state["last_error"]


# -- the health check's HTTP call, on the real reactor --------------------------


@pytest_twisted.ensureDeferred
async def test_the_health_check_needs_a_2xx_answer_in_time() -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from sna.tunnel.supervisor import http_health

    class Answer(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            if request.path == b"/health":
                return b'{"status":"healthy"}'
            request.setResponseCode(500)
            return b"{}"

    port = reactor.listenTCP(0, Site(Answer()), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        number = port.getHost().port
        await http_health(reactor, f"http://127.0.0.1:{number}/health", 5)
        with pytest.raises(RuntimeError, match="answered 500"):
            await http_health(reactor, f"http://127.0.0.1:{number}/other", 5)
    finally:
        await port.stopListening()
    with pytest.raises(Exception, match="refused"):
        await http_health(reactor, f"http://127.0.0.1:{number}/health", 5)
