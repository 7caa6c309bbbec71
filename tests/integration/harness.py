"""The integration harness: ``twistd -n sna`` as a real process, driven over HTTP.

Every daemon runs on a free loopback port with its own state and log
directories, and with ``tests/sbc_double.py`` as its backup client.  Tests
talk to it with plain synchronous ``http.client`` calls and poll with short
sleeps against a deadline; nothing asserts on how long anything took.

The daemon probes every NBD target before it starts a job, so the ports
``nbd_ports()`` hands out (and ``backup_body`` uses) are served by real
``nbdkit memory`` processes, one per port, started on first use and shared
for the session (:class:`NbdPortServers`).

The fixtures that start and clean up daemons are in ``conftest.py``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar
from urllib.parse import quote

import pytest

from sna.contract.argv import option_value
from sna.contract.ids import log_file_name
from tests.integration.nbd_fixtures import NbdServerProcess, nbdkit_on_ports
from tests.sbc_double import JOB_MEMFD

REPO = Path(__file__).resolve().parents[2]
DOUBLE = REPO / "tests" / "sbc_double.py"
#: The backup-client command every daemon gets unless a test says otherwise.
SBC_COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(DOUBLE))}"
KILL_GRACE = 2
#: Generous upper bounds for waiting; tests never assert on how long things take.
START_DEADLINE = 30.0
JOB_DEADLINE = 20.0
STOP_DEADLINE = 20.0

#: Unique per test session, so a leftover process can be told apart from others.
RUN_TOKEN = uuid.uuid4().hex[:8]

T = TypeVar("T")


def twistd_command() -> list[str]:
    """The twistd of the interpreter running the tests."""
    beside = Path(sys.executable).with_name("twistd")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("twistd")
    if found is None:  # pragma: no cover - the dev extra installs Twisted
        pytest.fail("twistd not found next to the interpreter or on PATH")
    return [found]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    check: Callable[[], Optional[T]],
    what: str,
    deadline: float = JOB_DEADLINE,
    interval: float = 0.05,
) -> T:
    """Call ``check`` until it returns something other than None, False or an empty collection.

    (A 0 counts as an answer: an exit code, a count.)
    """
    end = time.monotonic() + deadline
    while True:
        result = check()
        empty = isinstance(result, (list, tuple, dict, set, str, bytes)) and not result
        if result is not None and result is not False and not empty:
            return result
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


# -- processes --------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[-1].split()[:1] == [b"Z"]


def job_of(pid: int) -> Optional[str]:
    """The job a process is a client of: its ``--job-id``, or for a spare double
    (whose argv names no job) the name of the memfd it holds; ``None`` if neither."""
    argv = cmdline(pid)
    job_id = option_value(argv, "--job-id")
    if job_id is not None:
        return job_id
    if "standby" not in argv:
        return None
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        name = target.removeprefix("/memfd:").removesuffix(" (deleted)")
        if name.startswith(JOB_MEMFD):
            return name.removeprefix(JOB_MEMFD)
    return None


def client_alive(pid: int, job_id: str) -> bool:
    """Whether ``pid`` is still a live (not zombie) double of ``job_id``."""
    return job_of(pid) == job_id and not is_zombie(pid)


def reaped(pid: int, job_id: str) -> bool:
    """The process is gone entirely: exited *and* waited for by its parent.

    A zombie still has a ``/proc`` entry, so this fails for a child nobody
    reaped.  A pid reused by an unrelated process counts as gone.
    """
    if not Path(f"/proc/{pid}").exists():
        return True
    if is_zombie(pid):
        return False
    return not client_alive(pid, job_id)


def doubles_of(job_ids: set[str]) -> list[int]:
    """Pids of live clients (doubles or real) of one of ``job_ids``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if job_of(int(entry.name)) in job_ids:
            found.append(int(entry.name))
    return found


def kill_doubles(job_ids: set[str]) -> list[int]:
    """SIGKILL every leftover double of ``job_ids``; returns their pids."""
    pids = doubles_of(job_ids) if job_ids else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# -- HTTP -------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        assert self.headers.get_content_type() == "application/json", (
            f"{self.status} answer is {self.headers.get('Content-Type')}: {self.text[:300]}"
        )
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.text[:500]}>"


