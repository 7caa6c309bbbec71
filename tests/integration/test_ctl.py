"""``sna-ctl`` against a real ``twistd sna``, run as the console script the package installs.

Jobs are run by the client double (``tests/sbc_double.py``), whose VM name
picks what it does (``slow``, ``hang``, ``fail``, any other name: a quick
success).  ``watch`` runs once with its stdout a pipe and once on a
pseudo-terminal (``pty``), where it must draw bars in place, follow the
terminal's width and give the cursor back on Ctrl-C.  Every process is
stopped by pid; nothing asserts how long anything took.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional

import pytest

from tests.certs import self_signed
from tests.integration.harness import (
    RUN_TOKEN,
    Daemon,
    JobIds,
    backup_body,
    wait_for,
)

pytestmark = pytest.mark.integration

#: Bounds a sna-ctl run; never a measurement.
RUN_DEADLINE = 60.0
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def sna_ctl() -> str:
    """The console script installed beside the interpreter (setup.py's entry point)."""
    script = Path(sys.executable).with_name("sna-ctl")
    if not script.exists():
        pytest.fail(f"{script} is not installed: reinstall the package (make venv)")
    return str(script)


def ctl_env(daemon: Optional[Daemon], home: Path, **extra: str) -> dict[str, str]:
    """An environment with no config file of the user's and no token, aimed at ``daemon``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SNA_") and key != "XDG_CONFIG_HOME"
    }
    env["HOME"] = str(home)
    if daemon is not None:
        env["SNA_URL"] = f"http://127.0.0.1:{daemon.port}"
    env.update(extra)
    return env


def run_ctl(
    args: Sequence[str],
    env: Mapping[str, str],
    stdin: Optional[str] = None,
    deadline: float = RUN_DEADLINE,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sna_ctl(), *args],
        env=dict(env),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=deadline,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


# -- a pseudo-terminal -------------------------------------------------------------------


class PtyRun:
    """sna-ctl with a pseudo-terminal as stdin, stdout and stderr; everything it writes
    is collected by a thread, so it never blocks on a full terminal."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], columns: int = 120, rows: int = 40
    ) -> None:
        self.master, slave = pty.openpty()
        self.resize(columns, rows, signal_child=False)
        self.process = subprocess.Popen(
            [sna_ctl(), *args],
            env={**env, "TERM": "xterm"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(data)

    @property
    def output(self) -> str:
        """What the terminal received, its CR LF (the terminal's own) back to LF."""
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, check: Callable[[str], bool], what: str) -> str:
        return wait_for(lambda: (check(text := self.output) and text) or None, what, RUN_DEADLINE)

    def resize(self, columns: int, rows: int, signal_child: bool = True) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        if signal_child:
            # The terminal is not the child's controlling terminal: tell it as the kernel would.
            os.kill(self.process.pid, signal.SIGWINCH)

    def finish(self) -> int:
        code = self.process.wait(RUN_DEADLINE)
        self._reader.join(RUN_DEADLINE)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        os.close(self.master)


@pytest.fixture
def ptys() -> Iterator[list[PtyRun]]:
    """Every pseudo-terminal run of a test, stopped and closed at its end."""
    runs: list[PtyRun] = []
    yield runs
    for run in runs:
        run.close()


def frames(output: str) -> list[list[str]]:
    """What each redraw drew: the lines after each cursor movement up, escapes removed."""
    pieces = re.split(r"\x1b\[\d+F", output)
    clean = [[ESCAPE.sub("", line).replace("\r", "") for line in p.split("\n")] for p in pieces]
    return [[line for line in piece if line] for piece in clean]


# -- the commands ---------------------------------------------------------------------------


def test_health_and_what_each_exit_status_means(sna: Daemon, home: Path) -> None:
    env = ctl_env(sna, home)
    done = run_ctl(["health"], env)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[0] == "status    healthy"
    assert lines[1].startswith("version   ") and lines[2].startswith("uptime    ")
    assert re.match(r"jobs      \d+ running, \d+ completed, ", lines[3])
    assert lines[-1] == f"url       http://127.0.0.1:{sna.port}", lines
    # No tunnel configured: none is spoken of (a snapshot an earlier test's job
    # left pending may be: "snapshots N pending removal").
    assert not [line for line in lines if line.startswith("tunnel")], lines
    assert all(re.match(r"snapshots \d+ pending removal$", line) for line in lines[4:-1]), lines
    assert json.loads(run_ctl(["--json", "health"], env).stdout)["status"] == "healthy"
    # Neither tunnel nor enrollment here: said so, and no failure.
    tunnel = run_ctl(["tunnel"], env)
    assert (tunnel.returncode, tunnel.stdout) == (
        0,
        "no tunnel is configured (enroll the node, or start sna with --tunnel-*)\n",
    )
    enrollment = run_ctl(["enrollment"], env)
    assert enrollment.returncode == 0 and enrollment.stdout.startswith("the node is not enrolled")
    # Nothing listens on port 1 of loopback: 3, but for health, whose check it fails (1).
    down = run_ctl(["jobs", "--url", "http://127.0.0.1:1"], env)
    assert down.returncode == 3
    assert down.stderr.startswith("sna-ctl: cannot reach the daemon at http://127.0.0.1:1: ")
    down = run_ctl(["health", "--url", "http://127.0.0.1:1"], env)
    assert down.returncode == 1
    assert down.stderr.startswith("sna-ctl: cannot reach the daemon at http://127.0.0.1:1: ")
    usage = run_ctl(["jobs", "--status", "sleeping"], env)
    assert usage.returncode == 2 and "invalid choice: 'sleeping'" in usage.stderr


def test_the_token_comes_from_a_file_or_the_environment(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, home: Path
) -> None:
    token = "ctl-token-" + RUN_TOKEN
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    daemon = daemon_factory(name="token", extra=("--auth-token-file", str(token_file)))
    env = ctl_env(daemon, home)
    refused = run_ctl(["jobs"], env)
    assert refused.returncode == 1
    assert refused.stderr == (
        "sna-ctl: a valid bearer token is required "
        "(give it with --token-file, SNA_TOKEN_FILE or SNA_TOKEN)\n"
    )
    assert run_ctl(["health"], env).returncode == 0  # /health needs none
    for extra, args in (
        ({"SNA_TOKEN_FILE": str(token_file)}, ["jobs"]),
        ({"SNA_TOKEN": token}, ["jobs"]),
        ({}, ["jobs", "--token-file", str(token_file)]),
    ):
        done = run_ctl(args, {**env, **extra})
        assert done.returncode == 0, (extra, args, done)
        assert done.stdout.startswith("ID ")
    config = home / ".config" / "sna" / "ctl.conf"
    config.parent.mkdir(parents=True)
    config.write_text(
        f"[sna-ctl]\nurl = http://127.0.0.1:{daemon.port}\ntoken_file = {token_file}\n"
    )
    del env["SNA_URL"]
    assert run_ctl(["jobs"], env).returncode == 0
    wrong = token_file.with_name("wrong")
    wrong.write_text("not-it\n")
    assert run_ctl(["jobs"], {**env, "SNA_TOKEN_FILE": str(wrong)}).returncode == 1


def test_jobs_lists_filters_and_pages(sna: Daemon, job_ids: JobIds, home: Path) -> None:
    env = ctl_env(sna, home)
    vm, other = f"ctl-{RUN_TOKEN}-a", f"ctl-{RUN_TOKEN}-b"
    made = [job_ids("a"), job_ids("a"), job_ids("b")]
    for job_id, name in zip(made, (vm, vm, other), strict=True):
        sna.api.start(backup_body(job_id, vm=name))
        sna.api.wait_status(job_id, "completed")
    listed = run_ctl(["jobs", "--vm", vm], env)
    assert listed.returncode == 0, listed
    header, *rows = listed.stdout.splitlines()
    assert header.split() == [
        "ID",
        "VM",
        "TYPE",
        "STATUS",
        "START",
        "DURATION",
        "BYTES",
        "RATE",
        "PROGRESS",
    ]
    # Newest first, each with its figures.
    assert [row.split()[0] for row in rows] == [made[1], made[0]]
    for row in rows:
        cells = row.split()
        assert cells[1:4] == [vm, "full", "completed"] and cells[-1] == "100.0%"
    as_json = json.loads(run_ctl(["jobs", "--vm", vm, "--json"], env).stdout)
    assert [j["job_id"] for j in as_json["jobs"]] == [made[1], made[0]]
    assert as_json["count"] == 2
    newest = run_ctl(["jobs", "--vm", vm, "--limit", "1"], env)
    assert [r.split()[0] for r in newest.stdout.splitlines()[1:]] == [made[1]]
    assert newest.stderr == "(1 of 2 jobs shown; --limit for more)\n"
    none = run_ctl(["jobs", "--vm", vm, "--status", "failed", "--status", "cancelled"], env)
    assert none.stdout.splitlines()[1:] == []
    recent = run_ctl(["jobs", "--vm", other, "--since", "1h"], env)
    assert [r.split()[0] for r in recent.stdout.splitlines()[1:]] == [made[2]]
    future = run_ctl(["jobs", "--vm", other, "--since", "2099-01-01T00:00:00Z"], env)
    assert future.stdout.splitlines()[1:] == []


def test_log_follows_a_job_to_its_end(sna: Daemon, job_ids: JobIds, home: Path) -> None:
    env = ctl_env(sna, home)
    job_id = job_ids("slow")
    sna.api.start(backup_body(job_id, vm="slow", disks=2))
    followed = run_ctl(["log", job_id, "-f"], env)
    assert followed.returncode == 0, followed
    lines = followed.stdout.splitlines()
    # It ran until the job ended: the daemon's first and last lines are there.
    assert " sna starting " in lines[0]
    assert " sna process ended: exit_code=0" in lines[-1]
    assert sna.api.status(job_id)["status"] == "completed"
    assert (
        sum('"event": "disk_done"' in line or '"event":"disk_done"' in line for line in lines) == 2
    )
    # Read again once ended: the same lines, without waiting.
    again = run_ctl(["log", job_id], env)
    assert again.stdout.splitlines() == lines
    missing = run_ctl(["log", job_ids("never-started")], env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("sna-ctl: job ") and "not found" in missing.stderr


def test_cancel_and_wait(sna: Daemon, job_ids: JobIds, home: Path) -> None:
    env = ctl_env(sna, home)
    job_id = job_ids("hang")
    pid = sna.api.start(backup_body(job_id, vm="hang"))["pid"]
    sna.api.wait_progress(job_id)
    done = run_ctl(["cancel", job_id, "--wait"], env)
    assert done.returncode == 0, done
    first, last = done.stdout.splitlines()
    assert first == f"Cancel requested; the backup client (pid {pid}) is being stopped"
    assert last.startswith(f"{job_id}: cancelled after ")
    again = run_ctl(["cancel", job_id], env)
    assert again.returncode == 1
    assert again.stderr == f"sna-ctl: job {job_id} is not running (status cancelled)\n"


def test_relays_are_a_table(sna: Daemon, job_ids: JobIds, home: Path) -> None:
    env = ctl_env(sna, home)
    job_id = job_ids("hang")
    sna.api.start(backup_body(job_id, vm="hang", disks=2))
    sna.api.wait_progress(job_id)
    try:
        done = run_ctl(["relays"], env)
        assert done.returncode == 0, done
        header, *rows = done.stdout.splitlines()
        assert header.split()[:4] == ["JOB", "DISK", "EXPORT", "HUB"]
        mine = sorted(row.split()[1] for row in rows if row.startswith(job_id + " "))
        assert mine == ["2000", "2001"]
        relays = json.loads(run_ctl(["relays", "--json"], env).stdout)["relays"]
        ports = {r["nbd_port"] for r in relays if r["job_id"] == job_id}
        status = sna.api.status(job_id)
        assert ports == {d["nbd_port"] for d in status["disks"]}
    finally:
        sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
        sna.api.wait_status(job_id, "cancelled", "failed")


def test_watch_through_a_pipe_writes_plain_lines(sna: Daemon, job_ids: JobIds, home: Path) -> None:
    env = ctl_env(sna, home)
    job_id = job_ids("slow")
    sna.api.start(backup_body(job_id, vm="slow", disks=2))
    done = run_ctl(["watch", job_id, "--interval", "0.2"], env)
    assert done.returncode == 0, done
    assert "\x1b" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[-1].startswith(f"{job_id}: completed in ")
    progress = [line for line in lines[:-1] if line.startswith(f"{job_id} running ")]
    assert progress, lines
    assert all("| disk 2000 " in line and "| disk 2001 " in line for line in progress)
    # One line per change: never the same line twice in a row.
    assert all(a != b for a, b in itertools.pairwise(lines))
    failing = job_ids("fail")
    sna.api.start(backup_body(failing, vm="fail"))
    failed = run_ctl(["watch", failing], env)
    assert failed.returncode == 4
    assert failed.stdout.splitlines()[-1].startswith(f"{failing}: failed after ")
    # --json: the job's /status, a line at a time, the last one final.
    as_json = run_ctl(["--json", "watch", failing], env)
    assert as_json.returncode == 4
    statuses = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert statuses[-1]["job_id"] == failing and statuses[-1]["status"] == "failed"


def test_watch_on_a_terminal_draws_bars_in_place(
    sna: Daemon, job_ids: JobIds, home: Path, ptys: list[PtyRun]
) -> None:
    env = ctl_env(sna, home)
    job_id = job_ids("slow")
    sna.api.start(backup_body(job_id, vm="slow", disks=2))
    run = PtyRun(["watch", job_id, "--interval", "0.2"], env, columns=120)
    ptys.append(run)
    code = run.finish()
    output = run.output
    assert code == 0, output
    assert output.startswith("\x1b[?25l") and output.endswith("\x1b[?25h")
    assert "\x1b[K" in output and re.search(r"\x1b\[\d+F", output)  # redrawn in place
    drawn = [line for frame in frames(output) for line in frame]
    bars = [line for line in drawn if line.startswith("  disk ") and "[" in line and "%" in line]
    assert any("ETA" in line and "/s" in line for line in bars), drawn
    assert all(len(line) <= 119 for line in drawn)
    last = ESCAPE.sub("", output).rstrip().splitlines()[-1]
    assert last.startswith(f"{job_id}: completed in ")


def test_watch_follows_the_terminal_width_and_gives_the_cursor_back(
    sna: Daemon, job_ids: JobIds, home: Path, ptys: list[PtyRun]
) -> None:
    env = ctl_env(sna, home)
    job_id = job_ids("hang")
    sna.api.start(backup_body(job_id, vm="hang", disks=2))
    try:
        run = PtyRun(["watch", "--interval", "0.2"], env, columns=140)
        ptys.append(run)
        run.wait_for(
            lambda text: f"{job_id}  hang" in text and len(frames(text)) > 2,
            "the running job to be drawn, and drawn again",
        )
        wide = max(len(line) for line in frames(run.output)[-2])
        assert wide > 60
        mark = len(run.output)
        run.resize(60, 40)
        run.wait_for(lambda text: len(frames(text[mark:])) > 3, "redraws after the resize")
        after = frames(run.output[mark:])[-2]
        assert after and all(len(line) <= 59 for line in after), after
        os.kill(run.process.pid, signal.SIGINT)
        code = run.finish()
        assert code == 130
        assert run.output.endswith("interrupted\x1b[K\n\x1b[?25h")
    finally:
        sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
        sna.api.wait_status(job_id, "cancelled", "failed")


def test_watch_without_a_job_shows_each_new_one_and_how_it_ended(
    sna: Daemon, job_ids: JobIds, home: Path
) -> None:
    env = ctl_env(sna, home)
    process = subprocess.Popen(
        [sna_ctl(), "watch", "--interval", "0.2"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    job_id = job_ids("slow")
    try:
        # Started once watch has polled: it must appear, then end with its result.
        wait_for(lambda: lines, "watch's first line")
        sna.api.start(backup_body(job_id, vm="slow"))
        wait_for(
            lambda: any(line.startswith(f"{job_id}: completed in ") for line in lines),
            "watch to say the job completed",
            RUN_DEADLINE,
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(RUN_DEADLINE)
        reader.join(RUN_DEADLINE)
    assert process.returncode == 130
    assert any(line.startswith(f"{job_id} running ") for line in lines), lines


def _api_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key (mode 0600, as the daemon wants)."""
    made = self_signed(directory, "api")
    return Path(made.key), Path(made.cert)


def test_an_https_api_is_verified_against_the_ca_file(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, home: Path
) -> None:
    key, cert = _api_certificate(tmp_path)
    daemon = daemon_factory(name="tls", start=False)
    listen = f"ssl:{daemon.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    daemon.extra = ("--listen", listen)
    daemon.spawn()
    env = ctl_env(None, home, SNA_URL=f"https://127.0.0.1:{daemon.port}")
    wait_for(
        lambda: run_ctl(["health", "--ca-file", str(cert)], env).returncode == 0,
        "the daemon to answer over TLS",
    )
    untrusted = run_ctl(["relays"], env)
    assert untrusted.returncode == 3
    assert "its certificate is not trusted" in untrusted.stderr
    assert "give its CA with --ca-file" in untrusted.stderr
    assert run_ctl(["health", "--insecure"], env).returncode == 0
    assert run_ctl(["health"], {**env, "SNA_CA_FILE": str(cert)}).returncode == 0
    config = tmp_path / "ctl.conf"
    config.write_text(f"[sna-ctl]\nca_file = {cert.name}\n")
    assert run_ctl(["health", "--config", str(config)], env).returncode == 0
