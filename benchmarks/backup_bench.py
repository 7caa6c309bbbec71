"""Full backups through the whole system (API, relay, client) against nbdcopy, in the same run.

A testbed (the vCenter simulator with CBT, loopback only) holds two
single-disk VMs of ``--size`` bytes: ``randvm`` (random data over the whole
disk) and ``sparsevm`` (a few MiB of random data, ``--sparse-data``, in four
pieces; the rest never written).  ``twistd -n sna`` runs with its default
backup client (``sendense-backup-client`` beside its interpreter).  Every
round runs, in a shuffled order with a fixed seed, for each VM:

``sna``
    ``POST /api/v1/backup/start`` (``backup_type: full``, the SHA's shape)
    into a fresh qcow2 served by a fresh ``qemu-nbd`` (the hub's flags), then
    ``/status`` polled until the job is final.  The daemon probes the target,
    relays it through a byte-counting loopback relay and runs the client,
    which logs in to vCenter, snapshots the VM, asks CBT what is in use and
    reads it over the datastore's ``/folder`` URL (HTTPS, Range requests).
``nbdcopy``
    ``nbdcopy --flush`` of the same flat file into the same kind of target.

After the full rounds, ``--incr-runs`` incrementals: a full of ``randvm``
through sna, then each time ``--change`` percent of the disk rewritten in
256 KiB pieces at random places and an incremental through the API into a
qcow2 overlay on the previous backup (the hub's way).

Every target is checked with ``qemu-img compare`` after the clock stops.

What is measured, and how:

- **wall**: for ``sna``, from just before the ``backup/start`` request to the
  job's ``end_time`` (the daemon's clock, when the client exited; the same
  host clock as ours, so polling does not blur it); for ``nbdcopy``, its
  process's lifetime.  MiB/s is the disk's capacity over wall time, for
  both disks, so the sparse disk's figure is an "effective" rate.
- **copy**: the client's own ``duration_seconds`` per disk (first read to
  FLUSH), without Python start-up, login, snapshot and clean-up.
- **client CPU**: the daemon reaps the client, so the client's user + system
  seconds land in the daemon's ``cutime``/``cstime`` in ``/proc/<twistd
  pid>/stat``; the difference over a job is the client's CPU (nothing else
  is reaped by the daemon meanwhile).  As a check, the client's own
  ``/proc/<pid>/stat`` is sampled while it runs (``seen``, a lower bound:
  the last sample misses its last moments).
- **daemon CPU**: the daemon's own user + system seconds over the job (the
  relay forwards every byte in the daemon's process; also the API, the
  event parsing and this script's polling every 100 ms).
- **qemu-nbd CPU**, and **vcsim CPU** (which serves ``/folder`` for the
  client): from ``/proc/<pid>/stat`` before and after.  nbdcopy's from
  ``wait4``.
- CPU figures are seconds per GiB of disk capacity (medians).
- **busy cores**: the whole machine's busy CPU time (``/proc/stat``: every
  process, the kernel's writeback and network work) over the run's wall
  time; 2.00 on this 2-CPU machine means nothing was left idle.

Ratios are medians of the per-round ratios against nbdcopy of the same VM
(``wall`` ratio: e2e; ``copy`` ratio: the client's copy time against
nbdcopy's wall).  Targets (issue 5): e2e ratio >= 0.9 for random data,
>= 1.0 for the mostly-empty disk; an incremental after changing 1 % costs
under 5 % of the full's time.

    .venv/bin/python benchmarks/backup_bench.py                      # 2 GiB, 3 runs
    .venv/bin/python benchmarks/backup_bench.py --size 512M --runs 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sna.contract.ids import log_file_name  # noqa: E402
from tests.testbed import Testbed, human_size, parse_size  # noqa: E402
from tests.testbed.sna import Sna  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
VMS = ("randvm", "sparsevm")
VARIANTS = ("nbdcopy", "sna")
TARGET_RATIO = {"randvm": 0.9, "sparsevm": 1.0}
INCR_TARGET = 0.05
CHANGE_PIECE = 256 * 1024
POLL = 0.1
JOB_DEADLINE = 1800.0


# -- processes ---------------------------------------------------------------------------------


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) user + system CPU seconds of a process; zeros if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # After the command: state is fields[0]; utime, stime, cutime, cstime are 11-14.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs; /proc/stat, not idle or iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def cmdline(pid: int) -> list[str]:
    """A process's argv; empty if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode("utf-8", "replace") for p in raw.split(b"\0") if p]


