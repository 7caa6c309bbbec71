"""``twistd sna``: the command-line options and the wiring of the service tree.

``makeService`` only builds objects; nothing is opened, bound or spawned until
the service starts.  This is the one module that touches the global reactor,
and only as a default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import shlex
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, Optional, cast

import attrs
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, Service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent

from sna import __version__
from sna.api.app import SnaAPI
from sna.api.auth import BearerTokenAuthorization, check_secret_file, read_token
from sna.api.http import ApiSite, ConnectionLimits, make_site
from sna.api.joblog_route import JobLogs
from sna.config import ConfigError, Settings
from sna.enrollment.files import EnrollmentFiles
from sna.enrollment.routes import EnrollmentRoutes
from sna.enrollment.service import EnrollmentService
from sna.jobs.janitor import SnapshotJanitor
from sna.jobs.leftovers import LeftoverClients
from sna.jobs.manager import JobManager, PinnedLauncher
from sna.jobs.model import utcnow
from sna.jobs.store import SQLiteJobStore
from sna.nbd.gateway import NbdGateway
from sna.nbd.relay import RelayRegistry
from sna.nbd.relay.history import RelayHistory, RelayHistorySampler
from sna.sbc.command import ClientCommand, ClientUnavailable
from sna.sbc.joblog import LogDirectory
from sna.sbc.launcher import ProcessLauncher
from sna.service import CannotStart, SnaService
from sna.sha.client import QuietConnectionPool, ShaClient
from sna.sha.hub import ShaHub
from sna.telemetry.metrics import Metrics
from sna.tunnel.settings import (
    DEFAULT_REVERSE_PORT,
    DEFAULT_SHA_API_PORT,
    DEFAULT_SSH_PORT,
    DEFAULT_USER,
    TunnelSettings,
)
from sna.tunnel.supervisor import TunnelState, TunnelSupervisor, identity_problem
from sna.vmware.pins import CertificateProbe, VCenterPins
from sna.vmware.sessions import SessionPool
from sna.vmware.vsphere import VSphere

#: Threads for blocking vCenter calls: each request holds one while it runs.
VSPHERE_THREADS = 10

log = Logger()
_LIMITS = ConnectionLimits()


def _number(text: str, kind: type[int] | type[float]) -> object:
    """``text`` as a number when it is one; left as text for the settings check to refuse."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        return text


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the Sendense Node Appliance control daemon: the HTTP API the SHA calls "
        "to start backups, and the supervisor of one backup-client process per job."
    )
    optFlags = [
        ["sbc-legacy", None, "The backup client is the legacy Go binary (password on argv)."],
        [
            "vcenter-insecure",
            None,
            "Do not verify vCenter TLS certificates (labs only; a pinned thumbprint still is).",
        ],
    ]
    optParameters = [
        [
            "listen",
            None,
            "tcp:8081:interface=127.0.0.1",
            "API endpoint (Twisted endpoint string; "
            "ssl:PORT:interface=ADDR:privateKey=KEY.pem:certKey=CERT.pem for TLS).",
        ],
        ["state-dir", None, "/var/lib/sendense/sna", "Directory of the job database."],
        [
            "log-dir",
            None,
            "/var/log/sendense",
            "Directory of backup-{job_id}.log files (falls back to STATE-DIR/log).",
        ],
        [
            "auth-token-file",
            None,
            None,
            "File holding the API bearer token (required by every route but /health).",
        ],
        ["sbc", None, "sendense-backup-client", "Backup-client command (split like a shell)."],
        [
            "spare-clients",
            None,
            "1",
            "Backup clients kept started ahead of jobs (0-16; 0: none; never with --sbc-legacy).",
        ],
        [
            "sha-url",
            None,
            None,
            "Base URL of the SHA API (through the tunnel, http://127.0.0.1:8082): previous "
            "change IDs, live telemetry and per-disk completions go there.",
        ],
        [
            "sha-token-file",
            None,
            None,
            "File holding the SHA's API bearer token, sent with every request to --sha-url "
            "(its replication routes require one).",
        ],
        [
            "vcenter-ca-file",
            None,
            None,
            "PEM file of CAs to trust for vCenter, besides the system's.",
        ],
        ["nbd-ports", None, "10100-10200", "Allowed NBD target ports, LOW-HIGH."],
        [
            "nbd-hosts",
            None,
            "127.0.0.1,::1,localhost",
            "Allowed NBD hosts, comma-separated.",
        ],
        ["max-jobs", None, "8", "Most backup jobs running at once (1-1024)."],
        [
            "kill-grace",
            None,
            "30",
            "Seconds between SIGTERM and SIGKILL when stopping a client.",
        ],
        [
            "nbd-probe-timeout",
            None,
            "5",
            "Seconds an NBD target may take to answer the pre-job handshake probe.",
        ],
        [
            "stall-timeout",
            None,
            "600",
            "Seconds a backup may make no progress (no byte copied, no answer from vCenter) "
            "before its client ends it (passed to the client as --stall-timeout; /status "
            "shows the stall long before).",
        ],
        [
            "job-retention-days",
            None,
            "30",
            "Days finished jobs are kept in the job list (0: forever).",
        ],
        [
            "max-connections",
            None,
            str(_LIMITS.max_connections),
            "Most API connections open at once (1-65536); idle ones are closed to make room.",
        ],
        [
            "max-client-connections",
            None,
            str(_LIMITS.max_client_connections),
            "Most API connections open at once from one client address (1-65536).",
        ],
        [
            "request-timeout",
            None,
            f"{_LIMITS.request_timeout:g}",
            "Seconds a client may take to send a whole request, from its first byte.",
        ],
        [
            "idle-timeout",
            None,
            f"{_LIMITS.idle_timeout:g}",
            "Seconds an API connection may stay open without sending anything.",
        ],
        # The SSH tunnel to the hub, for a node keyed by hand (sna.tunnel): all or none.
        ["tunnel-host", None, None, "The hub's SSH host: run the supervised tunnel to it."],
        ["tunnel-port", None, str(DEFAULT_SSH_PORT), "The hub's SSH port."],
        ["tunnel-user", None, DEFAULT_USER, "The SSH user on the hub."],
        ["tunnel-identity", None, None, "The node's private key (OpenSSH format, mode 0600)."],
        [
            "tunnel-known-hosts",
            None,
            None,
            "known_hosts file pinning the hub's host key ([host]:port form).",
        ],
        [
            "tunnel-sha-api-port",
            None,
            str(DEFAULT_SHA_API_PORT),
            "The hub's API port, forwarded to the same port on the node's loopback.",
        ],
        [
            "tunnel-reverse-port",
            None,
            str(DEFAULT_REVERSE_PORT),
            "The port on the hub's loopback that reaches this node's API (--listen).",
        ],
        [
            "tunnel-proxy-command",
            None,
            None,
            "An ssh ProxyCommand to reach the hub through (run by /bin/sh).",
        ],
    ]

    # Option names of the run-time settings, for error messages.
    _SETTING_OPTIONS = {
        "max_jobs": "--max-jobs",
        "kill_grace_seconds": "--kill-grace",
        "job_retention_days": "--job-retention-days",
        "nbd_probe_timeout_seconds": "--nbd-probe-timeout",
        "nbd_ports": "--nbd-ports",
        "nbd_hosts": "--nbd-hosts",
    }

    def opt_version(self) -> None:
        print(f"sna {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self._settle()
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            # Under twistd, whose answer to a UsageError is its whole usage text
            # before the reason: a value we refuse is one line, as any failed start.
            raise SystemExit(f"twistd sna: {e}") from None

    def _settle(self) -> None:
        # The same checks as PUT /api/v1/config, so both accept the same values.
        try:
            self["settings"] = Settings().updated(
                {
                    "max_jobs": _number(self["max-jobs"], int),
                    "kill_grace_seconds": _number(self["kill-grace"], float),
                    "job_retention_days": _number(self["job-retention-days"], int),
                    "nbd_probe_timeout_seconds": _number(self["nbd-probe-timeout"], float),
                    "nbd_ports": self["nbd-ports"],
                    "nbd_hosts": self["nbd-hosts"],
                }
            )
        except ConfigError as e:
            option = self._SETTING_OPTIONS.get(e.key, e.key)
            raise usage.UsageError(e.message.replace(e.key, option, 1)) from None
        try:
            _check_listen(self["listen"])
        except Exception as e:  # whatever Twisted finds wrong in the operator's description
            raise usage.UsageError(f"--listen {self['listen']}: {e}") from None
        settings: Settings = self["settings"]
        self["tunnel"] = _tunnel_settings(self, settings)
        if self["tunnel"] is not None and self["sha-url"] is None:
            self["sha-url"] = f"http://127.0.0.1:{self['tunnel'].sha_api_port}"
        elif self["sha-url"] is None and EnrollmentFiles.under(self["state-dir"]).enrolled():
            # An enrolled node's SHA from the start, so what the last run left for it
            # (jobs it interrupted) is told too; a first approval brings it later.
            self["sha-url"] = f"http://127.0.0.1:{DEFAULT_SHA_API_PORT}"
        self["nbd-ports"], self["nbd-hosts"] = settings.nbd_ports, settings.nbd_hosts
        self["max-jobs"], self["kill-grace"] = settings.max_jobs, settings.kill_grace
        if self["auth-token-file"] is not None:
            try:
                self["auth-token"] = read_token(self["auth-token-file"])
            except OSError as e:
                raise usage.UsageError(
                    f"--auth-token-file: cannot read {self['auth-token-file']}: {e.strerror or e}"
                ) from None
            except ValueError as e:
                raise usage.UsageError(f"--auth-token-file: {e}") from None
        else:
            self["auth-token"] = None
        if self["sha-url"] is not None:
            url = urllib.parse.urlsplit(self["sha-url"])
            if url.scheme not in ("http", "https") or not url.hostname or url.query:
                raise usage.UsageError(
                    f"--sha-url must be an http(s) URL like http://localhost:8082, "
                    f"not {self['sha-url']!r}"
                )
        self["sha-token"] = None
        if self["sha-token-file"] is not None:
            # Without --sha-url it is kept for the SHA an enrollment's tunnel brings.
            try:
                self["sha-token"] = read_token(self["sha-token-file"])
            except OSError as e:
                raise usage.UsageError(
                    f"--sha-token-file: cannot read {self['sha-token-file']}: {e.strerror or e}"
                ) from None
            except ValueError as e:
                raise usage.UsageError(f"--sha-token-file: {e}") from None
        if self["vcenter-ca-file"] is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=self["vcenter-ca-file"])
            except (OSError, ssl.SSLError) as e:
                raise usage.UsageError(f"--vcenter-ca-file: {e}") from None
        spares = _number(self["spare-clients"], int)
        if not isinstance(spares, int) or not 0 <= spares <= 16:
            raise usage.UsageError(
                f"--spare-clients must be an integer from 0 to 16, not {self['spare-clients']!r}"
            )
        self["spare-clients"] = spares
        stall = _number(self["stall-timeout"], float)
        if not isinstance(stall, float) or not math.isfinite(stall) or stall <= 0:
            raise usage.UsageError(
                f"--stall-timeout must be a positive number of seconds, "
                f"not {self['stall-timeout']!r}"
            )
        self["stall-timeout"] = stall
        self["limits"] = self._connection_limits()
        try:
            self["sbc"] = ClientCommand.parse(self["sbc"], legacy=bool(self["sbc-legacy"]))
        except ValueError as e:
            raise usage.UsageError(f"--sbc: {e}") from None

    def _connection_limits(self) -> ConnectionLimits:
        counts = {}
        for option in ("max-connections", "max-client-connections"):
            value = _number(self[option], int)
            if not isinstance(value, int) or not 1 <= value <= 65536:
                raise usage.UsageError(
                    f"--{option} must be an integer from 1 to 65536, not {self[option]!r}"
                )
            counts[option] = value
        if counts["max-client-connections"] > counts["max-connections"]:
            raise usage.UsageError("--max-client-connections must not exceed --max-connections")
        seconds = {}
        for option in ("request-timeout", "idle-timeout"):
            value = _number(self[option], float)
            if not isinstance(value, float) or not 0 < value <= 3600:
                raise usage.UsageError(
                    f"--{option} must be a number of seconds above 0 and at most 3600, "
                    f"not {self[option]!r}"
                )
            seconds[option] = value
        return ConnectionLimits(
            max_connections=counts["max-connections"],
            max_client_connections=counts["max-client-connections"],
            request_timeout=seconds["request-timeout"],
            idle_timeout=seconds["idle-timeout"],
        )


