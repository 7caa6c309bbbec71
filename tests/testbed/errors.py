"""The testbed's one exception type."""


class TestbedError(RuntimeError):
    """The testbed could not be built, started, reached or used."""

    __test__ = False  # not a pytest test class, despite the name
