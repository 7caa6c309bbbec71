"""The client's command line, compatible with the Go client's ``migrate``.

:func:`parse_args` turns argv and the environment into :class:`JobOptions`,
raising :class:`UsageError` with a message fit for an ``error`` event.  The
Go client's flags that mean nothing here are accepted and ignored, so the
daemon can start either client with the same argv.  The password is read
from ``SNA_VCENTER_PASSWORD``; ``--vmware-password`` is used only when the
environment has none (it is visible in ``ps``).

Nothing here does I/O beyond reading the mapping it is given as environment.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Optional

import attrs

from sna.contract import argv as cli
from sna.contract import ids
from sna.contract import targets as targets_grammar
from sna.contract.targets import NbdTarget
from sna.contract.tls import TlsSettings
from sna.contract.vcenter import InvalidAddress, parse_address

PASSWORD_ENV = cli.PASSWORD_ENV
#: The Go client's default port for ``--nbd-targets`` URLs without one.
DEFAULT_NBD_PORT = 10809
MiB = 1 << 20


class UsageError(Exception):
    """The command line is wrong; the message says how."""


@attrs.frozen
class NbdAddress:
    """Where an NBD export is: TCP ``host:port`` or a Unix ``socket``."""

    export: str
    host: Optional[str] = None
    port: Optional[int] = None
    socket: Optional[str] = None

    def describe(self) -> str:
        where = f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"
        return f"{where}/{self.export}" if self.export else where


@attrs.frozen
class JobOptions:
    host: str
    port: int
    user: str
    password: str = attrs.field(repr=False)
    vm_path: str
    job_id: str
    targets: tuple[NbdTarget, ...]
    #: None: the Go client's behaviour (incremental wherever a usable previous ID exists).
    backup_type: Optional[str] = None
    previous_change_id: Optional[str] = None
    previous_change_ids: Mapping[str, str] = attrs.field(factory=dict)
    #: Per target key: the disk's capacity when its previous change ID was taken.
    previous_capacities: Mapping[str, int] = attrs.field(factory=dict)
    reader: str = "folder"
    reader_nbd: Mapping[str, NbdAddress] = attrs.field(factory=dict)
    vddk_libdir: Optional[str] = None
    nbdkit: str = "nbdkit"
    vddk_transports: str = "file:nbdssl:nbd"
    #: nbdkit-vddk's compression= (the Go client's --compression-method); None: VDDK's default.
    compression: Optional[str] = None
    tls: TlsSettings = attrs.field(factory=TlsSettings)
    quiesce: bool = False
    #: "auto", "yes" or "no": may a full leave what "*" does not report unwritten?
    target_zero: str = "auto"
    chunk_size: int = 4 * MiB
    reads_in_flight: int = 4
    max_in_flight_bytes: int = 64 * MiB
    connect_timeout: float = 30.0
    io_timeout: float = 120.0
    #: Seconds without progress before the run gives up (a copy, a vCenter task).
    stall_timeout: float = cli.DEFAULT_STALL_TIMEOUT
    #: The deadline of one vCenter call (a login, a lookup, one look at a task).
    vcenter_timeout: float = 60.0
    #: How long the client keeps trying to remove its snapshot before leaving it to sna.
    cleanup_timeout: float = 120.0
    debug: bool = False
    #: The password came from --vmware-password (visible in ps), not the environment.
    password_from_argv: bool = False

    @property
    def snapshot_name(self) -> str:
        return ids.snapshot_name(self.job_id)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def previous_for(self, disk_key: str) -> Optional[str]:
        """The previous change ID for the disk of one target key: ``--previous-change-ids`` first."""
        return self.previous_change_ids.get(disk_key, self.previous_change_id)

    def targets_zero(self) -> bool:
        """Whether fresh targets may be trusted to read as zeros (see docs/sbc-events.md)."""
        if self.target_zero == "auto":
            # The hub makes a fresh qcow2 (no backing file) for every full job and
            # an overlay on the previous backup for every incremental one.
            return self.backup_type == "full"
        return self.target_zero == "yes"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def print_help(self, file: Any = None) -> None:
        # stdout carries events only, even for --help.
        super().print_help(file or sys.stderr)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sendense-backup-client",
        description="Back up one VM's disks from a vSphere snapshot into NBD targets "
        "(JSON-line events on stdout, logs on stderr).",
        allow_abbrev=False,
    )
    p.add_argument("command", choices=[cli.COMMAND], help="the only command: run one backup")
    # What the daemon writes (sna.contract.argv): the Go client's flags, then sna's own.
    cli.add_arguments(p)
    # The Go client's other flags.
    p.add_argument("--nbd-host", default="127.0.0.1", help="single-disk mode only")
    p.add_argument("--nbd-port", type=int, default=10808, help="single-disk mode only")
    p.add_argument("--nbd-export-name", default="migration", help="single-disk mode only")
    p.add_argument(
        "--quiesce-snapshot",
        nargs="?",
        const=True,
        default=False,
        type=_bool,
        help="quiesce the snapshot (needs VMware Tools; default off)",
    )
    p.add_argument("--debug", action="store_true", help="debug logs on stderr")
    p.add_argument(
        "--compression-method",
        type=str.lower,
        choices=["none", "zlib", "fastlz", "skipz"],
        help="with --reader vddk: nbdkit-vddk's compression=",
    )
    for ignored in (
        "--availability-zone",
        "--volume-type",
        "--os-type",
        "--disk-bus-type",
        "--flavor",
        "--network-mapping",
        "--security-groups",
    ):
        p.add_argument(ignored, help=argparse.SUPPRESS)
    for ignored_flag in ("--vz-unsafe-volume-by-name", "--enable-qemu-guest-agent", "--run-v2v"):
        p.add_argument(ignored_flag, nargs="?", const="true", help=argparse.SUPPRESS)
    # The client's own.
    p.add_argument(
        "--reader",
        choices=["folder", "nbd", "vddk"],
        default="folder",
        help="folder: datastore HTTP; nbd: --reader-nbd-url sources; "
        "vddk: start nbdkit vddk per disk (needs --vddk-libdir)",
    )
    p.add_argument("--vddk-libdir", help="the VDDK library directory, for --reader vddk")
    p.add_argument("--nbdkit", default="nbdkit", help="the nbdkit program, for --reader vddk")
    p.add_argument(
        "--vddk-transports",
        default="file:nbdssl:nbd",
        help="nbdkit-vddk's transports= (SAN left out on purpose)",
    )
    p.add_argument(
        "--reader-nbd-url",
        action="append",
        default=[],
        metavar="KEY=URL",
        help="with --reader nbd: the source of disk KEY, nbd+unix:///export?socket=PATH "
        "or nbd://host:port/export (repeat per disk)",
    )
    p.add_argument(
        "--target-zero",
        choices=["auto", "yes", "no"],
        default="auto",
        help="may a full skip what CBT reports unused (targets read as zero)? "
        "auto: yes for --backup-type full",
    )
    p.add_argument("--chunk-size", type=_positive(int), default=4 * MiB)
    p.add_argument("--reads-in-flight", type=_positive(int), default=4)
    p.add_argument("--connect-timeout", type=_positive(float), default=30.0)
    p.add_argument("--io-timeout", type=_positive(float), default=120.0)
    p.add_argument(
        "--vcenter-timeout",
        type=cli.seconds,
        default=60.0,
        help="seconds one vCenter call may take (a login, a lookup, a look at a task)",
    )
    p.add_argument(
        "--cleanup-timeout",
        type=cli.seconds,
        default=120.0,
        help="seconds the client keeps retrying the removal of its snapshot (sna's "
        "janitor goes on after that)",
    )
    return p


def parse_endpoint(text: str) -> tuple[str, int]:
    """``--vmware-endpoint`` as the daemon's ``vcenter_host`` reads (:mod:`sna.contract.vcenter`)."""
    try:
        return parse_address(text, "--vmware-endpoint")
    except InvalidAddress as e:
        raise UsageError(str(e)) from None