#: The options that describe a tunnel, by TunnelSettings field: given together or not at all.
_TUNNEL_OPTIONS = ("tunnel-host", "tunnel-identity", "tunnel-known-hosts")


def _tunnel_settings(config: Options, settings: Settings) -> Optional[TunnelSettings]:
    """The tunnel the ``--tunnel-*`` options describe, or None when none is given."""
    given = [name for name in _TUNNEL_OPTIONS if config[name] is not None]
    if not given and config["tunnel-proxy-command"] is None:
        return None
    missing = [name for name in _TUNNEL_OPTIONS if config[name] is None]
    if missing:
        raise usage.UsageError(
            f"--{missing[0]} is required with "
            f"{', '.join('--' + n for n in given) or '--tunnel-proxy-command'}: "
            f"a tunnel needs --{', --'.join(_TUNNEL_OPTIONS)}"
        )
    ports = {}
    for name in ("tunnel-port", "tunnel-sha-api-port", "tunnel-reverse-port"):
        value = _number(config[name], int)
        if not isinstance(value, int) or not 1 <= value <= 65535:
            raise usage.UsageError(f"--{name} must be a port from 1 to 65535, not {config[name]!r}")
        ports[name] = value
    api_port = _loopback_tcp_port(config["listen"])
    if api_port is None:
        raise usage.UsageError(
            f"--listen {config['listen']}: the tunnel's reverse forward needs the API on a "
            "loopback TCP port (like tcp:8081:interface=127.0.0.1)"
        )
    problem = identity_problem(config["tunnel-identity"])
    if problem is not None:
        raise usage.UsageError(f"--tunnel-identity: {problem}")
    if not os.access(config["tunnel-known-hosts"], os.R_OK):
        raise usage.UsageError(f"--tunnel-known-hosts: cannot read {config['tunnel-known-hosts']}")
    host = config["tunnel-host"]
    if not host or host.startswith("-") or any(c.isspace() or not c.isprintable() for c in host):
        raise usage.UsageError(f"--tunnel-host must be a host name or address, not {host!r}")
    if ports["tunnel-sha-api-port"] in settings.nbd_ports:
        raise usage.UsageError("--tunnel-sha-api-port must not be one of --nbd-ports")
    return TunnelSettings(
        host=host,
        identity=os.path.abspath(config["tunnel-identity"]),
        known_hosts=os.path.abspath(config["tunnel-known-hosts"]),
        api_port=api_port,
        port=ports["tunnel-port"],
        user=config["tunnel-user"],
        nbd_ports=settings.nbd_ports,
        sha_api_port=ports["tunnel-sha-api-port"],
        reverse_port=ports["tunnel-reverse-port"],
        proxy_command=config["tunnel-proxy-command"],
    )


