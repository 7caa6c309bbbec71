"""Which job records ``GET /api/v1/jobs`` lists: its filters and its pages.

:func:`parse_query` reads the query (already decoded to text, each name with
every value it was given) into a :class:`JobQuery`, or raises
:class:`InvalidQuery` naming the parameter and the reason; :func:`select`
filters the records, newest first, and cuts one page.  Nothing here renders
a job or knows HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Optional

import attrs

from sna.jobs.model import Job, JobStatus

#: Jobs per page unless ``limit`` says otherwise, and the most it may say.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: The parameters the route takes; any other is refused (a typo must not list everything).
PARAMETERS = ("status", "vm_name", "since", "limit", "offset")

# A '+' of an offset that was not percent-encoded arrives as a space (form encoding).
_SPACED_OFFSET = re.compile(r"^(.*\d) (\d{2}:?\d{2})$")


class InvalidQuery(ValueError):
    """A query parameter that cannot be used; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@attrs.frozen
class JobQuery:
    """What to list: jobs in any of ``statuses`` (all when empty), of the VM named
    ``vm_name``, started at or after ``since``; ``limit`` of them from ``offset``."""

    statuses: frozenset[JobStatus] = frozenset()
    vm_name: Optional[str] = None
    since: Optional[datetime] = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    def matches(self, job: Job) -> bool:
        return (
            (not self.statuses or job.status in self.statuses)
            and (self.vm_name is None or job.vm_name == self.vm_name)
            and (self.since is None or job.started_at >= self.since)
        )


@attrs.frozen
class Page:
    """One page of the jobs that match, and where it stands among them all."""

    jobs: list[Job]
    #: How many jobs match, on every page.
    total: int
    limit: int
    offset: int

    @property
    def next_offset(self) -> Optional[int]:
        """The ``offset`` of the next page; ``None`` on the last one."""
        after = self.offset + len(self.jobs)
        return after if after < self.total else None


def _single(args: Mapping[str, Sequence[str]], name: str) -> Optional[str]:
    values = args.get(name, ())
    if len(values) > 1:
        raise InvalidQuery(name, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _count(args: Mapping[str, Sequence[str]], name: str, low: int, high: int) -> Optional[int]:
    text = _single(args, name)
    if text is None:
        return None
    rule = f"{name} must be an integer from {low} to {high}"
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise InvalidQuery(name, f"{rule}, not {text[:40]!r}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidQuery(name, f"{rule}, not {value}")
    return value


def parse_time(text: str, field: str) -> datetime:
    """An RFC 3339 time with its offset (``2026-11-26T09:00:00Z``, ``...+01:00``)."""
    shown = text[:60]
    candidate = _SPACED_OFFSET.sub(r"\1+\2", text.strip())
    try:
        moment = datetime.fromisoformat(candidate.upper())
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in candidate.upper():
        raise InvalidQuery(
            field,
            f"{field} must be an RFC 3339 time with its offset, e.g. 2026-11-26T09:00:00Z "
            f"(a '+' percent-encoded as %2B), not {shown!r}",
        )
    return moment


def parse_query(args: Mapping[str, Sequence[str]]) -> JobQuery:
    """The query of ``GET /api/v1/jobs``; raises :class:`InvalidQuery` for the first
    parameter that is unknown, repeated (all but ``status``) or out of its range."""
    for name in args:
        if name not in PARAMETERS:
            raise InvalidQuery(
                name,
                f"unknown query parameter {name[:40]!r} (known: {', '.join(PARAMETERS)})",
            )
    statuses = set()
    for value in args.get("status", ()):
        try:
            statuses.add(JobStatus(value))
        except ValueError:
            known = ", ".join(s.value for s in JobStatus)
            raise InvalidQuery("status", f"status must be one of: {known}") from None
    vm_name = _single(args, "vm_name")
    if vm_name is not None and not vm_name:
        raise InvalidQuery("vm_name", "vm_name must not be empty")
    since_text = _single(args, "since")
    since = parse_time(since_text, "since") if since_text is not None else None
    limit = _count(args, "limit", 1, MAX_LIMIT)
    offset = _count(args, "offset", 0, 10**12)
    return JobQuery(
        statuses=frozenset(statuses),
        vm_name=vm_name,
        since=since,
        limit=DEFAULT_LIMIT if limit is None else limit,
        offset=offset or 0,
    )


def select(jobs: Iterable[Job], query: JobQuery) -> Page:
    """The page of ``query``: matching jobs, newest start first (then by id, so pages
    do not overlap between equal starts)."""
    matching = [job for job in jobs if query.matches(job)]
    matching.sort(key=lambda job: job.job_id)
    matching.sort(key=lambda job: job.started_at, reverse=True)
    page = matching[query.offset : query.offset + query.limit]
    return Page(page, len(matching), query.limit, query.offset)
