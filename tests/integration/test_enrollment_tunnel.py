"""Enrollment and the tunnel together: a node enrolled from scratch runs its own tunnel.

Real parts, loopback only: ``twistd sna`` (the harness's :class:`Daemon`),
the hub double over HTTPS (``tests/integration/hub_double.py``), which on
approve appends the node's key line to the ``authorized_keys`` of Debian's
sshd (``tests/integration/sshhub.py``, in the hub's network namespace), and
the real ``ssh`` the daemon runs from the approved enrollment.

How an enrolled tunnel reaches the hub in a test, with sna unchanged.  The
tunnel of an enrollment has no ProxyCommand and forwards the production
ports: ``-L`` 10100-10200 and 8082, ``-R 127.0.0.1:9081`` to the API's
port.  So the node gets a network namespace of its own as well, as in the
reference's lab (enrollment-tunnel.md section 5, "Loopback test"): twistd
runs in it (``nsenter -n``, which execs, so the daemon's pid is twistd's)
and listens on the production 8081; every one of those ports is free there,
whatever else this machine runs.  socat bridges play the network between
the three namespaces (each connection relayed by ``nsenter -t PID -n socat``):

- node ``127.0.0.1:443`` to the hub's ``127.0.0.1:443`` (its sshd): the
  enroll request leaves ``ssh_host`` and ``ssh_port`` at their defaults,
  the hub's host (``oma_host``, 127.0.0.1) and 443;
- node ``127.0.0.1:H`` to the test's ``127.0.0.1:H``, the hub double's HTTPS
  port, so ``oma_host``/``oma_port`` are the same on both sides and the
  double's certificate (SAN ``IP:127.0.0.1``) verifies;
- the test's ``127.0.0.1:A`` to the node's ``127.0.0.1:8081``: the test's
  calls to the daemon's API (``Daemon.api``).

The hub logs the node in as root (``ssh_user`` ``root``; sshhub.py says why).
Every process is ended by pid in the fixture's finalizer, even when a test
fails: the daemon (TERM, then KILL), everything left in the node's namespace
and its holder, the bridges (each in a process group of its own), the hub
double, and the hub (:meth:`SshHub.close`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest

from tests.integration.harness import Daemon, metric, wait_for
from tests.integration.hub_double import HubDoubleProcess
from tests.integration.sshhub import REVERSE_PORT, SSH_PORT, SshHub, missing_tools
from tests.integration.test_ctl import ctl_env, run_ctl

#: The production ports, free in the node's own namespace and the hub's.
NBD_PORTS = range(10100, 10201)
SHA_API_PORT = 8082
NODE_API_PORT = 8081

ENROLL = "/api/v1/enrollment/enroll"
STATUS = "/api/v1/enrollment/status"
#: Generous: the daemon polls the hub's result every 5 to 10 s.
DEADLINE = 90.0
KEY_REFUSED = "the hub refuses the node's key (ssh: Permission denied)"


# -- the node's namespace and the bridges between namespaces ------------------------


def netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def listening(pid: int, port: int) -> bool:
    """Whether 127.0.0.1:``port`` listens in the network namespace of ``pid``."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    wanted = f"0100007F:{port:04X}"
    return any(
        fields[1] == wanted and fields[3] == "0A"  # 0A: TCP_LISTEN
        for fields in (line.split() for line in table.splitlines()[1:])
    )


