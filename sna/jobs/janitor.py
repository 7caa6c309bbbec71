"""Removing the snapshot of a backup client that could not remove it itself.

Our client removes its ``sbak-{job_id}`` snapshot at the end, on failure and
on SIGTERM; a client killed outright (SIGKILL after the grace period, the
OOM killer) cannot.  The daemon then removes it, with the credentials of the
request, which live in memory for the job's life and are never stored.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.jobs.model import BackupRequest
from sna.vmware.interface import Credentials, IVSphere, VSphereError, parse_address


class SnapshotJanitor:
    log = Logger()

    def __init__(self, vsphere: IVSphere) -> None:
        self._vsphere = vsphere

    def client_killed(self, request: BackupRequest) -> Deferred[Any]:
        """Remove ``sbak-{job_id}`` from the job's VM; never fails."""
        try:
            host, port = parse_address(request.vcenter_host, "vcenter_host")
        except VSphereError as e:
            self.log.error(
                "job {job_id}: cannot remove its snapshot: {reason}",
                job_id=request.job_id,
                reason=e.message,
            )
            return succeed(None)
        credentials = Credentials(
            host=host,
            port=port,
            user=request.vcenter_user,
            password=request.vcenter_password,
            thumbprint=request.vcenter_thumbprint,
        )
        d = self._vsphere.remove_job_snapshots(credentials, request.vm_path, request.job_id)

        def removed(answer: dict[str, Any]) -> None:
            self.log.info(
                "job {job_id}: its client was killed; removed snapshots {removed}",
                job_id=request.job_id,
                removed=answer.get("removed", []),
            )

        def failed(failure: Failure) -> None:
            self.log.error(
                "job {job_id}: its client was killed and its snapshot could not be removed "
                "({reason}); use POST /api/v1/cleanup",
                job_id=request.job_id,
                reason=failure.getErrorMessage(),
            )

        return d.addCallbacks(removed, failed)
