"""The scheduler and the job replay buffer without sockets or models: a fake engine factory and
a fake runner whose jobs block until released, so ordering, queue bounds, positions,
idempotency, cancellation and draining are checked deterministically."""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from forgedit.config import SweepConfig, TrainingConfig
from forgedit.errors import CancelledError
from server._proto import forgedit_pb2 as pb
from server.errors import (
    DeadlineTooShortError,
    QueueFullError,
    RequestConflictError,
    UnavailableError,
    UnservedBaseModelError,
)
from server.estimator import Estimator
from server.jobs import Job, JobState
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.plans import EditRequestPlan, SampleRequestPlan
from server.scheduler import Scheduler, SchedulerConfig


class GatedRunner:
    """Each job waits for its gate (or its cancel token), then succeeds."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.started = threading.Semaphore(0)
        self.gates: dict[str, threading.Event] = {}

    def gate(self, job: Job) -> threading.Event:
        return self.gates.setdefault(job.job_id, threading.Event())

    def __call__(self, job: Job, engines: Mapping[str, Any]) -> None:
        assert set(engines) == {"tiny"}
        self.order.append(job.job_id)
        self.started.release()
        gate = self.gate(job)
        while not gate.wait(0.01):
            job.cancel.check()
        job.emit(pb.CompletedEvent())


def _engine(name: str, device: str) -> Any:
    return SimpleNamespace(
        fingerprint="f" * 64,
        native_height=64,
        native_width=64,
        can_caption=False,
        resolutions=[(64, 64)],
        relative_step_cost=lambda height, width: height * width / 64**2,
        warmup=lambda: None,
        settle=lambda timeout=None: True,
    )


@pytest.fixture
def scheduler() -> Iterator[tuple[Scheduler, GatedRunner]]:
    runner = GatedRunner()
    s = Scheduler(
        SchedulerConfig(
            devices=("cpu",), base_models=("tiny",), queue_size=2, retention_s=600, max_retained=8
        ),
        _engine,
        runner,
        Estimator(0.1, 0.01),
        Metrics(),
        Lifecycle(),
    )
    s.lifecycle.start()
    s.start()
    assert s.lifecycle.wait_ready(10)
    yield s, runner
    for gate in runner.gates.values():
        gate.set()
    s.stop()


_counter = iter(range(10**6))


def _job(
    kind: pb.JobKind = pb.JOB_KIND_EDIT, request_id: str = "", digest: str = "d", client: str = ""
) -> Job:
    sweep = SweepConfig(prompts=("a dog",), steps=2)
    plan: Any
    if kind == pb.JOB_KIND_EDIT:
        image: Any = SimpleNamespace(sha256="0" * 64)
        plan = EditRequestPlan(
            request_id,
            image,
            "tiny",
            "a photo",
            TrainingConfig.for_mode("joint", height=64, width=64),
            sweep,
            False,
        )
    else:
        plan = SampleRequestPlan(request_id, "em_" + "a" * 26, sweep, False)
    return Job(
        job_id=f"job_{next(_counter)}",
        kind=kind,
        plan=plan,
        payload_digest=digest,
        estimated_s=1.0,
        max_events=100,
        max_bytes=10**6,
        client=client,
    )


def _kinds(job: Job) -> list[str]:
    events, _ = job.read(0, timeout=0)
    return [e.WhichOneof("kind") or "" for e in events]


def test_a_job_an_idle_worker_takes_is_starting_now(scheduler: tuple) -> None:
    s, runner = scheduler
    first = s.submit(_job())[0]
    events, _ = first.read(0, timeout=0)
    assert events[0].accepted.queue_position == 0  # the contract: 0 = starting now
    assert runner.started.acquire(timeout=5)
    second = s.submit(_job())[0]
    events, _ = second.read(0, timeout=0)
    assert events[0].accepted.queue_position == 1  # the only worker is busy
    runner.gate(first).set()
    assert runner.started.acquire(timeout=5)
    runner.gate(second).set()


def test_sampling_jobs_overtake_queued_training_jobs(scheduler: tuple) -> None:
    s, runner = scheduler
    running = s.submit(_job())[0]
    assert runner.started.acquire(timeout=5)
    edit = s.submit(_job())[0]
    sample = s.submit(_job(pb.JOB_KIND_SAMPLE))[0]
    assert (edit.queue_position, sample.queue_position) == (2, 1)
    assert _kinds(edit) == ["accepted", "queued"]  # told when the sample jumped ahead
    events, _ = edit.read(1, timeout=0)
    assert events[0].queued.position == 2
    runner.gate(running).set()
    assert runner.started.acquire(timeout=5)
    assert runner.order[1] == sample.job_id
    runner.gate(sample).set()
    assert runner.started.acquire(timeout=5)
    runner.gate(edit).set()
    assert edit.wait_finished(5) and edit.state is JobState.SUCCEEDED
    assert s.wait_idle(5)


def test_an_edit_model_of_an_unserved_base_model_is_refused_before_queueing(
    scheduler: tuple,
) -> None:
    s, _ = scheduler
    served = SimpleNamespace(
        edit_model_id="em_a",
        base_model_name="tiny",
        base_model_fingerprint="f" * 64,
        height=64,
        width=64,
    )
    s.catalog.require_served(served)  # the fake engine's fingerprint: accepted
    other = SimpleNamespace(
        edit_model_id="em_b",
        base_model_name="sd15",
        base_model_fingerprint="e" * 64,
        height=64,
        width=64,
    )
    with pytest.raises(UnservedBaseModelError, match="'sd15', which this server does not serve"):
        s.catalog.require_served(other)
    assert s.queue_depth() == 0


def test_a_full_queue_refuses_with_a_retry_hint(scheduler: tuple) -> None:
    s, runner = scheduler
    s.submit(_job())
    assert runner.started.acquire(timeout=5)
    s.submit(_job())
    s.submit(_job())
    with pytest.raises(QueueFullError) as refused:
        s.submit(_job())
    assert refused.value.retry_after_s > 0 and refused.value.limit == 2
    assert refused.value.subject == "job-queue" and "FORGEDIT_QUEUE_SIZE" in str(refused.value)
    assert s.queue_depth() == 2


def test_request_id_reattaches_or_conflicts(scheduler: tuple) -> None:
    s, _ = scheduler
    first, new = s.submit(_job(request_id="r-1", digest="same"))
    again, new_again = s.submit(_job(request_id="r-1", digest="same"))
    assert new and not new_again and again is first
    with pytest.raises(RequestConflictError):
        s.submit(_job(request_id="r-1", digest="other"))
    assert s.get_by_request("r-1") is first


def test_cancel_a_queued_job_and_a_running_job(scheduler: tuple) -> None:
    s, runner = scheduler
    running = s.submit(_job())[0]
    assert runner.started.acquire(timeout=5)
    queued = s.submit(_job())[0]
    s.cancel(queued.job_id, "client cancelled")
    assert queued.state is JobState.CANCELLED and queued.error is not None
    assert queued.error.reason == "cancelled"
    s.cancel(running.job_id, "client cancelled")
    assert running.wait_finished(5) and running.state is JobState.CANCELLED
    assert s.wait_idle(5)
    # Cancelling a finished job changes nothing.
    assert s.cancel(running.job_id, "again").state is JobState.CANCELLED


def test_deadline_shorter_than_queue_plus_run_is_refused(scheduler: tuple) -> None:
    s, runner = scheduler
    s.submit(_job())
    assert runner.started.acquire(timeout=5)
    with pytest.raises(DeadlineTooShortError) as refused:
        s.submit(_job(), remaining_s=0.5)
    assert refused.value.estimated_s > 0.5
    assert s.queue_depth() == 0


def test_drain_refuses_new_work_ends_queued_and_lets_running_finish(scheduler: tuple) -> None:
    s, runner = scheduler
    running = s.submit(_job())[0]
    assert runner.started.acquire(timeout=5)
    queued = s.submit(_job())[0]
    threading.Timer(0.2, runner.gate(running).set).start()
    s.lifecycle.start_draining()
    s.drain(grace_s=10)
    assert running.state is JobState.SUCCEEDED
    assert queued.state is JobState.FAILED and queued.error is not None
    assert queued.error.reason == "unavailable"
    with pytest.raises(UnavailableError):
        s.submit(_job())


def test_drain_cancels_running_jobs_after_the_grace_period(scheduler: tuple) -> None:
    s, runner = scheduler
    running = s.submit(_job())[0]
    assert runner.started.acquire(timeout=5)
    s.lifecycle.start_draining()
    s.drain(grace_s=0.1)
    assert running.state is JobState.CANCELLED
    assert "shutting down" in running.cancel.reason


def test_replay_buffer_is_bounded_and_keeps_sequence_numbers() -> None:
    job = _job()
    job.max_events = 3
    for i in range(5):
        job.emit(pb.TrainingEvent(update=i + 1, total=5))
    events, finished = job.read(0, timeout=0)
    assert [e.sequence for e in events] == [3, 4, 5] and not finished  # a visible gap
    assert [e.sequence for e in job.read(4, timeout=0)[0]] == [5]
    beat = job.heartbeat()
    assert beat.sequence == 5 and beat.WhichOneof("kind") == "heartbeat"
    assert job.last_sequence == 5  # heartbeats are not buffered
    job.max_bytes = 1  # one large event always stays, so a reader never gets nothing
    job.emit(pb.ImageEvent(png=b"x" * 1000))
    assert [e.sequence for e in job.read(0, timeout=0)[0]] == [6]


def test_finished_jobs_keep_no_plan_and_their_events_within_a_byte_budget() -> None:
    """The job table forgets the oldest finished jobs first once their events exceed its
    byte budget (or its count), and counts what the rest keep."""
    from server.errors import JobNotFoundError
    from server.job_table import JobTable

    table = JobTable(retention_s=600, max_retained=10, max_bytes=2500)
    jobs = []
    for _ in range(4):
        job = _job(request_id=f"r-{len(jobs)}")
        table.add(job)
        job.emit(pb.ImageEvent(png=b"x" * 1000))
        job.finish(JobState.SUCCEEDED)
        assert job.plan is None  # a finished job keeps no request (an Edit's: its image)
        table.retain(job)
        jobs.append(job)
    assert table.retained == 2 and table.retained_bytes <= 2500
    assert table.retained_bytes == sum(j.event_bytes for j in jobs[2:])
    for gone in jobs[:2]:  # the oldest first, by id and by request id
        with pytest.raises(JobNotFoundError):
            table.get(gone.job_id)
        with pytest.raises(JobNotFoundError):
            table.get_by_request(gone.request_id)
    assert table.get(jobs[3].job_id) is jobs[3] and table.get_by_request("r-2") is jobs[2]
    table.retain(jobs[3])  # retaining twice counts once
    assert table.retained_bytes == sum(j.event_bytes for j in jobs[2:])


def test_finish_happens_once_and_wakes_readers() -> None:
    job = _job()
    woke = threading.Event()

    def reader() -> None:
        _, finished = job.read(0, timeout=5)
        if finished:
            woke.set()

    t = threading.Thread(target=reader)
    t.start()
    job.finish(JobState.SUCCEEDED)
    job.finish(JobState.FAILED)  # ignored
    t.join(5)
    assert woke.is_set() and job.state is JobState.SUCCEEDED


def test_cancel_token_is_what_the_engine_checks() -> None:
    job = _job()
    job.set_state(JobState.RUNNING)
    assert job.request_cancel("client cancelled")
    assert job.state is JobState.CANCELLING
    with pytest.raises(CancelledError):
        job.cancel.check()


# ------------------------------------------------------------------ bounded overtaking


def _fair_scheduler(max_overtakes: int) -> tuple[Scheduler, GatedRunner]:
    runner = GatedRunner()
    s = Scheduler(
        SchedulerConfig(
            devices=("cpu",),
            base_models=("tiny",),
            queue_size=16,
            retention_s=600,
            max_retained=32,
            max_training_overtakes=max_overtakes,
        ),
        _engine,
        runner,
        Estimator(0.1, 0.01),
        Metrics(),
        Lifecycle(),
    )
    s.lifecycle.start()
    s.start()
    assert s.lifecycle.wait_ready(10)
    return s, runner


def _run_all(s: Scheduler, runner: GatedRunner, count: int) -> None:
    """Release jobs one at a time in the order they start."""
    for _ in range(count):
        assert runner.started.acquire(timeout=5)
        runner.gates.setdefault(runner.order[-1], threading.Event()).set()
    assert s.wait_idle(5)


def test_a_queued_edit_is_overtaken_at_most_max_training_overtakes_times() -> None:
    s, runner = _fair_scheduler(max_overtakes=2)
    try:
        first = s.submit(_job())[0]
        assert runner.started.acquire(timeout=5)
        edit = s.submit(_job())[0]
        samples = [s.submit(_job(pb.JOB_KIND_SAMPLE))[0] for _ in range(4)]
        # Positions follow the order the worker will take: two samples, the edit, the rest.
        assert [j.queue_position for j in (samples[0], samples[1], edit)] == [1, 2, 3]
        assert [j.queue_position for j in samples[2:]] == [4, 5]
        runner.gate(first).set()
        _run_all(s, runner, 5)
        started = runner.order[1:]
        assert started[:3] == [samples[0].job_id, samples[1].job_id, edit.job_id]
        assert started[3:] == [samples[2].job_id, samples[3].job_id]
    finally:
        s.stop()


def test_the_deadline_estimate_of_an_edit_counts_the_samples_that_will_overtake_it() -> None:
    # Steady sampling load: one sample queued, more keep arriving. With at most 2 overtakes the
    # edit waits for two samples (the queued one and one more), never for an unbounded number.
    s, runner = _fair_scheduler(max_overtakes=2)
    try:
        first = _job()
        first.estimated_s = 0.0  # nothing left to wait for on the device
        s.submit(first)
        assert runner.started.acquire(timeout=5)
        s.submit(_job(pb.JOB_KIND_SAMPLE))
        with pytest.raises(DeadlineTooShortError) as refused:
            s.submit(_job(), remaining_s=0.001)
        # Two samples of 1 s ahead (one queued, one expected to arrive) plus its own 1 s.
        assert refused.value.estimated_s == pytest.approx(3.0)
        edit = s.submit(_job(), remaining_s=3.5)[0]
        later = s.submit(_job(pb.JOB_KIND_SAMPLE))[0]
        also_later = s.submit(_job(pb.JOB_KIND_SAMPLE))[0]
        runner.gate(first).set()
        _run_all(s, runner, 4)
        # The estimate was true: exactly two samples started before the edit.
        assert runner.order.index(edit.job_id) == 3
        assert runner.order.index(later.job_id) == 2
        assert runner.order.index(also_later.job_id) == 4
    finally:
        s.stop()


def test_without_sampling_load_an_edit_is_not_charged_for_samples_that_may_never_come() -> None:
    s, runner = _fair_scheduler(max_overtakes=2)
    try:
        first = _job()
        first.estimated_s = 0.0
        s.submit(first)
        assert runner.started.acquire(timeout=5)
        with pytest.raises(DeadlineTooShortError) as refused:
            s.submit(_job(), remaining_s=0.001)
        assert refused.value.estimated_s == pytest.approx(1.0)
        runner.gate(first).set()
        assert s.wait_idle(5)
    finally:
        s.stop()


def test_a_cancelled_edit_does_not_pass_its_overtakes_on_to_the_next() -> None:
    s, runner = _fair_scheduler(max_overtakes=2)
    try:
        first = s.submit(_job())[0]
        assert runner.started.acquire(timeout=5)
        doomed, edit = s.submit(_job())[0], s.submit(_job())[0]
        samples = [s.submit(_job(pb.JOB_KIND_SAMPLE))[0] for _ in range(3)]
        runner.gate(first).set()
        assert runner.started.acquire(timeout=5)  # samples[0] overtakes `doomed`
        s.cancel(doomed.job_id, "client cancelled")
        runner.gate(samples[0]).set()
        _run_all(s, runner, 3)
        # `edit` is overtaken twice itself (samples 1 and 2), not once.
        assert runner.order[1:] == [j.job_id for j in (*samples, edit)]
    finally:
        s.stop()


# ------------------------------------------------------------------ fair shares of the queue


def test_one_client_cannot_fill_the_queue_and_clients_take_turns() -> None:
    """Issue 21.3: one client with many (detached) jobs filled all 16 places and another's
    Edit was refused for minutes. Now the last quarter is kept for clients with none waiting,
    and queued jobs start round-robin by client."""
    s, runner = _fair_scheduler(max_overtakes=4)
    try:
        running = s.submit(_job(client="a"))[0]
        assert runner.started.acquire(timeout=5)
        greedy = []
        with pytest.raises(QueueFullError) as refused:
            for _ in range(16):
                greedy.append(s.submit(_job(client="a"))[0])
        assert len(greedy) == 12  # 16 places, the last 4 kept for new clients
        assert refused.value.subject == "job-queue-kept-for-new-clients"
        assert "FORGEDIT_QUEUE_KEPT_FOR_NEW_CLIENTS" in str(refused.value)
        assert refused.value.retry_after_s > 0
        others = [s.submit(_job(client=c))[0] for c in ("b", "c", "d", "e")]
        with pytest.raises(QueueFullError, match="FORGEDIT_QUEUE_SIZE"):
            s.submit(_job(client="f"))
        # Turns: a's first, then each other client's, before a's second.
        assert [j.queue_position for j in others] == [2, 3, 4, 5]
        assert greedy[0].queue_position == 1 and greedy[1].queue_position == 6
        runner.gate(running).set()
        _run_all(s, runner, 16)
        assert runner.order[1:7] == [
            greedy[0].job_id,
            *(j.job_id for j in others),
            greedy[1].job_id,
        ]
    finally:
        for gate in runner.gates.values():
            gate.set()
        s.stop()


def test_estimates_scale_with_the_step_cost_of_the_jobs_resolution() -> None:
    """Rates are per step at the native size: a job at a resolution whose UNet step costs 2.7x
    is estimated 2.7x (less the fixed overhead), and what it measured updates the native rate
    by the same factor, so a run at 768x768 does not inflate the next 512x512 estimate."""
    estimator = Estimator(0.1, 0.01)
    native, large = _job(), _job()
    large.plan = dataclasses.replace(large.plan, step_cost=2.7)
    overhead = estimator.fixed_overhead_s
    base = estimator.estimate(native) - overhead
    assert base > 0
    assert estimator.estimate(large) - overhead == pytest.approx(2.7 * base)
    sample = _job(pb.JOB_KIND_SAMPLE)
    sample.plan = dataclasses.replace(sample.plan, step_cost=2.0)
    image_steps = sample.plan.sweep.num_images * sample.plan.sweep.steps
    assert estimator.estimate(sample) - overhead == pytest.approx(image_steps * 0.01 * 2.0)
    # A 768x768 job that ran exactly as estimated leaves the native rates where they were.
    estimator.observe_sampling(100, 100 * 0.01 * 2.7, step_cost=2.7)
    estimator.observe_training(10, 10 * 0.1 * 2.7, step_cost=2.7)
    assert estimator.seconds_per_image_step == pytest.approx(0.01)
    assert estimator.seconds_per_training_sample == pytest.approx(0.1)
    assert estimator.estimate(native) - overhead == pytest.approx(base)


def test_the_edit_plan_carries_the_step_cost_of_its_resolution() -> None:
    """The served-models catalog prices a plan's resolution (``ServedModels.step_cost``)."""
    from forgedit.options import EditOptions, TrainingOptions
    from server.catalog import ServedModels
    from server.plans import EditCall, edit_plan
    from server.ports import BaseModelInfo
    from server.validation import Limits

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    info = BaseModelInfo(
        "tiny",
        "f" * 64,
        64,
        64,
        False,
        resolutions=((64, 64), (64, 96)),
        step_cost=lambda height, width: height * width / 64**2,
    )
    served = ServedModels.of(info)

    def plan(width: int) -> EditRequestPlan:
        options = EditOptions(
            target_prompts=("a dog",),
            source_prompt="a photo",
            training=TrainingOptions(width=width),
        )
        return edit_plan(EditCall("", False, "", png.getvalue(), options), Limits(), served)

    assert plan(64).step_cost == 1.0 and plan(96).step_cost == 1.5
