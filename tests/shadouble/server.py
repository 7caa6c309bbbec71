"""The double's HTTP server: the SHA's node-facing routes, the ``/_double/`` controls, the state file.

A ``ThreadingHTTPServer`` on 127.0.0.1 only.  Threads, because a control
call (``POST /_double/backups``) waits on the node while the node calls the
double's SHA routes; one lock around the model, never held while waiting on
the node or on a process.

The state file holds the model's rows, the request log and the qemu-nbd
records; it is written atomically after every change and read at start, so a
test can stop the double ("the SHA is down") and start it again with its
rows intact.  Every request is logged except ``GET /_double/state`` and
``GET /_double/requests`` (reading the log must not grow it).

Control routes (not the SHA's):

- ``POST /_double/backups``: :mod:`tests.shadouble.start`.
- ``POST /_double/jobs``: rows only, ``{"job_id", "vm_name", "backup_type",
  "disks": [{"disk_index", "size_gb"}]}``.
- ``GET /_double/state``: the tables, chains, allocations, branch runs,
  problems and qemu-nbd processes.
- ``GET /_double/requests?since=N&path_prefix=P``: the request log.
- ``POST /_double/clock``: ``{"advance": seconds}`` moves the double's clock
  forward (saved with the state), so a test can reach the next second of
  the SHA's DATETIME columns without sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from tests.shadouble.model import (
    JSON_TYPE,
    Answer,
    DatabaseError,
    ShaModel,
    collate,
    text_answer,
)
from tests.shadouble.realhub import RealHub
from tests.shadouble.routes import dispatch, parse_query, split_target
from tests.shadouble.start import BadRequest, Starter, parse_start

HOST = "127.0.0.1"
STATE_VERSION = 1
CONTROL = "/_double/"
#: Reads that are not logged, so polling them does not grow the log.
UNLOGGED = {("GET", "/_double/state"), ("GET", "/_double/requests")}


def _file_size(path: str) -> int:
    """The qcow2's size on disk, as the chain totals take it (BE:717-722)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _readable(text: str) -> str:
    """A Go string (surrogate-escaped bytes) as valid text for the log."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def auth_digest(header: Optional[str]) -> Optional[str]:
    """What the request log keeps of an ``Authorization`` header: its scheme and the
    SHA-256 of its credentials, never the credentials themselves."""
    if header is None:
        return None
    scheme, _, credentials = header.partition(" ")
    return f"{scheme} sha256:{hashlib.sha256(credentials.encode('latin-1')).hexdigest()}"


class Store:
    """The model, the request log and the hub's records behind one lock; saved on every change."""

    def __init__(self, path: Path, hub_log_dir: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        data: dict[str, Any] = {}
        if path.exists():
            data = json.loads(path.read_text())
        #: Seconds added to the wall clock (``POST /_double/clock``), kept across restarts.
        self.clock_offset = float(data.get("clock_offset", 0.0))
        self.model = ShaModel.from_json(data.get("model", {}), self.now, _file_size)
        self.requests: list[dict[str, Any]] = list(data.get("requests", []))
        self.hub = RealHub(hub_log_dir, data.get("qemu_nbd", []))
        self.started_at = time.time()
        self.save()

    def now(self) -> float:
        return time.time() + self.clock_offset

    @contextmanager
    def change(self) -> Iterator[ShaModel]:
        """The model under the lock; saved when the block ends, whatever happened."""
        with self.lock:
            try:
                yield self.model
            finally:
                self.save()

    def save(self) -> None:
        with self.lock:
            data = {
                "version": STATE_VERSION,
                "clock_offset": self.clock_offset,
                "model": self.model.to_json(),
                "qemu_nbd": self.hub.records(),
                "requests": self.requests,
            }
            fd, temp = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=1)
            os.replace(temp, self.path)

    def log(self, entry: dict[str, Any]) -> None:
        with self.lock:
            entry["seq"] = len(self.requests) + 1
            self.requests.append(entry)
            self.save()

    def state(self) -> dict[str, Any]:
        with self.lock:
            state = self.model.snapshot()
            state["qemu_nbd"] = self.hub.records()
            state["requests_logged"] = len(self.requests)
            state["now"] = self.model.now()
            return state


class DoubleServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, store: Store, starter: Starter) -> None:
        self.store = store
        self.starter = starter
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((HOST, port), Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def drop_connections(self) -> None:
        """Cut every open connection: a down SHA does not answer on kept-alive ones either."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def _json(status: int, value: Any) -> Answer:
    return Answer(status, json.dumps(value).encode() + b"\n", JSON_TYPE)


class Handler(BaseHTTPRequestHandler):
    server: DoubleServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"sha-double: {self.address_string()} {format % args}\n")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._body()
        target = self.path.encode("latin-1")
        method = self.command
        raw_path = target.partition(b"?")[0]
        path: Optional[str]
        if raw_path.startswith(CONTROL.encode()):
            try:
                path, query = split_target(target)
            except ValueError:
                path, query = None, ""
            answer = self._control(method, path or "", query, body)
            route = "control"
            if (method, path) in UNLOGGED:
                self._send(answer)
                return
        else:
            store = self.server.store
            with store.change() as model:
                routed = dispatch(model, method, target, body)
            answer, route, path, query = routed.answer, routed.route, routed.path, routed.query
            if answer.release_ports:
                self._release(answer.release_ports)
        self.server.store.log(
            {
                "time": time.time(),
                # The double's clock (moved by /_double/clock), as the rows' times are.
                "sha_now": int(self.server.store.now()),
                "method": method,
                "raw_path": target.decode("utf-8", "backslashreplace"),
                "path": None if path is None else _readable(path),
                "query": query,
                "body": body.decode("utf-8", "replace"),
                "status": answer.status,
                "answer": answer.text,
                "route": route,
                "auth": auth_digest(self.headers.get("Authorization")),
            }
        )
        self._send(answer)

    def _release(self, ports: tuple[int, ...]) -> None:
        """§1.4: stop each port's qemu-nbd, then free the port, before the answer goes out."""
        store = self.server.store
        for port in ports:
            store.hub.stop(port)
            with store.change() as model:
                model.release_port(port)

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        if answer.content_type is not None:
            self.send_header("Content-Type", answer.content_type)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def send_error(
        self, code: int, message: Optional[str] = None, explain: Optional[str] = None
    ) -> None:
        """A request http.server cannot parse: plain text, as Go's server answers it, and logged."""
        answer = text_answer(code, f"{code} {self.responses.get(code, ('',))[0]}")
        answer = replace(answer, body=answer.body.rstrip(b"\n"))
        self.close_connection = True
        self.server.store.log(
            {
                "time": time.time(),
                "method": getattr(self, "command", None),
                "raw_path": getattr(self, "raw_requestline", b"").decode(
                    "utf-8", "backslashreplace"
                ),
                "path": None,
                "query": "",
                "body": "",
                "status": code,
                "answer": answer.text,
                "route": "bad-request",
            }
        )
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", answer.content_type or "text/plain")
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            pass

    # -- control routes -----------------------------------------------------------------------

    def _control(self, method: str, path: str, query: str, body: bytes) -> Answer:
        store = self.server.store
        if (method, path) == ("GET", "/_double/state"):
            return _json(200, store.state())
        if (method, path) == ("GET", "/_double/requests"):
            return _json(200, {"requests": self._requests(query)})
        if (method, path) == ("POST", "/_double/backups"):
            try:
                request = parse_start(json.loads(body or b"null"))
                reply = self.server.starter.start(request)
            except (ValueError, BadRequest) as e:
                return _json(400, {"error": str(e), "details": "", "timestamp": ""})
            return _json(reply.status, reply.body)
        if (method, path) == ("POST", "/_double/jobs"):
            return self._jobs(body)
        if (method, path) == ("POST", "/_double/clock"):
            return self._clock(body)
        return _json(404, {"error": f"no control route {method} {path}"})

    def _requests(self, query: str) -> list[dict[str, Any]]:
        params = parse_query(query)
        since = int((params.get("since") or ["0"])[0] or 0)
        prefix = (params.get("path_prefix") or [""])[0]
        with self.server.store.lock:
            return [
                r
                for r in self.server.store.requests
                if r["seq"] > since and (r["path"] or "").startswith(prefix)
            ]

    def _clock(self, body: bytes) -> Answer:
        """Move the double's clock forward, so a test need not sleep into the next second."""
        try:
            advance = json.loads(body or b"null")["advance"]
            if isinstance(advance, bool) or not isinstance(advance, (int, float)) or advance < 0:
                raise ValueError("advance is a number of seconds >= 0")
        except (ValueError, KeyError, TypeError) as e:
            return _json(400, {"error": f"bad request: {e}", "details": '{"advance": 1}'})
        store = self.server.store
        with store.change() as model:
            store.clock_offset += float(advance)
            now = model.now()
        return _json(200, {"now": now, "offset": store.clock_offset})

    def _jobs(self, body: bytes) -> Answer:
        try:
            request = json.loads(body or b"null")
            job_id, vm_name, backup_type = (
                request["job_id"],
                request["vm_name"],
                request.get("backup_type", "full"),
            )
            disks = [(int(d["disk_index"]), int(d.get("size_gb", 1))) for d in request["disks"]]
            if not all(isinstance(v, str) and v for v in (job_id, vm_name, backup_type)):
                raise ValueError("job_id, vm_name and backup_type are non-empty strings")
        except (ValueError, KeyError, TypeError) as e:
            return _json(
                400,
                {
                    "error": f"bad request: {e}",
                    "details": '{"job_id", "vm_name", "backup_type", '
                    '"disks": [{"disk_index": 0, "size_gb": 1}]}',
                },
            )
        with self.server.store.change() as model:
            try:
                parent = model.rows_only(job_id, vm_name, backup_type, disks)
            except DatabaseError as e:
                return _json(500, {"error": str(e)})
            key = collate(parent.id)
            rows = model.snapshot()
        return _json(
            200,
            {
                "job_id": parent.id,
                "backup_job": next(j for j in rows["backup_jobs"] if j["id"] == parent.id),
                "backup_disks": [
                    d for d in rows["backup_disks"] if collate(d["backup_job_id"]) == key
                ],
            },
        )


class Double:
    """The store, the starter and the listening server, which can go down and up again."""

    def __init__(self, state: Path, workdir: Path, ports: range) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        state.parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(state, state.parent / (state.name + ".logs"))
        self.starter = Starter(self.store.change, self.store.hub, workdir, ports)
        self.port = 0
        self._server: Optional[DoubleServer] = None
        self._thread: Optional[threading.Thread] = None

    def listen(self, port: int, any_port: bool = False) -> int:
        """Bind ``port`` (0: any) and serve; ``any_port`` falls back to any port if it is taken."""
        try:
            server = DoubleServer(port, self.store, self.starter)
        except OSError:
            if not any_port or port == 0:
                raise
            server = DoubleServer(0, self.store, self.starter)
        self._server = server
        self.port = server.port
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sha-double-http",
            daemon=True,
        )
        self._thread.start()
        return self.port

    @property
    def up(self) -> bool:
        return self._server is not None

    def down(self) -> None:
        """Stop listening (connections are refused); qemu-nbd and the rows stay."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()

    def close(self) -> None:
        """Stop listening, stop every qemu-nbd started, save."""
        self.down()
        self.store.hub.stop_all()
        self.store.save()