def _loopback_tcp_port(description: str) -> Optional[int]:
    """The port of a ``tcp:`` endpoint bound to 127.0.0.1, else None (the hub speaks plain HTTP)."""
    args, kwargs = endpoint_arguments(description)
    kind = args[0].lower() if args else ""
    if kind != "tcp" or not _loopback_only(description):
        return None
    given = dict(zip(_ENDPOINT_PARAMETERS[kind], args[1:], strict=False))
    interface = kwargs.get("interface", given.get("interface", ""))
    port = _number(kwargs.get("port", given.get("port", "")), int)
    if interface != "127.0.0.1" or not isinstance(port, int):
        return None
    return port if 1 <= port <= 65535 else None


def makeService(config: Options, reactor: Optional[Any] = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    state_dir = FilePath(config["state-dir"]).asTextMode()
    log_dir = LogDirectory(FilePath(config["log-dir"]).asTextMode(), state_dir.child("log"))
    settings: Settings = config["settings"]
    store = SQLiteJobStore(state_dir.child("sna.sqlite"))
    command = attrs.evolve(
        config["sbc"],
        insecure=bool(config["vcenter-insecure"]),
        ca_file=config["vcenter-ca-file"],
        stall_timeout=config["stall-timeout"],
    )
    launcher = ProcessLauncher(
        reactor, reactor, command, log_dir, utcnow, spares=config["spare-clients"]
    )
    relays = RelayRegistry()
    # Always there, "not_configured" without settings: an enrollment gives it some later.
    tunnel = TunnelSupervisor(reactor, config["tunnel"], now=utcnow)
    metrics = Metrics(
        lambda: manager.counts(),
        relays,
        launcher.spares.counts if launcher.spares is not None else None,
        store.outbox_counts if config["sha-url"] else None,
        jobs=lambda: manager.jobs(),
        tunnel=tunnel.state,
        snapshots_pending=lambda: len(manager.snapshots_pending()),
    )
    pool = ThreadPool(minthreads=0, maxthreads=VSPHERE_THREADS, name="sna-vsphere")
    # vCenter certificates operators pinned (sna-ctl vcenter trust): used by the
    # sessions and the backups of requests that pin none themselves.
    pins = VCenterPins(store, utcnow)
    certificates = CertificateProbe(
        cast(IReactorFromThreads, reactor), reactor, pool, ca_file=config["vcenter-ca-file"]
    )
    sessions = SessionPool(
        cast(IReactorFromThreads, reactor),
        pool,
        insecure=bool(config["vcenter-insecure"]),
        ca_file=config["vcenter-ca-file"],
        pins=pins.thumbprint_for,
    )
    vsphere = VSphere(sessions)

    def make_hub(url: str) -> ShaHub:
        return ShaHub(
            ShaClient(HTTPClient(_sha_agent(reactor)), url, reactor, token=config.get("sha-token")),
            store,
            reactor,
            utcnow,
            running=lambda: manager.active_jobs(),
            legacy=command.legacy,
            on_answer=metrics.sha_answered,
        )

    hub = make_hub(config["sha-url"]) if config["sha-url"] else None
    janitor = SnapshotJanitor(
        vsphere,
        reactor,
        utcnow,
        lambda *change: manager.snapshot_changed(*change),
        # As POST /cleanup does: a VM a job is backing up now is left alone.
        vm_busy=lambda vm_path: next(
            (job.job_id for job in manager.active_jobs() if job.vm_path == vm_path), None
        ),
    )
    manager = JobManager(
        store,
        PinnedLauncher(launcher, pins, utcnow),
        reactor,
        settings,
        utcnow,
        gateway=NbdGateway(reactor, relays, tunnel_down=tunnel.down_reason),
        on_probe_failure=metrics.probe_failed,
        janitor=janitor,
        hub=hub,
        leftovers=LeftoverClients(reactor),
        on_job_ended=metrics.job_ended,
    )
    # The relays' throughput over the last minutes, for the dashboard's chart.
    relay_history = RelayHistory(relays, reactor, utcnow)
    # Enrollment with the hub (sna/enrollment): its state in the job database, the
    # node's key under STATE-DIR/enrollment.  An approved enrollment is handed to the
    # tunnel (its ``use``); the tunnel's states come back (``up`` makes it active).
    enrollment = EnrollmentService(
        store,
        EnrollmentFiles.under(state_dir.path),
        reactor,
        utcnow,
        api_port=_api_port(config["listen"]),
        nbd_ports=lambda: manager.settings.nbd_ports,
        use_tunnel=lambda settings: enrolled_tunnel(settings),
        tunnel_by_hand=config["tunnel"].host if config["tunnel"] is not None else None,
    )

    def tunnel_changed(state: TunnelState) -> None:
        # Only the enrollment's own tunnel speaks for it; its first login with the
        # enrollment's key is what makes it active, even if a forward is refused.
        if state.settings is not None and state.settings.enrollment_id is not None:
            enrollment.tunnel_changed(state.state, authenticated=state.authenticated)

    tunnel.subscribe(tunnel_changed)

    def enrolled_tunnel(settings: Optional[TunnelSettings]) -> object:
        # Without --sha-url, the SHA is the one at the end of the enrollment's tunnel,
        # as it is for a tunnel given by options: from the next job on.
        if settings is not None and manager.hub is None:
            url = f"http://127.0.0.1:{settings.sha_api_port}"
            log.info("the SHA is at {url}, through the enrolled node's tunnel", url=url)
            manager.hub = make_hub(url)
            service.attach_hub(manager.hub)
        return tunnel.use(settings)

    api = SnaAPI(
        manager,
        utcnow,
        time.monotonic,
        metrics,
        vsphere,
        on_credentials=janitor.offer,
        pins=pins,
        certificates=certificates,
        relay_history=relay_history,
        job_logs=JobLogs(log_dir, manager.get, reactor),
        tunnel=tunnel,
        enrollment=EnrollmentRoutes(enrollment),
    )
    service = SnaService(manager, store, state_dir, log_dir, pool, vsphere, reactor, hub)
    tunnel.setServiceParent(service)  # type: ignore[no-untyped-call]
    janitor.setServiceParent(service)  # type: ignore[no-untyped-call]
    pins.setServiceParent(service)  # type: ignore[no-untyped-call]
    enrollment.setServiceParent(service)  # type: ignore[no-untyped-call]
    sampler = RelayHistorySampler(relay_history, reactor)
    sampler.setServiceParent(service)  # type: ignore[no-untyped-call]
    if launcher.spares is not None:
        launcher.spares.setServiceParent(service)  # type: ignore[no-untyped-call]
    resource = api.resource()
    if config["auth-token"] is not None:
        resource = BearerTokenAuthorization(resource, config["auth-token"])
    elif not _loopback_only(config["listen"]):
        log.warn(
            "the API listens on {listen} without --auth-token-file: anyone who reaches it "
            "can start backups",
            listen=config["listen"],
        )
    site = make_site(resource, config["limits"], reactor)
    listening = ApiListener(config["listen"], site, reactor)
    listening.setServiceParent(service)  # type: ignore[no-untyped-call]
    # Last: logged once the port is bound and the directories are settled.
    spares = config["spare-clients"] if launcher.spares is not None else 0
    start_line = StartLine(config, command, spares, state_dir.path, log_dir)
    start_line.setServiceParent(service)  # type: ignore[no-untyped-call]
    return service


#: The API port the hub's reverse forward targets when --listen names none (a UNIX socket).
_DEFAULT_API_PORT = 8081


def _api_port(description: str) -> int:
    """The TCP port ``--listen`` binds: where an enrolled node's reverse forward points."""
    args, kwargs = endpoint_arguments(description)
    if args and args[0].lower() in _ENDPOINT_PARAMETERS:
        text = kwargs.get("port", args[1] if len(args) > 1 else "")
        if text.isdigit() and 0 < int(text) < 65536:
            return int(text)
    log.warn(
        "--listen {listen} is not a TCP port: an enrolled node's tunnel points the hub at "
        "port {port}",
        listen=description,
        port=_DEFAULT_API_PORT,
    )
    return _DEFAULT_API_PORT


def _sha_agent(reactor: Any) -> Agent:
    """An Agent as ``Agent(reactor)`` makes, whose connections are not logged one by one."""
    return Agent(reactor, pool=QuietConnectionPool(reactor, persistent=False))


class StartLine(Service):
    """Says what the daemon runs with, once it listens: the first line to read in its log."""

    log = Logger()

    def __init__(
        self,
        config: Options,
        command: ClientCommand,
        spares: int,
        state_dir: str,
        log_dir: LogDirectory,
    ) -> None:
        self._config = config
        self._command = command
        self._spares = spares
        self._state_dir = state_dir
        self._log_dir = log_dir

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        config, command = self._config, self._command
        problem = None
        try:
            client = shlex.join([command.executable(), *command.argv[1:]])
        except ClientUnavailable as e:
            client, problem = shlex.join(command.argv), str(e)
        auth = config["auth-token"] is not None
        sha_url = config["sha-url"]
        sha_text = f"the SHA at {sha_url}" if sha_url else "no --sha-url: the SHA is told nothing"
        self.log.info(
            "sna {version} started: API on {listen} ({auth_text}); backup client {client} "
            "({client_kind}, {spares} spare(s)); state in {state_dir}, job logs in {job_log_dir}; "
            "{sha_text}",
            version=__version__,
            listen=config["listen"],
            auth=auth,
            auth_text="bearer token required" if auth else "no token: --auth-token-file not given",
            client=client,
            legacy=command.legacy,
            client_kind="the legacy Go client" if command.legacy else "sna's own client",
            spares=self._spares,
            state_dir=self._state_dir,
            job_log_dir=self._log_dir.current.path,  # log_* keys are twisted.logger's
            sha_url=sha_url,
            sha_text=sha_text,
        )
        if problem is not None:
            self.log.error(
                "{problem}: every backup/start answers 500 backup_client_unavailable "
                "until it can be run",
                problem=problem,
            )


class ApiListener(StreamServerEndpointService):
    """The API's endpoint: a port that cannot be bound stops the start with one line."""

    def __init__(self, description: str, factory: ApiSite, reactor: Any) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            endpoints.serverFromString(reactor, description), factory
        )
        self.description = description
        # As strports.service: fail in startService, not later in a logged Deferred.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        # twistd binds here, before dropping privileges; startService binds if not yet.
        with self._one_line():
            super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        with self._one_line():
            super().startService()  # type: ignore[no-untyped-call]

    @contextlib.contextmanager
    def _one_line(self) -> Iterator[None]:
        try:
            yield
        except CannotListenError as e:
            error = e.socketError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise CannotStart(f"cannot listen on {self.description}: {reason}") from None


