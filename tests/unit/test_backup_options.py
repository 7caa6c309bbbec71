"""The client's argv: the Go client's flags, sna's additions, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from sna.backup.options import NbdAddress, UsageError, parse_args, parse_endpoint
from sna.contract.targets import NbdTarget

ENV = {"SNA_VCENTER_PASSWORD": "s3cret"}
BASE = [
    "migrate",
    "--vmware-endpoint",
    "vc.example:8443",
    "--vmware-username",
    "administrator@vsphere.local",
    "--vmware-path",
    "/DC0/vm/pgtest1",
    "--nbd-targets",
    "2000:nbd://127.0.0.1:10100/pgtest1-disk0,2016:nbd://127.0.0.1:10101/disk%20two",
    "--job-id",
    "backup-pgtest1-1",
]


def parse(*extra: str, env: Any = ENV) -> Any:
    return parse_args([*BASE, *extra], env)


def test_the_daemons_command_line() -> None:
    options = parse("--backup-type", "incremental", "--previous-change-id", "52 aa/3")
    assert (options.host, options.port) == ("vc.example", 8443)
    assert options.password == "s3cret"
    assert options.snapshot_name == "sbak-backup-pgtest1-1"
    assert options.targets == (
        NbdTarget("2000", "127.0.0.1", 10100, "pgtest1-disk0"),
        NbdTarget("2016", "127.0.0.1", 10101, "disk two"),
    )
    assert options.backup_type == "incremental"
    assert options.previous_for("2000") == "52 aa/3"
    assert options.reader == "folder"
    assert options.quiesce is False
    assert "s3cret" not in repr(options)


def test_go_client_flags_are_accepted_and_ignored() -> None:
    options = parse(
        "--vmware-password",
        "on-argv",
        "--quiesce-snapshot=false",
        "--debug",
        "--compression-method",
        "skipz",
        "--disk-bus-type",
        "virtio",
        "--vz-unsafe-volume-by-name",
    )
    assert options.password == "s3cret"  # the environment wins over argv
    assert not options.password_from_argv
    assert options.quiesce is False and options.debug
    assert parse("--quiesce-snapshot").quiesce is True


def test_password_from_argv_only_without_the_environment() -> None:
    options = parse("--vmware-password", "on-argv", env={})
    assert options.password == "on-argv" and options.password_from_argv
    with pytest.raises(UsageError, match="SNA_VCENTER_PASSWORD"):
        parse(env={})


def test_previous_change_ids_win_per_disk() -> None:
    options = parse(
        "--previous-change-id",
        "52 all/1",
        "--previous-change-ids",
        '{"2000": "52 one/7", "2016": null}',
    )
    assert options.previous_for("2000") == "52 one/7"
    assert options.previous_for("2016") == "52 all/1"
    assert options.previous_for("16000") == "52 all/1"


def test_job_id_from_the_environment() -> None:
    argv = [a for a in BASE if a not in ("--job-id", "backup-pgtest1-1")]
    options = parse_args(argv, {**ENV, "MIGRATEKIT_JOB_ID": "backup-x"})
    assert options.job_id == "backup-x"


def test_nbd_reader_urls() -> None:
    options = parse(
        "--reader",
        "nbd",
        "--reader-nbd-url",
        "2000=nbd+unix:///?socket=/run/vddk/2000.sock",
        "--reader-nbd-url=2016=nbd://127.0.0.1:10809/src",
    )
    assert options.reader_nbd["2000"] == NbdAddress(export="", socket="/run/vddk/2000.sock")
    assert options.reader_nbd["2016"] == NbdAddress(export="src", host="127.0.0.1", port=10809)


def test_single_disk_mode_without_targets() -> None:
    argv = [a for a in BASE]
    i = argv.index("--nbd-targets")
    del argv[i : i + 2]
    options = parse_args([*argv, "--nbd-port", "10150"], ENV)
    assert options.targets == (NbdTarget("", "127.0.0.1", 10150, "migration"),)


def test_tls_choices() -> None:
    pinned = parse("--vcenter-thumbprint", "ab:cd" + ":ef" * 18)
    assert pinned.tls.thumbprint == "AB:CD" + ":EF" * 18
    assert parse("--insecure").tls.insecure
    assert parse().tls.thumbprint is None and not parse().tls.insecure
    # The daemon may add its own --insecure or CA file to a request's pin: the pin wins.
    both = parse("--insecure", "--vcenter-ca-file", "/ca.pem", "--vcenter-thumbprint", "ab" * 20)
    assert both.tls.thumbprint and both.tls.describe().startswith("certificate pinned")
    with pytest.raises(UsageError, match="thumbprint"):
        parse("--vcenter-thumbprint", "abc")


def test_target_zero_trust() -> None:
    assert parse("--backup-type", "full").targets_zero()
    assert not parse("--backup-type", "incremental").targets_zero()
    assert not parse().targets_zero()
    assert parse("--target-zero", "yes").targets_zero()
    assert not parse("--backup-type", "full", "--target-zero", "no").targets_zero()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nbd-targets", "2000:nbd://h:1/a,2000:nbd://h:2/b"], "disk key 2000 is already used"),
        (["--nbd-targets", "2000:nbd://h:1/a,2001:nbd://h:1/b"], "port 1 is already used"),
        (["--nbd-targets", "disk0:nbd://h:1/a"], "not a number"),
        (["--nbd-targets", "2000:nbd://h:1/"], "names no export"),
        (["--nbd-targets", "2000:http://h:1/a"], "must look like"),
        (["--nbd-targets", "2000:nbd://h:1/a,"], "is empty"),
        (["--nbd-targets", "2000:nbd://h:99999/a"], "not a number from 1 to 65535"),
        (["--previous-change-ids", "[1]"], "JSON object"),
        (["--previous-change-ids", "{"], "not JSON"),
        (["--previous-change-ids", '{"2000": 7}'], "not a string"),
        (["--reader", "nbd"], "--reader-nbd-url"),
        (["--reader-nbd-url", "2000=nbd://h/x"], "needs --reader nbd"),
        (["--reader", "nbd", "--reader-nbd-url", "2000=nbd+unix:///x"], "socket"),
        (["--backup-type", "differential"], "invalid choice"),
        (["--chunk-size", "0"], "positive"),
        (["--chunk-size", "1000000"], "multiple of 4096"),
        (["--no-such-flag"], "unrecognized"),
        (["--job-id", "x" * 256], "more than the 255 allowed"),
        (["--job-id=backup-a/b-1"], "must not contain '/'"),
        (["--job-id=backup-\x1b[31m-1"], "control character"),
        (["--job-id= "], "blank"),
    ],
)
def test_refused(extra: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*extra)


def test_command_is_required() -> None:
    with pytest.raises(UsageError):
        parse_args(BASE[1:], ENV)
    with pytest.raises(UsageError):
        parse_args(["cutover", *BASE[1:]], ENV)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vc", ("vc", 443)),
        ("vc:8443", ("vc", 8443)),
        ("https://vc/sdk", ("vc", 443)),
        ("https://vc:9443/sdk", ("vc", 9443)),
        ("[::1]:8443", ("::1", 8443)),
    ],
)
def test_endpoints(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "http://vc/sdk", "vc/path", "vc:port", "https://vc/other"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(UsageError):
        parse_endpoint(text)
