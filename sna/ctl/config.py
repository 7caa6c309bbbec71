"""Where ``sna-ctl`` finds the daemon and its token: options, environment, config file.

Each setting comes from the first of these that gives it:

============  ======================  ==============  ==================
setting       option                  environment     config file key
============  ======================  ==============  ==================
URL           ``--url``               ``SNA_URL``     ``url``
token         ``--token-file``        ``SNA_TOKEN_FILE``, then ``SNA_TOKEN``   ``token_file``
CA file       ``--ca-file``           ``SNA_CA_FILE`` ``ca_file``
insecure      ``--insecure``                          ``insecure``
timeout       ``--timeout``                           ``timeout``
============  ======================  ==============  ==================

The token is never an option's value (argv is visible to every local user):
only a file's first line, or ``SNA_TOKEN``.  The config file is ``--config``,
else ``$XDG_CONFIG_HOME/sna/ctl.conf`` (``~/.config/sna/ctl.conf`` without
``XDG_CONFIG_HOME``), else ``/etc/sna/ctl.conf``: an INI file with one
``[sna-ctl]`` section.  A relative ``token_file`` or ``ca_file`` in it is
relative to the file's directory.  Anything wrong is :class:`UsageError`
(exit 2), named with where it came from.
"""

from __future__ import annotations

import configparser
import math
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import attrs

DEFAULT_URL = "http://127.0.0.1:8081"
#: Seconds one request may take (a long-polling log read adds its wait).
DEFAULT_TIMEOUT = 30.0
SECTION = "sna-ctl"
SYSTEM_CONFIG = Path("/etc/sna/ctl.conf")
KEYS = ("url", "token_file", "ca_file", "insecure", "timeout")


class UsageError(Exception):
    """A setting that cannot be used; the message says which, where from, and why."""


@attrs.frozen
class Settings:
    """How to reach the daemon."""

    url: str = DEFAULT_URL
    token: Optional[str] = attrs.field(default=None, repr=False)
    #: Where the token came from, for messages (never the token).
    token_source: Optional[str] = None
    ca_file: Optional[str] = None
    insecure: bool = False
    timeout: float = DEFAULT_TIMEOUT
    #: The config file read, if any.
    config_file: Optional[str] = None


def config_path(option: Optional[str], environ: Mapping[str, str]) -> Optional[Path]:
    """The config file to read: ``--config`` (which must exist), else the first that exists."""
    if option is not None:
        path = Path(option)
        if not path.is_file():
            raise UsageError(f"--config {option}: no such file")
        return path
    xdg = environ.get("XDG_CONFIG_HOME")
    user: Optional[Path]
    if xdg:
        user = Path(xdg) / "sna" / "ctl.conf"
    else:
        home = environ.get("HOME")
        user = Path(home) / ".config" / "sna" / "ctl.conf" if home else None
    for candidate in (user, SYSTEM_CONFIG):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def read_config(path: Path) -> dict[str, str]:
    """The ``[sna-ctl]`` keys of ``path``; unknown keys are refused (a typo would be ignored)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UsageError(f"cannot read the config file {path}: {reason}") from None
    if not parser.has_section(SECTION):
        return {}
    values = dict(parser.items(SECTION))
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise UsageError(
            f"{path}: unknown key {unknown[0]!r} in [{SECTION}] (known: {', '.join(KEYS)})"
        )
    return values


def check_url(url: str, source: str) -> str:
    """``url`` without a trailing ``/`` if it is an ``http(s)://host[:port]`` URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise UsageError(
            f"{source}: the daemon's URL must be http://HOST:PORT or https://HOST:PORT, not {url!r}"
        )
    return url.rstrip("/")


def read_token(path: str, source: str) -> str:
    """The first line of ``path``, stripped (as the daemon reads ``--auth-token-file``)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(64 * 1024)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UsageError(f"{source}: cannot read the token file {path}: {reason}") from None
    token = first.strip()
    if not token:
        raise UsageError(
            f"{source}: the token file {path} holds no token (its first line is empty)"
        )
    return token


def _boolean(value: str, source: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off", ""):
        return False
    raise UsageError(f"{source} must be true or false, not {value!r}")


def _seconds(value: str, source: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 < seconds <= 3600:
        raise UsageError(f"{source} must be a number of seconds above 0 and at most 3600")
    return seconds


def resolve(
    *,
    url: Optional[str] = None,
    token_file: Optional[str] = None,
    ca_file: Optional[str] = None,
    insecure: bool = False,
    timeout: Optional[str] = None,
    config: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """The settings from the options given, then ``environ``, then the config file."""
    path = config_path(config, environ)
    file = read_config(path) if path is not None else {}
    here = path.parent if path is not None else Path(".")

    def from_file(key: str) -> Optional[str]:
        value = file.get(key)
        return value if value else None

    if url is not None:
        chosen_url = check_url(url, "--url")
    elif environ.get("SNA_URL"):
        chosen_url = check_url(environ["SNA_URL"], "SNA_URL")
    elif from_file("url") is not None:
        chosen_url = check_url(file["url"], f"{path} url")
    else:
        chosen_url = DEFAULT_URL

    token: Optional[str] = None
    token_source: Optional[str] = None
    if token_file is not None:
        token, token_source = read_token(token_file, "--token-file"), f"--token-file {token_file}"
    elif environ.get("SNA_TOKEN_FILE"):
        name = environ["SNA_TOKEN_FILE"]
        token, token_source = read_token(name, "SNA_TOKEN_FILE"), f"SNA_TOKEN_FILE {name}"
    elif environ.get("SNA_TOKEN"):
        token, token_source = environ["SNA_TOKEN"].strip(), "SNA_TOKEN"
    elif from_file("token_file") is not None:
        name = str(here / file["token_file"])
        token, token_source = read_token(name, f"{path} token_file"), f"{path} token_file {name}"

    if ca_file is not None:
        chosen_ca: Optional[str] = ca_file
    elif environ.get("SNA_CA_FILE"):
        chosen_ca = environ["SNA_CA_FILE"]
    elif from_file("ca_file") is not None:
        chosen_ca = str(here / file["ca_file"])
    else:
        chosen_ca = None
    if chosen_ca is not None and not os.path.isfile(chosen_ca):
        raise UsageError(f"the CA file {chosen_ca} does not exist")

    chosen_insecure = insecure or _boolean(file.get("insecure", ""), f"{path} insecure")
    if timeout is not None:
        seconds = _seconds(timeout, "--timeout")
    elif from_file("timeout") is not None:
        seconds = _seconds(file["timeout"], f"{path} timeout")
    else:
        seconds = DEFAULT_TIMEOUT
    return Settings(
        url=chosen_url,
        token=token or None,
        token_source=token_source,
        ca_file=chosen_ca,
        insecure=chosen_insecure,
        timeout=seconds,
        config_file=str(path) if path is not None else None,
    )
