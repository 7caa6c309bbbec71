"""sendense-backup-client end to end: the testbed's vCenter with CBT, qemu-nbd targets, the client as a process.

One testbed serves the module; each test has VMs of its own (the spec's
names say which), so tests do not depend on each other's order.  What a disk
must hold is never taken from the client: targets are compared byte for byte
with the disk's flat file (``qemu-img compare``; the simulator's snapshots do
not freeze data, so the flat file is what the snapshot showed as long as
nothing writes during a run), and expected CBT byte counts are computed here
from the writes made, rounded out to whole CBT blocks.  Every stdout line
must be an event sna's own parser accepts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from sna.sbc.parse import JsonLineParser
from tests.integration.backup_helpers import blocks, compare, has_no_data, snapshots
from tests.integration.nbd_fixtures import qemu_nbd
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/\d+$")
CLIENT_DEADLINE = 60.0

SPEC: dict[str, Any] = {
    # Pages smaller than the disks: the client must page QueryChangedDiskAreas.
    "cbt": {"block_size": BLOCK, "page_size": 4 * MiB},
    # Not sna's default range, which the session's own NBD servers may fill.
    "hub": {"ports": [10400, 10499]},
    "vms": [
        {
            "name": "bkvm",
            "disks": [
                {"capacity_bytes": 17 * MiB + 512},
                {"capacity_bytes": 9 * MiB + 3584, "controller": "scsi", "bus": 1},
                {"capacity_bytes": 6 * MiB, "controller": "sata"},
            ],
        },
        {
            "name": "resetvm",
            "disks": [
                {"capacity_bytes": 8 * MiB + 512},
                {"capacity_bytes": 8 * MiB},
                {"capacity_bytes": 5 * MiB + 1024, "controller": "nvme"},
            ],
        },
        {
            # Big enough that a signal lands mid-copy.
            "name": "bigvm",
            "disks": [{"capacity_bytes": 192 * MiB}, {"capacity_bytes": 4 * MiB}],
        },
        {"name": "snapvm", "disks": [{"capacity_bytes": 4 * MiB}]},
        {"name": "tlsvm", "disks": [{"capacity_bytes": 1 * MiB}]},
    ],
}

testbed = testbed_fixture(SPEC)


# -- helpers ---------------------------------------------------------------------------------


@attrs.frozen
class Run:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str, disk_key: Optional[int] = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == kind and (disk_key is None or e.get("disk_key") == str(disk_key))
        ]

    def one(self, kind: str, disk_key: int) -> dict[str, Any]:
        found = self.of(kind, disk_key)
        assert len(found) == 1, (kind, disk_key, self.events)
        return found[0]

    def change_ids(self) -> dict[str, str]:
        return {e["disk_key"]: e["change_id"] for e in self.of("disk_done")}


def run_client(
    testbed: Testbed,
    vm: str,
    targets: Mapping[int, str],
    *extra: str,
    job_id: str,
    on_event: Optional[Callable[[dict[str, Any], subprocess.Popen[bytes]], None]] = None,
    env_extra: Optional[Mapping[str, str]] = None,
    tls: Optional[list[str]] = None,
) -> Run:
    """Run the client to its end; ``on_event`` sees each event as it arrives.

    vCenter's certificate is pinned by its thumbprint unless ``tls`` gives
    other flags (an empty list: the default, the system's CAs).
    """
    v = testbed.vcenter
    argv = [
        sys.executable,
        "-m",
        "sna.backup.cli",
        "migrate",
        "--vmware-endpoint",
        f"{v['host']}:{v['port']}",
        "--vmware-username",
        v["user"],
        "--vmware-path",
        testbed.vm(vm)["path"],
        "--nbd-targets",
        ",".join(f"{key}:{url}" for key, url in targets.items()),
        "--job-id",
        job_id,
        *(["--vcenter-thumbprint", v["thumbprint"]] if tls is None else tls),
        *extra,
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SNA_VCENTER_PASSWORD": v["password"]}
    env.update(env_extra or {})
    stderr_path = testbed.workdir / f"client-{job_id}.stderr"
    parser = JsonLineParser()
    events: list[dict[str, Any]] = []
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO)
        watchdog = threading.Timer(CLIENT_DEADLINE, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8")
                # The contract: every stdout line is one event sna accepts.
                assert len(parser.parse(line.rstrip("\n"))) == 1, line
                event = json.loads(line)
                events.append(event)
                if on_event is not None:
                    on_event(event, proc)
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = stderr_path.read_text("utf-8", "replace")
    assert v["password"] not in text
    assert all(v["password"] not in json.dumps(e) for e in events)
    return Run(proc.returncode, events, text)


def check_ordering(run: Run) -> None:
    """docs/sbc-events.md's ordering rules."""
    started: set[str] = set()
    finished: set[str] = set()
    for event in run.events:
        key = event.get("disk_key")
        if event["event"] == "disk_start":
            assert key not in started
            started.add(key)
        elif event["event"] in ("progress", "disk_done"):
            assert key in started and key not in finished, event
            if event["event"] == "disk_done":
                finished.add(key)
    if run.of("done"):
        assert run.events[-1]["event"] == "done"
        assert run.returncode == 0


def hub_targets(testbed: Testbed, vm: str) -> dict[int, dict[str, Any]]:
    return {t["disk_key"]: t for t in testbed.targets if t["vm"] == vm}


def overlay_targets(
    testbed: Testbed, vm: str, bases: Mapping[int, dict[str, Any]], backing: Mapping[int, Path]
) -> dict[int, dict[str, Any]]:
    """Stop serving the bases (qemu-nbd locks backing files) and serve overlays on ``backing``."""
    for target in bases.values():
        testbed.stop_target(target["export"])
    return {key: testbed.add_target(vm, key, backing=path) for key, path in backing.items()}


@pytest.fixture(scope="module")
def data(testbed: Testbed) -> Iterator[Testbed]:
    """Each VM's first data: random areas, sparse gaps, allocated zeros, odd tails."""
    w = testbed.write
    w("bkvm", 2000, 0, 3 * MiB, seed=1)
    w("bkvm", 2000, 5 * MiB + 512, 100_000, seed=2)
    w("bkvm", 2000, 8 * MiB, 256 * KiB, zero=True)  # allocated, all zero: WRITE_ZEROES
    w("bkvm", 2000, 17 * MiB - 1000, 1512, seed=3)  # through the last, partial block
    w("bkvm", 2016, 1 * MiB, 1536 * KiB, seed=4)
    w("bkvm", 2016, 9 * MiB, 3584, seed=5)
    w("bkvm", 16000, 2 * MiB, 64 * KiB, seed=6)
    for key, seed in ((2000, 10), (2001, 11), (32000, 12)):
        w("resetvm", key, 0, 2 * MiB, seed=seed)
        w("resetvm", key, 4 * MiB, 512 * KiB, seed=seed + 1)
    w("bigvm", 2000, 0, 160 * MiB, seed=20)
    w("bigvm", 2001, 0, 1 * MiB, seed=21)
    w("snapvm", 2000, 0, 1 * MiB, seed=30)
    w("tlsvm", 2000, 4096, 8192, seed=31)
    yield testbed


# -- tests -----------------------------------------------------------------------------------


def test_full_then_incremental_into_an_overlay(data: Testbed, tmp_path: Path) -> None:
    tb = data
    bases = hub_targets(tb, "bkvm")
    full = run_client(
        tb,
        "bkvm",
        {k: t["nbd_url"] for k, t in bases.items()},
        "--backup-type",
        "full",
        job_id="bk-full",
    )
    assert full.returncode == 0, full.stderr
    check_ordering(full)
    assert [e["phase"] for e in full.of("phase")] == ["prepare", "snapshot", "transfer", "cleanup"]
    for key, target in bases.items():
        start = full.one("disk_start", key)
        assert (start["sync_type"], start["sync_reason"]) == ("full", "backup_type full requested")
        done = full.one("disk_done", key)
        assert CHANGE_ID.match(done["change_id"])
        assert done["bytes_done"] == done["bytes_total"] == start["bytes_total"]
        assert done["bytes_written"] + done["bytes_zero"] == done["bytes_total"]
        compare(tb, "bkvm", key, target["qcow2"])
    # The zeroed 256 KiB were read and sent as WRITE_ZEROES, not as data.
    assert full.one("disk_done", 2000)["bytes_zero"] >= 256 * KiB
    assert full.one("disk_done", 2000)["bytes_total"] == blocks(
        [(0, 3 * MiB), (5 * MiB + 512, 100_000), (8 * MiB, 256 * KiB), (17 * MiB - 1000, 1512)],
        17 * MiB + 512,
    )
    assert full.events[-1]["event"] == "done"
    assert snapshots(tb, "bkvm") == []

    # Changes: a block in the middle, the last partial block, a data block that
    # becomes all zero, a new area on the second controller's disk; none on 16000.
    cap0, cap1 = 17 * MiB + 512, 9 * MiB + 3584
    tb.write("bkvm", 2000, 1 * MiB + 100, 4000, seed=40)
    tb.write("bkvm", 2000, cap0 - 512, 512, seed=41)
    tb.write("bkvm", 2000, 2 * MiB, BLOCK, zero=True)
    tb.write("bkvm", 2016, 6 * MiB, 200_000, seed=42)
    changed = {
        2000: blocks([(1 * MiB + 100, 4000), (cap0 - 512, 512), (2 * MiB, BLOCK)], cap0),
        2016: blocks([(6 * MiB, 200_000)], cap1),
        16000: 0,
    }
    overlays = overlay_targets(tb, "bkvm", bases, {k: Path(t["qcow2"]) for k, t in bases.items()})
    incr = run_client(
        tb,
        "bkvm",
        {k: t["nbd_url"] for k, t in overlays.items()},
        "--backup-type",
        "incremental",
        "--previous-change-ids",
        json.dumps(full.change_ids()),
        job_id="bk-incr",
    )
    assert incr.returncode == 0, incr.stderr
    check_ordering(incr)
    for key, target in overlays.items():
        start = incr.one("disk_start", key)
        assert start["sync_type"] == "incremental", start
        assert start["base_change_id"] == full.change_ids()[str(key)]
        done = incr.one("disk_done", key)
        old, new = full.change_ids()[str(key)], done["change_id"]
        assert new.split("/")[0] == old.split("/")[0]
        assert int(new.split("/")[1]) > int(old.split("/")[1])
        # Only the changed blocks moved: read, and sent as data or zeroes.
        assert done["bytes_read"] == done["bytes_total"] == changed[key]
        assert done["bytes_written"] + done["bytes_zero"] == changed[key]
        compare(tb, "bkvm", key, target["qcow2"])
    # The block that became zero went as WRITE_ZEROES, masking the backing file's data.
    assert incr.one("disk_done", 2000)["bytes_zero"] == BLOCK
    assert snapshots(tb, "bkvm") == []


def test_wrong_or_reset_change_id_means_full(data: Testbed, tmp_path: Path) -> None:
    tb = data
    bases = hub_targets(tb, "resetvm")
    full = run_client(
        tb,
        "resetvm",
        {k: t["nbd_url"] for k, t in bases.items()},
        "--backup-type",
        "full",
        job_id="rs-full",
    )
    assert full.returncode == 0, full.stderr
    ids = full.change_ids()
    tb.write("resetvm", 2000, 1 * MiB, 4096, seed=50)
    tb.write("resetvm", 2001, 3 * MiB, 4096, seed=51)

    # An overlay on a backing full of junk: a full into it must zero what it
    # does not copy, or the junk shows through.
    junk = tmp_path / "junk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(junk), str(8 * MiB)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 0 {8 * MiB}", str(junk)],
        check=True,
        capture_output=True,
    )
    backing = {2000: Path(bases[2000]["qcow2"]), 2001: junk, 32000: Path(bases[32000]["qcow2"])}
    overlays = overlay_targets(tb, "resetvm", bases, backing)
    wrong_uuid = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1"
    previous = {"2000": ids["2000"], "2001": wrong_uuid, "32000": "PLACEHOLDER"}
    run = run_client(
        tb,
        "resetvm",
        {k: t["nbd_url"] for k, t in overlays.items()},
        "--backup-type",
        "incremental",
        "--previous-change-ids",
        json.dumps(previous),
        job_id="rs-mixed",
    )
    assert run.returncode == 0, run.stderr
    assert run.one("disk_start", 2000)["sync_type"] == "incremental"
    reset = run.one("disk_start", 2001)
    assert reset["sync_type"] == "full" and reset["sync_reason"].startswith(
        "the previous change ID is of another CBT"
    ), reset
    assert reset["zero_gaps"] is True
    invalid = run.one("disk_start", 32000)
    assert invalid["sync_type"] == "full" and "not usable" in invalid["sync_reason"], invalid
    assert (
        run.one("disk_done", 2001)["bytes_zero_filled"]
        == 8 * MiB - run.one("disk_done", 2001)["bytes_total"]
    )
    for key, target in overlays.items():
        compare(tb, "resetvm", key, target["qcow2"])

    # A real CBT reset (off, on): every disk's tracking instance changes.
    si = tb.connect()
    try:
        vm = si.content.searchIndex.FindByInventoryPath(tb.vm("resetvm")["path"])
        for enabled in (False, True):
            WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=enabled)))
    finally:
        Disconnect(si)
    fresh = {key: tb.add_target("resetvm", key) for key in overlays}
    after = run_client(
        tb,
        "resetvm",
        {k: t["nbd_url"] for k, t in fresh.items()},
        "--previous-change-ids",
        json.dumps(run.change_ids()),
        job_id="rs-reset",
    )
    assert after.returncode == 0, after.stderr
    for key, target in fresh.items():
        start = after.one("disk_start", key)
        assert start["sync_type"] == "full" and start["sync_reason"].startswith(
            "the previous change ID is of another CBT"
        )
        compare(tb, "resetvm", key, target["qcow2"])
    assert snapshots(tb, "resetvm") == []