def alive(pid: int) -> bool:
    """A process that exists and has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[-1].split()[:1] != [b"Z"]


def gone(pid: int) -> bool:
    """Exited and reaped by its parent: no ``/proc`` entry at all."""
    return not Path(f"/proc/{pid}").exists()


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class NodeNamespace:
    """A network namespace holding only ``lo``, for the node, and the socat bridges."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.holder: Optional[subprocess.Popen[bytes]] = None
        self.bridges: list[subprocess.Popen[bytes]] = []

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def start(self) -> NodeNamespace:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        wait_for(lambda: netns(self.pid) != netns(os.getpid()), "the node's network namespace", 10)
        self.run_inside("ip", "link", "set", "lo", "up")
        return self

    def run_inside(
        self, *argv: str, data: Optional[bytes] = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-n", *argv],
            input=data,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def bridge(self, listen_in: int, port: int, target_in: int, target_port: int) -> None:
        """Relay each connection to 127.0.0.1:``port`` in the namespace of pid ``listen_in``
        to 127.0.0.1:``target_port`` in the namespace of pid ``target_in``."""
        # socat splits its EXEC address on ':' unless escaped.
        target = f"EXEC:nsenter -t {target_in} -n socat - TCP\\:127.0.0.1\\:{target_port}"
        log = self.root / f"bridge-{port}-{len(self.bridges)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    "nsenter",
                    "-t",
                    str(listen_in),
                    "-n",
                    "socat",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                    target,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: the finalizer ends it and every child it forked.
                start_new_session=True,
            )
        self.bridges.append(process)

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the bridge on port {port} exited:\n{log.read_text()}")
            return listening(process.pid, port)

        wait_for(ready, f"the bridge on port {port} to listen", 10)

    def send(self, port: int, data: bytes) -> None:
        """Connect to the node's 127.0.0.1:``port``, write ``data``, close."""
        self.run_inside("socat", "-u", "STDIN", f"TCP:127.0.0.1:{port}", data=data)

    def get(self, url: str) -> tuple[int, bytes]:
        """GET ``url`` from the node's namespace."""
        script = (
            "import sys, urllib.request\n"
            "r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
            "sys.stdout.write(str(r.status) + '\\n')\n"
            "sys.stdout.flush()\n"
            "sys.stdout.buffer.write(r.read())\n"
        )
        code, _, body = self.run_inside(sys.executable, "-c", script, url).stdout.partition(b"\n")
        return int(code), body

    def pids(self) -> list[int]:
        """Every process in the node's namespace but the holder."""
        if self.holder is None or self.holder.poll() is not None:
            return []
        ns = netns(self.pid)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                if netns(int(entry.name)) == ns:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def ssh_pids(self) -> list[int]:
        return [pid for pid in self.pids() if comm(pid) == "ssh"]

    def close(self) -> None:
        """Kill the bridges, everything in the namespace, and its holder, by pid; never fails."""
        for process in self.bridges:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + 10
            while time.monotonic() < end and any(alive(pid) for pid in pids):
                time.sleep(0.05)
        for process in [*self.bridges, *([self.holder] if self.holder else [])]:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass


class NodeDaemon(Daemon):
    """``twistd sna`` in the node's namespace, on the production API port 8081.

    ``self.port`` is the test's end of the bridge to it, so :attr:`api` works
    as for any daemon of the harness.
    """

    def __init__(self, root: Path, node: NodeNamespace) -> None:
        self.node = node
        super().__init__(root)

    def argv(self, port: Optional[int] = None) -> list[str]:
        return ["nsenter", "-t", str(self.node.pid), "-n", *super().argv(NODE_API_PORT)]


@attrs.define
class World:
    hub: SshHub
    double: HubDoubleProcess
    node: NodeNamespace
    sna: NodeDaemon


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    missing = missing_tools()
    if missing is not None:
        pytest.skip(missing)
    hub = SshHub(tmp_path / "hub", NBD_PORTS, SHA_API_PORT)
    node = NodeNamespace(tmp_path / "node")
    double: Optional[HubDoubleProcess] = None
    sna: Optional[NodeDaemon] = None
    try:
        hub.start()
        # The fixture authorizes a key of its own: this hub knows no node until approval.
        hub.revoke()
        node.start()
        (tmp_path / "double").mkdir()
        double = HubDoubleProcess(
            str(tmp_path / "double"), authorized_keys=str(hub.authorized_keys)
        )
        node.bridge(node.pid, SSH_PORT, hub.pid, SSH_PORT)
        node.bridge(node.pid, double.port, os.getpid(), double.port)
        sna = NodeDaemon(tmp_path / "sna", node)
        node.bridge(os.getpid(), sna.port, node.pid, NODE_API_PORT)
        sna.start()
        yield World(hub, double, node, sna)
    finally:
        if sna is not None:
            sna.shutdown()
        node.close()
        if double is not None:
            double.stop()
        hub.close()
    if sna is not None:
        sna.check_no_tracebacks()


# -- talking to the daemon ----------------------------------------------------------------


def answer(sna: Daemon, path: str) -> dict[str, Any]:
    got = sna.api.get(path)
    assert got.status == 200, got
    body: dict[str, Any] = got.json()
    return body


def wait_state(sna: Daemon, path: str, *states: str) -> dict[str, Any]:
    """Poll ``path`` (the enrollment's status, or the tunnel) until its ``state`` is one of ``states``."""
    last: dict[str, Any] = {}

    def check() -> Optional[dict[str, Any]]:
        nonlocal last
        last = answer(sna, path)
        return last if last["state"] in states else None

    try:
        return wait_for(check, f"{path} to be {'/'.join(states)}", DEADLINE, 0.1)
    except pytest.fail.Exception:
        pytest.fail(f"{path} never became {'/'.join(states)}: {last}\n{sna.output()[-5000:]}")


