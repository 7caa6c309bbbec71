"""A pytest fixture factory for testbeds."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from tests.testbed.core import Testbed

Scope = Literal["session", "package", "module", "class", "function"]


def testbed_fixture(spec: Mapping[str, Any], *, scope: Scope = "module") -> Any:
    """A pytest fixture that starts a testbed of ``spec`` and stops it after.

    Use it at module level: ``testbed = testbed_fixture(SPEC)``.  The testbed
    lives in a temporary directory of the session; its processes are stopped
    by pid when the scope ends, even when a test failed.
    """
    import pytest

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
        testbed = Testbed.start(spec, tmp_path_factory.mktemp("testbed"))
        try:
            yield testbed
        finally:
            testbed.stop()

    return fixture


# Its name starts with "test": this keeps pytest from collecting it where it is imported.
testbed_fixture.__test__ = False  # type: ignore[attr-defined]