class BenchSna(Sna):
    """The daemon, with readers of its job logs for the timeline."""

    def job_log(self, job_id: str) -> list[tuple[float, str, str]]:
        """The job log as (time, stream, text): ``sna``, ``stdout`` or ``stderr`` lines."""
        lines = []
        for line in (self.log_dir / log_file_name(job_id)).read_text().splitlines():
            stamp, _, rest = line.partition(" ")
            stream, _, text = rest.partition(" ")
            lines.append((parse_time(stamp), stream, text))
        return lines

    def job_events(self, job_id: str) -> list[tuple[float, dict[str, Any]]]:
        """The client's events from the job log, with the time the daemon read each."""
        return [(t, json.loads(text)) for t, s, text in self.job_log(job_id) if s == "stdout"]

    def timeline(self, job_id: str, requested: float) -> dict[str, float]:
        """Where a one-disk job's time went, from the daemon's timestamps in its job log.

        ``spawn``: request to client started (validation, NBD probe, relay);
        ``start-up``: to the client's first event (Python and its imports, or
        only the handover when a spare client took the job);
        ``prepare``: to its ``disk_start`` (login, CBT, snapshot, areas, connecting);
        ``copy``: to its ``disk_done`` (reads, writes, FLUSH);
        ``finish``: to the client's exit (snapshot removal, exit).
        """
        log = self.job_log(job_id)
        spawned = next(t for t, s, text in log if s == "sna" and text.startswith("starting "))
        ended = next(t for t, s, text in log if s == "sna" and text.startswith("process ended"))
        events = self.job_events(job_id)
        first = events[0][0]
        started = next(t for t, e in events if e["event"] == "disk_start")
        done = next(t for t, e in events if e["event"] == "disk_done")
        return {
            "spawn": spawned - requested,
            "start-up": first - spawned,
            "prepare": started - first,
            "copy": done - started,
            "finish": ended - done,
        }

    def took_spare(self, job_id: str) -> bool:
        """Whether the job went to a spare client (started before the request)."""
        return any(
            s == "sna" and text.startswith("starting ") and " in spare client pid " in text
            for _, s, text in self.job_log(job_id)
        )


# -- runs --------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One run of one variant: seconds of wall, copy and CPU (see the module docstring)."""

    wall: float
    copy: float
    tool_cpu: float
    daemon_cpu: float = 0.0
    client_seen: float = 0.0
    server_cpu: float = 0.0
    vcsim_cpu: float = 0.0
    bytes_to_hub: int = 0
    #: Busy CPU seconds of the whole machine over the run (kernel writeback included).
    busy: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def spec(size: int, ports: range) -> dict[str, Any]:
    """The testbed: the two VMs, CBT on, targets on ``ports``."""
    return {
        "hub": {"ports": [ports.start, ports.stop - 1]},
        "vms": [
            {"name": vm, "cbt_enabled": True, "disks": [{"capacity_bytes": size}]} for vm in VMS
        ],
    }


