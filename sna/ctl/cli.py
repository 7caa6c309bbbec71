"""``sna-ctl``: the commands, their options, and what each prints and exits with.

Exit statuses (docs/sna-ctl.md):

- 0: done (``health``: healthy; ``watch JOB``: the job completed);
- 1: the daemon answered with an error (printed as ``sna-ctl: {message}``),
  ``health``: it is not healthy or cannot be reached, or the operator did
  not confirm;
- 2: usage: a bad option, argument, config file or token file;
- 3: the daemon cannot be reached (``health``: 1);
- 4: ``watch JOB`` / ``cancel --wait``: the job ended, but not as hoped
  (failed, cancelled, interrupted; for ``cancel --wait``, not cancelled);
- 130: interrupted (Ctrl-C) before the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Optional, TextIO

from sna import __version__
from sna.contract.tls import InvalidThumbprint, algorithm_of, normalise_thumbprint
from sna.ctl import format as fmt
from sna.ctl.client import ApiFailure, Client, Unreachable, quote
from sna.ctl.config import UsageError, resolve
from sna.ctl.watch import (
    EXIT_INTERRUPTED,
    EXIT_NOT_COMPLETED,
    FINAL,
    Watcher,
    average_rate,
    elapsed,
    result_line,
)

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
STATUSES = ("running", "completed", "failed", "cancelled", "interrupted")
#: Jobs asked for per request when paging through ``/api/v1/jobs``.
PAGE = 100
#: Seconds a log read may wait on the daemon for new lines (it answers sooner).
LOG_WAIT = 25
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Declined(Exception):
    """The operator did not confirm; nothing was changed."""


# -- arguments ----------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name (defaults are applied later)."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = common.add_argument_group("connection")
    quiet = argparse.SUPPRESS
    group.add_argument(
        "--url", default=quiet, help="the daemon's API (default http://127.0.0.1:8081)"
    )
    group.add_argument(
        "--token-file", default=quiet, metavar="FILE", help="file whose first line is the token"
    )
    group.add_argument("--config", default=quiet, metavar="FILE", help="config file to read")
    group.add_argument(
        "--ca-file", default=quiet, metavar="FILE", help="CAs for an https:// API, in PEM"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=quiet,
        help="do not verify the API's certificate (https://)",
    )
    group.add_argument(
        "--timeout", default=quiet, metavar="SECONDS", help="seconds one request may take (30)"
    )
    common.add_argument(
        "--json", action="store_true", default=quiet, help="print the API's JSON answer"
    )
    return common


def parser() -> argparse.ArgumentParser:
    common = _common()
    top = argparse.ArgumentParser(
        prog="sna-ctl",
        description="Operate a running sna daemon (the Sendense Node Appliance) through its API.",
        parents=[common],
        allow_abbrev=False,
        epilog="Exit status: 0 ok, 1 API error or not healthy, 2 usage, 3 daemon unreachable "
        "(health: 1), 4 the watched job did not complete, 130 interrupted. "
        "See docs/sna-ctl.md.",
    )
    top.add_argument("--version", action="version", version=f"sna-ctl {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_text, description=help_text, parents=[common], allow_abbrev=False
        )

    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument(
        "--status",
        action="append",
        choices=STATUSES,
        metavar="STATUS",
        help=f"only jobs in this status (repeatable: {', '.join(STATUSES)})",
    )
    jobs.add_argument("--vm", metavar="NAME", help="only jobs of this VM name")
    jobs.add_argument(
        "--since",
        metavar="WHEN",
        help="only jobs started since WHEN: 30m, 2h, 7d, 1w, or a date/time like 2026-11-26T09:00",
    )
    jobs.add_argument("--limit", type=int, metavar="N", help="at most N jobs")

    watch = command("watch", "live progress of a job (or of every running job)")
    watch.add_argument("job", nargs="?", metavar="JOB", help="the job id; none: every running job")
    watch.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between polls (1)"
    )
    watch.add_argument(
        "--plain", action="store_true", help="plain lines even on a terminal (no redrawing)"
    )

    log = command("log", "a job's log")
    log.add_argument("job", metavar="JOB")
    log.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the job ends"
    )

    cancel = command("cancel", "cancel a running job")
    cancel.add_argument("job", metavar="JOB")
    cancel.add_argument("--wait", action="store_true", help="wait until the job has ended")

    command("relays", "the NBD relays of running jobs")
    command("health", "the daemon's health; exit 1 when not healthy")
    command("tunnel", "the SSH tunnel to the hub; exit 1 when configured and not up")
    command("enrollment", "the node's enrollment with its hub; exit 1 when failed or rejected")

    vcenter = command("vcenter", "the vCenter certificates the daemon trusts")
    what = vcenter.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return what.add_parser(
            name, help=help_text, description=help_text, parents=[common], allow_abbrev=False
        )

    trust = action("trust", "show a vCenter's certificate as the daemon sees it, and pin it")
    trust.add_argument("vcenter", metavar="HOST[:PORT]")
    trust.add_argument("--yes", action="store_true", help="pin without asking (for scripts)")
    trust.add_argument(
        "--expect",
        metavar="THUMBPRINT",
        help="refuse unless the certificate has this SHA-256 or SHA-1 thumbprint",
    )
    action("pins", "list the stored pins")
    forget = action("forget", "remove a vCenter's pin")
    forget.add_argument("vcenter", metavar="HOST[:PORT]")
    return top


# -- output helpers ----------------------------------------------------------------------


class Output:
    """Where a command writes: ``out`` for its result, ``err`` for everything else."""

    def __init__(self, out: TextIO, err: TextIO, as_json: bool) -> None:
        self.out = out
        self.err = err
        self.json = as_json

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def note(self, text: str) -> None:
        self.err.write(text + "\n")

    def dump(self, value: Any) -> None:
        self.out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    def columns(self) -> Optional[int]:
        """The terminal's width when ``out`` is one; ``None`` (no limit) otherwise."""
        if not self.out.isatty():
            return None
        return shutil.get_terminal_size().columns


