"""The OpenAPI 3.1 document of the API, built as data and served at
``GET /api/v1/openapi.json``.

docs/SNA-API.md is the prose; this is the same API for machines.  Tests keep
the two sides true: every Klein route is described here with its methods and
every path here is a route (tests/unit/test_openapi.py), and a real daemon
answers as this document says (tests/integration/test_openapi.py).

The document is three parts:

- :data:`SCHEMAS`: shared component schemas (the error body, a job, a disk);
- :data:`PATHS`: one top-level entry per path, each ``{method: operation}``;
- :func:`document`: the whole, assembled on each call.

Adding a route: add one block at the end of this module, under
"Paths added by other parts", that assigns ``PATHS["/api/v1/..."]`` with
:func:`operation` (which adds the generic errors every route can answer), and
its schemas to :data:`SCHEMAS` if they are shared.  Path parameters are
written ``{name}`` as in the Klein route's ``<name>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

from sna import __version__
from sna.tunnel.supervisor import STATES as TUNNEL_STATES

Schema = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
_JSON = "application/json"


def ref(name: str) -> Schema:
    """A reference to ``components/schemas/{name}``."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or ``null``."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(
    properties: Mapping[str, Schema],
    required: Iterable[str] = (),
    additional: bool = True,
    **more: Any,
) -> Schema:
    """An object schema; ``required`` defaults to none, unknown keys allowed."""
    schema: Schema = {"type": "object", "properties": dict(properties)}
    names = list(required)
    if names:
        schema["required"] = names
    if not additional:
        schema["additionalProperties"] = False
    schema.update(more)
    return schema


def answered(properties: Mapping[str, Schema], **more: Any) -> Schema:
    """An answer's object schema: every property listed is always present."""
    return obj(properties, required=list(properties), **more)


# -- errors ------------------------------------------------------------------

#: The generic errors any route can answer (docs/SNA-API.md, "Generic errors"),
#: by status: the refusals of the HTTP layer (sna.api.http) before a route runs.
GENERIC_ERRORS: dict[int, tuple[str, ...]] = {
    400: (
        "bad_request_line",
        "bad_header",
        "bad_content_length",
        "bad_framing",
        "bad_request",
        "invalid_path",
        "invalid_host",
    ),
    401: ("unauthorized",),
    404: ("not_found",),
    405: ("method_not_allowed",),
    408: ("request_timeout",),
    413: ("body_too_large",),
    414: ("request_line_too_long",),
    431: ("headers_too_large",),
    500: ("internal_error",),
    501: ("unsupported_transfer_encoding", "method_not_implemented"),
    503: ("too_many_connections",),
    505: ("http_version_not_supported",),
}

#: What a route that reads a JSON body adds (sna.api.http.read_json_object).
BODY_ERRORS: dict[int, tuple[str, ...]] = {
    400: ("invalid_json", "json_too_deep", "invalid_request"),
    415: ("unsupported_media_type",),
}

_REASONS = {
    400: "The request is malformed or a field is invalid (`field` names it).",
    401: "No valid bearer token (only with `--auth-token-file`).",
    404: "No such route, or no such object.",
    405: "The path exists; the method does not.",
    408: "The request did not arrive in time.",
    409: "Conflicts with the state of a job or VM.",
    413: "The body is larger than 1 MiB.",
    414: "The request line is longer than 16 KiB.",
    415: "The body is not JSON.",
    431: "The headers are too large or too many.",
    500: "A bug (see the daemon's log), or the backup client cannot be started.",
    501: "A Transfer-Encoding other than chunked, or a method with a lower-case letter.",
    502: "An upstream (vCenter, an NBD target, the SHA) failed.",
    503: "Too busy, shutting down, or out of storage; try again later.",
    504: "vCenter did not answer in time.",
    505: "An HTTP version other than 1.1 or 1.0.",
}


def error_schema(codes: Iterable[str], extra: Optional[Mapping[str, Schema]] = None) -> Schema:
    """The error body ``{error, message, field?}`` with ``error`` one of ``codes``
    and no other keys than those and ``extra``."""
    return {
        "allOf": [ref("Error")],
        "properties": {"error": {"enum": sorted(set(codes))}, **(extra or {})},
        "unevaluatedProperties": False,
    }


def error_response(
    status: int, codes: Iterable[str], extra: Optional[Mapping[str, Schema]] = None
) -> Schema:
    response: Schema = {
        "description": _REASONS.get(status, "An error."),
        "content": {_JSON: {"schema": error_schema(codes, extra)}},
    }
    if status == 401:
        response["headers"] = {
            "WWW-Authenticate": {
                "description": '`Bearer realm="sna"`',
                "schema": {"type": "string"},
            }
        }
    return response


def json_body(schema: Schema, description: str) -> Schema:
    """A JSON answer (a success) with ``schema``."""
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def operation(
    summary: str,
    description: str,
    *,
    tag: str,
    ok: Mapping[int, Schema],
    errors: Optional[Mapping[int, Iterable[str]]] = None,
    error_extra: Optional[Mapping[str, Schema]] = None,
    parameters: Iterable[Schema] = (),
    body: Optional[Schema] = None,
    open_route: bool = False,
    operation_id: str,
) -> Schema:
    """One operation: its answers ``ok`` (status: response), the route's own
    ``errors`` (status: codes) merged with the generic errors (and the body
    errors when it reads a ``body``), and its parameters.

    ``error_extra``: optional properties the route's own error bodies may carry
    besides ``{error, message, field}`` (``backup/start``'s ``targets``).
    ``open_route``: no token needed even with ``--auth-token-file``.
    """
    codes: dict[int, set[str]] = {s: set(c) for s, c in GENERIC_ERRORS.items()}
    if body is not None:
        for status, body_codes in BODY_ERRORS.items():
            codes.setdefault(status, set()).update(body_codes)
    for status, own_codes in (errors or {}).items():
        codes.setdefault(status, set()).update(own_codes)
    responses: dict[str, Schema] = {str(s): r for s, r in sorted(ok.items())}
    own = set(errors or {})
    for status in sorted(codes):
        extra = error_extra if status in own else None
        responses[str(status)] = error_response(status, codes[status], extra)
    op: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "tags": [tag],
        "parameters": list(parameters),
        "responses": responses,
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    if open_route:
        op["security"] = [{}]
    return op


def path_parameter(name: str, description: str, schema: Optional[Schema] = None) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string", "minLength": 1},
    }


# -- shared schemas --------------------------------------------------------------

# Characters a text field that can reach a log, the job log or the client's argv
# refuses (sna.api.validation._UNSAFE): C0 and C1 controls, DEL, lone surrogates.
_CONTROLS = "\\u0000-\\u001f\\u007f-\\u009f\\ud800-\\udfff"
#: Text without control characters (every string field but passwords and job ids).
SAFE_TEXT = f"^[^{_CONTROLS}]*$"
#: A password (sna.api.validation._NOT_XML): what XML 1.0 can carry.
PASSWORD_TEXT = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\ud800-\\udfff\\ufffe\\uffff]*$"
#: A job id (sna.contract.ids): no ``/``, no control character, not only white space.
JOB_ID_PATTERN = (
    f"^[^/{_CONTROLS}]*"
    f"[^/{_CONTROLS} \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
    f"[^/{_CONTROLS}]*$"
)
#: RFC 3339 in UTC with milliseconds (``/status``, ``/jobs``) or seconds (the rest).
MILLISECONDS = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z$"
SECONDS = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
#: What a text field of a request may hold at most (sna.api.validation.MAX_FIELD).
MAX_FIELD = 4096
INT64 = 2**63 - 1

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
COUNT: Schema = {"type": "integer", "minimum": 0}
TIME_MS: Schema = {"type": "string", "format": "date-time", "pattern": MILLISECONDS}
TIME_S: Schema = {"type": "string", "format": "date-time", "pattern": SECONDS}


def text(max_length: int = MAX_FIELD, required: bool = False, **more: Any) -> Schema:
    """A request's text field: no control characters, at most ``max_length``;
    ``required`` ones must not be empty, optional ones may be ``null``."""
    schema: Schema = {"type": "string", "maxLength": max_length, "pattern": SAFE_TEXT}
    if required:
        schema["minLength"] = 1
    else:
        schema["type"] = ["string", "null"]
    schema.update(more)
    return schema


def secret(required: bool = True) -> Schema:
    """A password: never logged or returned; it may hold TAB, LF and CR, and no
    other C0 control (XML, which carries it to vCenter, cannot)."""
    return text(required=required, pattern=PASSWORD_TEXT, writeOnly=True)


SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {
            "error": {"type": "string", "description": "a stable machine code"},
            "message": {"type": "string", "description": "the human reason"},
            "field": {
                "type": "string",
                "description": "the request field a validation error concerns",
            },
        },
        required=["error", "message"],
        description="Every error answer. Each response narrows `error` to its codes.",
    ),
    "JobId": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": JOB_ID_PATTERN,
        "description": "1-255 characters, not blank, without `/` or control characters; "
        "used byte for byte.",
        "examples": ["backup-pgtest1-1764148323", "backup-SQL Server 01-1796166100"],
    },
    "JobStatus": {
        "type": "string",
        "enum": ["running", "completed", "failed", "cancelled", "interrupted"],
        "description": "`running` until the client exits; the others are final.",
    },
    "JobDisk": answered(
        {
            "disk_key": {"type": "string", "description": "the VMware device key, once known"},
            "target_key": {"type": "string", "description": "the target's key in nbd_targets"},
            "disk_index": {**COUNT, "description": "the SHA's index of the disk"},
            "capacity_bytes": nullable(COUNT),
            "export": STRING,
            "nbd_port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "status": {"type": "string", "enum": ["pending", "running", "completed", "failed"]},
            "sync_type": nullable({"type": "string", "enum": ["full", "incremental"]}),
            "sync_reason": nullable(STRING),
            "bytes_done": COUNT,
            "bytes_total": nullable(COUNT),
            "change_id": nullable(STRING),
            "previous_change_id": nullable(STRING),
            "previous_change_id_from": {"enum": ["request", "sha", None]},
            "relay_port": nullable({"type": "integer", "minimum": 1, "maximum": 65535}),
            "bytes_to_hub": COUNT,
            "bytes_from_hub": COUNT,
            "target_error": nullable(STRING),
        },
        additionalProperties=False,
    ),
    "Stall": answered(
        {
            "on": {"type": "string", "enum": ["vcenter", "source_read", "hub_write"]},
            "since": TIME_MS,
            "disk_key": nullable(STRING),
            "message": nullable(STRING),
        },
        additionalProperties=False,
        description="Why a running job makes no progress, since when.",
    ),
    "Snapshot": answered(
        {
            "name": STRING,
            "state": {"type": "string", "enum": ["present", "pending", "removed"]},
            "reason": nullable(STRING),
            "removal_attempts": COUNT,
            "next_attempt": nullable(TIME_MS),
            "needs_credentials": BOOLEAN,
            "removed_by": {"enum": ["client", "sna", None]},
            "removed_at": nullable(TIME_MS),
        },
        additionalProperties=False,
        description="The job's `sbak-` VM snapshot and its removal.",
    ),
    "Delivery": answered(
        {
            "state": {
                "type": "string",
                "enum": ["pending", "delivered", "refused", "given_up", "not_sent"],
            },
            "attempts": COUNT,
            "reason": nullable(STRING),
        },
        additionalProperties=False,
    ),
    "ShaReport": obj(
        {
            "completion": nullable(
                answered(
                    {
                        "state": {
                            "type": "string",
                            "enum": ["pending", "delivered", "refused", "not_sent"],
                        },
                        "error": nullable(STRING),
                        "disks": {
                            "type": "array",
                            "items": {
                                "allOf": [ref("Delivery")],
                                "properties": {"disk_index": nullable(COUNT)},
                                "required": ["disk_index"],
                                "unevaluatedProperties": False,
                            },
                        },
                    },
                    additionalProperties=False,
                )
            ),
            "final_state": nullable(ref("Delivery")),
            "telemetry": nullable(
                answered(
                    {
                        "pushes": COUNT,
                        "delivered": COUNT,
                        "last_push": nullable(TIME_MS),
                        "last_answer": nullable(STRING),
                        "failing": nullable(STRING),
                        "stopped": nullable(STRING),
                    },
                    additionalProperties=False,
                )
            ),
            "unavailable": {
                "type": "string",
                "description": "present when the job database cannot be read: why",
            },
        },
        required=["completion", "final_state", "telemetry"],
        additional=False,
        description="What the SHA has been told of the job (`--sha-url`).",
    ),
    "Job": answered(
        {
            "job_id": ref("JobId"),
            "status": ref("JobStatus"),
            "progress_percent": {"type": "number", "minimum": 0, "maximum": 100},
            "current_operation": STRING,
            "start_time": TIME_MS,
            "last_update": TIME_MS,
            "vm_path": STRING,
            "vm_name": STRING,
            "backup_type": {"type": "string", "enum": ["full", "incremental"]},
            "phase": STRING,
            "pid": nullable(INTEGER),
            "end_time": nullable(TIME_MS),
            "exit_code": nullable(INTEGER),
            "exit_signal": nullable(INTEGER),
            "error": nullable(STRING),
            "bytes_done": COUNT,
            "bytes_total": nullable(COUNT),
            "throughput_bps": nullable({"type": "number", "minimum": 0}),
            "eta_seconds": nullable(COUNT),
            "duration_seconds": {"type": "number", "minimum": 0},
            "average_rate_bps": nullable({"type": "number", "minimum": 0}),
            "relay_bytes_to_hub": COUNT,
            "relay_bytes_from_hub": COUNT,
            "disks": {"type": "array", "items": ref("JobDisk")},
            "stalled": nullable(ref("Stall")),
            "snapshot": nullable(ref("Snapshot")),
            "sha": nullable(ref("ShaReport")),
        },
        additionalProperties=False,
        description="A job's record (`GET /api/v1/status/{job_id}`).",
    ),
    "Settings": answered(
        {
            "max_jobs": {"type": "integer", "minimum": 1, "maximum": 1024},
            "nbd_ports": {"type": "string", "pattern": "^[0-9]+(-[0-9]+)?$"},
            "nbd_hosts": {"type": "array", "items": STRING, "minItems": 1},
            "kill_grace_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "job_retention_days": {"type": "integer", "minimum": 0, "maximum": 36500},
            "nbd_probe_timeout_seconds": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 300,
            },
        },
        additionalProperties=False,
        description="The run-time settings in force.",
    ),
    "Relay": answered(
        {
            "job_id": ref("JobId"),
            "disk_key": STRING,
            "export": STRING,
            "nbd_port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "listen_port": {"type": "integer", "minimum": 0, "maximum": 65535},
            "state": {
                "type": "string",
                "enum": ["listening", "connected", "upstream_lost", "closed"],
            },
            "bytes_to_hub": COUNT,
            "bytes_from_hub": COUNT,
            "connections": COUNT,
            "active_connections": COUNT,
            "throughput_bps": {"type": "number", "minimum": 0},
            "average_throughput_bps": {"type": "number", "minimum": 0},
            "uptime_seconds": {"type": "number", "minimum": 0},
            "upstream_error": nullable(STRING),
        },
        additionalProperties=False,
    ),
    "Credentials": obj(
        {
            "vcenter": text(
                required=True,
                description="`host`, `host:port` or `https://host[:port][/sdk]`",
                examples=["vcenter.example.local"],
            ),
            "username": text(required=True, examples=["administrator@vsphere.local"]),
            "password": secret(),
            "vcenter_thumbprint": text(
                description="SHA-1 or SHA-256 hex digest of vCenter's certificate, "
                'colons and spaces optional; `null` or `""`: none',
            ),
        },
        required=["vcenter", "username", "password"],
        description="vCenter credentials in a request body (the Go SNA's names).",
    ),
    "DiscoveredDisk": answered(
        {
            "id": {"type": "string", "pattern": "^disk-[0-9]+$"},
            "key": INTEGER,
            "label": STRING,
            "path": STRING,
            "vmdk_path": STRING,
            "size_gb": COUNT,
            "capacity_bytes": COUNT,
            "datastore": STRING,
            "provisioning_type": {"type": "string", "enum": ["thin", "thick", "unknown"]},
            "unit_number": {"type": "integer", "minimum": -1},
            "controller": STRING,
            "controller_key": INTEGER,
        },
        additionalProperties=False,
    ),
    "DiscoveredNetwork": answered(
        {
            "label": STRING,
            "network_name": STRING,
            "adapter_type": {
                "type": "string",
                "enum": [
                    "vmxnet3",
                    "e1000e",
                    "e1000",
                    "vmxnet2",
                    "vmxnet",
                    "pcnet32",
                    "sriov",
                    "unknown",
                ],
            },
            "mac_address": STRING,
            "connected": BOOLEAN,
            "type": {"type": "string", "enum": ["standard", "distributed", "opaque", "unknown"]},
        },
        additionalProperties=False,
    ),
    "DiscoveredVM": answered(
        {
            "id": {"type": "string", "description": "the BIOS UUID, else the moref"},
            "name": STRING,
            "path": STRING,
            "datacenter": STRING,
            "power_state": STRING,
            "guest_os": {"type": "string", "enum": ["windows", "linux", "unknown"]},
            "memory_mb": COUNT,
            "num_cpu": COUNT,
            "cpus": COUNT,
            "os_type": STRING,
            "vmx_version": STRING,
            "display_name": STRING,
            "annotation": STRING,
            "folder_path": STRING,
            "vmware_tools_status": STRING,
            "vmware_tools_version": STRING,
            "cbt_enabled": BOOLEAN,
            "disks": {"type": "array", "items": ref("DiscoveredDisk")},
            "networks": {"type": "array", "items": ref("DiscoveredNetwork")},
        },
        additionalProperties=False,
    ),
    "CbtStatus": answered(
        {
            "enabled": BOOLEAN,
            "vm_name": STRING,
            "power_state": STRING,
            "vm_path": STRING,
            "vm_id": STRING,
            "has_snapshots": BOOLEAN,
            "snapshot_count": COUNT,
            "disks": {
                "type": "array",
                "items": answered(
                    {"key": INTEGER, "label": STRING, "change_id": nullable(STRING)},
                    additionalProperties=False,
                ),
            },
        },
        description="Whether changed block tracking is on, with snapshots and change IDs.",
    ),
    "PowerAnswer": obj(
        {
            "success": BOOLEAN,
            "vm_id": STRING,
            "previous_state": STRING,
            "new_state": STRING,
            "operation": {"type": "string", "enum": ["power-off", "power-on"]},
            "shutdown_method": {"type": "string", "enum": ["graceful", "hard", "already-off"]},
            "tools_status": STRING,
            "duration_seconds": COUNT,
            "timestamp": TIME_S,
            "message": STRING,
        },
        required=[
            "success",
            "vm_id",
            "previous_state",
            "new_state",
            "operation",
            "tools_status",
            "duration_seconds",
            "timestamp",
            "message",
        ],
        additional=False,
    ),
}

