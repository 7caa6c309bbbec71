"""Requests per second and latency of the sna HTTP API, beside a minimal Twisted web server.

Two requests are measured, each against two servers in the same run:

- ``GET /api/v1/health`` and ``POST /api/v1/backup/start`` on sna, started here
  as ``twistd -n sna`` with the backup-client double (``tests/sbc_double.py``,
  VM name ``ok``, which exits at once) as its ``--sbc``;
- the same paths on the reference: one twisted.web ``Resource`` answering a
  small JSON body on its own ``Site``, in a subprocess.

The ratio sna/reference of each figure is printed, so the figures can be
compared across machines.  The client is one Twisted process with a
persistent connection pool; on a fast server it is the bottleneck, which
compresses the ratios towards 1.

sna refuses a backup while ``--max-jobs`` jobs run (503) or while another
running job uses the same NBD port (409).  Such answers are counted
separately, the request is retried on the next port after a short pause, and
only 200 answers go into the latency figures.

When sna is started here, the helper process also answers NBD handshakes on a
block of loopback ports (no data is kept), which is passed to sna as
``--nbd-ports``: a daemon that probes its targets then finds them, and the
real 10100-10200 range, which tests may be using, is left alone.

Run ``make bench`` or ``.venv/bin/python benchmarks/api_bench.py --help``.
Everything listens on 127.0.0.1 only and is stopped on exit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "sbc_double.py"
HEALTH = "/api/v1/health"
BACKUP_START = "/api/v1/backup/start"


def reference_site() -> Any:
    """A ``Site`` whose one leaf resource answers every GET and POST with small JSON."""
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    class Reference(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            return json.dumps({"status": "healthy", "version": "reference"}).encode()

        def render_POST(self, request: Request) -> bytes:
            assert request.content is not None
            body = json.loads(request.content.read())
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            answer = {"job_id": body.get("job_id"), "status": "started", "pid": 0}
            return json.dumps(answer).encode()

    return Site(Reference())  # type: ignore[no-untyped-call]


NBD_IHAVEOPT = 0x49484156454F5054
NBD_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1
NBD_FLAG_NO_ZEROES = 2
NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_INFO, NBD_OPT_GO = 1, 2, 6, 7
NBD_REP_ACK, NBD_REP_INFO, NBD_REP_ERR_UNSUP = 1, 3, 2**31 + 1
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC = 0, 1, 2
# HAS_FLAGS, SEND_FLUSH, SEND_TRIM, SEND_WRITE_ZEROES
NBD_TRANSMISSION_FLAGS = 1 | 4 | 32 | 64
NBD_EXPORT_SIZE = 64 * 1024 * 1024


def nbd_factory() -> Any:
    """A fixed-newstyle NBD server that accepts any export name; reads are zeros, writes dropped."""
    from twisted.internet.protocol import Factory, Protocol

    class FakeNBD(Protocol):
        def __init__(self) -> None:
            self.buffer = b""
            self.state = "client-flags"
            self.no_zeroes = False

        def connectionMade(self) -> None:
            assert self.transport is not None
            flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
            self.transport.write(b"NBDMAGIC" + struct.pack(">QH", NBD_IHAVEOPT, flags))

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while self.step():
                pass

        def reply(self, option: int, kind: int, data: bytes = b"") -> None:
            assert self.transport is not None
            header = struct.pack(">QIII", NBD_REPLY_MAGIC, option, kind, len(data))
            self.transport.write(header + data)

        def close(self) -> bool:
            assert self.transport is not None
            self.buffer = b""
            self.transport.loseConnection()
            return False

        def step(self) -> bool:
            if self.state == "client-flags":
                if len(self.buffer) < 4:
                    return False
                (flags,) = struct.unpack(">I", self.buffer[:4])
                self.no_zeroes = bool(flags & NBD_FLAG_NO_ZEROES)
                self.buffer = self.buffer[4:]
                self.state = "options"
                return True
            if self.state == "options":
                return self.option()
            return self.command()

        def option(self) -> bool:
            assert self.transport is not None
            if len(self.buffer) < 16:
                return False
            magic, option, length = struct.unpack(">QII", self.buffer[:16])
            if magic != NBD_IHAVEOPT:
                return self.close()
            if len(self.buffer) < 16 + length:
                return False
            self.buffer = self.buffer[16 + length :]
            if option == NBD_OPT_EXPORT_NAME:
                padding = b"" if self.no_zeroes else bytes(124)
                info = struct.pack(">QH", NBD_EXPORT_SIZE, NBD_TRANSMISSION_FLAGS)
                self.transport.write(info + padding)
                self.state = "transmission"
            elif option in (NBD_OPT_INFO, NBD_OPT_GO):
                info = struct.pack(">HQH", 0, NBD_EXPORT_SIZE, NBD_TRANSMISSION_FLAGS)
                self.reply(option, NBD_REP_INFO, info)
                self.reply(option, NBD_REP_ACK)
                if option == NBD_OPT_GO:
                    self.state = "transmission"
            elif option == NBD_OPT_ABORT:
                self.reply(option, NBD_REP_ACK)
                return self.close()
            else:
                self.reply(option, NBD_REP_ERR_UNSUP)
            return True

        def command(self) -> bool:
            assert self.transport is not None
            if len(self.buffer) < 28:
                return False
            magic, _flags, kind, handle, _offset, length = struct.unpack(
                ">IHHQQI", self.buffer[:28]
            )
            if magic != NBD_REQUEST_MAGIC:
                return self.close()
            size = 28 + (length if kind == NBD_CMD_WRITE else 0)
            if len(self.buffer) < size:
                return False
            self.buffer = self.buffer[size:]
            if kind == NBD_CMD_DISC:
                return self.close()
            reply = struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, handle)
            self.transport.write(reply + (bytes(length) if kind == NBD_CMD_READ else b""))
            return True

    return Factory.forProtocol(FakeNBD)


def listen_port_block(reactor: Any, factory: Any, count: int) -> tuple[int, int]:
    """Listen on ``count`` consecutive free loopback ports; the first block that is all free."""
    from twisted.internet.error import CannotListenError

    for low in range(30100, 60000, 500):
        ports = []
        try:
            for port in range(low, low + count):
                ports.append(reactor.listenTCP(port, factory, interface="127.0.0.1"))
        except CannotListenError:
            for listening in ports:
                listening.stopListening()
            continue
        return low, low + count - 1
    raise SystemExit(f"no block of {count} free loopback ports found for the fake NBD targets")


def serve(nbd_ports: int) -> None:
    """Run the helper: print ``READY reference=PORT nbd=LOW-HIGH`` once listening."""
    from twisted.internet import reactor

    listening = reactor.listenTCP(0, reference_site(), interface="127.0.0.1")
    nbd = "-"
    if nbd_ports:
        low, high = listen_port_block(reactor, nbd_factory(), nbd_ports)
        nbd = f"{low}-{high}"
    print(f"READY reference={listening.getHost().port} nbd={nbd}", flush=True)  # type: ignore[attr-defined]
    reactor.run()


@dataclass
class Child:
    """A server process of this run, its output in ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_helper(workdir: Path, nbd_ports: int) -> tuple[Child, int, Optional[tuple[int, int]]]:
    log = workdir / "helper.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--serve-nbd-ports", str(nbd_ports)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    child = Child("reference", process, log)
    assert process.stdout is not None
    line = read_line(process.stdout, timeout=30.0)
    if not line.startswith("READY "):
        child.stop()
        raise SystemExit(f"the reference helper did not start:\n{line}\n{child.tail()}")
    fields = dict(item.split("=", 1) for item in line.split()[1:])
    nbd: Optional[tuple[int, int]] = None
    if fields["nbd"] != "-":
        low, high = fields["nbd"].split("-")
        nbd = (int(low), int(high))
    return child, int(fields["reference"]), nbd


