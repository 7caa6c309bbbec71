"""Power-off and power-on answer within 50 s, whatever the request's timeout.

The SHA's HTTP client gives up after 60 s, so :class:`VSphere` answers by
then with the VM's state, saying what goes on.  Here the blocking steps
(finding the VM, looking at it, starting a shutdown or a task) are a fake VM
whose state changes when the test's ``Clock`` says so; the session pool is
the real one over a thread pool without threads, so a vCenter call that
never returns can be held.  Against the simulator, see
``tests/integration/test_vmware.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import attrs
import pytest
from pyVmomi import vim
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from sna.testing import HeldThreadPool, SameThread
from sna.vmware.interface import Conflict, Credentials, TimedOut
from sna.vmware.sessions import Connection, SessionPool
from sna.vmware.vsphere import ANSWER_WITHIN, POLL_INTERVAL, POWERED_OFF, VSphere

CREDS = Credentials(host="vc.example.com", port=443, user="admin", password="Very-Secret-9")
VM_ID = "4205a8b3-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
#: What the SHA sends: 300 s for power-off, 180 s for power-on.
SHA_OFF_TIMEOUT = 300.0
SHA_ON_TIMEOUT = 180.0


@attrs.define
class FakeVM:
    """One VM as the power steps see it; each change happens at a clock time the test sets."""

    clock: Clock
    state: str = "poweredOn"
    tools: str = "toolsOk"
    #: When the guest (after a shutdown request) or a power task takes effect; None: never.
    takes: Optional[float] = None
    task_error: Optional[Exception] = None
    refuse_power_off: bool = False
    changed_at: Optional[float] = None
    task: Optional[str] = None
    calls: list[tuple[float, str]] = attrs.Factory(list)

    def _note(self, what: str) -> None:
        self.calls.append((self.clock.seconds(), what))

    def _settle(self) -> None:
        if self.changed_at is not None and self.clock.seconds() >= self.changed_at:
            self.state = "poweredOff" if self.state == "poweredOn" else "poweredOn"
            self.changed_at = None

    def _props(self) -> dict[str, Any]:
        self._settle()
        running = self.state == "poweredOn" and self.tools == "toolsOk"
        return {
            "name": "pgtest1",
            "runtime.powerState": self.state,
            "guest.toolsStatus": self.tools if self.state == "poweredOn" else "toolsNotRunning",
            "guest.toolsRunningStatus": "guestToolsRunning" if running else "guestToolsNotRunning",
        }

    def _change_later(self) -> None:
        self.changed_at = self.clock.seconds() + (math.inf if self.takes is None else self.takes)

    def find(self, conn: Connection, vm_id: str) -> tuple[str, dict[str, Any]]:
        self._note("find")
        return "vm-42", self._props()

    def look(
        self, conn: Connection, ident: str, task: Optional[str]
    ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        self._note("look")
        props = self._props()
        if task is None:
            return props, None
        if self.task_error is not None:
            return props, {"info.state": "error", "info.error": self.task_error}
        return props, {"info.state": "running" if self.changed_at is not None else "success"}

    def shutdown(self, conn: Connection, ident: str) -> None:
        self._note("shutdown")
        self._change_later()

    def power_off(self, conn: Connection, ident: str) -> str:
        self._note("power_off")
        if self.refuse_power_off:
            raise vim.fault.InvalidPowerState(msg="The attempted operation cannot be performed")
        self._change_later()
        self.task = "task-7"
        return self.task

    def power_on(self, conn: Connection, ident: str) -> str:
        self._note("power_on")
        self._change_later()
        self.task = "task-8"
        return self.task

    def looks_after(self, moment: float) -> int:
        return sum(1 for at, what in self.calls if what == "look" and at >= moment)


@attrs.define
class Rig:
    clock: Clock
    threads: HeldThreadPool
    pool: SessionPool
    vsphere: VSphere
    vm: FakeVM
    logged_out: list[Connection]

    def settle(self, d: Deferred[Any], limit: float = 3600.0) -> tuple[float, Any]:
        """Advance the clock from call to call until ``d`` fires: (when it fired, its result)."""
        fired: list[tuple[float, Any]] = []
        d.addBoth(lambda result: fired.append((self.clock.seconds(), result)))
        while not fired:
            now = self.clock.seconds()
            assert now < limit, f"no answer after {limit} s"
            due = min(call.getTime() for call in self.clock.getDelayedCalls())
            self.clock.advance(max(due - now, 0.0))
        return fired[0]


@pytest.fixture
def rig() -> Iterator[Rig]:
    clock = Clock()
    threads = HeldThreadPool(at_once=True)
    pool = SessionPool(SameThread(), threads, clock=clock)  # type: ignore[arg-type]
    logged_out: list[Connection] = []

    def connect(credentials: Credentials, context: Any, timeout: float) -> Connection:
        return Connection(si=None, content=None, where=credentials.where, user=credentials.user)

    pool.connect_session = connect  # type: ignore[method-assign,assignment]
    pool.logout_session = logged_out.append  # type: ignore[method-assign,assignment]
    pool.drop_session = logged_out.append  # type: ignore[method-assign,assignment]
    vsphere = VSphere(pool)
    vm = FakeVM(clock)
    vsphere.find_power = vm.find  # type: ignore[method-assign]
    vsphere.look_power = vm.look  # type: ignore[method-assign]
    vsphere.shutdown_guest = vm.shutdown  # type: ignore[method-assign]
    vsphere.start_power_off = vm.power_off  # type: ignore[method-assign]
    vsphere.start_power_on = vm.power_on  # type: ignore[method-assign]
    yield Rig(clock, threads, pool, vsphere, vm, logged_out)
    threads.at_once = True
    threads.run()
    pool.close()
    threads.run()


def answer_of(result: Any) -> dict[str, Any]:
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, dict)
    return result


# -- power-off -------------------------------------------------------------------------


def test_a_guest_that_never_shuts_down_is_answered_within_50_s(rig: Rig) -> None:
    d = rig.vsphere.power_off(CREDS, VM_ID, False, SHA_OFF_TIMEOUT)
    at, result = rig.settle(d)
    answer = answer_of(result)
    # It waited as long as the bound allows, looking all along, and not longer.
    assert ANSWER_WITHIN - POLL_INTERVAL <= at <= ANSWER_WITHIN
    assert rig.vm.looks_after(ANSWER_WITHIN - 2 * POLL_INTERVAL) >= 1
    # success: the SHA goes on to poll power-state while new_state is not poweredOff.
    assert answer["success"] is True
    assert (answer["previous_state"], answer["new_state"], answer["shutdown_method"]) == (
        "poweredOn",
        "poweredOn",
        "graceful",
    )
    assert answer["duration_seconds"] == round(at)
    assert answer["message"] == (
        f"the guest is still shutting down after {round(at)} s (the VM is poweredOn); "
        f"it goes on: poll GET /api/v1/vm/{VM_ID}/power-state"
    )
    # Nothing harder than the shutdown asked for was tried.
    assert [what for _, what in rig.vm.calls if what not in ("find", "look")] == ["shutdown"]


def test_a_smaller_request_timeout_bounds_the_wait(rig: Rig) -> None:
    at, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, False, 20))
    assert 20 - POLL_INTERVAL <= at <= 20
    answer = answer_of(result)
    assert (answer["success"], answer["new_state"]) == (True, "poweredOn")
    assert "still shutting down" in answer["message"]


def test_a_guest_that_shuts_down_in_time_is_answered_when_off(rig: Rig) -> None:
    rig.vm.takes = 9.0
    at, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, False, SHA_OFF_TIMEOUT))
    assert 9.0 <= at < 9.0 + POLL_INTERVAL + 0.1
    answer = answer_of(result)
    assert (answer["success"], answer["new_state"], answer["message"]) == (
        True,
        "poweredOff",
        POWERED_OFF,
    )


def test_a_look_that_never_returns_is_cut_off_at_the_bound(rig: Rig) -> None:
    d = rig.vsphere.power_off(CREDS, VM_ID, False, SHA_OFF_TIMEOUT)
    # From t=9 vCenter takes calls but never answers them.
    rig.clock.callLater(9, setattr, rig.threads, "at_once", False)
    at, result = rig.settle(d)
    assert at == ANSWER_WITHIN
    assert rig.threads.pending, "a look was still under way"
    answer = answer_of(result)
    # The state as last read, at t=8.
    assert (answer["success"], answer["new_state"]) == (True, "poweredOn")
    assert "still shutting down" in answer["message"]


def test_a_login_that_never_ends_is_a_timeout_at_the_bound(rig: Rig) -> None:
    rig.threads.at_once = False
    at, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, False, SHA_OFF_TIMEOUT))
    assert at == ANSWER_WITHIN
    assert isinstance(result, Failure) and result.check(TimedOut)
    assert str(result.value) == "vCenter vc.example.com:443 did not finish finding VM " + (
        f"{VM_ID} within 50 s"
    )
    assert rig.vm.calls == []
    # The login ends after all: that session is logged out, not kept.
    rig.threads.run()
    assert len(rig.logged_out) == 1 and rig.pool.session_count == 0


def test_a_forced_power_off_task_still_running_is_answered_within_50_s(rig: Rig) -> None:
    at, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, True, SHA_OFF_TIMEOUT))
    assert at <= ANSWER_WITHIN
    answer = answer_of(result)
    assert (answer["success"], answer["new_state"], answer["shutdown_method"]) == (
        True,
        "poweredOn",
        "hard",
    )
    assert answer["message"].startswith(
        f"the power-off task task-7 is still running in vCenter after {round(at)} s"
    )
    assert "shutdown" not in [what for _, what in rig.vm.calls]


def test_a_forced_power_off_is_answered_when_its_task_ends(rig: Rig) -> None:
    rig.vm.takes = 0.3
    at, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, True, SHA_OFF_TIMEOUT))
    assert at < 1
    answer = answer_of(result)
    assert (answer["success"], answer["new_state"], answer["message"]) == (
        True,
        "poweredOff",
        POWERED_OFF,
    )


def test_a_failed_power_off_task_is_an_error(rig: Rig) -> None:
    rig.vm.takes = 5.0
    rig.vm.task_error = vim.fault.InvalidPowerState(msg="not now")
    _, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, True, SHA_OFF_TIMEOUT))
    assert isinstance(result, Failure) and result.check(Conflict)
    assert str(result.value) == f"powering off {VM_ID}: InvalidPowerState: not now"


def test_a_refused_power_off_of_a_vm_still_on_is_the_refusal(rig: Rig) -> None:
    rig.vm.refuse_power_off = True
    _, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, True, SHA_OFF_TIMEOUT))
    assert isinstance(result, Failure) and result.check(Conflict)


def test_without_tools_the_vm_is_powered_off(rig: Rig) -> None:
    rig.vm.tools = "toolsNotInstalled"
    rig.vm.takes = 0.0
    _, result = rig.settle(rig.vsphere.power_off(CREDS, VM_ID, False, SHA_OFF_TIMEOUT))
    answer = answer_of(result)
    assert (answer["new_state"], answer["shutdown_method"]) == ("poweredOff", "hard")


# -- power-on --------------------------------------------------------------------------


def test_a_power_on_task_still_running_is_answered_within_50_s(rig: Rig) -> None:
    rig.vm.state = "poweredOff"
    at, result = rig.settle(rig.vsphere.power_on(CREDS, VM_ID, False, 600))
    assert at <= ANSWER_WITHIN
    answer = answer_of(result)
    assert (answer["success"], answer["previous_state"], answer["new_state"]) == (
        True,
        "poweredOff",
        "poweredOff",
    )
    assert answer["message"].startswith("the power-on task task-8 is still running in vCenter")


def test_waiting_for_tools_ends_within_50_s(rig: Rig) -> None:
    rig.vm.state, rig.vm.tools, rig.vm.takes = "poweredOff", "toolsNotRunning", 1.0
    at, result = rig.settle(rig.vsphere.power_on(CREDS, VM_ID, True, SHA_ON_TIMEOUT))
    assert ANSWER_WITHIN - POLL_INTERVAL <= at <= ANSWER_WITHIN
    answer = answer_of(result)
    assert (answer["success"], answer["new_state"], answer["message"]) == (
        True,
        "poweredOn",
        f"VM powered on; VMware Tools not running after {round(at)} s",
    )


def test_a_power_on_is_answered_when_its_task_ends(rig: Rig) -> None:
    rig.vm.state, rig.vm.takes = "poweredOff", 0.5
    at, result = rig.settle(rig.vsphere.power_on(CREDS, VM_ID, True, SHA_ON_TIMEOUT))
    assert at < 1
    answer = answer_of(result)
    assert (answer["success"], answer["new_state"], answer["message"]) == (
        True,
        "poweredOn",
        "VM power-on completed successfully",
    )