#: Every vSphere route's own errors (docs/SNA-API.md, "vSphere errors").
VSPHERE_ERRORS: dict[int, tuple[str, ...]] = {
    400: ("invalid_request",),
    401: ("vcenter_auth_failed",),
    403: ("vcenter_permission_denied",),
    404: ("vm_not_found",),
    409: ("vm_state_conflict",),
    502: ("vcenter_unreachable", "vcenter_certificate_rejected", "vcenter_error"),
    # The stored vCenter pins cannot be read (sna.vmware.pins).
    503: ("storage_unavailable",),
    504: ("vcenter_timeout",),
}

JOB_ID_PARAMETER = path_parameter(
    "job_id",
    "The job's id, one path segment, percent-encoded (`%2F` matches no route).",
    {"type": "string", "minLength": 1},
)

_CREDENTIAL_PARAMETERS = (
    ("vcenter", "X-vCenter-Host", "vCenter's address, as `vcenter` in a body"),
    ("username", "X-vCenter-User", "the vCenter user"),
    ("password", "X-vCenter-Password", "the vCenter password"),
    ("vcenter_thumbprint", "X-vCenter-Thumbprint", "pins vCenter's certificate"),
)


def credential_parameters() -> list[Schema]:
    """The credentials of a vSphere GET: each a header, or else the query parameter."""
    parameters = []
    for field, header, meaning in _CREDENTIAL_PARAMETERS:
        parameters.append(
            {
                "name": header,
                "in": "header",
                "description": f"{meaning}; wins over the `{field}` query parameter, "
                "even when empty",
                "schema": {"type": "string", "maxLength": MAX_FIELD},
            }
        )
    for field, header, meaning in _CREDENTIAL_PARAMETERS:
        parameters.append(
            {
                "name": field,
                "in": "query",
                "description": f"{meaning}, when the `{header}` header is absent "
                "(the Go SNA's callers use the query; prefer the header)",
                "schema": {"type": "string", "maxLength": MAX_FIELD},
            }
        )
    return parameters


def with_credentials(properties: Mapping[str, Schema], required: Iterable[str] = ()) -> Schema:
    """A vSphere POST body: the credentials and the route's own fields."""
    return {
        "allOf": [ref("Credentials")],
        **obj(properties, required=required),
    }


# -- paths -----------------------------------------------------------------------

#: The document's paths, one entry each: ``{path: {method: operation}}``.
PATHS: dict[str, dict[str, Schema]] = {}

_TARGETS_EXAMPLE = (
    "2000:nbd://127.0.0.1:10100/pgtest1-disk0,2001:nbd://127.0.0.1:10101/pgtest1-disk1"
)

PATHS["/api/v1/backup/start"] = {
    "post": operation(
        "Start a backup",
        "Validates the request, probes every NBD target, asks the SHA for change IDs "
        "(`--sha-url`), opens one relay per target and starts the backup client. "
        "A refused request leaves no job, relay or process.",
        operation_id="backupStart",
        tag="backups",
        body=obj(
            {
                "job_id": ref("JobId"),
                "vm_name": text(required=True),
                "vcenter_host": text(required=True),
                "vcenter_user": text(required=True),
                "vcenter_password": secret(),
                "vm_path": text(required=True),
                "nbd_targets": text(
                    64 * 1024,
                    required=True,
                    description="`{disk_key}:nbd://{host}:{port}/{export}`, comma-separated, "
                    "at most 256 entries; hosts and ports must be allowed (`GET /api/v1/config`)",
                ),
                "backup_type": {"type": "string", "enum": ["full", "incremental"]},
                "previous_change_id": text(
                    description='`PLACEHOLDER`, `null`, `""` or blank: none given; '
                    "a real one is at most 256 characters",
                ),
                "previous_change_ids": {
                    "type": ["object", "null"],
                    "description": "change IDs by target key",
                    "additionalProperties": text(256),
                },
                "vcenter_thumbprint": text(
                    description="SHA-1 or SHA-256 hex digest of vCenter's certificate"
                ),
            },
            required=[
                "job_id",
                "vm_name",
                "vcenter_host",
                "vcenter_user",
                "vcenter_password",
                "vm_path",
                "nbd_targets",
                "backup_type",
            ],
            examples=[
                {
                    "job_id": "backup-pgtest1-1764148323",
                    "vm_name": "pgtest1",
                    "vcenter_host": "vcenter.example.local",
                    "vcenter_user": "administrator@vsphere.local",
                    "vcenter_password": "********",
                    "vm_path": "/DC1/vm/pgtest1",
                    "nbd_targets": _TARGETS_EXAMPLE,
                    "backup_type": "full",
                    "previous_change_id": "PLACEHOLDER",
                    "nbd_host": "127.0.0.1",
                }
            ],
        ),
        ok={
            200: json_body(
                answered(
                    {
                        "job_id": ref("JobId"),
                        "status": {"const": "started"},
                        "message": STRING,
                        "started_at": TIME_S,
                        "pid": INTEGER,
                    },
                    additionalProperties=False,
                    examples=[
                        {
                            "job_id": "backup-pgtest1-1764148323",
                            "status": "started",
                            "message": "Backup started for pgtest1",
                            "started_at": "2026-11-26T09:12:03Z",
                            "pid": 48211,
                        }
                    ],
                ),
                "The job runs; `pid` is its backup client.",
            )
        },
        errors={
            409: ("job_already_running", "port_in_use", "snapshot_pending"),
            500: ("backup_client_unavailable",),
            502: ("nbd_target_unreachable", "sha_lookup_failed"),
            503: (
                "shutting_down",
                "too_many_jobs",
                "storage_unavailable",
                "nbd_target_unreachable",
            ),
        },
        error_extra={
            "targets": {
                "type": "array",
                "description": "`nbd_target_unreachable` only: every failing target",
                "items": answered(
                    {
                        "disk_key": STRING,
                        "host": STRING,
                        "port": INTEGER,
                        "export": STRING,
                        "reason": {
                            "type": "string",
                            "enum": [
                                "refused",
                                "timeout",
                                "not_nbd",
                                "export_missing",
                                "handshake_error",
                                "unreachable",
                            ],
                        },
                        "message": STRING,
                    },
                    additionalProperties=False,
                ),
            }
        },
    )
}

PATHS["/api/v1/status/{job_id}"] = {
    "get": operation(
        "A job's record",
        "The job's record, a superset of the Go SNA's answer.",
        operation_id="jobStatus",
        tag="backups",
        parameters=[JOB_ID_PARAMETER],
        ok={200: json_body(ref("Job"), "The job.")},
        errors={404: ("job_not_found",)},
    )
}

PATHS["/api/v1/jobs"] = {
    "get": operation(
        "Jobs, a page at a time",
        "The jobs the daemon has a record of, newest `start_time` first (then by `job_id`), "
        "filtered, a page at a time; ask again with `offset` = `next_offset` until it is "
        "`null`. Unknown or repeated query parameters are refused.",
        operation_id="listJobs",
        tag="backups",
        parameters=[
            {
                "name": "status",
                "in": "query",
                "description": "only jobs of these statuses; repeat it for several",
                "style": "form",
                "explode": True,
                "schema": {"type": "array", "items": ref("JobStatus")},
            },
            {
                "name": "vm_name",
                "in": "query",
                "description": "only jobs of this VM (exact name)",
                "schema": {"type": "string", "minLength": 1},
            },
            {
                "name": "since",
                "in": "query",
                "description": "only jobs started at or after this RFC 3339 time (with offset)",
                "schema": {"type": "string", "format": "date-time"},
            },
            {
                "name": "limit",
                "in": "query",
                "description": "jobs per page",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            },
            {
                "name": "offset",
                "in": "query",
                "description": "matching jobs to skip",
                "schema": {"type": "integer", "minimum": 0, "default": 0},
            },
        ],
        ok={
            200: json_body(
                answered(
                    {
                        "jobs": {"type": "array", "items": ref("Job")},
                        "count": {**COUNT, "description": "jobs in this page"},
                        "total": {**COUNT, "description": "jobs that match, on every page"},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "offset": COUNT,
                        "next_offset": nullable(COUNT),
                    },
                    additionalProperties=False,
                ),
                "One page of the matching jobs, each in the `/status` shape.",
            )
        },
        errors={400: ("invalid_request",)},
    )
}

