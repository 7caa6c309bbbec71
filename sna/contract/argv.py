"""The client's command line and environment: what the daemon writes, what the client reads.

The daemon starts ``{sbc} migrate --vmware-endpoint=… --nbd-targets=… --job-id=…``
(the Go client's ``migrate`` flags, then sna's own) with the password in
:data:`PASSWORD_ENV`; :func:`build` and :func:`environment` make that from a
:class:`JobArguments`.  The client declares the same flags with
:func:`add_arguments` and reads them back with :func:`read`, so a value the
daemon passes is one the client takes, byte for byte.

Every value goes as one word, ``--flag=value``: a value that begins with
``-`` (a job id, a user name) can then never be taken for an option, by our
client's argparse or by the legacy Go client's pflag.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from typing import Optional

import attrs

from sna.contract import ids
from sna.contract import targets as grammar
from sna.contract.targets import NbdTarget
from sna.contract.tls import InvalidThumbprint, normalise_thumbprint

COMMAND = "migrate"
#: Where our client finds the vCenter password (the Go client takes it on argv).
PASSWORD_ENV = "SNA_VCENTER_PASSWORD"
#: The job id, for both clients (the Go client's name).
JOB_ID_ENV = "MIGRATEKIT_JOB_ID"
#: The legacy Go client's previous change ID (it never reads it, but the Go SNA set it).
LEGACY_PREVIOUS_ENV = "MIGRATEKIT_PREVIOUS_CHANGE_ID"

ENDPOINT = "--vmware-endpoint"
USER = "--vmware-username"
PASSWORD = "--vmware-password"
VM_PATH = "--vmware-path"
TARGETS = "--nbd-targets"
JOB_ID = "--job-id"
BACKUP_TYPE = "--backup-type"
PREVIOUS_CHANGE_ID = "--previous-change-id"
PREVIOUS_CHANGE_IDS = "--previous-change-ids"
PREVIOUS_CAPACITIES = "--previous-capacities"
THUMBPRINT = "--vcenter-thumbprint"
CA_FILE = "--vcenter-ca-file"
INSECURE = "--insecure"
STALL_TIMEOUT = "--stall-timeout"
#: The client's stall timeout when the daemon passes none (``--stall-timeout``).
DEFAULT_STALL_TIMEOUT = 600.0

BACKUP_TYPES = ("full", "incremental")


class ArgumentError(ValueError):
    """A value the client cannot take; the message names the flag and says why."""


@attrs.frozen
class JobArguments:
    """One job as the client is told it.  The password is in no repr."""

    endpoint: str
    user: str
    password: str = attrs.field(repr=False)
    vm_path: str
    #: Empty: the Go client's single-disk mode (``--nbd-host`` and friends).
    targets: tuple[NbdTarget, ...]
    job_id: str
    #: None: the Go client's way (incremental wherever a usable change ID exists).
    backup_type: Optional[str] = None
    previous_change_id: Optional[str] = None
    #: Per target key.
    previous_change_ids: tuple[tuple[str, str], ...] = ()
    previous_capacities: tuple[tuple[str, int], ...] = ()
    thumbprint: Optional[str] = None
    ca_file: Optional[str] = None
    insecure: bool = False
    #: Seconds without progress after which the client gives up (None: its default).
    stall_timeout: Optional[float] = None


def option(name: str, value: str) -> str:
    """``--name=value``, one argv word."""
    return f"{name}={value}"


def option_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of ``name`` in ``argv``, written ``--name=value`` or ``--name value``."""
    prefix = name + "="
    for index, word in enumerate(argv):
        if word.startswith(prefix):
            return word[len(prefix) :]
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
    return None


def format_seconds(value: float) -> str:
    """Seconds as a flag's value: ``600``, ``2.5`` (what :func:`seconds` reads back)."""
    return f"{value:g}" if value == int(value) and abs(value) < 1e15 else repr(value)


