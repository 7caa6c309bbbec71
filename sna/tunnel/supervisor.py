"""The supervised ``ssh`` that carries the node's tunnel to its hub.

:class:`TunnelSupervisor` runs one real ``ssh`` child at a time, built from
:class:`~sna.tunnel.settings.TunnelSettings` (explicit argv, no shell, no
agent, a minimal environment), reads its stderr into states an operator can
act on, backs off between attempts, and checks the tunnel end to end: once
ssh is up, the hub's ``/health`` through the forwarded API port every 30 s.
An old ssh is always reaped (TERM, then KILL after a grace) before a new
one is spawned: its listeners would make the new one's binds fail.

States (``TunnelState.state``):

``not_configured``     no settings: the node has no tunnel (yet).
``stopped``            settings, but the daemon is not running the tunnel.
``connecting``         ssh runs and has not yet bound and been granted every forward.
``up``                 every forward is in place and the hub answers.
``down``               ssh ended or the hub stopped answering; retried with backoff, 2 to 60 s.
``host_key_mismatch``  the hub's host key is not the pinned one: not retried, an operator must look.
``unenrolled``         the hub refused the node's key (not installed, or revoked): retried every 5 min.
``forward_refused``    ssh is up but the hub's policy refused a forward (``refused_ports``).
``remote_port_busy``   the hub would not listen on the reverse port: a stale session, another
                       node, or its PermitListen; retried every 10 to 20 s.
``local_port_busy``    a forwarded port is taken on the node's loopback: retried every 2 min.
"""

from __future__ import annotations

import os
import random as random_module
import stat
from collections.abc import Callable
from datetime import datetime
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.tunnel import sshlog
from sna.tunnel.ports import port_holder
from sna.tunnel.settings import TunnelSettings

log = Logger()

#: Every state a tunnel can be in (the label values of ``sna_tunnel_state``).
STATES = (
    "not_configured",
    "stopped",
    "connecting",
    "up",
    "down",
    "host_key_mismatch",
    "unenrolled",
    "forward_refused",
    "remote_port_busy",
    "local_port_busy",
)

#: Backoff after a plain failure: doubling from the first to the last, with jitter.
BACKOFF_FIRST = 2.0
BACKOFF_MAX = 60.0
#: A key the hub does not accept stays so until an operator installs it.
UNENROLLED_RETRY = 300.0
#: A stale session on the hub holds the reverse port until its ClientAlive fires.
REMOTE_BUSY_RETRY = (10.0, 20.0)
#: Another program holds a forwarded port of the node: it may take a while to go.
LOCAL_BUSY_RETRY = 120.0
HEALTH_INTERVAL = 30.0
HEALTH_TIMEOUT = 10.0
#: Failed health checks in a row that restart the tunnel.
HEALTH_FAILURES = 2
#: Seconds between TERM and KILL for an ssh that must go.
KILL_GRACE = 5.0
#: What ssh is given: no agent socket, no user config, English messages.
SSH_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}


@attrs.frozen
class TunnelState:
    """What the tunnel is doing now: for the API, health, metrics and the enrollment."""

    state: str
    since: datetime
    last_error: Optional[str]
    #: ssh processes started again after a failure or a failed health check.
    reconnects: int
    host: Optional[str]
    port: Optional[int]
    user: Optional[str]
    #: How many ``-L`` and ``-R`` forwards the ssh asks for.
    forwards: int
    pid: Optional[int]
    #: Whether the current ssh authenticated to the hub (its key is installed there).
    authenticated: bool = False
    #: Local ports whose connections the hub's policy refused, until one gets through.
    refused_ports: tuple[int, ...] = ()
    settings: Optional[TunnelSettings] = None

    @property
    def configured(self) -> bool:
        return self.settings is not None

    @property
    def up(self) -> bool:
        return self.state == "up"

    def problem(self) -> Optional[str]:
        """Why a configured tunnel is not fully up, in a sentence; None when it is (or none is)."""
        if self.settings is None or self.up:
            return None
        why = self.last_error or self.state.replace("_", " ")
        return f"the tunnel to the hub is not up ({self.state}): {why}"


