"""Change IDs: parsing, and which ones may serve as an incremental's base."""

from __future__ import annotations

import pytest

from sna.backup.changeid import InvalidChangeId, parse_change_id, try_parse
from sna.backup.job import decide
from sna.backup.vsphere import SnapshotDisk

ID = "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b/78"
SAME_INSTANCE = "52 AB F5 21 86 AD F2 FF-5B EF C0 F2 3B 53 EB 3B/5"
OTHER_INSTANCE = "52 b9 f6 04 5c e3 b9 0c-3a c9 a8 71 42 00 2b 89/105"


def test_parse_keeps_the_exact_text() -> None:
    change_id = parse_change_id(ID)
    assert change_id.text == ID
    assert change_id.uuid == "52abf52186adf2ff5befc0f23b53eb3b"
    assert change_id.sequence == 78
    assert change_id.uuid_text == "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b"


def test_uuid_comparison_ignores_case_and_spacing() -> None:
    assert parse_change_id(ID).same_instance(parse_change_id(SAME_INSTANCE))
    assert parse_change_id("52abf52186adf2ff5befc0f23b53eb3b/1").same_instance(parse_change_id(ID))
    assert not parse_change_id(ID).same_instance(parse_change_id(OTHER_INSTANCE))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "*",
        "PLACEHOLDER",
        "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b",  # no sequence
        "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb/78",  # 15 bytes
        "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b 00/78",  # 17 bytes
        "52 ab f5 21 86 ad f2 zz-5b ef c0 f2 3b 53 eb 3b/78",
        "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b/-1",
        "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b/7x",
        "52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b/\n78",
        "x" * 300 + "/1",
    ],
)
def test_malformed_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidChangeId):
        parse_change_id(text)
    assert try_parse(text) is None


def test_try_parse_none() -> None:
    assert try_parse(None) is None


DISK = SnapshotDisk(
    key="2000",
    label="Hard disk 1",
    capacity=17 << 20,
    file_name="[ds] vm/vm.vmdk",
    datastore="ds",
    path="vm/vm.vmdk",
    change_id=ID,
    backing_type="FlatVer2BackingInfo",
    has_parent=False,
)
CURRENT = parse_change_id(ID)


def test_incremental_only_from_the_same_instance_and_size() -> None:
    decision = decide(DISK, CURRENT, "incremental", SAME_INSTANCE, DISK.capacity)
    assert decision.sync_type == "incremental"
    assert decision.base is not None and decision.base.text == SAME_INSTANCE
    # No --backup-type (the Go client's way): incremental where possible.
    assert decide(DISK, CURRENT, None, SAME_INSTANCE).sync_type == "incremental"
    # No record of the size then: vSphere's tracking instance decides alone.
    assert decide(DISK, CURRENT, "incremental", SAME_INSTANCE, None).sync_type == "incremental"


@pytest.mark.parametrize(
    ("backup_type", "previous", "capacity_then", "reason"),
    [
        ("full", SAME_INSTANCE, 17 << 20, "backup_type full requested"),
        ("incremental", None, 17 << 20, "no previous change ID"),
        ("incremental", "", 17 << 20, "no previous change ID"),
        ("incremental", "PLACEHOLDER", 17 << 20, "not usable"),
        ("incremental", OTHER_INSTANCE, 17 << 20, "another CBT tracking instance"),
        ("incremental", ID.replace("/78", "/79"), 17 << 20, "newer than the snapshot's"),
        ("incremental", SAME_INSTANCE, (17 << 20) - 512, "resized since the previous change ID"),
    ],
)
def test_full_and_why(backup_type: str, previous: str, capacity_then: int, reason: str) -> None:
    decision = decide(DISK, CURRENT, backup_type, previous, capacity_then)
    assert decision.sync_type == "full"
    assert decision.base is None
    assert reason in decision.reason
