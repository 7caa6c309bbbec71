"""The rules both sides share: job ids, the names made of them, disk identity, argv words."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sna.api import validation
from sna.backup.options import parse_args
from sna.config import Settings
from sna.contract import argv, disks, ids, targets, vcenter
from sna.sbc.command import ClientCommand

SHA_IDS = [
    "backup-pgtest1-1760099954",
    "backup-SQL Server 01-1796166100",
    "backup-Büro-Server (alt) v1.2-1796166100",
    "backup-50% done-1",
    "..",
]


@pytest.mark.parametrize("job_id", SHA_IDS)
def test_the_sha_s_ids_are_job_ids(job_id: str) -> None:
    assert ids.check_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "job_id, reason",
    [
        ("", "empty"),
        (" \t", "blank"),
        ("a/b", "'/'"),
        ("a\nb", "U+000A"),
        ("a\x85b", "U+0085"),
        ("a\ud800", "U+D800"),
        ("é" * 256, "256 characters"),
    ],
)
def test_what_cannot_be_an_id(job_id: str, reason: str) -> None:
    with pytest.raises(ids.InvalidJobId, match=reason.replace("+", r"\+")):
        ids.check_job_id(job_id)


def test_log_file_names_of_plain_ids_are_unchanged() -> None:
    assert ids.log_file_name("backup-pgtest1-1760099954") == "backup-backup-pgtest1-1760099954.log"


@given(
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"),
        min_size=1,
        max_size=255,
    )
)
def test_log_file_names_are_safe_and_reversible(job_id: str) -> None:
    name = ids.log_file_name(job_id)
    assert len(name.encode()) <= 255
    assert name.isascii() and "/" not in name and name.startswith("backup-")
    stem = name.removeprefix("backup-").removesuffix(".log")
    if "~" not in stem:
        assert urllib.parse.unquote(stem) == job_id
    else:
        # Shortened: what is kept still decodes to the id's beginning.
        kept = urllib.parse.unquote(stem.rpartition("~")[0], errors="strict")
        assert job_id.startswith(kept)


def test_a_tilde_is_encoded_it_marks_shortened_names() -> None:
    assert ids.log_file_name("a~b") == "backup-a%7Eb.log"


def test_long_ids_get_distinct_short_names() -> None:
    a, b = "backup-" + "ü" * 200 + "-1", "backup-" + "ü" * 200 + "-2"
    assert ids.log_file_name(a) != ids.log_file_name(b)
    assert ids.snapshot_name(a) != ids.snapshot_name(b)
    assert len(ids.snapshot_name(a)) == ids.MAX_SNAPSHOT_NAME


def test_snapshot_names() -> None:
    assert ids.snapshot_name("backup-SQL Server 01-1") == "sbak-backup-SQL Server 01-1"
    # As long as vSphere allows: kept whole (what the client always named its snapshots).
    assert ids.snapshot_name("x" * 75) == "sbak-" + "x" * 75
    assert ids.snapshot_name("x" * 76).startswith("sbak-" + "x" * 58 + "~")
    assert ids.job_snapshot_names("j") == {"sbak-j", "srep-j"}


def test_the_sha_disk_order_is_by_text() -> None:
    assert disks.sha_order(["2000", "16000", "2001"]) == ["16000", "2000", "2001"]
    assert disks.disk_indexes(["2001", "2000"]) == {"2000": 0, "2001": 1}


def test_targets_keyed_by_the_vm_s_keys_map_exactly() -> None:
    mapping = disks.map_disks(["2000", "16000"], ["16000", "2000"])
    assert mapping is not None and mapping.mode == "exact"
    assert mapping.targets == {"2000": "2000", "16000": "16000"}


def test_targets_keyed_the_sha_s_way_map_by_position() -> None:
    # SCSI 2000 and SATA 16000: the SHA sorts "disk-16000" first, so it is 2000.
    mapping = disks.map_disks(["2000", "16000"], ["2000", "2001"])
    assert mapping is not None and mapping.mode == "positional"
    assert mapping.targets == {"16000": "2000", "2000": "2001"}
    gap = disks.map_disks(["2000", "2001", "2002", "2008"], disks.sha_keys(4))
    assert gap is not None and gap.targets["2008"] == "2003"


@pytest.mark.parametrize(
    "disk_keys, target_keys",
    [
        (["2000", "2001"], ["2000"]),  # a disk without a target
        (["2000"], ["2000", "2001"]),  # a target without a disk
        (["2000", "16000"], ["2000", "2002"]),  # neither the VM's keys nor the SHA's
        (["2000", "2016"], ["2001", "2002"]),
        (["2000", "2001"], ["2000", "2000"]),
    ],
)
def test_other_mismatches_map_nothing(disk_keys: list[str], target_keys: list[str]) -> None:
    assert disks.map_disks(disk_keys, target_keys) is None


def test_argv_words() -> None:
    assert argv.option("--job-id", "-x y") == "--job-id=-x y"
    assert argv.option_value(["migrate", "--job-id=-x=y"], "--job-id") == "-x=y"
    assert argv.option_value(["--job-id", "j"], "--job-id") == "j"
    assert argv.option_value(["--job-ids=j"], "--job-id") is None
    assert argv.option_value(["--job-id"], "--job-id") is None


export_text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
).filter(lambda t: t.isprintable())
nbd_targets = st.lists(
    st.builds(
        targets.NbdTarget,
        st.integers(0, 999_999_999).map(str),
        st.sampled_from(["127.0.0.1", "::1", "localhost", "fe80::2"]),
        st.integers(1, 65535),
        export_text,
    ),
    min_size=1,
    max_size=8,
    unique_by=(lambda t: t.disk_key, lambda t: t.port),
)


@given(nbd_targets)
def test_what_one_side_writes_the_other_reads(written: list[targets.NbdTarget]) -> None:
    """The daemon's relayed targets, exports with commas, spaces or % included."""
    text = targets.format_targets(written)
    assert targets.parse_targets(text) == tuple(written)
    assert targets.parse_targets(text, lenient=True) == tuple(written)


