"""Throughput and CPU cost of sna's NBD relay against a direct copy and socat.

Two groups, run interleaved (every round runs each variant of each group
once, in a shuffled order with a fixed seed), following the method of
the team's NBD baselines (``nbd-baselines.md``, kept outside this repository):

``qcow2``
    ``nbdcopy --flush`` of a random-data source into a fresh qcow2 served by a
    fresh ``qemu-nbd``: ``direct`` and through the ``sna`` relay.
    Target: the median sna/direct ratio is at least 0.92.
``null``
    The same copy into ``nbdkit null`` (writes discarded), so the relay's own
    ceiling shows: ``direct``, ``sna`` and ``socat -b 1048576``.
    Target: sna at least socat's throughput at no more relay CPU per GiB.

Throughput is the source size over nbdcopy's wall-clock time.  CPU is user +
system seconds per GiB copied, for every process of a run: nbdcopy (from
``wait4``), the server and the relay (from ``/proc/<pid>/stat``, counted
from just before the copy to just after it, children included, so the
relay's Python start-up is not charged to the copy).  The relay runs in its
own process: this script re-runs itself with ``--serve-relay``.

Everything listens on 127.0.0.1 on free ports.  Data lives in a temporary
directory (``--data-dir`` to choose or keep one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 1 << 30
MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[1]

GROUPS = {
    "qcow2": ["direct", "sna"],
    "null": ["direct", "sna", "socat"],
}
QCOW2_TARGET_RATIO = 0.92


# -- the relay process ------------------------------------------------------


def serve_relay(target: str, data_path: str) -> None:
    """Run one sna relay until SIGTERM; print its port, then its final stats as JSON."""
    sys.path.insert(0, str(REPO))
    import attrs
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from sna.nbd.relay import Relay

    host, _, port = target.rpartition(":")
    relay = Relay(
        reactor,
        host,
        int(port),
        job_id="bench",
        disk_key="2000",
        export="export",
        data_path=data_path,  # type: ignore[arg-type]
    )

    async def start() -> None:
        listen_port = await relay.start()
        print(listen_port, relay.data_path, flush=True)

    def stop() -> Deferred[None]:
        def report(_: None) -> None:
            stats = attrs.asdict(relay.stats())
            print(json.dumps(stats), flush=True)

        return relay.stop().addCallback(report)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()))
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


# -- processes and their CPU ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[Any], what: str, deadline: float = 15) -> None:
    end = time.monotonic() + deadline
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise SystemExit(f"{what} does not listen on {port}") from None
            time.sleep(0.02)


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all threads) and of its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the ")" the fields start at state (field 3): utime is 14, cstime 17
    return sum(int(x) for x in fields[11:15])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def machine_busy_ticks() -> int:
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts[:8]) - idle


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def started(
    argv: Sequence[str], log: Path, port: Optional[int], what: str, **kw: Any
) -> Iterator[subprocess.Popen[Any]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=kw.pop("stdout", out), stderr=out, **kw)
    try:
        if port is not None:
            wait_port(port, proc, what)
        yield proc
    finally:
        stop_process(proc)


# -- one run ------------------------------------------------------------------


@dataclass
class Result:
    group: str
    variant: str
    round: int
    seconds: float
    size: int
    client_cpu: float
    server_cpu: float
    relay_cpu: Optional[float]
    relay_rss_mib: Optional[float]
    machine_busy: float
    relay_bytes_to_hub: Optional[int] = None
    relay_data_path: Optional[str] = None

    @property
    def mib_s(self) -> float:
        return self.size / MIB / self.seconds


@dataclass
class StartedRelay:
    proc: subprocess.Popen[Any]
    port: int
    data_path: Optional[str]


@dataclass
class Bench:
    data: Path
    source: Path
    size: int
    relay_path: str
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.data / "logs"
        self.logs.mkdir(exist_ok=True)

    def run(self, group: str, variant: str, rnd: int) -> Result:
        server_port = free_port()
        log = self.logs / f"{group}-{variant}-{rnd}.log"
        target = self.data / "target.qcow2"
        if group == "qcow2":
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(self.size)],
                check=True,
            )
            server_argv = [
                "qemu-nbd", "-f", "qcow2", "--shared=10", "-t", "-p", str(server_port),
                "-b", "127.0.0.1", "-x", "export", str(target),
            ]  # fmt: skip
        else:
            server_argv = [
                "nbdkit", "-f", "-p", str(server_port), "-i", "127.0.0.1", "null", str(self.size),
            ]  # fmt: skip
        try:
            with started(server_argv, log, server_port, server_argv[0]) as server:
                return self._copy(group, variant, rnd, server, server_port, log)
        finally:
            target.unlink(missing_ok=True)

    def _copy(
        self,
        group: str,
        variant: str,
        rnd: int,
        server: subprocess.Popen[Any],
        server_port: int,
        log: Path,
    ) -> Result:
        with self.relay(variant, server_port, log) as started_relay:
            relay = started_relay.proc if started_relay else None
            port = started_relay.port if started_relay else server_port
            subprocess.run(["sync"], check=True)
            server_before = cpu_ticks(server.pid)
            relay_before = cpu_ticks(relay.pid) if relay else 0
            busy_before = machine_busy_ticks()
            with open(log, "ab") as err:
                t0 = time.perf_counter()
                client = subprocess.Popen(
                    ["nbdcopy", "--flush", str(self.source), f"nbd://127.0.0.1:{port}/export"],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
                # wait4, not wait(): its rusage is nbdcopy's CPU.
                _, status, usage = os.wait4(client.pid, 0)
                seconds = time.perf_counter() - t0
            client.returncode = os.waitstatus_to_exitcode(status)
            busy = (machine_busy_ticks() - busy_before) / TICK
            if client.returncode != 0:
                raise SystemExit(
                    f"nbdcopy failed ({client.returncode}) in {group}/{variant}; see {log}"
                )
            relay_cpu = rss = None
            stats: dict[str, Any] = {}
            if relay is not None:
                # socat's per-connection children are only counted once reaped.
                end = time.monotonic() + 5
                while children(relay.pid) and time.monotonic() < end:
                    time.sleep(0.01)
                relay_cpu = (cpu_ticks(relay.pid) - relay_before) / TICK
                rss = peak_rss_mib(relay.pid)
                if variant.startswith("sna"):
                    assert relay.stdout is not None
                    stop_process(relay)
                    lines = relay.stdout.read().splitlines()
                    stats = json.loads(lines[-1]) if lines else {}
            server_cpu = (cpu_ticks(server.pid) - server_before) / TICK
        return Result(
            group=group,
            variant=variant,
            round=rnd,
            seconds=seconds,
            size=self.size,
            client_cpu=usage.ru_utime + usage.ru_stime,
            server_cpu=server_cpu,
            relay_cpu=relay_cpu,
            relay_rss_mib=rss,
            machine_busy=busy,
            relay_bytes_to_hub=stats.get("bytes_to_hub"),
            relay_data_path=started_relay.data_path if started_relay else None,
        )

    @contextmanager
    def relay(self, variant: str, server_port: int, log: Path) -> Iterator[Optional[StartedRelay]]:
        """Start the variant's relay, if it has one."""
        if variant == "direct":
            yield None
            return
        if variant == "socat":
            port = free_port()
            argv = [
                "socat", "-b", "1048576",
                f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{server_port}",
            ]  # fmt: skip
            with started(argv, log, None, "socat") as proc:
                wait_listening(port, proc)
                yield StartedRelay(proc, port, None)
            return
        data_path = variant.removeprefix("sna-") if variant != "sna" else self.relay_path
        argv = [
            sys.executable, str(Path(__file__).resolve()),
            "--serve-relay", f"127.0.0.1:{server_port}", "--data-path", data_path,
        ]  # fmt: skip
        with started(argv, log, None, "sna relay", stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            if not first:
                raise SystemExit(f"the sna relay did not start; see {log}")
            yield StartedRelay(proc, int(first[0]), first[1])


def wait_listening(port: int, proc: subprocess.Popen[Any]) -> None:
    """Wait until something listens on ``port``, without connecting to it.

    A probe connection to socat would fork a child and open an NBD
    connection upstream; /proc/net/tcp shows the listening socket instead.
    """
    needle = f":{port:04X} 00000000:0000 0A"
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"socat exited with {proc.returncode}")
        if needle in Path("/proc/net/tcp").read_text():
            return
        time.sleep(0.02)
    raise SystemExit(f"socat does not listen on {port}")


