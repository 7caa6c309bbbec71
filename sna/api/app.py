"""The ``/api/v1`` routes.

:class:`SnaAPI` is a Klein app with its dependencies passed in: the job
manager, a clock for uptime, and the version.  Every answer is JSON; every
error is ``{"error": code, "message": text}`` with the status the Go SNA's
callers expect.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from datetime import datetime
from typing import Any, Optional

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from sna import __version__
from sna.api import openapi, render
from sna.api.http import ApiError, PathConverter, json_response, read_json_object
from sna.api.joblog_route import JobLogs
from sna.api.replicate import parse_replicate_request
from sna.api.validation import (
    check_job_id,
    check_text,
    check_vm_id,
    credentials,
    credentials_from_request,
    inventory_path,
    parse_backup_request,
    parse_cleanup_request,
    parse_discover_request,
    parse_power_request,
    parse_progress_update,
    parse_spec_request,
)
from sna.config import ConfigError
from sna.contract.tls import InvalidThumbprint
from sna.contract.vcenter import InvalidAddress
from sna.enrollment.routes import EnrollmentRoutes
from sna.jobs import history, replication
from sna.jobs.manager import (
    AtCapacity,
    JobConflict,
    JobError,
    JobManager,
    JobNotActive,
    ShaLookupFailed,
    ShuttingDown,
    StorageUnavailable,
    TargetUnreachable,
    UnknownJob,
)
from sna.jobs.model import Job, JobStatus
from sna.logging import printable
from sna.nbd.relay.history import RelayHistory
from sna.sbc.command import ClientUnavailable
from sna.telemetry.metrics import CONTENT_TYPE, Metrics
from sna.tunnel import render as render_tunnel
from sna.tunnel.supervisor import TunnelSupervisor
from sna.vmware.interface import Credentials, InvalidVSphereRequest, IVSphere, VSphereError
from sna.vmware.pins import CertificateProbe, VCenterPins, parse_vcenter, presented_json
from sna.web.shell import INDEX, Shell

_JOB_ERROR_STATUS: list[tuple[type[JobError], int]] = [
    (UnknownJob, 404),
    (JobConflict, 409),
    (AtCapacity, 503),
    (ShuttingDown, 503),
    (ShaLookupFailed, 502),
    (StorageUnavailable, 503),
]


def _query_text(request: IRequest) -> dict[str, list[str]]:
    """The query string as text, each name with every value it was given."""
    args: dict[str, list[str]] = {}
    for raw_name, raw_values in (request.args or {}).items():
        try:
            name = raw_name.decode("utf-8")
            args[name] = [value.decode("utf-8") for value in raw_values]
        except UnicodeDecodeError:
            shown = raw_name.decode("utf-8", "replace")[:40]
            raise ApiError(
                400, "invalid_request", f"query parameter {shown!r} is not UTF-8", field=shown
            ) from None
    return args


def _format_uptime(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h{minutes}m{secs}s"
    return f"{days}d{text}" if days else text


class SnaAPI:
    app = Klein()
    # "//" in a path is a 404, not a redirect to the merged path (werkzeug's
    # default answers 308 without the Location our JSON errors would need).
    app.url_map.merge_slashes = False
    # A control character in a {vm_path} is named (400), not left unmatched (404).
    app.url_map.converters["path"] = PathConverter
    log = Logger()

    def __init__(
        self,
        manager: JobManager,
        now: Callable[[], datetime],
        monotonic: Callable[[], float],
        metrics: Metrics,
        vsphere: IVSphere,
        on_credentials: Callable[[Credentials], None] = lambda credentials: None,
        pins: Optional[VCenterPins] = None,
        certificates: Optional[CertificateProbe] = None,
        relay_history: Optional[RelayHistory] = None,
        job_logs: Optional[JobLogs] = None,
        enrollment: Optional[EnrollmentRoutes] = None,
        tunnel: Optional[TunnelSupervisor] = None,
    ) -> None:
        #: The SSH tunnel to the hub (GET /api/v1/tunnel, health); None: never any.
        self._tunnel = tunnel
        self._manager = manager
        self._vsphere = vsphere
        #: Stored vCenter pins and the certificate fetcher (``/api/v1/vcenter/...``);
        #: without a probe, the certificate route answers 503.
        self._pins = pins if pins is not None else VCenterPins(None, now)
        self._certificates = certificates
        #: Credentials a request proved good: the snapshot janitor may use them
        #: for the snapshots still pending on that vCenter (sna.jobs.janitor).
        self._on_credentials = on_credentials
        self._metrics = metrics
        self._now = now
        self._monotonic = monotonic
        self._started = monotonic()
        #: The dashboard's files, and the relay history its chart draws (None: not kept).
        self._shell = Shell()
        self._relay_history = relay_history
        #: Reads job logs back for GET /api/v1/jobs/{job_id}/log (None: no such route).
        self._job_logs = job_logs
        #: The enrollment with the hub (/api/v1/enrollment/...; None: no such routes).
        self._enrollment = enrollment

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    # -- errors ---------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return json_response(request, error.body(), error.status)

    @app.handle_errors(TargetUnreachable)
    def _unreachable(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, TargetUnreachable)
        targets = []
        for result in error.failures:
            target, problem = result.target, result.error
            assert problem is not None
            targets.append(
                {
                    "disk_key": target.disk_key,
                    "host": target.host,
                    "port": target.port,
                    "export": target.export,
                    "reason": problem.reason,
                    "message": problem.message,
                }
            )
        body = {"error": error.code, "message": error.message, "targets": targets}
        # A target that only timed out may come back (the tunnel): say "try later".
        return json_response(request, body, 503 if error.timed_out_only else 502)

    @app.handle_errors(VSphereError)
    def _vsphere_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, VSphereError)
        body: dict[str, Any] = {"error": error.code, "message": error.message}
        if isinstance(error, InvalidVSphereRequest):
            body["field"] = error.field
        return json_response(request, body, error.status)

    @app.handle_errors(JobError)
    def _job_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, JobError)
        status = next((code for kind, code in _JOB_ERROR_STATUS if isinstance(error, kind)), 500)
        return json_response(request, {"error": error.code, "message": error.message}, status)

    @app.handle_errors(ClientUnavailable)
    def _client_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        self.log.error("cannot start the backup client: {reason}", reason=str(failure.value))
        body = {"error": "backup_client_unavailable", "message": str(failure.value)}
        return json_response(request, body, 500)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("latin-1")
        return json_response(request, {"error": "not_found", "message": f"no route {path}"}, 404)

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request: IRequest, failure: Failure) -> bytes:
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        body = {"error": "method_not_allowed", "message": f"{method} is not allowed on {path}"}
        return json_response(request, body, 405)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        code = error.code or 500
        body = {
            "error": (error.name or "error").lower().replace(" ", "_"),
            "message": error.description or "",
        }
        return json_response(request, body, code)

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "unhandled error answering {path}",
            failure,
            path=printable(request.path.decode("utf-8", "replace")),
        )
        body = {"error": "internal_error", "message": "internal error; see the sna log"}
        return json_response(request, body, 500)

    # -- backups --------------------------------------------------------

    @app.route("/api/v1/backup/start", methods=["POST"])
    async def backup_start(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        backup = parse_backup_request(
            body, self._manager.settings, sha=self._manager.hub is not None
        )
        job = await self._manager.start(backup)
        answer = {
            "job_id": job.job_id,
            "status": "started",
            "message": f"Backup started for {job.vm_name}",
            "started_at": render.timestamp_seconds(job.started_at),
            "pid": job.pid,
        }
        return json_response(request, answer)

    def _status(self, job: Job) -> dict[str, Any]:
        hub = self._manager.hub
        sha = hub.report(job.job_id) if hub is not None else None
        return {**render.status(job, sha, self._now()), **self._kind(job)}

    def _kind(self, job: Job) -> dict[str, Any]:
        """A job's ``kind`` and, for a replication, its request and the request's jobs."""
        if job.replication_id is None:
            return {"kind": job.kind, "replication": None}
        members = self._manager.replication_jobs(job.replication_id)
        return {
            "kind": job.kind,
            "replication": {
                "replication_id": job.replication_id,
                "jobs": sorted(j.job_id for j in members),
            },
        }

    def _job(self, job_id: str) -> Job:
        """A job by id, or a replicate request's jobs as one under the request's ``job_id``."""
        try:
            return self._manager.get(job_id)
        except UnknownJob:
            group = replication.group_view(job_id, self._manager.replication_jobs(job_id))
            if group is None:
                raise
            return group

    @app.route("/api/v1/status/<job_id>", methods=["GET"])
    def status(self, request: IRequest, job_id: str) -> bytes:
        return json_response(request, self._status(self._job(job_id)))

    @app.route("/api/v1/jobs", methods=["GET"])
    def jobs(self, request: IRequest) -> bytes:
        try:
            query = history.parse_query(_query_text(request))
        except history.InvalidQuery as e:
            raise ApiError(400, "invalid_request", e.message, field=e.field) from None
        page = history.select(self._manager.jobs(), query)
        body = {
            "jobs": [self._status(j) for j in page.jobs],
            "count": len(page.jobs),
            "total": page.total,
            "limit": page.limit,
            "offset": page.offset,
            "next_offset": page.next_offset,
        }
        return json_response(request, body)

    @app.route("/api/v1/jobs/<job_id>/log", methods=["GET"])
    async def job_log(self, request: IRequest, job_id: str) -> bytes:
        if self._job_logs is None:
            path = request.path.decode("latin-1")
            raise ApiError(404, "not_found", f"no route {path}")
        return await self._job_logs.answer(request, job_id, _query_text(request))

    @app.route("/api/v1/jobs/<job_id>/status", methods=["GET"])
    def sha_job_status(self, request: IRequest, job_id: str) -> bytes:
        return json_response(request, render.sha_job_status(self._job(job_id)))

    @app.route("/api/v1/jobs/<job_id>/cancel", methods=["POST"])
    def cancel(self, request: IRequest, job_id: str) -> bytes:
        try:
            job = self._manager.cancel(job_id)
        except UnknownJob:
            return self._cancel_replication(request, job_id)
        body = {
            "job_id": job.job_id,
            "status": "cancelling",
            "message": f"Cancel requested; the backup client (pid {job.pid}) is being stopped",
        }
        return json_response(request, body, 202)

    # -- replication jobs (sna.jobs.replication) --------------------------

    @app.route("/api/v1/replicate", methods=["POST"])
    async def replicate(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        wanted = parse_replicate_request(body, self._manager.settings)
        chains = [
            self._manager.replication_chain(wanted.vcenter_key, vm.vm_path) for vm in wanted.vms
        ]
        jobs = await self._manager.start_all(replication.plan(wanted, chains))
        answer = {
            "job_id": wanted.job_id,
            "status": "started",
            "vm_count": len(jobs),
            "started_at": render.timestamp_seconds(min(j.started_at for j in jobs)),
            "jobs": [{"job_id": j.job_id, "vm_path": j.vm_path, "pid": j.pid} for j in jobs],
        }
        return json_response(request, answer)

    def _cancel_replication(self, request: IRequest, replication_id: str) -> bytes:
        """``/jobs/{job_id}/cancel`` of a replicate request's ``job_id``: each of its running jobs."""
        members = self._manager.replication_jobs(replication_id)
        if not members:
            raise UnknownJob(f"job {replication_id} not found")
        running = [j for j in members if j.status.active]
        if not running:
            raise JobNotActive(f"no job of replication {replication_id} is running")
        cancelled = [self._manager.cancel(j.job_id) for j in running]
        names = ", ".join(f"{j.job_id} (pid {j.pid})" for j in cancelled)
        body = {
            "job_id": replication_id,
            "status": "cancelling",
            "message": f"Cancel requested; the backup clients of {names} are being stopped",
        }
        return json_response(request, body, 202)

    # -- the Go client's progress ----------------------------------------

    @app.route("/api/v1/progress/<job_id>", methods=["GET"])
    def progress(self, request: IRequest, job_id: str) -> bytes:
        return json_response(request, render.progress(self._job(job_id), self._now()))

    @app.route("/api/v1/progress/<job_id>/update", methods=["POST"])
    def progress_update(self, request: IRequest, job_id: str) -> bytes:
        check_job_id(job_id)
        body = read_json_object(request)
        job = self._manager.get(job_id)
        push = parse_progress_update(body, job.pushed)
        self._manager.push_progress(job_id, push)
        return json_response(request, {"job_id": job_id, "status": "success"})

    # -- the daemon -----------------------------------------------------

    @app.route("/api/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        uptime = self._monotonic() - self._started
        counts = self._manager.counts()
        problem = self._manager.storage_problem()
        tunnel = self._tunnel.state() if self._tunnel is not None else None
        tunnel_problem = tunnel.problem() if tunnel is not None else None
        if tunnel_problem is not None:
            problem = f"{problem}; {tunnel_problem}" if problem is not None else tunnel_problem
        body = {
            # Still 200: the daemon is up and answers; what it cannot do is said here.
            "status": "degraded" if problem is not None else "healthy",
            "reason": problem,
            "version": __version__,
            "timestamp": render.timestamp_seconds(self._now()),
            "uptime": _format_uptime(uptime),
            "uptime_seconds": round(uptime, 3),
            "jobs": counts,
            "running_jobs": counts[JobStatus.RUNNING.value],
            "max_jobs": self._manager.settings.max_jobs,
            # Not a degradation: the janitor is on it; an operator alerts on how long.
            "snapshots_pending": len(self._manager.snapshots_pending()),
            "tunnel": render_tunnel.summary(tunnel),
        }
        return json_response(request, body)

    @app.route("/api/v1/tunnel", methods=["GET"])
    def tunnel(self, request: IRequest) -> bytes:
        current = self._tunnel.state() if self._tunnel is not None else None
        return json_response(request, render_tunnel.full(current))

    # -- vSphere --------------------------------------------------------

    @app.route("/api/v1/discover", methods=["POST"])
    async def discover(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        creds, datacenter, name_filter = parse_discover_request(body)
        # The Go SNA gave the request's vcenter back byte for byte, and the SHA
        # keeps that as the VM's vCenter: the port (or URL) stays in it.
        named = body["vcenter"]
        answer = await self._vsphere.discover(creds, datacenter, name_filter, named)
        return json_response(request, answer)

    @app.route("/api/v1/vms/<path:vm_path>/cbt-status", methods=["GET"])
    async def cbt_status(self, request: IRequest, vm_path: str) -> bytes:
        creds = credentials_from_request(request)
        result = await self._vsphere.cbt_status(creds, inventory_path(vm_path))
        return json_response(request, result)

    @app.route("/api/v1/vms/<path:vm_path>/enable-cbt", methods=["POST"])
    async def enable_cbt(self, request: IRequest, vm_path: str) -> bytes:
        creds = credentials(read_json_object(request))
        result = await self._vsphere.enable_cbt(creds, inventory_path(vm_path))
        return json_response(request, result)

    @app.route("/api/v1/vm-spec-changes", methods=["POST"])
    async def vm_spec_changes(self, request: IRequest) -> bytes:
        creds, vm_path, stored = parse_spec_request(read_json_object(request))
        return json_response(request, await self._vsphere.spec_changes(creds, vm_path, stored))

    @app.route("/api/v1/vm/<vm_id>/power-off", methods=["POST"])
    async def power_off(self, request: IRequest, vm_id: str) -> bytes:
        power = parse_power_request(read_json_object(request), default_timeout=300)
        result = await self._vsphere.power_off(
            power.credentials, check_vm_id(vm_id), power.force, power.timeout
        )
        return json_response(request, result)

    @app.route("/api/v1/vm/<vm_id>/power-on", methods=["POST"])
    async def power_on(self, request: IRequest, vm_id: str) -> bytes:
        power = parse_power_request(read_json_object(request), default_timeout=600)
        result = await self._vsphere.power_on(
            power.credentials, check_vm_id(vm_id), power.wait_for_tools, power.timeout
        )
        return json_response(request, result)

    @app.route("/api/v1/vm/<vm_id>/power-state", methods=["GET"])
    async def power_state(self, request: IRequest, vm_id: str) -> bytes:
        creds = credentials_from_request(request)
        return json_response(request, await self._vsphere.power_state(creds, check_vm_id(vm_id)))

    @app.route("/api/v1/cleanup", methods=["POST"])
    async def cleanup(self, request: IRequest) -> bytes:
        cleanup = parse_cleanup_request(read_json_object(request))
        vm_path = cleanup.vm_path
        if cleanup.job_id is not None:
            try:
                job = self._manager.get(cleanup.job_id)
            except UnknownJob:
                job = None
            if job is not None:
                vm_path = vm_path or job.vm_path
        if vm_path is None:
            raise ApiError(
                400,
                "invalid_request",
                "vm_path is required (the job is not known here)",
                field="vm_path",
            )
        # A running backup needs its snapshot: whatever the action, leave that VM alone.
        for running in self._manager.active_jobs():
            if running.vm_path == vm_path:
                raise ApiError(
                    409,
                    "vm_busy",
                    f"job {running.job_id} is backing up {vm_path} and uses its snapshot; "
                    "cancel it first",
                )
        job_id = cleanup.job_id if cleanup.action == "delete_snapshot" else None
        result = await self._vsphere.remove_job_snapshots(cleanup.credentials, vm_path, job_id)
        self._on_credentials(cleanup.credentials)
        return json_response(
            request, {"action": cleanup.action, **result, "job_id": cleanup.job_id}
        )

    @app.route("/api/v1/relays", methods=["GET"])
    def relays(self, request: IRequest) -> bytes:
        now = self._monotonic()
        relays = [render.relay(stats, now) for stats in self._manager.relays()]
        return json_response(request, {"relays": relays, "count": len(relays)})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        return self._metrics.render()

    @app.route("/api/v1/config", methods=["GET"])
    def get_config(self, request: IRequest) -> bytes:
        return json_response(request, {"config": self._manager.settings.to_json()})

    @app.route("/api/v1/config", methods=["PUT"])
    def put_config(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        if not body:
            raise ApiError(400, "invalid_request", "no configuration keys given")
        try:
            settings = self._manager.configure(body)
        except ConfigError as e:
            raise ApiError(400, "invalid_config", e.message, field=e.key) from None
        answer: dict[str, Any] = {
            "status": "success",
            "message": "Configuration updated successfully",
            "config": settings.to_json(),
        }
        return json_response(request, answer)

    # -- vCenter certificates and stored pins (sna-ctl vcenter) --------------

    @staticmethod
    def _vcenter_named(text: str, field: str) -> tuple[str, int]:
        """A vCenter as ``host``, ``host:port`` or ``[v6]:port``: (lower-case host, port)."""
        if "\0" in text or len(text) > 1024:
            raise ApiError(400, "invalid_request", f"{field} is not a vCenter address", field=field)
        check_text(field, text)
        try:
            return parse_vcenter(text, field)
        except InvalidAddress as e:
            raise ApiError(400, "invalid_request", str(e), field=field) from None

    @staticmethod
    def _query(request: IRequest, name: str) -> Optional[str]:
        """The first ``name`` of the query string, as text; ``None`` when absent."""
        values = request.args.get(name.encode(), [])
        return values[0].decode("utf-8", "replace") if values else None

    @staticmethod
    def _pin_not_found(host: str, port: int) -> ApiError:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return ApiError(404, "pin_not_found", f"no certificate pin is stored for vCenter {where}")

    @app.route("/api/v1/vcenter/certificate", methods=["GET"])
    async def vcenter_certificate(self, request: IRequest) -> bytes:
        host_text = self._query(request, "host")
        if host_text is None or not host_text.strip():
            raise ApiError(
                400,
                "invalid_request",
                "host is required (a vCenter: host or host:port)",
                field="host",
            )
        host, port = self._vcenter_named(host_text, "host")
        port_text = self._query(request, "port")
        if port_text is not None:
            if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
                raise ApiError(
                    400, "invalid_request", "port must be a number from 1 to 65535", field="port"
                )
            stripped = host_text.strip()
            try:
                named = urllib.parse.urlsplit(
                    stripped if "://" in stripped else "//" + stripped
                ).port
            except ValueError:  # parse_vcenter accepted it: never here
                named = None
            if named is not None and named != int(port_text):
                raise ApiError(
                    400,
                    "invalid_request",
                    f"port {int(port_text)} differs from the port in host ({named})",
                    field="port",
                )
            port = int(port_text)
        if self._certificates is None:
            raise ApiError(503, "unavailable", "this daemon cannot fetch certificates")
        presented = await self._certificates.fetch(host, port)
        answer = presented_json(presented, self._pins.lookup(host, port), self._now())
        return json_response(request, answer)

    @app.route("/api/v1/vcenter/pins", methods=["GET"])
    def vcenter_pins(self, request: IRequest) -> bytes:
        pins = [pin.to_json() for pin in self._pins.all()]
        return json_response(request, {"pins": pins, "count": len(pins)})

    @app.route("/api/v1/vcenter/pins/<vcenter>", methods=["GET"])
    def vcenter_pin(self, request: IRequest, vcenter: str) -> bytes:
        host, port = self._vcenter_named(vcenter, "vcenter")
        pin = self._pins.lookup(host, port)
        if pin is None:
            raise self._pin_not_found(host, port)
        return json_response(request, pin.to_json())

    @app.route("/api/v1/vcenter/pins/<vcenter>", methods=["PUT"])
    def vcenter_pin_store(self, request: IRequest, vcenter: str) -> bytes:
        host, port = self._vcenter_named(vcenter, "vcenter")
        body = read_json_object(request)
        value = body.get("thumbprint")
        if value is None or value == "":
            raise ApiError(400, "invalid_request", "thumbprint is required", field="thumbprint")
        if not isinstance(value, str):
            raise ApiError(
                400, "invalid_request", "thumbprint must be a string", field="thumbprint"
            )
        try:
            pin, replaced = self._pins.pin(host, port, value)
        except InvalidThumbprint:
            raise ApiError(
                400,
                "invalid_request",
                "thumbprint must be a SHA-256 or SHA-1 hex digest "
                "(64 or 40 hex digits, colons optional)",
                field="thumbprint",
            ) from None
        answer = {**pin.to_json(), "replaced": replaced.thumbprint if replaced else None}
        return json_response(request, answer)

    @app.route("/api/v1/vcenter/pins/<vcenter>", methods=["DELETE"])
    def vcenter_pin_forget(self, request: IRequest, vcenter: str) -> bytes:
        host, port = self._vcenter_named(vcenter, "vcenter")
        pin = self._pins.forget(host, port)
        if pin is None:
            raise self._pin_not_found(host, port)
        return json_response(request, {**pin.to_json(), "status": "removed"})

    # -- enrollment with the hub (sna/enrollment) --------------------------

    def _enrollment_routes(self, request: IRequest) -> EnrollmentRoutes:
        if self._enrollment is None:
            path = request.path.decode("latin-1")
            raise ApiError(404, "not_found", f"no route {path}")
        return self._enrollment

    @app.route("/api/v1/enrollment/enroll", methods=["POST"])
    def enrollment_enroll(self, request: IRequest) -> bytes:
        return self._enrollment_routes(request).enroll(request)

    @app.route("/api/v1/enrollment/status", methods=["GET"])
    def enrollment_status(self, request: IRequest) -> bytes:
        return self._enrollment_routes(request).status(request)

    @app.route("/api/v1/enrollment", methods=["DELETE"])
    def enrollment_forget(self, request: IRequest) -> bytes:
        return self._enrollment_routes(request).forget(request)

    # -- the OpenAPI document ---------------------------------------------

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi_document(self, request: IRequest) -> bytes:
        return json_response(request, openapi.document())

    # -- the dashboard (sna/web) and the relay history its chart draws -----

    @app.route("/", methods=["GET"])
    def dashboard(self, request: IRequest) -> bytes:
        return self._shell_file(request, INDEX)

    @app.route("/ui/<path:file>", methods=["GET"])
    def dashboard_file(self, request: IRequest, file: str) -> bytes:
        return self._shell_file(request, file)

    def _shell_file(self, request: IRequest, name: str) -> bytes:
        # A name of the shipped set, never a path: nothing else can be reached.
        asset = self._shell.asset(name)
        if asset is None:
            path = request.path.decode("latin-1")
            raise ApiError(404, "not_found", f"no route {path}")
        return self._shell.render(request, asset)

    @app.route("/api/v1/relays/history", methods=["GET"])
    def relay_history(self, request: IRequest) -> bytes:
        history = self._relay_history
        if history is None:
            path = request.path.decode("latin-1")
            raise ApiError(404, "not_found", f"no route {path}")
        ports = [
            {
                "nbd_port": port.port,
                "job_id": port.job_id,
                "export": port.export,
                "disk_key": port.disk_key,
                "active": port.active,
                "samples": [
                    {
                        "time": render.timestamp(sample.time),
                        "seconds": round(sample.seconds, 3),
                        "bytes_to_hub": sample.bytes_to_hub,
                        "bytes_from_hub": sample.bytes_from_hub,
                        "throughput_bps": round(sample.throughput_bps, 1),
                        "job_id": sample.job_id,
                    }
                    for sample in port.samples
                ],
            }
            for port in history.ports()
        ]
        body = {
            "interval_seconds": history.interval,
            "window_seconds": history.window,
            "sampled_at": render.timestamp(history.sampled_at),
            "ports": ports,
            "count": len(ports),
        }
        return json_response(request, body)