def _since(text: str, now: datetime) -> str:
    """``--since`` as the API's RFC 3339 UTC time."""
    relative = _RELATIVE.match(text)
    if relative:
        moment = now - timedelta(seconds=float(relative[1]) * _UNIT_SECONDS[relative[2]])
    else:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"--since must be like 30m, 2h, 7d, 1w or a date/time like 2026-11-26T09:00, "
                f"not {text!r}"
            ) from None
        if moment.tzinfo is None:
            moment = moment.astimezone()  # a local time, as people write them
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- commands ------------------------------------------------------------------------------


def cmd_jobs(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    since = _since(args.since, datetime.now(UTC)) if args.since else None
    collected: list[dict[str, Any]] = []
    offset = 0
    total: Optional[int] = None
    paged = False
    while True:
        page = PAGE if args.limit is None else min(PAGE, args.limit - len(collected))
        answer = client.get(
            "/api/v1/jobs",
            query={
                "status": args.status,
                "vm_name": args.vm,
                "since": since,
                "limit": page,
                "offset": offset or None,
            },
        )
        jobs = answer.get("jobs") or []
        collected.extend(jobs)
        paged = "next_offset" in answer or "total" in answer
        if isinstance(answer.get("total"), int):
            total = answer["total"]
        following = answer.get("next_offset")
        if not paged or not jobs or not isinstance(following, int) or following <= offset:
            break
        if args.limit is not None and len(collected) >= args.limit:
            break
        offset = following
    if not paged:
        # A daemon without the filters (before sna 1.5): filtered here instead.
        collected = [job for job in collected if _wanted(job, args, since)]
        total = len(collected)
    if args.limit is not None:
        collected = collected[: args.limit]
    if out.json:
        out.dump({"jobs": collected, "count": len(collected), "total": total})
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            str(job.get("job_id")),
            str(job.get("vm_name") or "-"),
            str(job.get("backup_type") or "-"),
            str(job.get("status")),
            fmt.local_time(job.get("start_time")),
            fmt.duration(elapsed(job, now)),
            fmt.size(job.get("bytes_done")),
            fmt.rate(average_rate(job, now)),
            fmt.percent(job.get("progress_percent")),
        ]
        for job in collected
    ]
    headers = ["ID", "VM", "TYPE", "STATUS", "START", "DURATION", "BYTES", "RATE", "PROGRESS"]
    for text in fmt.table(
        headers, rows, right=(5, 6, 7, 8), shrink=(0, 1), max_width=out.columns()
    ):
        out.line(text)
    if total is not None and total > len(collected):
        out.note(f"({len(collected)} of {total} jobs shown; --limit for more)")
    return EXIT_OK


