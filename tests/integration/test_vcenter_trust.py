"""``sna-ctl vcenter trust`` against the vCenter simulator, whose TLS certificate is its own.

The daemon runs without ``--vcenter-insecure`` and without a CA file, as a
node with a self-signed vCenter certificate does, and the requests carry no
``vcenter_thumbprint``, as the SHA's never do.  Until the certificate is
pinned, discovery fails on it; after ``sna-ctl vcenter trust --yes`` it
works, and a real backup (the real client, qemu-nbd targets, checked with
``qemu-img compare``) verifies vCenter against the pin, watched on a
pseudo-terminal.  A wrong pin is refused by both the daemon and the client.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.backup_helpers import (
    MiB,
    assert_completed,
    backup_request,
    compare,
    follow,
    start_sna,
)
from tests.integration.harness import Daemon, JobIds
from tests.integration.test_ctl import ESCAPE, PtyRun, ctl_env, frames, run_ctl
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

#: Ports no other module's hub uses.
HUB_PORTS = range(11000, 11050)
VM = "trustvm"
SPEC = {
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [
        {
            "name": VM,
            "cbt_enabled": True,
            "disks": [{"capacity_bytes": 24 * MiB}, {"capacity_bytes": 6 * MiB + 512}],
        }
    ],
}
OTHER_SHA256 = ":".join(["5A"] * 32)

testbed = testbed_fixture(SPEC)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def ptys() -> Iterator[list[PtyRun]]:
    runs: list[PtyRun] = []
    yield runs
    for run in runs:
        run.close()


@pytest.fixture(scope="module")
def written(testbed: Testbed) -> Testbed:
    testbed.write(VM, 2000, 0, 5 * MiB, seed=11)
    testbed.write(VM, 2000, 20 * MiB, 1 * MiB + 4096, seed=12)
    testbed.write(VM, 2001, 1 * MiB, 3 * MiB, seed=13)
    return testbed


def discover(sna: Daemon, tb: Testbed) -> tuple[int, dict[str, object]]:
    v = tb.vcenter
    answer = sna.api.post(
        "/api/v1/discover",
        {
            "vcenter": f"{v['host']}:{v['port']}",
            "username": v["user"],
            "password": v["password"],
            "filter": VM,
        },
    )
    return answer.status, answer.json()


def address(tb: Testbed) -> str:
    return f"{tb.vcenter['host']}:{tb.vcenter['port']}"


def test_trust_pins_the_certificate_the_daemon_sees(
    written: Testbed, daemon_factory: Callable[..., Daemon], home: Path, job_ids: JobIds
) -> None:
    tb = written
    sna = start_sna(daemon_factory, HUB_PORTS)
    env = ctl_env(sna, home)
    vcenter = address(tb)

    status, body = discover(sna, tb)
    assert (status, body["error"]) == (502, "vcenter_certificate_rejected"), body

    # Without a terminal and without --yes: shown, refused, nothing pinned.
    shown = run_ctl(["vcenter", "trust", vcenter], env)
    assert shown.returncode == 2, shown
    assert "sna-ctl: not a terminal: cannot ask for confirmation" in shown.stderr
    out = shown.stdout
    assert out.startswith(f"vCenter {vcenter} presents this certificate to the daemon:\n")
    assert f"  SHA-256   {tb.vcenter['thumbprint_sha256']}\n" in out
    assert f"  SHA-1     {tb.vcenter['thumbprint']}\n" in out
    assert "  subject   " in out and "sna testbed vCenter simulator" in out
    assert re.search(r"  verified  no: .+ \(against the system CAs\)\n", out), out
    assert "  pinned    no\n" in out
    assert run_ctl(["vcenter", "pins", "--json"], env).stdout.count('"vcenter"') == 0

    # An out-of-band thumbprint that differs: refused.
    wrong = run_ctl(["vcenter", "trust", vcenter, "--yes", "--expect", OTHER_SHA256], env)
    assert wrong.returncode == 1
    assert "not the expected " + OTHER_SHA256 + "; nothing was pinned" in wrong.stderr

    trusted = run_ctl(
        ["vcenter", "trust", vcenter, "--yes", "--expect", tb.vcenter["thumbprint"]], env
    )
    assert trusted.returncode == 0, trusted
    assert trusted.stdout.endswith(
        f"vCenter {vcenter}: pinned to SHA-256 {tb.vcenter['thumbprint_sha256']}\n"
    )
    pins = json.loads(run_ctl(["vcenter", "pins", "--json"], env).stdout)
    assert [(p["vcenter"], p["thumbprint"]) for p in pins["pins"]] == [
        (vcenter, tb.vcenter["thumbprint_sha256"])
    ]
    listed = run_ctl(["vcenter", "pins"], env).stdout.splitlines()
    assert listed[1].split()[:3] == [vcenter, "sha256", tb.vcenter["thumbprint_sha256"]]
    again = run_ctl(["vcenter", "trust", vcenter, "--yes"], env)
    assert again.stdout.endswith("is already pinned to this certificate; nothing to do\n")

    status, body = discover(sna, tb)
    assert status == 200, body
    assert [vm["name"] for vm in body["vms"]] == [VM]  # type: ignore[union-attr]

    # The pin outlives the daemon.
    sna.restart()
    status, body = discover(sna, tb)
    assert status == 200, body

    forgotten = run_ctl(["vcenter", "forget", vcenter], env)
    assert forgotten.returncode == 0
    assert forgotten.stdout == (
        f"vCenter {vcenter}: pin {tb.vcenter['thumbprint_sha256']} removed\n"
    )
    status, body = discover(sna, tb)
    assert (status, body["error"]) == (502, "vcenter_certificate_rejected"), body
    gone = run_ctl(["vcenter", "forget", vcenter], env)
    assert gone.returncode == 1
    assert gone.stderr == f"sna-ctl: no certificate pin is stored for vCenter {vcenter}\n"


def test_trust_asks_on_a_terminal(
    written: Testbed,
    daemon_factory: Callable[..., Daemon],
    home: Path,
    ptys: list[PtyRun],
) -> None:
    tb = written
    sna = start_sna(daemon_factory, HUB_PORTS)
    env = ctl_env(sna, home)
    vcenter = address(tb)
    question = f"for vCenter {vcenter}?"
    declined = PtyRun(["vcenter", "trust", vcenter], env)
    ptys.append(declined)
    declined.wait_for(lambda text: "[y/N]" in text, "the question")
    assert question in declined.output
    os.write(declined.master, b"n\n")
    assert declined.finish() == 1
    assert "sna-ctl: not confirmed; vCenter " + vcenter + " was not pinned" in declined.output
    assert sna.api.get("/api/v1/vcenter/pins").json()["count"] == 0
    accepted = PtyRun(["vcenter", "trust", vcenter], env)
    ptys.append(accepted)
    accepted.wait_for(lambda text: "[y/N]" in text, "the question")
    os.write(accepted.master, b"y\n")
    assert accepted.finish() == 0, accepted.output
    [pin] = sna.api.get("/api/v1/vcenter/pins").json()["pins"]
    assert pin["thumbprint"] == tb.vcenter["thumbprint_sha256"]


def test_the_daemon_says_whether_its_cas_verify_the_certificate(
    written: Testbed, daemon_factory: Callable[..., Daemon], home: Path
) -> None:
    tb = written
    sna = start_sna(
        daemon_factory, HUB_PORTS, "--vcenter-ca-file", tb.vcenter["cert_file"], name="ca"
    )
    answer = sna.api.get(f"/api/v1/vcenter/certificate?host={quote(address(tb))}")
    assert answer.status == 200, answer
    body = answer.json()
    assert (body["verified"], body["verify_error"]) == (True, None)
    assert body["trusted_by"] == f"the system CAs and {tb.vcenter['cert_file']}"
    assert body["certificate"]["sha1"] == tb.vcenter["thumbprint"]
    assert body["certificate"]["self_signed"] is True and body["certificate"]["valid_now"]
    assert body["certificate"]["pem"].startswith("-----BEGIN CERTIFICATE-----\n")
    closed = sna.api.get("/api/v1/vcenter/certificate?host=127.0.0.1&port=1")
    assert (closed.status, closed.json()["error"]) == (502, "vcenter_unreachable")


def test_a_backup_verifies_vcenter_against_the_pin(
    written: Testbed,
    daemon_factory: Callable[..., Daemon],
    home: Path,
    job_ids: JobIds,
    ptys: list[PtyRun],
) -> None:
    tb = written
    sna = start_sna(daemon_factory, HUB_PORTS)
    env = ctl_env(sna, home)
    vcenter = address(tb)
    assert run_ctl(["vcenter", "trust", vcenter, "--yes"], env).returncode == 0

    targets = {key: tb.add_target(VM, key) for key in (2000, 2001)}
    body = backup_request(tb, VM, job_ids("pinned"), targets, "full")
    del body["vcenter_thumbprint"]  # as the SHA sends it
    job_id = body["job_id"]
    sna.api.start(body)
    watch = PtyRun(["watch", job_id, "--interval", "0.2"], env, columns=150)
    ptys.append(watch)
    code = watch.finish()
    assert code == 0, watch.output
    drawn = [line for frame in frames(watch.output) for line in frame]
    bars = [line for line in drawn if re.match(r"  disk 20\d\d  full +\[", line)]
    assert {line.split()[1] for line in bars} == {"2000", "2001"}, drawn
    assert any("100.0%" in line for line in bars)
    last = ESCAPE.sub("", watch.output).rstrip().splitlines()[-1]
    assert last.startswith(f"{job_id}: completed in "), last
    run = follow(sna.api, job_id)
    assert_completed(run)
    for key, target in targets.items():
        compare(tb, VM, key, target["qcow2"])
    log = sna.job_log(job_id).read_text()
    sha256 = tb.vcenter["thumbprint_sha256"]
    assert f"--vcenter-thumbprint={sha256}" in log
    assert f"sna vCenter {vcenter}: the request pins no certificate; the stored pin {sha256}" in log

    # Another certificate's pin: the client refuses vCenter, and so do the vSphere routes.
    stored = sna.api.request(
        "PUT",
        f"/api/v1/vcenter/pins/{quote(vcenter, safe='')}",
        {"thumbprint": OTHER_SHA256},
    )
    assert stored.status == 200 and stored.json()["replaced"] == sha256
    status, answer = discover(sna, tb)
    assert (status, answer["error"]) == (502, "vcenter_certificate_rejected")
    assert f"does not match the pinned {OTHER_SHA256} (the pin stored for" in str(answer["message"])
    refused = {key: tb.add_target(VM, key) for key in (2000, 2001)}
    body = backup_request(tb, VM, job_ids("wrongpin"), refused, "full")
    del body["vcenter_thumbprint"]
    sna.api.start(body)
    final = follow(sna.api, body["job_id"]).final
    assert final["status"] == "failed", final
    assert "does not match the pinned" in final["error"], final
