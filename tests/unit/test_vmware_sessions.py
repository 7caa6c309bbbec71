"""The session pool's own logic, without a vCenter: reuse, idle logout, re-login, deadlines.

The blocking steps (login, logout, dropping a session) are replaced by a
fake vCenter, and the thread pool by one that runs each call only when the
test says so, so the tests can hold a login or a call "in its thread" while
time (a ``Clock``) passes.  Against the real simulator, see
``tests/integration/test_vmware.py``.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from typing import Any, Optional

import attrs
import pytest
from pyVmomi import vim
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from sna.contract.tls import CertificateMismatch
from sna.testing import HeldThreadPool, SameThread, failure_of, result_of
from sna.vmware.interface import (
    AuthenticationFailed,
    CertificateRejected,
    Credentials,
    TimedOut,
    Unreachable,
    VSphereError,
)
from sna.vmware.sessions import Connection, SessionPool

PASSWORD = "Very-Secret-9"
CREDS = Credentials(host="vc.example.com", port=443, user="admin", password=PASSWORD)


@attrs.define
class FakeVCenter:
    logins: list[Credentials] = attrs.Factory(list)
    logged_out: list[Connection] = attrs.Factory(list)
    dropped: list[Connection] = attrs.Factory(list)
    refuse: Optional[BaseException] = None

    def connect(
        self, credentials: Credentials, context: ssl.SSLContext, timeout: float
    ) -> Connection:
        if self.refuse is not None:
            raise self.refuse
        self.logins.append(credentials)
        return Connection(
            si=object(), content=len(self.logins), where=credentials.where, user=credentials.user
        )

    def logout(self, connection: Connection) -> None:
        self.logged_out.append(connection)

    def drop(self, connection: Connection) -> None:
        self.dropped.append(connection)


@attrs.define
class Rig:
    pool: SessionPool
    threads: HeldThreadPool
    clock: Clock
    vcenter: FakeVCenter

    def run(
        self,
        work: Callable[[Connection], Any] = lambda c: c.content,
        creds: Credentials = CREDS,
    ) -> Deferred[Any]:
        return self.pool.run(creds, work, "testing")


@pytest.fixture
def rig() -> Rig:
    threads, clock, vcenter = HeldThreadPool(), Clock(), FakeVCenter()
    pool = SessionPool(
        SameThread(),
        threads,  # type: ignore[arg-type]
        clock=clock,
        idle_timeout=30,
        check_interval=5,
        call_timeout=10,
    )
    pool.connect_session = vcenter.connect  # type: ignore[method-assign]
    pool.logout_session = vcenter.logout  # type: ignore[method-assign]
    pool.drop_session = vcenter.drop  # type: ignore[method-assign]
    return Rig(pool, threads, clock, vcenter)


def test_a_session_is_reused(rig: Rig) -> None:
    first = rig.run()
    rig.threads.run()
    second = rig.run()
    rig.threads.run()
    assert (result_of(first), result_of(second)) == (1, 1)
    assert len(rig.vcenter.logins) == 1
    assert rig.pool.session_count == 1


def test_requests_arriving_together_share_one_login(rig: Rig) -> None:
    calls = [rig.run() for _ in range(3)]
    assert len(rig.threads.pending) == 1  # one login; the others wait for it
    rig.threads.run()
    assert [result_of(d) for d in calls] == [1, 1, 1]
    assert len(rig.vcenter.logins) == 1


@pytest.mark.parametrize(
    "other",
    [
        attrs.evolve(CREDS, password="another"),
        attrs.evolve(CREDS, user="someone"),
        attrs.evolve(CREDS, port=8443),
        attrs.evolve(CREDS, thumbprint="AA" * 20),
    ],
)
def test_other_credentials_or_pins_get_their_own_session(rig: Rig, other: Credentials) -> None:
    rig.run()
    rig.run(creds=other)
    rig.threads.run()
    assert len(rig.vcenter.logins) == 2
    assert rig.pool.session_count == 2


def test_the_same_pin_spelt_differently_shares_a_session(rig: Rig) -> None:
    rig.run(creds=attrs.evolve(CREDS, thumbprint="aa" * 20))
    rig.run(creds=attrs.evolve(CREDS, thumbprint=":".join(["AA"] * 20)))
    rig.threads.run()
    assert len(rig.vcenter.logins) == 1


def test_an_idle_session_is_logged_out(rig: Rig) -> None:
    rig.run()
    rig.threads.run()
    rig.clock.advance(25)
    rig.run()  # used again: idle time starts over
    rig.threads.run()
    rig.clock.advance(25)
    rig.threads.run()
    assert rig.vcenter.logged_out == []
    rig.clock.advance(10)
    rig.threads.run()
    assert len(rig.vcenter.logged_out) == 1
    assert rig.pool.session_count == 0
    assert rig.clock.getDelayedCalls() == []  # no check runs without sessions
    rig.run()
    rig.threads.run()
    assert len(rig.vcenter.logins) == 2


def test_a_busy_session_is_not_logged_out_under_its_call(rig: Rig) -> None:
    rig.run()
    rig.threads.run()
    slow = rig.run()  # its call stays "in its thread"
    rig.clock.advance(9)
    rig.clock.advance(40)
    assert isinstance(slow.result, Failure) and slow.result.check(TimedOut)
    slow.addErrback(lambda _: None)
    assert rig.vcenter.logged_out == []
    rig.threads.run()  # the call ends; the session is idle from now on
    assert rig.pool.session_count == 1
    rig.clock.advance(35)
    rig.threads.run()
    assert len(rig.vcenter.logged_out) == 1


def test_a_forgotten_session_is_replaced_once(rig: Rig) -> None:
    failures = [vim.fault.NotAuthenticated()]

    def work(connection: Connection) -> Any:
        if failures:
            raise failures.pop()
        return connection.content

    rig.run()
    rig.threads.run()
    d = rig.run(work)
    rig.threads.run()
    assert result_of(d) == 2  # the second login's session
    assert len(rig.vcenter.dropped) == 1  # the dead one: closed, not logged out
    assert rig.vcenter.logged_out == []
    assert rig.pool.session_count == 1


def test_a_session_forgotten_twice_is_an_authentication_failure(rig: Rig) -> None:
    def work(connection: Connection) -> Any:
        raise vim.fault.NotAuthenticated()

    d = rig.run(work)
    rig.threads.run()
    failure_of(d, AuthenticationFailed)
    assert len(rig.vcenter.logins) == 2


def test_a_refused_login_leaves_nothing_behind(rig: Rig) -> None:
    rig.vcenter.refuse = vim.fault.InvalidLogin(msg="Cannot complete login due to bad password")
    with capturedLogs() as events:
        d = rig.run()
        rig.threads.run()
    error = failure_of(d, AuthenticationFailed)
    assert re.search("bad password", str(error)), error
    assert error.status == 401
    assert rig.pool.session_count == 0
    assert rig.pool._locks == {}
    assert all(PASSWORD not in formatEvent(e) for e in events)
    assert all(PASSWORD not in repr(e) for e in events)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectionRefusedError(111, "Connection refused"), Unreachable),
        (TimeoutError("timed out"), TimedOut),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), CertificateRejected),
        (CertificateMismatch("AA:BB", "CC:DD"), CertificateRejected),
    ],
)
def test_network_failures_become_vsphere_errors(
    rig: Rig, error: BaseException, kind: type[VSphereError]
) -> None:
    rig.vcenter.refuse = error
    d = rig.run()
    rig.threads.run()
    error = failure_of(d, kind)


def test_a_login_that_ends_after_its_deadline_is_logged_out(rig: Rig) -> None:
    d = rig.run()
    rig.clock.advance(10)
    error = failure_of(d, TimedOut)
    assert re.search("logging in", str(error)), error
    rig.threads.run()  # the login completes late, then its logout runs
    assert len(rig.vcenter.logins) == 1
    assert len(rig.vcenter.logged_out) == 1
    assert rig.pool.session_count == 0


def test_close_logs_out_every_session_and_waits_for_busy_ones(rig: Rig) -> None:
    rig.run()
    rig.run(creds=attrs.evolve(CREDS, user="other"))
    rig.threads.run()
    busy = rig.run()
    closed = rig.pool.close()
    rig.threads.run(1)  # the busy call ends...
    rig.threads.run()  # ...then both logouts run
    assert result_of(busy) == 1
    assert result_of(closed) is None
    assert len(rig.vcenter.logged_out) == 2
    assert rig.clock.getDelayedCalls() == []
    assert "shut down" in str(failure_of(rig.run(), VSphereError))


def test_close_during_a_login_logs_it_out_when_it_ends(rig: Rig) -> None:
    d = rig.run()  # the login is still "in its thread"
    closed = rig.pool.close()
    assert not closed.called
    rig.threads.run()  # the login ends, then its logout runs
    assert result_of(closed) is None
    assert len(rig.vcenter.logged_out) == 1
    error = failure_of(d, VSphereError)
    assert re.search("shut down", str(error)), error


def test_close_does_not_wait_forever(rig: Rig) -> None:
    rig.run()
    rig.threads.run()
    never = rig.run()  # its call never ends
    with capturedLogs() as events:
        closed = rig.pool.close()
        rig.clock.advance(10)
    assert result_of(closed) is None
    failure_of(never, TimedOut)
    assert any("gave up" in formatEvent(e) for e in events)


def test_insecure_mode_warns_once() -> None:
    with capturedLogs() as events:
        SessionPool(SameThread(), HeldThreadPool(), clock=Clock(), insecure=True)  # type: ignore[arg-type]
    warnings = [e for e in events if "verification is OFF" in formatEvent(e)]
    assert len(warnings) == 1
    assert warnings[0]["log_level"].name == "warn"
