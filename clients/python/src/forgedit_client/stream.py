"""A job's event stream that survives retries and dropped connections.

``ResumeTracker`` holds the decisions (pure, unit-tested with fakes); ``EventStream`` and
``AsyncEventStream`` run them over real gRPC calls, sync and asyncio.

The loop, for one Edit or Sample:

1. open the call (``start``): Edit/Sample with the request's ``request_id``;
2. pass every new event on (events whose ``sequence`` was already seen are dropped, so a
   replay after a re-attach never yields duplicates) and feed it to the result collector;
3. the call ends OK → done. It fails with UNAVAILABLE → if no event has arrived yet, open
   ``start`` again (same ``request_id``: the server re-attaches or starts the job exactly once);
   if events have arrived, re-attach with ``WatchJob(request_id, after_sequence=last)``.
   Each retry waits the policy's backoff; the attempt count resets whenever an event arrives.
   Any other status, an exhausted budget or the overall deadline raises ``ForgeditRpcError``.
4. Over several replicas (``forgedit_client.channel``) a job lives on the replica that took it:
   its re-attach and cancel carry the stream's affinity key, so they reach that replica. A
   replica that refuses the start (UNAVAILABLE: still loading its models, draining, gone)
   keeps refusing for a while, and the key would keep choosing it: each retry of ``start``
   therefore moves the key (``KEY~1``, ``KEY~2``, …, another point on the ring). A re-attach
   that finds no job (NOT_FOUND), or that the job's replica refuses outright (UNAVAILABLE with
   the server's retry hint: draining or restarting), means the job's replica went away or is
   going (restarted, killed, scaled in) and its job with it: the stream submits the request
   again under the same ``request_id`` (and a moved key), within the same retry budget. Events then
   start over with the new job (a new ``job_id``, ``Accepted`` first) and ``result()`` is the
   new job's. The request id keeps this safe: an Edit registers one edit model per request id
   whichever replica ends up running it, and a request's training seed depends on that id only.

Cancellation: ``close()`` (or leaving a ``with stream:`` block, or the stream being garbage
collected) cancels the gRPC call; without ``detach`` the server then cancels the job. A plain
``break`` out of ``for event in stream`` only pauses: iterating again (or ``result()``)
continues where it stopped. ``cancel()`` additionally asks
the server to cancel the job by id (needed when the stream was re-attached, because watching
never cancels). A job submitted without ``detach`` is cancelled by the server when *its*
connection drops, so after a drop a re-attach usually finds it CANCELLED: pass ``detach=True``
for jobs that must survive network trouble (and cancel them explicitly when abandoning them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from forgedit_client.errors import ForgeditRpcError
from forgedit_client.events import Event, Heartbeat, event_from_proto
from forgedit_client.results import JobResult, ResultCollector
from forgedit_client.retry import RetryPolicy

CallKind = Literal["start", "watch"]


@dataclass(frozen=True)
class NextCall:
    """What to open next: ``kind`` after ``delay`` seconds, with ``timeout`` left (None = no
    deadline), for ``watch`` the last sequence already seen, the affinity ``key`` the call
    carries (None: the stream has none), and whether this ``start`` submits the request again
    after its job was lost (``resubmit``: the events start over)."""

    kind: CallKind
    delay: float
    timeout: float | None
    after_sequence: int
    key: str | None = None
    resubmit: bool = False


def moved_key(key: str | None, moves: int) -> str | None:
    """The affinity key after ``moves`` refusals: another point on the hash ring."""
    return key if key is None or moves == 0 else f"{key}~{moves}"


class ResumeTracker:
    """The bookkeeping of one logical stream across its gRPC calls.

    ``deadline`` is an absolute ``clock()`` time (None = none); every call gets the time left.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        deadline: float | None,
        clock: Callable[[], float] = time.monotonic,
        key: str | None = None,
        resubmit: bool = False,
    ) -> None:
        self.policy = policy
        self.key = key  # the affinity key calls carry now (moved after refused starts)
        self.base_key = key
        self.moves = 0
        self.can_resubmit = resubmit  # a stream that has a request to submit again
        self.resubmits = 0  # requests submitted again because their job was lost
        self.deadline = deadline
        self.clock = clock
        self.job_id: str | None = None
        self.last_sequence = 0
        self.failures = 0  # consecutive failed calls since the last new event
        self.gaps = 0  # events lost to replay-buffer eviction (sequence jumps)
        self.reattaching = False  # the last planned call was a WatchJob re-attach
        self.retries = 0  # calls opened again after an error (re-attaches included)
        self.reattaches = 0  # of which WatchJob re-attaches after events had arrived

    def first_call(self) -> NextCall:
        return NextCall("start", 0.0, self._remaining(), 0, self.key)

    def accept(self, event: Event) -> bool:
        """Record ``event``; False when it is a replayed duplicate to be skipped.

        Heartbeats are not buffered by the server and repeat the latest sequence number: they
        always pass and never move ``last_sequence``.
        """
        if isinstance(event, Heartbeat):
            self.job_id = self.job_id or event.job_id or None
            self.failures = 0
            return True
        if event.sequence and event.sequence <= self.last_sequence:
            return False
        if event.sequence:
            if self.last_sequence and event.sequence > self.last_sequence + 1:
                self.gaps += event.sequence - self.last_sequence - 1
            self.last_sequence = event.sequence
        self.job_id = self.job_id or event.job_id or None
        self.failures = 0
        return True

    def after_error(self, error: ForgeditRpcError) -> NextCall:
        """Plan the next call after ``error``, or raise it (with context) when it is final."""
        self.failures += 1
        lost = self.can_resubmit and self.reattaching and _job_unreachable(error)
        retryable = self.policy.should_retry(error.code, self.failures) or (
            _cut_off(error) and self.failures < self.policy.max_attempts
        )
        if not lost and not retryable:
            raise self._final(error)
        if lost and self.failures >= self.policy.max_attempts:
            raise self._final(error)
        delay = self.policy.backoff(self.failures, server_hint=error.retry_delay)
        remaining = self._remaining()
        if remaining is not None and remaining <= delay:
            raise self._final(error)
        timeout = None if remaining is None else remaining - delay
        if lost:  # the job went with its replica: submit the request again
            self.last_sequence = 0
            self.job_id = None
            self.resubmits += 1
        kind: CallKind = "watch" if self.last_sequence else "start"
        if kind == "start" and self.can_resubmit:
            # Refused, or lost, where the key pointed: the next start tries another replica.
            self.moves += 1
            self.key = moved_key(self.base_key, self.moves)
        self.reattaching = kind == "watch"
        self.retries += 1
        self.reattaches += self.reattaching
        return NextCall(kind, delay, timeout, self.last_sequence, self.key, lost)

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def _final(self, error: ForgeditRpcError) -> ForgeditRpcError:
        error = error.with_job(self.job_id)
        if self.reattaching and error.code == grpc.StatusCode.NOT_FOUND:
            # The re-attach itself failed: the job expired or lives on another replica.
            return ForgeditRpcError(
                error.code,
                f"the connection dropped and job {self.job_id} could not be re-attached "
                f"({error.message})",
                job_id=self.job_id,
            )
        return error


