"""What watching a backup costs the daemon: ``sna-ctl watch`` and the dashboard, against nobody.

A testbed (the vCenter simulator with CBT, loopback only) holds one VM,
``watchvm``, with one disk of ``--size`` bytes of random data.  ``twistd -n
sna`` runs with its default backup client (``sendense-backup-client``).
Every round runs the same full backup twice, in a shuffled order with a
fixed seed, each time through ``POST /api/v1/backup/start`` into a fresh
qcow2 served by a fresh ``qemu-nbd``:

``alone``
    nobody watches: only this script, which polls ``/status`` every
    ``POLL`` seconds (as in both variants);
``watched``
    two watchers run the whole time, started before the request and stopped
    after the job has ended:

    - ``sna-ctl watch`` (every running job) on a pseudo-terminal of 160x50,
      so it draws its bars in place; its output is read and discarded;
    - the dashboard in headless Chromium (Debian's ``/usr/bin/chromium``, the
      flags of tests/integration/test_dashboard.py), driven by Playwright in
      a helper process (this script with ``--serve-dashboard``) that opens
      the running job's card as soon as it appears, so the page also
      long-polls the job's log, as an operator following a job would.

    Both must show the job (its id in ``sna-ctl``'s output, its card ending
    ``completed`` on the page) or the run stops.

Every target is compared with the disk (``qemu-img compare``) after the
clock stops.  What is measured, per backup:

- **wall**: from just before the request to the job's ``end_time`` (the
  daemon's clock, the same host clock);
- **daemon CPU**: twistd's own user + system seconds over the job, from
  ``/proc/<twistd>/stat`` (the API, the event parsing, the relay, which
  forwards every byte in the daemon's process); **client CPU**: the change
  in its ``cutime + cstime`` (the daemon reaps the client);
- **requests**: the API requests the daemon answered during the job, from
  its access log, by user agent (``sna-ctl``, Chromium, this script);
- the watchers' own CPU (``sna-ctl``; the helper, Playwright's driver and
  Chromium's processes), and the machine's busy cores (``/proc/stat``).

The figure is the median of the per-round ratios ``watched / alone`` (the
reference is the same run's ``alone`` backup of the same round), with their
range.  This is a benchmark: it prints figures and asserts nothing.

    .venv/bin/python benchmarks/watchers_bench.py                     # 2 GiB, 5 rounds
    .venv/bin/python benchmarks/watchers_bench.py --size 1G --runs 3
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import random
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_bench import machine_busy, parse_time, proc_cpu, verify  # noqa: E402

from tests.integration.test_dashboard import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from tests.testbed import Testbed, human_size, parse_size  # noqa: E402
from tests.testbed.sna import Sna  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
VM = "watchvm"
DISK_KEY = 2000
VARIANTS = ("alone", "watched")
#: How often this script asks ``/status`` for the job, in both variants.
POLL = 0.5
JOB_DEADLINE = 1800.0
#: Upper bound for a watcher to start, or to show that the job ended.
WATCHER_DEADLINE = 60.0
#: sna-ctl's terminal: rows, columns.
TERMINAL = (50, 160)
SNA_CTL = Path(sys.executable).with_name("sna-ctl")
#: An access-log line: the request line, then status and length, referrer, agent.
ACCESS = re.compile(
    r'"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS) (\S+) [^"]*" \d{3} \S+ "[^"]*" "([^"]*)"'
)


# -- processes ---------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (by parent pid in ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def cmdline(pid: int) -> list[str]:
    """A process's argv; empty if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def kill_tree(root: int) -> None:
    """SIGKILL a process and whatever is left below it, by pid."""
    for pid in reversed(descendants(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the watchers ------------------------------------------------------------------------------


class CtlWatch:
    """``sna-ctl watch`` on a pseudo-terminal; a thread reads and drops what it draws."""

    def __init__(self, url: str, home: Path) -> None:
        master, slave = pty.openpty()
        rows, columns = TERMINAL
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", XDG_CONFIG_HOME=str(home))
        for name in ("SNA_URL", "SNA_TOKEN", "SNA_TOKEN_FILE", "SNA_CA_FILE"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [str(SNA_CTL), "--url", url, "watch"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self._master = master
        self._lock = threading.Lock()
        self._drawn = 0
        self._tail = b""
        self._reader = threading.Thread(target=self._read, name="sna-ctl-pty", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                return
            if not data:
                return
            with self._lock:
                self._drawn += len(data)
                self._tail = (self._tail + data)[-65536:]

    @property
    def drawn(self) -> int:
        """Bytes written to the terminal so far."""
        with self._lock:
            return self._drawn

    def showed(self, text: str) -> bool:
        """Whether ``text`` is in the last 64 KiB it drew."""
        with self._lock:
            return text.encode() in self._tail

    def stop(self) -> None:
        """Ctrl-C, as a person would; SIGKILL if it has not gone within 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        os.close(self._master)


class Dashboard:
    """The dashboard in headless Chromium, in a helper process (``--serve-dashboard``)."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="sna-chromium-", dir=workdir))
        self._log = open(workdir / "dashboard.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-dashboard", url, "--profile", str(self.profile)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.lines: list[str] = []
        self._said = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="dashboard-lines", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._said:
                self.lines.append(line.strip())
                self._said.notify_all()

    def wait_line(self, prefix: str, deadline: float = WATCHER_DEADLINE) -> str:
        """The first line the helper said that starts with ``prefix``."""
        end = time.monotonic() + deadline
        with self._said:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = end - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    break
                self._said.wait(min(left, 0.5))
        raise SystemExit(
            f"the dashboard helper did not say {prefix!r} (it said {self.lines}); "
            f"see {self._log.name}"
        )

    def stop(self) -> None:
        """Ask the helper to close the browser; then kill what is left and remove the profile."""
        try:
            if self.process.poll() is None and self.process.stdin is not None:
                self.process.stdin.write("stop\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                kill_tree(self.process.pid)
                self.process.wait()
            # Whatever of this browser outlived the helper (Chromium's children keep their
            # argv as one string).
            marker = f"--user-data-dir={self.profile}"
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    words = " ".join(cmdline(int(entry.name))).split(" ")
                    if marker in words:
                        kill_tree(int(entry.name))
            shutil.rmtree(self.profile, ignore_errors=True)
            self._log.close()


@dataclass
class Watchers:
    """Both watchers of one ``watched`` backup."""

    ctl: CtlWatch
    dashboard: Dashboard

    @classmethod
    def start(cls, url: str, workdir: Path, settle: float) -> Watchers:
        """Start both and wait until each shows the daemon, then ``settle`` seconds."""
        dashboard = Dashboard(url, workdir)
        try:
            ctl = CtlWatch(url, workdir)
        except BaseException:
            dashboard.stop()
            raise
        watchers = cls(ctl, dashboard)
        try:
            ready = dashboard.wait_line("ready")
            if "hidden=false" not in ready:
                raise SystemExit(f"the dashboard's page is hidden, so it polls slowly: {ready}")
            end = time.monotonic() + WATCHER_DEADLINE
            while ctl.drawn == 0:
                if ctl.process.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"sna-ctl watch drew nothing (exit {ctl.process.poll()})")
                time.sleep(0.05)
            # Chromium's start-up work, off the measured backup.
            time.sleep(settle)
        except BaseException:
            watchers.stop()
            raise
        return watchers

    def cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far of sna-ctl, of Chromium, and of the helper with Playwright's driver."""
        browser = helper = 0.0
        for pid in descendants(self.dashboard.process.pid):
            seconds = sum(proc_cpu(pid))
            argv = cmdline(pid)
            # Debian's /usr/bin/chromium is a script that runs /usr/lib/chromium/chromium,
            # whose child processes rewrite their argv into one string.
            if argv and Path(argv[0].split(" ", 1)[0]).name == Path(CHROMIUM).name:
                browser += seconds
            else:
                helper += seconds
        return sum(proc_cpu(self.ctl.process.pid)), browser, helper

    def saw(self, job_id: str) -> None:
        """Both watchers showed the job, the page to its end; else stop the run."""
        line = self.dashboard.wait_line(f"ended {job_id} ")
        if not line.endswith(" completed"):
            raise SystemExit(f"the dashboard showed {job_id} ending otherwise: {line}")
        if f"following {job_id}" not in self.dashboard.lines:
            raise SystemExit(f"the dashboard never opened {job_id}'s card: {self.dashboard.lines}")
        if not self.ctl.showed(job_id):
            raise SystemExit(f"sna-ctl watch never drew {job_id}")

    def stop(self) -> None:
        try:
            self.ctl.stop()
        finally:
            self.dashboard.stop()


#: Run in the page from its start (over the DevTools protocol, so the page's CSP does not
#: apply): open each job's card once it shows the job running, as an operator following
#: it would (the page then long-polls its log), and tell the helper, through the console,
#: which jobs it follows and how they ended.  Driven by the page's own changes, so the
#: helper needs no polling of its own.
_FOLLOW = """
(() => {
  const seen = new Map();
  const look = () => {
    for (const card of document.querySelectorAll("article.job")) {
      const id = card.dataset.jobId;
      const status = card.dataset.status;
      if (!status || seen.get(id) === status) continue;
      if (status === "running" && !seen.has(id)) {
        card.click();
        console.log(`following ${id}`);
      } else if (status !== "running" && seen.has(id)) {
        console.log(`ended ${id} ${status}`);
      }
      seen.set(id, status);
    }
  };
  new MutationObserver(look).observe(document, {
    subtree: true,
    childList: true,
    attributes: true,
    attributeFilter: ["data-status"],
  });
})();
"""


def serve_dashboard(url: str, profile: Path) -> None:
    """The helper: open the page, which opens each running job's card; say what it saw.

    Lines on stdout: ``ready hidden=BOOL``, ``following JOB``, ``ended JOB
    STATUS``.  A line (or end of file) on stdin stops it.  Only the parent's
    page is opened, on 127.0.0.1.
    """
    from playwright.sync_api import ConsoleMessage, sync_playwright

    def say(text: str) -> None:
        print(text, flush=True)

    def console(message: ConsoleMessage) -> None:
        if message.text.startswith(("following ", "ended ")):
            say(message.text)

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1360, "height": 1000},
            service_workers="block",
        )
        try:
            context.add_init_script(_FOLLOW)
            page = context.new_page()
            page.on("console", console)
            page.goto(url)
            page.locator("#connection[data-state=live]").wait_for(timeout=WATCHER_DEADLINE * 1000)
            say(f"ready hidden={str(page.evaluate('document.hidden')).lower()}")
            # Playwright hands over the page's console messages while the helper waits in it.
            while not select.select([sys.stdin], [], [], 0)[0]:
                page.wait_for_timeout(1000)
        finally:
            context.close()


# -- one backup --------------------------------------------------------------------------------


@dataclass
class Sample:
    """One backup: seconds of wall and CPU, and the requests the daemon answered meanwhile."""

    wall: float
    daemon_cpu: float
    client_cpu: float
    busy: float
    #: API requests during the backup by who asked (``bench``, ``sna-ctl``, ``dashboard``),
    #: and by who asked and what (the path, job ids and query strings left out).
    requests: dict[str, int]
    paths: dict[tuple[str, str], int]
    ctl_cpu: float = 0.0
    browser_cpu: float = 0.0
    helper_cpu: float = 0.0


def agent_of(user_agent: str) -> str:
    if user_agent.startswith("sna-ctl"):
        return "sna-ctl"
    if "Chrome" in user_agent:
        return "dashboard"
    return "bench"


def route_of(path: str, job_id: str) -> str:
    """A request's path with the job's id as ``{id}``."""
    return path.replace(urllib.parse.quote(job_id, safe=""), "{id}")


def requests_since(
    log: Path, offset: int, job_id: str
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """API requests in the daemon's access log after ``offset``: by who asked, and by what."""
    counts = {"bench": 0, "sna-ctl": 0, "dashboard": 0}
    paths: dict[tuple[str, str], int] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f.read().decode("utf-8", "replace").splitlines():
            found = ACCESS.search(line)
            if found is not None:
                who = agent_of(found.group(2))
                counts[who] += 1
                what = (who, route_of(found.group(1), job_id))
                paths[what] = paths.get(what, 0) + 1
    return counts, paths


def backup(
    sna: Sna, testbed: Testbed, target: dict[str, Any], job_id: str, watchers: Optional[Watchers]
) -> Sample:
    """One full backup through the API, to its end, with its figures."""
    v = testbed.vcenter
    body = {
        "job_id": job_id,
        "vm_name": VM,
        "vcenter_host": f"{v['host']}:{v['port']}",
        "vcenter_user": v["user"],
        "vcenter_password": v["password"],
        "vcenter_thumbprint": v["thumbprint"],
        "vm_path": testbed.vm(VM)["path"],
        "nbd_targets": f"{DISK_KEY}:{target['nbd_url']}",
        "backup_type": "full",
        "nbd_host": "127.0.0.1",
    }
    sna.wait_spare()
    offset = sna.output.stat().st_size
    daemon0 = proc_cpu(sna.pid)
    watchers0 = watchers.cpu() if watchers is not None else (0.0, 0.0, 0.0)
    busy0 = machine_busy()
    start, since = time.time(), time.monotonic()
    sna.call("POST", "/api/v1/backup/start", body)
    end = time.monotonic() + JOB_DEADLINE
    while True:
        status: dict[str, Any] = sna.call("GET", f"/api/v1/status/{job_id}")
        if status["status"] != "running":
            break
        if time.monotonic() > end:
            raise SystemExit(f"{job_id} still running after {JOB_DEADLINE:g} s")
        time.sleep(POLL)
    daemon1 = proc_cpu(sna.pid)
    watchers1 = watchers.cpu() if watchers is not None else (0.0, 0.0, 0.0)
    busy1, seen = machine_busy(), time.monotonic() - since
    if status["status"] != "completed":
        raise SystemExit(f"{job_id} ended {status['status']}: {status['error']}")
    wall = parse_time(status["end_time"]) - start
    requests, paths = requests_since(sna.output, offset, job_id)
    return Sample(
        wall=wall,
        daemon_cpu=daemon1[0] - daemon0[0],
        client_cpu=daemon1[1] - daemon0[1],
        busy=(busy1 - busy0) / seen,
        requests=requests,
        paths=paths,
        ctl_cpu=watchers1[0] - watchers0[0],
        browser_cpu=watchers1[1] - watchers0[1],
        helper_cpu=watchers1[2] - watchers0[2],
    )


def one_round(
    sna: Sna, testbed: Testbed, variant: str, job_id: str, workdir: Path, settle: float
) -> Sample:
    """One backup of one variant into a fresh target, checked, the target then removed."""
    target = testbed.add_target(VM, DISK_KEY)
    watchers: Optional[Watchers] = None
    try:
        if variant == "watched":
            watchers = Watchers.start(f"http://127.0.0.1:{sna.port}", workdir, settle)
        subprocess.run(["sync"], check=True)
        sample = backup(sna, testbed, target, job_id, watchers)
        if watchers is not None:
            watchers.saw(job_id)
        verify(testbed, VM, target)
        return sample
    finally:
        if watchers is not None:
            watchers.stop()
        if target["export"] in {t["export"] for t in testbed.targets}:
            testbed.stop_target(target["export"])
        Path(target["qcow2"]).unlink(missing_ok=True)


# -- the report --------------------------------------------------------------------------------


def ratios(alone: list[Sample], watched: list[Sample], figure: str) -> list[float]:
    """Per round, ``watched / alone`` of one figure."""
    return [getattr(w, figure) / getattr(a, figure) for a, w in zip(alone, watched, strict=True)]


def report(results: dict[str, list[Sample]], size: int, runs: int) -> None:
    alone, watched = results["alone"], results["watched"]
    median = statistics.median
    print()
    print(
        f"{human_size(size)} disk of random data, {runs} rounds, each round both variants "
        "in a shuffled order; medians, and the per-round watched/alone ratios"
    )
    print(f"{'':22} {'alone':>8} {'watched':>8}   {'watched/alone':>13} {'(range)':>13}")
    for figure, label in (
        ("wall", "backup wall, s"),
        ("daemon_cpu", "daemon CPU, s"),
        ("client_cpu", "client CPU, s"),
        ("busy", "busy cores"),
    ):
        rs = ratios(alone, watched, figure)
        print(
            f"{label:22} {median([getattr(s, figure) for s in alone]):8.2f}"
            f" {median([getattr(s, figure) for s in watched]):8.2f}"
            f"   {median(rs):13.3f} ({min(rs):5.3f}-{max(rs):5.3f})"
        )
    print()
    mib_s = [size / MIB / s.wall for s in alone]
    print(f"alone: {median(mib_s):.0f} MiB/s ({min(mib_s):.0f}-{max(mib_s):.0f})")
    for name, samples in (("alone", alone), ("watched", watched)):
        counts = {k: median([s.requests[k] for s in samples]) for k in samples[0].requests}
        rate = sum(counts.values()) / median([s.wall for s in samples])
        print(
            f"requests the daemon answered during a backup, {name}: "
            + ", ".join(f"{k} {v:g}" for k, v in counts.items())
            + f" ({rate:.1f}/s)"
        )
    # What each watcher asked, per second of a watched backup (over all the rounds).
    seconds = sum(s.wall for s in watched)
    asked: dict[tuple[str, str], int] = {}
    for sample in watched:
        for what, n in sample.paths.items():
            asked[what] = asked.get(what, 0) + n
    for who in ("sna-ctl", "dashboard"):
        paths = sorted((path, n) for (w, path), n in asked.items() if w == who)
        print(f"  {who}: " + ", ".join(f"{path} {n / seconds:.2f}/s" for path, n in paths))
    extra = median([w.daemon_cpu - a.daemon_cpu for a, w in zip(alone, watched, strict=True)])
    watcher_requests = median([w.requests["sna-ctl"] + w.requests["dashboard"] for w in watched])
    print(
        f"the daemon's extra CPU with watchers: {extra:.2f} s a backup (median of the rounds' "
        f"differences), {1000 * extra / max(watcher_requests, 1):.1f} ms per watcher request"
    )
    print(
        "the watchers' own CPU during a backup (medians): "
        f"sna-ctl {median([s.ctl_cpu for s in watched]):.2f} s, "
        f"Chromium {median([s.browser_cpu for s in watched]):.2f} s, "
        f"the helper and Playwright's driver {median([s.helper_cpu for s in watched]):.2f} s"
    )
    print("every backup's target compared equal to the disk (qemu-img compare)")


# -- main --------------------------------------------------------------------------------------


def fill(testbed: Testbed, size: int) -> None:
    """Random data over the whole disk."""
    piece = 64 * MIB
    for offset in range(0, size, piece):
        testbed.write(VM, DISK_KEY, offset, min(piece, size - offset), seed=offset // MIB)


def stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does: through the clean-up of every process it started."""
    raise SystemExit(128 + signum)


def bench(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    size: int = args.size
    if size % 4096 or size < 64 * MIB:
        raise SystemExit("--size must be a multiple of 4096, at least 64M")
    low, _, high = args.hub_ports.partition("-")
    ports = range(int(low), int(high) + 1)
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (make deps)")
    if not os.access(CHROMIUM, os.X_OK):
        raise SystemExit(f"no Chromium at {CHROMIUM} (Debian's chromium; make deps)")
    if not os.access(SNA_CTL, os.X_OK):
        raise SystemExit(f"no sna-ctl at {SNA_CTL} (make venv)")

    parent = args.workdir or Path(tempfile.gettempdir())
    needed = 2 * size + 512 * MIB
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise SystemExit(f"{parent}: {free / GIB:.1f} GiB free, {needed / GIB:.1f} GiB needed")
    workdir = Path(tempfile.mkdtemp(prefix="watchers-bench-", dir=parent))
    print(
        f"watchers_bench: {human_size(size)} disk, {args.runs} rounds, in {workdir}, "
        f"{os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    rng = random.Random(args.seed)
    results: dict[str, list[Sample]] = {v: [] for v in VARIANTS}
    testbed: Optional[Testbed] = None
    sna: Optional[Sna] = None
    try:
        spec = {
            "hub": {"ports": [ports.start, ports.stop - 1]},
            "vms": [{"name": VM, "cbt_enabled": True, "disks": [{"capacity_bytes": size}]}],
        }
        testbed = Testbed.start(spec, workdir / "testbed")
        for t in list(testbed.targets):  # each backup gets a fresh target
            testbed.stop_target(t["export"])
            Path(t["qcow2"]).unlink(missing_ok=True)
        started = time.monotonic()
        fill(testbed, size)
        print(f"filled in {time.monotonic() - started:.1f} s", file=sys.stderr)
        sna = Sna(workdir / "sna", ("--nbd-ports", f"{ports.start}-{ports.stop - 1}"))
        for number in range(args.runs):
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                sample = one_round(
                    sna, testbed, variant, f"watch-{number}-{variant}", workdir, args.settle
                )
                results[variant].append(sample)
                print(
                    f"  round {number + 1}: {variant:7} {sample.wall:6.2f} s "
                    f"({size / MIB / sample.wall:6.1f} MiB/s), daemon CPU "
                    f"{sample.daemon_cpu:5.2f} s, requests {sample.requests}",
                    file=sys.stderr,
                )
        report(results, size, args.runs)
    finally:
        if sna is not None:
            sna.stop()
        if testbed is not None:
            testbed.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2 * GIB, help="disk size (2G, 512M)")
    parser.add_argument("--runs", type=int, default=5, help="rounds (each: alone and watched)")
    parser.add_argument("--seed", type=int, default=5, help="the rounds' shuffled order")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after the watchers start (3)"
    )
    parser.add_argument("--hub-ports", default="11200-11299", help="the targets' ports, LO-HI")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--serve-dashboard", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dashboard:
        serve_dashboard(args.serve_dashboard, args.profile)
    else:
        bench(args)


if __name__ == "__main__":
    main()
