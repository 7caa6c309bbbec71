"""The dashboard's shell: the files served at ``/`` and ``/ui/{name}``, and their headers.

:class:`Shell` serves the files of one directory (``sna/web/static`` as
installed with the package) by name.  The set of names is read once, when
first needed: a request's name is looked up in that set and never joined to
a path, so no request reaches any other file (``..``, encoded or not) and
no directory is ever listed.  Only the kinds of file in
:data:`CONTENT_TYPES` are served.

Every answer carries :data:`SECURITY_HEADERS`: the page may load scripts,
styles, images and API answers from the daemon only, runs no inline script,
cannot be framed and sends no referrer.  ``Cache-Control: no-cache`` with an
``ETag`` lets a browser keep the files and still see an upgrade at once.
"""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Optional

import attrs
from twisted.web.iweb import IRequest

__all__ = ["CONTENT_SECURITY_POLICY", "CONTENT_TYPES", "SECURITY_HEADERS", "Asset", "Shell"]

#: What the page may load, and from where: the daemon itself, nothing inline,
#: no form submission anywhere (the token form is handled by the script, so
#: that a token can never end up in a URL), no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode()),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
    (b"Cross-Origin-Resource-Policy", b"same-origin"),
    (b"Cache-Control", b"no-cache"),
)

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}

#: The names a shipped file may have: no dot first, no separator, no escape.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*(\.[a-z0-9]+)+")

#: The page served at ``/``.
INDEX = "index.html"


@attrs.frozen
class Asset:
    """One file of the shell, as it is served."""

    name: str
    body: bytes
    content_type: bytes
    etag: bytes


def _static() -> Traversable:
    return files("sna.web").joinpath("static")


class Shell:
    """The files of ``directory`` (by default the package's ``static``), served by name."""

    def __init__(self, directory: Optional[Traversable] = None) -> None:
        self._directory = directory
        self._assets: Optional[dict[str, Asset]] = None

    def assets(self) -> dict[str, Asset]:
        """Every file served, by name; read from the directory the first time."""
        if self._assets is None:
            self._assets = _read(self._directory if self._directory is not None else _static())
        return self._assets

    def asset(self, name: str) -> Optional[Asset]:
        """The file called ``name``, or None: a name is looked up, never resolved as a path."""
        return self.assets().get(name)

    def render(self, request: IRequest, asset: Asset) -> bytes:
        """Answer ``request`` with ``asset`` (or 304 when the browser's copy is current)."""
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        request.setHeader(b"ETag", asset.etag)
        wanted = request.getHeader(b"if-none-match") or b""
        if asset.etag in (tag.strip() for tag in wanted.split(b",")):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", asset.content_type)
        return asset.body


def _read(directory: Traversable) -> dict[str, Asset]:
    assets = {}
    for entry in directory.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is None or not _NAME.fullmatch(name) or not entry.is_file():
            continue
        body = entry.read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:32]
        assets[name] = Asset(name, body, content_type, f'"{digest}"'.encode())
    return assets
