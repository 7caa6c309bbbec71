"""The dashboard in a real browser against a real daemon.

Headless Chromium (Debian's ``chromium``), driven by Playwright, opens the
page a real ``twistd -n sna`` serves, while that daemon runs a backup whose
client double (``slowwrite``) writes its payload with ``nbdcopy`` through
the daemon's relays into qcow2 files that real ``qemu-nbd`` processes serve,
in pieces, so that it lasts a few seconds.  The test reads the page as a
person would: the job's bars appear, grow, end at 100 % with the result,
the relay chart draws the ports, the job opens on a click.  Screenshots go
to the test's tmp directory.

A second backup runs the real ``sendense-backup-client`` against the vCenter
simulator (tests/testbed) into its qemu-nbd targets.  That copy is too quick
to watch, so the second disk's target is held with SIGSTOP once the first
disk's copy has begun: the client copies disks one after the other, so the
page must show the job part-way (the first disk full, the second not) for as
long as the target is held; after it goes on, the bars grow to 100 % and the
job ends completed, its disks equal to the VM's (``qemu-img compare``).

The browser may only load from 127.0.0.1: every request the page makes is
recorded (and any other is aborted and fails the test), and a CSP violation
or a script error fails it too.  The browser, its processes and its profile
directory are removed after each test, even a failed one.  Nothing here
asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest
from playwright.sync_api import ConsoleMessage, Page, Playwright, Request, Route, sync_playwright

from tests.integration.backup_helpers import (
    backup_request,
    by_key,
    compare,
    start_sna,
    wait_running_until,
)
from tests.integration.harness import Daemon, JobIds, backup_body, cmdline, wait_for
from tests.integration.nbd_fixtures import (
    MiB,
    QemuNbd,
    image_compare,
    qemu_nbd_factory_fixture,  # noqa: F401  (the qemu_nbd_factory fixture)
)
from tests.sbc_double import PAYLOAD_SIZE, payload
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
#: As the machine notes say Chromium runs here: no sandbox as root, no GPU,
#: and none of its own traffic (the network beyond loopback is closed).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
]
#: Upper bound for anything the page must show; never a timing assertion.
PAGE_DEADLINE = 30.0
ANY_PORT = ("--nbd-ports", "1024-65535")
DISK_SIZE = 8 * MiB
DISKS = 2

#: The real client's backup: a VM of two disks of random data, on this module's hub ports.
HUB_PORTS = range(11100, 11150)
REAL_VM = "dashvm"
#: Disk 2000 is copied first; its copy lasting a while leaves time to hold 2001's target.
REAL_DISKS = {2000: 128 * MiB, 2001: 48 * MiB}
REAL_SPEC: dict[str, Any] = {
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [
        {
            "name": REAL_VM,
            "cbt_enabled": True,
            "disks": [{"capacity_bytes": size} for size in REAL_DISKS.values()],
        }
    ],
}

testbed = testbed_fixture(REAL_SPEC)

# A listener in the page's own world (added over the DevTools protocol, so the
# page's CSP does not apply to it) that keeps every CSP violation the page meets.
_CSP_WATCH = """
window.__csp_violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__csp_violations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