# -- data -------------------------------------------------------------------


def make_source(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    print(f"writing {size / MIB:.0f} MiB of random data to {path}", flush=True)
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = min(left, 16 * MIB)
            out.write(os.urandom(chunk))
            left -= chunk


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MIB, "g": GIB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- report -----------------------------------------------------------------


def per_gib(value: Optional[float], size: int) -> Optional[float]:
    return None if value is None else value / (size / GIB)


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def median_of(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(
    results: list[Result], groups: Sequence[str], variants: dict[str, list[str]]
) -> list[str]:
    verdicts: list[str] = []
    for group in groups:
        runs = [r for r in results if r.group == group]
        if not runs:
            continue
        by_variant = {v: [r for r in runs if r.variant == v] for v in variants[group]}
        direct = by_variant.get("direct", [])
        direct_median = statistics.median(r.mib_s for r in direct) if direct else None
        direct_by_round = {r.round: r.mib_s for r in direct}
        print()
        print(f"group {group}: nbdcopy --flush, {runs[0].size / MIB:.0f} MiB, "
              f"{'fresh qcow2 via qemu-nbd' if group == 'qcow2' else 'nbdkit null'}")  # fmt: skip
        header = (
            f"{'variant':<14} {'n':>2}  {'MiB/s min / median / max':>26}  "
            f"{'ratio (paired range)':>21}  {'CPU-s/GiB client':>16} {'server':>7} "
            f"{'relay':>7}  {'relay cores':>11} {'relay RSS':>9}  {'busy s':>6}"
        )
        print(header)
        print("-" * len(header))
        summary: dict[str, dict[str, Optional[float]]] = {}
        for variant, rs in by_variant.items():
            if not rs:
                continue
            speeds = sorted(r.mib_s for r in rs)
            med = statistics.median(speeds)
            ratio = med / direct_median if direct_median else None
            paired = [r.mib_s / direct_by_round[r.round] for r in rs if r.round in direct_by_round]
            relay_gib = median_of([per_gib(r.relay_cpu, r.size) for r in rs])
            cores = median_of(
                [None if r.relay_cpu is None else r.relay_cpu / r.seconds for r in rs]
            )
            summary[variant] = {"mib_s": med, "ratio": ratio, "relay_cpu_gib": relay_gib}
            paired_text = f"({min(paired):.2f}-{max(paired):.2f})" if paired else ""
            print(
                f"{variant:<14} {len(rs):>2}  "
                f"{speeds[0]:>7.1f} / {med:>7.1f} / {speeds[-1]:>7.1f}  "
                f"{fmt(ratio):>6} {paired_text:>14}  "
                f"{fmt(median_of([per_gib(r.client_cpu, r.size) for r in rs])):>16} "
                f"{fmt(median_of([per_gib(r.server_cpu, r.size) for r in rs])):>7} "
                f"{fmt(relay_gib):>7}  {fmt(cores):>11} "
                f"{fmt(median_of([r.relay_rss_mib for r in rs]), '.0f'):>9}  "
                f"{fmt(median_of([r.machine_busy for r in rs])):>6}"
            )
        counted = [r for r in runs if r.relay_bytes_to_hub is not None]
        short = [r for r in counted if (r.relay_bytes_to_hub or 0) < r.size]
        if counted:
            paths = sorted({r.relay_data_path or "?" for r in counted})
            print(
                f"sna relay data path: {', '.join(paths)}; byte counters >= source size in "
                f"{len(counted) - len(short)} of {len(counted)} runs"
            )
        sna = summary.get("sna")
        if group == "qcow2" and sna and sna["ratio"] is not None:
            ok = sna["ratio"] >= QCOW2_TARGET_RATIO
            verdicts.append(
                f"qcow2: sna/direct median ratio {sna['ratio']:.3f} vs target "
                f">= {QCOW2_TARGET_RATIO}: {'MET' if ok else 'NOT MET'}"
                + ("" if ok else f" (short by {QCOW2_TARGET_RATIO - sna['ratio']:.3f})")
            )
        socat = summary.get("socat")
        if group == "null" and sna and socat:
            s_speed, c_speed = sna["mib_s"] or 0.0, socat["mib_s"] or 0.0
            s_cpu, c_cpu = sna["relay_cpu_gib"] or 0.0, socat["relay_cpu_gib"] or 0.0
            speed_ok = s_speed >= c_speed
            cpu_ok = s_cpu <= c_cpu
            verdicts.append(
                f"null: sna {s_speed:.0f} MiB/s vs socat {c_speed:.0f} MiB/s "
                f"({s_speed / c_speed:.2f}x): {'MET' if speed_ok else 'NOT MET'}; "
                f"relay CPU {s_cpu:.3f} vs {c_cpu:.3f} s/GiB "
                f"({s_cpu / c_cpu if c_cpu else float('nan'):.2f}x): {'MET' if cpu_ok else 'NOT MET'}"
            )
    return verdicts


# -- main -------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="source size (default 2G; e.g. 256M)")
    parser.add_argument("--runs", type=int, default=5, help="rounds; each variant once per round")
    parser.add_argument("--groups", default="qcow2,null", help="qcow2, null or both")
    parser.add_argument("--seed", type=int, default=1, help="seed of the per-round order")
    parser.add_argument("--data-dir", type=Path, help="keep data here (default: a temp dir)")
    parser.add_argument("--source", type=Path, help="use this file as the source")
    parser.add_argument(
        "--relay-path", default="auto", choices=["auto", "copy", "transport"],
        help="data path of the 'sna' variant (default: auto, what the daemon uses)",
    )  # fmt: skip
    parser.add_argument(
        "--with-transport", action="store_true",
        help="add 'sna-transport' (the portable Twisted-transport path) to every group",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="append raw results here as JSON lines")
    parser.add_argument("--serve-relay", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--data-path", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_relay:
        serve_relay(args.serve_relay, args.data_path)
        return 0

    for tool in ("qemu-img", "qemu-nbd", "nbdkit", "nbdcopy", "socat"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    size = parse_size(args.size)
    groups = [g for g in args.groups.split(",") if g]
    for g in groups:
        if g not in GROUPS:
            raise SystemExit(f"unknown group {g!r}")
    variants = {g: list(GROUPS[g]) for g in GROUPS}
    if args.with_transport:
        for g in variants:
            variants[g].append("sna-transport")

    temp = None
    if args.data_dir:
        data = args.data_dir
        data.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="relay-bench-", dir="/tmp")
        data = Path(temp)
    source = args.source or data / "src-random.raw"
    need = (0 if source.exists() else size) + (size if "qcow2" in groups else 0) + 256 * MIB
    free = shutil.disk_usage(data).free
    if free < need:
        raise SystemExit(f"{data} has {free / GIB:.1f} GiB free, the run needs {need / GIB:.1f}")
    try:
        make_source(source, size)
        size = source.stat().st_size
        warm(source)
        bench = Bench(data, source, size, args.relay_path)
        results: list[Result] = []
        total = args.runs * sum(len(variants[g]) for g in groups)
        print(f"{total} runs, {args.runs} rounds, data in {data}", flush=True)
        for rnd in range(args.runs):
            for group in groups:
                order = list(variants[group])
                random.Random(args.seed * 1000 + rnd).shuffle(order)
                for variant in order:
                    result = bench.run(group, variant, rnd)
                    results.append(result)
                    print(
                        f"  round {rnd + 1} {group:<5} {variant:<14} {result.mib_s:8.1f} MiB/s"
                        f"  client {result.client_cpu:5.2f}s server {result.server_cpu:5.2f}s"
                        f" relay {fmt(result.relay_cpu)}s",
                        flush=True,
                    )
                    if args.out:
                        with open(args.out, "a") as out:
                            out.write(json.dumps({**result.__dict__, "mib_s": result.mib_s}) + "\n")
        verdicts = report(results, groups, variants)
        print()
        for line in verdicts:
            print("verdict: " + line)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
