"""The daemon's own log, read as an operator or a log shipper reads it, from a real ``twistd``.

One representative run goes through what an appliance logs in a day: the
start line, jobs that complete, fail and are cancelled, a target that is not
an NBD server and one that refuses, a run-time setting, a vCenter that does
not answer, a SHA that answers 500 to completions and hangs up on telemetry,
and the shutdown.  Its text log must hold no Python repr (``b'...'``,
``<sna.... object at 0x...>``, ``Failure``, ``None`` as a value); with
``twistd --logger=sna.logging.json_observer`` every line must be one JSON
object with the documented keys, and never the vCenter password.

Loopback only; the SHA double and the odd listeners are threads of this
test, stopped at its end, and the daemons are stopped by pid.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.integration.harness import (
    Daemon,
    JobIds,
    backup_body,
    free_port,
    nbd_ports,
    targets,
    wait_for,
)

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
PASSWORD = "Pa55-never-in-a-log"
#: What a Python repr, or a value formatted with its default repr, looks like in a line.
REPRS = re.compile(
    r"""\bb'|\bb"|<sna\.|<twisted\.|<function |<bound method | object at 0x| at 0x[0-9a-f]{6,}"""
    r"""|\bFailure\b|IPv[46]Address\(|\bNone\b|\{'|\['"""
)
#: The keys of every JSON line, and the optional ones.
KEYS = {"time", "level", "namespace", "message"}
OPTIONAL = {"fields", "error"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warn", "error", "critical"}


# -- the SHA and odd listeners ------------------------------------------------------------------


class _ShaHandler(BaseHTTPRequestHandler):
    """No change IDs, 500 to every completion, and telemetry hung up on without an answer."""

    def do_GET(self) -> None:
        self._answer(200, {"change_id": ""})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/api/v1/telemetry/"):
            self.close_connection = True  # no answer at all
            return
        self._answer(500, {"error": "no such backup job"})

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def sha_url() -> Iterator[str]:
    server = ThreadingHTTPServer((HOST, 0), _ShaHandler)
    thread = threading.Thread(target=server.serve_forever, name="sha-double", daemon=True)
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


class JsonDaemon(Daemon):
    """A daemon whose twistd logs JSON lines (``--logger``, a twistd option before ``sna``)."""

    def argv(self, port: Optional[int] = None) -> list[str]:
        argv = super().argv(port)
        at = argv.index("sna")
        return [*argv[:at], "--logger=sna.logging.json_observer", *argv[at:]]


@pytest.fixture
def json_daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(extra: tuple[str, ...] = ()) -> Daemon:
        daemon = JsonDaemon(tmp_path / "json", extra=extra)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.shutdown()


# -- the run ------------------------------------------------------------------------------------


def a_day_of_work(daemon: Daemon, job_ids: JobIds, http_port: int) -> dict[str, str]:
    """Drive ``daemon`` through a representative day; the ids of its jobs by what they did."""
    api = daemon.api
    jobs = {what: job_ids(what) for what in ("ok", "fail", "hang", "http", "refused")}
    # "write": the double writes through the relays with nbdcopy, as a client does.
    body = backup_body(jobs["ok"], vm="write", disks=2, password=PASSWORD)
    api.start(body)
    assert api.wait_status(jobs["ok"], "completed", "failed")["status"] == "completed"

    api.start(backup_body(jobs["fail"], vm="fail", password=PASSWORD))
    assert api.wait_status(jobs["fail"], "completed", "failed")["status"] == "failed"

    api.start(backup_body(jobs["hang"], vm="hang", password=PASSWORD))
    api.wait_progress(jobs["hang"])
    assert api.post(f"/api/v1/jobs/{jobs['hang']}/cancel").status == 202
    assert api.wait_status(jobs["hang"], "cancelled", "failed")["status"] == "cancelled"

    answer = api.request("PUT", "/api/v1/config", {"max_jobs": 6})
    assert answer.status == 200, answer

    not_nbd = f"2000:nbd://{HOST}:{http_port}/d0"
    answer = api.post("/api/v1/backup/start", backup_body(jobs["http"], nbd_targets=not_nbd))
    assert answer.status == 502 and "not_nbd" in answer.text, answer
    refused = f"2000:nbd://{HOST}:{free_port()}/d0"
    answer = api.post("/api/v1/backup/start", backup_body(jobs["refused"], nbd_targets=refused))
    assert answer.status in (502, 503), answer

    vcenter = {"vcenter": f"{HOST}:{free_port()}", "username": "u@vsphere.local"}
    answer = api.post("/api/v1/discover", {**vcenter, "password": PASSWORD})
    assert answer.status >= 500, answer
    return jobs


ANY_PORT = ("--nbd-ports", "1024-65535")


def test_a_representative_run_logs_plain_text(
    daemon_factory: Callable[..., Daemon], job_ids: JobIds, http_port: int, sha_url: str
) -> None:
    daemon = daemon_factory(extra=(*ANY_PORT, "--sha-url", sha_url))
    jobs = a_day_of_work(daemon, job_ids, http_port)
    # The SHA's 500 to a completion is retried: wait for the first warning of it.
    wait_for(lambda: "did not reach the SHA" in daemon.output(), "the outbox's first retry")
    wait_for(lambda: "telemetry to the SHA failed" in daemon.output(), "a failed push")
    daemon.stop()  # SIGTERM; twistd ends by that signal, after its own shutdown
    output = daemon.output()

    offending = [line for line in output.splitlines() if REPRS.search(line)]
    assert not offending, "Python reprs in the daemon's log:\n" + "\n".join(offending)
    assert PASSWORD not in output
    # What the fixes made plain, read back as text.
    assert f"job {jobs['ok']} completed: exit code 0\n" in output
    assert f"job {jobs['hang']} cancelled: exit code 143, error: " in output
    assert "settings changed: max_jobs = 6" in output
    assert "it sent 'HTTP/1.1 400 Bad Request\\x0d\\x0a\\x0d\\x0a'" in output
    assert re.search(
        rf"relay {re.escape(jobs['ok'])}/2000 connection 1 from 127\.0\.0\.1:\d+", output
    )
    assert re.search(r"telemetry to the SHA failed \(POST \S+: no answer: [^)<]+\)", output)
    assert "the SHA's last change ID of disk 0 (target 2000) is ''; not used" in output
    for job_id in (jobs["ok"], jobs["fail"], jobs["hang"]):
        job_log = daemon.job_log(job_id).read_text()
        [ended] = [line for line in job_log.splitlines() if " sna process ended: " in line]
        assert not REPRS.search(ended), ended
        assert PASSWORD not in job_log


def test_the_start_line_says_what_the_daemon_runs_with(
    daemon_factory: Callable[..., Daemon], sha_url: str, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    daemon = daemon_factory(extra=("--sha-url", sha_url, "--auth-token-file", str(token)))
    [line] = [line for line in daemon.output().splitlines() if "[sna.tap.StartLine#info]" in line]
    _, _, text = line.partition("] ")
    sbc = daemon.sbc.split()
    assert text == (
        f"sna 1.4.0 started: API on tcp:{daemon.port}:interface=127.0.0.1 "
        f"(bearer token required); backup client {sbc[0]} {sbc[1]} "
        f"(sna's own client, 1 spare(s)); state in {daemon.state_dir}, "
        f"job logs in {daemon.log_dir}; the SHA at {sha_url}"
    )
    assert "s3cret-token" not in daemon.output()


def test_a_client_that_cannot_run_is_said_at_start(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-client"
    daemon = daemon_factory(sbc=str(missing), extra=("--spare-clients", "0", "--sbc-legacy"))
    output = daemon.output()
    assert (
        f"backup client {missing} (the legacy Go client, 0 spare(s)); state in "
        f"{daemon.state_dir}, job logs in {daemon.log_dir}; no --sha-url: the SHA is told nothing"
    ) in output
    assert (
        f"[sna.tap.StartLine#error] backup client {missing} does not exist: every "
        "backup/start answers 500 backup_client_unavailable until it can be run"
    ) in output


def test_json_lines_parse_one_by_one(
    json_daemons: Callable[..., Daemon], job_ids: JobIds, http_port: int
) -> None:
    daemon = json_daemons(extra=ANY_PORT)
    jobs = a_day_of_work(daemon, job_ids, http_port)
    daemon.stop()  # SIGTERM; twistd ends by that signal, after its own shutdown
    output = daemon.output()
    assert PASSWORD not in output

    records = []
    for number, line in enumerate(output.splitlines(), 1):
        record = json.loads(line)  # every line, not only sna's
        assert isinstance(record, dict), line
        assert KEYS <= set(record) <= KEYS | OPTIONAL, line
        assert RFC3339_UTC.match(record["time"]), line
        assert record["level"] in LEVELS, line
        assert record["level"] != "critical", line
        assert isinstance(record["namespace"], str) and isinstance(record["message"], str)
        assert not REPRS.search(record["message"]), f"line {number}: {line}"
        assert isinstance(record.get("fields", {}), dict), line
        records.append(record)

    [start] = [r for r in records if r["namespace"] == "sna.tap.StartLine"]
    assert start["level"] == "info"
    assert start["fields"] == {
        "version": "1.4.0",
        "listen": f"tcp:{daemon.port}:interface=127.0.0.1",
        "auth": False,
        "auth_text": "no token: --auth-token-file not given",
        "client": " ".join(daemon.sbc.split()),
        "legacy": False,
        "client_kind": "sna's own client",
        "spares": 1,
        "state_dir": str(daemon.state_dir),
        "job_log_dir": str(daemon.log_dir),
        "sha_url": None,
        "sha_text": "no --sha-url: the SHA is told nothing",
    }
    for record in records:
        record.setdefault("fields", {})
    ended = {
        r["fields"]["job_id"]: r
        for r in records
        if r["namespace"] == "sna.jobs.manager.JobManager" and "exit_code" in r["fields"]
    }
    assert ended[jobs["ok"]]["fields"]["exit_code"] == 0
    assert ended[jobs["ok"]]["fields"]["error"] is None
    assert ended[jobs["fail"]]["fields"]["status"] == "failed"
    assert ended[jobs["fail"]]["fields"]["exit_code"] == 3
    assert ended[jobs["hang"]]["message"].startswith(f"job {jobs['hang']} cancelled: exit code 143")
    [probe] = [r for r in records if r["fields"].get("reason") == "not_nbd"]
    assert probe["namespace"] == "sna.nbd.probe" and probe["fields"]["port"] == http_port
    assert any(r["message"] == "sna stopped" for r in records)
    # The access log, a legacy event: its text, and no bookkeeping fields.
    [access] = [r for r in records if '"PUT /api/v1/config HTTP/1.1" 200' in r["message"]]
    assert access["fields"] == {}


def test_json_lines_keep_the_disk_ports_as_numbers(
    json_daemons: Callable[..., Daemon], job_ids: JobIds
) -> None:
    daemon = json_daemons()
    job_id = job_ids("ports")
    ports = nbd_ports(2)
    daemon.api.start(backup_body(job_id, vm="ok", nbd_targets=targets(ports)))
    assert daemon.api.wait_status(job_id, "completed", "failed")["status"] == "completed"
    daemon.stop()  # SIGTERM; twistd ends by that signal, after its own shutdown
    records = [json.loads(line) for line in daemon.output().splitlines()]
    relays = [
        r["fields"]
        for r in records
        if r["namespace"] == "sna.nbd.gateway.NbdGateway" and r["fields"].get("job_id") == job_id
    ]
    assert sorted(fields["port"] for fields in relays) == sorted(ports)