def _on(kind: str, action: Callable[[subprocess.Popen[bytes]], None], **match: str) -> Any:
    """Act once, on the first event of ``kind`` whose fields match."""
    fired: list[bool] = []

    def on_event(event: dict[str, Any], proc: subprocess.Popen[bytes]) -> None:
        if (
            not fired
            and event["event"] == kind
            and all(event.get(k) == v for k, v in match.items())
        ):
            fired.append(True)
            action(proc)

    return on_event


@pytest.mark.parametrize(
    ("kind", "match"),
    [("phase", {"phase": "snapshot"}), ("disk_start", {"disk_key": "2000"})],
    ids=["while-snapshotting", "mid-copy"],
)
def test_client_terminated(data: Testbed, kind: str, match: dict[str, str]) -> None:
    tb = data
    targets = {key: tb.add_target("bigvm", key) for key in (2000, 2001)}
    run = run_client(
        tb,
        "bigvm",
        {k: t["nbd_url"] for k, t in targets.items()},
        "--backup-type",
        "full",
        "--chunk-size",
        str(1 * MiB),
        job_id=f"big-term-{kind}",
        on_event=_on(kind, lambda proc: proc.send_signal(signal.SIGTERM), **match),
    )
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    errors = run.of("error")
    assert errors and errors[0]["message"].startswith("cancelled: received SIGTERM"), errors
    assert not run.of("disk_done") and not run.of("done")
    assert run.of("phase")[-1]["phase"] == "cleanup"
    assert snapshots(tb, "bigvm") == []


