"""Trusting a vCenter by a stored pin: what ``sna-ctl vcenter trust`` shows and leaves behind.

A pin is a vCenter (host and port) and the thumbprint of the certificate an
operator looked at and confirmed.  The SHA never sends ``vcenter_thumbprint``,
so without pins a vCenter with a self-signed certificate needs
``--vcenter-insecure`` or a CA file; with one, every connection to that
vCenter that pins nothing itself is checked against the stored pin:

- the vSphere routes and the snapshot janitor, through
  :class:`~sna.vmware.sessions.SessionPool` (its ``pins``);
- backups, whose client gets the pin as ``--vcenter-thumbprint``
  (:class:`sna.jobs.manager.PinnedLauncher`, which says so in the job log).

A thumbprint a request gives always wins over the stored pin.

:class:`VCenterPins` keeps the pins in memory, read once from the job
database (:class:`~sna.jobs.store.IPinStore`) and written through to it.
:class:`CertificateProbe` fetches the certificate a vCenter presents without
trusting it, and whether the daemon's CAs would: blocking sockets, on the
thread pool, each bounded in time.  Nothing here knows HTTP.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sna.contract import vcenter
from sna.contract.tls import (
    TlsSettings,
    algorithm_of,
    normalise_thumbprint,
    ssl_context,
    thumbprints,
)
from sna.jobs.store import IPinStore, PinRow, StoreError
from sna.vmware.faults import translate
from sna.vmware.interface import Credentials, TimedOut, VSphereError

log = Logger()

#: Seconds each connection of a certificate fetch may take (connect and handshake).
PROBE_TIMEOUT = 10.0


class PinsUnavailable(VSphereError):
    """The stored pins cannot be read or written (the job database refuses)."""

    status = 503
    code = "storage_unavailable"


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets: how pins are named."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_vcenter(text: str, name: str = "vcenter") -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` (or an ``https://`` URL) as (host, port).

    The host comes back in lower case, an IPv6 address without brackets: the
    form pins are stored and looked up in.  Raises
    :class:`~sna.contract.vcenter.InvalidAddress`.
    """
    host, port = vcenter.parse_address(text, name)
    return host.lower(), port


@attrs.frozen
class Pin:
    """A vCenter's pinned certificate thumbprint (normalised, SHA-256 or SHA-1)."""

    host: str
    port: int
    thumbprint: str
    created_at: datetime

    @property
    def vcenter(self) -> str:
        return address(self.host, self.port)

    @property
    def algorithm(self) -> str:
        return algorithm_of(self.thumbprint)

    def to_json(self) -> dict[str, Any]:
        return {
            "vcenter": self.vcenter,
            "host": self.host,
            "port": self.port,
            "thumbprint": self.thumbprint,
            "algorithm": self.algorithm,
            "created_at": _seconds(self.created_at),
        }


