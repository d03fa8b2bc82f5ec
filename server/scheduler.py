"""The job scheduler: one worker thread per device, and what happens to a job from submission
to its end.

Contract
- Each device has one worker thread that builds its engines (one per served base model) in
  that thread, warms them up, tells the served-models catalog what it loaded
  (``server.catalog``) and meets its readiness condition (``server.lifecycle``); then it runs
  one job at a time. The worker owns the device: no other thread touches its engines.
- Which queued job runs next, queue positions, the queue bound and the wait estimate are the
  queue policy's (``server.queueing``); which jobs are remembered, by id and request id, and
  for how long, the job table's (``server.job_table``). The scheduler holds both under one
  lock and turns their answers into events and errors.
- ``submit`` refuses while the replica is not ready (``Lifecycle.require_ready``), re-attaches
  a known request id, refuses a full queue or a client over its fair share of it
  (``QueueFullError`` naming the bound, with a retry delay) and a
  deadline shorter than the job's estimate with its wait (``DeadlineTooShortError``); a new
  job's first event is ``accepted``, then ``queued(position)`` whenever its position changes.
- ``cancel`` removes a queued job at once (state CANCELLED) or asks a running job to stop at
  its next training update or denoising step (the engine checks the job's ``CancelToken``).
  A job waiting for a UNet build (a new resolution's export or engine) stops waiting at once;
  the build finishes on the device, and its worker waits for it before the next job
  (``EngineLike.settle``), which meanwhile stays queued.
- ``drain`` (once the lifecycle is draining): queued jobs end UNAVAILABLE (the client retries
  on another replica), running jobs get ``grace_s`` to finish and are then cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from server import wire
from server.catalog import OtherResolutions, ServedModels
from server.errors import (
    DeadlineTooShortError,
    UnavailableError,
    cancelled_status,
    to_rpc_status,
)
from server.estimator import Estimator
from server.job_table import JobTable
from server.jobs import Job, JobState
from server.lifecycle import Condition, Lifecycle
from server.logs import job_context
from server.metrics import Metrics
from server.ports import BaseModelInfo, EngineFactory, EngineLike
from server.queueing import JobQueue

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
    max_retained_bytes: int = 256 * 1024 * 1024
    queue_kept_for_new: int | None = None  # None: a quarter of the queue (server.queueing)
    other_resolutions: OtherResolutions = "refuse"  # ``server.catalog``


class Scheduler:
    """Owns the devices. See the module docstring for the contract."""

    def __init__(
        self,
        config: SchedulerConfig,
        engine_factory: EngineFactory,
        runner: RunJob,
        estimator: Estimator,
        metrics: Metrics,
        lifecycle: Lifecycle,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._runner = runner
        self.estimator = estimator
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.catalog = ServedModels(config.base_models, config.other_resolutions)
        self._lock = threading.Condition()
        self._queue = JobQueue(
            config.queue_size, config.max_training_overtakes, config.queue_kept_for_new
        )
        self._table = JobTable(config.retention_s, config.max_retained, config.max_retained_bytes)
        # What finished jobs keep, as of each scrape (expiry is lazy: it runs then too).
        metrics.retained_jobs.set_function(lambda: self._retained()[0])
        metrics.retained_job_bytes.set_function(lambda: self._retained()[1])
        self._running: dict[str, Job] = {}
        self._stopping = False
        self._workers: list[threading.Thread] = []
        # Readiness waits for every device's engines (``_work``): each base model's compiled
        # UNet built or loaded at every declared resolution, its canary passed.
        self._loaded = {
            device: lifecycle.condition(
                f"engines built at every declared resolution, canaries passed, on {device}"
            )
            for device in config.devices
        }

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker per device; each meets its readiness condition once its engines
        are warmed up."""
        for index, device in enumerate(self.config.devices):
            worker = threading.Thread(
                target=self._work, args=(device,), name=f"forgedit-worker-{index}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def drain(self, grace_s: float) -> None:
        """End queued jobs UNAVAILABLE; let running ones finish for ``grace_s``, then cancel
        them; stop the workers. New submissions are refused by then: the lifecycle is draining
        (``Lifecycle.start_draining`` comes first)."""
        with self._lock:
            queued = self._queue.take_all()
            self._queue_changed_locked()
        unavailable = to_rpc_status(
            UnavailableError(
                "the server is shutting down before this job could start; retry on another replica"
            )
        )
        for job in queued:
            job.finish(JobState.FAILED, unavailable)
            with self._lock:
                self._table.retain(job)
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
            self._lock.notify_all()
        for worker in self._workers:
            worker.join(timeout=15.0)
            if worker.is_alive():
                log.warning(
                    "%s is still finishing a UNet build a cancelled job left; the process "
                    "exits when it ends",
                    worker.name,
                )

    # -- submission -------------------------------------------------------------------------

    def submit(self, job: Job, remaining_s: float | None = None) -> tuple[Job, bool]:
        """Queue ``job``, or return the existing job of its request id.

        Returns (job, is_new). Raises ``UnavailableError`` when not ready or draining,
        ``RequestConflictError`` for a reused request id with another payload,
        ``QueueFullError`` when the queue is full or the job's client has its share of it
        (``server.queueing``), and ``DeadlineTooShortError`` when
        ``remaining_s`` (the call's time left) is shorter than the job's estimated run time
        plus its estimated wait in the queue.
        """
        if job.estimated_s is None:
            job.estimated_s = self.estimator.estimate(job)
        with self._lock:
            existing = self._table.existing(job)
            if existing is not None:
                return existing, False
            self.lifecycle.require_ready()
            running = self._running.values()
            self._queue.admit(job, running)  # the queue's bound and this client's share
            if remaining_s is not None:
                estimate = self._queue.estimate_with_wait(job, running, len(self.config.devices))
                if remaining_s < estimate:
                    raise DeadlineTooShortError(remaining_s, estimate)
            self._queue.push(job)
            self._table.add(job)
            # Renumber first (announcing moves to the others), then tell the new job its place:
            # under the lock, so `accepted` is always its first event.
            self._queue_changed_locked(exclude=job)
            # A job that an idle worker takes at once is "starting now" (0), not first in line.
            idle_workers = len(self.config.devices) - len(self._running)
            position = max(0, job.queue_position - idle_workers)
            job.emit(wire.accepted(job.job_id, position, job.images_total, job.estimate))
            self._lock.notify_all()
            return job, True

    def cancel(self, job_id: str, reason: str) -> Job:
        """Cancel a job by id (see the module docstring). Raises ``JobNotFoundError``."""
        job = self.get(job_id)
        with self._lock:
            was_queued = self._queue.remove(job)
            if was_queued:
                self._queue_changed_locked()
        if was_queued:
            self.metrics.cancellations.labels(reason=_reason_label(reason)).inc()
            job.request_cancel(reason)
            job.finish(JobState.CANCELLED, cancelled_status(reason))
            with self._lock:
                self._table.retain(job)
        else:
            job.request_cancel(reason)
        return job

    # -- lookups ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """Raises ``JobNotFoundError``."""
        with self._lock:
            return self._table.get(job_id)

    def get_by_request(self, request_id: str) -> Job:
        """Raises ``JobNotFoundError``."""
        with self._lock:
            return self._table.get_by_request(request_id)

    def _retained(self) -> tuple[int, int]:
        """(finished jobs kept, the bytes of their events), expired ones forgotten first."""
        with self._lock:
            self._table.expire()
            return self._table.retained, self._table.retained_bytes

    def running_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def idle(self) -> bool:
        """No job running and none queued: every device is free."""
        with self._lock:
            return not self._running and not self._queue

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.02)
        return self.idle()

    # -- the worker -------------------------------------------------------------------------

    def _work(self, device: str) -> None:
        loaded: Condition = self._loaded[device]
        try:
            engines = self._load_engines(device)
        except BaseException as e:  # a worker that cannot load must not take jobs
            log.exception("device %s could not load its models; it takes no jobs", device)
            loaded.fail(e)
            return
        loaded.satisfy()
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
                # A build the job stopped waiting for uses the device: the next job waits for
                # it here, still queued (cancellable, its position told), not on the device.
                for engine in engines.values():
                    engine.settle()

    def _load_engines(self, device: str) -> dict[str, EngineLike]:
        engines: dict[str, EngineLike] = {}
        for name in self.config.base_models:
            started = time.perf_counter()
            engine = self._engine_factory(name, device)
            engine.warmup()
            self.catalog.add(
                BaseModelInfo(
                    name=name,
                    fingerprint=engine.fingerprint,
                    height=engine.native_height,
                    width=engine.native_width,
                    can_caption=engine.can_caption,
                    resolutions=tuple(engine.resolutions),
                    step_cost=engine.relative_step_cost,
                )
            )
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
                job = self._queue.pop_next()
                if job is not None:
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
                self._table.retain(job)
                self._queue_changed_locked()

    def _queue_changed_locked(self, *, exclude: Job | None = None) -> None:
        """Renumber queued jobs, tell those that moved (``queued``), update the gauges."""
        for job in self._queue.renumber():
            if job is not exclude:
                job.emit(wire.queued(job.queue_position))
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.running_jobs.set(len(self._running))


_REASONS: Sequence[str] = ("client cancelled", "client disconnected", "the server is shutting down")


def _reason_label(reason: str) -> str:
    """Cancellation reasons as a bounded metric label."""
    for known in _REASONS:
        if reason.startswith(known):
            return known.replace(" ", "_").replace("the_", "")
    return "other"