def test_target_killed_mid_copy(data: Testbed) -> None:
    tb = data
    targets = {key: tb.add_target("bigvm", key) for key in (2000, 2001)}
    run = run_client(
        tb,
        "bigvm",
        {k: t["nbd_url"] for k, t in targets.items()},
        "--backup-type",
        "full",
        "--chunk-size",
        str(1 * MiB),
        job_id="big-nbdkill",
        on_event=_on(
            "disk_start", lambda _: os.kill(targets[2000]["pid"], signal.SIGKILL), disk_key="2000"
        ),
    )
    assert run.returncode == 1, run.stderr
    error = run.one("error", 2000)
    assert targets[2000]["export"] in error["message"], error
    assert not run.of("disk_done") and not run.of("done")
    assert snapshots(tb, "bigvm") == []


@pytest.mark.parametrize(
    ("keys", "complaint"),
    [
        ((2000, 2001, 2999), "does not have: 2999"),
        ((2000,), "without a target in --nbd-targets: 2001"),
    ],
    ids=["unknown-key", "unmapped-disk"],
)
def test_target_mapping_fails_before_any_write(
    data: Testbed, keys: tuple[int, ...], complaint: str
) -> None:
    tb = data
    real = {key: tb.add_target("bigvm", key) for key in keys if key in (2000, 2001)}
    urls = {
        key: real[key]["nbd_url"] if key in real else "nbd://127.0.0.1:10499/none" for key in keys
    }
    run = run_client(tb, "bigvm", urls, "--backup-type", "full", job_id=f"map-{len(keys)}")
    assert run.returncode == 1
    (error,) = run.of("error")
    assert complaint in error["message"] and "nothing was copied" in error["message"], error
    assert not run.of("disk_start")
    # qemu-nbd writes a qcow2's metadata at its exit: stop serving before looking.
    for target in real.values():
        tb.stop_target(target["export"])
    assert all(has_no_data(t["qcow2"]) for t in real.values())
    assert snapshots(tb, "bigvm") == []


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ("small", "disk 2000: target 127.0.0.1:{port}/small has 1048576 bytes, less than"),
        ("read_only", "disk 2000: target 127.0.0.1:{port}/read_only is read-only"),
    ],
)
@pytest.mark.parametrize("second_bad", [False, True])
def test_unusable_targets_fail_before_any_write(
    data: Testbed, tmp_path: Path, bad: str, complaint: str, second_bad: bool
) -> None:
    """Both disks' targets are opened at once; the first bad one, in disk order, is named,
    nothing is copied to the other, and the snapshot goes."""
    tb = data
    first = qemu_nbd(
        tmp_path, 1 * MiB if bad == "small" else 192 * MiB, bad, read_only=bad == "read_only"
    )
    good = None if second_bad else tb.add_target("bigvm", 2001)
    second = qemu_nbd(tmp_path, 1 * MiB, "second") if second_bad else None
    try:
        urls = {2000: first.url, 2001: second.url if second else good["nbd_url"]}
        job_id = f"unusable-{bad}-{second_bad}"
        run = run_client(tb, "bigvm", urls, "--backup-type", "full", job_id=job_id)
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
    assert run.returncode == 1
    (error,) = run.of("error")
    assert complaint.format(port=first.port) in error["message"], error
    assert error["disk_key"] == "2000"
    assert not run.of("disk_start")
    if good is not None:
        tb.stop_target(good["export"])
        assert has_no_data(good["qcow2"])
    assert snapshots(tb, "bigvm") == []


