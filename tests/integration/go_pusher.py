"""A test double of the legacy Go backup client's progress, for ``--sbc-legacy``; never shipped.

The real Go client reports to sna two ways at once: logrus and stdlib ``log``
lines on stderr (which disk it copies, its size, its change ID) and HTTP
pushes to ``POST /api/v1/progress/{job_id}/update`` (bytes of the disk being
copied, no disk named; docs/reference upstream-contracts.md 2.2).  This
double does both, paced, for each target of ``--nbd-targets``::

    go_pusher.py --sna-port PORT [--mib N,N,...] migrate --nbd-targets T --job-id J ...

Disk ``i`` holds ``N[i]`` MiB (0: an empty disk, copied at once); it is
"copied" in steps of 1 MiB, 0.1 s apart, with a push after each step.  The
pushes go to 127.0.0.1:PORT (the Go client's address is compiled in; the
tests give the daemon's).  It exits 0 after ``Migration completed``.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse
from datetime import datetime
from typing import Any

MIB = 1 << 20
STEP_PAUSE = 0.1
CHANGE_ID = "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/{n}"


def option(argv: list[str], name: str) -> str:
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise SystemExit(f"go_pusher: no {name}")


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def logrus(msg: str, **fields: Any) -> None:
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    pairs = "".join(f" {k}={json.dumps(str(v))}" for k, v in sorted(fields.items()))
    log(f"time={json.dumps(stamp)} level=info msg={json.dumps(msg)}{pairs}")


def stdlog(msg: str) -> None:
    log(f"{datetime.now():%Y/%m/%d %H:%M:%S} {msg}")


class Pusher:
    def __init__(self, port: int, job_id: str) -> None:
        self.port = port
        self.path = f"/api/v1/progress/{urllib.parse.quote(job_id, safe='')}/update"

    def push(self, **body: Any) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request(
                "POST", self.path, json.dumps(body), {"Content-Type": "application/json"}
            )
            connection.getresponse().read()
        except OSError as e:
            log(f"go_pusher: push failed: {e}")  # the Go client ignores failures too
        finally:
            connection.close()


def main(argv: list[str]) -> int:
    port = int(option(argv, "--sna-port"))
    sizes = [int(n) for n in option(argv, "--mib").split(",")] if "--mib" in argv else []
    job_id = option(argv, "--job-id")
    targets = option(argv, "--nbd-targets").split(",")
    keys = [target.split(":", 1)[0] for target in targets]
    sizes = (sizes + [1] * len(keys))[: len(keys)]
    pusher = Pusher(port, job_id)
    # As the Go client: its job-wide total is not the disks' sizes.
    total = sum(sizes) * MIB + 7 * MIB
    pusher.push(stage="Initializing", status="in_progress", bytes_transferred=0, percent=5)
    logrus("Creating job-specific snapshot", job_id=job_id)
    pusher.push(stage="Creating Snapshot", status="in_progress", bytes_transferred=0, percent=10)
    for index, (key, mib) in enumerate(zip(keys, sizes, strict=True)):
        size = mib * MIB
        logrus("Data does not exist, full copy needed")
        stdlog(f"DIRECT MATCH: VMware disk disk-{key} (key:{key}) -> 127.0.0.1")
        logrus("Starting parallel full copy", disk=f"disk{index}")
        logrus(f"Total disk size: {size / 1024**3:.2f} GB ({size} bytes)")
        # Its SHA calls come between its lines and its first push.
        time.sleep(STEP_PAUSE)
        pusher.push(
            stage="Transfer",
            status="in_progress",
            bytes_transferred=0,
            throughput_bps=0,
            sync_type="initial",
        )
        started = time.monotonic()
        for step in range(1, mib + 1):
            time.sleep(STEP_PAUSE)
            done = step * MIB
            pusher.push(
                stage="Transfer",
                status="in_progress",
                bytes_transferred=done,
                total_bytes=total,
                throughput_bps=done / (time.monotonic() - started),
                percent=100.0 * done / total,
            )
        pusher.push(
            stage="Transfer",
            status="completed",
            bytes_transferred=total,
            total_bytes=total,
            throughput_bps=0,
            percent=100,
        )
        logrus("Parallel full copy completed successfully", bytes_copied=size)
        stdlog(f"Stored ChangeID in database: {CHANGE_ID.format(n=5440 + index)}")
        time.sleep(STEP_PAUSE)
    logrus("Removing snapshot")
    logrus("Migration completed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