PATHS["/api/v1/jobs/{job_id}/status"] = {
    "get": operation(
        "A job's status for the SHA's phantom-job detector",
        "A `404` means the daemon does not know the job.",
        operation_id="shaJobStatus",
        tag="backups",
        parameters=[JOB_ID_PARAMETER],
        ok={
            200: json_body(
                answered(
                    {
                        "job_id": ref("JobId"),
                        "status": ref("JobStatus"),
                        "last_update": TIME_MS,
                        "progress_data": answered(
                            {
                                "percent": {"type": "number", "minimum": 0, "maximum": 100},
                                "bytes_transferred": COUNT,
                                "current_operation": STRING,
                            },
                            additionalProperties=False,
                        ),
                        "exit_code": nullable(INTEGER),
                        "error": nullable(STRING),
                    },
                    additionalProperties=False,
                ),
                "The job's status.",
            )
        },
        errors={404: ("job_not_found",)},
    )
}

PATHS["/api/v1/jobs/{job_id}/cancel"] = {
    "post": operation(
        "Cancel a running job",
        "SIGTERM to the client, SIGKILL after the kill grace. No request body; the answer "
        "does not wait for the client to exit.",
        operation_id="cancelJob",
        tag="backups",
        parameters=[JOB_ID_PARAMETER],
        ok={
            202: json_body(
                answered(
                    {
                        "job_id": ref("JobId"),
                        "status": {"const": "cancelling"},
                        "message": STRING,
                    },
                    additionalProperties=False,
                ),
                "The client is being stopped; poll `/status` until the job is final.",
            )
        },
        errors={404: ("job_not_found",), 409: ("job_not_running",)},
    )
}

_MBPS: Schema = {"type": "number", "minimum": 0}

PATHS["/api/v1/progress/{job_id}"] = {
    "get": operation(
        "A job's progress, the Go SNA's shape",
        "Field for field the Go SNA's `/progress`, plus `job_status`; the SHA's GUI "
        "proxy forwards it.",
        operation_id="jobProgress",
        tag="backups",
        parameters=[JOB_ID_PARAMETER],
        ok={
            200: json_body(
                obj(
                    {
                        "job_id": ref("JobId"),
                        "status": STRING,
                        "job_status": ref("JobStatus"),
                        "sync_type": {"type": "string", "enum": ["", "full", "incremental"]},
                        "phase": STRING,
                        "percentage": {"type": "number", "minimum": 0, "maximum": 100},
                        "current_operation": STRING,
                        "bytes_transferred": COUNT,
                        "total_bytes": COUNT,
                        "throughput": answered(
                            {
                                "current_mbps": _MBPS,
                                "average_mbps": _MBPS,
                                "peak_mbps": _MBPS,
                                "last_update": TIME_S,
                            },
                            additionalProperties=False,
                        ),
                        "timing": answered(
                            {
                                "start_time": TIME_S,
                                "last_update": TIME_S,
                                "elapsed_ms": COUNT,
                                "phase_start": TIME_S,
                                "phase_elapsed_ms": COUNT,
                                "eta_seconds": {"type": "integer", "minimum": 0},
                            },
                            additionalProperties=False,
                        ),
                        "vm_info": answered(
                            {
                                "name": STRING,
                                "path": STRING,
                                "disk_size_gb": COUNT,
                                "disk_size_bytes": COUNT,
                                "cbt_enabled": BOOLEAN,
                            },
                            additionalProperties=False,
                        ),
                        "phases": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": answered(
                                {
                                    "name": STRING,
                                    "status": STRING,
                                    "start_time": TIME_S,
                                    "end_time": {"anyOf": [TIME_S, {"const": ""}]},
                                    "duration_ms": COUNT,
                                },
                                additionalProperties=False,
                            ),
                        },
                        "errors": {"type": "array", "maxItems": 1, "items": ref("ProgressError")},
                        "last_error": nullable(ref("ProgressError")),
                        "disk_progresses": {
                            "type": "array",
                            "items": answered(
                                {
                                    "disk_id": STRING,
                                    "label": STRING,
                                    "bytes_transferred": COUNT,
                                    "total_bytes": COUNT,
                                    "percent": {"type": "number", "minimum": 0, "maximum": 100},
                                    "throughput_mbps": _MBPS,
                                    "status": {
                                        "type": "string",
                                        "enum": ["pending", "running", "completed", "failed"],
                                    },
                                },
                                additionalProperties=False,
                            ),
                        },
                    },
                    required=[
                        "job_id",
                        "status",
                        "job_status",
                        "sync_type",
                        "phase",
                        "percentage",
                        "current_operation",
                        "bytes_transferred",
                        "total_bytes",
                        "throughput",
                        "timing",
                        "vm_info",
                        "phases",
                        "errors",
                        "last_error",
                    ],
                    additional=False,
                ),
                "The job's progress.",
            )
        },
        errors={404: ("job_not_found",)},
    )
}
SCHEMAS["ProgressError"] = answered(
    {"message": STRING, "timestamp": TIME_MS}, additionalProperties=False
)

PATHS["/api/v1/progress/{job_id}/update"] = {
    "post": operation(
        "A progress push from the legacy Go client",
        "The job must exist and be running. Each push is applied on top of the previous "
        "one; every field is optional and `null` counts as absent. From a loopback "
        "address no token is needed.",
        operation_id="progressUpdate",
        tag="backups",
        parameters=[JOB_ID_PARAMETER],
        body=obj(
            {
                "stage": text(),
                "status": text(),
                "bytes_transferred": {"type": ["integer", "null"], "minimum": 0, "maximum": INT64},
                "total_bytes": {"type": ["integer", "null"], "minimum": 0, "maximum": INT64},
                "throughput_bps": {"type": ["number", "null"], "minimum": 0, "maximum": INT64},
                "percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                "sync_type": text(description="`full`, `initial` or `incremental`"),
            },
            examples=[
                {
                    "stage": "Transfer",
                    "status": "in_progress",
                    "bytes_transferred": 3221225472,
                    "total_bytes": 109521666048,
                    "throughput_bps": 104857600,
                    "percent": 2.941176470588235,
                }
            ],
        ),
        ok={
            200: json_body(
                answered(
                    {"job_id": ref("JobId"), "status": {"const": "success"}},
                    additionalProperties=False,
                ),
                "The push is applied.",
            )
        },
        errors={404: ("job_not_found",), 409: ("job_not_running",)},
    )
}

PATHS["/api/v1/health"] = {
    "get": operation(
        "Liveness and the state of the daemon",
        "Always `200` while the daemon answers; `status: degraded` when it cannot record "
        "or log jobs (`reason` says why). The one route that needs no token.",
        operation_id="health",
        tag="daemon",
        open_route=True,
        ok={
            200: json_body(
                answered(
                    {
                        "status": {"type": "string", "enum": ["healthy", "degraded"]},
                        "reason": nullable(STRING),
                        "version": STRING,
                        "timestamp": TIME_S,
                        "uptime": {
                            "type": "string",
                            "pattern": "^([0-9]+d)?[0-9]+h[0-9]+m[0-9]+s$",
                        },
                        "uptime_seconds": {"type": "number", "minimum": 0},
                        "jobs": answered(
                            {
                                "running": COUNT,
                                "completed": COUNT,
                                "failed": COUNT,
                                "cancelled": COUNT,
                                "interrupted": COUNT,
                            },
                            additionalProperties=False,
                        ),
                        "running_jobs": COUNT,
                        "max_jobs": {"type": "integer", "minimum": 1},
                        "snapshots_pending": COUNT,
                    },
                    additionalProperties=False,
                    examples=[
                        {
                            "status": "healthy",
                            "reason": None,
                            "version": "1.4.0",
                            "timestamp": "2026-11-26T09:32:04Z",
                            "uptime": "2d3h14m5s",
                            "uptime_seconds": 184445.118,
                            "jobs": {
                                "running": 1,
                                "completed": 41,
                                "failed": 2,
                                "cancelled": 1,
                                "interrupted": 0,
                            },
                            "running_jobs": 1,
                            "max_jobs": 8,
                            "snapshots_pending": 0,
                        }
                    ],
                ),
                "The daemon answers.",
            )
        },
    )
}

_CONFIG_EXAMPLE = {
    "max_jobs": 8,
    "nbd_ports": "10100-10200",
    "nbd_hosts": ["127.0.0.1", "::1", "localhost"],
    "kill_grace_seconds": 30.0,
    "job_retention_days": 30,
    "nbd_probe_timeout_seconds": 5.0,
}

PATHS["/api/v1/config"] = {
    "get": operation(
        "The run-time settings",
        "The settings in force.",
        operation_id="getConfig",
        tag="daemon",
        ok={
            200: json_body(
                answered(
                    {"config": ref("Settings")},
                    additionalProperties=False,
                    examples=[{"config": _CONFIG_EXAMPLE}],
                ),
                "The settings.",
            )
        },
    ),
    "put": operation(
        "Change run-time settings",
        "Any non-empty subset of the keys; every key and value is checked before anything "
        "changes. Stored, and in force at once for new requests.",
        operation_id="putConfig",
        tag="daemon",
        body=obj(
            {
                "max_jobs": {"type": "integer", "minimum": 1, "maximum": 1024},
                "nbd_ports": {
                    "type": "string",
                    "pattern": "^ *[0-9]+ *(- *[0-9]+ *)?$",
                    "description": "`LOW-HIGH` or one port, within 1-65535",
                },
                "nbd_hosts": {
                    "anyOf": [
                        {"type": "array", "items": STRING, "minItems": 1},
                        {"type": "string", "description": "comma-separated"},
                    ]
                },
                "kill_grace_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                "nbd_probe_timeout_seconds": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": 300,
                },
                "job_retention_days": {"type": "integer", "minimum": 0, "maximum": 36500},
            },
            additional=False,
            minProperties=1,
            examples=[{"max_jobs": 4, "kill_grace_seconds": 60}],
        ),
        ok={
            200: json_body(
                answered(
                    {
                        "status": {"const": "success"},
                        "message": STRING,
                        "config": ref("Settings"),
                    },
                    additionalProperties=False,
                ),
                "The settings now in force.",
            )
        },
        errors={400: ("invalid_config",)},
    ),
}

