"""The enrollment's routes' answers; :mod:`sna.api.app` routes to them.

- ``POST /api/v1/enrollment/enroll``: 202 with sna's enrollment id and state,
  the work goes on in the daemon; 400 naming a field; 409 when an enrollment
  is under way or done; 503 when the key or the record cannot be written.
- ``GET /api/v1/enrollment/status``: the enrollment as it is now.
- ``DELETE /api/v1/enrollment``: forget it (and stop its tunnel); 404 when
  there is none.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from sna.api.http import ApiError, json_response, read_json_object
from sna.enrollment.model import timestamp
from sna.enrollment.request import parse_enroll_request
from sna.enrollment.service import (
    EnrollmentConflict,
    EnrollmentService,
    EnrollmentUnavailable,
    TunnelByHand,
)

STATUS_PATH = "/api/v1/enrollment/status"


class EnrollmentRoutes:
    def __init__(self, service: EnrollmentService) -> None:
        self._service = service

    def enroll(self, request: IRequest) -> bytes:
        parsed = parse_enroll_request(read_json_object(request))
        try:
            enrollment = self._service.enroll(parsed)
        except EnrollmentConflict as e:
            raise ApiError(
                409,
                "enrollment_exists",
                str(e),
                id=e.enrollment.id,
                state=e.enrollment.state,
            ) from None
        except TunnelByHand as e:
            raise ApiError(409, "tunnel_configured", str(e)) from None
        except EnrollmentUnavailable as e:
            raise ApiError(503, "storage_unavailable", str(e)) from None
        body: dict[str, Any] = {
            "id": enrollment.id,
            "state": enrollment.state,
            "since": timestamp(enrollment.since),
            "hub_url": enrollment.hub_url,
            "fingerprint": enrollment.fingerprint,
            "public_key": enrollment.public_key,
            "message": (
                f"Enrollment started with {enrollment.hub_url}; follow it at {STATUS_PATH}"
            ),
            "status_url": STATUS_PATH,
        }
        request.setHeader(b"Location", STATUS_PATH.encode())
        return json_response(request, body, 202)

    def status(self, request: IRequest) -> bytes:
        return json_response(request, self._service.status())

    def forget(self, request: IRequest) -> bytes:
        try:
            enrollment = self._service.forget()
        except EnrollmentUnavailable as e:
            raise ApiError(503, "storage_unavailable", str(e)) from None
        if enrollment is None:
            raise ApiError(404, "not_enrolled", "this node has no enrollment to forget")
        body = {
            "id": enrollment.id,
            "state": "forgotten",
            "previous_state": enrollment.state,
            "enrollment_id": enrollment.hub_enrollment_id,
            "message": (
                "Enrollment forgotten: its key and files are deleted and its tunnel stopped; "
                "the hub still lists it until its administrator revokes it"
            ),
        }
        return json_response(request, body)
