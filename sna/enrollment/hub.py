"""Talking to the hub's enrollment routes: the three calls, and how the hub is trusted.

The hub sends no TLS trust of its own (enrollment-tunnel.md §1.2, §5), so the
operator says how its enrollment URL is trusted (:class:`HubTrust`):

- a CA file: the certificate chain and the host name (or IP address) are
  checked against the CAs in that PEM file only;
- a SHA-256 pin: the hub's leaf certificate must have exactly that SHA-256
  digest (of its DER bytes); chain and name are not checked, as for a
  self-signed certificate an operator has looked at;
- plain HTTP, only when asked (a stock hub answers on ``http://<hub>:8082``).

Each call answers a parsed record or raises :class:`HubError`, which says
whether trying again can help (a 5xx or no answer) or not (a 4xx, a
certificate that is not the trusted one).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from sna.contract.tls import matches, thumbprint_of
from sna.sha.client import QuietConnectionPool

#: Seconds one call to the hub may take, answer included.
REQUEST_TIMEOUT = 15.0
#: The most of an answer read; the hub's are a few hundred bytes.
MAX_ANSWER = 64 * 1024

ENROLL = "/api/v1/vma/enroll"
VERIFY = "/api/v1/vma/enroll/verify"
RESULT = "/api/v1/vma/enroll/result"


@attrs.frozen
class HubTrust:
    """How the enrollment URL is trusted: exactly one of the three is set."""

    ca_file: Optional[str] = None
    #: ``AA:BB:…``, 32 bytes, upper case (:func:`sna.contract.tls.normalise_thumbprint`).
    pin_sha256: Optional[str] = None
    plain_http: bool = False

    @property
    def scheme(self) -> str:
        return "http" if self.plain_http else "https"

    def describe(self) -> str:
        if self.plain_http:
            return "plain HTTP (nothing protects the pairing code on the way)"
        if self.pin_sha256 is not None:
            return f"certificate pinned to SHA-256 {self.pin_sha256}"
        return f"certificate verified against the CAs in {self.ca_file}"

    def to_json(self) -> dict[str, Any]:
        return {
            "tls_ca_file": self.ca_file,
            "tls_pin_sha256": self.pin_sha256,
            "plain_http": self.plain_http,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> HubTrust:
        return cls(
            value.get("tls_ca_file"), value.get("tls_pin_sha256"), bool(value.get("plain_http"))
        )


def hub_url(trust: HubTrust, host: str, port: int) -> str:
    """The hub's base URL: ``https://host:port``, an IPv6 address in brackets."""
    name = f"[{host}]" if ":" in host else host
    return f"{trust.scheme}://{name}:{port}"


def load_ca_certificates(path: str) -> list[x509.Certificate]:
    """The certificates of a PEM file; ValueError when it holds none."""
    with open(path, "rb") as f:
        data = f.read(4 * 1024 * 1024)
    certificates = x509.load_pem_x509_certificates(data)
    if not certificates:
        raise ValueError("no PEM certificate in it")
    return certificates