def forward_arguments(settings: TunnelSettings) -> list[str]:
    """The ``-L``/``-R`` arguments: explicit 127.0.0.1 on both sides, as the hub compares them."""
    args: list[str] = []
    local = [*range(settings.nbd_ports.low, settings.nbd_ports.high + 1), settings.sha_api_port]
    for port in local:
        args += ["-L", f"127.0.0.1:{port}:127.0.0.1:{port}"]
    args += ["-R", f"127.0.0.1:{settings.reverse_port}:127.0.0.1:{settings.api_port}"]
    return args


def ssh_options(settings: TunnelSettings) -> list[str]:
    """The ``-o`` options, in order: the reference's command (enrollment-tunnel.md §5)."""
    options = [
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "StrictHostKeyChecking=yes",
        f"UserKnownHostsFile={settings.known_hosts}",
        "GlobalKnownHostsFile=/dev/null",
        "ExitOnForwardFailure=yes",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
        "ConnectTimeout=10",
        # DEBUG1, not VERBOSE: a refused channel names its port only there (sshlog).
        "LogLevel=DEBUG1",
    ]
    if settings.proxy_command is not None:
        options.append(f"ProxyCommand={settings.proxy_command}")
    return options


def ssh_argv(settings: TunnelSettings, ssh: str = "ssh") -> list[str]:
    """The whole ssh command line: nothing secret in it, only paths and ports."""
    argv = [ssh, "-F", "/dev/null", "-i", settings.identity, "-p", str(settings.port), "-N", "-T"]
    for option in ssh_options(settings):
        argv += ["-o", option]
    argv += forward_arguments(settings)
    argv += ["-l", settings.user, "--", settings.host]
    return argv


def forwarded_ports(settings: TunnelSettings) -> set[int]:
    """The node's loopback ports the tunnel listens on."""
    return {*range(settings.nbd_ports.low, settings.nbd_ports.high + 1), settings.sha_api_port}


def identity_problem(path: str) -> Optional[str]:
    """Why ssh would not use the private key at ``path``, or None."""
    try:
        status = os.stat(path)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    if not stat.S_ISREG(status.st_mode):
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by the daemon's user"
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        # OpenSSH's own rule (sshkey_perm_ok): "UNPROTECTED PRIVATE KEY FILE".
        return (
            f"{path} can be read by others than its owner (mode {mode:04o}); "
            f"ssh refuses such a key (chmod 600 {path})"
        )
    return None


async def http_health(reactor: Any, url: str, timeout: float) -> None:
    """GET ``url`` through the tunnel; fails unless the hub answers 2xx in time."""
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, connectTimeout=timeout, pool=pool)
    response = await treq.request("GET", url, agent=agent, timeout=timeout)
    await treq.content(response)
    if not 200 <= response.code < 300:
        raise RuntimeError(f"{url} answered {response.code}")


class _SshProtocol(ProcessProtocol):
    """Hands each line of ssh's stderr, and its end, to the supervisor."""

    def __init__(self, supervisor: TunnelSupervisor) -> None:
        self._supervisor = supervisor
        self._buffer = b""
        self.stopping = False
        self.authenticated = False
        self.ready = False
        #: What the stderr said went wrong, as (state, message, delay or None to stop).
        self.problem: Optional[tuple[str, str, Optional[float]]] = None
        self.last_line: Optional[str] = None
        self.ended: list[Deferred[None]] = []
        self.kill: Optional[IDelayedCall] = None
        self.pid: Optional[int] = None
        #: The port of the last local connection, and each open channel's port.
        self.arriving: Optional[int] = None
        self.channels: dict[int, int] = {}
        self.failed_channels: set[int] = set()
        self.host_key_changed: Optional[bool] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        pass  # ssh -N writes nothing there

    def errReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > 65536:  # not a line ssh writes: do not hold it all
            lines.append(self._buffer)
            self._buffer = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line:
                self._supervisor._line(self, line)

    def processEnded(self, reason: Failure) -> None:
        if self._buffer:
            self.errReceived(b"\n")
        self._supervisor._ended(self, reason)