class Api:
    """A tiny synchronous client of one daemon's ``/api/v1``."""

    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: Optional[bytes] = None,
        headers: Optional[dict[str, str]] = None,
        timeout: float = 30.0,
    ) -> Response:
        sent_headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent_headers.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=sent_headers)
            answer = conn.getresponse()
            return Response(answer.status, answer.headers, answer.read())
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, body, **kwargs)

    # -- conveniences over the routes -------------------------------------

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.post("/api/v1/backup/start", body)
        assert answer.status == 200, answer
        started: dict[str, Any] = answer.json()
        return started

    def status(self, job_id: str) -> dict[str, Any]:
        answer = self.get(f"/api/v1/status/{quote(job_id, safe='')}")
        assert answer.status == 200, answer
        status: dict[str, Any] = answer.json()
        return status

    def jobs(self, status: Optional[str] = None) -> dict[str, Any]:
        answer = self.get("/api/v1/jobs" + (f"?status={status}" if status else ""))
        assert answer.status == 200, answer
        jobs: dict[str, Any] = answer.json()
        return jobs

    def job_ids(self, status: Optional[str] = None) -> list[str]:
        return [job["job_id"] for job in self.jobs(status)["jobs"]]

    def wait_status(
        self, job_id: str, *statuses: str, deadline: float = JOB_DEADLINE
    ) -> dict[str, Any]:
        """Poll ``/status/{job_id}`` until the job is in one of ``statuses``."""
        last: dict[str, Any] = {}

        def check() -> Optional[dict[str, Any]]:
            nonlocal last
            last = self.status(job_id)
            return last if last["status"] in statuses else None

        try:
            return wait_for(check, f"job {job_id} to be {'/'.join(statuses)}", deadline)
        except pytest.fail.Exception:
            pytest.fail(f"job {job_id} never became {'/'.join(statuses)}; last status: {last}")

    def wait_progress(self, job_id: str) -> dict[str, Any]:
        """Poll until the client has reported some bytes (it is past its start)."""
        return wait_for(
            lambda: ((s := self.status(job_id))["bytes_done"] > 0 and s) or None,
            f"job {job_id} to report progress",
        )

    def spares_ready(self) -> int:
        """``sna_spare_clients{state="ready"}`` from /metrics (0 without spares)."""
        text = self.get("/metrics").text
        for line in text.splitlines():
            if line.startswith('sna_spare_clients{state="ready"}'):
                return int(float(line.split()[-1]))
        return 0

    def wait_spare_ready(self) -> None:
        """Poll until a spare client is ready, so the next job surely takes one."""
        wait_for(lambda: self.spares_ready() > 0, "a spare backup client to be ready")


# -- the daemon -------------------------------------------------------------