def test_what_the_sha_writes_the_api_reads_and_hands_on_unchanged() -> None:
    """The SHA puts the VM name raw in the export (sha-contract.md §6)."""
    sha = "2000:nbd://127.0.0.1:10100/SQL Server 01-disk0,2001:nbd://127.0.0.1:10101/Büro-disk1"
    read = validation.parse_targets(sha, Settings())
    assert [t.export for t in read] == ["SQL Server 01-disk0", "Büro-disk1"]
    assert targets.parse_targets(targets.format_targets(read)) == read


def test_the_go_client_s_defaults_only_when_lenient() -> None:
    assert targets.parse_targets("2000:nbd:///x", lenient=True) == (
        targets.NbdTarget("2000", "127.0.0.1", 10809, "x"),
    )
    with pytest.raises(targets.TargetError, match=r"entry 1 .* the URL has no host"):
        targets.parse_targets("2000:nbd:///x")
    with pytest.raises(targets.TargetError, match="the URL has no port"):
        targets.parse_targets("2000:nbd://h/x")


job_ids = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"),
    min_size=1,
    max_size=255,
).filter(lambda t: t.strip() != "")
# What the API lets through in a user name or a VM path: no control characters.
words = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1)
change_id = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=80
).filter(lambda t: t.strip() not in ("", "PLACEHOLDER"))


@given(
    job_id=job_ids,
    user=words.filter(lambda t: t.strip() != ""),
    vm_path=words.filter(lambda t: t.strip() != ""),
    endpoint=st.sampled_from(["vc.example.local", "127.0.0.1:8443", "https://[::1]:9443/sdk"]),
    backup_type=st.sampled_from(["full", "incremental"]),
    previous=st.none() | change_id,
    per_disk=st.dictionaries(st.sampled_from(["2000", "2001"]), change_id, max_size=2),
    thumbprint=st.none() | st.sampled_from(["ab" * 20, "CD:" * 31 + "CD"]),
    exports=st.lists(export_text, min_size=2, max_size=2),
)
def test_every_request_the_api_accepts_the_client_reads_back(
    job_id: str,
    user: str,
    vm_path: str,
    endpoint: str,
    backup_type: str,
    previous: str | None,
    per_disk: dict[str, str],
    thumbprint: str | None,
    exports: list[str],
) -> None:
    body = {
        "job_id": job_id,
        "vm_name": "vm",
        "vcenter_host": endpoint,
        "vcenter_user": user,
        "vcenter_password": "pa55 -w0rd",
        "vm_path": vm_path,
        "nbd_targets": ",".join(
            f"{2000 + i}:nbd://127.0.0.1:{10100 + i}/{urllib.parse.quote(e, safe='')}"
            for i, e in enumerate(exports)
        ),
        "backup_type": backup_type,
        "previous_change_id": previous,
        "previous_change_ids": per_disk,
        "vcenter_thumbprint": thumbprint,
    }
    request = validation.parse_backup_request(body, Settings(), sha=True)
    command = ClientCommand.parse("/usr/bin/sendense-backup-client")
    options = parse_args(command.arguments(request), command.environment(request, {}))
    assert (options.job_id, options.user, options.vm_path) == (job_id, user, vm_path)
    assert (options.host, options.port) == vcenter.parse_address(endpoint)
    assert options.password == "pa55 -w0rd" and not options.password_from_argv
    assert options.targets == request.targets
    assert options.backup_type == backup_type
    assert options.previous_change_id == request.previous_change_id
    assert dict(options.previous_change_ids) == dict(request.previous_change_ids)
    assert options.tls.thumbprint == request.vcenter_thumbprint