def test_nbd_reader_from_nbdkit(data: Testbed, tmp_path: Path) -> None:
    tb = data
    sockets = {key: tmp_path / f"src-{key}.sock" for key in (2000, 2016, 16000)}
    servers = [
        subprocess.Popen(
            [
                "nbdkit",
                "--foreground",
                "--readonly",
                "--exit-with-parent",
                f"--unix={sock}",
                "file",
                f"file={tb.disk('bkvm', key)['flat_file']}",
            ],
            stderr=subprocess.DEVNULL,
        )
        for key, sock in sockets.items()
    ]
    try:
        for _ in range(100):
            if all(s.exists() for s in sockets.values()):
                break
            threading.Event().wait(0.05)
        targets = {key: tb.add_target("bkvm", key) for key in sockets}
        readers = [
            f"--reader-nbd-url={key}=nbd+unix:///?socket={sock}" for key, sock in sockets.items()
        ]
        run = run_client(
            tb,
            "bkvm",
            {k: t["nbd_url"] for k, t in targets.items()},
            "--backup-type",
            "full",
            "--reader",
            "nbd",
            *readers,
            job_id="bk-nbdkit",
        )
    finally:
        for server in servers:
            server.terminate()
            server.wait()
    assert run.returncode == 0, run.stderr
    for key, target in targets.items():
        assert run.one("disk_start", key)["reader"] == "nbd"
        compare(tb, "bkvm", key, target["qcow2"])


