"""The final-state push to a SHA on loopback, through a real daemon and its restarts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.integration.harness import Daemon, JobIds, backup_body, wait_for

pytestmark = pytest.mark.integration


class FakeSha:
    """Records telemetry POSTs; answers 503 while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.posts: list[tuple[str, dict[str, Any]]] = []
        sha = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sha.posts.append((self.path, body))
                self.send_response(503 if sha.down else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pushes_of(self, job_id: str) -> list[dict[str, Any]]:
        return [b for p, b in self.posts if p == f"/api/v1/telemetry/backup/{job_id}"]


@pytest.fixture
def sha() -> Iterator[FakeSha]:
    s = FakeSha()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_a_final_state_the_sha_missed_is_sent_after_a_restart(
    daemon_factory: Callable[..., Daemon], job_ids: JobIds, sha: FakeSha
) -> None:
    daemon = daemon_factory(extra=("--sha-url", sha.url))
    done = job_ids("ok")
    daemon.api.start(backup_body(done))
    assert daemon.api.wait_status(done, "completed", "failed")["status"] == "completed"
    wait_for(lambda: sha.pushes_of(done), "the push of a completed job")
    assert sha.pushes_of(done)[-1]["status"] == "completed"

    # The SHA goes down; a job ends; the daemon stops before the SHA is back.
    sha.down = True
    missed = job_ids("fail")
    daemon.api.start(backup_body(missed, vm="fail"))
    assert daemon.api.wait_status(missed, "completed", "failed")["status"] == "failed"
    wait_for(lambda: sha.pushes_of(missed), "a first, refused attempt")
    daemon.stop()
    attempts = len(sha.pushes_of(missed))

    sha.down = False
    daemon.start()
    wait_for(lambda: len(sha.pushes_of(missed)) > attempts, "the push after the restart")
    body = sha.pushes_of(missed)[-1]
    assert body["status"] == "failed" and body["error"]["message"]
    assert len(sha.pushes_of(done)) == 1, "what the SHA took is not sent again"
    daemon.stop()
    daemon.start()
    time.sleep(1)  # room for a wrong re-send to arrive; a start sends the outbox at once
    assert len(sha.pushes_of(missed)) == attempts + 1, "taken: gone from the outbox"
