"""``python -m tests.shadouble``: run a SHA double until SIGTERM or SIGINT.

    python -m tests.shadouble --listen-port 0 --state FILE --workdir DIR \\
        --ports LO-HI [--port-file FILE] [--any-port]

It listens on 127.0.0.1 only and writes the port it got to ``--port-file``
once it listens.  SIGTERM or SIGINT: stop every qemu-nbd it started, save,
exit 0.  SIGUSR1: stop listening (the SHA is down; its qemu-nbd processes
keep serving, as the SHA's orphans would, §1.4); SIGUSR2: listen again on
the same port.

Signal handlers only set flags; the main thread acts on them, because
stopping the server waits for its serving thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Optional

from tests.shadouble.server import Double

POLL = 0.05
REBIND_DEADLINE = 10.0


def port_range(text: str) -> range:
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range LO-HI: {text!r}") from None
    if not 0 < first <= last < 65536:
        raise argparse.ArgumentTypeError(f"not a port range LO-HI: {text!r}")
    return range(first, last + 1)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.shadouble",
        description="Run a SHA test double on 127.0.0.1 until SIGTERM or SIGINT.",
    )
    parser.add_argument("--listen-port", type=int, default=0, help="0 for any free port")
    parser.add_argument(
        "--any-port", action="store_true", help="if --listen-port is taken, take any"
    )
    parser.add_argument("--state", type=Path, required=True, help="the state file (JSON)")
    parser.add_argument("--workdir", type=Path, required=True, help="where the qcow2 files go")
    parser.add_argument(
        "--ports", type=port_range, default=range(10100, 10201), help="qemu-nbd ports"
    )
    parser.add_argument("--port-file", type=Path, help="written with the port once listening")
    return parser.parse_args(argv)


def write_atomically(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temp, path)


class Flags:
    """What the signal handlers ask of the main thread."""

    def __init__(self) -> None:
        self.stop = False
        self.down = False
        self.up = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGUSR1, self._down)
        signal.signal(signal.SIGUSR2, self._up)

    def _stop(self, signum: int, frame: Optional[FrameType]) -> None:
        self.stop = True

    def _down(self, signum: int, frame: Optional[FrameType]) -> None:
        self.down, self.up = True, False

    def _up(self, signum: int, frame: Optional[FrameType]) -> None:
        self.up, self.down = True, False


def rebind(double: Double, port: int) -> None:
    end = time.monotonic() + REBIND_DEADLINE
    while True:
        try:
            double.listen(port)
            return
        except OSError as e:
            if time.monotonic() > end:
                print(
                    f"sha-double: cannot listen on {port} again: {e}", file=sys.stderr, flush=True
                )
                return
            time.sleep(0.1)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    flags = Flags()
    flags.install()
    double = Double(args.state, args.workdir, args.ports)
    try:
        port = double.listen(args.listen_port, args.any_port)
        if args.port_file is not None:
            write_atomically(args.port_file, f"{port}\n")
        print(f"sha-double: listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        while not flags.stop:
            if flags.down and double.up:
                flags.down = False
                double.down()
                print("sha-double: down", file=sys.stderr, flush=True)
            if flags.up and not double.up:
                flags.up = False
                rebind(double, port)
                print("sha-double: up again", file=sys.stderr, flush=True)
            time.sleep(POLL)
    finally:
        double.close()
    print("sha-double: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
