"""Every job this replica knows, by job id and by request id, and how long finished ones stay.

- ``request_id`` idempotency: a known request id with the same payload digest is the same job
  (re-attach); with another digest it is a conflict (``RequestConflictError``).
- Finished jobs stay visible for ``retention_s``, so a client can re-attach, replay the events
  and read the final status; but at most ``max_retained`` of them, and at most ``max_bytes`` of
  their events (mostly PNGs) in all: beyond either bound the oldest finished are forgotten
  first. A finished job holds nothing else of size (``Job.finish`` drops its plan and image),
  so ``retained_bytes`` is the memory finished jobs take.

Every rule about which jobs are remembered lives here. Not thread-safe: the scheduler calls it
under its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from server.errors import JobNotFoundError, RequestConflictError
from server.jobs import Job


class JobTable:
    def __init__(self, retention_s: float, max_retained: int, max_bytes: int) -> None:
        self.retention_s = retention_s
        self.max_retained = max_retained
        self.max_bytes = max_bytes
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[str, Job] = {}
        # Finished jobs, oldest first, with the bytes their events take (fixed once finished).
        self._finished: OrderedDict[str, tuple[Job, int]] = OrderedDict()
        self.retained_bytes = 0

    def add(self, job: Job) -> None:
        self._jobs[job.job_id] = job
        if job.request_id:
            self._by_request[job.request_id] = job

    def existing(self, job: Job) -> Job | None:
        """The job that ``job``'s request id names already, if any. Raises
        ``RequestConflictError`` when that one was asked for with another payload."""
        if not job.request_id:
            return None
        self.expire()
        existing = self._by_request.get(job.request_id)
        if existing is not None and existing.payload_digest != job.payload_digest:
            raise RequestConflictError(
                f"request_id {job.request_id!r} was already used for a different request; use "
                "a new request_id for new work"
            )
        return existing

    def get(self, job_id: str) -> Job:
        """Raises ``JobNotFoundError``."""
        self.expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError.by_id(job_id)
        return job

    def get_by_request(self, request_id: str) -> Job:
        """Raises ``JobNotFoundError``."""
        self.expire()
        job = self._by_request.get(request_id)
        if job is None:
            raise JobNotFoundError.by_request_id(request_id)
        return job

    @property
    def retained(self) -> int:
        """Finished jobs kept now."""
        return len(self._finished)

    def retain(self, job: Job) -> None:
        """``job`` has finished: keep it for ``retention_s`` (within the bounds)."""
        if job.job_id in self._finished:
            return
        size = job.event_bytes
        self._finished[job.job_id] = (job, size)
        self.retained_bytes += size
        self.expire()

    def expire(self) -> None:
        """Forget finished jobs kept too long, or beyond ``max_retained`` or ``max_bytes``
        (oldest finished first)."""
        now = time.time()
        while self._finished:
            job_id, (job, size) = next(iter(self._finished.items()))
            too_many = len(self._finished) > self.max_retained
            too_big = self.retained_bytes > self.max_bytes
            expired = job.ended_at is not None and now - job.ended_at > self.retention_s
            if not (too_many or too_big or expired):
                break
            self._finished.popitem(last=False)
            self.retained_bytes -= size
            self._jobs.pop(job_id, None)
            if job.request_id and self._by_request.get(job.request_id) is job:
                del self._by_request[job.request_id]
