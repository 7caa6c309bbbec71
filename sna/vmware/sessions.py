"""vCenter sessions: logged in once, reused, logged out when idle or at shutdown.

:class:`SessionPool` owns every pyvmomi connection of the daemon.  A session
is keyed by vCenter, user, a keyed digest of the password and the TLS pin, so
a request with another password or another (or no) thumbprint never rides on
a session that was verified differently.  Work reaches vCenter only through
:meth:`SessionPool.run`: a blocking function of a :class:`Connection`, run on
the service's thread pool with a deadline; a session vCenter has forgotten
(``NotAuthenticated``) is logged in again once, transparently.

TLS is verified against the system CAs by default (always with a context of
ours: pyvmomi would switch verification off for loopback addresses by
itself); a request may pin the certificate's SHA-1 or SHA-256 thumbprint,
checked on every connection before anything is sent; ``insecure`` turns
verification off for labs, loudly.  A request that pins nothing is checked
against the pin an operator stored for its vCenter, if any (``pins``,
:mod:`sna.vmware.pins`).

This module knows nothing of VMs, HTTP routes or jobs.  Passwords are in no
log line: sessions are named ``user@host:port``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
from collections.abc import Callable
from typing import Any, Optional, TypeVar, Union

import attrs
from pyVmomi import vim
from pyVmomi.SoapAdapter import SoapStubAdapter
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sna.contract.soap import negotiate_version
from sna.contract.tls import TlsSettings, normalise_thumbprint, ssl_context
from sna.vmware.faults import is_not_authenticated, translate
from sna.vmware.interface import CertificateRejected, Credentials, TimedOut, VSphereError

T = TypeVar("T")

log = Logger()

#: A session unused this long is logged out (vCenter's own default is 30 min).
IDLE_TIMEOUT = 300.0
#: The longest one call on the thread pool may take (a login, a retrieval, a logout).
CALL_TIMEOUT = 60.0
#: pyvmomi keeps idle HTTP connections this long; vCenter's proxy drops idle
#: keep-alive connections after a while, and pyvmomi does not retry a request
#: that failed on such a dead connection.
CONNECTION_POOL_TIMEOUT = 20


@attrs.frozen
class Connection:
    """One logged-in session as the work functions on the thread pool see it."""

    si: Any  # vim.ServiceInstance
    content: Any  # vim.ServiceInstanceContent, fetched once at login
    where: str
    user: str

    @property
    def who(self) -> str:
        return f"{self.user}@{self.where}"

    def ref(self, kind: Any, moid: str) -> Any:
        """The managed object ``kind:moid`` bound to this session.

        Work functions pass morefs between calls as ids and bind them again,
        so a call retried on a fresh session does not use the dead one's stub.
        """
        return kind(moid, self.si._stub)


@attrs.frozen
class _Key:
    host: str
    port: int
    user: str
    password_digest: bytes = attrs.field(repr=False)
    thumbprint: Optional[str]


@attrs.define(eq=False)
class _Session:
    key: _Key
    connection: Connection
    last_used: float
    in_use: int = 0
    retired: bool = False
    logout: bool = True
    done: Deferred[None] = attrs.Factory(Deferred)

    @property
    def who(self) -> str:
        return self.connection.who


# -- blocking work, on the thread pool ----------------------------------------------


def connect(credentials: Credentials, context: ssl.SSLContext, timeout: float) -> Connection:
    """Log in to vCenter; blocking.  A failure leaves no session behind."""
    version = negotiate_version(credentials.host, credentials.port, context, timeout)
    stub = SoapStubAdapter(  # type: ignore[no-untyped-call]
        host=credentials.host,
        port=credentials.port,
        version=version,
        path="/sdk",
        sslContext=context,
        httpConnectionTimeout=timeout,
        connectionPoolTimeout=CONNECTION_POOL_TIMEOUT,
    )
    service_instance: Any = vim.ServiceInstance
    si = service_instance("ServiceInstance", stub)
    try:
        content = si.RetrieveContent()
        content.sessionManager.Login(credentials.user, credentials.password, None)
    except BaseException:
        stub.DropConnections()  # type: ignore[no-untyped-call]
        raise
    return Connection(si=si, content=content, where=credentials.where, user=credentials.user)


def logout(connection: Connection) -> None:
    """End the session on vCenter and close its sockets; blocking."""
    try:
        connection.content.sessionManager.Logout()
    finally:
        connection.si._stub.DropConnections()


def drop(connection: Connection) -> None:
    """Close the sockets of a session vCenter has already forgotten; blocking."""
    connection.si._stub.DropConnections()


# -- the pool -----------------------------------------------------------------------


class SessionPool:
    """vCenter sessions shared by every request, and the thread pool they run on.

    ``reactor`` delivers the thread pool's results; ``clock`` (the reactor by
    default) times calls, idle sessions and the periodic idle check, which
    runs only while sessions exist.  ``ca_file`` adds CAs to trust besides
    the system's; ``insecure`` turns verification off unless a request pins
    a thumbprint.  Call :meth:`close` before the thread pool stops.
    """

    # The blocking steps, as attributes so the pool's own logic can be tested
    # without a vCenter.
    connect_session = staticmethod(connect)
    logout_session = staticmethod(logout)
    drop_session = staticmethod(drop)

    def __init__(
        self,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        *,
        clock: Optional[IReactorTime] = None,
        insecure: bool = False,
        ca_file: Optional[str] = None,
        idle_timeout: float = IDLE_TIMEOUT,
        check_interval: Optional[float] = None,
        call_timeout: float = CALL_TIMEOUT,
        pins: Optional[Callable[[str, int], Optional[str]]] = None,
    ) -> None:
        #: The stored pin of a vCenter (host, port), for requests that pin nothing.
        self._pins = pins
        self._reactor = reactor
        self._pool = pool
        self.clock: IReactorTime = clock if clock is not None else IReactorTime(reactor)
        self._insecure = insecure
        self._ca_file = ca_file
        self.idle_timeout = idle_timeout
        self._check_interval = (
            check_interval if check_interval is not None else min(idle_timeout / 2, 60.0)
        )
        self.call_timeout = call_timeout
        # Session keys hold a keyed digest, never the password: the key lives
        # only in this process, so the digests are worthless anywhere else.
        self._salt = os.urandom(32)
        self._sessions: dict[_Key, _Session] = {}
        self._locks: dict[_Key, DeferredLock] = {}
        self._retired: set[_Session] = set()
        self._late: set[Deferred[None]] = set()
        self._logins: set[Deferred[Any]] = set()
        self._reaper: Optional[LoopingCall] = None
        self._closed = False
        if insecure:
            log.warn(
                "vCenter TLS certificate verification is OFF (--vcenter-insecure): anyone "
                "on the path to a vCenter can impersonate it and read the credentials sna "
                "sends; use it for labs only, or pin certificates with vcenter_thumbprint"
            )

    # -- what callers use ---------------------------------------------------------

    @property
    def session_count(self) -> int:
        """Sessions logged in and available for reuse."""
        return len(self._sessions)

    def run(
        self,
        credentials: Credentials,
        work: Callable[[Connection], T],
        what: str,
        timeout: Optional[float] = None,
    ) -> Deferred[T]:
        """``work(connection)`` on the thread pool, on a session of ``credentials``.

        Fails with a :class:`VSphereError`: :class:`TimedOut` after
        ``timeout`` (the pool's call timeout by default), the others as
        :func:`~sna.vmware.faults.translate` maps them.  ``work`` must do
        its changing call last: after a ``NotAuthenticated`` it runs again.
        """
        return Deferred.fromCoroutine(self._run(credentials, work, what, timeout))

    def close(self) -> Deferred[None]:
        """Log out every session; fires when done (or after a call timeout at most).

        Sessions busy with a call are logged out when the call ends, and a
        login still running is logged out when it succeeds; both are waited for.
        """
        self._closed = True
        self._stop_reaper()
        for session in list(self._sessions.values()):
            self._retire(session)
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        deadline = self.clock.seconds() + self.call_timeout
        while True:
            # A login that ends now queues a logout: look again after each wait.
            waiting = [s.done for s in self._retired] + list(self._late) + list(self._logins)
            if not waiting:
                return
            remaining = deadline - self.clock.seconds()
            everything: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
            try:
                await self._bounded(everything, "logging out", "every vCenter", remaining)
            except TimedOut:
                log.warn(
                    "gave up waiting for {count} vCenter sessions to log out",
                    count=len(self._retired) + len(self._late) + len(self._logins),
                )
                return

    # -- sessions ------------------------------------------------------------------

    def _key(self, credentials: Credentials) -> _Key:
        digest = hmac.new(self._salt, credentials.password.encode(), hashlib.sha256).digest()
        thumbprint = credentials.thumbprint
        return _Key(
            host=credentials.host.lower(),
            port=credentials.port,
            user=credentials.user,
            password_digest=digest,
            thumbprint=normalise_thumbprint(thumbprint) if thumbprint else None,
        )

    async def _run(
        self,
        credentials: Credentials,
        work: Callable[[Connection], T],
        what: str,
        timeout: Optional[float],
    ) -> T:
        limit = timeout if timeout is not None else self.call_timeout
        who = f"{credentials.user}@{credentials.where}"
        stored_pin = False
        if credentials.thumbprint is None and self._pins is not None:
            # Looked up per call: a pin stored or removed applies to the next request.
            pinned = self._pins(credentials.host, credentials.port)
            if pinned is not None:
                credentials = attrs.evolve(credentials, thumbprint=pinned)
                stored_pin = True
        for attempt in (1, 2):
            session: Optional[_Session] = None
            try:
                session = await self._acquire(credentials)
                return await self._call(session, work, what, limit)
            except Exception as e:
                if attempt == 1 and session is not None and is_not_authenticated(e):
                    log.info(
                        "vCenter ended the session of {who}; logging in again", who=session.who
                    )
                    self._retire(session, logout=False)
                    continue
                error = translate(e, credentials, what)
                if stored_pin and isinstance(error, CertificateRejected):
                    error = CertificateRejected(
                        f"{error.message} (the pin stored for {credentials.where}; "
                        "sna-ctl vcenter trust shows the certificate and stores it again)"
                    )
                if isinstance(error, VSphereError):
                    log.info(
                        "{what} as {who} failed: {error}",
                        what=what,
                        who=who,
                        error=error.message,
                    )
                if error is e:
                    raise
                raise error from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self, credentials: Credentials) -> _Session:
        if self._closed:
            raise VSphereError("the vSphere client is shut down")
        key = self._key(credentials)
        lock = self._locks.setdefault(key, DeferredLock())
        # One login per key at a time: requests arriving together share it.
        await lock.acquire()
        try:
            session = self._sessions.get(key)
            if session is None:
                session = await self._login(key, credentials)
            return session
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and key not in self._sessions:
                self._locks.pop(key, None)

    async def _login(self, key: _Key, credentials: Credentials) -> _Session:
        who = f"{credentials.user}@{credentials.where}"

        def login() -> Connection:
            # The context is made here too: loading the system CAs reads files.
            context = ssl_context(
                TlsSettings(credentials.thumbprint, self._ca_file, self._insecure)
            )
            return self.connect_session(credentials, context, self.call_timeout)

        inner = deferToThreadPool(self._reactor, self._pool, login)
        self._logins.add(inner)
        pending = self._bounded(
            inner, "logging in", credentials.where, self.call_timeout, late=self._logout_late
        )
        inner.addBoth(self._login_ended, inner)
        connection = await pending
        if self._closed:
            self._logout_late(connection)
            raise VSphereError("the vSphere client is shut down")
        session = _Session(key=key, connection=connection, last_used=self.clock.seconds())
        self._sessions[key] = session
        self._start_reaper()
        log.info(
            "logged in to vCenter as {who}{pinned}",
            who=who,
            pinned=" (certificate pinned)" if key.thumbprint else "",
        )
        return session

    def _login_ended(self, result: object, inner: Deferred[Any]) -> None:
        self._logins.discard(inner)

    def _call(
        self, session: _Session, work: Callable[[Connection], T], what: str, timeout: float
    ) -> Deferred[T]:
        session.in_use += 1

        def released(result: Union[T, Failure]) -> Union[T, Failure]:
            # Counted when the thread is done, not when the caller gave up:
            # a session is never logged out under a call still running.
            session.in_use -= 1
            session.last_used = self.clock.seconds()
            if session.retired and session.in_use == 0:
                self._finish(session)
            return result

        inner = deferToThreadPool(self._reactor, self._pool, work, session.connection)
        return self._bounded(inner.addBoth(released), what, session.connection.where, timeout)

    def _retire(self, session: _Session, logout: bool = True) -> None:
        """Take a session out of use; log it out once no call runs on it."""
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        if not self._sessions:
            self._stop_reaper()
        if session.retired:
            return
        session.retired = True
        session.logout = logout
        self._retired.add(session)
        if session.in_use == 0:
            self._finish(session)

    def _finish(self, session: _Session) -> None:
        end = self.logout_session if session.logout else self.drop_session
        inner = deferToThreadPool(self._reactor, self._pool, end, session.connection)
        d = self._bounded(inner, "logging out", session.connection.where, self.call_timeout)

        def ended(result: object) -> None:
            self._retired.discard(session)
            if isinstance(result, Failure):
                log.info(
                    "logout of {who} failed: {error}",
                    who=session.who,
                    error=result.getErrorMessage(),
                )
            elif session.logout:
                log.info("logged out of vCenter as {who}", who=session.who)
            session.done.callback(None)

        d.addBoth(ended)

    def _logout_late(self, connection: Connection) -> None:
        """Log out a session whose login finished after its caller stopped waiting."""
        inner = deferToThreadPool(self._reactor, self._pool, self.logout_session, connection)
        d = self._bounded(inner, "logging out", connection.where, self.call_timeout)
        self._late.add(d)

        def ended(result: object) -> None:
            self._late.discard(d)
            if isinstance(result, Failure):
                log.info(
                    "logout of {who} failed: {error}",
                    who=connection.who,
                    error=result.getErrorMessage(),
                )

        d.addBoth(ended)

    # -- idle sessions --------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._reaper is not None or self._closed:
            return
        reaper = LoopingCall(self._reap)
        reaper.clock = self.clock
        self._reaper = reaper
        reaper.start(self._check_interval, now=False).addErrback(
            lambda f: log.failure("the idle-session check failed", f)
        )

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper.running:
            reaper.stop()

    def _reap(self) -> None:
        now = self.clock.seconds()
        for session in list(self._sessions.values()):
            idle = now - session.last_used
            if session.in_use == 0 and idle >= self.idle_timeout:
                log.info(
                    "logging out of vCenter as {who}: idle for {idle:.0f} s",
                    who=session.who,
                    idle=idle,
                )
                self._retire(session)

    # -- time limits -----------------------------------------------------------------

    def _bounded(
        self,
        inner: Deferred[T],
        what: str,
        where: str,
        timeout: float,
        late: Optional[Callable[[T], object]] = None,
    ) -> Deferred[T]:
        """``inner``'s result, or :class:`TimedOut` after ``timeout`` seconds.

        A thread cannot be stopped, so ``inner`` runs on after a timeout (its
        sockets time out too); what it yields then goes to ``late`` (a login
        to log out) or, if it is a failure, to the log.
        """

        def cancel(_: Deferred[T]) -> None:
            if timer.active():
                timer.cancel()

        outer: Deferred[T] = Deferred(cancel)

        def expire() -> None:
            outer.errback(
                Failure(TimedOut(f"vCenter {where} did not finish {what} within {timeout:g} s"))
            )

        timer = self.clock.callLater(timeout, expire)

        def finished(result: Union[T, Failure]) -> None:
            if timer.active():
                timer.cancel()
            if outer.called:
                if isinstance(result, Failure):
                    log.info(
                        "{what} on vCenter {where} failed after its caller stopped waiting: "
                        "{error}",
                        what=what,
                        where=where,
                        error=result.getErrorMessage(),
                    )
                elif late is not None:
                    late(result)
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        inner.addBoth(finished)
        return outer
