"""The standby handshake between the daemon and a backup client started before its job.

Starting ``sendense-backup-client`` costs about 0.2 s of imports before it
does anything, which is most of a small incremental's wall time.  So the
daemon keeps a *spare*: a client started ahead of any job as::

    sendense-backup-client standby --spare-id ID

It imports everything, prints :data:`READY_LINE` on stdout and waits on
stdin.  When a job starts, the daemon writes one line there (see
:func:`encode_job`): the job's argv (what would follow the program's name)
and the environment variables the job adds, the vCenter password among them.
Then it closes stdin.  From then on the spare is that job's client in every
way: same events, same exit status.  End of file instead of a job means "not
needed": the spare exits 0.

The password thus reaches the client through a pipe, never through any
process's argv or environment.  ``ID`` names the process for the daemon after
a restart (a spare's argv does not name its job).

This module is shared by both sides and imports nothing heavy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

#: What a spare prints on stdout once it is ready for a job.
READY_LINE = b'{"event":"standby"}'

#: The subcommand and option that make a client a spare.
COMMAND = "standby"
SPARE_ID_OPTION = "--spare-id"

#: A handover line longer than this is refused (a job's argv is a few KiB).
MAX_JOB_LINE = 1 << 20


class HandoverError(ValueError):
    """The daemon's handover line is not a job."""


def encode_job(argv: Sequence[str], env: Mapping[str, str]) -> bytes:
    """The one line a spare reads: ``{"argv": [...], "env": {...}}`` and a newline."""
    line = json.dumps({"argv": list(argv), "env": dict(env)}, separators=(",", ":"))
    return line.encode("utf-8") + b"\n"


def decode_job(line: bytes) -> tuple[list[str], dict[str, str]]:
    """The job's argv and added environment, or :class:`HandoverError`."""
    if len(line) > MAX_JOB_LINE:
        raise HandoverError(f"the job line is longer than {MAX_JOB_LINE} bytes")
    try:
        job = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandoverError(f"the job line is not JSON: {e}") from None
    if not isinstance(job, dict):
        raise HandoverError("the job line is not a JSON object")
    argv, env = job.get("argv"), job.get("env", {})
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise HandoverError('"argv" must be a list of strings')
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise HandoverError('"env" must be an object of strings')
    return argv, env