PATHS["/api/v1/relays"] = {
    "get": operation(
        "Every open relay",
        "One relay per target of each running job.",
        operation_id="listRelays",
        tag="daemon",
        ok={
            200: json_body(
                answered(
                    {"relays": {"type": "array", "items": ref("Relay")}, "count": COUNT},
                    additionalProperties=False,
                ),
                "The relays.",
            )
        },
    )
}

PATHS["/metrics"] = {
    "get": operation(
        "Prometheus metrics",
        "The Prometheus text exposition format.",
        operation_id="metrics",
        tag="daemon",
        ok={
            200: {
                "description": "The metrics.",
                "content": {
                    "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}
                },
            }
        },
    )
}

PATHS["/api/v1/discover"] = {
    "post": operation(
        "Every VM of a vCenter",
        "Every VM of the vCenter, or of one datacenter, optionally filtered by name.",
        operation_id="discover",
        tag="vsphere",
        body=with_credentials(
            {
                "datacenter": text(description="absent, `null` or blank: every datacenter"),
                "filter": text(description="comma-separated VM names"),
            }
        ),
        ok={
            200: json_body(
                answered(
                    {
                        "vcenter": answered(
                            {"host": STRING, "datacenter": STRING}, additionalProperties=False
                        ),
                        "vms": {"type": "array", "items": ref("DiscoveredVM")},
                    },
                    additionalProperties=False,
                ),
                "The VMs.",
            )
        },
        errors=VSPHERE_ERRORS,
    )
}

VM_PATH_PARAMETER = path_parameter(
    "vm_path",
    "The VM's inventory path without its leading `/`, slashes kept "
    "(`DC1/vm/pgtest1`), or a VM name.",
)

PATHS["/api/v1/vms/{vm_path}/cbt-status"] = {
    "get": operation(
        "A VM's changed block tracking",
        "Whether CBT is on, with the VM's snapshots and each disk's change ID.",
        operation_id="cbtStatus",
        tag="vsphere",
        parameters=[VM_PATH_PARAMETER, *credential_parameters()],
        ok={200: json_body(ref("CbtStatus"), "The CBT status.")},
        errors=VSPHERE_ERRORS,
    )
}

PATHS["/api/v1/vms/{vm_path}/enable-cbt"] = {
    "post": operation(
        "Turn changed block tracking on",
        "Refused (`409`) while the VM has snapshots; `changed: false` when CBT was on.",
        operation_id="enableCbt",
        tag="vsphere",
        parameters=[VM_PATH_PARAMETER],
        body=ref("Credentials"),
        ok={
            200: json_body(
                {
                    "allOf": [ref("CbtStatus")],
                    "properties": {"changed": BOOLEAN},
                    "required": ["changed"],
                },
                "The CBT status, read again after the change.",
            )
        },
        errors=VSPHERE_ERRORS,
    )
}

PATHS["/api/v1/vm-spec-changes"] = {
    "post": operation(
        "What changed in a VM since a stored record",
        "The live VM, read as `/discover` lists it, compared with `stored_vm_info`.",
        operation_id="vmSpecChanges",
        tag="vsphere",
        body=with_credentials(
            {
                "vm_path": text(required=True),
                "stored_vm_info": {
                    "type": "object",
                    "description": "a VM as `/discover` gives it, or a part of one",
                },
            },
            required=["vm_path", "stored_vm_info"],
        ),
        ok={
            200: json_body(
                answered(
                    {
                        "has_changes": BOOLEAN,
                        "changes_summary": STRING,
                        "changes_json": STRING,
                        "check_time": TIME_S,
                        "status": {"const": "success"},
                        "error_message": {"const": ""},
                        "changes": {
                            "type": "array",
                            "items": obj(
                                {
                                    "category": {
                                        "type": "string",
                                        "enum": [
                                            "hardware",
                                            "state",
                                            "metadata",
                                            "disk",
                                            "network",
                                        ],
                                    },
                                    "type": {
                                        "type": "string",
                                        "enum": ["modified", "added", "removed", "resized"],
                                    },
                                    "field": STRING,
                                    "key": INTEGER,
                                    "mac_address": STRING,
                                    "old": {},
                                    "new": {},
                                    "description": STRING,
                                },
                                required=["category", "type", "field", "old", "new", "description"],
                                additional=False,
                            ),
                        },
                    },
                    additionalProperties=False,
                ),
                "The changes.",
            )
        },
        errors=VSPHERE_ERRORS,
    )
}

VM_ID_PARAMETER = path_parameter(
    "vm_id",
    "The VM's BIOS UUID (`/discover`'s `id`), instance UUID or moref.",
    {"type": "string", "minLength": 1, "maxLength": MAX_FIELD},
)
_POWER_FIELDS: dict[str, Schema] = {
    "timeout": {
        "anyOf": [
            {"type": "number", "minimum": 1, "maximum": 3600},
            {"const": 0},
            {"type": "null"},
        ],
        "description": "seconds the request may take; `null` or `0`: the default. "
        "The answer comes within 50 s whatever this says",
    },
    "force": {"type": ["boolean", "null"]},
    "wait_for_tools": {"type": ["boolean", "null"]},
}

PATHS["/api/v1/vm/{vm_id}/power-off"] = {
    "post": operation(
        "Shut a VM down",
        "A guest shutdown when VMware Tools run and `force` is not set, else a power-off "
        "task; `timeout` defaults to 300.",
        operation_id="powerOff",
        tag="vsphere",
        parameters=[VM_ID_PARAMETER],
        body=with_credentials(_POWER_FIELDS),
        ok={200: json_body(ref("PowerAnswer"), "The VM's state after the operation.")},
        errors=VSPHERE_ERRORS,
    )
}

PATHS["/api/v1/vm/{vm_id}/power-on"] = {
    "post": operation(
        "Power a VM on",
        "A power-on task, and with `wait_for_tools` a wait for VMware Tools; `timeout` "
        "defaults to 600.",
        operation_id="powerOn",
        tag="vsphere",
        parameters=[VM_ID_PARAMETER],
        body=with_credentials(_POWER_FIELDS),
        ok={200: json_body(ref("PowerAnswer"), "The VM's state after the operation.")},
        errors=VSPHERE_ERRORS,
    )
}

PATHS["/api/v1/vm/{vm_id}/power-state"] = {
    "get": operation(
        "A VM's power and Tools state",
        "Credentials in headers (or the query).",
        operation_id="powerState",
        tag="vsphere",
        parameters=[VM_ID_PARAMETER, *credential_parameters()],
        ok={
            200: json_body(
                obj(
                    {
                        "vm_id": STRING,
                        "power_state": STRING,
                        "tools_status": STRING,
                        "last_state_change": TIME_S,
                        "uptime_seconds": COUNT,
                        "timestamp": TIME_S,
                    },
                    required=["vm_id", "power_state", "tools_status", "timestamp"],
                    additional=False,
                ),
                "The VM's state.",
            )
        },
        errors=VSPHERE_ERRORS,
    )
}

PATHS["/api/v1/cleanup"] = {
    "post": operation(
        "Remove the backup client's VM snapshots",
        "`delete_snapshot`: the snapshots named after `job_id`; `cleanup_all`: every "
        "`sbak-`/`srep-` snapshot of the VM. A VM a running job backs up is refused.",
        operation_id="cleanup",
        tag="vsphere",
        body=with_credentials(
            {
                "action": {"type": "string", "enum": ["delete_snapshot", "cleanup_all"]},
                "job_id": {
                    "anyOf": [ref("JobId"), {"type": "null"}],
                    "description": "required for `delete_snapshot`",
                },
                "vm_path": text(description="required unless the daemon knows `job_id`"),
            },
            required=["action"],
        ),
        ok={
            200: json_body(
                answered(
                    {
                        "action": {"type": "string", "enum": ["delete_snapshot", "cleanup_all"]},
                        "vm_path": STRING,
                        "job_id": nullable(ref("JobId")),
                        "removed": {"type": "array", "items": STRING},
                        "status": {"const": "success"},
                    },
                    additionalProperties=False,
                ),
                "The snapshots removed (`[]` when none matched).",
            )
        },
        errors={**VSPHERE_ERRORS, 409: ("vm_state_conflict", "vm_busy")},
    )
}