def read_line(stream: IO[bytes], timeout: float) -> str:
    """One line from a child's pipe, or what came before ``timeout``."""
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(stream.fileno(), 1024)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_daemon(
    workdir: Path, twistd: str, max_jobs: int, nbd: Optional[tuple[int, int]]
) -> tuple[Child, int]:
    port = free_port()
    sbc = shlex.join([sys.executable, str(DOUBLE)])
    argv = [
        twistd,
        "-n",
        "--pidfile=",
        "sna",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--state-dir",
        str(workdir / "state"),
        "--log-dir",
        str(workdir / "log"),
        "--sbc",
        sbc,
        "--max-jobs",
        str(max_jobs),
        "--kill-grace",
        "5",
    ]
    if nbd is not None:
        argv += ["--nbd-ports", f"{nbd[0]}-{nbd[1]}"]
    log = workdir / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    return Child("sna", process, log), port


def wait_http(child: Optional[Child], url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as answer:
                if answer.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if child is not None and not child.alive():
            raise SystemExit(
                f"{child.name} exited with {child.process.returncode}:\n{child.tail()}"
            )
        if time.monotonic() > deadline:
            tail = child.tail() if child is not None else ""
            raise SystemExit(f"no answer from {url} within {timeout:g}s\n{tail}")
        time.sleep(0.1)


@dataclass
class Result:
    request: str
    server: str
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: The first answer body (or error) of each kind other than 200, to show why.
    samples: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile of the 200 answers, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
        return ordered[rank - 1] * 1000.0

    def other(self) -> str:
        parts = [f"{code}x{n}" for code, n in sorted(self.statuses.items()) if code != 200]
        parts += [f"{name}x{n}" for name, n in sorted(self.errors.items())]
        return " ".join(parts)


#: Makes the body of attempt ``attempt`` of request ``index``; ``None`` for no body.
BodyMaker = Callable[[int, int], Optional[bytes]]

RETRIED = (409, 503)


@dataclass
class Load:
    requests: int
    concurrency: int
    max_seconds: float
    retries: int = 50
    pause: float = 0.02


async def run_load(
    reactor: Any, load: Load, result: Result, method: str, url: str, body: BodyMaker
) -> Result:
    """``load.requests`` requests from ``load.concurrency`` workers; 409/503 answers retried."""
    import treq
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.task import deferLater
    from twisted.web.client import HTTPConnectionPool
    from twisted.web.http_headers import Headers

    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    pool.maxPersistentPerHost = load.concurrency
    pool.retryAutomatically = False
    headers = Headers({b"Content-Type": [b"application/json"]})
    indexes: Iterator[int] = itertools.count()
    started = time.perf_counter()
    deadline = started + load.max_seconds

    async def worker() -> None:
        for index in indexes:
            if index >= load.requests or time.perf_counter() > deadline:
                return
            for attempt in range(load.retries + 1):
                begun = time.perf_counter()
                try:
                    answer = await treq.request(
                        method, url, data=body(index, attempt), headers=headers, pool=pool
                    )
                    content = await answer.content()
                except Exception as e:
                    result.errors[type(e).__name__] += 1
                    result.samples.setdefault(type(e).__name__, str(e)[:200])
                    break
                took = time.perf_counter() - begun
                result.statuses[answer.code] += 1
                if answer.code == 200:
                    result.latencies.append(took)
                    break
                result.samples.setdefault(str(answer.code), content.decode(errors="replace")[:200])
                if answer.code not in RETRIED or time.perf_counter() > deadline:
                    break
                await deferLater(reactor, load.pause, lambda: None)

    try:
        workers = [Deferred.fromCoroutine(worker()) for _ in range(load.concurrency)]
        await gatherResults(workers, consumeErrors=True)
    finally:
        result.elapsed = time.perf_counter() - started
        await pool.closeCachedConnections()  # type: ignore[no-untyped-call]
    return result


def backup_bodies(run: str, ports: Iterator[int]) -> BodyMaker:
    """Backup requests with a fresh job_id per attempt and the next of ``ports`` each time."""

    def make(index: int, attempt: int) -> bytes:
        port = next(ports)
        request = {
            "job_id": f"bench-{run}-{index}-{attempt}",
            "vm_name": "ok",
            "vcenter_host": "127.0.0.1",
            "vcenter_user": "bench@vsphere.local",
            "vcenter_password": "bench-password",
            "vm_path": "/BenchDC/vm/ok",
            "nbd_targets": f"2000:nbd://127.0.0.1:{port}/ok-disk0",
            "backup_type": "full",
        }
        return json.dumps(request).encode()

    return make


def no_body(index: int, attempt: int) -> Optional[bytes]:
    return None


@dataclass
class Plan:
    servers: dict[str, str]  # name -> base URL
    get: Load
    post: Load
    nbd_ports: tuple[int, int]
    warmup: int


async def bench(reactor: Any, plan: Plan) -> list[Result]:
    results = []
    run = f"{os.getpid()}-{int(time.time())}"
    # One cycle for the whole run, so that a request never reuses the port of a recent one.
    ports = itertools.cycle(range(plan.nbd_ports[0], plan.nbd_ports[1] + 1))
    variants: list[tuple[str, str, Load, Callable[[str], BodyMaker]]] = [
        (f"GET {HEALTH}", HEALTH, plan.get, lambda server: no_body),
        (
            f"POST {BACKUP_START}",
            BACKUP_START,
            plan.post,
            lambda server: backup_bodies(f"{run}-{server}", ports),
        ),
    ]
    for label, path, load, bodies in variants:
        if load.requests <= 0:
            continue
        method = label.split()[0]
        for server, base in plan.servers.items():
            url = base + path
            if plan.warmup:
                warm = Load(min(plan.warmup, load.requests), load.concurrency, load.max_seconds)
                await run_load(
                    reactor, warm, Result(label, server), method, url, bodies(f"{server}-w")
                )
            print(f"  {label} on {server} ...", file=sys.stderr, flush=True)
            result = await run_load(
                reactor, load, Result(label, server), method, url, bodies(server)
            )
            results.append(result)
    return results


def ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b == 0:  # NaN or nothing to divide by
        return "-"
    return f"{a / b:.2f}"


def report(results: Sequence[Result]) -> str:
    head = (
        f"{'request':<28} {'server':<10} {'ok':>6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  other"
    )
    lines = [head, "-" * len(head)]
    by_request: dict[str, dict[str, Result]] = {}
    for result in results:
        by_request.setdefault(result.request, {})[result.server] = result
    for request, row in by_request.items():
        for result in row.values():
            lines.append(
                f"{request:<28} {result.server:<10} {result.ok:>6} {result.rate:>9.1f}"
                f" {result.percentile(0.50):>8.2f} {result.percentile(0.99):>8.2f}"
                f"  {result.other()}".rstrip()
            )
        if "sna" in row and "reference" in row:
            sna, ref = row["sna"], row["reference"]
            lines.append(
                f"{request:<28} {'sna/ref':<10} {'':>6} {ratio(sna.rate, ref.rate):>9}"
                f" {ratio(sna.percentile(0.5), ref.percentile(0.5)):>8}"
                f" {ratio(sna.percentile(0.99), ref.percentile(0.99)):>8}"
            )
        lines.append("")
    for result in results:
        for kind, sample in result.samples.items():
            lines.append(f"first {kind} from {result.server} on {result.request}: {sample.strip()}")
    if any(result.samples for result in results):
        lines.append("")
    lines.append(
        "ok: 200 answers (the only ones in req/s and latency); other: non-200 answers and"
        f" client errors; {', '.join(map(str, RETRIED))} are retried on the next port."
    )
    lines.append(
        "sna/ref: req/s below 1 and latency above 1 mean sna is slower than the reference."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the sna HTTP API against a minimal twisted.web server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000, help="GET requests per server")
    parser.add_argument("--concurrency", type=int, default=16, help="GET clients at once")
    parser.add_argument(
        "--post-requests", type=int, default=300, help="backup/start requests per server (0: skip)"
    )
    parser.add_argument("--post-concurrency", type=int, default=4, help="POST clients at once")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop each variant after this long"
    )
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    parser.add_argument(
        "--servers",
        default="sna,reference",
        help="comma-separated subset of sna,reference to benchmark",
    )
    parser.add_argument(
        "--url",
        help="benchmark this running sna (e.g. http://127.0.0.1:8081) instead of starting one",
    )
    parser.add_argument(
        "--nbd-ports",
        default="10100-10200",
        help="target ports for --url (a started sna gets its own block of fake NBD targets)",
    )
    parser.add_argument("--max-jobs", type=int, default=64, help="--max-jobs of the started sna")
    parser.add_argument(
        "--twistd", default=str(Path(sys.executable).with_name("twistd")), help="twistd to run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-nbd-ports", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - {"sna", "reference"}:
        parser.error("--servers takes sna, reference or both")
    low, _, high = args.nbd_ports.partition("-")
    try:
        args.nbd_ports = (int(low), int(high or low))
    except ValueError:
        parser.error(f"--nbd-ports must look like 10100-10200, not {args.nbd_ports!r}")
    if os.sep in args.twistd:
        args.twistd = os.path.abspath(args.twistd)
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve_nbd_ports)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="sna-bench-"))
    children: list[Child] = []
    try:
        servers: dict[str, str] = {}
        nbd_ports: tuple[int, int] = args.nbd_ports
        own_daemon = "sna" in args.servers and not args.url
        ref_port, fake_nbd = None, None
        if "reference" in args.servers or own_daemon:
            helper, ref_port, fake_nbd = start_helper(workdir, 101 if own_daemon else 0)
            children.append(helper)
        if "sna" in args.servers:
            if args.url:
                servers["sna"] = args.url.rstrip("/")
            else:
                daemon, port = start_daemon(workdir, args.twistd, args.max_jobs, fake_nbd)
                children.append(daemon)
                servers["sna"] = f"http://127.0.0.1:{port}"
                nbd_ports = fake_nbd or nbd_ports
            wait_http(children[-1] if own_daemon else None, servers["sna"] + HEALTH)
        if "reference" in args.servers:
            servers["reference"] = f"http://127.0.0.1:{ref_port}"
            wait_http(children[0], servers["reference"] + HEALTH)

        plan = Plan(
            servers=servers,
            get=Load(args.requests, args.concurrency, args.max_seconds),
            post=Load(args.post_requests, args.post_concurrency, args.max_seconds),
            nbd_ports=nbd_ports,
            warmup=args.warmup,
        )
        print(
            f"sna API benchmark: GET {args.requests} requests x {args.concurrency} clients,"
            f" POST {args.post_requests} requests x {args.post_concurrency} clients,"
            f" NBD ports {nbd_ports[0]}-{nbd_ports[1]}",
            flush=True,
        )
        for name, base in servers.items():
            print(f"  {name}: {base}", flush=True)
        results = run_reactor(plan)
        print()
        print(report(results))
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_reactor(plan: Plan) -> list[Result]:
    """Run :func:`bench` on the global reactor until it finishes."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    outcome: list[Any] = []

    def finish(value: Any) -> None:
        outcome.append(value)
        reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(bench(reactor, plan)).addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise SystemExit("interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    results: list[Result] = outcome[0]
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