def enroll(world: World, **overrides: Any) -> dict[str, Any]:
    """Enroll from scratch with the hub's real host key, approve on the hub, wait for ``active``."""
    double, sna = world.double, world.sna
    host_key = Path(f"{world.hub.host_key}.pub").read_text().strip()
    body: dict[str, Any] = {
        "oma_host": "127.0.0.1",
        "oma_port": double.port,
        "pairing_code": double.pairing_code(),
        "vma_name": "node 01",
        "vma_version": "1.4.0-test",
        "tls_pin_sha256": double.pin,
        "ssh_port": SSH_PORT,
        "ssh_user": "root",
        "ssh_host_key": host_key,
        **overrides,
    }
    started = sna.api.post(ENROLL, body)
    assert started.status == 202, started
    waiting = wait_state(sna, STATUS, "awaiting_approval")
    # Nothing to run before the hub approves.
    assert answer(sna, "/api/v1/tunnel")["state"] == "not_configured"
    assert not world.node.ssh_pids()
    double.approve(waiting["enrollment_id"])
    return wait_state(sna, STATUS, "active")


def check_tunnel_carries(world: World) -> dict[str, Any]:
    """The tunnel is up, and the bytes and calls it carries arrive, both ways."""
    hub, node, sna = world.hub, world.node, world.sna
    tunnel = wait_state(sna, "/api/v1/tunnel", "up")
    assert tunnel["authenticated"] is True and tunnel["pid"]
    sent = {port: f"byte for {port}".encode() for port in (NBD_PORTS.start, NBD_PORTS.stop - 1)}
    for port, payload in sent.items():
        node.send(port, payload)
    wait_for(
        lambda: all(hub.received(port) == payload for port, payload in sent.items()),
        f"the hub's NBD listeners to receive on {', '.join(map(str, sent))}",
    )
    # The hub's API through the node's 8082, as the SHA client and the health check use it.
    code, body = node.get(f"http://127.0.0.1:{SHA_API_PORT}/health")
    assert code == 200 and json.loads(body) == {"status": "healthy"}
    # The hub reaches the node's API through its own 127.0.0.1:9081.
    code, body = hub.get_inside(f"http://127.0.0.1:{REVERSE_PORT}/api/v1/health")
    assert code == 200, body
    assert json.loads(body)["tunnel"]["state"] == "up"
    health = answer(sna, "/api/v1/health")
    assert health["status"] == "healthy" and health["reason"] is None, health
    assert health["tunnel"]["state"] == "up" and health["tunnel"]["configured"] is True
    assert metric(sna, "sna_tunnel_up", missing=None) == 1
    return tunnel


# -- the tests ---------------------------------------------------------------------------