PATHS["/api/v1/openapi.json"] = {
    "get": operation(
        "This document",
        "The OpenAPI 3.1 document of every route. Needs the token like every data route.",
        operation_id="openapi",
        tag="daemon",
        ok={200: json_body({"type": "object", "required": ["openapi", "info", "paths"]}, "It.")},
    )
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "sna: the Sendense Node Appliance control daemon",
            "version": __version__,
            "description": (
                "The `/api/v1` HTTP API of `twistd sna`; docs/SNA-API.md tells it in prose. "
                "Every answer is JSON (`/metrics` is Prometheus text) with "
                "`Cache-Control: no-cache`; `HEAD` is accepted wherever `GET` is. "
                "With `--auth-token-file` every route but `GET /api/v1/health` and the "
                "dashboard's files (`GET /`, `GET /ui/{file}`, which hold no data) needs "
                "`Authorization: Bearer {token}` (and progress pushes from loopback need none)."
            ),
        },
        "servers": [{"url": "http://127.0.0.1:8081", "description": "the default --listen"}],
        "security": [{}, {"bearer": []}],
        "tags": [
            {"name": "backups", "description": "Starting and following backup jobs."},
            {"name": "daemon", "description": "The daemon itself: health, settings, metrics."},
            {
                "name": "vsphere",
                "description": "vCenter, with the credentials each request carries.",
            },
        ],
        "paths": {path: dict(methods) for path, methods in PATHS.items()},
        "components": {
            "schemas": dict(SCHEMAS),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The first line of `--auth-token-file`; off by default.",
                }
            },
        },
    }


# -- Paths added by other parts: one block each, below this line. ----------------


# -- The dashboard (sna/web) and the relay history its chart draws. ----------------

from sna.web.shell import CONTENT_TYPES as _SHELL_TYPES  # noqa: E402

_SHELL_HEADERS: Schema = {
    name: {"description": description, "schema": STRING}
    for name, description in (
        ("Content-Security-Policy", "Only the daemon's own files and API; no inline code."),
        ("X-Content-Type-Options", "`nosniff`"),
        ("Referrer-Policy", "`no-referrer`"),
        ("X-Frame-Options", "`DENY`"),
        ("ETag", "The file's digest, for `If-None-Match`."),
    )
}


def _shell_answers(media_types: Iterable[str], description: str) -> dict[int, Schema]:
    return {
        200: {
            "description": description,
            "headers": _SHELL_HEADERS,
            "content": {media: {"schema": STRING} for media in media_types},
        },
        304: {
            "description": "The browser's copy (`If-None-Match`) is current; no body.",
            "headers": _SHELL_HEADERS,
        },
    }


PATHS["/"] = {
    "get": operation(
        "The dashboard's page",
        "The operators' dashboard (HTML). It holds no data: its script reads the JSON "
        "routes, sending the bearer token when the daemon has one, so no token is "
        "needed for it.",
        operation_id="dashboard",
        tag="daemon",
        ok=_shell_answers(["text/html; charset=utf-8"], "The page."),
        open_route=True,
    )
}

PATHS["/ui/{file}"] = {
    "get": operation(
        "A file of the dashboard",
        "The dashboard's script, styles and icon, by name; any other name, a "
        "directory or a path out of the shipped files answers `404`.",
        operation_id="dashboardFile",
        tag="daemon",
        parameters=[
            path_parameter(
                "file",
                "`dashboard.js`, `dashboard.css`, `favicon.svg` or `index.html`.",
            )
        ],
        ok=_shell_answers(sorted({media.decode() for media in _SHELL_TYPES.values()}), "The file."),
        open_route=True,
    )
}

SCHEMAS["RelayHistoryPort"] = answered(
    {
        "nbd_port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "job_id": nullable(ref("JobId")),
        "export": nullable(STRING),
        "disk_key": nullable(STRING),
        "active": {**BOOLEAN, "description": "whether a relay serves the port now"},
        "samples": {
            "type": "array",
            "maxItems": 120,
            "description": "oldest first",
            "items": answered(
                {
                    "time": {**TIME_MS, "description": "when the span ended"},
                    "seconds": {**NUMBER, "exclusiveMinimum": 0},
                    "bytes_to_hub": COUNT,
                    "bytes_from_hub": COUNT,
                    "throughput_bps": {**NUMBER, "minimum": 0},
                    "job_id": nullable(ref("JobId")),
                },
                additionalProperties=False,
            ),
        },
    },
    additionalProperties=False,
    description="What one NBD port's relays moved in each span of the window.",
)

PATHS["/api/v1/relays/history"] = {
    "get": operation(
        "The relays' throughput over the last minutes",
        "Per NBD target port, the bytes its relays moved in each span between two "
        "readings (every `interval_seconds`), for the last `window_seconds`; in memory "
        "only, empty after a start.",
        operation_id="relayHistory",
        tag="daemon",
        ok={
            200: json_body(
                answered(
                    {
                        "interval_seconds": {**NUMBER, "exclusiveMinimum": 0},
                        "window_seconds": {**NUMBER, "exclusiveMinimum": 0},
                        "sampled_at": nullable(TIME_MS),
                        "ports": {"type": "array", "items": ref("RelayHistoryPort")},
                        "count": COUNT,
                    },
                    additionalProperties=False,
                ),
                "The history.",
            )
        },
    )
}


# -- vCenter certificates and stored pins (sna-ctl vcenter; sna/vmware/pins.py). -------

_THUMBPRINT: Schema = {
    "type": "string",
    "pattern": "^([0-9A-F]{2}:){19}[0-9A-F]{2}$|^([0-9A-F]{2}:){31}[0-9A-F]{2}$",
    "description": "SHA-1 (20 bytes) or SHA-256 (32 bytes), upper case, colon-separated",
}
_PIN_FIELDS: dict[str, Schema] = {
    "vcenter": {**STRING, "description": "`host:port`, an IPv6 address in brackets"},
    "host": {**STRING, "description": "lower case; an IPv6 address without brackets"},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "thumbprint": _THUMBPRINT,
    "algorithm": {"type": "string", "enum": ["sha256", "sha1"]},
    "created_at": TIME_S,
}
SCHEMAS["VCenterPin"] = answered(
    _PIN_FIELDS,
    additionalProperties=False,
    description="A vCenter's pinned certificate thumbprint.",
)
SCHEMAS["VCenterCertificate"] = answered(
    {
        "subject": nullable(STRING),
        "issuer": nullable(STRING),
        "serial_number": nullable(STRING),
        "not_before": nullable(TIME_S),
        "not_after": nullable(TIME_S),
        "valid_now": nullable(BOOLEAN),
        "self_signed": nullable(BOOLEAN),
        "subject_alt_names": {"type": "array", "items": STRING},
        "sha256": _THUMBPRINT,
        "sha1": _THUMBPRINT,
        "pem": nullable(STRING),
    },
    additionalProperties=False,
    description="A certificate for people; `null` what cannot be read of it.",
)
_VCENTER_PARAMETER = path_parameter(
    "vcenter",
    "The vCenter as `host` (port 443) or `host:port`; an IPv6 address in brackets, "
    "percent-encoded (`%5B::1%5D:443`).",
)
_PIN_ERRORS: dict[int, tuple[str, ...]] = {
    400: ("invalid_request",),
    404: ("pin_not_found",),
    503: ("storage_unavailable",),
}

PATHS["/api/v1/vcenter/certificate"] = {
    "get": operation(
        "The certificate a vCenter presents, as the daemon sees it",
        "Connects to the vCenter without trusting it (10 s per connection), and again "
        "as the daemon verifies vCenters (its CAs, the host name); says whether that "
        "verifies and whether a stored pin matches. What `sna-ctl vcenter trust` shows.",
        operation_id="vcenterCertificate",
        tag="vsphere",
        parameters=[
            {
                "name": "host",
                "in": "query",
                "required": True,
                "description": "`host` or `host:port` (`[v6]:port`)",
                "schema": {"type": "string", "minLength": 1},
            },
            {
                "name": "port",
                "in": "query",
                "required": False,
                "description": "the port, when `host` names none (443 otherwise)",
                "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
            },
        ],
        ok={
            200: json_body(
                answered(
                    {
                        "vcenter": STRING,
                        "host": STRING,
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "certificate": ref("VCenterCertificate"),
                        "chain": {
                            "type": "array",
                            "items": answered(
                                {
                                    "subject": nullable(STRING),
                                    "issuer": nullable(STRING),
                                    "not_after": nullable(TIME_S),
                                    "sha256": _THUMBPRINT,
                                },
                                additionalProperties=False,
                            ),
                        },
                        "verified": BOOLEAN,
                        "verify_error": nullable(STRING),
                        "trusted_by": STRING,
                        "pin": nullable(
                            answered(
                                {**_PIN_FIELDS, "matches": BOOLEAN}, additionalProperties=False
                            )
                        ),
                        "fetched_at": TIME_S,
                    },
                    additionalProperties=False,
                ),
                "The certificate, the rest of the chain the server sent, and the verdicts.",
            )
        },
        errors={
            400: ("invalid_request",),
            502: ("vcenter_unreachable",),
            503: ("storage_unavailable", "unavailable"),
            504: ("vcenter_timeout",),
        },
    )
}

PATHS["/api/v1/vcenter/pins"] = {
    "get": operation(
        "Every stored vCenter pin",
        "The pins `sna-ctl vcenter trust` stored, by host and port.",
        operation_id="listVcenterPins",
        tag="daemon",
        ok={
            200: json_body(
                answered(
                    {"pins": {"type": "array", "items": ref("VCenterPin")}, "count": COUNT},
                    additionalProperties=False,
                ),
                "The pins.",
            )
        },
        errors={503: ("storage_unavailable",)},
    )
}

