"""Throughput and CPU cost of sendense-backup-client alone, against nbdcopy, in the same run.

A testbed (the vCenter simulator with CBT and qemu-nbd targets, loopback
only) holds two single-disk VMs: ``randvm`` (random data over the whole
disk) and ``sparsevm`` (1 MiB of random data every 64 MiB).  Every round
runs, in a shuffled order with a fixed seed, for each VM:

``client-folder``
    a full backup by the client, reading the datastore ``/folder`` URL over
    HTTPS with Range requests (the default reader);
``client-nbd``
    the same, reading the flat file through ``nbdkit file`` on a Unix socket
    (the VDDK path's reader);
``nbdcopy``
    ``nbdcopy --flush`` of the flat file into the same kind of target.

Every variant writes into a fresh qcow2 served by a fresh ``qemu-nbd``
(``testbed.add_target``) and is checked with ``qemu-img compare`` after the
clock stops.  Throughput is the disk's capacity over wall time: ``e2e`` is
the whole process (the client's includes Python start-up, the vCenter login
and the snapshot), ``copy`` is the client's own ``duration_seconds`` of the
disk (from its first read to its FLUSH).  CPU is the process's user + system
seconds per GiB of capacity (``wait4``).  Ratios are medians of the per-round
ratios against nbdcopy.

    .venv/bin/python benchmarks/backup_client_bench.py --size-mib 512 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.testbed import Testbed  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
VARIANTS = ("client-folder", "client-nbd", "nbdcopy")


def spec(size: int) -> dict[str, Any]:
    return {
        "hub": {"ports": [10500, 10599]},
        "vms": [
            {"name": "randvm", "disks": [{"capacity_bytes": size}]},
            {"name": "sparsevm", "disks": [{"capacity_bytes": size}]},
        ],
    }


def fill(testbed: Testbed, size: int) -> None:
    for offset in range(0, size, 64 * MIB):
        testbed.write("randvm", 2000, offset, min(64 * MIB, size - offset), seed=offset)
        testbed.write("sparsevm", 2000, offset, MIB, seed=offset + 1)


def timed(
    argv: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL
) -> tuple[float, float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.DEVNULL, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def run_client(
    testbed: Testbed, vm: str, target: dict[str, Any], reader_args: list[str], workdir: Path
) -> dict[str, float]:
    v = testbed.vcenter
    events = workdir / f"events-{vm}-{time.monotonic_ns()}.jsonl"
    argv = [
        sys.executable,
        "-m",
        "sna.backup.cli",
        "migrate",
        "--vmware-endpoint",
        f"{v['host']}:{v['port']}",
        "--vmware-username",
        v["user"],
        "--vmware-path",
        testbed.vm(vm)["path"],
        "--nbd-targets",
        f"2000:{target['nbd_url']}",
        "--job-id",
        f"bench-{time.monotonic_ns()}",
        "--backup-type",
        "full",
        "--vcenter-thumbprint",
        v["thumbprint"],
        *reader_args,
    ]
    env = {"PATH": os.environ["PATH"], "SNA_VCENTER_PASSWORD": v["password"]}
    with open(events, "wb") as out:
        wall, cpu, code = timed(argv, env, stdout=out)
    if code != 0:
        raise SystemExit(f"client failed ({code}); events in {events}")
    done = [json.loads(line) for line in events.read_text().splitlines()]
    (disk,) = [e for e in done if e["event"] == "disk_done"]
    return {"wall": wall, "cpu": cpu, "copy": disk["duration_seconds"]}


def variant(testbed: Testbed, name: str, vm: str, workdir: Path) -> dict[str, float]:
    target = testbed.add_target(vm, 2000)
    flat = testbed.disk(vm, 2000)["flat_file"]
    try:
        if name == "nbdcopy":
            wall, cpu, code = timed(
                ["nbdcopy", "--flush", flat, target["nbd_url"]], {"PATH": os.environ["PATH"]}
            )
            if code != 0:
                raise SystemExit(f"nbdcopy failed ({code})")
            result = {"wall": wall, "cpu": cpu, "copy": wall}
        elif name == "client-nbd":
            sock = workdir / "src.sock"
            sock.unlink(missing_ok=True)
            server = subprocess.Popen(
                ["nbdkit", "--foreground", "--readonly", f"--unix={sock}", "file", f"file={flat}"],
                stderr=subprocess.DEVNULL,
            )
            try:
                while not sock.exists():
                    time.sleep(0.01)
                url = f"2000=nbd+unix:///?socket={sock}"
                result = run_client(
                    testbed, vm, target, ["--reader", "nbd", "--reader-nbd-url", url], workdir
                )
            finally:
                server.terminate()
                server.wait()
        else:
            result = run_client(testbed, vm, target, [], workdir)
        check = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", flat, target["qcow2"]],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise SystemExit(f"{name} on {vm}: the target differs: {check.stdout}")
        return result
    finally:
        testbed.stop_target(target["export"])
        Path(target["qcow2"]).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    size = args.size_mib * MIB
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="backup-bench-"))
    rng = random.Random(args.seed)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with Testbed.start(spec(size), workdir / "testbed") as testbed:
        fill(testbed, size)
        for number in range(args.rounds):
            order = [(vm, v) for vm in ("randvm", "sparsevm") for v in VARIANTS]
            rng.shuffle(order)
            for vm, name in order:
                subprocess.run(["sync"], check=True)
                results.setdefault((vm, name), []).append(variant(testbed, name, vm, workdir))
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    print(
        f"{args.size_mib} MiB disks, {args.rounds} rounds; MiB/s median (min-max); ratio vs nbdcopy"
    )
    for vm in ("randvm", "sparsevm"):
        base = results[(vm, "nbdcopy")]
        for name in VARIANTS:
            runs = results[(vm, name)]
            e2e = [size / MIB / r["wall"] for r in runs]
            copy = [size / MIB / r["copy"] for r in runs]
            ratios = [b["wall"] / r["wall"] for r, b in zip(runs, base, strict=True)]
            copy_ratios = [b["wall"] / r["copy"] for r, b in zip(runs, base, strict=True)]
            cpu = statistics.median(r["cpu"] for r in runs) / (size / GIB)
            print(
                f"{vm:9} {name:14} e2e {statistics.median(e2e):7.1f} ({min(e2e):.0f}-{max(e2e):.0f}) "
                f"x{statistics.median(ratios):.2f}  copy {statistics.median(copy):7.1f} "
                f"x{statistics.median(copy_ratios):.2f}  cpu {cpu:.2f} s/GiB"
            )


if __name__ == "__main__":
    main()
