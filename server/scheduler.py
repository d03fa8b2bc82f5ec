"""The job scheduler: a bounded queue and one worker thread per device.

Contract
- Each device has one worker thread that builds its engines (one per served base model) in
  that thread, warms them up, and then runs one job at a time. The worker owns the device: no
  other thread touches its engines.
- Queued sampling jobs run before queued training (Edit) jobs, but not forever: once
  ``max_training_overtakes`` sampling jobs have started while the same training job was first
  in its line, that training job starts next (bounded ageing; 0 = no overtaking at all). Within
  a kind, first come first served. At most ``queue_size`` jobs wait (running ones are not
  counted); one more raises ``QueueFullError`` with an estimated retry delay.
- Queue positions and the wait estimate of the deadline check follow this very order
  (``_planned_order``). The estimate of a training job also counts the sampling jobs that may
  still overtake it while sampling load is present (queued or running sampling work), so that
  under steady sampling load the estimate is an honest upper bound, not the time to drain the
  current queue.
- Every queued job gets a ``queued(position)`` event whenever its 1-based position changes.
- ``cancel`` removes a queued job at once (state CANCELLED) or asks a running job to stop at
  its next training update or denoising step (the engine checks the job's ``CancelToken``).
- ``request_id`` idempotency: ``submit`` with a known request id returns the existing job when
  the payload digest matches and raises ``RequestConflictError`` when it does not.
- Finished jobs stay visible for ``retention_s`` (at most ``max_retained`` of them), so a client
  can re-attach, replay the events and read the final status.
- ``drain`` (SIGTERM): new submissions get UNAVAILABLE, queued jobs end UNAVAILABLE (the client
  retries on another replica), running jobs get ``grace_s`` to finish and are then cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server import wire
from server.errors import (
    DeadlineTooShortError,
    JobNotFoundError,
    QueueFullError,
    RequestConflictError,
    UnavailableError,
    UnservedBaseModelError,
    cancelled_status,
    to_rpc_status,
)
from server.estimator import Estimator
from server.jobs import Job, JobState
from server.logs import job_context
from server.metrics import Metrics
from server.ports import BaseModelInfo, EngineFactory, EngineLike

if TYPE_CHECKING:
    from registry import EditModelInfo

log = logging.getLogger("server.scheduler")

# The worker's work: run one job to completion on this device's engines. Raises on failure
# (mapped to a status by the scheduler); returns normally on success.
# ``server.runner.JobRunner`` is the real one.
RunJob = Callable[[Job, Mapping[str, EngineLike]], None]


@dataclass(frozen=True)
class SchedulerConfig:
    devices: tuple[str, ...]
    base_models: tuple[str, ...]
    queue_size: int
    retention_s: float
    max_retained: int
    max_training_overtakes: int = 4


class Scheduler:
    """Owns the devices. See the module docstring for the contract."""

    def __init__(
        self,
        config: SchedulerConfig,
        engine_factory: EngineFactory,
        runner: RunJob,
        estimator: Estimator,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._runner = runner
        self.estimator = estimator
        self.metrics = metrics
        self._lock = threading.Condition()
        self._sampling: deque[Job] = deque()
        self._training: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        # Sampling jobs started since the first queued training job became first in line.
        self._overtakes = 0
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._accepting = True
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self._ready_workers = 0
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.base_models: dict[str, BaseModelInfo] = {}

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker per device; ``ready`` is set once every engine is warmed up."""
        for index, device in enumerate(self.config.devices):
            worker = threading.Thread(
                target=self._work, args=(device,), name=f"forgedit-worker-{index}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def drain(self, grace_s: float) -> None:
        """Stop taking jobs; end queued ones UNAVAILABLE; let running ones finish for
        ``grace_s``, then cancel them; stop the workers."""
        with self._lock:
            self._accepting = False
            queued = [*self._sampling, *self._training]
            self._sampling.clear()
            self._training.clear()
            self._queue_changed_locked()
        unavailable = to_rpc_status(
            UnavailableError(
                "the server is shutting down before this job could start; retry on another replica"
            )
        )
        for job in queued:
            job.finish(JobState.FAILED, unavailable)
            with self._lock:
                self._retain_locked(job)
        deadline = time.monotonic() + grace_s
        for job in self.running_jobs():
            job.wait_finished(max(0.0, deadline - time.monotonic()))
        for job in self.running_jobs():
            log.warning("grace period over; cancelling job %s", job.job_id)
            job.request_cancel("the server is shutting down")
        for job in self.running_jobs():
            job.wait_finished(10.0)
        self.stop()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._accepting = False
            self._lock.notify_all()
        for worker in self._workers:
            worker.join(timeout=15.0)

    # -- submission -------------------------------------------------------------------------

    def submit(self, job: Job, remaining_s: float | None = None) -> tuple[Job, bool]:
        """Queue ``job``, or return the existing job of its request id.

        Returns (job, is_new). Raises ``UnavailableError`` when not ready or draining,
        ``RequestConflictError`` for a reused request id with another payload,
        ``QueueFullError`` when the queue is full, and ``DeadlineTooShortError`` when
        ``remaining_s`` (the call's time left) is shorter than the job's estimated run time
        plus its estimated wait in the queue.
        """
        if job.estimated_s is None:
            job.estimated_s = self.estimator.estimate(job)
        with self._lock:
            self._expire_locked()
            if job.request_id:
                existing = self._by_request.get(job.request_id)
                if existing is not None:
                    if existing.payload_digest != job.payload_digest:
                        raise RequestConflictError(
                            f"request_id {job.request_id!r} was already used for a different "
                            "request; use a new request_id for new work"
                        )
                    return existing, False
            self._require_ready_locked()
            if self.queue_depth_locked() >= self.config.queue_size:
                raise QueueFullError(self.config.queue_size, self._queue_wait_locked())
            if remaining_s is not None:
                estimate = self._estimate_with_queue_locked(job)
                if remaining_s < estimate:
                    raise DeadlineTooShortError(remaining_s, estimate)
            (self._sampling if job.is_sampling else self._training).append(job)
            self._jobs[job.job_id] = job
            if job.request_id:
                self._by_request[job.request_id] = job
            # Renumber first (announcing moves to the others), then tell the new job its place:
            # under the lock, so `accepted` is always its first event.
            self._queue_changed_locked(exclude=job)
            # A job that an idle worker takes at once is "starting now" (0), not first in line.
            idle_workers = len(self.config.devices) - len(self._running)
            position = max(0, job.queue_position - idle_workers)
            job.emit(wire.accepted(job.job_id, position, job.plan.images_total, job.estimate))
            self._lock.notify_all()
            return job, True

    def _estimate_with_queue_locked(self, job: Job) -> float:
        """The job's estimated run time plus the estimated wait before it starts, in the order
        the workers will take the jobs (see the module docstring)."""
        sampling = [*self._sampling, job] if job.is_sampling else list(self._sampling)
        training = list(self._training) if job.is_sampling else [*self._training, job]
        ahead = _planned_order(
            sampling,
            training,
            self._overtakes,
            self.config.max_training_overtakes,
            refill_s=self._sampling_load_locked(),
            until=job,
        )
        wait = sum(j.estimate if isinstance(j, Job) else j for j in ahead)
        wait += sum(self._remaining(j) for j in self._running.values())
        return wait / max(1, len(self.config.devices)) + job.estimate

    def _sampling_load_locked(self) -> float | None:
        """Mean estimate of the sampling jobs queued or running now (None: no sampling load).
        While there is sampling load, more sampling jobs are assumed to keep arriving."""
        jobs = [*self._sampling, *(j for j in self._running.values() if j.is_sampling)]
        return sum(j.estimate for j in jobs) / len(jobs) if jobs else None

    def cancel(self, job_id: str, reason: str) -> Job:
        """Cancel a job by id (see the module docstring). Raises ``JobNotFoundError``."""
        job = self.get(job_id)
        with self._lock:
            queue = self._sampling if job.is_sampling else self._training
            was_queued = job in queue
            if was_queued:
                if queue is self._training and queue[0] is job:
                    self._overtakes = 0  # the next training job in line starts its own count
                queue.remove(job)
                self._queue_changed_locked()
        if was_queued:
            self.metrics.cancellations.labels(reason=_reason_label(reason)).inc()
            job.request_cancel(reason)
            job.finish(JobState.CANCELLED, cancelled_status(reason))
            with self._lock:
                self._retain_locked(job)
        else:
            job.request_cancel(reason)
        return job

    # -- lookups ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire_locked()
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(repr(job_id[:80]))
        return job

    def get_by_request(self, request_id: str) -> Job:
        with self._lock:
            self._expire_locked()
            job = self._by_request.get(request_id)
        if job is None:
            raise JobNotFoundError(f"with request_id {request_id[:80]!r}")
        return job

    def running_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def queue_depth(self) -> int:
        with self._lock:
            return self.queue_depth_locked()

    def queue_depth_locked(self) -> int:
        return len(self._sampling) + len(self._training)

    def idle(self) -> bool:
        """No job running and none queued: every device is free."""
        with self._lock:
            return not self._running and not self._sampling and not self._training

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.02)
        return self.idle()

    def require_ready(self) -> None:
        """Raise ``UnavailableError`` unless new jobs are taken: every engine is warmed up and
        draining has not started. The one readiness rule; health and the RPCs ask here."""
        with self._lock:
            self._require_ready_locked()

    def require_served(self, edit_model: EditModelInfo) -> None:
        """Raise ``UnservedBaseModelError`` unless the edit model's base model is loaded here:
        the one compatibility check, made before a job is queued."""
        served = list(self.base_models.values())
        if not any(b.fingerprint == edit_model.base_model_fingerprint for b in served):
            raise UnservedBaseModelError(
                f"edit model {edit_model.edit_model_id} was fine-tuned on base model "
                f"{edit_model.base_model_name!r}, which this server does not serve; served: "
                f"{', '.join(b.name for b in served)}"
            )

    def _require_ready_locked(self) -> None:
        if not self._accepting:
            raise UnavailableError("the server is shutting down; retry on another replica")
        if not self.ready.is_set():
            raise UnavailableError(
                "the server is still loading its models; retry shortly", retry_after_s=2.0
            )

    # -- the worker -------------------------------------------------------------------------

    def _work(self, device: str) -> None:
        try:
            engines = self._load_engines(device)
        except BaseException as e:  # a worker that cannot load must not take jobs
            self.startup_error = e
            log.exception("device %s could not load its models; it takes no jobs", device)
            return
        with self._lock:
            self._ready_workers += 1
            if self._ready_workers == len(self.config.devices):
                self.ready.set()
        while True:
            job = self._next_job()
            if job is None:
                return
            with job_context(job.job_id):
                try:
                    self._run(job, engines)
                except BaseException:  # a bug in our bookkeeping: keep the device serving
                    log.exception("the worker failed around a job")
                    job.finish(JobState.FAILED, to_rpc_status(RuntimeError("worker failure")))
                    with self._lock:
                        self._running.pop(job.job_id, None)

    def _load_engines(self, device: str) -> dict[str, EngineLike]:
        engines: dict[str, EngineLike] = {}
        for name in self.config.base_models:
            started = time.perf_counter()
            engine = self._engine_factory(name, device)
            engine.warmup()
            info = BaseModelInfo(
                name=name,
                fingerprint=engine.fingerprint,
                height=engine.native_height,
                width=engine.native_width,
                can_caption=engine.can_caption,
            )
            with self._lock:
                self.base_models.setdefault(name, info)
            engines[name] = engine
            log.info(
                "base model %s loaded and warmed up on %s in %.1f s",
                name,
                device,
                time.perf_counter() - started,
            )
        return engines

    def _next_job(self) -> Job | None:
        with self._lock:
            while True:
                if self._stopping:
                    return None
                if self._sampling or self._training:
                    job = self._pop_next_locked()
                    self._running[job.job_id] = job
                    job.set_state(JobState.RUNNING)
                    self._queue_changed_locked()
                    return job
                self._lock.wait(1.0)

    def _run(self, job: Job, engines: Mapping[str, EngineLike]) -> None:
        assert job.started_monotonic is not None
        queue_wait = job.started_monotonic - job.created_monotonic
        job.timings.record("queue_wait", queue_wait)
        self.metrics.queue_wait.labels(method=job.method).observe(queue_wait)
        log.info("job started (%s) after %.3f s in the queue", job.method, queue_wait)
        try:
            self._runner(job, engines)
        except BaseException as exc:  # every way a job can fail ends its stream, never the worker
            mapped = to_rpc_status(exc, context=f"in job {job.job_id}")
            state = JobState.CANCELLED if mapped.reason == "cancelled" else JobState.FAILED
            if state is JobState.CANCELLED:
                self.metrics.cancellations.labels(reason=_reason_label(job.cancel.reason)).inc()
            else:
                self.metrics.failures.labels(method=job.method, reason=mapped.reason).inc()
            log.info("job ended %s: %s", state.name, mapped.status.message)
            job.finish(state, mapped)
        else:
            log.info("job succeeded in %.3f s", job.timings.seconds("total"))
            job.finish(JobState.SUCCEEDED)
        finally:
            with self._lock:
                self._running.pop(job.job_id, None)
                self._retain_locked(job)
                self._queue_changed_locked()

    # -- bookkeeping (call with the lock held) ---------------------------------------------

    def _pop_next_locked(self) -> Job:
        """Take the next job under the ordering rule, and count the overtake it makes."""
        if _training_next(
            bool(self._sampling),
            bool(self._training),
            self._overtakes,
            self.config.max_training_overtakes,
        ):
            self._overtakes = 0
            return self._training.popleft()
        # Overtakes count against the training job first in line; none waits: nothing to count.
        self._overtakes = self._overtakes + 1 if self._training else 0
        return self._sampling.popleft()

    def _queue_changed_locked(self, *, exclude: Job | None = None) -> None:
        """Renumber queued jobs; emit ``queued`` to those whose position changed."""
        order = _planned_order(
            list(self._sampling),
            list(self._training),
            self._overtakes,
            self.config.max_training_overtakes,
        )
        for position, job in enumerate(order, start=1):
            assert isinstance(job, Job)  # no refill_s: real jobs only
            if job.queue_position != position:
                job.queue_position = position
                if job is not exclude:
                    job.emit(wire.queued(position))
        self.metrics.queue_depth.set(self.queue_depth_locked())
        self.metrics.running_jobs.set(len(self._running))

    def _queue_wait_locked(self) -> float:
        """Estimated seconds until a queue slot frees: the next running job to finish."""
        remaining = [self._remaining(j) for j in self._running.values()]
        return min(remaining) if remaining else 1.0

    @staticmethod
    def _remaining(job: Job) -> float:
        if job.started_monotonic is None:
            return job.estimate
        return max(0.0, job.estimate - (time.monotonic() - job.started_monotonic))

    def _retain_locked(self, job: Job) -> None:
        self._finished[job.job_id] = job
        self._expire_locked()

    def _expire_locked(self) -> None:
        now = time.time()
        while self._finished:
            job_id, job = next(iter(self._finished.items()))
            too_many = len(self._finished) > self.config.max_retained
            expired = job.ended_at is not None and now - job.ended_at > self.config.retention_s
            if not (too_many or expired):
                break
            self._finished.popitem(last=False)
            self._jobs.pop(job_id, None)
            if job.request_id and self._by_request.get(job.request_id) is job:
                del self._by_request[job.request_id]


