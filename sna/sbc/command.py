"""What to run for a job: the ``--sbc`` command, its program and the child's environment.

:class:`ClientCommand` holds the ``--sbc`` words (and whether they name the
legacy Go client), finds the program, and turns a request into the argv after
the program and the child's environment.  The flags and variable names
themselves are :mod:`sna.contract.argv`'s; this module only adds the command's
own words and what is passed of the daemon's environment (:data:`PASSED_ENV`).
It starts nothing and writes nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from typing import Optional

import attrs

from sna.contract import argv as cli
from sna.jobs.model import BackupRequest

#: Variables of the daemon's own environment a client may need; nothing else is passed.
PASSED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "SHA_API_URL",
)


class ClientUnavailable(Exception):
    """The configured backup client cannot be run; the message says why."""


@attrs.frozen
class ClientCommand:
    """The backup-client command line, from ``--sbc`` and ``--sbc-legacy``."""

    argv: tuple[str, ...]
    legacy: bool = False
    #: vCenter TLS for our client: no verification (--vcenter-insecure), extra CAs.
    insecure: bool = False
    ca_file: Optional[str] = None
    #: --stall-timeout for our client (the daemon's own option); None: the client's default.
    stall_timeout: Optional[float] = None

    @classmethod
    def parse(cls, command: str, legacy: bool = False) -> ClientCommand:
        argv = tuple(shlex.split(command))
        if not argv:
            raise ValueError("the backup-client command is empty")
        return cls(argv, legacy)

    def executable(self) -> str:
        """The absolute path of the program, or :class:`ClientUnavailable`."""
        program = self.argv[0]
        if os.sep in program:
            path = os.path.abspath(program)
            if not os.path.exists(path):
                raise ClientUnavailable(f"backup client {path} does not exist")
            if os.path.isdir(path) or not os.access(path, os.X_OK):
                raise ClientUnavailable(f"backup client {path} is not an executable file")
            return path
        found = shutil.which(program)
        if found is None:
            # Installed beside the daemon (the same venv's bin/), even when that
            # directory is not on PATH, as under `make run`.
            beside = os.path.join(os.path.dirname(sys.executable), program)
            if os.access(beside, os.X_OK) and not os.path.isdir(beside):
                return beside
            raise ClientUnavailable(f"backup client {program!r} was not found on PATH")
        return os.path.abspath(found)

    def job(self, request: BackupRequest) -> cli.JobArguments:
        """What the client is told of ``request`` (and of this daemon's vCenter TLS)."""
        return cli.JobArguments(
            endpoint=request.vcenter_host,
            user=request.vcenter_user,
            password=request.vcenter_password,
            vm_path=request.vm_path,
            targets=request.targets,
            job_id=request.job_id,
            backup_type=request.backup_type,
            previous_change_id=request.previous_change_id,
            previous_change_ids=request.previous_change_ids,
            previous_capacities=request.previous_capacities,
            thumbprint=request.vcenter_thumbprint,
            ca_file=self.ca_file,
            insecure=self.insecure,
            stall_timeout=self.stall_timeout,
        )

    def arguments(self, request: BackupRequest) -> list[str]:
        """argv after the program: the ``--sbc`` words, then :func:`sna.contract.argv.build`."""
        return [*self.argv[1:], *cli.build(self.job(request), self.legacy)]

    @staticmethod
    def base_environment(base: Mapping[str, str]) -> dict[str, str]:
        """What every client gets of the daemon's environment (a spare gets only this)."""
        env = {key: base[key] for key in PASSED_ENV if key in base}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        return env

    def environment(self, request: BackupRequest, base: Mapping[str, str]) -> dict[str, str]:
        env = self.base_environment(base)
        env.update(cli.environment(self.job(request), self.legacy))
        return env