def _loopback(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return parts.scheme in ("http", "https") and parts.hostname == "127.0.0.1"


# Not slotted: Playwright keeps its wrappers of bound-method handlers on their object.
@attrs.define(slots=False)
class Browser:
    """One Chromium with its own profile, and everything its pages did."""

    playwright: Playwright
    profile: Path
    shots: Path
    context: Any = None
    requests: list[Request] = attrs.field(factory=list)
    elsewhere: list[str] = attrs.field(factory=list)
    console_errors: list[str] = attrs.field(factory=list)
    page_errors: list[str] = attrs.field(factory=list)

    def launch(self) -> None:
        self.context = self.playwright.chromium.launch_persistent_context(
            str(self.profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1360, "height": 1000},
            service_workers="block",
        )
        self.context.route("**/*", self._only_loopback)
        self.context.on("request", self._requested)
        self.context.add_init_script(_CSP_WATCH)

    def _requested(self, request: Request) -> None:
        self.requests.append(request)

    def _only_loopback(self, route: Route) -> None:
        url = route.request.url
        if _loopback(url):
            route.continue_()
        else:
            self.elsewhere.append(url)
            route.abort()

    def open(self, url: str) -> Page:
        page: Page = self.context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.goto(url)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def shot(self, page: Page, name: str) -> Path:
        path = self.shots / name
        page.screenshot(path=str(path), full_page=True)
        return path

    def check(self, page: Page, refused_statuses: tuple[int, ...] = ()) -> None:
        """Nothing left loopback, no CSP violation, no script error, no unexpected load error."""
        assert self.elsewhere == [], f"the page asked for other hosts: {self.elsewhere}"
        assert self.requests, "no request was seen"
        for request in self.requests:
            assert _loopback(request.url), request.url
        assert page.evaluate("window.__csp_violations") == []
        assert self.page_errors == []
        allowed = tuple(f"status of {status} " for status in refused_statuses)
        unexpected = [
            text
            for text in self.console_errors
            if not (text.startswith("Failed to load resource") and any(a in text for a in allowed))
        ]
        assert unexpected == [], unexpected

    def close(self) -> None:
        """Close the browser, kill whatever of it is left (by pid), remove its profile."""
        try:
            if self.context is not None:
                self.context.close()
        finally:
            marker = f"--user-data-dir={self.profile}"
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and marker in cmdline(int(entry.name)):
                    try:
                        os.kill(int(entry.name), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"no Chromium at {CHROMIUM} (Debian's chromium package; `make deps` installs it)"
        )
    profile = Path(tempfile.mkdtemp(prefix="sna-chromium-"))
    with sync_playwright() as playwright:
        browser = Browser(playwright, profile, tmp_path)
        try:
            browser.launch()
            yield browser
        finally:
            browser.close()


def css(value: str) -> str:
    """A CSS attribute-selector string for ``value``."""
    return json.dumps(value)


def bar_value(locator: Any) -> float:
    return float(locator.get_attribute("aria-valuenow"))


def bar_width(locator: Any) -> str:
    width: str = locator.evaluate("bar => bar.firstChild.style.width")
    return width


def drawn(locator: Any) -> float:
    """How much of a bar is filled on the screen, in percent (its width eases in, 0.6 s)."""
    share: float = locator.evaluate(
        "bar => 100 * bar.firstChild.getBoundingClientRect().width"
        " / bar.getBoundingClientRect().width"
    )
    return share


def human_mib(n: int) -> str:
    return f"{n / MiB:.2f} MiB"


# -- a backup, live ---------------------------------------------------------------------


def test_a_backup_shows_live_bars_the_relay_chart_and_its_result(
    daemon_factory: Callable[..., Daemon],
    job_ids: JobIds,
    qemu_nbd_factory: Callable[..., QemuNbd],
    browser: Browser,
) -> None:
    sna = daemon_factory(extra=ANY_PORT)
    servers = [qemu_nbd_factory(DISK_SIZE, f"slowwrite-disk{i}", shared=1) for i in range(DISKS)]
    page = browser.open(f"http://127.0.0.1:{sna.port}/")
    page.locator("#connection[data-state=live]").wait_for()
    assert page.locator("#running-empty").is_visible()
    assert page.locator("#health-status").inner_text() == "healthy"

    job = job_ids("live")
    targets = ",".join(
        f"{2000 + i}:nbd://127.0.0.1:{server.port}/{server.export}"
        for i, server in enumerate(servers)
    )
    sna.api.start(backup_body(job, vm="slowwrite", nbd_targets=targets))

    card = page.locator(f"article.job[data-job-id={css(job)}]")
    card.wait_for()
    overall = card.locator(".overall [role=progressbar]")
    disks = card.locator("tr.disk [role=progressbar]")

    # The bars move: a value between 0 and 100 while the job runs, then a larger one.
    seen: list[tuple[float, str]] = []

    def moved() -> Optional[tuple[float, str]]:
        value, width = bar_value(overall), bar_width(overall)
        seen.append((value, width))
        partial = [v for v, _ in seen if 0 < v < 100]
        return (value, width) if partial and value > partial[0] else None

    wait_for(moved, "the job's bar to grow", PAGE_DEADLINE)
    first = next((v, w) for v, w in seen if 0 < v < 100)
    later = seen[-1]
    assert float(first[1].removesuffix("%")) < float(later[1].removesuffix("%")), (first, later)
    assert disks.count() == DISKS
    assert card.locator("[data-figure=rate] b").inner_text().endswith("/s")
    browser.shot(page, "dashboard-running.png")

    # The end: every bar full, the result shown, in the card and in the history.
    done = page.locator(f"article.job[data-job-id={css(job)}][data-status=completed]")
    done.wait_for(timeout=PAGE_DEADLINE * 1000)
    final = sna.api.status(job)
    assert final["status"] == "completed", final
    assert bar_value(overall) == 100.0 and bar_width(overall) == "100%"
    for i in range(DISKS):
        assert bar_value(disks.nth(i)) == 100.0 and bar_width(disks.nth(i)) == "100%"
    assert card.locator(".badge.result").inner_text() == "completed"
    assert card.locator("tr.disk .badge.full").count() == DISKS
    assert card.locator(".pct").inner_text() == "100.0 %"
    row = page.locator(f"#history-rows tr[data-job-id={css(job)}]")
    row.wait_for(timeout=PAGE_DEADLINE * 1000)
    cells = row.locator("td")
    assert cells.nth(6).locator(".badge").inner_text() == "completed"
    assert cells.nth(4).inner_text() == human_mib(final["bytes_done"])
    assert final["bytes_done"] == DISKS * PAYLOAD_SIZE

    # The relay chart: a line and a legend entry per NBD port, with the bytes it moved.
    for server in servers:
        line = page.locator(f"#relay-chart polyline[data-port={css(str(server.port))}]")
        line.wait_for(timeout=PAGE_DEADLINE * 1000)
        legend = page.locator(f"#relay-legend li[data-port={css(str(server.port))}]")
        assert server.export in legend.inner_text()

        def drawn(line: Any = line) -> bool:
            points = [p.split(",") for p in line.get_attribute("points").split()]
            return min(float(y) for _, y in points) < max(float(y) for _, y in points)

        wait_for(drawn, f"port {server.port}'s line to rise above zero", PAGE_DEADLINE)
    history = sna.api.get("/api/v1/relays/history").json()
    ports = {p["nbd_port"]: p for p in history["ports"]}
    for server in servers:
        moved_bytes = sum(s["bytes_to_hub"] for s in ports[server.port]["samples"])
        assert 0 < moved_bytes <= PAYLOAD_SIZE + 64 * 1024, ports[server.port]
    browser.shot(page, "dashboard-done.png")

    # A click opens the job: its details, and its log from the API.
    card.click()
    drawer = page.locator("#log-panel")
    drawer.wait_for()
    assert page.locator("#log-job-id").inner_text() == job
    detail = page.locator("#log-detail").inner_text()
    assert "completed (exit 0)" in detail
    assert "disk 2000" in detail and "disk 2001" in detail
    page.locator("#log-state", has_text="complete").wait_for(timeout=PAGE_DEADLINE * 1000)
    log = page.locator("#log-lines").inner_text()
    assert f"sbc-double: job {job} vm slowwrite mode slowwrite" in log, log[-2000:]
    assert "vc-password-not-secret" not in log
    browser.shot(page, "dashboard-job.png")
    browser.check(page)

    # The bytes the page watched went where they had to.
    for i, server in enumerate(servers):
        expected = server.qcow2_path.parent / "expected.raw"
        expected.write_bytes(payload(str(2000 + i)) + bytes(DISK_SIZE - PAYLOAD_SIZE))
        result = image_compare(expected, server.qcow2_path)
        assert result.returncode == 0, result


# -- the real client, its target held ------------------------------------------------------


@pytest.fixture(scope="module")
def real_vm(testbed: Testbed) -> Testbed:
    """The testbed with random data over all of both disks (so every byte is copied)."""
    for key, size in REAL_DISKS.items():
        testbed.write(REAL_VM, key, 0, size, seed=key)
    return testbed


def test_the_real_client_s_backup_shows_part_way_while_its_target_is_held_then_completes(
    real_vm: Testbed,
    daemon_factory: Callable[..., Daemon],
    job_ids: JobIds,
    browser: Browser,
) -> None:
    tb = real_vm
    sna = start_sna(daemon_factory, HUB_PORTS, name="real")
    targets = {key: tb.target(REAL_VM, key) for key in REAL_DISKS}
    page = browser.open(f"http://127.0.0.1:{sna.port}/")
    page.locator("#connection[data-state=live]").wait_for()

    job = job_ids("real")
    started = sna.api.start(backup_request(tb, REAL_VM, job, targets, "full"))
    assert started["status"] == "started", started
    # Every target is connected before the first disk's copy begins; from then on the
    # second one is held, so the job cannot get past the first disk.
    wait_running_until(
        sna.api, job, lambda s: by_key(s)[2000]["status"] != "pending", "the first disk's copy"
    )
    card = page.locator(f"article.job[data-job-id={css(job)}]")
    overall = card.locator(".overall [role=progressbar]")
    bars = {
        key: card.locator(f"tr.disk[data-disk-key={css(str(key))}] [role=progressbar]")
        for key in REAL_DISKS
    }
    with tb.pause_target(targets[2001]["export"]):
        # The first reading, while held: the first disk copied, the job part-way.
        wait_running_until(
            sna.api,
            job,
            lambda s: by_key(s)[2000]["status"] == "completed",
            "the first disk to be copied",
        )
        card.wait_for(timeout=PAGE_DEADLINE * 1000)

        def part_way() -> Optional[tuple[float, dict[str, Any]]]:
            status = sna.api.status(job)
            value = bar_value(overall)
            shown = abs(value - status["progress_percent"]) <= 0.05
            return (value, status) if shown and bar_value(bars[2000]) == 100.0 else None

        first, held = wait_for(part_way, "the page to show the job part-way", PAGE_DEADLINE)
        assert held["status"] == "running", held
        assert 0 < first < 100, held
        assert by_key(held)[2001]["bytes_done"] < REAL_DISKS[2001], held
        assert abs(float(bar_width(overall).removesuffix("%")) - first) <= 0.05
        second_held = bar_value(bars[2001])
        assert second_held < 100.0
        assert card.get_attribute("data-status") == "running"
        rows = {key: card.locator(f"tr.disk[data-disk-key={css(str(key))}]") for key in REAL_DISKS}
        assert rows[2000].get_attribute("data-status") == "completed"
        assert rows[2001].get_attribute("data-status") != "completed"
        every = [overall, *bars.values()]
        wait_for(
            lambda: all(abs(drawn(bar) - bar_value(bar)) <= 0.5 for bar in every),
            "the bars to be drawn at their values",
            PAGE_DEADLINE,
        )
        held_shot = browser.shot(page, "dashboard-real-held.png")

    # Going on: the bars only grow, and end full with the result.
    readings: list[tuple[float, float]] = []

    def ended() -> bool:
        # The status first: the page sets it and the bars in one go, so bars read after
        # a "completed" are the final ones (read before, they may be a poll older).
        completed = card.get_attribute("data-status") == "completed"
        readings.append((bar_value(overall), bar_value(bars[2001])))
        return completed

    wait_for(ended, "the page to show the job completed", PAGE_DEADLINE)
    final = sna.api.status(job)
    assert final["status"] == "completed" and final["exit_code"] == 0, final
    assert final["progress_percent"] == 100.0, final
    assert readings[-1] == (100.0, 100.0), readings
    overalls, seconds = [r[0] for r in readings], [r[1] for r in readings]
    assert overalls == sorted(overalls) and overalls[0] >= first, readings
    assert seconds == sorted(seconds) and seconds[0] >= second_held, readings
    for key in REAL_DISKS:
        assert bar_width(bars[key]) == "100%"
        assert rows[key].get_attribute("data-status") == "completed"
        assert rows[key].locator(".badge.full").count() == 1
    assert bar_width(overall) == "100%"
    assert card.locator(".badge.result").inner_text() == "completed"
    assert card.locator(".pct").inner_text() == "100.0 %"
    wait_for(
        lambda: all(drawn(bar) >= 99.9 for bar in every), "the bars to be drawn full", PAGE_DEADLINE
    )
    done_shot = browser.shot(page, "dashboard-real-done.png")
    assert held_shot.stat().st_size > 0 and done_shot.stat().st_size > 0
    browser.check(page)

    # What the page watched went where it had to: each target holds its disk.
    for key, disk in by_key(final).items():
        assert disk["bytes_done"] == REAL_DISKS[key], disk
        compare(tb, REAL_VM, key, targets[key]["qcow2"])


# -- with a token ------------------------------------------------------------------------


def test_with_a_token_the_page_asks_for_it_and_the_data_stays_locked(
    daemon_factory: Callable[..., Daemon],
    job_ids: JobIds,
    browser: Browser,
    tmp_path: Path,
) -> None:
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    sna = daemon_factory(extra=("--auth-token-file", str(token_file)))
    bearer = {"Authorization": f"Bearer {token}"}
    job = job_ids("tokened")
    started = sna.api.request("POST", "/api/v1/backup/start", backup_body(job), headers=bearer)
    assert started.status == 200, started

    def ended() -> Optional[dict[str, Any]]:
        status = sna.api.request("GET", f"/api/v1/status/{job}", headers=bearer).json()
        return status if status["status"] != "running" else None

    assert wait_for(ended, f"job {job} to end")["status"] == "completed"

    # The data routes refuse without the token; the page's shell does not.
    for path in (
        "/api/v1/jobs?status=running",
        "/api/v1/jobs?limit=20",
        f"/api/v1/status/{job}",
        "/api/v1/relays",
        "/api/v1/relays/history",
        f"/api/v1/jobs/{job}/log?offset=0",
    ):
        answer = sna.api.get(path)
        assert (answer.status, answer.json()["error"]) == (401, "unauthorized"), (path, answer)
        assert sna.api.request("GET", path, headers=bearer).status != 401, path
    for path in ("/", "/ui/dashboard.js", "/ui/dashboard.css"):
        assert sna.api.get(path).status == 200, path

    page = browser.open(f"http://127.0.0.1:{sna.port}/")
    dialog = page.locator("#token-dialog")
    dialog.wait_for()
    assert page.locator("#connection").get_attribute("data-state") == "locked"
    assert page.locator("#token-error").is_hidden()
    assert page.locator(f"#history-rows tr[data-job-id={css(job)}]").count() == 0
    browser.shot(page, "dashboard-token.png")

    page.fill("#token-input", "not-the-token")
    page.click("#token-submit")
    page.locator("#token-error").wait_for()
    assert "refused" in page.locator("#token-error").inner_text()

    page.fill("#token-input", token)
    page.click("#token-submit")
    dialog.wait_for(state="hidden")
    row = page.locator(f"#history-rows tr[data-job-id={css(job)}][data-status=completed]")
    row.wait_for(timeout=PAGE_DEADLINE * 1000)
    page.locator("#connection[data-state=live]").wait_for()
    browser.shot(page, "dashboard-unlocked.png")

    # The token travelled in the Authorization header only, and stays in this tab.
    api_calls = [r for r in browser.requests if "/api/v1/" in r.url]
    assert any(r.headers.get("authorization") == f"Bearer {token}" for r in api_calls)
    for request in browser.requests:
        assert token not in request.url, request.url
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("sessionStorage.getItem('sna.api-token')") == token
    assert page.evaluate("localStorage.length") == 0
    assert token not in sna.output()  # nor in the access log

    # Forgetting it locks the page again.
    page.click("#forget-token")
    dialog.wait_for()
    assert page.evaluate("sessionStorage.getItem('sna.api-token')") is None
    browser.check(page, refused_statuses=(401,))