def _disk_key(text: str, where: str) -> str:
    key = targets_grammar.parse_disk_key(text)
    if key is None:
        raise UsageError(f"{where}: disk key {text.strip()!r} is not a VMware device key like 2000")
    return key


def parse_nbd_url(url: str, where: str) -> NbdAddress:
    """``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH``; export percent-decoded."""
    parts = urllib.parse.urlsplit(url.strip())
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.scheme == "nbd":
        if parts.query or parts.fragment or parts.username:
            raise UsageError(f"{where}: {url!r} has a user, query or fragment")
        try:
            port = parts.port or DEFAULT_NBD_PORT
        except ValueError:
            raise UsageError(f"{where}: {url!r} has an invalid port") from None
        return NbdAddress(export=export, host=parts.hostname or "127.0.0.1", port=port)
    if parts.scheme == "nbd+unix":
        query = urllib.parse.parse_qs(parts.query)
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0] or parts.netloc:
            raise UsageError(f"{where}: {url!r} must be nbd+unix:///export?socket=/path")
        return NbdAddress(export=export, socket=sockets[0])
    raise UsageError(f"{where}: {url!r} is not an nbd:// or nbd+unix:// URL")


def parse_targets(text: str) -> tuple[NbdTarget, ...]:
    """``--nbd-targets``, by the daemon's grammar (:mod:`sna.contract.targets`), with the
    Go client's defaults for a URL without a host or a port."""
    try:
        return targets_grammar.parse_targets(text, lenient=True)
    except targets_grammar.TargetError as e:
        raise UsageError(f"--nbd-targets {e}") from None


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> JobOptions:
    args = build_parser().parse_args(list(argv))
    try:
        job = cli.read(args, environ)
    except cli.ArgumentError as e:
        raise UsageError(str(e)) from None
    host, port = parse_endpoint(job.endpoint)
    targets = job.targets or (
        # The Go client's single-disk mode: the one disk of the VM (checked later).
        NbdTarget("", args.nbd_host, args.nbd_port, args.nbd_export_name),
    )
    reader_nbd: dict[str, NbdAddress] = {}
    for item in args.reader_nbd_url:
        key, sep, url = item.partition("=")
        if not sep:
            raise UsageError(f"--reader-nbd-url {item!r} must be KEY=URL")
        disk_key = _disk_key(key, "--reader-nbd-url")
        reader_nbd[disk_key] = parse_nbd_url(url, f"--reader-nbd-url {disk_key}")
    if args.reader_nbd_url and args.reader != "nbd":
        raise UsageError("--reader-nbd-url needs --reader nbd")
    if args.reader == "nbd" and not reader_nbd:
        raise UsageError("--reader nbd needs a --reader-nbd-url KEY=URL per disk")
    if args.reader == "vddk" and not args.vddk_libdir:
        raise UsageError("--reader vddk needs --vddk-libdir (the VDDK library directory)")
    if int(args.chunk_size) % 4096:
        # Cuts fall at multiples of it: keep every request aligned to any target's blocks.
        raise UsageError("--chunk-size must be a multiple of 4096")
    return JobOptions(
        host=host,
        port=port,
        user=job.user,
        password=job.password,
        vm_path=job.vm_path,
        job_id=job.job_id,
        targets=targets,
        backup_type=job.backup_type,
        previous_change_id=job.previous_change_id,
        previous_change_ids=dict(job.previous_change_ids),
        previous_capacities=dict(job.previous_capacities),
        reader=args.reader,
        reader_nbd=reader_nbd,
        vddk_libdir=args.vddk_libdir,
        nbdkit=args.nbdkit,
        vddk_transports=args.vddk_transports,
        compression=args.compression_method,
        # Several may come together (the daemon adds its own --insecure or CA file to a
        # request's pin): the most specific wins, thumbprint, then --insecure, then CAs.
        tls=TlsSettings(thumbprint=job.thumbprint, ca_file=job.ca_file, insecure=job.insecure),
        quiesce=bool(args.quiesce_snapshot),
        target_zero=args.target_zero,
        chunk_size=int(args.chunk_size),
        reads_in_flight=int(args.reads_in_flight),
        connect_timeout=float(args.connect_timeout),
        io_timeout=float(args.io_timeout),
        stall_timeout=job.stall_timeout or cli.DEFAULT_STALL_TIMEOUT,
        vcenter_timeout=float(args.vcenter_timeout),
        cleanup_timeout=float(args.cleanup_timeout),
        debug=bool(args.debug),
        password_from_argv=not environ.get(cli.PASSWORD_ENV),
    )