def _seconds(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VCenterPins(Service):
    """The stored pins, by vCenter; read from ``store`` when the service starts
    (or at first use), written through to it.  Without a store they live in
    memory only.

    A store that cannot be read or written is :class:`PinsUnavailable`: a
    connection that might need a pin is refused rather than made without it.
    """

    def __init__(self, store: Optional[IPinStore], now: Callable[[], datetime]) -> None:
        self._store = store
        self._now = now
        self._pins: Optional[dict[tuple[str, int], Pin]] = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            count = len(self._loaded())
        except PinsUnavailable as e:
            log.error("{reason}; tried again at first use", reason=e.message)
            return
        if count:
            log.info("{count} vCenter certificate pin(s) stored", count=count)

    def _loaded(self) -> dict[tuple[str, int], Pin]:
        if self._pins is None:
            try:
                rows = self._store.load_pins() if self._store is not None else []
            except StoreError as e:
                raise PinsUnavailable(f"cannot read the vCenter pins: {e.message}") from e
            self._pins = {
                (row.host, row.port): Pin(
                    row.host, row.port, row.thumbprint, datetime.fromisoformat(row.created_at)
                )
                for row in rows
            }
        return self._pins

    def all(self) -> list[Pin]:
        """Every pin, by host and port."""
        return [pin for _, pin in sorted(self._loaded().items())]

    def lookup(self, host: str, port: int) -> Optional[Pin]:
        return self._loaded().get((host.lower(), port))

    def thumbprint_for(self, host: str, port: int) -> Optional[str]:
        """The pinned thumbprint of this vCenter, if any (:class:`SessionPool`'s ``pins``)."""
        pin = self.lookup(host, port)
        return pin.thumbprint if pin is not None else None

    def for_address(self, text: str) -> Optional[Pin]:
        """The pin of the vCenter a backup request names (``vcenter_host``), if any.

        An address that cannot be read has none: the client refuses it anyway.
        """
        try:
            host, port = parse_vcenter(text)
        except vcenter.InvalidAddress:
            return None
        return self.lookup(host, port)

    def pin(self, host: str, port: int, thumbprint: str) -> tuple[Pin, Optional[Pin]]:
        """Store ``thumbprint`` as the pin of ``host:port``; the new pin and the one it replaced.

        Raises :class:`~sna.contract.tls.InvalidThumbprint` or :class:`PinsUnavailable`.
        """
        pins = self._loaded()
        key = (host.lower(), port)
        pin = Pin(key[0], port, normalise_thumbprint(thumbprint), self._now())
        if self._store is not None:
            row = PinRow(pin.host, pin.port, pin.thumbprint, pin.created_at.isoformat())
            try:
                self._store.save_pin(row)
            except StoreError as e:
                raise PinsUnavailable(f"cannot store the pin: {e.message}") from e
        replaced = pins.get(key)
        pins[key] = pin
        log.info(
            "vCenter {vcenter}: certificate pinned to {thumbprint}{replacing}",
            vcenter=pin.vcenter,
            thumbprint=pin.thumbprint,
            replacing=f" (replacing {replaced.thumbprint})" if replaced is not None else "",
        )
        return pin, replaced

    def forget(self, host: str, port: int) -> Optional[Pin]:
        """Remove the pin of ``host:port``; the pin removed, ``None`` if there was none."""
        pins = self._loaded()
        key = (host.lower(), port)
        if key not in pins:
            return None
        if self._store is not None:
            try:
                self._store.delete_pin(*key)
            except StoreError as e:
                raise PinsUnavailable(f"cannot remove the pin: {e.message}") from e
        pin = pins.pop(key)
        log.info(
            "vCenter {vcenter}: the pin {thumbprint} is removed",
            vcenter=pin.vcenter,
            thumbprint=pin.thumbprint,
        )
        return pin


# -- the certificate a vCenter presents ---------------------------------------------


@attrs.frozen
class Presented:
    """What a vCenter's TLS handshake showed, and whether the daemon's CAs trust it."""

    host: str
    port: int
    #: The server's certificate (DER), then the rest of the chain it sent, in its order.
    chain: tuple[bytes, ...]
    #: Why the daemon's CAs (and host name check) do not accept it; ``None``: they do.
    verify_error: Optional[str]
    #: What it was verified against, in words.
    trusted_by: str

    @property
    def certificate(self) -> bytes:
        return self.chain[0]


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, its own first, as DER.

    Python 3.13 has ``get_unverified_chain``; 3.11 and 3.12 have it on the
    socket's ``_sslobj`` only.  Without either, the server's own certificate.
    """
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return [bytes(der) for der in public()]
    inner = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if inner is not None:
        der_encoding = getattr(ssl, "ENCODING_DER", 2)
        return [certificate.public_bytes(der_encoding) for certificate in inner() or ()]
    own = tls.getpeercert(binary_form=True)
    return [own] if own else []


def read_chain(host: str, port: int, timeout: float) -> list[bytes]:
    """The certificate chain ``host:port`` presents, trusting nothing; blocking."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            chain = _unverified_chain(tls)
            own = tls.getpeercert(binary_form=True)
    if own and (not chain or chain[0] != own):
        chain.insert(0, own)
    if not chain:
        raise ssl.SSLError(f"vCenter {address(host, port)} presented no certificate")
    return chain


def verify_error(host: str, port: int, ca_file: Optional[str], timeout: float) -> Optional[str]:
    """Why a connection verified as the daemon verifies vCenter (chain and host name,
    the system's CAs and ``ca_file``) fails; ``None`` when it succeeds.  Blocking."""
    context = ssl_context(TlsSettings(ca_file=ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as e:
        return str(e.verify_message or e.reason or e)
    except (OSError, ssl.SSLError) as e:
        return f"could not be checked: {getattr(e, 'strerror', None) or e}"


class CertificateProbe:
    """Fetches the certificate a vCenter presents, on ``pool``, within ``timeout`` per
    connection; ``ca_file`` is the daemon's ``--vcenter-ca-file``."""

    def __init__(
        self,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        pool: ThreadPool,
        ca_file: Optional[str] = None,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._pool = pool
        self._ca_file = ca_file
        self.timeout = timeout

    @property
    def trusted_by(self) -> str:
        if self._ca_file:
            return f"the system CAs and {self._ca_file}"
        return "the system CAs"

    def fetch(self, host: str, port: int) -> Deferred[Presented]:
        """The chain and whether it verifies; fails with a :class:`VSphereError`
        (:class:`~sna.vmware.interface.Unreachable`, :class:`TimedOut`)."""
        where = address(host, port)
        # Its user and password are empty; only its address reaches a message.
        credentials = Credentials(host=host, port=port, user="", password="")

        def blocking() -> Presented:
            chain = read_chain(host, port, self.timeout)
            problem = verify_error(host, port, self._ca_file, self.timeout)
            return Presented(host, port, tuple(chain), problem, self.trusted_by)

        inner = deferToThreadPool(self._reactor, self._pool, blocking)
        outer: Deferred[Presented] = Deferred()
        # Two connections, each bounded by its socket timeout; this bounds the answer.
        bound = 2 * self.timeout + 5

        def expire() -> None:
            outer.errback(
                Failure(
                    TimedOut(f"vCenter {where} did not present a certificate within {bound:g} s")
                )
            )

        timer = self._clock.callLater(bound, expire)

        def finished(result: Presented | Failure) -> None:
            if timer.active():
                timer.cancel()
            if outer.called:
                return
            if isinstance(result, Failure):
                error = result.value
                translated = (
                    translate(error, credentials, "fetching its certificate")
                    if isinstance(error, Exception)
                    else error
                )
                if isinstance(translated, VSphereError):
                    outer.errback(Failure(translated))
                else:
                    outer.errback(result)
            else:
                outer.callback(result)

        inner.addBoth(finished)
        return outer


def _name(name: x509.Name) -> str:
    return name.rfc4514_string()


def _alternative_names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = [f"DNS:{n}" for n in extension.value.get_values_for_type(x509.DNSName)]
    names += [f"IP:{n}" for n in extension.value.get_values_for_type(x509.IPAddress)]
    return names


def describe(der: bytes, now: datetime) -> dict[str, Any]:
    """A certificate for people: names, validity, thumbprints (both), and its PEM.

    What cannot be read of it (a certificate the parser refuses) is ``null``;
    the thumbprints are always there.
    """
    prints = thumbprints(der)
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return {
            "subject": None,
            "issuer": None,
            "serial_number": None,
            "not_before": None,
            "not_after": None,
            "valid_now": None,
            "self_signed": None,
            "subject_alt_names": [],
            **prints,
            "pem": None,
        }
    before = certificate.not_valid_before_utc
    after = certificate.not_valid_after_utc
    serial = f"{certificate.serial_number:X}"
    serial = serial.rjust(len(serial) + len(serial) % 2, "0")
    return {
        "subject": _name(certificate.subject),
        "issuer": _name(certificate.issuer),
        "serial_number": ":".join(serial[i : i + 2] for i in range(0, len(serial), 2)),
        "not_before": _seconds(before),
        "not_after": _seconds(after),
        "valid_now": before <= now <= after,
        "self_signed": certificate.subject == certificate.issuer,
        "subject_alt_names": _alternative_names(certificate),
        **prints,
        "pem": certificate.public_bytes(Encoding.PEM).decode("ascii"),
    }


def presented_json(presented: Presented, pin: Optional[Pin], now: datetime) -> dict[str, Any]:
    """The answer of ``GET /api/v1/vcenter/certificate``."""
    certificate = describe(presented.certificate, now)
    chain = []
    for der in presented.chain[1:]:
        described = describe(der, now)
        chain.append({key: described[key] for key in ("subject", "issuer", "not_after", "sha256")})
    pinned = None
    if pin is not None:
        wanted = pin.thumbprint
        pinned = {**pin.to_json(), "matches": certificate[pin.algorithm] == wanted}
    return {
        "vcenter": address(presented.host, presented.port),
        "host": presented.host,
        "port": presented.port,
        "certificate": certificate,
        "chain": chain,
        "verified": presented.verify_error is None,
        "verify_error": presented.verify_error,
        "trusted_by": presented.trusted_by,
        "pin": pinned,
        "fetched_at": _seconds(now),
    }