class HubError(Exception):
    """A call to the hub failed; ``final``: trying again with the same input cannot help."""

    def __init__(self, message: str, final: bool, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.final = final
        self.status = status

    def __str__(self) -> str:
        return self.message


class PinMismatch(SSL.Error):
    """The hub's certificate is not the pinned one."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(expected, actual)
        self.message = f"the hub's certificate has SHA-256 {actual}, not the pinned {expected}"

    def __str__(self) -> str:
        return self.message


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedCreator:
    """TLS connections that accept exactly one leaf certificate, by SHA-256."""

    def __init__(self, pin: str) -> None:
        self._pin = pin
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        pin = self._pin

        def verify(conn: SSL.Connection, cert: Any, error: int, depth: int, ok: int) -> bool:
            if depth != 0:
                return True  # only the leaf is pinned; the chain is not what is trusted
            der = cert.to_cryptography().public_bytes(Encoding.DER)
            if matches(pin, der):
                return True
            tlsProtocol.failVerification(Failure(PinMismatch(pin, thumbprint_of(der, "sha256"))))
            return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """The Agent's TLS policy for :class:`HubTrust` (plain HTTP never asks it)."""

    def __init__(self, trust: HubTrust) -> None:
        self._trust = trust
        self._roots: Any = None
        if trust.pin_sha256 is None and trust.ca_file is not None:
            certificates = load_ca_certificates(trust.ca_file)
            self._roots = trustRootFromCertificates(
                [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
            )

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        if self._trust.pin_sha256 is not None:
            return _PinnedCreator(self._trust.pin_sha256)
        if self._roots is None:
            raise HubError("no TLS trust is configured for the hub", final=True)
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._roots
        )
        return creator


@attrs.frozen
class Enrolled:
    """The hub's answer to enroll."""

    enrollment_id: str
    challenge: str
    status: str


class HubClient:
    """The hub's three enrollment routes at ``base_url``."""

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        trust: HubTrust,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._clock: IReactorTime = reactor
        self._timeout = timeout
        agent = Agent(
            reactor,
            contextFactory=TrustPolicy(trust),
            pool=QuietConnectionPool(reactor, persistent=False),
            connectTimeout=timeout,
        )
        self._http = HTTPClient(agent)

    async def enroll(
        self, pairing_code: str, public_key: str, name: str, version: str, fingerprint: str
    ) -> Enrolled:
        body = {
            "pairing_code": pairing_code,
            "vma_public_key": public_key,
            "vma_name": name,
            "vma_version": version,
            "vma_fingerprint": fingerprint,
        }
        answer = await self._call("POST", ENROLL, body, "enroll")
        enrollment_id, challenge = answer.get("enrollment_id"), answer.get("challenge")
        if not isinstance(enrollment_id, str) or not enrollment_id.strip():
            raise HubError("the hub's enroll answer has no enrollment_id", final=True)
        if not isinstance(challenge, str) or not challenge:
            raise HubError("the hub's enroll answer has no challenge", final=True)
        if len(enrollment_id) > 200 or not enrollment_id.isprintable():
            raise HubError("the hub's enrollment_id is not a short printable id", final=True)
        return Enrolled(enrollment_id, challenge, str(answer.get("status") or ""))

    async def verify(self, enrollment_id: str, signature: str) -> str:
        answer = await self._call(
            "POST", VERIFY, {"enrollment_id": enrollment_id, "signature": signature}, "verify"
        )
        return str(answer.get("status") or "")

    async def result(self, enrollment_id: str) -> str:
        query = urllib.parse.urlencode({"enrollment_id": enrollment_id})
        answer = await self._call("GET", f"{RESULT}?{query}", None, "result")
        status = answer.get("status")
        if not isinstance(status, str) or not status:
            raise HubError("the hub's result answer has no status", final=False, status=200)
        return status

    async def _call(
        self, method: str, path: str, body: Optional[dict[str, Any]], what: str
    ) -> dict[str, Any]:
        url = self.base_url + path
        shown = self.base_url + path.partition("?")[0]
        d = defer.ensureDeferred(self._request(method, url, body))
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._clock.callLater(self._timeout, give_up)
        try:
            code, content = await d
        except HubError:
            raise
        except Exception as e:  # whatever the connection met: said, and retried or not
            if timed_out:
                raise HubError(
                    f"{what}: no answer from {shown} within {self._timeout:g} s", final=False
                ) from None
            if _cancelled(e):
                # The enrollment was forgotten or the daemon is stopping: not the hub's doing.
                raise defer.CancelledError() from None
            reason, final = _transport_reason(e)
            raise HubError(f"{what}: {shown}: {reason}", final=final) from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if code == 200 and isinstance(answer, dict):
            return answer
        detail = _hub_message(answer, content)
        if code == 200:
            raise HubError(
                f"{what}: the hub's answer is not a JSON object", final=False, status=code
            )
        # A 5xx (or a proxy's 502/504) may pass; a 4xx is the hub's last word.
        raise HubError(f"{what}: HTTP {code} from the hub: {detail}", final=code < 500, status=code)

    async def _request(
        self, method: str, url: str, body: Optional[dict[str, Any]]
    ) -> tuple[int, bytes]:
        headers: dict[bytes | str, list[bytes | str]] = {"Accept": ["application/json"]}
        data = None
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            data = json.dumps(body).encode()
        response = await self._http.request(method, url, data=data, headers=headers)
        content: bytes = await response.content()
        return response.code, content[:MAX_ANSWER]


def _hub_message(answer: Any, content: bytes) -> str:
    """The hub's ``{"error","details"}`` as one short line, else the start of its body."""
    if isinstance(answer, dict):
        parts = [str(answer[k]) for k in ("error", "details", "message") if answer.get(k)]
        if parts:
            return ": ".join(parts)[:300]
    text = content[:200].decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text) or "(no body)"


def _cancelled(error: BaseException) -> bool:
    """Whether the request failed because it was cancelled (Agent says so in several ways)."""
    if isinstance(error, (defer.CancelledError, ConnectingCancelledError)):
        return True
    reasons: list[Failure] = list(getattr(error, "reasons", []))
    return any(r.check(defer.CancelledError, ConnectingCancelledError) for r in reasons)


def _transport_reason(error: BaseException) -> tuple[str, bool]:
    """What went wrong on the way, and whether it is final (TLS trust never passes by itself)."""
    reasons: list[Failure] = []
    if isinstance(error, (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed)):
        reasons = list(getattr(error, "reasons", []))
    for failure in reasons:
        value = failure.value
        if isinstance(value, PinMismatch):
            return value.message, True
        if isinstance(value, SSL.Error):
            return (
                f"TLS failed: the hub's certificate is not trusted ({_ssl_text(value)}); "
                "check tls_ca_file or tls_pin_sha256",
                True,
            )
        if value.__class__.__name__ == "VerificationError":  # service_identity's
            return f"the hub's certificate does not name this host: {value}", True
    if reasons:
        return "; ".join(f.getErrorMessage() for f in reasons) or type(error).__name__, False
    return str(error) or type(error).__name__, False


def _ssl_text(error: SSL.Error) -> str:
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return ", ".join(parts) or str(error)
