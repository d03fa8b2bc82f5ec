"""A job: one Edit or Sample request on its way through the scheduler.

A job owns its plan (the checked request) while it waits and runs, its cancel token and a
bounded replay buffer of the events it produced. Once finished it keeps only what replay and
``GetJob`` need: its plan, with the input image's bytes, is dropped (``finish``), and the job
table counts what its events take against a byte budget (``server.job_table``). Any number
of streams read the buffer (the submitting call, re-attached calls, WatchJob), each from its
own cursor; a reader that falls behind a full buffer loses the oldest events and sees a gap in
the sequence numbers. Images make events large, so the buffer is bounded by count and bytes.
A preview is not history worth replaying but a picture of now: a new preview replaces the
buffered one of the same kind and image, so previews hold at most one slot per image and a
re-attaching client sees each image's latest preview.

Thread safety: the worker thread appends events and changes state; RPC threads read and wait.
Everything mutable is guarded by one condition variable per job. The events themselves are
built by ``server.wire``; a job only numbers them and keeps them.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from forgedit.events import CancelToken, PhaseTimer
from server import wire
from server._proto import forgedit_pb2 as pb
from server.errors import MappedError
from server.plans import EditRequestPlan, SampleRequestPlan


class JobState(enum.Enum):
    QUEUED = pb.JOB_STATE_QUEUED
    RUNNING = pb.JOB_STATE_RUNNING
    CANCELLING = pb.JOB_STATE_CANCELLING
    SUCCEEDED = pb.JOB_STATE_SUCCEEDED
    FAILED = pb.JOB_STATE_FAILED
    CANCELLED = pb.JOB_STATE_CANCELLED

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


@dataclass
class Job:
    """One unit of scheduled work: the service creates it from a plan, the scheduler drives
    it, the runner runs it."""

    kind: pb.JobKind  # pb.JOB_KIND_EDIT or pb.JOB_KIND_SAMPLE
    # What to do; None once the job has finished (``finish`` drops it with its image).
    plan: EditRequestPlan | SampleRequestPlan | None
    payload_digest: str  # identifies the request for idempotency checks
    max_events: int  # the replay buffer's bounds (FORGEDIT_REPLAY_MAX_EVENTS, _BYTES)
    max_bytes: int
    job_id: str = field(default_factory=lambda: new_job_id())
    # The run time in seconds the scheduler estimates at submission (None until then; a test
    # may set its own).
    estimated_s: float | None = None
    detach: bool = False
    principal: str = ""  # who submitted it (server.auth.Principal.name)
    # Who it counts against for fair shares of the queue (``Authenticator.client_of``).
    client: str = ""
    state: JobState = JobState.QUEUED
    queue_position: int = 0
    edit_model_id: str = ""
    error: MappedError | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    # Seconds per phase: queue_wait, captioning, training, registration, sampling, total.
    timings: PhaseTimer = field(default_factory=PhaseTimer)
    sampling_backend: str = ""  # the UNet backend that sampled ("" before sampling)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    created_monotonic: float = field(default_factory=time.monotonic)
    started_monotonic: float | None = None
    # Streams whose disconnect cancels the job (the submitting call, re-attached
    # submissions); WatchJob never counts.
    owners: int = 0
    # From the plan, kept after it is dropped.
    request_id: str = field(init=False)
    images_total: int = field(init=False)
    _events: deque[pb.Event] = field(default_factory=deque)
    _bytes: int = 0
    _sequence: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        assert self.plan is not None, "a new job has a plan"
        self.request_id = self.plan.request_id
        self.images_total = self.plan.images_total
        # Detached from the start when its request asked; a re-attaching request may detach it.
        self.detach = self.detach or self.plan.detach

    @property
    def estimate(self) -> float:
        """``estimated_s``, 0.0 before the scheduler made it."""
        return self.estimated_s or 0.0

    @property
    def method(self) -> str:
        return "Edit" if self.kind == pb.JOB_KIND_EDIT else "Sample"

    @property
    def is_sampling(self) -> bool:
        return self.kind == pb.JOB_KIND_SAMPLE

    @property
    def elapsed_s(self) -> float:
        """Seconds since the job was created: its queue wait and its run so far."""
        return time.monotonic() - self.created_monotonic

    @property
    def last_sequence(self) -> int:
        with self._cond:
            return self._sequence

    @property
    def event_bytes(self) -> int:
        """Bytes of the events in the replay buffer (what a finished job keeps, mostly PNGs)."""
        with self._cond:
            return self._bytes

    # -- events -----------------------------------------------------------------------------

    def emit(self, kind: wire.EventKind) -> pb.Event:
        """Append one event (e.g. ``emit(wire.training(progress))``) and wake readers. Oldest
        events are evicted beyond the count or byte bound; a preview evicts the one it
        replaces first."""
        with self._cond:
            self._sequence += 1
            event = wire.event(self.job_id, self._sequence, kind)
            if isinstance(kind, pb.PreviewEvent):
                self._drop_replaced_preview(kind)
            size = event.ByteSize()
            self._events.append(event)
            self._bytes += size
            while len(self._events) > 1 and (
                len(self._events) > self.max_events or self._bytes > self.max_bytes
            ):
                self._bytes -= self._events.popleft().ByteSize()
            self._cond.notify_all()
            return event

    def _drop_replaced_preview(self, new: pb.PreviewEvent) -> None:
        """Forget the buffered preview of the same kind and image as ``new`` (under the lock)."""
        for i, old in enumerate(self._events):
            if (
                old.WhichOneof("kind") == "preview"
                and old.preview.kind == new.kind
                and old.preview.index == new.index
            ):
                self._bytes -= old.ByteSize()
                del self._events[i]
                return

    def read(self, after: int, timeout: float) -> tuple[list[pb.Event], bool]:
        """Events with ``sequence > after``; waits up to ``timeout`` s for one if none yet.

        Returns (events, finished): ``finished`` is True when the job has ended and no event
        after the returned ones will ever come.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = [e for e in self._events if e.sequence > after]
                done = self.state.finished
                if events or done:
                    return events, done
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], False
                self._cond.wait(remaining)

    def heartbeat(self) -> pb.Event:
        """A heartbeat for one stream: not buffered, carries the latest sequence number."""
        with self._cond:
            return wire.heartbeat(
                self.job_id, self._sequence, self.state.value, self.queue_position
            )

    # -- state ------------------------------------------------------------------------------

    def set_state(self, state: JobState) -> None:
        with self._cond:
            self.state = state
            if state is JobState.RUNNING:
                self.started_at = time.time()
                self.started_monotonic = time.monotonic()
                self.queue_position = 0
            self._cond.notify_all()

    def finish(self, state: JobState, error: MappedError | None = None) -> None:
        """Move to a final state exactly once; later calls are ignored. The plan goes: a
        finished job keeps only its events and status (an Edit's plan holds its input
        image)."""
        with self._cond:
            if self.state.finished:
                return
            self.state = state
            self.error = error
            self.queue_position = 0
            self.ended_at = time.time()
            self.plan = None
            self._cond.notify_all()

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.state.finished, timeout)

    def request_cancel(self, reason: str) -> bool:
        """Ask the job to stop. Returns False if it had already finished."""
        with self._cond:
            if self.state.finished:
                return False
            self.cancel.cancel(reason)
            if self.state is JobState.RUNNING:
                self.state = JobState.CANCELLING
            self._cond.notify_all()
            return True

    def to_proto(self) -> pb.Job:
        """The job as the wire's ``Job``: one consistent snapshot, taken under its lock."""
        with self._cond:
            return wire.job_message(
                job_id=self.job_id,
                request_id=self.request_id,
                kind=self.kind,
                state=self.state.value,
                queue_position=self.queue_position,
                edit_model_id=self.edit_model_id,
                last_sequence=self._sequence,
                principal=self.principal,
                created_at=self.created_at,
                started_at=self.started_at,
                ended_at=self.ended_at,
                error=self.error,
            )
