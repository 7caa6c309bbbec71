"""The testbed: a vCenter simulator with CBT, and optionally the hub's NBD targets.

A testbed lives in a work directory::

    spec.json       the spec as the simulator reads it
    state.json      pids of the running processes, and the info below (0600)
    info.json       what ``up`` prints: vCenter URL, credentials, VMs, targets (0600)
    vcsim.log       the simulator's output
    vcenter.pem     the simulator's TLS certificate
    datastore/      the datastore: <vm>/<vm>.vmdk and <vm>-flat.vmdk, ...
    hub/            <vm>-diskN.qcow2 and qemu-nbd logs
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from tests.testbed import binary, data, hub, procs
from tests.testbed.errors import TestbedError

#: Where ``up`` and ``down`` keep their state unless told otherwise.
DEFAULT_STATE_DIR = binary.REPO / "var" / "testbed"
START_DEADLINE = 30.0
CONTROL_TIMEOUT = 120.0
#: Who owns the processes of a state directory: a ``python -m tests.testbed up``
#: (which ``down`` asks to stop) or a program using the API.
OWNER_UP = "up"
OWNER_API = "api"

SpecLike = Union[Mapping[str, Any], str, Path]


def load_spec(spec: SpecLike) -> dict[str, Any]:
    """A spec from a mapping or a JSON file, with its top level checked.

    The simulator checks the VMs and disks itself (unknown keys, controllers,
    buses, capacities) and its message is raised as a TestbedError.
    """
    if isinstance(spec, (str, Path)):
        try:
            loaded = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as e:
            raise TestbedError(f"cannot read the spec {spec}: {e}") from e
    else:
        loaded = json.loads(json.dumps(spec))  # a deep copy, and JSON-able
    if not isinstance(loaded, dict):
        raise TestbedError("a spec is a JSON object")
    vms = loaded.get("vms", [])
    if not isinstance(vms, list) or not all(isinstance(vm, dict) for vm in vms):
        raise TestbedError('spec "vms" is a list of objects')
    hub_options(loaded)
    return loaded


class HubOptions(NamedTuple):
    shared: int
    ports: range


def hub_options(spec: Mapping[str, Any]) -> Optional[HubOptions]:
    """The spec's hub: None, or qemu-nbd's --shared and the ports to use.

    ``"hub"`` is ``true``, ``false`` or ``{"shared": N, "ports": [LO, HI]}``
    (both optional; the ports default to sna's NBD range, 10100-10200).
    """
    option = spec.get("hub", False)
    if option is False:
        return None
    if option is True:
        return HubOptions(hub.DEFAULT_SHARED, hub.PORTS)
    problem = 'spec "hub" is true, false or {"shared": N, "ports": [LO, HI]}'
    if not isinstance(option, dict) or not set(option) <= {"shared", "ports"}:
        raise TestbedError(problem)
    shared = option.get("shared", hub.DEFAULT_SHARED)
    ports = option.get("ports", [hub.PORTS.start, hub.PORTS.stop - 1])
    if (
        not isinstance(shared, int)
        or shared < 0
        or not isinstance(ports, list)
        or len(ports) != 2
        or not all(isinstance(p, int) for p in ports)
        or not 0 < ports[0] <= ports[1] < 65536
    ):
        raise TestbedError(problem)
    return HubOptions(shared, range(ports[0], ports[1] + 1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_private_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=2)
        out.write("\n")
    os.replace(tmp, path)


def _stop_all(
    records: Iterable[procs.ProcessRecord], children: Mapping[int, Any], grace: float
) -> list[procs.ProcessRecord]:
    """Stop processes, NBD servers before the simulator; return those that were running."""
    stopped = []
    for record in sorted(records, key=lambda r: r.role == "vcsim"):
        if procs.stop(record, children.get(record.pid), grace):
            stopped.append(record)
    return stopped


class Testbed:
    """A running testbed: use ``Testbed.start`` (own processes) or ``Testbed.attach``.

    ``info`` is what ``up`` prints.  A started testbed is stopped by ``stop()``,
    by leaving its ``with`` block, or at the latest when the interpreter exits.
    """

    __test__ = False

    def __init__(self, workdir: Path, info: dict[str, Any], owned: bool) -> None:
        self.workdir = workdir
        self.info = info
        self.owned = owned
        self._children: dict[int, Any] = {}
        self._records: list[procs.ProcessRecord] = []
        self._targets: list[hub.Target] = []
        self._finalizer: Optional[weakref.finalize[Any, Any]] = None
        self._ssl: Optional[ssl.SSLContext] = None
        self._owner = OWNER_API
        self._hub: Optional[HubOptions] = None

    # -- starting and stopping ---------------------------------------------

    @classmethod
    def start(
        cls,
        spec: SpecLike,
        workdir: Union[str, Path],
        *,
        owner: str = OWNER_API,
        start_deadline: float = START_DEADLINE,
        die_with_parent: bool = True,
    ) -> Testbed:
        """Start the simulator (and the hub's targets, if the spec asks) in ``workdir``.

        Blocks until everything answers.  ``die_with_parent`` has the kernel
        stop the processes if this one dies without cleaning up; it ties them
        to the calling *thread*, so call from a thread that outlives them.
        """
        loaded = load_spec(spec)
        workdir = Path(workdir).resolve()
        _prepare(workdir)
        testbed = cls(workdir, {}, owned=True)
        testbed._owner = owner
        testbed._finalizer = weakref.finalize(
            testbed, _stop_all, testbed._records, testbed._children, 2.0
        )
        try:
            testbed._start(loaded, start_deadline, die_with_parent)
        except BaseException:
            testbed.stop()
            raise
        return testbed

    def _start(self, spec: dict[str, Any], start_deadline: float, die_with_parent: bool) -> None:
        program = binary.simulator_binary()
        spec_file = self.workdir / "spec.json"
        _write_private_json(spec_file, spec)
        sim_info = self.workdir / "vcsim-info.json"
        log = self.workdir / "vcsim.log"
        argv = [
            str(program),
            "-l",
            "127.0.0.1:0",
            "-spec",
            str(spec_file),
            "-dir",
            str(self.workdir / "datastore"),
            "-info",
            str(sim_info),
            "-cert",
            str(self.workdir / "vcenter.pem"),
        ]
        process, record = procs.spawn("vcsim", argv, log, die_with_parent=die_with_parent)
        self._adopt(process, record)
        self._save_state()
        end = time.monotonic() + start_deadline
        while not sim_info.exists():
            if process.poll() is not None:
                raise TestbedError(
                    f"the simulator exited with {process.returncode}:\n{procs.log_tail(log)}"
                )
            if time.monotonic() > end:
                raise TestbedError(f"the simulator did not start in {start_deadline} s")
            time.sleep(0.02)
        inventory = _read_json(sim_info)
        sim_info.unlink()

        vms = inventory["vms"][: len(spec.get("vms", []))]
        self.info = {
            "vcenter": inventory["vcenter"],
            "vms": vms,
            "targets": [],
            "cbt": inventory["cbt"],
            "state_dir": str(self.workdir),
        }
        self._hub = hub_options(spec)
        if self._hub is not None:
            hub_dir = self.workdir / "hub"
            hub_dir.mkdir(exist_ok=True)
            for vm in vms:
                for index, disk in enumerate(vm["disks"]):
                    export = f"{vm['name']}-disk{index}"
                    qcow2 = hub_dir / f"{export}.qcow2"
                    hub.create_qcow2(qcow2, disk["capacity_bytes"])
                    target = hub.serve(
                        vm["name"],
                        disk["key"],
                        export,
                        qcow2,
                        hub_dir,
                        shared=self._hub.shared,
                        ports=self._hub.ports,
                        die_with_parent=die_with_parent,
                    )
                    self._add_target(target)
        self._save_state()

    def _adopt(self, process: Any, record: procs.ProcessRecord) -> None:
        self._children[record.pid] = process
        self._records.append(record)

    def _add_target(self, target: hub.Target) -> None:
        self._adopt(target.process, target.record)
        self._targets.append(target)
        self.info["targets"].append(target.to_json())

    def _save_state(self) -> None:
        state = {
            "owner": self._owner,
            "owner_pid": os.getpid(),
            "owner_start_time": procs.start_time(os.getpid()),
            "processes": [r.to_json() for r in self._records],
            "info": self.info,
        }
        _write_private_json(self.workdir / "state.json", state)
        if self.info:
            _write_private_json(self.workdir / "info.json", self.info)

    @classmethod
    def attach(cls, workdir: Union[str, Path] = DEFAULT_STATE_DIR) -> Testbed:
        """A handle on a testbed some other process started (``up``, or a test)."""
        workdir = Path(workdir).resolve()
        try:
            state = _read_json(workdir / "state.json")
        except (OSError, ValueError) as e:
            raise TestbedError(
                f"no testbed is running in {workdir} (start one with "
                "`python -m tests.testbed up --spec SPEC.json`)"
            ) from e
        testbed = cls(workdir, state["info"], owned=False)
        testbed._records = [procs.ProcessRecord.from_json(p) for p in state["processes"]]
        return testbed

    def stop(self, grace: float = procs.STOP_GRACE) -> list[procs.ProcessRecord]:
        """Stop every process of this testbed; returns those that were still running.

        On an attached testbed this stops the processes by pid, without
        asking their owner.
        """
        stopped = _stop_all(self._records, self._children, grace)
        if self._finalizer is not None:
            self._finalizer.detach()
        state = self.workdir / "state.json"
        if self.owned or not self.running():
            state.unlink(missing_ok=True)
        return stopped

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        return [r.pid for r in self._records]

    def running(self) -> list[procs.ProcessRecord]:
        """The processes of this testbed that still run."""
        return [r for r in self._records if procs.is_running(r)]

    def check(self) -> None:
        """Raise if a process of the testbed has died."""
        dead = [r for r in self._records if not procs.is_running(r)]
        if dead:
            names = ", ".join(f"{r.role} (pid {r.pid})" for r in dead)
            raise TestbedError(f"testbed process died: {names}; see the logs in {self.workdir}")

    # -- what is in it -------------------------------------------------------

    @property
    def vcenter(self) -> dict[str, Any]:
        vcenter: dict[str, Any] = self.info["vcenter"]
        return vcenter

    @property
    def vms(self) -> list[dict[str, Any]]:
        vms: list[dict[str, Any]] = self.info["vms"]
        return vms

    @property
    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.info["targets"]
        return targets

    @property
    def block_size(self) -> int:
        return int(self.info["cbt"]["block_size"])

    def vm(self, vm: str) -> dict[str, Any]:
        """A VM of the spec by name, inventory path or moref."""
        for candidate in self.vms:
            if vm in (candidate["name"], candidate["path"], candidate["moref"]):
                return candidate
        raise TestbedError(f"no VM {vm!r} in this testbed's spec")

    def disk(self, vm: str, disk_key: int) -> dict[str, Any]:
        for disk in self.vm(vm)["disks"]:
            if disk["key"] == disk_key:
                result: dict[str, Any] = disk
                return result
        raise TestbedError(f"VM {vm!r} has no disk with key {disk_key}")

    def target(self, vm: str, disk_key: int) -> dict[str, Any]:
        name = self.vm(vm)["name"]
        for target in self.targets:
            if target["vm"] == name and target["disk_key"] == disk_key:
                return target
        raise TestbedError(f"no NBD target for {name} disk {disk_key}")

    def ssl_context(self) -> ssl.SSLContext:
        """A context that trusts exactly the simulator's certificate."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self.vcenter["cert_file"])
        return self._ssl

    def connect(self, **kwargs: Any) -> Any:
        """A pyVmomi ServiceInstance, the certificate verified; ``Disconnect`` it after."""
        from pyVim.connect import SmartConnect

        options: dict[str, Any] = {
            "host": self.vcenter["host"],
            "port": self.vcenter["port"],
            "user": self.vcenter["user"],
            "pwd": self.vcenter["password"],
            "sslContext": self.ssl_context(),
        }
        options.update(kwargs)
        return SmartConnect(**options)  # type: ignore[no-untyped-call]

    # -- the control endpoint ------------------------------------------------

    def _control(
        self,
        method: str,
        endpoint: str,
        params: Mapping[str, Union[str, int]],
        body: Optional[Iterable[bytes]] = None,
        length: Optional[int] = None,
    ) -> dict[str, Any]:
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        conn = http.client.HTTPSConnection(
            self.vcenter["host"],
            self.vcenter["port"],
            context=self.ssl_context(),
            timeout=CONTROL_TIMEOUT,
        )
        headers = {}
        if length is not None:
            headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
        try:
            conn.request(method, f"/testbed/{endpoint}?{query}", body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except OSError as e:
            raise TestbedError(
                f"the simulator at {self.vcenter['url']} does not answer: {e}"
            ) from e
        finally:
            conn.close()
        try:
            answer: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise TestbedError(f"{endpoint}: HTTP {response.status}: {raw[:300]!r}") from e
        if response.status != 200:
            raise TestbedError(answer.get("error", f"{endpoint}: HTTP {response.status}"))
        return answer

    def write(
        self,
        vm: str,
        disk_key: int,
        offset: int,
        length: int,
        seed: Optional[int] = None,
        zero: bool = False,
    ) -> dict[str, Any]:
        """Write ``length`` bytes at ``offset`` of a disk, and mark them changed for CBT.

        The bytes are the seeded pattern (see ``data.pattern``; seed 0 when
        neither is given) or zeros.  ``vm`` is a name, an inventory path or
        a moref, also of VMs created at run time.  Returns the simulator's
        answer: the blocks marked, the disk's current change ID and the areas
        changed since it.
        """
        if zero and seed is not None:
            raise TestbedError("write either a seeded pattern or zeros, not both")
        if offset < 0 or length <= 0:
            raise TestbedError(f"cannot write {length} bytes at offset {offset}")
        params: dict[str, Union[str, int]] = {"vm": vm, "disk": disk_key, "offset": offset}
        if zero:
            params.update(zero=1, length=length)
            return self._control("POST", "write", params)
        pieces = data.pattern_chunks(seed or 0, offset, length)
        return self._control("POST", "write", params, body=pieces, length=length)

    def read(self, vm: str, disk_key: int, offset: int, length: int) -> bytes:
        """Bytes of a disk, straight from its flat file."""
        with open(self.disk(vm, disk_key)["flat_file"], "rb") as f:
            f.seek(offset)
            return f.read(length)

    def cbt_state(self, vm: str, disk_key: int) -> dict[str, Any]:
        """A disk's tracking state: change ID, areas written, pending, history."""
        return self._control("GET", "cbt", {"vm": vm, "disk": disk_key})

    def inventory(self) -> dict[str, Any]:
        """The simulator's current inventory (VMs created or changed at run time too)."""
        return self._control("GET", "inventory", {})

    def add_target(
        self,
        vm: str,
        disk_key: int,
        *,
        export: Optional[str] = None,
        backing: Optional[Path] = None,
        shared: int = hub.DEFAULT_SHARED,
    ) -> dict[str, Any]:
        """Serve one more NBD target for a disk: a fresh qcow2 of its capacity, or
        an overlay on ``backing`` (an earlier backup), as the hub does for incrementals.

        The export is named ``{vm}-{disk_key}-{n}``, n counting the qcow2 files
        made so, unless given.
        """
        if not self.owned:
            raise TestbedError("targets can be added only by the process that started the testbed")
        name = self.vm(vm)["name"]
        capacity = self.disk(vm, disk_key)["capacity_bytes"]
        hub_dir = self.workdir / "hub"
        hub_dir.mkdir(exist_ok=True)
        if export is None:
            n = 0
            while (hub_dir / f"{name}-{disk_key}-{n}.qcow2").exists():
                n += 1
            export = f"{name}-{disk_key}-{n}"
        qcow2 = hub_dir / f"{export}.qcow2"
        hub.create_qcow2(qcow2, capacity, backing)
        ports = self._hub.ports if self._hub is not None else hub.PORTS
        target = hub.serve(name, disk_key, export, qcow2, hub_dir, shared=shared, ports=ports)
        self._add_target(target)
        self._save_state()
        return target.to_json()

    def pause_vcenter(self) -> procs.Paused:
        """Hold the simulator with SIGSTOP: vCenter hung (connections accepted, nothing
        answered) until the pause is resumed; use it as a context manager."""
        [record] = [r for r in self._records if r.role == "vcsim"]
        return procs.Paused(record)

    def pause_target(self, export: str) -> procs.Paused:
        """Hold the qemu-nbd serving ``export`` with SIGSTOP: a hung hub."""
        for target in self._targets:
            if target.export == export:
                return procs.Paused(target.record)
        raise TestbedError(f"no target {export!r} in this testbed")

    def stop_target(self, export: str) -> None:
        """Stop serving a target (its qcow2 stays), for instance before an overlay
        on it is served: qemu-nbd locks the qcow2 it serves, backing files included.
        """
        for target in self._targets:
            if target.export == export:
                procs.stop(target.record, target.process)
                self._targets.remove(target)
                self._records.remove(target.record)
                self._children.pop(target.record.pid, None)
                self.info["targets"] = [t for t in self.targets if t["export"] != export]
                self._save_state()
                return
        raise TestbedError(f"no target {export!r} in this testbed")


def _prepare(workdir: Path) -> None:
    """Make ``workdir`` ready for a new testbed, refusing if one still runs there."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state.json"
    if state.exists():
        try:
            old = Testbed.attach(workdir)
        except (TestbedError, KeyError, TypeError, ValueError):
            old = None
        if old is not None and old.running():
            pids = ", ".join(str(r.pid) for r in old.running())
            raise TestbedError(
                f"a testbed is already running in {workdir} (pids {pids}); "
                f"stop it with `python -m tests.testbed down --state {workdir}`"
            )
    for name in ("datastore", "hub"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("state.json", "info.json", "spec.json", "vcsim.log", "vcenter.pem"):
        (workdir / name).unlink(missing_ok=True)


def stop_state_dir(workdir: Union[str, Path], deadline: float = 20.0) -> list[procs.ProcessRecord]:
    """What ``down`` does: stop the testbed of a state directory.

    An ``up`` still running is asked to stop (SIGTERM) and given ``deadline``
    to do so; whatever still runs after that, or whose ``up`` is gone, is
    stopped by pid.  Returns the processes that were running.
    """
    workdir = Path(workdir).resolve()
    testbed = Testbed.attach(workdir)
    state = _read_json(workdir / "state.json")
    owner = procs.ProcessRecord(
        "up", int(state["owner_pid"]), int(state.get("owner_start_time") or -1), "python"
    )
    before = sorted(testbed.running(), key=lambda r: r.role == "vcsim")
    if state.get("owner") == OWNER_UP and procs.is_running(owner) and owner.pid != os.getpid():
        os.kill(owner.pid, signal.SIGTERM)
        end = time.monotonic() + deadline
        while procs.is_running(owner) and time.monotonic() < end:
            time.sleep(0.05)
        if procs.is_running(owner):
            procs.stop(owner)
    testbed.stop()
    (workdir / "state.json").unlink(missing_ok=True)
    return before