PATHS["/api/v1/vcenter/pins/{vcenter}"] = {
    "get": operation(
        "A vCenter's pin",
        "The pin stored for this vCenter.",
        operation_id="getVcenterPin",
        tag="daemon",
        parameters=[_VCENTER_PARAMETER],
        ok={200: json_body(ref("VCenterPin"), "The pin.")},
        errors=_PIN_ERRORS,
    ),
    "put": operation(
        "Pin a vCenter's certificate",
        "Stores (or replaces) the thumbprint every connection to this vCenter must "
        "present when its request pins none: the vSphere routes and the backups.",
        operation_id="putVcenterPin",
        tag="daemon",
        parameters=[_VCENTER_PARAMETER],
        body=obj(
            {
                "thumbprint": {
                    "type": "string",
                    "description": "SHA-256 (64 hex digits) or SHA-1 (40), colons optional",
                }
            },
            required=["thumbprint"],
        ),
        ok={
            200: json_body(
                answered(
                    {**_PIN_FIELDS, "replaced": nullable(_THUMBPRINT)},
                    additionalProperties=False,
                ),
                "The pin stored, and the thumbprint it replaced.",
            )
        },
        errors={400: ("invalid_request",), 503: ("storage_unavailable",)},
    ),
    "delete": operation(
        "Forget a vCenter's pin",
        "Removes the pin: the vCenter is verified against the CAs again.",
        operation_id="deleteVcenterPin",
        tag="daemon",
        parameters=[_VCENTER_PARAMETER],
        ok={
            200: json_body(
                answered(
                    {**_PIN_FIELDS, "status": {"type": "string", "enum": ["removed"]}},
                    additionalProperties=False,
                ),
                "The pin removed.",
            )
        },
        errors=_PIN_ERRORS,
    ),
}


# -- Job logs: GET /api/v1/jobs/{job_id}/log. ---------------------------------------

