"""Job ids as the SHA makes them, and the names sna derives from them.

The SHA's job id is ``backup-{vm_name}-{unix}`` with the VM name exactly as
vCenter has it: spaces, non-ASCII letters, parentheses, dots
(``reference/sha-contract.md`` §1.1 step 4, §6).  It is used byte for byte in
every answer and every call to the SHA.  Only what cannot be an id at all is
refused.  What is made of an id where its characters are not welcome (a file
name, a snapshot name) follows one documented rule each, here.
"""

from __future__ import annotations

import hashlib
import unicodedata
import urllib.parse

#: The longest job id, in characters.
MAX_JOB_ID = 255
JOB_ID_RULE = f"1-{MAX_JOB_ID} characters, not blank, without '/' or control characters"

#: A snapshot name holds at most this many characters in vSphere.
MAX_SNAPSHOT_NAME = 80
BACKUP_SNAPSHOT_PREFIX = "sbak-"
#: Prefixes of every snapshot a backup client of ours names after its job.
JOB_SNAPSHOT_PREFIXES = (BACKUP_SNAPSHOT_PREFIX, "srep-")

#: File names are limited to 255 bytes; ``backup-`` and ``.log`` take 11 of them.
_MAX_LOG_STEM = 255 - len("backup-") - len(".log")
#: Characters of a job id kept as they are in its log file's name.
_FILE_SAFE = "-._"
#: Hex digits of SHA-256 that end a shortened name.
_DIGEST = 16


class InvalidJobId(ValueError):
    """The text cannot be a job id; the message says why."""


def check_job_id(text: str) -> str:
    """``text`` if it can be a job id, else :class:`InvalidJobId` saying why."""
    if not text:
        raise InvalidJobId("job_id is empty")
    if not text.strip():
        raise InvalidJobId("job_id is blank")
    if len(text) > MAX_JOB_ID:
        raise InvalidJobId(f"job_id has {len(text)} characters, more than the {MAX_JOB_ID} allowed")
    if "/" in text:
        raise InvalidJobId("job_id must not contain '/'")
    for position, char in enumerate(text, 1):
        # Cc: control characters; Cs: lone surrogates, which no UTF-8 text can hold.
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidJobId(
                f"job_id has a control character (U+{ord(char):04X}) at position {position}"
            )
    return text


def _digest(job_id: str) -> str:
    return hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:_DIGEST]


def snapshot_name(job_id: str, prefix: str = BACKUP_SNAPSHOT_PREFIX) -> str:
    """The vSphere snapshot a job's client takes: ``sbak-{job_id}``.

    When that is longer than vSphere allows, the id is cut and ``~`` and 16
    hex digits of its SHA-256 follow, so two long ids never share a name.
    """
    name = prefix + job_id
    if len(name) <= MAX_SNAPSHOT_NAME:
        return name
    keep = MAX_SNAPSHOT_NAME - len(prefix) - 1 - _DIGEST
    return f"{prefix}{job_id[:keep]}~{_digest(job_id)}"


def job_snapshot_names(job_id: str) -> frozenset[str]:
    """Every snapshot name a client of ours may have given for ``job_id``."""
    return frozenset(snapshot_name(job_id, prefix) for prefix in JOB_SNAPSHOT_PREFIXES)


def log_file_name(job_id: str) -> str:
    """The name of a job's log file: ``backup-{E}.log``.

    ``E`` is the job id percent-encoded: each UTF-8 byte other than
    ``A-Z a-z 0-9 . _ -`` becomes ``%XX``, so ``urllib.parse.unquote`` (or any
    URL decoder) gives the id back, and an id of only those characters is
    its own name.  When ``E`` is longer than 244 bytes, it is cut after a
    whole character to leave room for ``~`` and 16 hex digits of the id's
    SHA-256.
    """
    # "~" is left alone by quote() (it is unreserved in URLs); here it marks a shortened name.
    pieces = [urllib.parse.quote(char, safe=_FILE_SAFE).replace("~", "%7E") for char in job_id]
    encoded = "".join(pieces)
    if len(encoded) > _MAX_LOG_STEM:
        # Whole characters only, so what is kept still decodes.
        room, kept = _MAX_LOG_STEM - 1 - _DIGEST, []
        for piece in pieces:
            if len(piece) > room:
                break
            kept.append(piece)
            room -= len(piece)
        encoded = f"{''.join(kept)}~{_digest(job_id)}"
    return f"backup-{encoded}.log"
