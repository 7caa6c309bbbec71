"""Finding, and building when needed, the simulator binary (tests/vcsim)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from tests.testbed.errors import TestbedError

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "vcsim" / "build.sh"
DEFAULT_BINARY = REPO / "build" / "vcsim-cbt"
#: Names a prebuilt simulator to use instead of building build/vcsim-cbt.
BINARY_ENV = "SNA_VCSIM"

_lock = threading.Lock()
_checked: set[Path] = set()


class BuildError(TestbedError):
    """The simulator could not be built."""


def simulator_binary() -> Path:
    """The simulator to run: ``$SNA_VCSIM``, or build/vcsim-cbt brought up to date.

    The build script returns at once when the binary is current, and it is
    asked only once per process.  The first build takes about half a minute.
    """
    named = os.environ.get(BINARY_ENV)
    if named:
        path = Path(named)
        if not os.access(path, os.X_OK):
            raise BuildError(f"${BINARY_ENV} is {named}, which is not an executable file")
        return path
    with _lock:
        if DEFAULT_BINARY not in _checked:
            # All the script's output goes to our stderr (fd 2): a first build
            # is slow and a person should see why, while stdout may be the
            # channel `up` prints its JSON on.
            done = subprocess.run(
                [str(BUILD_SCRIPT), str(DEFAULT_BINARY)],
                stdin=subprocess.DEVNULL,
                stdout=2,
                check=False,
            )
            if done.returncode != 0:
                raise BuildError(
                    f"{BUILD_SCRIPT} failed (exit {done.returncode}); see its messages above"
                )
            _checked.add(DEFAULT_BINARY)
    return DEFAULT_BINARY
