"""``python -m tests.testbed``: the vSphere testbed from a terminal.

Commands: ``up --spec SPEC.json`` starts a testbed, prints one JSON object and
stays up until interrupted; ``down`` stops what an ``up`` started; ``write``
puts bytes into a disk and marks them for changed block tracking; ``cbt``
shows a disk's tracking state; ``info`` prints the JSON again; ``build``
builds the simulator.  ``--help`` on each says more.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from tests.testbed import binary, procs
from tests.testbed.core import DEFAULT_STATE_DIR, OWNER_UP, Testbed, stop_state_dir
from tests.testbed.data import human_size, parse_size
from tests.testbed.errors import TestbedError

EXAMPLE_SPEC = Path(__file__).with_name("example-spec.json")


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _areas(areas: list[dict[str, int]], limit: int = 4) -> str:
    """``[0, 64 KiB) [320 KiB, 448 KiB) …`` for a list of byte ranges."""
    if not areas:
        return "none"
    shown = " ".join(
        f"[{human_size(a['start'])}, {human_size(a['start'] + a['length'])})" for a in areas[:limit]
    )
    more = f" and {len(areas) - limit} more" if len(areas) > limit else ""
    total = human_size(sum(a["length"] for a in areas))
    return f"{shown}{more} ({total} in {len(areas)} area{'s' if len(areas) != 1 else ''})"


def _summary(info: dict[str, Any]) -> None:
    vc = info["vcenter"]
    _say(f"testbed up: vCenter simulator at {vc['url']}")
    _say(f"  user {vc['user']}   password {vc['password']}")
    _say(f"  thumbprint {vc['thumbprint']}")
    by_disk = {(t["vm"], t["disk_key"]): t["nbd_url"] for t in info["targets"]}
    for vm in info["vms"]:
        cbt = "CBT on" if vm["cbt_enabled"] else "CBT off"
        _say(f"  {vm['path']}  ({vm['moref']}, {vm['power_state']}, {cbt})")
        for disk in vm["disks"]:
            where = f"{disk['controller']}({disk['bus']}:{disk['unit']})"
            target = by_disk.get((vm["name"], disk["key"]))
            arrow = f"  -> {target}" if target else ""
            _say(
                f"    disk {disk['key']:<6} {disk['label']:<12} {where:<11} "
                f"{human_size(disk['capacity_bytes'])}{arrow}"
            )
    _say(f"  state and logs in {_relative(Path(info['state_dir']))}")
    _say("  stop with Ctrl-C here, or `python -m tests.testbed down` from another terminal")


def cmd_up(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        testbed = Testbed.start(args.spec, args.state, owner=OWNER_UP)
    except TestbedError as e:
        _say(f"testbed up: {e}")
        return 1
    try:
        if sys.stdout.isatty():
            print(json.dumps(testbed.info, indent=2), flush=True)
        else:
            # One line: a program reading `up`'s output needs only readline().
            print(json.dumps(testbed.info), flush=True)
        _summary(testbed.info)
        while not stop.wait(0.5):
            try:
                testbed.check()
            except TestbedError as e:
                _say(f"testbed up: {e}")
                return 1
        return 0
    finally:
        stopped = testbed.stop()
        _say(f"testbed down: stopped {_names(stopped)}")


def _names(records: list[procs.ProcessRecord]) -> str:
    if not records:
        return "nothing (all had exited)"
    return ", ".join(f"{r.role} (pid {r.pid})" for r in records)


def cmd_down(args: argparse.Namespace) -> int:
    try:
        stopped = stop_state_dir(args.state)
    except TestbedError:
        _say(f"testbed down: no testbed is running in {_relative(args.state)}")
        return 0
    _say(f"testbed down: stopped {_names(stopped)}")
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    testbed = Testbed.attach(args.state)
    seed = args.seed
    if not args.zero and seed is None:
        seed = 0
    answer = testbed.write(args.vm, args.disk, args.offset, args.length, seed=seed, zero=args.zero)
    if args.json:
        print(json.dumps(answer))
        return 0
    what = "zeros" if args.zero else f"the seed-{seed} pattern"
    start, end = answer["offset"], answer["offset"] + answer["length"]
    blocks = answer["blocks"][0]
    count = blocks["length"] // answer["block_size"] or 1
    print(f"{answer['path']}  disk {answer['disk_key']} ({answer['label']})")
    print(
        f"  wrote      {human_size(answer['length'])} of {what} at [{human_size(start)}, {human_size(end)})"
    )
    print(f"  flat file  {_relative(Path(answer['flat_file']))}")
    print(
        f"  CBT        {count} block{'s' if count != 1 else ''} of {human_size(answer['block_size'])} "
        f"marked: [{human_size(blocks['start'])}, {human_size(blocks['start'] + blocks['length'])})"
    )
    if answer["cbt_enabled"]:
        uuid, _, seq = answer["change_id"].rpartition("/")
        print(f"  changed since {answer['change_id']}: {_areas(answer['pending'])}")
        print(f"  the next snapshot gets change ID {uuid}/{int(seq) + 1}")
    else:
        print('  CBT is off on this VM; once it is on, changeId "*" counts this area as allocated')
    return 0


def cmd_cbt(args: argparse.Namespace) -> int:
    testbed = Testbed.attach(args.state)
    state = testbed.cbt_state(args.vm, args.disk)
    if args.json:
        print(json.dumps(state))
        return 0
    print(
        f"{state['path']}  disk {state['disk_key']}  (CBT blocks of {human_size(state['block_size'])})"
    )
    print(f'  written ("*")   {_areas(state["written"])}')
    if not state["cbt_enabled"]:
        print("  CBT is off on this VM")
        return 0
    for n, entry in enumerate(state["history"]):
        what = "tracking started" if n == 0 else f"changed {_areas(entry['changed'])}"
        print(f"  {entry['change_id']}  {what}")
    print(f"  pending (since the latest ID)  {_areas(state['pending'])}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    testbed = Testbed.attach(args.state)
    print(json.dumps(testbed.info, indent=2 if sys.stdout.isatty() else None))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    print(binary.simulator_binary())
    return 0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description="A vCenter simulator with changed block tracking, and the hub's "
        "qemu-nbd targets, for sna's tests and demos.",
        epilog=f"Example spec: {_relative(EXAMPLE_SPEC)}.  Details: docs/testbed.md.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--state",
            type=Path,
            default=DEFAULT_STATE_DIR,
            metavar="DIR",
            help=f"the testbed's state directory (default {_relative(DEFAULT_STATE_DIR)})",
        )
        return sub

    up = command("up", "start a testbed and stay up until interrupted")
    up.add_argument("--spec", type=Path, required=True, help="the spec (JSON file)")
    up.set_defaults(run=cmd_up)

    down = command("down", "stop what an `up` started")
    down.set_defaults(run=cmd_down)

    def disk_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--vm", required=True, help="inventory path (/DC0/vm/pgtest1), name or moref"
        )
        sub.add_argument(
            "--disk", type=int, required=True, metavar="KEY", help="the disk's device key"
        )
        sub.add_argument("--json", action="store_true", help="print the simulator's answer as JSON")

    write = command("write", "write bytes into a disk and mark them for changed block tracking")
    disk_args(write)
    write.add_argument(
        "--offset", type=_size, required=True, help="byte offset (4096, 64K, 1M, ...)"
    )
    write.add_argument(
        "--length", type=_size, required=True, help="byte count (4096, 64K, 1M, ...)"
    )
    what = write.add_mutually_exclusive_group()
    what.add_argument(
        "--seed", type=int, help="write the deterministic pattern of this seed (default 0)"
    )
    what.add_argument("--zero", action="store_true", help="write zeros")
    write.set_defaults(run=cmd_write)

    cbt = command("cbt", "show a disk's changed block tracking state")
    disk_args(cbt)
    cbt.set_defaults(run=cmd_cbt)

    info = command("info", "print the running testbed's JSON again")
    info.set_defaults(run=cmd_info)

    build = commands.add_parser("build", help="build the simulator and print its path")
    build.set_defaults(run=cmd_build)
    return top


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except TestbedError as e:
        _say(f"testbed {args.command}: {e}")
        return 1
    except BrokenPipeError:
        # The reader went away (`... | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