def fill(testbed: Testbed, size: int, sparse_data: int) -> None:
    """Random data over all of randvm; ``sparse_data`` bytes in four pieces on sparsevm."""
    piece = 64 * MIB
    for offset in range(0, size, piece):
        testbed.write("randvm", 2000, offset, min(piece, size - offset), seed=offset // MIB)
    quarter = max(sparse_data // 4, 4096)
    for n in range(4):
        offset = (size // 4) * n + (size // 8)
        offset -= offset % 4096
        testbed.write("sparsevm", 2000, offset, min(quarter, size - offset), seed=7 + n)


def parse_time(text: str) -> float:
    """Seconds since the epoch of sna's ``2026-11-26T09:12:03.481Z``."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def vcsim_pid(testbed: Testbed) -> int:
    """The simulator's pid (it serves ``/folder`` to the client)."""
    return next(r.pid for r in testbed.running() if r.role == "vcsim")


def sna_job(
    sna: BenchSna,
    testbed: Testbed,
    vm: str,
    target: dict[str, Any],
    job_id: str,
    backup_type: str = "full",
    previous: Optional[str] = None,
) -> tuple[Sample, dict[str, Any]]:
    """One job through the API, to its end; its figures and final status."""
    v = testbed.vcenter
    body: dict[str, Any] = {
        "job_id": job_id,
        "vm_name": vm,
        "vcenter_host": f"{v['host']}:{v['port']}",
        "vcenter_user": v["user"],
        "vcenter_password": v["password"],
        "vcenter_thumbprint": v["thumbprint"],
        "vm_path": testbed.vm(vm)["path"],
        "nbd_targets": f"2000:{target['nbd_url']}",
        "backup_type": backup_type,
        "nbd_host": "127.0.0.1",
    }
    if previous is not None:
        body["previous_change_id"] = previous
    # A running appliance has its spare client ready between jobs; wait for it as the
    # SHA would have (the spare's start-up CPU is still counted: it is reaped with the job).
    spare_ready = sna.wait_spare()
    vcsim = vcsim_pid(testbed)
    daemon0, server0, vcsim0 = proc_cpu(sna.pid), proc_cpu(target["pid"]), proc_cpu(vcsim)
    busy0 = machine_busy()
    start = time.time()
    started = sna.call("POST", "/api/v1/backup/start", body)
    client, seen = started["pid"], 0.0
    end = time.monotonic() + JOB_DEADLINE
    while True:
        if any(a.endswith("sendense-backup-client") for a in cmdline(client)):
            seen = max(seen, sum(proc_cpu(client)))
        status: dict[str, Any] = sna.call("GET", f"/api/v1/status/{job_id}")
        if status["status"] != "running":
            break
        if time.monotonic() > end:
            raise SystemExit(f"{job_id} still running after {JOB_DEADLINE:g} s")
        time.sleep(POLL)
    daemon1, server1, vcsim1 = proc_cpu(sna.pid), proc_cpu(target["pid"]), proc_cpu(vcsim)
    busy1 = machine_busy()
    if status["status"] != "completed":
        raise SystemExit(f"{job_id} ended {status['status']}: {status['error']}")
    (done,) = [e for _, e in sna.job_events(job_id) if e["event"] == "disk_done"]
    (disk,) = status["disks"]
    sample = Sample(
        wall=parse_time(status["end_time"]) - start,
        copy=float(done["duration_seconds"]),
        tool_cpu=daemon1[1] - daemon0[1],
        daemon_cpu=daemon1[0] - daemon0[0],
        client_seen=seen,
        server_cpu=server1[0] - server0[0],
        vcsim_cpu=vcsim1[0] - vcsim0[0],
        bytes_to_hub=int(disk["bytes_to_hub"]),
        busy=busy1 - busy0,
        extra={
            "sync_type": disk["sync_type"],
            "bytes_total": disk["bytes_total"],
            "timeline": sna.timeline(job_id, start),
            "spare": spare_ready and sna.took_spare(job_id),
        },
    )
    return sample, status


def nbdcopy_job(flat: str, target: dict[str, Any]) -> Sample:
    """``nbdcopy --flush`` of the flat file into the target; CPU from ``wait4``."""
    server0 = proc_cpu(target["pid"])
    busy0 = machine_busy()
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["nbdcopy", "--flush", flat, target["nbd_url"]], stdout=subprocess.DEVNULL
    )
    _, wait_status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    if proc.returncode != 0:
        raise SystemExit(f"nbdcopy failed ({proc.returncode})")
    server1 = proc_cpu(target["pid"])
    return Sample(
        wall=wall,
        copy=wall,
        tool_cpu=usage.ru_utime + usage.ru_stime,
        server_cpu=server1[0] - server0[0],
        busy=machine_busy() - busy0,
    )


def verify(testbed: Testbed, vm: str, target: dict[str, Any]) -> None:
    """Stop serving the target (qemu-nbd writes out its metadata) and compare it with the disk."""
    testbed.stop_target(target["export"])
    flat = testbed.disk(vm, 2000)["flat_file"]
    check = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", flat, target["qcow2"]],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise SystemExit(f"{vm}: {target['qcow2']} differs from the disk: {check.stdout}")


def one_full(sna: BenchSna, testbed: Testbed, vm: str, variant: str, job_id: str) -> Sample:
    """One full copy of a VM's disk by one variant into a fresh target, checked, then removed."""
    target = testbed.add_target(vm, 2000)
    try:
        if variant == "nbdcopy":
            sample = nbdcopy_job(testbed.disk(vm, 2000)["flat_file"], target)
        else:
            sample, _ = sna_job(sna, testbed, vm, target, job_id)
        verify(testbed, vm, target)
        return sample
    finally:
        if target["export"] in {t["export"] for t in testbed.targets}:
            testbed.stop_target(target["export"])
        Path(target["qcow2"]).unlink(missing_ok=True)


def incrementals(
    sna: BenchSna, testbed: Testbed, size: int, runs: int, percent: float, rng: random.Random
) -> tuple[Sample, list[Sample], int]:
    """A full of randvm, then ``runs`` incrementals after changing ``percent`` % each time."""
    target = testbed.add_target("randvm", 2000)
    full, status = sna_job(sna, testbed, "randvm", target, "bench-incr-base")
    change_id = status["disks"][0]["change_id"]
    samples = []
    pieces = max(1, math.ceil(size * percent / 100 / CHANGE_PIECE))
    slots = size // CHANGE_PIECE
    for n in range(runs):
        for slot in rng.sample(range(slots), min(pieces, slots)):
            testbed.write("randvm", 2000, slot * CHANGE_PIECE, CHANGE_PIECE, seed=1000 + n)
        testbed.stop_target(target["export"])
        target = testbed.add_target("randvm", 2000, backing=Path(target["qcow2"]))
        subprocess.run(["sync"], check=True)
        sample, status = sna_job(
            sna, testbed, "randvm", target, f"bench-incr-{n}", "incremental", change_id
        )
        if sample.extra["sync_type"] != "incremental":
            raise SystemExit(f"the incremental was a {sample.extra['sync_type']}: {status}")
        change_id = status["disks"][0]["change_id"]
        samples.append(sample)
    verify(testbed, "randvm", target)
    return full, samples, pieces * CHANGE_PIECE


# -- the report --------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    """The median (a shorter name for the report)."""
    return statistics.median(values)


def timeline(samples: list[Sample]) -> str:
    """Median seconds of each part of the sna jobs' time (see ``Sna.timeline``)."""
    parts = samples[0].extra["timeline"].keys()
    spares = sum(1 for s in samples if s.extra.get("spare"))
    times = ", ".join(
        f"{part} {median([s.extra['timeline'][part] for s in samples]):.3f} s" for part in parts
    )
    return f"{times}; {spares} of {len(samples)} jobs taken by a spare client"


def report(
    results: dict[tuple[str, str], list[Sample]],
    size: int,
    runs: int,
    incr: Optional[tuple[Sample, list[Sample], int]],
) -> None:
    """Print the table, the verdicts against the targets and the incremental figures."""
    gib = size / GIB
    print()
    print(
        f"{human_size(size)} disks, {runs} runs each, interleaved; MiB/s of capacity over wall time"
    )
    print(
        f"{'disk':9} {'variant':8} {'MiB/s med (min-max)':>21} {'ratio':>6} {'(range)':>13}"
        f" {'copy MiB/s':>10} {'ratio':>6}   CPU s/GiB: {'tool':>5} {'daemon':>6}"
        f" {'qemu-nbd':>8} {'vcsim':>5}  busy cores"
    )
    verdicts = []
    for vm in VMS:
        base = results[(vm, "nbdcopy")]
        for variant in VARIANTS:
            runs_ = results[(vm, variant)]
            rates = [size / MIB / s.wall for s in runs_]
            copies = [size / MIB / s.copy for s in runs_]
            ratios = [b.wall / s.wall for s, b in zip(runs_, base, strict=True)]
            copy_ratios = [b.wall / s.copy for s, b in zip(runs_, base, strict=True)]
            print(
                f"{vm:9} {variant:8} {median(rates):9.1f} ({min(rates):5.0f}-{max(rates):5.0f})"
                f" {median(ratios):6.2f} ({min(ratios):5.2f}-{max(ratios):5.2f})"
                f" {median(copies):10.1f} {median(copy_ratios):6.2f}"
                f"              {median([s.tool_cpu for s in runs_]) / gib:5.2f}"
                + (
                    f" {median([s.daemon_cpu for s in runs_]) / gib:6.2f}"
                    if variant == "sna"
                    else f" {'-':>6}"
                )
                + f" {median([s.server_cpu for s in runs_]) / gib:8.2f}"
                + (
                    f" {median([s.vcsim_cpu for s in runs_]) / gib:5.2f}"
                    if variant == "sna"
                    else f" {'-':>5}"
                )
                + f"  {median([s.busy / s.wall for s in runs_]):4.2f}"
            )
            if variant == "sna":
                want = TARGET_RATIO[vm]
                got, got_copy = median(ratios), median(copy_ratios)
                verdicts.append(
                    f"{vm}: e2e ratio {got:.2f} {'meets' if got >= want else 'MISSES'} the "
                    f"target {want:.1f}; the client's copy alone: {got_copy:.2f} "
                    f"({'meets' if got_copy >= want else 'misses'})"
                )
                seen = median([s.client_seen for s in runs_]) / gib
                verdicts.append(
                    f"{vm}: client CPU {median([s.tool_cpu for s in runs_]) / gib:.2f} s/GiB "
                    f"(reaped, from the daemon's cutime+cstime; sampled live: >= {seen:.2f})"
                )
                overhead = median([s.bytes_to_hub / size for s in runs_])
                verdicts.append(f"{vm}: bytes through the relay / capacity = {overhead:.4f}")
                verdicts.append(f"{vm}: where sna's time went (medians): {timeline(runs_)}")
    print()
    print("tool = nbdcopy's CPU (wait4) or the backup client's (see the docstring).")
    print("daemon = twistd itself: relay, API, events, this script's polling.")
    for line in verdicts:
        print(line)
    if incr is not None:
        full, samples, changed = incr
        walls = [s.wall for s in samples]
        ratio = median(walls) / full.wall
        copy_ratio = median([s.copy for s in samples]) / full.copy
        print()
        print(
            f"incremental after changing {human_size(changed)} "
            f"({changed / size:.1%} of the disk, 256 KiB pieces), {len(samples)} runs:"
        )
        print(
            f"  full {full.wall:.2f} s (copy {full.copy:.2f} s); incremental median "
            f"{median(walls):.2f} s ({min(walls):.2f}-{max(walls):.2f}), copy "
            f"{median([s.copy for s in samples]):.3f} s; "
            f"bytes through the relay {median([s.bytes_to_hub for s in samples]) / MIB:.1f} MiB"
        )
        verdict = "meets" if ratio < INCR_TARGET else "MISSES"
        print(
            f"  incremental / full time: e2e {ratio:.3f} ({verdict} < {INCR_TARGET}); "
            f"copy alone {copy_ratio:.3f}"
        )
        print(f"  where the incremental's time went (medians): {timeline(samples)}")


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    """Parse the options, check the tools and the free space, run, report, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2 * GIB, help="disk size (2G, 512M)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of full backups")
    parser.add_argument("--incr-runs", type=int, help="incrementals (default: --runs; 0: none)")
    parser.add_argument("--change", type=float, default=1.0, help="percent changed per incr.")
    parser.add_argument("--sparse-data", type=parse_size, default=4 * MIB)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--hub-ports", default="10700-10799", help="the targets' ports, LO-HI")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    size: int = args.size
    if size % 4096 or size < 64 * MIB:
        raise SystemExit("--size must be a multiple of 4096, at least 64M")
    low, _, high = args.hub_ports.partition("-")
    ports = range(int(low), int(high) + 1)
    incr_runs = args.runs if args.incr_runs is None else args.incr_runs
    for tool in ("qemu-img", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (make deps)")

    parent = args.workdir or Path(tempfile.gettempdir())
    # The random disk, one target at a time, and the incremental chain (small).
    needed = 2 * size + size // 10 + 512 * MIB
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise SystemExit(f"{parent}: {free / GIB:.1f} GiB free, {needed / GIB:.1f} GiB needed")
    workdir = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=parent))
    print(
        f"backup_bench: {human_size(size)} disks, {args.runs} runs, in {workdir} "
        f"({free / GIB:.1f} GiB free), {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    rng = random.Random(args.seed)
    results: dict[tuple[str, str], list[Sample]] = {}
    testbed: Optional[Testbed] = None
    sna: Optional[BenchSna] = None
    try:
        testbed = Testbed.start(spec(size, ports), workdir / "testbed")
        for t in list(testbed.targets):  # each run serves its own fresh target
            testbed.stop_target(t["export"])
            Path(t["qcow2"]).unlink(missing_ok=True)
        started = time.monotonic()
        fill(testbed, size, args.sparse_data)
        print(f"filled in {time.monotonic() - started:.1f} s", file=sys.stderr)
        sna = BenchSna(workdir / "sna", ("--nbd-ports", f"{ports.start}-{ports.stop - 1}"))
        for number in range(args.runs):
            order = [(vm, v) for vm in VMS for v in VARIANTS]
            rng.shuffle(order)
            for vm, variant in order:
                subprocess.run(["sync"], check=True)
                job_id = f"bench-{vm}-{number}"
                sample = one_full(sna, testbed, vm, variant, job_id)
                results.setdefault((vm, variant), []).append(sample)
                print(
                    f"  round {number + 1}: {vm:8} {variant:7} {sample.wall:6.2f} s "
                    f"({size / MIB / sample.wall:7.1f} MiB/s)",
                    file=sys.stderr,
                )
        incr = None
        if incr_runs > 0:
            incr = incrementals(sna, testbed, size, incr_runs, args.change, rng)
        report(results, size, args.runs, incr)
    finally:
        if sna is not None:
            sna.stop()
        if testbed is not None:
            testbed.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
