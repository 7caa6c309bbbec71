"""A SHA test double: a real HTTP server that behaves like the Sendense hub's backup side.

It keeps the SHA's rows and applies its rules, with its strictness, to the
three routes the node calls (reference/sha-contract.md §2): change IDs,
per-disk completion and telemetry; and it starts backups the SHA's way
(§1: qcow2 files, qemu-nbd, the ``/backup/start`` body), so the daemon's
calls to the hub can be tested end to end.  Loopback only.

- :mod:`~tests.shadouble.gojson`: Go's ``encoding/json``, as the SHA decodes and encodes.
- :mod:`~tests.shadouble.model`: the rows and the routes' rules (pure, clock injected).
- :mod:`~tests.shadouble.routes`: Go's request parsing and gorilla/mux (pure).
- :mod:`~tests.shadouble.start`: ``POST /_double/backups``, the SHA's start, over a Hub.
- :mod:`~tests.shadouble.realhub`: qemu-img, qemu-nbd and HTTP to the node.
- :mod:`~tests.shadouble.server`: the HTTP server, control routes, state file.
- :mod:`~tests.shadouble.client`: :class:`ShaDouble`, to run one from tests (stdlib only).
- :mod:`~tests.shadouble.fixtures`: a pytest fixture factory.

Run one by hand: ``python -m tests.shadouble --help``.
"""