def seconds(text: str) -> float:
    """A flag's value in seconds: a finite number above zero (``argparse`` type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _json(pairs: Sequence[tuple[str, object]]) -> str:
    return json.dumps(dict(pairs), separators=(",", ":"), ensure_ascii=False)


def build(job: JobArguments, legacy: bool = False) -> list[str]:
    """The words after the program: ``migrate`` and the flags.

    ``legacy``: the Go client's exact flags, the password among them (it
    reads it nowhere else), and nothing of sna's own.
    """
    values = [(ENDPOINT, job.endpoint), (USER, job.user)]
    if legacy:
        values.append((PASSWORD, job.password))
    values += [
        (VM_PATH, job.vm_path),
        (TARGETS, grammar.format_targets(job.targets)),
        (JOB_ID, job.job_id),
    ]
    flags: list[str] = []
    if not legacy:
        if job.backup_type is not None:
            values.append((BACKUP_TYPE, job.backup_type))
        if job.previous_change_id:
            values.append((PREVIOUS_CHANGE_ID, job.previous_change_id))
        if job.previous_change_ids:
            values.append((PREVIOUS_CHANGE_IDS, _json(job.previous_change_ids)))
        if job.previous_capacities:
            values.append((PREVIOUS_CAPACITIES, _json(job.previous_capacities)))
        if job.thumbprint:
            values.append((THUMBPRINT, job.thumbprint))
        if job.insecure:
            flags.append(INSECURE)
        if job.ca_file:
            values.append((CA_FILE, job.ca_file))
        if job.stall_timeout is not None:
            values.append((STALL_TIMEOUT, format_seconds(job.stall_timeout)))
    return [COMMAND, *(option(name, value) for name, value in values), *flags]


def environment(job: JobArguments, legacy: bool = False) -> dict[str, str]:
    """The variables a job adds to a client's environment."""
    env = {JOB_ID_ENV: job.job_id}
    if legacy:
        if job.previous_change_id:
            env[LEGACY_PREVIOUS_ENV] = job.previous_change_id
    else:
        env[PASSWORD_ENV] = job.password
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags :func:`build` writes (the client adds its own beside them)."""
    parser.add_argument(ENDPOINT, required=True, help="vCenter: host, host:port or URL")
    parser.add_argument(USER, required=True)
    parser.add_argument(
        PASSWORD, help=f"ignored when {PASSWORD_ENV} is set (argv is visible to every user)"
    )
    parser.add_argument(VM_PATH, required=True, help="the VM's inventory path, /DC/vm/name")
    parser.add_argument(TARGETS, default="", help="{disk_key}:nbd://host:port/export,...")
    parser.add_argument(JOB_ID, default="", help=f"the job (default: ${JOB_ID_ENV})")
    parser.add_argument(BACKUP_TYPE, choices=BACKUP_TYPES)
    parser.add_argument(PREVIOUS_CHANGE_ID, help="the base of an incremental, for every disk")
    parser.add_argument(
        PREVIOUS_CHANGE_IDS,
        help='JSON object by target key, e.g. {"2000": "52 .../7"}; wins over '
        f"{PREVIOUS_CHANGE_ID}",
    )
    parser.add_argument(
        PREVIOUS_CAPACITIES,
        help='JSON object by target key, e.g. {"2000": 268435456}: each disk\'s capacity '
        "when its previous change ID was taken (a resized disk is copied in full)",
    )
    parser.add_argument(THUMBPRINT, help="pin vCenter's certificate (SHA-1 or SHA-256)")
    parser.add_argument(CA_FILE, help="PEM file of CAs to trust for vCenter, besides the system's")
    parser.add_argument(INSECURE, action="store_true", help="do not verify vCenter's certificate")
    parser.add_argument(
        STALL_TIMEOUT,
        type=seconds,
        help="seconds without progress (no byte copied, no answer from vCenter) after which "
        f"the run gives up (default {DEFAULT_STALL_TIMEOUT:g})",
    )


def _by_target_key(text: Optional[str], flag: str) -> dict[str, object]:
    """A JSON object by target key (``{"2000": …}``); null values left out."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ArgumentError(f"{flag} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ArgumentError(f"{flag} must be a JSON object by target key")
    found: dict[str, object] = {}
    for raw, item in value.items():
        key = grammar.parse_disk_key(str(raw))
        if key is None:
            raise ArgumentError(f"{flag}: disk key {str(raw)!r} is not a number like 2000")
        if item is not None:
            found[key] = item
    return found


def read(args: argparse.Namespace, environ: Mapping[str, str]) -> JobArguments:
    """The job :func:`add_arguments`' flags and ``environ`` describe (:class:`ArgumentError`)."""
    password = environ.get(PASSWORD_ENV) or args.vmware_password
    if not password:
        raise ArgumentError(f"no vCenter password: set {PASSWORD_ENV}")
    # Byte for byte, as the daemon and the SHA have it: never stripped.
    job_id = args.job_id or environ.get(JOB_ID_ENV, "")
    if not job_id:
        raise ArgumentError(f"no job id: pass {JOB_ID} or set {JOB_ID_ENV}")
    try:
        ids.check_job_id(job_id)
    except ids.InvalidJobId as e:
        raise ArgumentError(f"{JOB_ID}: {e}") from None
    targets: tuple[NbdTarget, ...] = ()
    if args.nbd_targets.strip():
        try:
            targets = grammar.parse_targets(args.nbd_targets, lenient=True)
        except grammar.TargetError as e:
            raise ArgumentError(f"{TARGETS} {e}") from None
    thumbprint = None
    if args.vcenter_thumbprint:
        try:
            thumbprint = normalise_thumbprint(args.vcenter_thumbprint)
        except InvalidThumbprint as e:
            raise ArgumentError(f"{THUMBPRINT}: {e}") from None
    change_ids = _by_target_key(args.previous_change_ids, PREVIOUS_CHANGE_IDS)
    for key, change_id in change_ids.items():
        if not isinstance(change_id, str):
            raise ArgumentError(f"{PREVIOUS_CHANGE_IDS}: the value for {key} is not a string")
    capacities = _by_target_key(args.previous_capacities, PREVIOUS_CAPACITIES)
    for key, capacity in capacities.items():
        if type(capacity) is not int or capacity <= 0:
            raise ArgumentError(f"{PREVIOUS_CAPACITIES}: the value for {key} is not a size")
    return JobArguments(
        endpoint=args.vmware_endpoint,
        user=args.vmware_username,
        password=password,
        vm_path=args.vmware_path,
        targets=targets,
        job_id=job_id,
        backup_type=args.backup_type,
        # As the daemon has it (a blank one is none): never rewritten.
        previous_change_id=args.previous_change_id
        if (args.previous_change_id or "").strip()
        else None,
        previous_change_ids=tuple(sorted((k, str(v)) for k, v in change_ids.items())),
        previous_capacities=tuple(
            sorted((k, v) for k, v in capacities.items() if isinstance(v, int))
        ),
        thumbprint=thumbprint,
        ca_file=args.vcenter_ca_file,
        insecure=bool(args.insecure),
        stall_timeout=args.stall_timeout,
    )