FAKE_NBDKIT = """#!{python}
# Stands in for nbdkit with the vddk plugin: records how it was started,
# then serves the disk's flat file with the real nbdkit's file plugin.
import json, os, sys

args = sys.argv[1:]
password = os.read(3, 4096).decode()
with open(os.environ["FAKE_NBDKIT_LOG"] + "." + str(os.getpid()), "w") as log:
    json.dump({{"argv": args, "password": password, "pid": os.getpid()}}, log)
params = dict(a.split("=", 1) for a in args[args.index("vddk") + 1 :])
path = params["file"].split("] ", 1)[1].replace(".vmdk", "-flat.vmdk")
flat = os.path.join(os.environ["FAKE_DATASTORE"], path)
options = [a for a in args[: args.index("vddk")] if a.startswith("--")]
os.execvp("nbdkit", ["nbdkit", *options, "file", "file=" + flat])
"""


def test_vddk_reader_starts_nbdkit_per_disk(data: Testbed, tmp_path: Path) -> None:
    tb = data
    fake = tmp_path / "nbdkit"
    fake.write_text(FAKE_NBDKIT.format(python=sys.executable))
    fake.chmod(0o755)
    targets = {key: tb.add_target("bkvm", key) for key in (2000, 2016, 16000)}
    run = run_client(
        tb,
        "bkvm",
        {k: t["nbd_url"] for k, t in targets.items()},
        "--backup-type",
        "full",
        "--reader",
        "vddk",
        "--vddk-libdir",
        "/opt/vmware-vix-disklib",
        "--nbdkit",
        str(fake),
        "--compression-method",
        "skipz",
        job_id="bk-vddk",
        env_extra={
            "FAKE_NBDKIT_LOG": str(tmp_path / "nbdkit.json"),
            "FAKE_DATASTORE": tb.vcenter["datastore_dir"],
        },
    )
    assert run.returncode == 0, run.stderr
    for key, target in targets.items():
        assert run.one("disk_start", key)["reader"] == "vddk"
        compare(tb, "bkvm", key, target["qcow2"])
    records = [json.loads(p.read_text()) for p in tmp_path.glob("nbdkit.json.*")]
    assert len(records) == 3
    password = tb.vcenter["password"]
    for record in records:
        argv = record["argv"]
        assert record["password"] == password and password not in " ".join(argv)
        assert {"--exit-with-parent", "--readonly", "--foreground", "vddk"} <= set(argv)
        assert "password=-3" in argv and "transports=file:nbdssl:nbd" in argv
        assert "compression=skipz" in argv and "libdir=/opt/vmware-vix-disklib" in argv
        assert f"thumbprint={tb.vcenter['thumbprint']}" in argv
        assert any(re.fullmatch(r"vm=moref=vm-\d+", a) for a in argv)
        assert any(re.fullmatch(r"snapshot=snapshot-\d+", a) for a in argv)
        with pytest.raises(ProcessLookupError):
            os.kill(record["pid"], 0)  # stopped at the end of the run
    assert snapshots(tb, "bkvm") == []