def _cut_off(error: ForgeditRpcError) -> bool:
    """A call the transport ended, not the server's answer: CANCELLED without the server's
    ErrorInfo. The server cancels a job with ErrorInfo ``CANCELLED`` (final); a bare CANCELLED
    comes from gRPC itself, e.g. a replica that shut down with the call still open, and is
    followed up like a dropped connection (re-attach, or start again). This stream's own
    ``close()``/``cancel()`` never gets here: they end the iteration instead."""
    return error.code == grpc.StatusCode.CANCELLED and error.error_reason is None


def _job_unreachable(error: ForgeditRpcError) -> bool:
    """A re-attach's failure that says the job's replica cannot give its events back: it has
    no such job (NOT_FOUND: it restarted, or the call reached another replica because the
    job's is gone), or the replica itself refuses every call (UNAVAILABLE with the server's
    retry hint: it is draining, so its queued jobs have ended and its connections are about to
    close, or it is still starting after a restart). A dropped connection is UNAVAILABLE
    without a hint and is re-attached again."""
    if error.code == grpc.StatusCode.NOT_FOUND:
        return True
    return error.code == grpc.StatusCode.UNAVAILABLE and error.retry_delay is not None


Opener = Callable[[NextCall], Any]


class EventStream:
    """Iterate the typed events of one Edit or Sample job (sync).

    ``for event in stream`` yields each new event once; ``result()`` drains the rest and
    returns the ``JobResult``; ``cancel()`` stops the job on the server. Properties
    ``request_id`` and ``job_id`` (known after the first event).
    """

    def __init__(
        self,
        opener: Opener,
        *,
        request_id: str,
        tracker: ResumeTracker,
        canceller: Callable[[str], Any],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._open = opener
        self._tracker = tracker
        self._cancel_job = canceller
        self._sleep = sleep
        self._collector = ResultCollector(request_id)
        self.request_id = request_id
        self._call: Any = None
        self._closed = False  # by close() or cancel(): result() then raises
        self._events = self._run()

    @property
    def job_id(self) -> str | None:
        return self._tracker.job_id

    @property
    def gaps(self) -> int:
        """Events lost between re-attaches because the server's replay buffer evicted them."""
        return self._tracker.gaps

    @property
    def reattaches(self) -> int:
        """How often the stream re-attached with WatchJob after a dropped connection."""
        return self._tracker.reattaches

    @property
    def retries(self) -> int:
        """How often a call of this stream was opened again after an error (re-attaches
        included)."""
        return self._tracker.retries

    @property
    def resubmits(self) -> int:
        """How often the request was submitted again because its job was lost with its
        replica (see the module docstring)."""
        return self._tracker.resubmits

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def __next__(self) -> Event:
        return next(self._events)

    def _run(self) -> Generator[Event, None, None]:
        plan = self._tracker.first_call()
        while True:
            if plan.delay:
                self._sleep(plan.delay)
            if plan.resubmit:
                self._collector = ResultCollector(self.request_id)
            try:
                self._call = self._open(plan)
                for response in self._call:
                    event = event_from_proto(response.event)
                    if self._tracker.accept(event):
                        self._collector.add(event)
                        yield event
                return
            except grpc.RpcError as exc:
                error = ForgeditRpcError.from_grpc(exc)
            finally:
                if self._call is not None:
                    self._call.cancel()  # no-op for a finished call; stops an abandoned one
                    self._call = None
            plan = self._tracker.after_error(error)  # raises when final

    def result(self) -> JobResult:
        """Consume the remaining events; return the result. Raises ``ForgeditRpcError`` if the
        job failed or was cancelled, including by this stream's ``cancel()`` or ``close()``
        before the job completed."""
        for _ in self._events:
            pass
        return _result(self._collector.result, self._closed, self.job_id)

    def close(self) -> None:
        """Stop reading: cancels the gRPC call (and, without detach, the server's job)."""
        self._closed = True
        self._events.close()

    def cancel(self) -> None:
        """Ask the server to cancel the job (best effort), then close the stream."""
        if self.job_id:
            # Already finished or gone: closing the stream is all that is left.
            with contextlib.suppress(ForgeditRpcError):
                self._cancel_job(self.job_id)
        self.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEventStream:
    """The asyncio twin of ``EventStream``: ``async for event in stream``,
    ``await stream.result()``, ``await stream.cancel()``, ``await stream.aclose()``."""

    def __init__(
        self,
        opener: Opener,
        *,
        request_id: str,
        tracker: ResumeTracker,
        canceller: Callable[[str], Any],
    ) -> None:
        self._open = opener
        self._tracker = tracker
        self._cancel_job = canceller
        self._collector = ResultCollector(request_id)
        self.request_id = request_id
        self._closed = False  # by aclose() or cancel(): result() then raises
        self._events = self._run()

    @property
    def job_id(self) -> str | None:
        return self._tracker.job_id

    @property
    def gaps(self) -> int:
        return self._tracker.gaps

    @property
    def reattaches(self) -> int:
        return self._tracker.reattaches

    @property
    def retries(self) -> int:
        return self._tracker.retries

    @property
    def resubmits(self) -> int:
        return self._tracker.resubmits

    def __aiter__(self) -> AsyncGenerator[Event, None]:
        return self._events

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def _run(self) -> AsyncGenerator[Event, None]:
        plan = self._tracker.first_call()
        while True:
            if plan.delay:
                await asyncio.sleep(plan.delay)
            if plan.resubmit:
                self._collector = ResultCollector(self.request_id)
            call = None
            try:
                call = self._open(plan)
                async for response in call:
                    event = event_from_proto(response.event)
                    if self._tracker.accept(event):
                        self._collector.add(event)
                        yield event
                return
            except grpc.RpcError as exc:
                error = ForgeditRpcError.from_grpc(exc)
            finally:
                if call is not None:
                    call.cancel()
            plan = self._tracker.after_error(error)  # raises when final

    async def result(self) -> JobResult:
        """As ``EventStream.result``: raises ``ForgeditRpcError`` if the job failed or was
        cancelled, including by ``cancel()`` or ``aclose()`` before it completed."""
        async for _ in self._events:
            pass
        return _result(self._collector.result, self._closed, self.job_id)

    async def aclose(self) -> None:
        self._closed = True
        await self._events.aclose()

    async def cancel(self) -> None:
        if self.job_id:
            with contextlib.suppress(ForgeditRpcError):
                await self._cancel_job(self.job_id)
        await self.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _result(result: JobResult, closed: bool, job_id: str | None) -> JobResult:
    """``result``, unless the stream was closed or cancelled before the job completed: then
    the events stopped on the client's side and the result would be silently partial, so
    ``result()`` raises CANCELLED (server-side failures raise while draining already)."""
    if result.completed or not closed:
        return result
    raise ForgeditRpcError(
        grpc.StatusCode.CANCELLED,
        "the stream was closed or cancelled before the job completed; no result",
        error_reason="CANCELLED",
        job_id=job_id,
    )
