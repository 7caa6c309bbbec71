"""Job logs: the file of every line a job's client printed, and the directory they go in.

:class:`JobLog` appends timestamped lines to one job's log
(:func:`sna.contract.ids.log_file_name`); :class:`LogDirectory` settles where
logs go, the preferred directory or one under the state dir.  What a line says
(masking, parsing) is the protocol's business, not this module's; it never
reads a log back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Optional

from twisted.logger import Logger
from twisted.python.filepath import FilePath


class JobLog:
    """A job's log (:func:`sna.contract.ids.log_file_name`): every line of both
    streams, timestamped, appended."""

    def __init__(self, path: FilePath[str], now: Callable[[], datetime]) -> None:
        self.path = path
        self._now = now
        self._file: Optional[IO[bytes]] = open(path.path, "ab")

    def write(self, stream: str, line: str) -> None:
        if self._file is None:
            return
        stamp = self._now().astimezone(UTC).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        self._file.write(f"{stamp} {stream} {line}\n".encode("utf-8", "replace"))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LogDirectory:
    """Where job logs go: the preferred directory, else one under the state dir."""

    log = Logger()

    def __init__(self, preferred: FilePath[str], fallback: FilePath[str]) -> None:
        self.preferred = preferred
        self.fallback = fallback
        self.current = preferred

    def resolve(self) -> FilePath[str]:
        for candidate in (self.preferred, self.fallback):
            try:
                candidate.makedirs(ignoreExistingDirectory=True)
            except OSError as e:
                self.log.warn(
                    "cannot use log directory {path}: {reason}", path=candidate.path, reason=e
                )
                continue
            if os.access(candidate.path, os.W_OK | os.X_OK):
                if candidate is not self.preferred:
                    self.log.warn(
                        "job logs go to {path} instead of {preferred}",
                        path=candidate.path,
                        preferred=self.preferred.path,
                    )
                self.current = candidate
                return candidate
            self.log.warn("cannot write to log directory {path}", path=candidate.path)
        raise RuntimeError(
            f"neither {self.preferred.path} nor {self.fallback.path} can hold job logs"
        )
