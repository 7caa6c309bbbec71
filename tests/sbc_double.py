"""A test double of the backup client (``sendense-backup-client``); never shipped.

Integration tests and benchmarks start the daemon with
``--sbc "python tests/sbc_double.py"`` so that every job runs this script
instead of a real client.  It takes the real client's command line::

    sbc_double.py migrate --vmware-endpoint H --vmware-username U \\
        --vmware-path P --nbd-targets T --job-id J [--vmware-password X]

and keeps the real client's output contract: one JSON event per line on
stdout, flushed per line, human log lines on stderr.  It reads no disk, and
only the ``write`` modes below write to the NBD targets (with ``nbdcopy``).

Its first stderr line records what it was given, for tests to read back from
the job's log file::

    sbc-double: argv=[...] env={...} password_in_env=true

``env`` maps the name of every environment variable received to ``null``,
except ``MIGRATEKIT_JOB_ID``, whose value is given.  Only whether
``SNA_VCENTER_PASSWORD`` is set is said, never its value; the value after
``--vmware-password`` in ``argv`` is masked for the same reason.  (Python may
add ``LC_CTYPE`` itself when started under the C locale, PEP 538.)

The last path component of ``--vmware-path`` (the VM name) picks the behaviour:

``ok`` (and any name not below)
    per disk of ``--nbd-targets``: ``disk_start``, a few ``progress``,
    ``disk_done`` with a change ID; then ``done``; exit 0, quickly.
``fail``
    a phase, one progress event, an ``error`` event; exit 3.
``slow``
    like ``ok`` with ten progress events per disk, 0.2 s apart.
``hang``
    a phase and one progress event, then sleeps until SIGTERM (exit 143).
``stubborn``
    like ``hang`` but ignores SIGTERM; only SIGKILL stops it.
``legacy``
    the Go client's logrus and stdlib ``log`` lines on stderr, no JSON; exit 0.
``crash``
    half a JSON line without a newline, a Go panic on stderr; exit 2.
``write``
    per target, writes :func:`payload` of its disk key (``PAYLOAD_SIZE``
    bytes, not a multiple of any block size) from offset 0 of the NBD URL it
    was given: the payload goes to a temporary file first, then
    ``nbdcopy --flush FILE URL`` copies it; ``disk_start``, ``disk_done``,
    then ``done``; exit 0.  If ``nbdcopy`` fails: an ``error`` event naming
    the disk and nbdcopy's last stderr line; exit 1.
``slowwrite``
    like ``write``, but ``nbdcopy --flush - URL`` is fed the payload through a
    pipe in ``SLOW_PIECES`` pieces ``SLOW_PAUSE`` seconds apart, over one NBD
    connection, with a ``progress`` event per piece.  If ``nbdcopy`` dies
    (its server went away) it stops feeding it and fails as ``write`` does.

``gate``
    a phase and the first disk's first ``progress``, then waits until the
    file :func:`gate_path` of its job id exists (a test creates it when it
    has set the scene, a full disk say), then goes on as ``ok``; exit 0.
``echo``
    prints the vCenter password it was given (from its environment) in every
    form a client might: raw, JSON-escaped with and without ``ensure_ascii``
    (in ``phase`` messages and an ``error`` event),
    URL-encoded (``quote`` and ``quote_plus``), shell-quoted, as a Python
    ``repr`` and a bytes ``repr``, on both streams; then an error line; exit 1.

Started as ``sbc_double.py standby --spare-id ID`` it is a spare, as the
real client is (``sna/contract/standby.py``): it prints the ready line, reads the job
(argv and added environment) from stdin, then runs it as above.

In every mode but ``stubborn``, SIGTERM prints ``sbc-double: got SIGTERM``
on stderr and exits 143, killing any ``nbdcopy`` it started first.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, Optional

PASSWORD_ENV = "SNA_VCENTER_PASSWORD"
JOB_ID_ENV = "MIGRATEKIT_JOB_ID"
MIB = 1024 * 1024
CHANGE_ID_PREFIX = "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d"
# The Go client's emoji, written by name so that this source stays plain text.
CHECK = "\N{WHITE HEAVY CHECK MARK}"
CAMERA = "\N{CAMERA WITH FLASH}"
ANTENNA = "\N{SATELLITE ANTENNA}"
CLIPBOARD = "\N{CLIPBOARD}"
ROCKET = "\N{ROCKET}"
CHART = "\N{BAR CHART}"
WRENCH = "\N{WRENCH}"
ARROW = "\N{RIGHTWARDS ARROW}"
#: Bytes the write modes put on each disk: whole MiB and an odd tail, so the
#: last NBD write is not aligned to any block size.
PAYLOAD_SIZE = 4 * MIB + 4321
SLOW_PIECES = 16
SLOW_PAUSE = 0.2
#: linux/prctl.h: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: nbdcopy processes and scratch directories, for the SIGTERM handler to clean up.
CHILDREN: list[subprocess.Popen[bytes]] = []
SCRATCH: list[str] = []


def payload(disk_key: str, size: int = PAYLOAD_SIZE) -> bytes:
    """What the write modes write to disk ``disk_key``: pseudo-random, the same on every run."""
    return random.Random(f"sbc-double:{disk_key}").randbytes(size)


class Target:
    """One ``key:nbd://host:port/export`` item of ``--nbd-targets``."""

    def __init__(self, index: int, disk_key: str, url: str) -> None:
        self.index = index
        self.disk_key = disk_key
        self.url = url
        self.bytes_total = MIB * (index + 1)
        self.change_id = f"{CHANGE_ID_PREFIX}/{5440 + index}"

    @property
    def address(self) -> str:
        """``host:port/export``, as the Go client logs it."""
        return self.url.removeprefix("nbd://")

    @property
    def export(self) -> str:
        return self.address.partition("/")[2]