def _training_next(
    sampling_waits: bool, training_waits: bool, overtakes: int, max_overtakes: int
) -> bool:
    """The ordering rule: sampling first, unless the first training job in line has already
    been overtaken ``max_overtakes`` times."""
    return training_waits and (not sampling_waits or overtakes >= max_overtakes)


def _planned_order(
    sampling: list[Job],
    training: list[Job],
    overtakes: int,
    max_overtakes: int,
    *,
    refill_s: float | None = None,
    until: Job | None = None,
) -> list[Job | float]:
    """The order in which the workers will start the queued jobs, by ``_training_next``.

    With ``until``, only the jobs that start before it. With ``refill_s``, the sampling line
    is assumed to be refilled with jobs of that many seconds (steady sampling load) whenever
    it runs dry while a training job could still be overtaken; those appear as floats.
    """
    sampling_line: list[Job | _Phantom] = list(sampling)
    training_line = list(training)
    order: list[Job | float] = []
    while sampling_line or training_line:
        # Steady sampling load: the sampling line refills while the edit may be overtaken.
        if refill_s is not None and overtakes < max_overtakes and not sampling_line:
            sampling_line.append(_Phantom(refill_s))
        if _training_next(bool(sampling_line), bool(training_line), overtakes, max_overtakes):
            overtakes = 0
            nxt: Job | _Phantom = training_line.pop(0)
        else:
            overtakes += bool(training_line)
            nxt = sampling_line.pop(0)
        if nxt is until:
            break
        order.append(nxt.seconds if isinstance(nxt, _Phantom) else nxt)
    return order


class _Phantom:
    """A sampling job assumed to arrive (``_planned_order`` with ``refill_s``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


_REASONS: Sequence[str] = ("client cancelled", "client disconnected", "the server is shutting down")


def _reason_label(reason: str) -> str:
    """Cancellation reasons as a bounded metric label."""
    for known in _REASONS:
        if reason.startswith(known):
            return known.replace(" ", "_").replace("the_", "")
    return "other"
