"""A vSphere testbed for sna's tests: a vCenter simulator with changed block
tracking (tests/vcsim), and the hub's qemu-nbd targets.

From tests::

    from tests.testbed import Testbed

    with Testbed.start({"vms": [...], "hub": True}, tmp_path) as testbed:
        testbed.write("pgtest1", 2000, offset=0, length=1 << 20, seed=1)
        si = testbed.connect()  # pyVmomi, certificate verified

or, as a fixture, ``testbed = testbed_fixture(SPEC)`` at module level.
From a terminal: ``python -m tests.testbed up --spec SPEC.json`` (see
``python -m tests.testbed --help`` and docs/testbed.md).
"""

from tests.testbed.core import DEFAULT_STATE_DIR, Testbed, load_spec, stop_state_dir
from tests.testbed.data import human_size, parse_size, pattern, pattern_chunks
from tests.testbed.errors import TestbedError
from tests.testbed.fixtures import testbed_fixture

__all__ = [
    "DEFAULT_STATE_DIR",
    "Testbed",
    "TestbedError",
    "human_size",
    "load_spec",
    "parse_size",
    "pattern",
    "pattern_chunks",
    "stop_state_dir",
    "testbed_fixture",
]