def parse_targets(text: str) -> list[Target]:
    targets: list[Target] = []
    for item in text.split(","):
        key, sep, url = item.strip().partition(":")
        if sep and key and url:
            targets.append(Target(len(targets), key, url))
    return targets


def emit(event: str, **fields: Any) -> None:
    """One JSON event on stdout, flushed at once as the real client does."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def masked_argv(argv: list[str]) -> list[str]:
    shown = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("********")
            hide_next = False
        elif arg == "--vmware-password":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--vmware-password="):
            shown.append("--vmware-password=********")
        else:
            shown.append(arg)
    return shown


def report_invocation(argv: list[str]) -> None:
    env: dict[str, Optional[str]] = {name: None for name in sorted(os.environ)}
    if JOB_ID_ENV in env:
        env[JOB_ID_ENV] = os.environ[JOB_ID_ENV]
    password_in_env = "true" if os.environ.get(PASSWORD_ENV) else "false"
    log(
        f"sbc-double: argv={json.dumps(masked_argv(argv))} env={json.dumps(env)}"
        f" password_in_env={password_in_env}"
    )


def on_sigterm(signum: int, frame: Optional[FrameType]) -> NoReturn:
    log("sbc-double: got SIGTERM")
    for child in CHILDREN:
        if child.poll() is None:
            child.kill()
            child.wait()
    for directory in SCRATCH:
        shutil.rmtree(directory, ignore_errors=True)
    os._exit(143)


def sleep_forever() -> NoReturn:
    while True:
        time.sleep(3600)


def copy_disks(targets: list[Target], steps: int, pause: float) -> None:
    for target in targets:
        emit(
            "disk_start",
            disk_key=target.disk_key,
            sync_type="full",
            sync_reason="no previous change ID",
            bytes_total=target.bytes_total,
        )
        log(f"sbc-double: copying disk {target.disk_key} to {target.url}")
        for step in range(1, steps + 1):
            if pause:
                time.sleep(pause)
            emit(
                "progress",
                disk_key=target.disk_key,
                bytes_done=target.bytes_total * step // steps,
                bytes_total=target.bytes_total,
                throughput_bps=float(target.bytes_total) * 4,
            )
        emit(
            "disk_done",
            disk_key=target.disk_key,
            change_id=target.change_id,
            bytes_done=target.bytes_total,
            bytes_total=target.bytes_total,
        )


def run_ok(job_id: str, targets: list[Target], steps: int = 4, pause: float = 0.0) -> int:
    if not targets:
        emit("error", message="no NBD targets given")
        log("Error: no NBD targets given")
        return 1
    emit("phase", phase="snapshot", message=f"creating snapshot sbak-{job_id}")
    emit("phase", phase="transfer", message=f"copying {len(targets)} disk(s)")
    copy_disks(targets, steps, pause)
    emit("phase", phase="cleanup", message=f"removing snapshot sbak-{job_id}")
    emit("done", message=f"backup {job_id} completed: {len(targets)} disk(s)")
    log("sbc-double: migration completed")
    return 0


def run_stalled(job_id: str, targets: list[Target]) -> NoReturn:
    emit("phase", phase="snapshot", message=f"creating snapshot sbak-{job_id}")
    first = targets[0] if targets else Target(0, "2000", "nbd://127.0.0.1:10100/disk0")
    emit(
        "progress",
        disk_key=first.disk_key,
        bytes_done=first.bytes_total // 4,
        bytes_total=first.bytes_total,
        throughput_bps=1048576.0,
    )
    log("sbc-double: stalled, waiting for a signal")
    sleep_forever()


def run_fail(job_id: str, targets: list[Target]) -> int:
    first = targets[0] if targets else Target(0, "2000", "nbd://127.0.0.1:10100/disk0")
    emit("phase", phase="transfer", message="copying 1 disk(s)")
    emit(
        "progress",
        disk_key=first.disk_key,
        bytes_done=first.bytes_total // 2,
        bytes_total=first.bytes_total,
        throughput_bps=1048576.0,
    )
    emit("error", message="disk 2000: NBD write failed: connection reset")
    log("Error: NBD write failed")
    return 3


def run_crash(job_id: str, targets: list[Target]) -> int:
    sys.stdout.write('{"event":"progress","disk_key":"2000","bytes_do')
    sys.stdout.flush()
    log("panic: interface conversion: types.BaseVirtualDeviceBackingInfo is nil, not")
    log("*types.VirtualDiskFlatVer2BackingInfo")
    log("")
    log("goroutine 1 [running]:")
    log("main.main()")
    log("\t/build/sendense-backup-client/main.go:412 +0x1c4")
    return 2


def run_legacy(job_id: str, targets: list[Target], vm: str) -> int:
    """The Go client's lines (upstream-contracts.md 3.8), all on stderr."""

    def stamp() -> datetime:
        return datetime.now().astimezone()

    def logrus(msg: str, **fields: Any) -> None:
        pairs = "".join(f" {key}={quote(value)}" for key, value in sorted(fields.items()))
        log(f'time="{stamp().isoformat(timespec="seconds")}" level=info msg={quote(msg)}{pairs}')

    def stdlog(msg: str) -> None:
        log(f"{stamp():%Y/%m/%d %H:%M:%S} {msg}")

    logrus(f"{CHECK} Change tracking (CBT) is already enabled - will use for accurate progress")
    logrus("Set progress tracking job ID from command line flag", job_id=job_id)
    logrus(
        f"{CAMERA} Creating job-specific snapshot",
        job_id=job_id,
        prefix="sbak-",
        snapshot_name=f"sbak-{job_id}",
    )
    # The snapshot progress bar goes to stdout with carriage returns; its newline to stderr.
    for percent in (45, 100):
        sys.stdout.write(f"\rCreating snapshot {percent:3d}% [{'=' * (percent // 10):<10}]")
        sys.stdout.flush()
    log("")
    for target in targets:
        disk = f"[datastore1] {vm}/{vm}_{target.index}.vmdk"
        stdlog(f"{ANTENNA} Getting ChangeID from BACKUP API for VM {vm} disk {target.index}")
        stdlog(f"{CLIPBOARD} No previous ChangeID found")
        logrus("Data does not exist, full copy needed")
        stdlog(
            f"{CHECK} DIRECT MATCH: VMware disk disk-{target.disk_key} (key:{target.disk_key})"
            f" {ARROW} {target.address}"
        )
        stdlog(f"{CHECK} NBD connection ready: {target.address}")
        logrus(f"{ROCKET} Starting parallel full copy", disk=disk, vm=vm)
        size_gb = target.bytes_total / 1024**3
        logrus(
            f"{CHART} Total disk size: {size_gb:.2f} GB ({target.bytes_total} bytes)",
            disk=disk,
            vm=vm,
        )
        logrus(f"{WRENCH} Using 3 parallel workers for full copy", disk=disk, vm=vm)
        logrus(
            f"{CHECK} Parallel full copy completed successfully",
            bytes_copied=target.bytes_total,
            disk=disk,
            gb_copied=0,
            vm=vm,
        )
        stdlog(f"{ANTENNA} Storing ChangeID via BACKUP completion API for disk {target.index}")
        stdlog(f"{CHECK} Successfully stored ChangeID in SHA database")
        stdlog(f"{CLIPBOARD} Stored ChangeID in database: {target.change_id}")
    logrus("Migration completed")
    return 0


