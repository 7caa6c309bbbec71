"""A test double of the hub's enrollment routes, written from enrollment-tunnel.md §1.3-1.7.

Run as a process (``python -m tests.integration.hub_double --help``), on
loopback only, over HTTPS with a certificate the test made, or plain HTTP.
It answers what the stock hub answers, byte for byte in shape (Go's
``json.Encoder``: sorted map keys, a trailing newline; errors
``{"details","error"}``), and checks what the stock hub does not:

- signatures, strictly: Ed25519 over ``b64decode(challenge)`` with the key
  from ``vma_public_key`` (401 ``Invalid signature`` otherwise);
- the fingerprint: ``vma_fingerprint`` must be the key's real ``SHA256:``;
- the key line: one ``ssh-ed25519 base64 [comment]`` line.

Pairing codes are single use (401 on a bad, expired or used one).  On
approve it appends the node's key line (reference §5 "Key line") to
``--authorized-keys``, so an sshd can take the node.  It counts every call,
so a test can check that verify was sent once.

Admin routes (the hub's own, Bearer ``--admin-token``):
``POST /api/v1/admin/vma/pairing-code``, ``GET /api/v1/admin/vma/pending``,
``POST /api/v1/admin/vma/approve/{id}``, ``POST /api/v1/admin/vma/reject/{id}``.
The double's own control routes, under ``/_double/``: ``GET calls``,
``POST fail-next`` (``{"route","status","count"}``: the next calls of a
route answer that status), ``DELETE enrollment/{id}`` (the hub forgets it).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import secrets
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from klein import Klein
from twisted.internet import endpoints, reactor
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from tests.certs import self_signed

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"


def _go_json(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _error(request: IRequest, status: int, error: str, details: str = "") -> bytes:
    return _go_json(request, {"details": details, "error": error}, status)


def key_line_options(nbd_ports: range, sha_api_port: int, reverse_port: int) -> str:
    opens = [f'permitopen="127.0.0.1:{p}"' for p in (*nbd_ports, sha_api_port)]
    return ",".join(
        [
            "restrict",
            "port-forwarding",
            *opens,
            f'permitlisten="127.0.0.1:{reverse_port}"',
            'command="/usr/sbin/nologin"',
        ]
    )


class HubDouble:
    app = Klein()

    def __init__(
        self,
        authorized_keys: Optional[str],
        admin_token: str,
        nbd_ports: range,
        sha_api_port: int,
        reverse_port: int,
    ) -> None:
        self.authorized_keys = authorized_keys
        self.admin_token = admin_token
        self.nbd_ports = nbd_ports
        self.sha_api_port = sha_api_port
        self.reverse_port = reverse_port
        self.codes: dict[str, dict[str, Any]] = {}
        self.enrollments: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.verify_by_id: Counter[str] = Counter()
        self.fail_next: dict[str, list[int]] = {}

    def _failing(self, route: str) -> Optional[int]:
        pending = self.fail_next.get(route)
        if pending:
            return pending.pop(0)
        return None

    def _body(self, request: IRequest) -> Optional[dict[str, Any]]:
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _admin(self, request: IRequest) -> bool:
        return request.getHeader(b"authorization") == f"Bearer {self.admin_token}".encode()

    # -- the node-facing routes (no auth, as on the stock hub) -------------

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return _go_json(request, {"status": "healthy"})

    @app.route("/api/v1/vma/enroll", methods=["POST"])
    def enroll(self, request: IRequest) -> bytes:
        self.calls["enroll"] += 1
        failing = self._failing("enroll")
        if failing is not None:
            return _error(request, failing, "Internal server error", "the double was told to fail")
        body = self._body(request)
        if body is None:
            return _error(request, 400, "Invalid request format")
        code = str(body.get("pairing_code") or "")
        entry = self.codes.get(code)
        now = datetime.now(UTC)
        if entry is None or entry["used_by"] is not None or entry["expires_at"] <= now:
            return _error(
                request,
                401,
                "Invalid pairing code",
                "Pairing code not found, expired, or already used",
            )
        line = str(body.get("vma_public_key") or "")
        words = line.split(" ")
        if "\n" in line or "\r" in line or len(words) < 2 or words[0] != "ssh-ed25519":
            return _error(
                request, 400, "Invalid public key", "vma_public_key must be one ssh-ed25519 line"
            )
        try:
            blob = base64.b64decode(words[1], validate=True)
        except binascii.Error:
            return _error(request, 400, "Invalid public key", "the key is not base64")
        expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        if body.get("vma_fingerprint") != expected:
            return _error(request, 400, "Invalid fingerprint", f"vma_fingerprint is not {expected}")
        enrollment_id = str(uuid.uuid4())
        challenge = secrets.token_hex(32)
        self.enrollments[enrollment_id] = {
            "id": enrollment_id,
            "vma_public_key": line,
            "key_type": words[0],
            "key_data": words[1],
            "raw_key": blob[-32:],
            "vma_name": body.get("vma_name"),
            "vma_version": body.get("vma_version"),
            "vma_fingerprint": expected,
            "challenge_nonce": challenge,
            "status": "pending_verification",
            "created_at": now.isoformat(),
        }
        entry["used_by"] = enrollment_id
        return _go_json(
            request,
            {
                "enrollment_id": enrollment_id,
                "challenge": challenge,
                "status": "pending_verification",
                "message": "Please sign the challenge and submit verification",
            },
        )

    @app.route("/api/v1/vma/enroll/verify", methods=["POST"])
    def verify(self, request: IRequest) -> bytes:
        self.calls["verify"] += 1
        failing = self._failing("verify")
        if failing is not None:
            return _error(request, failing, "Internal server error", "the double was told to fail")
        body = self._body(request)
        if body is None:
            return _error(request, 400, "Invalid request format")
        enrollment = self.enrollments.get(str(body.get("enrollment_id")))
        if enrollment is None:
            return _error(request, 404, "Enrollment not found")
        self.verify_by_id[enrollment["id"]] += 1
        try:
            signature = base64.b64decode(str(body.get("signature")), validate=True)
            message = base64.b64decode(enrollment["challenge_nonce"], validate=True)
            Ed25519PublicKey.from_public_bytes(enrollment["raw_key"]).verify(signature, message)
        except (binascii.Error, ValueError, InvalidSignature):
            return _error(
                request, 401, "Invalid signature", "the challenge signature does not verify"
            )
        # As the stock hub: unconditionally (a second verify re-opens or demotes it).
        enrollment["status"] = "awaiting_approval"
        return _go_json(
            request,
            {
                "message": "Challenge verified successfully, awaiting administrator approval",
                "status": "awaiting_approval",
            },
        )

    @app.route("/api/v1/vma/enroll/result", methods=["GET"])
    def result(self, request: IRequest) -> bytes:
        self.calls["result"] += 1
        failing = self._failing("result")
        if failing is not None:
            return _error(request, failing, "Internal server error", "the double was told to fail")
        values = request.args.get(b"enrollment_id") or [b""]
        enrollment_id = values[0].decode("utf-8", "replace")
        if not enrollment_id:
            return _error(request, 400, "Missing enrollment_id parameter")
        enrollment = self.enrollments.get(enrollment_id)
        if enrollment is None:
            return _error(request, 404, "Enrollment not found")
        status = enrollment["status"]
        return _go_json(request, {"message": f"Enrollment status: {status}", "status": status})

    # -- the hub's admin routes ---------------------------------------------

    @app.route("/api/v1/admin/vma/pairing-code", methods=["POST"])
    def pairing_code(self, request: IRequest) -> bytes:
        if not self._admin(request):
            return _error(request, 401, "Unauthorized")
        body = self._body(request)
        if body is None:
            return _error(request, 400, "Invalid request format")
        valid_for = int(body.get("valid_for") or 600)
        code = "-".join("".join(secrets.choice(CODE_ALPHABET) for _ in range(4)) for _ in range(3))
        expires = datetime.now(UTC) + timedelta(seconds=valid_for)
        self.codes[code] = {"expires_at": expires, "used_by": None}
        return _go_json(
            request,
            {"expires_at": expires.isoformat(), "pairing_code": code, "valid_for": valid_for},
        )

    @app.route("/api/v1/admin/vma/pending", methods=["GET"])
    def pending(self, request: IRequest) -> bytes:
        if not self._admin(request):
            return _error(request, 401, "Unauthorized")
        shown = [
            {k: v for k, v in e.items() if k != "raw_key"}
            for e in self.enrollments.values()
            if e["status"] in ("pending_verification", "awaiting_approval")
        ]
        return _go_json(request, {"count": len(shown), "enrollments": shown})

    @app.route("/api/v1/admin/vma/approve/<enrollment_id>", methods=["POST"])
    def approve(self, request: IRequest, enrollment_id: str) -> bytes:
        if not self._admin(request):
            return _error(request, 401, "Unauthorized")
        if self._body(request) is None:
            return _error(request, 400, "Invalid request format")
        enrollment = self.enrollments.get(enrollment_id)
        if enrollment is None:
            return _error(request, 404, "Enrollment not found")
        enrollment["status"] = "approved"
        if self.authorized_keys is not None:
            options = key_line_options(self.nbd_ports, self.sha_api_port, self.reverse_port)
            line = (
                f"{options} {enrollment['key_type']} {enrollment['key_data']} "
                f"# {enrollment['vma_fingerprint']}\n"
            )
            with open(self.authorized_keys, "a") as f:
                f.write(line)
            os.chmod(self.authorized_keys, 0o600)
        return _go_json(
            request,
            {
                "message": f"SNA enrollment {enrollment_id} approved",
                "ssh_setup": "SSH key installed for tunnel access",
                "ssh_user": "vma_tunnel",
                "status": "approved",
                "success": True,
            },
        )

    @app.route("/api/v1/admin/vma/reject/<enrollment_id>", methods=["POST"])
    def reject(self, request: IRequest, enrollment_id: str) -> bytes:
        if not self._admin(request):
            return _error(request, 401, "Unauthorized")
        if self._body(request) is None:
            return _error(request, 400, "Invalid request format")
        enrollment = self.enrollments.get(enrollment_id)
        if enrollment is None:
            return _error(request, 404, "Enrollment not found")
        enrollment["status"] = "rejected"
        return _go_json(
            request,
            {
                "message": f"SNA enrollment {enrollment_id} rejected",
                "status": "rejected",
                "success": True,
            },
        )

    # -- the double's control routes ------------------------------------------

    @app.route("/_double/calls", methods=["GET"])
    def calls_route(self, request: IRequest) -> bytes:
        return _go_json(
            request,
            {
                "calls": dict(self.calls),
                "verify_by_id": dict(self.verify_by_id),
                "enrollments": {i: e["status"] for i, e in self.enrollments.items()},
            },
        )

    @app.route("/_double/fail-next", methods=["POST"])
    def fail_next_route(self, request: IRequest) -> bytes:
        body = self._body(request) or {}
        route, status, count = str(body["route"]), int(body["status"]), int(body.get("count", 1))
        self.fail_next.setdefault(route, []).extend([status] * count)
        return _go_json(request, {"route": route, "pending": len(self.fail_next[route])})

    @app.route("/_double/enrollment/<enrollment_id>", methods=["DELETE"])
    def forget(self, request: IRequest, enrollment_id: str) -> bytes:
        found = self.enrollments.pop(enrollment_id, None)
        return _go_json(request, {"forgotten": found is not None})


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: any; printed)")
    parser.add_argument("--cert", help="PEM certificate (with --key): serve HTTPS")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument("--authorized-keys", help="file approved nodes' key lines go to")
    parser.add_argument("--admin-token", default="double-admin-token")
    parser.add_argument("--nbd-ports", default="10100-10200")
    parser.add_argument("--sha-api-port", type=int, default=8082)
    parser.add_argument("--reverse-port", type=int, default=9081)
    args = parser.parse_args(argv)
    low, _, high = args.nbd_ports.partition("-")
    double = HubDouble(
        args.authorized_keys,
        args.admin_token,
        range(int(low), int(high or low) + 1),
        args.sha_api_port,
        args.reverse_port,
    )
    if args.cert:
        description = (
            f"ssl:{args.port}:interface=127.0.0.1:privateKey={args.key}:certKey={args.cert}"
        )
    else:
        description = f"tcp:{args.port}:interface=127.0.0.1"
    endpoint = endpoints.serverFromString(reactor, description)
    site = Site(double.app.resource())
    site.noisy = False

    def listening(port: Any) -> None:
        print(f"hub-double listening on {port.getHost().port}", flush=True)

    def failed(failure: Any) -> None:
        print(f"hub-double cannot listen: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    endpoint.listen(site).addCallbacks(listening, failed)
    reactor.run()


# -- for the tests: a certificate, and the double as a child process ---------------


def make_certificate(directory: str, name: str = "hub") -> tuple[str, str, str]:
    """A self-signed certificate for ``IP:127.0.0.1``: (cert path, key path, SHA-256 pin)."""
    made = self_signed(directory, name)
    return made.cert, made.key, made.sha256


class HubDoubleProcess:
    """The double as a child process on a loopback port; :meth:`stop` ends it by pid."""

    def __init__(
        self,
        directory: str,
        tls: bool = True,
        authorized_keys: Optional[str] = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        import subprocess

        self.directory = directory
        self.admin_token = "double-admin-" + secrets.token_hex(8)
        argv = [sys.executable, "-m", "tests.integration.hub_double", "--port", "0"]
        argv += ["--admin-token", self.admin_token, *extra]
        self.pin: Optional[str] = None
        self.cert: Optional[str] = None
        if tls:
            self.cert, key, self.pin = make_certificate(directory)
            argv += ["--cert", self.cert, "--key", key]
        if authorized_keys is not None:
            argv += ["--authorized-keys", authorized_keys]
        self.log_path = os.path.join(directory, "hub-double.log")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("hub-double listening on "):
            self.stop()
            raise RuntimeError(f"the hub double did not start: {line!r}\n{self.log()}")
        self.port = int(line.split()[-1])
        self.scheme = "https" if tls else "http"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def _call(self, method: str, path: str, body: Any = None, admin: bool = False) -> Any:
        import http.client
        import ssl

        if self.scheme == "https":
            context = ssl.create_default_context(cafile=self.cert)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, context=context, timeout=10
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers)
            answer = conn.getresponse()
            payload = json.loads(answer.read())
            if answer.status != 200:
                raise AssertionError(f"{method} {path}: {answer.status} {payload}")
            return payload
        finally:
            conn.close()

    def pairing_code(self) -> str:
        answer = self._call("POST", "/api/v1/admin/vma/pairing-code", {"valid_for": 600}, True)
        return str(answer["pairing_code"])

    def approve(self, enrollment_id: str) -> None:
        body = {"approved_by": "test", "notes": ""}
        self._call("POST", f"/api/v1/admin/vma/approve/{enrollment_id}", body, True)

    def reject(self, enrollment_id: str) -> None:
        body = {"rejected_by": "test", "reason": "Rejected by administrator"}
        self._call("POST", f"/api/v1/admin/vma/reject/{enrollment_id}", body, True)

    def calls(self) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", "/_double/calls")
        return answer

    def fail_next(self, route: str, status: int, count: int = 1) -> None:
        self._call("POST", "/_double/fail-next", {"route": route, "status": status, "count": count})

    def forget(self, enrollment_id: str) -> None:
        self._call("DELETE", f"/_double/enrollment/{enrollment_id}")


if __name__ == "__main__":
    main()
