"""Settings the daemon runs with, and the ones an operator may change at run time.

Startup options come from ``twistd sna`` (:mod:`sna.tap`); ``PUT /api/v1/config``
replaces the run-time subset through :meth:`Settings.updated`, which is the one
place their values are checked.  Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

DEFAULT_NBD_HOSTS = ("127.0.0.1", "::1", "localhost")


class ConfigError(ValueError):
    """A setting has a value it cannot take; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@attrs.frozen
class PortRange:
    """An inclusive range of TCP ports, written ``low-high``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, key: str = "nbd_ports") -> PortRange:
        low_text, sep, high_text = text.strip().partition("-")
        if not sep:
            low_text = high_text = low_text
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            raise ConfigError(key, f"{key} must look like 10100-10200, not {text!r}") from None
        if not (1 <= low <= high <= 65535):
            raise ConfigError(key, f"{key} must be a range of ports within 1-65535, not {text!r}")
        return cls(low, high)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


def normalise_host(host: str) -> str:
    """The form hosts are compared in: lower case, IPv6 without brackets, compressed."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_hosts(value: str | Iterable[str], key: str = "nbd_hosts") -> tuple[str, ...]:
    """Parse a comma-separated string or a list of host names and addresses."""
    items = value.split(",") if isinstance(value, str) else list(value)
    hosts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(key, f"{key} must be a list of host names or addresses")
        host = normalise_host(item)
        # Not printable: control characters (ESC...) would reach the log line
        # that records a stored setting.
        if not host or any(c.isspace() or not c.isprintable() or c in "/@?#" for c in host):
            raise ConfigError(key, f"{key} has an invalid host {item!r}")
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise ConfigError(key, f"{key} must name at least one host")
    return tuple(hosts)


def _positive_int(key: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigError(key, f"{key} must be an integer from 1 to {maximum}")
    return value


def _positive_seconds(key: str, value: object, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
        raise ConfigError(key, f"{key} must be a number of seconds above 0 and at most {maximum:g}")
    return float(value)


@attrs.frozen
class Settings:
    """The settings that can change while the daemon runs."""

    max_jobs: int = 8
    nbd_ports: PortRange = PortRange(10100, 10200)
    nbd_hosts: tuple[str, ...] = DEFAULT_NBD_HOSTS
    kill_grace: float = 30.0
    #: Finished jobs older than this many days are forgotten; 0 keeps them all.
    retention_days: int = 30
    #: Seconds an NBD target may take to answer the pre-job handshake probe.
    probe_timeout: float = 5.0

    #: Keys of ``PUT /api/v1/config`` and of the persisted copy.
    KEYS = (
        "max_jobs",
        "nbd_ports",
        "nbd_hosts",
        "kill_grace_seconds",
        "job_retention_days",
        "nbd_probe_timeout_seconds",
    )

    def updated(self, changes: Mapping[str, Any]) -> Settings:
        """A copy with ``changes`` (wire names) applied, every value checked."""
        for key in changes:
            if key not in self.KEYS:
                raise ConfigError(
                    key,
                    f"unknown configuration key: {key} (known: {', '.join(self.KEYS)})",
                )
        new = self
        if "max_jobs" in changes:
            new = attrs.evolve(new, max_jobs=_positive_int("max_jobs", changes["max_jobs"], 1024))
        if "nbd_ports" in changes:
            value = changes["nbd_ports"]
            if not isinstance(value, str):
                raise ConfigError("nbd_ports", "nbd_ports must be a string like 10100-10200")
            new = attrs.evolve(new, nbd_ports=PortRange.parse(value))
        if "nbd_hosts" in changes:
            value = changes["nbd_hosts"]
            if not isinstance(value, (str, list)):
                raise ConfigError("nbd_hosts", "nbd_hosts must be a list of host names")
            new = attrs.evolve(new, nbd_hosts=parse_hosts(value))
        if "kill_grace_seconds" in changes:
            grace = _positive_seconds("kill_grace_seconds", changes["kill_grace_seconds"], 3600)
            new = attrs.evolve(new, kill_grace=grace)
        if "nbd_probe_timeout_seconds" in changes:
            timeout = _positive_seconds(
                "nbd_probe_timeout_seconds", changes["nbd_probe_timeout_seconds"], 300
            )
            new = attrs.evolve(new, probe_timeout=timeout)
        if "job_retention_days" in changes:
            days = changes["job_retention_days"]
            if isinstance(days, bool) or not isinstance(days, int) or not 0 <= days <= 36500:
                raise ConfigError(
                    "job_retention_days",
                    "job_retention_days must be an integer from 0 (keep forever) to 36500",
                )
            new = attrs.evolve(new, retention_days=days)
        return new

    def to_json(self) -> dict[str, Any]:
        return {
            "max_jobs": self.max_jobs,
            "nbd_ports": str(self.nbd_ports),
            "nbd_hosts": list(self.nbd_hosts),
            "kill_grace_seconds": self.kill_grace,
            "job_retention_days": self.retention_days,
            "nbd_probe_timeout_seconds": self.probe_timeout,
        }
