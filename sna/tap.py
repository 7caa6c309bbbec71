"""``twistd sna``: the command-line options and the wiring of the service tree.

``makeService`` only builds objects; nothing is opened, bound or spawned until
the service starts.  This is the one module that touches the global reactor,
and only as a default.
"""

from __future__ import annotations

import re
import time
from typing import Any, Optional

from twisted.application import strports
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath

from sna import __version__
from sna.api.app import SnaAPI
from sna.api.auth import BearerTokenAuthorization, read_token
from sna.api.http import make_site
from sna.config import ConfigError, PortRange, Settings, parse_hosts
from sna.jobs.manager import JobManager
from sna.jobs.model import utcnow
from sna.jobs.store import SQLiteJobStore
from sna.sbc.process import ClientCommand, LogDirectory, ProcessLauncher
from sna.service import SnaService

log = Logger()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be above 0")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the Sendense Node Appliance control daemon: the HTTP API the SHA calls "
        "to start backups, and the supervisor of one backup-client process per job."
    )
    optFlags = [
        ["sbc-legacy", None, "The backup client is the legacy Go binary (password on argv)."],
    ]
    optParameters = [
        [
            "listen",
            None,
            "tcp:8081:interface=127.0.0.1",
            "API endpoint (Twisted endpoint string).",
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
        ["nbd-ports", None, "10100-10200", "Allowed NBD target ports, LOW-HIGH."],
        [
            "nbd-hosts",
            None,
            "127.0.0.1,::1,localhost",
            "Allowed NBD hosts, comma-separated.",
        ],
        ["max-jobs", None, 8, "Most backup jobs running at once.", _positive_int],
        [
            "kill-grace",
            None,
            30.0,
            "Seconds between SIGTERM and SIGKILL when stopping a client.",
            _positive_float,
        ],
    ]

    def opt_version(self) -> None:
        print(f"sna {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self["nbd-ports"] = PortRange.parse(self["nbd-ports"], "--nbd-ports")
            self["nbd-hosts"] = parse_hosts(self["nbd-hosts"], "--nbd-hosts")
        except ConfigError as e:
            raise usage.UsageError(e.message) from None
        if self["auth-token-file"] is not None:
            try:
                self["auth-token"] = read_token(self["auth-token-file"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--auth-token-file: {e}") from None
        else:
            self["auth-token"] = None
        try:
            self["sbc"] = ClientCommand.parse(self["sbc"], legacy=bool(self["sbc-legacy"]))
        except ValueError as e:
            raise usage.UsageError(f"--sbc: {e}") from None


def makeService(config: Options, reactor: Optional[Any] = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    state_dir = FilePath(config["state-dir"]).asTextMode()
    log_dir = LogDirectory(FilePath(config["log-dir"]).asTextMode(), state_dir.child("log"))
    settings = Settings(
        max_jobs=config["max-jobs"],
        nbd_ports=config["nbd-ports"],
        nbd_hosts=config["nbd-hosts"],
        kill_grace=config["kill-grace"],
    )
    store = SQLiteJobStore(state_dir.child("sna.sqlite"))
    launcher = ProcessLauncher(reactor, reactor, config["sbc"], log_dir, utcnow)
    manager = JobManager(store, launcher, reactor, settings, utcnow)
    api = SnaAPI(manager, utcnow, time.monotonic)
    service = SnaService(manager, store, state_dir, log_dir)
    resource = api.resource()
    if config["auth-token"] is not None:
        resource = BearerTokenAuthorization(resource, config["auth-token"])
    elif not _loopback_only(config["listen"]):
        log.warn(
            "the API listens on {listen} without --auth-token-file: anyone who reaches it "
            "can start backups",
            listen=config["listen"],
        )
    strports.service(config["listen"], make_site(resource), reactor=reactor).setServiceParent(
        service
    )
    return service


def _loopback_only(description: str) -> bool:
    """Whether an endpoint string binds loopback (or a UNIX socket) only."""
    kind, _, rest = description.partition(":")
    if kind in ("unix", "systemd"):
        return True
    for part in re.split(r"(?<!\\):", rest):
        name, _, value = part.replace("\\:", ":").partition("=")
        if name == "interface":
            return value in ("127.0.0.1", "::1", "localhost") or value.startswith("127.")
    return False
