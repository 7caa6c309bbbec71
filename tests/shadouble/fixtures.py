"""A pytest fixture factory for SHA doubles: ``sha = sha_double_fixture()`` at module level.

Each use gets a double of its own under the test's temporary directory,
started before the test and stopped by pid after it, even when it failed.
Assign the factory's result to a module-level name; the fixture has that name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from tests.shadouble.client import TEST_PORTS, ShaDouble

Scope = Literal["session", "package", "module", "class", "function"]


def sha_double_fixture(*, ports: range = TEST_PORTS, scope: Scope = "function") -> Any:
    """A pytest fixture yielding a started :class:`ShaDouble` on qemu-nbd ``ports``."""
    import pytest

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShaDouble]:
        double = ShaDouble(tmp_path_factory.mktemp("sha-double"), ports)
        double.start()
        try:
            yield double
        finally:
            double.close()

    return fixture