class Daemon:
    """One ``twistd -n sna`` process, restartable on the same directories."""

    def __init__(
        self,
        root: Path,
        sbc: str = SBC_COMMAND,
        extra: tuple[str, ...] = (),
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.root = root
        self.env = {**os.environ, **(env or {})}
        self.state_dir = root / "state"
        self.log_dir = root / "log"
        self.sbc = sbc
        self.extra = extra
        self.port = free_port()
        self.api = Api(self.port)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.runs = 0
        root.mkdir(parents=True, exist_ok=True)

    def argv(self, port: Optional[int] = None) -> list[str]:
        return [
            *twistd_command(),
            "-n",
            "--pidfile=",
            "sna",
            "--listen",
            f"tcp:{port or self.port}:interface=127.0.0.1",
            "--state-dir",
            str(self.state_dir),
            "--log-dir",
            str(self.log_dir),
            "--sbc",
            self.sbc,
            "--kill-grace",
            str(KILL_GRACE),
            *self.extra,
        ]

    @property
    def output_path(self) -> Path:
        return self.root / f"twistd-{self.runs}.log"

    def output(self) -> str:
        """Everything every run of this daemon wrote to stdout and stderr."""
        return "".join(
            p.read_text("utf-8", "replace") for p in sorted(self.root.glob("twistd-*.log"))
        )

    def spawn(self) -> subprocess.Popen[bytes]:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.runs += 1
        with open(self.output_path, "wb") as out:
            self.process = subprocess.Popen(
                self.argv(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self.process

    def start(self) -> Daemon:
        process = self.spawn()

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(
                    f"twistd exited with {process.returncode} while starting:\n"
                    + self.output_path.read_text("utf-8", "replace")
                )
            try:
                return self.api.get("/api/v1/health").status == 200
            except OSError:
                return False

        wait_for(healthy, f"sna on port {self.port} to answer /health", START_DEADLINE)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, deadline: float = STOP_DEADLINE) -> Optional[int]:
        """Signal the daemon and wait for it; SIGKILL if it outlives the deadline."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            return process.wait(deadline)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            pytest.fail(f"twistd ignored signal {sig} for {deadline} s")

    def shutdown(self) -> None:
        """For finalizers: TERM, and KILL if that is not enough; never fails."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def check_no_tracebacks(self) -> None:
        """An unhandled error anywhere in the daemon's life is a bug, even if answers looked fine."""
        output = self.output()
        for marker in ("Traceback (most recent call last)", "#critical]", "Unhandled error"):
            assert marker not in output, f"twistd logged {marker!r}:\n{output[-6000:]}"

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def job_log(self, job_id: str) -> Path:
        return self.log_dir / log_file_name(job_id)

    def job_logs(self) -> set[str]:
        return {p.name for p in self.log_dir.glob("backup-*.log")}


class JobIds:
    """Unique job ids for one test, remembered for the leftover-process sweep."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.made: set[str] = set()
        self._numbers = itertools.count(1)

    def __call__(self, what: str = "job") -> str:
        job_id = f"it-{RUN_TOKEN}-{self.tag}-{what}-{next(self._numbers)}"
        self.made.add(job_id)
        return job_id


#: The daemon's default allowed NBD ports (``--nbd-ports``).
NBD_PORT_RANGE = range(10100, 10201)
#: What each port of that range serves: nbdkit's RAM disk answers any export
#: name, so every test's per-VM exports pass the daemon's probe as they are.
NBDKIT_PLUGIN = ("memory", "64M")


class NbdPortServers:
    """Real NBD servers on the allowed port range, started as ports are handed out.

    The daemon probes every target before it starts a job, so a port handed
    to a test must answer NBD.  Each port gets one ``nbdkit memory`` the
    first time it is handed out, shared by every later test for the rest of
    the session; :meth:`stop_all` (the session finalizer) stops them by pid.
    Servers start ``batch`` ports at a time, in parallel, because starting
    them one by one would add up.  Ports some other process holds are skipped.
    """

    def __init__(self, ports: range = NBD_PORT_RANGE, batch: int = 8) -> None:
        self._ports = ports
        self._batch = batch
        self._next = 0
        self.directory: Optional[Path] = None
        self.servers: dict[int, NbdServerProcess] = {}
        self.taken_elsewhere: set[int] = set()

    def take(self) -> int:
        """The next port of the range, served by a live nbdkit."""
        for _ in range(len(self._ports)):
            port = self._ports[self._next]
            self._next = (self._next + 1) % len(self._ports)
            if port in self.taken_elsewhere:
                continue
            server = self.servers.get(port)
            if server is None or not server.alive():
                self._start_from(self._next - 1)
            if port in self.servers:
                return port
            self.taken_elsewhere.add(port)
        pytest.fail(f"no port of {self._ports} is free for an NBD server")

    def _start_from(self, index: int) -> None:
        """Start servers on the next ``batch`` ports from ``index`` that need one."""
        wanted = []
        for offset in range(len(self._ports)):
            port = self._ports[(index + offset) % len(self._ports)]
            server = self.servers.get(port)
            if port not in self.taken_elsewhere and (server is None or not server.alive()):
                wanted.append(port)
            if len(wanted) == self._batch:
                break
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="sna-it-nbd-"))
        started = nbdkit_on_ports(self.directory, wanted, NBDKIT_PLUGIN)
        self.servers.update(started)
        self.taken_elsewhere.update(set(wanted) - set(started))

    def stop_all(self) -> None:
        """TERM (then KILL) every server started; never fails."""
        servers, self.servers = list(self.servers.values()), {}
        for server in servers:
            if server.alive():
                server.process.terminate()
        for server in servers:
            server.stop()


#: The session's servers; ``conftest.py`` gives them a directory and stops them.
NBD_SERVERS = NbdPortServers()


def nbd_ports(count: int) -> list[int]:
    """Served ports of the allowed NBD range, different from recent tests' so jobs never collide."""
    return [NBD_SERVERS.take() for _ in range(count)]


def targets(ports: list[int], export: str = "pgtest1", first_key: int = 2000) -> str:
    return ",".join(
        f"{first_key + i}:nbd://127.0.0.1:{port}/{export}-disk{i}" for i, port in enumerate(ports)
    )


def backup_body(
    job_id: str,
    vm: str = "pgtest1",
    disks: int = 1,
    password: str = "vc-password-not-secret",
    **overrides: Any,
) -> dict[str, Any]:
    """A ``/backup/start`` body as the SHA sends it; the VM name picks the double's mode."""
    body: dict[str, Any] = {
        "job_id": job_id,
        "vm_name": vm,
        "vcenter_host": "vcenter.example.local",
        "vcenter_user": "administrator@vsphere.local",
        "vcenter_password": password,
        "vm_path": f"/DC1/vm/{vm}",
        "backup_type": "full",
        "nbd_host": "127.0.0.1",
    }
    if "nbd_targets" not in overrides:
        body["nbd_targets"] = targets(nbd_ports(disks), export=vm)
    body.update(overrides)
    return body


def double_lines(log_text: str, stream: str = "stdout") -> list[str]:
    """The lines the double printed on ``stream``, without the daemon's timestamps."""
    found = []
    for line in log_text.splitlines():
        _stamp, _, rest = line.partition(" ")
        name, _, text = rest.partition(" ")
        if name == stream:
            found.append(text)
    return found


def double_invocation(log_text: str) -> dict[str, Any]:
    """What the double says it was given: argv, env names, password_in_env."""
    for line in double_lines(log_text, "stderr"):
        if line.startswith("sbc-double: argv="):
            head, _, password_flag = line.rpartition(" password_in_env=")
            argv_text, _, env_text = head.removeprefix("sbc-double: argv=").partition(" env=")
            return {
                "argv": json.loads(argv_text),
                "env": json.loads(env_text),
                "password_in_env": password_flag == "true",
            }
    pytest.fail(f"no sbc-double invocation line in the job log:\n{log_text}")


def metric(daemon: Daemon, name: str, *, missing: Optional[float] = 0.0, **labels: str) -> float:
    """One sample of the daemon's ``GET /metrics``; ``missing`` when it has none
    (``missing=None``: a test failure, for a metric that must be there)."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = daemon.api.get("/metrics")
    assert answer.status == 200, answer
    assert answer.headers.get_content_type() == "text/plain"
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    if missing is None:
        pytest.fail(f"no {name} in /metrics")
    return missing