#: Positional parameters of the server endpoint types that can bind a network
#: interface, in Twisted's order (``twisted.internet.endpoints``), and the
#: interface each binds when none is given (every one).
_ENDPOINT_PARAMETERS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": (
        "port",
        "privateKey",
        "certKey",
        "sslmethod",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
    ),
}
_DEFAULT_INTERFACES = {"tcp": "", "tcp6": "::", "ssl": ""}


def endpoint_arguments(description: str) -> tuple[list[str], dict[str, str]]:
    """An endpoint description's positional and keyword arguments, as Twisted reads them.

    ``:`` separates arguments, the first ``=`` of one makes it a keyword,
    ``\\`` escapes the next character, and a keyword given twice keeps its
    last value (``twisted.internet.endpoints._parse``).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current: list[str] = []
    key: Optional[str] = None
    chars = iter(description)

    def done() -> None:
        if key is None:
            args.append("".join(current))
        else:
            kwargs[key] = "".join(current)

    for char in chars:
        if char == ":":
            done()
            current, key = [], None
        elif char == "=" and key is None:
            key, current = "".join(current), []
        elif char == "\\":
            current.append(next(chars, ""))
        else:
            current.append(char)
    done()
    return args, kwargs


def _check_listen(description: str) -> None:
    """Raise what is wrong with ``--listen`` now, not as a traceback from makeService.

    Twisted reads an ``ssl:`` endpoint's key and certificate as it parses the
    description; the key must be as protected as the token file.
    """
    args, kwargs = endpoint_arguments(description)
    if args and args[0] == "ssl":
        given = dict(zip(_ENDPOINT_PARAMETERS["ssl"], args[1:], strict=False))
        key = kwargs.get("privateKey", given.get("privateKey", "server.pem"))
        with open(key, "rb") as f:
            check_secret_file(key, os.fstat(f.fileno()))
    # Parsing stores the reactor and binds nothing.
    endpoints.serverFromString(cast(Any, None), description)


def _loopback_address(interface: str) -> bool:
    if interface.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _loopback_only(description: str) -> bool:
    """Whether an endpoint description binds loopback (or a UNIX socket) only.

    The description is read as Twisted reads it (:func:`endpoint_arguments`):
    ``tcp:8081:interface=127.0.0.1:interface=0.0.0.0`` binds 0.0.0.0.  Any
    type this does not know (``systemd:``, plugins) counts as not loopback.
    """
    args, kwargs = endpoint_arguments(description)
    kind = args[0].lower() if args else ""
    if kind == "unix":
        return True
    parameters = _ENDPOINT_PARAMETERS.get(kind)
    if parameters is None:
        return False
    given = dict(zip(parameters, args[1:], strict=False))
    if len(args) - 1 > len(parameters) or set(given) & set(kwargs):
        return False  # Twisted refuses it at start anyway
    interface = kwargs.get("interface", given.get("interface", _DEFAULT_INTERFACES[kind]))
    return _loopback_address(interface)
