"""Bearer-token authorization in front of the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from treq.testing import StubTreq
from twisted.python import usage

from sna.api.auth import BearerTokenAuthorization
from sna.tap import Options, _loopback_only
from sna.testing import result_of
from tests.unit.conftest import Harness


def call(stub: StubTreq, path: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = result_of(stub.get("http://sna" + path, headers=headers))
    return response.code, json.loads(result_of(response.content()))


def test_token_required_except_for_health(harness: Harness) -> None:
    stub = StubTreq(BearerTokenAuthorization(harness.api.resource(), b"t0ken"))
    assert call(stub, "/api/v1/jobs")[0] == 401
    code, body = call(stub, "/api/v1/jobs", "wrong")
    assert (code, body["error"]) == (401, "unauthorized")
    code, body = call(stub, "/api/v1/jobs", "t0ken")
    assert (code, body["jobs"], body["count"]) == (200, [], 0)
    assert call(stub, "/api/v1/health")[0] == 200
    assert call(stub, "/api/v1/status/x", "t0ken")[0] == 404
    response = result_of(
        stub.get("http://sna/api/v1/jobs", headers={"Authorization": "bearer t0ken"})
    )
    assert response.code == 200
    response = result_of(stub.get("http://sna/api/v1/jobs", headers={"Authorization": "t0ken"}))
    assert response.code == 401


def test_the_go_clients_pushes_from_loopback_need_no_token(harness: Harness) -> None:
    stub = StubTreq(BearerTokenAuthorization(harness.api.resource(), b"t0ken"))
    response = result_of(stub.post("http://sna/api/v1/progress/j1/update", json={"stage": "x"}))
    assert response.code == 404  # past auth: the job does not exist
    response = result_of(stub.post("http://sna/api/v1/jobs/j1/cancel"))
    assert response.code == 401


def test_token_comes_from_a_file_never_argv(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    options = Options()
    options.parseOptions(["--auth-token-file", str(path)])
    assert options["auth-token"] == b"s3cret"
    path.write_text("\n")
    with pytest.raises(usage.UsageError, match="holds no token"):
        Options().parseOptions(["--auth-token-file", str(path)])
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--auth-token-file", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("tcp:8081:interface=127.0.0.1", True),
        ("tcp:8081:interface=\\:\\:1", True),
        ("tcp:8081", False),
        ("tcp:8081:interface=0.0.0.0", False),
        ("unix:/run/sna.sock", True),
    ],
)
def test_loopback_detection(listen: str, loopback: bool) -> None:
    assert _loopback_only(listen) is loopback