@pytest.mark.parametrize(
    ("tls", "env", "outcome"),
    [
        (["--vcenter-thumbprint", ":".join(["AB"] * 20)], {}, "does not match the pinned"),
        ([], {}, "certificate verify failed"),  # the system CAs do not know the testbed's
        # What sna passes through: OpenSSL's default paths, for SOAP and /folder alike.
        ([], {"SSL_CERT_FILE": "{cert_file}"}, None),
        (["--vcenter-ca-file", "{cert_file}"], {}, None),
        (["--insecure"], {}, None),
    ],
    ids=["wrong-pin", "system-cas", "ssl-cert-file", "ca-file", "insecure"],
)
def test_vcenter_certificate(
    data: Testbed, tls: list[str], env: dict[str, str], outcome: Optional[str]
) -> None:
    tb = data
    target = tb.add_target("tlsvm", 2000)
    run = run_client(
        tb,
        "tlsvm",
        {2000: target["nbd_url"]},
        "--backup-type",
        "full",
        job_id=f"tls-{target['export']}",
        tls=[a.format(cert_file=tb.vcenter["cert_file"]) for a in tls],
        env_extra={k: v.format(cert_file=tb.vcenter["cert_file"]) for k, v in env.items()},
    )
    if outcome is None:
        assert run.returncode == 0, run.stderr
        compare(tb, "tlsvm", 2000, target["qcow2"])
    else:
        assert run.returncode == 1
        (error,) = run.of("error")
        assert outcome in error["message"], error
        tb.stop_target(target["export"])  # its metadata is written at qemu-nbd's exit
        assert has_no_data(target["qcow2"])


def test_cbt_is_not_enabled_on_a_vm_with_snapshots(data: Testbed) -> None:
    tb = data
    si = tb.connect()
    try:
        vm = si.content.searchIndex.FindByInventoryPath(tb.vm("snapvm")["path"])
        WaitForTask(vm.CreateSnapshot_Task(name="user-snap", memory=False, quiesce=False))
        targets = hub_targets(tb, "snapvm")
        run = run_client(
            tb, "snapvm", {k: t["nbd_url"] for k, t in targets.items()}, job_id="snap-cbt"
        )
        assert run.returncode == 1
        (error,) = run.of("error")
        assert "CBT is off" in error["message"] and "user-snap" in error["message"], error
        assert vm.config.changeTrackingEnabled is False
        assert snapshots(tb, "snapvm") == ["user-snap"]
    finally:
        Disconnect(si)