def test_enrolled_from_scratch_the_tunnel_comes_up_and_the_enrollment_is_active(
    world: World, tmp_path: Path
) -> None:
    status = enroll(world)
    # Active at the first login with the key; the tunnel's own state follows.
    assert status["reason"] is None and status["tunnel"] in ("connecting", "up"), status

    def tunnel_up() -> Optional[dict[str, Any]]:
        now = answer(world.sna, STATUS)
        return now if now["tunnel"] == "up" else None

    status = wait_for(tunnel_up, "the enrollment's status to show the tunnel up")
    # The operator's console tells the same.
    shown = run_ctl(["enrollment"], ctl_env(world.sna, tmp_path))
    assert shown.returncode == 0, shown
    assert re.search(r"^state +active since ", shown.stdout, re.M), shown.stdout
    assert f"fingerprint {status['fingerprint']}" in shown.stdout, shown.stdout
    assert re.search(r"^tunnel +up$", shown.stdout, re.M), shown.stdout
    tunnel = check_tunnel_carries(world)
    # The enrollment's tunnel, in production shape: the hub's 443 with the pinned
    # host key, every forward on its production port, no ProxyCommand.
    assert (tunnel["host"], tunnel["port"], tunnel["user"]) == ("127.0.0.1", SSH_PORT, "root")
    assert tunnel["forwards"] == {
        "count": len(NBD_PORTS) + 2,
        "nbd_ports": f"{NBD_PORTS.start}-{NBD_PORTS.stop - 1}",
        "sha_api_port": SHA_API_PORT,
        "reverse_port": REVERSE_PORT,
        "api_port": NODE_API_PORT,
    }
    directory = world.sna.state_dir / "enrollment"
    argv = Path(f"/proc/{tunnel['pid']}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("-i") + 1] == str(directory / "sha_tunnel_ed25519")
    assert f"UserKnownHostsFile={directory / 'known_hosts'}" in argv
    assert not any(arg.startswith("ProxyCommand") for arg in argv)
    # ssh's own listeners on the node's loopback: every NBD port and the hub's API port.
    forwarded = [*NBD_PORTS, SHA_API_PORT]
    assert [port for port in forwarded if not listening(world.node.pid, port)] == []
    assert "127.0.0.1:10100:127.0.0.1:10100" in argv and "127.0.0.1:8082:127.0.0.1:8082" in argv
    assert f"127.0.0.1:{REVERSE_PORT}:127.0.0.1:{NODE_API_PORT}" in argv
    host_key = Path(f"{world.hub.host_key}.pub").read_text().split()
    assert (directory / "known_hosts").read_text() == (
        f"[127.0.0.1]:{SSH_PORT} {host_key[0]} {host_key[1]}\n"
    )
    # The key ssh logged in with is the one the double installed on approve.
    installed = world.hub.authorized_keys.read_text()
    assert installed.count("\n") == 1
    assert " ".join(status["public_key"].split()[:2]) in installed
    assert installed.rstrip("\n").endswith(f"# {status['fingerprint']}")
    record = json.loads((directory / "enrollment.json").read_text())
    assert record["status"] == "active"
    # Started without --sha-url: the SHA is the one at the end of the tunnel.
    assert "the SHA is at http://127.0.0.1:8082, through the enrolled node's tunnel" in (
        world.sna.output()
    )
    calls = world.double.calls()
    assert calls["calls"]["enroll"] == 1
    assert calls["verify_by_id"] == {status["enrollment_id"]: 1}


def test_a_restart_while_active_brings_the_tunnel_back_without_the_hub(world: World) -> None:
    sna = world.sna
    status = enroll(world)
    first = wait_state(sna, "/api/v1/tunnel", "up")
    calls = world.double.calls()
    sna.stop()
    wait_for(lambda: gone(first["pid"]), "the stopped daemon's ssh to be gone", 5)
    assert not world.node.ssh_pids()
    sna.start()
    again = check_tunnel_carries(world)
    assert again["pid"] != first["pid"]
    after = answer(sna, STATUS)
    assert after["state"] == "active" and after["tunnel"] == "up"
    assert after["enrollment_id"] == status["enrollment_id"]
    assert after["fingerprint"] == status["fingerprint"]
    # From the stored enrollment alone: not one call to the hub's enrollment routes.
    assert world.double.calls() == calls
    # Started without --sha-url, the enrolled node has its SHA from the start line on.
    assert "the SHA at http://127.0.0.1:8082" in sna.output(), sna.output()[-3000:]


def test_a_revoked_key_makes_the_tunnel_unenrolled_and_the_enrollment_approved(
    world: World,
) -> None:
    sna, hub = world.sna, world.hub
    enroll(world)
    wait_state(sna, "/api/v1/tunnel", "up")
    hub.revoke()
    # A live session outlives the key's removal: end it, as a hub operator revoking must.
    hub.kill_sessions()
    tunnel = wait_state(sna, "/api/v1/tunnel", "unenrolled")
    assert "Permission denied (publickey)" in tunnel["last_error"]
    assert tunnel["authenticated"] is False
    status = wait_state(sna, STATUS, "approved")
    assert status["reason"] is not None and status["reason"].startswith(KEY_REFUSED), status
    assert status["tunnel"] == "unenrolled"
    record = json.loads((sna.state_dir / "enrollment" / "enrollment.json").read_text())
    assert record["status"] == "approved"
    health = answer(sna, "/api/v1/health")
    assert health["status"] == "degraded", health
    assert "the tunnel to the hub is not up (unenrolled)" in health["reason"]
    assert health["tunnel"]["state"] == "unenrolled"
    assert metric(sna, "sna_tunnel_up", missing=None) == 0


def test_forgetting_the_enrollment_stops_its_tunnel(world: World) -> None:
    sna, node = world.sna, world.node
    enroll(world, tls_pin_sha256=None, tls_ca_file=world.double.cert)
    tunnel = wait_state(sna, "/api/v1/tunnel", "up")
    pid = tunnel["pid"]
    assert alive(pid) and comm(pid) == "ssh"
    forgotten = sna.api.request("DELETE", "/api/v1/enrollment")
    assert forgotten.status == 200, forgotten
    assert forgotten.json()["previous_state"] == "active"
    stopped = answer(sna, "/api/v1/tunnel")
    assert stopped["configured"] is False and stopped["state"] == "not_configured"
    assert stopped["pid"] is None
    # Reaped by the daemon, not only signalled; and no other ssh runs for the node.
    wait_for(lambda: gone(pid), f"ssh {pid} to be gone")
    assert not node.ssh_pids()
    assert not any(listening(node.pid, port) for port in [*NBD_PORTS, SHA_API_PORT])
    # The hub sees the session end: its reverse port no longer reaches the node.
    wait_for(lambda: not world.hub.sessions(), "the hub's session of the node to end")
    status = answer(sna, STATUS)
    assert status["state"] == "not_enrolled"
    directory = sna.state_dir / "enrollment"
    assert not (directory / "sha_tunnel_ed25519").exists()
    assert not (directory / "known_hosts").exists()
    assert not (directory / "enrollment.json").exists()
    health = answer(sna, "/api/v1/health")
    assert health["status"] == "healthy" and health["tunnel"]["configured"] is False
    # /metrics shows the tunnel only while one is configured.
    assert "sna_tunnel_up" not in sna.api.get("/metrics").text
