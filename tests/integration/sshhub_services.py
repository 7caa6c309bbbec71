"""The hub's listeners in the test hub's network namespace: qemu-nbd ports and its API.

Run by :mod:`tests.integration.sshhub` inside the namespace (``nsenter -n``):
every NBD port accepts connections and appends what it receives to
``DIR/port-P``; the API port answers ``GET /health`` with 200, as the SHA's
does.  Prints ``ready`` once everything listens.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def record(server: socket.socket, path: Path) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=drain, args=(conn, path), daemon=True).start()


def drain(conn: socket.socket, path: Path) -> None:
    with conn:
        while data := conn.recv(65536):
            with path.open("ab") as f:
                f.write(data)


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status":"healthy"}' if self.path == "/health" else b"{}"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nbd-ports", required=True, help="LOW-HIGH")
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    low, _, high = args.nbd_ports.partition("-")
    for port in range(int(low), int(high) + 1):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(16)
        path = args.record / f"port-{port}"
        threading.Thread(target=record, args=(server, path), daemon=True).start()
    api = ThreadingHTTPServer(("127.0.0.1", args.api_port), Health)
    print("ready", flush=True)
    sys.stdout.close()
    api.serve_forever()


if __name__ == "__main__":
    main()