def _wanted(job: dict[str, Any], args: argparse.Namespace, since: Optional[str]) -> bool:
    if args.status and job.get("status") not in args.status:
        return False
    if args.vm is not None and job.get("vm_name") != args.vm:
        return False
    if since is not None:
        start = fmt.parse_time(job.get("start_time"))
        limit = fmt.parse_time(since)
        if start is None or limit is None or start < limit:
            return False
    return True


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    if not 0.1 <= args.interval <= 60:
        raise UsageError("--interval must be from 0.1 to 60 seconds")
    if out.json:
        mode = "json"
    elif args.plain or not out.out.isatty() or os.environ.get("TERM") == "dumb":
        mode = "plain"
    else:
        mode = "tty"
    return Watcher(client, out.out, args.job, mode, interval=args.interval).run()


def cmd_log(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = f"/api/v1/jobs/{quote(args.job)}/log"
    # None at first: the daemon starts where this job's own lines begin (the
    # file may hold earlier jobs of the same id).
    offset: Optional[int] = None
    terminal = out.out.isatty()
    while True:
        wait = LOG_WAIT if args.follow else 0
        try:
            answer = client.get(
                path,
                query={"offset": offset, "wait": wait or None},
                timeout=client.settings.timeout + wait,
            )
        except ApiFailure as e:
            if e.code == "not_found":
                raise ApiFailure(
                    e.status,
                    e.code,
                    "this daemon has no job-log route (GET /api/v1/jobs/{job_id}/log); "
                    "read the job's log file under its --log-dir",
                ) from None
            raise
        if out.json:
            out.dump(answer)
        else:
            for line in answer.get("lines") or []:
                text = line if isinstance(line, str) else json.dumps(line)
                out.line(fmt.printable(text) if terminal else text)
        out.out.flush()
        following = answer.get("next_offset")
        if answer.get("complete"):
            return EXIT_OK
        if not isinstance(following, int):
            return EXIT_OK
        if not args.follow and (following == offset or not answer.get("lines")):
            return EXIT_OK
        offset = following


def cmd_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    answer = client.call("POST", f"/api/v1/jobs/{quote(args.job)}/cancel")
    if out.json and not args.wait:
        out.dump(answer)
        return EXIT_OK
    if not out.json:
        out.line(fmt.printable(answer.get("message") or f"cancel requested for {args.job}"))
    if not args.wait:
        return EXIT_OK
    while True:
        status = client.get(f"/api/v1/status/{quote(args.job)}")
        if status.get("status") in FINAL:
            break
        time.sleep(0.5)
    if out.json:
        out.dump(status)
    else:
        out.line(result_line(status, datetime.now(UTC)))
    return EXIT_OK if status.get("status") == "cancelled" else EXIT_NOT_COMPLETED


def cmd_relays(client: Client, args: argparse.Namespace, out: Output) -> int:
    answer = client.get("/api/v1/relays")
    if out.json:
        out.dump(answer)
        return EXIT_OK
    relays = answer.get("relays") or []
    if not relays:
        out.line("no relay is open (no backup is running)")
        return EXIT_OK
    rows = [
        [
            str(r.get("job_id")),
            str(r.get("disk_key")),
            str(r.get("export")),
            str(r.get("nbd_port")),
            str(r.get("listen_port")),
            str(r.get("state")),
            fmt.size(r.get("bytes_to_hub")),
            fmt.size(r.get("bytes_from_hub")),
            fmt.rate(r.get("throughput_bps")),
            f"{r.get('active_connections', 0)}/{r.get('connections', 0)}",
            fmt.printable(r.get("upstream_error") or ""),
        ]
        for r in relays
    ]
    headers = [
        "JOB",
        "DISK",
        "EXPORT",
        "HUB PORT",
        "LOCAL PORT",
        "STATE",
        "TO HUB",
        "FROM HUB",
        "RATE",
        "CONNS",
        "ERROR",
    ]
    for text in fmt.table(
        headers, rows, right=(3, 4, 6, 7, 8), shrink=(0, 2, 10), max_width=out.columns()
    ):
        out.line(text)
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        answer = client.get("/api/v1/health")
    except Unreachable as e:
        # A check of health: a daemon that does not answer is not healthy (1), as one
        # that says so; the message tells which.
        out.note(f"sna-ctl: {e}")
        return EXIT_API
    healthy = answer.get("status") == "healthy"
    if out.json:
        out.dump(answer)
        return EXIT_OK if healthy else EXIT_API
    counts = answer.get("jobs") or {}
    jobs = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    rows = [("status", str(answer.get("status")))]
    if answer.get("reason"):
        rows.append(("reason", str(answer["reason"])))
    rows += [
        ("version", str(answer.get("version"))),
        ("uptime", str(answer.get("uptime"))),
        ("jobs", f"{jobs} (at most {answer.get('max_jobs', '?')} at once)"),
    ]
    if answer.get("snapshots_pending"):
        rows.append(("snapshots", f"{answer['snapshots_pending']} pending removal"))
    tunnel = answer.get("tunnel") or {}
    if tunnel.get("configured"):
        text = f"{tunnel.get('state')} since {tunnel.get('since')}"
        if tunnel.get("reconnects"):
            text += f", {tunnel['reconnects']} reconnects"
        if tunnel.get("reason"):
            text += f": {tunnel['reason']}"
        rows.append(("tunnel", text))
    rows.append(("url", client.settings.url))
    for name, value in rows:
        out.line(f"{name:<9} {fmt.printable(value)}")
    return EXIT_OK if healthy else EXIT_API


def _rows(out: Output, rows: Sequence[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        if value is not None and value != "":
            out.line(f"{name:<{width}} {fmt.printable(str(value))}")


def cmd_tunnel(client: Client, args: argparse.Namespace, out: Output) -> int:
    answer = client.get("/api/v1/tunnel")
    healthy = not answer.get("configured") or answer.get("state") == "up"
    if out.json:
        out.dump(answer)
        return EXIT_OK if healthy else EXIT_API
    if not answer.get("configured"):
        out.line("no tunnel is configured (enroll the node, or start sna with --tunnel-*)")
        return EXIT_OK
    forwards = answer.get("forwards") or {}
    refused = answer.get("refused_ports") or []
    _rows(
        out,
        [
            ("state", f"{answer.get('state')} since {answer.get('since')}"),
            ("error", answer.get("last_error")),
            ("hub", f"{answer.get('user')}@{answer.get('host')}:{answer.get('port')}"),
            (
                "forwards",
                f"{forwards.get('count')}: NBD {forwards.get('nbd_ports')}, the hub's API "
                f"{forwards.get('sha_api_port')}, the hub's {forwards.get('reverse_port')} to "
                f"this API's {forwards.get('api_port')}",
            ),
            ("refused", ", ".join(str(port) for port in refused)),
            ("logged in", "yes" if answer.get("authenticated") else "no"),
            ("reconnects", answer.get("reconnects")),
            ("ssh pid", answer.get("pid")),
        ],
    )
    return EXIT_OK if healthy else EXIT_API


def cmd_enrollment(client: Client, args: argparse.Namespace, out: Output) -> int:
    answer = client.get("/api/v1/enrollment/status")
    ok = answer.get("state") not in ("failed", "rejected")
    if out.json:
        out.dump(answer)
        return EXIT_OK if ok else EXIT_API
    if answer.get("state") == "not_enrolled":
        out.line("the node is not enrolled (POST /api/v1/enrollment/enroll, docs/operations.md)")
        return EXIT_OK
    _rows(
        out,
        [
            ("state", f"{answer.get('state')} since {answer.get('since')}"),
            ("reason", answer.get("reason")),
            ("retrying", answer.get("last_error")),
            ("hub", answer.get("hub_url")),
            ("enrollment", answer.get("enrollment_id")),
            ("node", f"{answer.get('vma_name')} {answer.get('vma_version')}"),
            ("fingerprint", answer.get("fingerprint")),
            ("ssh", f"{answer.get('ssh_user')}@{answer.get('ssh_host')}:{answer.get('ssh_port')}"),
            ("host key", answer.get("host_key_fingerprint")),
            ("tunnel", answer.get("tunnel")),
        ],
    )
    return EXIT_OK if ok else EXIT_API


def _describe(answer: dict[str, Any], out: Output) -> None:
    cert = answer.get("certificate") or {}
    vcenter = answer.get("vcenter")
    out.line(f"vCenter {vcenter} presents this certificate to the daemon:")
    issuer = str(cert.get("issuer"))
    if cert.get("self_signed"):
        issuer += "  (self-signed)"
    rows = [
        ("subject", str(cert.get("subject"))),
        ("issuer", issuer),
        ("valid", f"{cert.get('not_before')} to {cert.get('not_after')}"),
        ("names", ", ".join(cert.get("subject_alt_names") or []) or "-"),
        ("serial", str(cert.get("serial_number"))),
        ("SHA-256", str(cert.get("sha256"))),
        ("SHA-1", str(cert.get("sha1"))),
    ]
    for extra in answer.get("chain") or []:
        rows.append(("chain", f"{extra.get('subject')} (issued by {extra.get('issuer')})"))
    if answer.get("verified"):
        rows.append(("verified", f"yes, against {answer.get('trusted_by')}"))
    else:
        rows.append(
            ("verified", f"no: {answer.get('verify_error')} (against {answer.get('trusted_by')})")
        )
    pin = answer.get("pin")
    if pin is None:
        rows.append(("pinned", "no"))
    elif pin.get("matches"):
        rows.append(("pinned", f"yes, this certificate (since {pin.get('created_at')})"))
    else:
        rows.append(("pinned", f"to ANOTHER certificate: {pin.get('thumbprint')}"))
    for name, value in rows:
        out.line(f"  {name:<9} {fmt.printable(value)}")
    if cert.get("valid_now") is False:
        out.line("  WARNING: the certificate is not valid now (see 'valid')")


def _confirm(question: str, out: Output) -> bool:
    out.err.write(question + " [y/N] ")
    out.err.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_vcenter(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "pins":
        answer = client.get("/api/v1/vcenter/pins")
        if out.json:
            out.dump(answer)
            return EXIT_OK
        pins = answer.get("pins") or []
        if not pins:
            out.line("no vCenter certificate is pinned")
            return EXIT_OK
        rows = [
            [
                str(p.get("vcenter")),
                str(p.get("algorithm")),
                str(p.get("thumbprint")),
                fmt.local_time(p.get("created_at")),
            ]
            for p in pins
        ]
        headers = ["VCENTER", "DIGEST", "THUMBPRINT", "PINNED"]
        for text in fmt.table(headers, rows, shrink=(0, 2), max_width=out.columns()):
            out.line(text)
        return EXIT_OK
    if args.action == "forget":
        answer = client.call("DELETE", f"/api/v1/vcenter/pins/{quote(args.vcenter)}")
        if out.json:
            out.dump(answer)
        else:
            out.line(
                fmt.printable(
                    f"vCenter {answer.get('vcenter')}: pin {answer.get('thumbprint')} removed"
                )
            )
        return EXIT_OK
    return _trust(client, args, out)


def _trust(client: Client, args: argparse.Namespace, out: Output) -> int:
    expected = None
    if args.expect is not None:
        try:
            expected = normalise_thumbprint(args.expect)
        except InvalidThumbprint as e:
            raise UsageError(f"--expect: {e}") from None
    answer = client.get("/api/v1/vcenter/certificate", query={"host": args.vcenter})
    vcenter = str(answer.get("vcenter"))
    cert = answer.get("certificate") or {}
    if not out.json:
        _describe(answer, out)
    result: dict[str, Any] = {"certificate": answer, "pin": None}
    if expected is not None:
        actual = cert.get(algorithm_of(expected))
        if actual != expected:
            raise ApiFailure(
                0,
                "unexpected_certificate",
                f"vCenter {vcenter}'s certificate has the thumbprint {actual}, "
                f"not the expected {expected}; nothing was pinned",
            )
    pin = answer.get("pin")
    if pin is not None and pin.get("matches"):
        if out.json:
            result["pin"] = pin
            out.dump(result)
        else:
            out.line(f"vCenter {vcenter} is already pinned to this certificate; nothing to do")
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                "not a terminal: cannot ask for confirmation; check the thumbprint and pass "
                "--yes (best with --expect THUMBPRINT)"
            )
        question = (
            f"Pin this certificate (SHA-256 {cert.get('sha256')}) for vCenter {vcenter}? "
            "Backups and vSphere requests without their own thumbprint will accept it, "
            "and no other."
        )
        if not _confirm(question, out):
            raise Declined(f"not confirmed; vCenter {vcenter} was not pinned")
    stored = client.call(
        "PUT", f"/api/v1/vcenter/pins/{quote(vcenter)}", body={"thumbprint": cert.get("sha256")}
    )
    if out.json:
        result["pin"] = stored
        out.dump(result)
        return EXIT_OK
    replaced = stored.get("replaced")
    out.line(
        f"vCenter {stored.get('vcenter')}: pinned to SHA-256 {stored.get('thumbprint')}"
        + (f" (replacing {replaced})" if replaced else "")
    )
    return EXIT_OK


COMMANDS = {
    "jobs": cmd_jobs,
    "watch": cmd_watch,
    "log": cmd_log,
    "cancel": cmd_cancel,
    "relays": cmd_relays,
    "health": cmd_health,
    "tunnel": cmd_tunnel,
    "enrollment": cmd_enrollment,
    "vcenter": cmd_vcenter,
}


def run(
    argv: Sequence[str],
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    environ: Optional[dict[str, str]] = None,
) -> int:
    args = parser().parse_args(argv)
    output = Output(out, err, bool(getattr(args, "json", False)))
    try:
        settings = resolve(
            url=getattr(args, "url", None),
            token_file=getattr(args, "token_file", None),
            ca_file=getattr(args, "ca_file", None),
            insecure=bool(getattr(args, "insecure", False)),
            timeout=getattr(args, "timeout", None),
            config=getattr(args, "config", None),
            environ=os.environ if environ is None else environ,
        )
        return COMMANDS[args.command](Client(settings), args, output)
    except UsageError as e:
        output.note(f"sna-ctl: {e}")
        return EXIT_USAGE
    except ApiFailure as e:
        message = e.message
        if e.code == "unauthorized":
            message += " (give it with --token-file, SNA_TOKEN_FILE or SNA_TOKEN)"
        output.note(f"sna-ctl: {fmt.printable(message)}")
        return EXIT_API
    except Declined as e:
        output.note(f"sna-ctl: {e}")
        return EXIT_API
    except Unreachable as e:
        output.note(f"sna-ctl: {e}")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        output.note("sna-ctl: interrupted")
        return EXIT_INTERRUPTED


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``sna-ctl`` console script."""
    # Output into a closed pipe (sna-ctl jobs | head) ends quietly, as for other tools.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