class TunnelSupervisor(Service):
    """Keeps one ssh to the hub running for the settings it was last given."""

    name = "tunnel"

    def __init__(
        self,
        reactor: Any,
        settings: Optional[TunnelSettings] = None,
        *,
        now: Callable[[], datetime],
        ssh: str = "ssh",
        random: Callable[[], float] = random_module.random,
        health: Optional[Callable[[str], Deferred[None]]] = None,
        health_interval: float = HEALTH_INTERVAL,
        kill_grace: float = KILL_GRACE,
        holder: Callable[[int], Optional[str]] = port_holder,
    ) -> None:
        self._reactor = reactor
        self._process_reactor: IReactorProcess = reactor
        self._clock: IReactorTime = reactor
        self._settings = settings
        self._now = now
        self._ssh = ssh
        self._random = random
        self._health = health or (
            lambda url: Deferred.fromCoroutine(http_health(reactor, url, HEALTH_TIMEOUT))
        )
        self._health_interval = health_interval
        self._kill_grace = kill_grace
        self._holder = holder
        self._run: Optional[_SshProtocol] = None
        self._retry: Optional[IDelayedCall] = None
        self._health_call: Optional[IDelayedCall] = None
        self._health_failures = 0
        #: Failures since the tunnel was last up: the backoff's exponent.
        self._attempt = 0
        self._reconnects = 0
        self._refused: set[int] = set()
        self._subscribers: list[Callable[[TunnelState], None]] = []
        self._state = "not_configured" if settings is None else "stopped"
        self._since = now()
        self._last_error: Optional[str] = None

    # -- what others call ------------------------------------------------

    def state(self) -> TunnelState:
        settings, run = self._settings, self._run
        return TunnelState(
            state=self._state,
            since=self._since,
            last_error=self._last_error,
            reconnects=self._reconnects,
            host=settings.host if settings else None,
            port=settings.port if settings else None,
            user=settings.user if settings else None,
            forwards=len(forwarded_ports(settings)) + 1 if settings else 0,
            pid=run.pid if run is not None else None,
            authenticated=run is not None and run.authenticated,
            refused_ports=tuple(sorted(self._refused)),
            settings=settings,
        )

    def subscribe(self, callback: Callable[[TunnelState], None]) -> None:
        """Call ``callback`` with the new state at every change (and when ssh authenticates)."""
        self._subscribers.append(callback)

    def use(self, settings: Optional[TunnelSettings]) -> Deferred[None]:
        """Run the tunnel with ``settings`` from now on (None: no tunnel).

        Fires once the old ssh, if any, has been reaped.
        """
        self._settings = settings
        self._refused = set()
        self._attempt = 0
        self._cancel_timers()
        if settings is None:
            self._set("not_configured")
        elif not self.running:
            self._set("stopped")
        reaped = self._reap()
        if settings is not None and self.running:
            reaped.addCallback(lambda _: self._spawn())
        return reaped

    def down_reason(self, host: str, port: int) -> Optional[str]:
        """Why a connection to ``host:port`` cannot reach the hub now, if the tunnel is why.

        None unless a tunnel is configured, forwards that loopback port, and is
        not up (or the hub refused that very port).
        """
        settings = self._settings
        if settings is None or host not in ("127.0.0.1", "localhost"):
            return None
        if port not in forwarded_ports(settings):
            return None
        if port in self._refused:
            return f"the hub refused the forward of port {port}"
        if self._state in ("up", "forward_refused"):
            return None
        return self._last_error or self._state.replace("_", " ")

    # -- the service -----------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._settings is not None:
            self._spawn()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._cancel_timers()
        if self._settings is not None:
            self._set("stopped")
        return self._reap()

    # -- ssh -------------------------------------------------------------

    def _spawn(self) -> None:
        settings = self._settings
        if settings is None or not self.running or self._run is not None:
            return
        self._retry = None
        self._health_failures = 0
        run = _SshProtocol(self)
        argv = ssh_argv(settings, self._ssh)
        try:
            self._process_reactor.spawnProcess(
                run, argv[0], argv, env=dict(SSH_ENVIRONMENT), childFDs={0: "w", 1: "r", 2: "r"}
            )
        except OSError as e:
            self._last_error = f"cannot run {argv[0]}: {e.strerror or e}"
            log.error("tunnel: {error}", error=self._last_error)
            self._schedule("down", self._backoff())
            return
        self._run = run
        log.info(
            "tunnel: ssh {pid} to {user}@{host}:{port} with {forwards} forwards",
            pid=run.pid,
            user=settings.user,
            host=settings.host,
            port=settings.port,
            forwards=len(forwarded_ports(settings)) + 1,
        )
        self._set("connecting", force=True)

    def _reap(self) -> Deferred[None]:
        """Stop the current ssh, if any: fires once it has ended."""
        run = self._run
        if run is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        run.ended.append(done)
        if not run.stopping:
            run.stopping = True
            self._signal(run, "TERM")
            run.kill = self._clock.callLater(self._kill_grace, self._signal, run, "KILL")
        return done

    def _signal(self, run: _SshProtocol, signal: str) -> None:
        if signal == "KILL":
            run.kill = None
            log.warn("tunnel: ssh {pid} outlived its grace: killing it", pid=run.pid)
        if run.transport is None:
            return
        try:
            run.transport.signalProcess(signal)
        except ProcessExitedAlready:
            pass

    def _line(self, run: _SshProtocol, line: str) -> None:
        if not sshlog.is_debug(line):
            log.info("tunnel: ssh {pid}: {line}", pid=run.pid, line=line)
        run.last_line = line if not sshlog.is_debug(line) else run.last_line
        if run is not self._run or run.stopping:
            return
        event = sshlog.parse(line)
        if event is None:
            return
        if isinstance(event, sshlog.Authenticated):
            run.authenticated = True
            self._notify()
        elif isinstance(event, sshlog.ForwardsReady):
            run.ready = True
            self._attempt = 0
            self._up()
            self._health_call = self._clock.callLater(self._health_interval, self._check_health)
        elif isinstance(event, sshlog.HostKeyRejected):
            run.host_key_changed = event.changed
        elif isinstance(event, sshlog.VerificationFailed):
            settings = self._settings
            assert settings is not None
            if run.host_key_changed is False:
                why = (
                    f"no host key is pinned for [{settings.host}]:{settings.port} in "
                    f"{settings.known_hosts}"
                )
            else:
                why = (
                    f"the hub's host key is not the one pinned in {settings.known_hosts}: "
                    "a different hub, or a man in the middle; not retried until an operator "
                    "checks it and pins the right key"
                )
            run.problem = ("host_key_mismatch", why, None)
        elif isinstance(event, sshlog.PermissionDenied):
            run.problem = (
                "unenrolled",
                "the hub refused the node's key (Permission denied (publickey)): not "
                "installed in its authorized_keys yet, or revoked",
                UNENROLLED_RETRY,
            )
        elif isinstance(event, sshlog.LocalPortBusy):
            holder = self._holder(event.port)
            held = f" by {holder}" if holder else ""
            run.problem = (
                "local_port_busy",
                f"port 127.0.0.1:{event.port} of the node is already in use{held}; "
                "ssh cannot listen there",
                LOCAL_BUSY_RETRY,
            )
        elif isinstance(event, sshlog.RemoteListenFailed):
            low, high = REMOTE_BUSY_RETRY
            run.problem = (
                "remote_port_busy",
                f"the hub would not listen on its 127.0.0.1:{event.port} for the node's API: "
                "a stale session of this node, another node, or its sshd's "
                "PermitListen/permitlisten refuses it",
                low + (high - low) * self._random(),
            )
        elif isinstance(event, sshlog.ConnectionToPort):
            run.arriving = event.port
        elif isinstance(event, sshlog.ChannelOpened):
            if run.arriving is not None:
                run.channels[event.channel] = run.arriving
                run.arriving = None
        elif isinstance(event, sshlog.ChannelFailed):
            self._channel_failed(run, event)
        elif isinstance(event, sshlog.ChannelFreed):
            port = run.channels.pop(event.channel, None)
            failed = event.channel in run.failed_channels
            run.failed_channels.discard(event.channel)
            if port is not None and not failed and port in self._refused:
                self._refused.discard(port)
                log.info("tunnel: the hub let a connection to port {port} through", port=port)
                if run.ready:
                    self._up()

    def _channel_failed(self, run: _SshProtocol, event: sshlog.ChannelFailed) -> None:
        run.failed_channels.add(event.channel)
        port = run.channels.get(event.channel)
        if not event.prohibited:
            # "connect failed: Connection refused": nothing listens on the hub's port
            # (no qemu-nbd there yet); normal, and the tunnel is fine.
            return
        where = f"port {port}" if port is not None else "a forwarded port"
        if port is not None:
            self._refused.add(port)
        self._last_error = (
            f"the hub's sshd refused a connection to {where} (administratively prohibited): "
            f"its permitopen/PermitOpen does not allow 127.0.0.1:{port or 'P'}"
        )
        log.warn("tunnel: {error}", error=self._last_error, port=port)
        if run.ready:
            self._up()

    def _up(self) -> None:
        """Up, or partly: ``forward_refused`` while the hub refuses some port."""
        self._set("forward_refused" if self._refused else "up")

    def _ended(self, run: _SshProtocol, reason: Failure) -> None:
        if run.kill is not None and run.kill.active():
            run.kill.cancel()
        run.kill = None
        was_current = run is self._run
        if was_current:
            self._run = None
            if self._health_call is not None and self._health_call.active():
                self._health_call.cancel()
            self._health_call = None
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        log.info(
            "tunnel: ssh {pid} ended (exit {code}, signal {signal})",
            pid=run.pid,
            code=code,
            signal=sig,
        )
        waiters, run.ended = run.ended, []
        if was_current and not run.stopping:
            self._failed(run, reason)
        for waiter in waiters:
            waiter.callback(None)

    def _failed(self, run: _SshProtocol, reason: Failure) -> None:
        if run.problem is not None:
            state, message, delay = run.problem
            self._last_error = message
            if delay is None:
                log.error("tunnel: {error}", error=message, state=state)
                self._set(state, force=True)
                return
            self._schedule(state, delay)
            return
        if reason.check(ProcessDone):
            what = "ssh exited"
        else:
            code = getattr(reason.value, "exitCode", None)
            what = f"ssh exited with {code}" if code is not None else "ssh was killed"
        if run.last_line:
            what += f": {run.last_line}"
        self._last_error = what
        self._schedule("down", self._backoff())

    def _backoff(self) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**self._attempt)
        self._attempt += 1
        # Jitter: from half to the whole delay, so nodes that failed together spread out.
        return float(delay * (0.5 + 0.5 * self._random()))

    def _schedule(self, state: str, delay: float) -> None:
        log.warn(
            "tunnel {state}: {error}; next attempt in {delay:.0f} s",
            state=state,
            error=self._last_error,
            delay=delay,
        )
        self._set(state, force=True)
        self._retry = self._clock.callLater(delay, self._again)

    def _again(self) -> None:
        self._retry = None
        self._reconnects += 1
        self._spawn()

    # -- health ----------------------------------------------------------

    def _check_health(self) -> None:
        self._health_call = None
        run, settings = self._run, self._settings
        if run is None or settings is None or run.stopping:
            return
        url = f"http://127.0.0.1:{settings.sha_api_port}/health"
        checking = self._health(url)
        checking.addCallbacks(
            lambda _: self._healthy(run), lambda failure: self._unhealthy(run, url, failure)
        )

    def _healthy(self, run: _SshProtocol) -> None:
        if run is not self._run or run.stopping:
            return
        self._health_failures = 0
        self._health_call = self._clock.callLater(self._health_interval, self._check_health)

    def _unhealthy(self, run: _SshProtocol, url: str, failure: Failure) -> None:
        if run is not self._run or run.stopping:
            return
        self._health_failures += 1
        why = failure.getErrorMessage() or repr(failure.value)
        log.warn(
            "tunnel: the hub's {url} did not answer through the tunnel ({count} in a row): {why}",
            url=url,
            count=self._health_failures,
            why=why,
        )
        if self._health_failures < HEALTH_FAILURES:
            self._health_call = self._clock.callLater(self._health_interval, self._check_health)
            return
        self._last_error = (
            f"the hub's {url} did not answer through the tunnel {self._health_failures} "
            f"times in a row ({why}); ssh restarted"
        )
        self._set("down", force=True)
        self._reconnects += 1
        self._reap().addCallback(lambda _: self._spawn())

    # -- state -----------------------------------------------------------

    def _cancel_timers(self) -> None:
        for call in (self._retry, self._health_call):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._health_call = None

    def _set(self, state: str, force: bool = False) -> None:
        if state != self._state:
            self._state = state
            self._since = self._now()
        elif not force:
            return
        self._notify()

    def _notify(self) -> None:
        current = self.state()
        for callback in list(self._subscribers):
            try:
                callback(current)
            except Exception:
                log.failure("tunnel: a state subscriber failed")
