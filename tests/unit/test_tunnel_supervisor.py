"""The tunnel supervisor in memory: argv, stderr classification, backoff, reaping, health.

The stderr lines are those OpenSSH 9.2p1 printed in the loopback runs this
was written from (``ssh -o LogLevel=DEBUG1`` against Debian's sshd).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import LogEvent, globalLogPublisher

from sna.config import PortRange
from sna.testing import FakeProcessReactor, FakeProcessTransport
from sna.tunnel import render, sshlog
from sna.tunnel.ports import listening_inodes, port_holder
from sna.tunnel.settings import TunnelSettings
from sna.tunnel.supervisor import (
    BACKOFF_MAX,
    LOCAL_BUSY_RETRY,
    UNENROLLED_RETRY,
    TunnelState,
    TunnelSupervisor,
    identity_problem,
    ssh_argv,
)

SETTINGS = TunnelSettings(
    host="sha.example.internal",
    identity="/etc/sna/enrollment/sha_tunnel_ed25519",
    known_hosts="/etc/sna/enrollment/known_hosts",
    api_port=8081,
)
SMALL = TunnelSettings(
    host="127.0.0.1",
    identity="/k",
    known_hosts="/kh",
    api_port=18081,
    nbd_ports=PortRange(20100, 20102),
    sha_api_port=28082,
    reverse_port=29081,
)
NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)

AUTHENTICATED = 'Authenticated to 127.0.0.1 (via proxy) using "publickey".'
READY = "debug1: forwarding_success: all expected forwarding replies received"


class Harness:
    def __init__(
        self,
        settings: Optional[TunnelSettings] = SMALL,
        health: Optional[list[bool]] = None,
        random: float = 1.0,
        dies_on: tuple[str, ...] = ("TERM", "KILL"),
    ) -> None:
        self.reactor = FakeProcessReactor(dies_on=dies_on)
        self.health_answers = health if health is not None else []
        self.health_urls: list[str] = []
        self.states: list[TunnelState] = []
        self.supervisor = TunnelSupervisor(
            self.reactor,
            settings,
            now=lambda: NOW,
            random=lambda: random,
            health=self._health,
            holder=lambda port: "pid 4242 (nbdkit)" if port == 20101 else None,
        )
        self.supervisor.subscribe(self.states.append)

    def _health(self, url: str) -> Deferred[None]:
        self.health_urls.append(url)
        ok = self.health_answers.pop(0) if self.health_answers else True
        return succeed(None) if ok else fail(ConnectionRefusedError("refused"))

    def start(self) -> Harness:
        self.supervisor.startService()
        return self

    @property
    def ssh(self) -> FakeProcessTransport:
        return self.reactor.spawned[-1][0]

    def say(self, *lines: str) -> None:
        self.ssh.protocol.errReceived("".join(line + "\r\n" for line in lines).encode())

    def up(self) -> None:
        self.say(AUTHENTICATED, READY)

    @property
    def state(self) -> TunnelState:
        return self.supervisor.state()


def test_the_argv_is_the_reference_command_with_explicit_forwards() -> None:
    argv = ssh_argv(SETTINGS)
    assert argv[:9] == [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        "/etc/sna/enrollment/sha_tunnel_ed25519",
        "-p",
        "443",
        "-N",
        "-T",
    ]
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert options == [
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/etc/sna/enrollment/known_hosts",
        "GlobalKnownHostsFile=/dev/null",
        "ExitOnForwardFailure=yes",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        "ConnectTimeout=10",
        "LogLevel=DEBUG1",
    ]
    local = [argv[i + 1] for i, a in enumerate(argv) if a == "-L"]
    assert len(local) == 102
    assert local[0] == "127.0.0.1:10100:127.0.0.1:10100"
    assert local[100] == "127.0.0.1:10200:127.0.0.1:10200"
    assert local[101] == "127.0.0.1:8082:127.0.0.1:8082"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-R"] == [
        "127.0.0.1:9081:127.0.0.1:8081"
    ]
    assert argv[-4:] == ["-l", "vma_tunnel", "--", "sha.example.internal"]
    assert not any(a.startswith("ProxyCommand") for a in argv)


def test_a_proxy_command_is_one_option_and_shifted_ports_keep_the_shape() -> None:
    settings = TunnelSettings(
        host="127.0.0.1",
        identity="/k",
        known_hosts="/kh",
        api_port=18081,
        nbd_ports=PortRange(20100, 20101),
        sha_api_port=28082,
        reverse_port=29081,
        proxy_command="nsenter -t 42 -n socat - TCP:127.0.0.1:%p",
    )
    argv = ssh_argv(settings)
    assert "ProxyCommand=nsenter -t 42 -n socat - TCP:127.0.0.1:%p" in argv
    assert [a for i, a in enumerate(argv) if i and argv[i - 1] in ("-L", "-R")] == [
        "127.0.0.1:20100:127.0.0.1:20100",
        "127.0.0.1:20101:127.0.0.1:20101",
        "127.0.0.1:28082:127.0.0.1:28082",
        "127.0.0.1:29081:127.0.0.1:18081",
    ]


def test_ssh_gets_a_minimal_environment_and_no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    h = Harness().start()
    _, argv, env = h.reactor.spawned[0]
    assert argv == ssh_argv(SMALL)
    assert "SSH_AUTH_SOCK" not in env
    assert set(env) == {"PATH", "LC_ALL"}
    assert h.ssh.stdin_closed


def test_up_once_every_forward_is_granted_and_subscribers_hear_of_the_login() -> None:
    h = Harness().start()
    assert h.state.state == "connecting"
    h.say(AUTHENTICATED)
    assert h.state.state == "connecting" and h.state.authenticated
    assert h.states[-1].authenticated
    h.say(READY)
    assert h.state.state == "up" and h.state.pid == h.ssh.pid
    assert h.state.problem() is None
    assert [s.state for s in h.states] == ["connecting", "connecting", "up"]


def test_not_configured_without_settings_and_use_starts_and_stops() -> None:
    h = Harness(settings=None).start()
    assert h.state.state == "not_configured" and h.reactor.spawned == []
    assert h.state.problem() is None
    h.supervisor.use(SMALL)
    assert h.state.state == "connecting" and len(h.reactor.spawned) == 1
    first = h.ssh
    h.supervisor.use(None)
    assert first.signals == ["TERM"]
    assert h.state.state == "not_configured" and h.state.pid is None
    assert len(h.reactor.spawned) == 1


def test_new_settings_reap_the_old_ssh_before_the_new_one_starts() -> None:
    h = Harness(dies_on=("KILL",)).start()
    old = h.ssh
    other = TunnelSettings(
        host="127.0.0.2",
        identity="/k",
        known_hosts="/kh",
        api_port=18081,
        nbd_ports=SMALL.nbd_ports,
    )
    reaped = h.supervisor.use(other)
    # TERM is ignored: nothing new while the old one lives, KILL after the grace.
    assert old.signals == ["TERM"] and len(h.reactor.spawned) == 1
    assert not reaped.called
    h.reactor.advance(5)
    assert old.signals == ["TERM", "KILL"]
    assert reaped.called
    assert len(h.reactor.spawned) == 2 and h.reactor.spawned[1][1][-1] == "127.0.0.2"
    assert h.state.reconnects == 0


def test_a_plain_failure_backs_off_from_2_to_60_seconds_with_jitter() -> None:
    h = Harness(random=1.0).start()
    delays = []
    for _ in range(7):
        h.say("kex_exchange_identification: Connection closed by remote host")
        h.ssh.exit(255)
        assert h.state.state == "down"
        assert h.state.last_error == (
            "ssh exited with 255: kex_exchange_identification: Connection closed by remote host"
        )
        (call,) = h.reactor.getDelayedCalls()
        delays.append(call.getTime() - h.reactor.seconds())
        h.reactor.advance(delays[-1])
    assert delays == [2, 4, 8, 16, 32, 60, 60]
    assert h.state.reconnects == 7 and len(h.reactor.spawned) == 8
    # Up again: the next failure starts from 2 s once more.
    h.up()
    h.ssh.exit(255)
    (call,) = h.reactor.getDelayedCalls()
    assert call.getTime() - h.reactor.seconds() == 2


def test_jitter_comes_from_the_injected_random() -> None:
    h = Harness(random=0.0).start()
    h.ssh.exit(255)
    (call,) = h.reactor.getDelayedCalls()
    assert call.getTime() - h.reactor.seconds() == 1.0
    assert BACKOFF_MAX == 60


def test_a_changed_host_key_stops_without_retrying() -> None:
    h = Harness().start()
    h.say(
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
        "The fingerprint for the ED25519 key sent by the remote host is",
        "SHA256:F8kvGOtW+4PkbdKl0U48shp/YYT9bAnwi27em+wkQsc.",
        "Host key for [127.0.0.1]:443 has changed and you have requested strict checking.",
        "Host key verification failed.",
    )
    h.ssh.exit(255)
    assert h.state.state == "host_key_mismatch"
    assert "not the one pinned in /kh" in (h.state.last_error or "")
    assert h.reactor.getDelayedCalls() == []
    h.reactor.advance(3600)
    assert len(h.reactor.spawned) == 1
    assert h.state.problem() is not None


def test_no_pinned_key_is_a_host_key_problem_too() -> None:
    h = Harness().start()
    h.say(
        "No ED25519 host key is known for [127.0.0.1]:443 and you have requested strict checking.",
        "Host key verification failed.",
    )
    h.ssh.exit(255)
    assert h.state.state == "host_key_mismatch"
    assert h.state.last_error == "no host key is pinned for [127.0.0.1]:443 in /kh"
    assert h.reactor.getDelayedCalls() == []


def test_permission_denied_is_unenrolled_and_retried_slowly() -> None:
    h = Harness().start()
    h.say("root@127.0.0.1: Permission denied (publickey).")
    h.ssh.exit(255)
    assert h.state.state == "unenrolled"
    assert "Permission denied (publickey)" in (h.state.last_error or "")
    (call,) = h.reactor.getDelayedCalls()
    assert call.getTime() - h.reactor.seconds() == UNENROLLED_RETRY
    h.reactor.advance(UNENROLLED_RETRY)
    assert len(h.reactor.spawned) == 2 and h.state.reconnects == 1


def test_a_busy_local_port_is_named_with_its_holder() -> None:
    h = Harness().start()
    h.say(
        AUTHENTICATED,
        "bind [127.0.0.1]:20101: Address already in use",
        "channel_setup_fwd_listener_tcpip: cannot listen to port: 20101",
        "Could not request local forwarding.",
    )
    h.ssh.exit(255)
    assert h.state.state == "local_port_busy"
    assert h.state.last_error == (
        "port 127.0.0.1:20101 of the node is already in use by pid 4242 (nbdkit); "
        "ssh cannot listen there"
    )
    (call,) = h.reactor.getDelayedCalls()
    assert call.getTime() - h.reactor.seconds() == LOCAL_BUSY_RETRY


def test_a_busy_reverse_port_on_the_hub_is_retried_in_10_to_20_seconds() -> None:
    for random, delay in ((0.0, 10.0), (1.0, 20.0)):
        h = Harness(random=random).start()
        h.say(AUTHENTICATED, "Error: remote port forwarding failed for listen port 29081")
        h.ssh.exit(255)
        assert h.state.state == "remote_port_busy"
        assert "127.0.0.1:29081" in (h.state.last_error or "")
        (call,) = h.reactor.getDelayedCalls()
        assert call.getTime() - h.reactor.seconds() == delay


def test_a_prohibited_channel_names_its_port_and_a_refused_connect_is_normal() -> None:
    h = Harness().start()
    h.up()
    h.say(
        "debug1: Connection to port 20101 forwarding to 127.0.0.1 port 20101 requested.",
        "debug1: channel 4: new direct-tcpip [direct-tcpip] (inactive timeout: 0)",
        "channel 4: open failed: connect failed: Connection refused",
        "debug1: channel 4: free: direct-tcpip: listening port 20101 for 127.0.0.1 port 20101, "
        "connect from 127.0.0.1 port 50000 to 127.0.0.1 port 20101, nchannels 5",
    )
    assert h.state.state == "up" and h.state.refused_ports == ()
    h.say(
        "debug1: Connection to port 20102 forwarding to 127.0.0.1 port 20102 requested.",
        "debug1: channel 4: new direct-tcpip [direct-tcpip] (inactive timeout: 0)",
        "channel 4: open failed: administratively prohibited: open failed",
        "debug1: channel 4: free: direct-tcpip: listening port 20102 for 127.0.0.1 port 20102, "
        "connect from 127.0.0.1 port 50002 to 127.0.0.1 port 20102, nchannels 5",
    )
    assert h.state.state == "forward_refused"
    assert h.state.refused_ports == (20102,)
    assert "port 20102 (administratively prohibited)" in (h.state.last_error or "")
    assert h.supervisor.down_reason("127.0.0.1", 20102) is not None
    assert h.supervisor.down_reason("127.0.0.1", 20100) is None
    assert len(h.reactor.spawned) == 1  # ssh is kept: the other forwards work
    # Once the hub lets one through (its policy was fixed), the port is cleared.
    h.say(
        "debug1: Connection to port 20102 forwarding to 127.0.0.1 port 20102 requested.",
        "debug1: channel 3: new direct-tcpip [direct-tcpip] (inactive timeout: 0)",
        "debug1: channel 3: free: direct-tcpip: listening port 20102 for 127.0.0.1 port 20102, "
        "connect from 127.0.0.1 port 50004 to 127.0.0.1 port 20102, nchannels 5",
    )
    assert h.state.state == "up" and h.state.refused_ports == ()


def test_health_every_30_s_and_two_failures_restart_ssh() -> None:
    h = Harness(health=[True, False, False]).start()
    h.up()
    first = h.ssh
    h.reactor.advance(30)
    assert h.health_urls == ["http://127.0.0.1:28082/health"]
    h.reactor.advance(30)
    assert h.state.state == "up" and first.signals == []
    h.reactor.advance(30)
    assert first.signals == ["TERM"]
    assert h.state.reconnects == 1
    assert "did not answer through the tunnel 2 times in a row" in (h.state.last_error or "")
    assert len(h.reactor.spawned) == 2 and h.state.state == "connecting"


def test_one_health_failure_is_forgiven_by_a_success() -> None:
    h = Harness(health=[False, True, False, True]).start()
    h.up()
    h.reactor.advance(30 * 4)
    assert len(h.reactor.spawned) == 1 and h.state.state == "up"


def test_stopping_the_service_reaps_ssh_and_does_not_respawn() -> None:
    h = Harness().start()
    h.up()
    ssh = h.ssh
    stopped = h.supervisor.stopService()
    assert ssh.signals == ["TERM"] and stopped.called
    assert h.state.state == "stopped"
    h.reactor.advance(3600)
    assert len(h.reactor.spawned) == 1


def test_down_reason_only_for_the_ports_it_forwards_while_not_up() -> None:
    h = Harness().start()
    h.ssh.exit(255)
    assert h.supervisor.down_reason("127.0.0.1", 20100) == "ssh exited with 255"
    assert h.supervisor.down_reason("127.0.0.1", 28082) is not None
    assert h.supervisor.down_reason("127.0.0.1", 20103) is None
    assert h.supervisor.down_reason("10.0.0.5", 20100) is None
    assert Harness(settings=None).start().supervisor.down_reason("127.0.0.1", 20100) is None


def test_stderr_lines_are_logged_as_text_and_debug_lines_are_not() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness().start()
        h.say("debug1: Reading configuration data /dev/null", AUTHENTICATED)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e["line"] for e in events if "line" in e]
    assert lines == [AUTHENTICATED]
    assert all(isinstance(line, str) for line in lines)


def test_render_shows_no_paths_of_keys() -> None:
    h = Harness().start()
    h.up()
    full = render.full(h.state)
    assert full["state"] == "up" and full["forwards"]["count"] == 5
    assert "/k" not in repr(full) and "/kh" not in repr(full)
    assert render.full(None)["configured"] is False
    assert render.summary(h.state)["reason"] is None


def test_sshlog_ignores_lines_that_mean_nothing() -> None:
    assert sshlog.parse("Transferred: sent 3688, received 3232 bytes, in 7.8 seconds") is None
    assert sshlog.parse("debug1: channel 0: new port-listener [port listener]") is None


def test_identity_must_be_a_private_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    assert "cannot read" in (identity_problem(str(key)) or "")
    key.write_text("x")
    key.chmod(0o644)
    assert "mode 0644" in (identity_problem(str(key)) or "")
    key.chmod(0o600)
    assert identity_problem(str(key)) is None


def test_the_holder_of_a_listening_port_is_found_in_proc() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listening_inodes(port)
        assert (
            port_holder(port)
            == f"pid {os.getpid()} ({Path('/proc/self/comm').read_text().strip()})"
        )
    assert port_holder(port) is None


def test_a_probe_failure_blames_a_tunnel_that_is_down() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from sna.nbd.gateway import NbdGateway
    from sna.nbd.relay import RelayRegistry

    @attrs.frozen
    class Target:
        disk_key: str
        host: str
        port: int
        export: str

    h = Harness().start()
    h.ssh.exit(255)
    reactor = MemoryReactorClock()
    gateway = NbdGateway(reactor, RelayRegistry(), tunnel_down=h.supervisor.down_reason)
    probing = gateway.probe(
        [Target("2000", "127.0.0.1", 20100, "vm-disk0"), Target("2001", "127.0.0.1", 30000, "x")],
        1.0,
    )
    reactor.advance(2)
    answers: list[Any] = []
    probing.addCallback(answers.append)
    (results,) = answers
    blamed, other = (r.error for r in results)
    assert blamed.reason == other.reason == "timeout"
    assert blamed.message.startswith("the tunnel to the hub is down (ssh exited with 255); ")
    assert "tunnel" not in other.message