PATHS["/api/v1/jobs/{job_id}/log"] = {
    "get": operation(
        "A job's log, in pieces, followed by long polls",
        "Whole lines of the job's log file from a byte `offset` (default: where this "
        "job's lines begin), at most 256 KiB; with `wait`, an answer that would have no "
        "line waits until one arrives or the job ends (at most 16 requests wait at "
        "once). `format=text` answers the lines as `text/plain` (for curl), with "
        "`X-Sna-Next-Offset` and `X-Sna-Log-Complete` headers; errors stay JSON.",
        operation_id="jobLog",
        tag="backups",
        parameters=[
            JOB_ID_PARAMETER,
            {
                "name": "offset",
                "in": "query",
                "description": "the byte offset to read from",
                "schema": {"type": "integer", "minimum": 0},
            },
            {
                "name": "wait",
                "in": "query",
                "description": "seconds to wait for a new line while the job runs",
                "schema": {"type": "number", "minimum": 0, "maximum": 30, "default": 0},
            },
            {
                "name": "format",
                "in": "query",
                "schema": {"type": "string", "enum": ["json", "text"], "default": "json"},
            },
        ],
        ok={
            200: {
                "description": "The lines from `offset`.",
                "headers": {
                    "X-Sna-Next-Offset": {
                        "description": "`format=text` only: the offset to ask from next",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                    "X-Sna-Log-Complete": {
                        "description": "`format=text` only: the job ended and all is read",
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                },
                "content": {
                    _JSON: {
                        "schema": answered(
                            {
                                "job_id": ref("JobId"),
                                "status": ref("JobStatus"),
                                "offset": COUNT,
                                "next_offset": COUNT,
                                "size": COUNT,
                                "lines": {"type": "array", "items": STRING},
                                "complete": BOOLEAN,
                            },
                            additionalProperties=False,
                        )
                    },
                    "text/plain; charset=utf-8": {"schema": STRING},
                },
            }
        },
        errors={
            400: ("invalid_request",),
            404: ("job_not_found",),
            410: ("job_log_gone",),
            503: ("job_log_unreadable", "too_many_waits"),
        },
    )
}

# -- the SSH tunnel to the hub (sna/tunnel) -----------------------------------

TUNNEL_STATE: Schema = {"type": "string", "enum": list(TUNNEL_STATES)}
_TUNNEL_PORT: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}

#: The ``tunnel`` of ``/api/v1/health``: configured or not, and when it is not up, why.
_HEALTH_TUNNEL: Schema = obj(
    {
        "configured": BOOLEAN,
        "state": TUNNEL_STATE,
        "since": TIME_MS,
        "reason": nullable(STRING),
        "reconnects": COUNT,
    },
    required=["configured", "state", "reason"],
    additional=False,
)
_health_answer = PATHS["/api/v1/health"]["get"]["responses"]["200"]["content"][_JSON]["schema"]
_health_answer["properties"]["tunnel"] = _HEALTH_TUNNEL
_health_answer["required"].append("tunnel")
for _example in _health_answer.get("examples", []):
    _example["tunnel"] = {
        "configured": True,
        "state": "up",
        "since": "2026-11-26T07:02:11.418Z",
        "reason": None,
        "reconnects": 0,
    }
PATHS["/api/v1/health"]["get"]["description"] += (
    " With a tunnel configured, `status` is also `degraded` while the tunnel is not `up` "
    "(`tunnel.reason` says why)."
)

PATHS["/api/v1/tunnel"] = {
    "get": operation(
        "The SSH tunnel to the hub",
        "The supervised `ssh` that forwards the hub's NBD ports and API to this node's "
        "loopback and the hub's reverse port to this API: its state, since when, the last "
        "error, how often it was restarted, where it goes and which of its forwards the hub "
        "refused. No key material. `configured: false` (state `not_configured`) on a node "
        "without a tunnel.",
        operation_id="tunnel",
        tag="daemon",
        ok={
            200: json_body(
                answered(
                    {
                        "configured": BOOLEAN,
                        "state": TUNNEL_STATE,
                        "since": nullable(TIME_MS),
                        "last_error": nullable(STRING),
                        "reconnects": COUNT,
                        "host": nullable(STRING),
                        "port": nullable(_TUNNEL_PORT),
                        "user": nullable(STRING),
                        "forwards": nullable(
                            answered(
                                {
                                    "count": COUNT,
                                    "nbd_ports": {
                                        "type": "string",
                                        "pattern": "^[0-9]+-[0-9]+$",
                                    },
                                    "sha_api_port": _TUNNEL_PORT,
                                    "reverse_port": _TUNNEL_PORT,
                                    "api_port": _TUNNEL_PORT,
                                },
                                additionalProperties=False,
                            )
                        ),
                        "refused_ports": {"type": "array", "items": _TUNNEL_PORT},
                        "authenticated": BOOLEAN,
                        "pid": nullable({"type": "integer", "minimum": 1}),
                    },
                    additionalProperties=False,
                    examples=[
                        {
                            "configured": True,
                            "state": "forward_refused",
                            "since": "2026-11-26T07:02:11.418Z",
                            "last_error": "the hub's sshd refused a connection to port 10100 "
                            "(administratively prohibited): its permitopen/PermitOpen does "
                            "not allow 127.0.0.1:10100",
                            "reconnects": 2,
                            "host": "sha.example.internal",
                            "port": 443,
                            "user": "vma_tunnel",
                            "forwards": {
                                "count": 103,
                                "nbd_ports": "10100-10200",
                                "sha_api_port": 8082,
                                "reverse_port": 9081,
                                "api_port": 8081,
                            },
                            "refused_ports": [10100],
                            "authenticated": True,
                            "pid": 4242,
                        }
                    ],
                ),
                "The tunnel's state.",
            )
        },
    )
}


# -- Enrollment with the hub (sna/enrollment) -------------------------------------

ENROLLMENT_STATE: Schema = {
    "type": "string",
    "enum": [
        "not_enrolled",
        "enrolling",
        "pending_verification",
        "awaiting_approval",
        "approved",
        "active",
        "rejected",
        "failed",
    ],
}
_ENROLLMENT_PORT: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
_SSH_FINGERPRINT: Schema = {"type": "string", "pattern": "^SHA256:[A-Za-z0-9+/]{43}$"}
_ENROLLMENT_ERRORS: dict[int, tuple[str, ...]] = {503: ("storage_unavailable",)}

PATHS["/api/v1/enrollment/enroll"] = {
    "post": operation(
        "Enroll this node with its hub",
        "Makes the node's Ed25519 key and files under `STATE-DIR/enrollment/`, stores the "
        "enrollment and answers at once; the exchange with the hub (enroll, verify once, "
        "poll the result every 5-10 s) goes on in the daemon and survives a restart: "
        "follow it at `GET /api/v1/enrollment/status`. Exactly one of `tls_ca_file`, "
        "`tls_pin_sha256` and `plain_http: true` says how the hub's enrollment URL is "
        "trusted. The pairing code is never stored, logged or answered. `409` while an "
        "enrollment is under way or done (`DELETE /api/v1/enrollment` first); a "
        "`failed` or `rejected` one is replaced.",
        operation_id="enroll",
        tag="daemon",
        body=obj(
            {
                "oma_host": text(253, required=True, description="the hub's host or IP"),
                "oma_port": {**_ENROLLMENT_PORT, "description": "443, or 8082 with plain_http"},
                "pairing_code": {
                    "type": "string",
                    "pattern": "^\\s*[\\x21-\\x7e]{1,128}\\s*$",
                    "writeOnly": True,
                    "description": "from the hub's enrollment page (XXXX-XXXX-XXXX)",
                },
                "vma_name": text(255, description="default: the host name"),
                "vma_version": text(255, description="default: sna's version"),
                "tls_ca_file": text(4096, description="absolute path of a PEM file of CAs"),
                "tls_pin_sha256": text(
                    200, description="SHA-256 of the hub's certificate (64 hex, colons optional)"
                ),
                "plain_http": {
                    "type": ["boolean", "null"],
                    "description": "true: plain HTTP (a stock hub's :8082)",
                },
                "ssh_host": text(253, description="default: oma_host"),
                "ssh_port": {**_ENROLLMENT_PORT, "description": "default 443"},
                "ssh_user": {
                    "type": ["string", "null"],
                    "pattern": "^\\s*([a-z_][a-z0-9_-]{0,31})?\\s*$",
                    "description": "default vma_tunnel",
                },
                "ssh_host_key": {
                    "type": "string",
                    "maxLength": 16384,
                    "description": "the hub's SSH host key line, `ssh-ed25519 AAAA…`",
                },
            },
            required=["oma_host", "pairing_code", "ssh_host_key"],
            additional=False,
        ),
        ok={
            202: json_body(
                answered(
                    {
                        "id": STRING,
                        "state": ENROLLMENT_STATE,
                        "since": TIME_S,
                        "hub_url": STRING,
                        "fingerprint": _SSH_FINGERPRINT,
                        "public_key": STRING,
                        "message": STRING,
                        "status_url": STRING,
                    },
                    additionalProperties=False,
                ),
                "Started: sna's enrollment id, its state (`enrolling`) and the node's key.",
            )
        },
        errors={
            400: ("invalid_request",),
            409: ("enrollment_exists", "tunnel_configured"),
            **_ENROLLMENT_ERRORS,
        },
        error_extra={"id": STRING, "state": ENROLLMENT_STATE},
    )
}

PATHS["/api/v1/enrollment/status"] = {
    "get": operation(
        "The node's enrollment with its hub",
        "Its state and since when, why it failed or was rejected (`reason`), the last "
        "error of a call being retried, the hub's enrollment id, the node's key and "
        "fingerprint, where the tunnel goes and the hub's host key fingerprint, and the "
        "tunnel's last state. `active`: the tunnel authenticated with the key. Never the "
        "pairing code. With no enrollment only `state` (`not_enrolled`), `since`, "
        "`reason` and `tunnel`.",
        operation_id="enrollmentStatus",
        tag="daemon",
        ok={
            200: json_body(
                obj(
                    {
                        "state": ENROLLMENT_STATE,
                        "since": TIME_S,
                        "reason": nullable(STRING),
                        "tunnel": nullable(STRING),
                        "last_error": nullable(STRING),
                        "id": STRING,
                        "enrollment_id": nullable(STRING),
                        "hub_url": STRING,
                        "tls_ca_file": nullable(STRING),
                        "tls_pin_sha256": nullable(STRING),
                        "plain_http": BOOLEAN,
                        "vma_name": STRING,
                        "vma_version": STRING,
                        "fingerprint": _SSH_FINGERPRINT,
                        "public_key": STRING,
                        "ssh_host": STRING,
                        "ssh_port": _ENROLLMENT_PORT,
                        "ssh_user": STRING,
                        "host_key": STRING,
                        "host_key_fingerprint": _SSH_FINGERPRINT,
                        "created_at": TIME_S,
                    },
                    required=["state", "since", "reason", "tunnel"],
                    additional=False,
                ),
                "The enrollment as it is now.",
            )
        },
    )
}

PATHS["/api/v1/enrollment"] = {
    "delete": operation(
        "Forget the enrollment",
        "Stops what the enrollment was doing and its tunnel, deletes its record and the "
        "node's key files. The hub still lists the node until its administrator revokes "
        "it. `404` when there is no enrollment.",
        operation_id="forgetEnrollment",
        tag="daemon",
        ok={
            200: json_body(
                answered(
                    {
                        "id": STRING,
                        "state": {"type": "string", "enum": ["forgotten"]},
                        "previous_state": ENROLLMENT_STATE,
                        "enrollment_id": nullable(STRING),
                        "message": STRING,
                    },
                    additionalProperties=False,
                ),
                "Forgotten.",
            )
        },
        errors={404: ("not_enrolled",), **_ENROLLMENT_ERRORS},
    )
}

# -- replication jobs (POST /api/v1/replicate; sna.jobs.replication) ------------------------

#: ``nbd_target_unreachable``'s ``targets``, as backup/start answers it.
_BACKUP_502: Schema = PATHS["/api/v1/backup/start"]["post"]["responses"]["502"]
_UNREACHABLE_TARGETS: Schema = _BACKUP_502["content"][_JSON]["schema"]["properties"]["targets"]

SCHEMAS["Job"]["properties"]["kind"] = {
    "type": "string",
    "enum": ["backup", "replication"],
    "description": "`replication`: a VM of a `POST /api/v1/replicate` request",
}
SCHEMAS["Job"]["properties"]["replication"] = nullable(
    answered(
        {
            "replication_id": ref("JobId"),
            "jobs": {"type": "array", "items": ref("JobId")},
        },
        additionalProperties=False,
        description="A replication job's request `job_id` and the jobs of that request.",
    )
)
SCHEMAS["Job"]["required"] = [*SCHEMAS["Job"]["required"], "kind", "replication"]
SCHEMAS["JobDisk"]["properties"]["previous_change_id_from"] = {
    "enum": ["request", "sha", "chain", None]
}

PATHS["/api/v1/replicate"] = {
    "post": operation(
        "Start replication jobs",
        "The Go SNA's request. One job per VM (`job_id` for one VM, `{job_id}-{n}` for "
        "several, n from 1 in `vm_paths` order), each run by the backup client like a "
        "backup into the same targets run after run: in full the first time, then from "
        "the change IDs sna keeps for each disk and target. Every VM's targets are "
        "checked and probed before any job starts: a refused request starts nothing. "
        "`/status`, `/progress`, `/jobs/{job_id}/status` and `/jobs/{job_id}/cancel` "
        "also take the request's `job_id`.",
        operation_id="replicate",
        tag="backups",
        body=obj(
            {
                "job_id": ref("JobId"),
                "vcenter": text(required=True),
                "username": text(required=True),
                "password": secret(),
                "vcenter_thumbprint": text(
                    description="SHA-1 or SHA-256 hex digest of vCenter's certificate"
                ),
                "vm_paths": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 64,
                    "items": text(required=True),
                },
                "oma_url": {
                    "type": ["string", "null"],
                    "description": "taken and not used: sna reports to its `--sha-url`",
                },
                "nbd_targets": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 256,
                    "items": obj(
                        {
                            "device_path": text(
                                required=True, description="`nbd://{host}:{port}/{export}`"
                            ),
                            "vmware_disk_key": {
                                "type": ["string", "integer"],
                                "description": "the VMware device key of the disk, e.g. 2000",
                            },
                            "vm_disk_id": {"type": ["integer", "null"]},
                            "vm_path": text(
                                description="the VM of `vm_paths` the disk is of; without it, "
                                "one VM takes every target, several one each in order"
                            ),
                        },
                        required=["device_path", "vmware_disk_key"],
                    ),
                },
            },
            required=["job_id", "vcenter", "username", "password", "vm_paths", "nbd_targets"],
            examples=[
                {
                    "job_id": "job-20261126-091203.120-a1b2c3",
                    "vcenter": "vcenter.example.local",
                    "username": "administrator@vsphere.local",
                    "password": "********",
                    "vm_paths": ["/DC1/vm/pgtest1"],
                    "oma_url": "http://127.0.0.1:8082",
                    "nbd_targets": [
                        {
                            "device_path": "nbd://127.0.0.1:10100/migration-vol-1",
                            "vm_disk_id": 0,
                            "vmware_disk_key": "2000",
                        }
                    ],
                }
            ],
        ),
        ok={
            200: json_body(
                answered(
                    {
                        "job_id": ref("JobId"),
                        "status": {"const": "started"},
                        "vm_count": {"type": "integer", "minimum": 1},
                        "started_at": TIME_S,
                        "jobs": {
                            "type": "array",
                            "items": answered(
                                {"job_id": ref("JobId"), "vm_path": STRING, "pid": INTEGER},
                                additionalProperties=False,
                            ),
                        },
                    },
                    additionalProperties=False,
                ),
                "Every VM's job runs; `jobs` names them, in `vm_paths` order.",
            )
        },
        errors={
            409: ("job_already_running", "port_in_use", "snapshot_pending"),
            500: ("backup_client_unavailable",),
            502: ("nbd_target_unreachable",),
            503: (
                "shutting_down",
                "too_many_jobs",
                "storage_unavailable",
                "nbd_target_unreachable",
            ),
        },
        error_extra={"targets": _UNREACHABLE_TARGETS},
    )
}