def die_with_parent() -> None:
    """In the child: be killed when the double dies, even by SIGKILL (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the SIGTERM handler still stops the child


def start_nbdcopy(source: str, url: str, stdin: Any, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["nbdcopy", "--flush", "--", source, url],
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        preexec_fn=die_with_parent,
    )
    CHILDREN.append(process)
    return process


def feed_slowly(process: subprocess.Popen[bytes], target: Target, data: bytes) -> None:
    """Feed ``data`` to nbdcopy's stdin piece by piece; stop early if nbdcopy dies."""
    assert process.stdin is not None
    step = -(-len(data) // SLOW_PIECES)
    done = 0
    try:
        while done < len(data):
            process.stdin.write(data[done : done + step])
            process.stdin.flush()
            done = min(done + step, len(data))
            emit(
                "progress",
                disk_key=target.disk_key,
                bytes_done=done,
                bytes_total=len(data),
                throughput_bps=step / SLOW_PAUSE,
            )
            if done < len(data):
                time.sleep(SLOW_PAUSE)
            if process.poll() is not None:
                break
    except BrokenPipeError:
        pass  # nbdcopy is gone; its exit status says why
    finally:
        try:
            process.stdin.close()
        except BrokenPipeError:
            pass


def write_target(target: Target, data: bytes, slowly: bool) -> Optional[str]:
    """Write ``data`` at offset 0 of the target with nbdcopy; what went wrong, or None."""
    with tempfile.TemporaryDirectory(prefix="sbc-double-") as scratch:
        SCRATCH.append(scratch)
        errors_path = Path(scratch) / "nbdcopy.err"
        with open(errors_path, "w+b") as errors:
            if slowly:
                process = start_nbdcopy("-", target.url, subprocess.PIPE, errors)
                feed_slowly(process, target, data)
            else:
                source = Path(scratch) / "payload.raw"
                source.write_bytes(data)
                process = start_nbdcopy(str(source), target.url, subprocess.DEVNULL, errors)
            code = process.wait()
            errors.seek(0)
            text = errors.read().decode("utf-8", "replace").strip()
    for line in text.splitlines():
        log(line)
    if code == 0:
        return None
    last = text.splitlines()[-1] if text else "no message"
    return f"nbdcopy to {target.url} failed with exit code {code}: {last}"


def run_write(job_id: str, targets: list[Target], slowly: bool) -> int:
    if not targets:
        emit("error", message="no NBD targets given")
        return 1
    emit("phase", phase="transfer", message=f"writing {len(targets)} disk(s)")
    for target in targets:
        data = payload(target.disk_key)
        emit(
            "disk_start",
            disk_key=target.disk_key,
            sync_type="full",
            sync_reason="no previous change ID",
            bytes_total=len(data),
        )
        log(f"sbc-double: writing {len(data)} bytes to {target.url}")
        problem = write_target(target, data, slowly)
        if problem is not None:
            emit("error", message=f"disk {target.disk_key}: {problem}")
            log(f"Error: {problem}")
            return 1
        emit(
            "disk_done",
            disk_key=target.disk_key,
            change_id=target.change_id,
            bytes_done=len(data),
            bytes_total=len(data),
        )
    emit("done", message=f"backup {job_id} completed: {len(targets)} disk(s) written")
    return 0


def quote(value: object) -> str:
    """A logrus TextFormatter value: quoted when it holds spaces, quotes or non-ASCII."""
    text = str(value)
    if text and all(c.isascii() and (c.isalnum() or c in "-._/@^+") for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def gate_path(job_id: str) -> Path:
    """The file a ``gate`` double waits for (in ``$TMPDIR``, which sna passes on)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
    return Path(tempfile.gettempdir()) / f"sbc-double-gate-{safe}"


def run_gate(job_id: str, targets: list[Target]) -> int:
    first = targets[0] if targets else Target(0, "2000", "nbd://127.0.0.1:10100/disk0")
    emit("phase", phase="transfer", message=f"copying {len(targets)} disk(s)")
    emit(
        "progress",
        disk_key=first.disk_key,
        bytes_done=first.bytes_total // 4,
        bytes_total=first.bytes_total,
        throughput_bps=1048576.0,
    )
    log(f"sbc-double: waiting for {gate_path(job_id)}")
    while not gate_path(job_id).exists():
        time.sleep(0.05)
    return run_ok(job_id, targets)


def password_forms(password: str) -> list[str]:
    """The password as clients print it: raw, escaped, encoded, quoted."""
    return [
        password,
        json.dumps(password)[1:-1],
        json.dumps(password, ensure_ascii=False)[1:-1],
        urllib.parse.quote(password),
        urllib.parse.quote(password, safe=""),
        urllib.parse.quote_plus(password),
        shlex.quote(password),
        repr(password),
        ascii(password),
        repr(password.encode("utf-8")),
    ]


def run_echo(job_id: str, targets: list[Target]) -> int:
    password = os.environ.get(PASSWORD_ENV, "")
    forms = password_forms(password)
    emit("phase", phase="snapshot", message="connecting as admin:" + " ".join(forms))
    first = targets[0] if targets else Target(0, "2000", "nbd://127.0.0.1:10100/disk0")
    emit("progress", disk_key=first.disk_key, bytes_done=1, bytes_total=first.bytes_total)
    for ascii_only in (True, False):
        line = json.dumps(
            {"event": "phase", "phase": "transfer", "message": f"password={password}"},
            ensure_ascii=ascii_only,
        )
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    for form in forms:
        log(f"sbc-double: login https://admin:{form}@vcenter/sdk failed, password {form}")
    emit("error", message=f"login failed for password {password!r} ({json.dumps(password)})")
    log(f"Error: cannot log in with password {password}")
    return 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sbc_double.py", description="backup-client test double")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate")
    migrate.add_argument("--vmware-endpoint", required=True)
    migrate.add_argument("--vmware-username", required=True)
    migrate.add_argument("--vmware-password")
    migrate.add_argument("--vmware-path", required=True)
    migrate.add_argument("--nbd-targets", required=True)
    migrate.add_argument("--job-id", required=True)
    # Flags the real client has and this double does not need are accepted and ignored.
    args, _unknown = parser.parse_known_args(argv)
    return args


MODES = (
    "ok",
    "fail",
    "slow",
    "hang",
    "stubborn",
    "legacy",
    "crash",
    "write",
    "slowwrite",
    "gate",
    "echo",
)


#: Name prefix of the memfd a spare double holds once it has a job.
JOB_MEMFD = "sbc-double-job:"
HELD: list[int] = []


def standby(argv: list[str]) -> Optional[list[str]]:
    """As a spare (``standby --spare-id ID``): the job's argv from stdin, its env added."""
    if len(argv) != 2 or argv[0] != "--spare-id":
        log(f"sbc-double: bad standby arguments {argv}")
        sys.exit(2)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    print('{"event":"standby"}', flush=True)
    line = sys.stdin.readline()
    if not line:
        return None
    job = json.loads(line)
    os.environ.update(job["env"])
    argv = job["argv"]
    assert isinstance(argv, list)
    # A spare's argv names no job: an open memfd named after it lets tests find
    # this process by job (/proc/PID/fd/N -> "/memfd:sbc-double-job:ID (deleted)").
    job_id = next(
        (a.partition("=")[2] for a in argv if a.startswith("--job-id=")),
        argv[argv.index("--job-id") + 1] if "--job-id" in argv else "?",
    )
    HELD.append(os.memfd_create(f"{JOB_MEMFD}{job_id}"))
    return argv


def main(argv: list[str]) -> int:
    # The Go client writes UTF-8 whatever the locale; so must its double.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="replace")
    if argv[:1] == ["standby"]:
        job = standby(argv[1:])
        if job is None:
            return 0
        argv = job
    report_invocation(argv)
    args = parse_args(argv)
    vm = args.vmware_path.rstrip("/").rpartition("/")[2]
    mode = vm if vm in MODES else "ok"
    targets = parse_targets(args.nbd_targets)
    job_id: str = args.job_id
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_sigterm)
    log(f"sbc-double: job {job_id} vm {vm} mode {mode}, {len(targets)} target(s)")
    if mode in ("hang", "stubborn"):
        run_stalled(job_id, targets)
    if mode == "fail":
        return run_fail(job_id, targets)
    if mode == "crash":
        return run_crash(job_id, targets)
    if mode == "legacy":
        return run_legacy(job_id, targets, vm)
    if mode == "slow":
        return run_ok(job_id, targets, steps=10, pause=0.2)
    if mode in ("write", "slowwrite"):
        return run_write(job_id, targets, slowly=mode == "slowwrite")
    if mode == "gate":
        return run_gate(job_id, targets)
    if mode == "echo":
        return run_echo(job_id, targets)
    return run_ok(job_id, targets)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
