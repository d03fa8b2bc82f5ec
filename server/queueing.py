"""The queue policy: which queued job starts next, where each job stands, how long it will wait,
and who may queue one more.

- Queued sampling jobs run before queued training (Edit) jobs, but not forever: once
  ``max_training_overtakes`` sampling jobs have started while the same training job was first
  in its line, that training job starts next (bounded ageing; 0 = no overtaking at all).
- Within a kind, clients take turns (``_FairLine``): each client's jobs in the order they
  came, the clients round-robin, a client whose job just started going to the back. One
  client's many queued jobs delay another client's first by at most one of theirs.
- Admission is a fair share (``server.shares``): at most ``max_size`` jobs wait (running ones
  are not counted), and the last ``kept_for_new`` places are kept for clients with no job
  waiting, so a client that queues many (detached) jobs cannot lock the others out.
- Positions and the wait estimate follow this very order (``planned_order``). The estimate of
  a training job also counts the sampling jobs that may still overtake it while sampling load
  is present (queued or running sampling work), so that under steady sampling load it is an
  honest upper bound, not the time to drain the current queue.

Every rule about order and admission lives here. Not thread-safe: the scheduler calls it
under its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator

from server.errors import QueueFullError
from server.jobs import Job
from server.shares import Refusal, ShareRule, quarter

QUEUE_SIZE_SETTING = "FORGEDIT_QUEUE_SIZE"
QUEUE_KEPT_SETTING = "FORGEDIT_QUEUE_KEPT_FOR_NEW_CLIENTS"


class _FairLine:
    """One line of queued jobs (sampling or training), in turns by client: round ``i`` holds
    each client's ``i``-th job, clients in their turn order; a client whose job starts goes
    to the back of the turn order. A client is ``Job.client``."""

    def __init__(self) -> None:
        self._by_client: OrderedDict[str, deque[Job]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._by_client.values())

    def __bool__(self) -> bool:
        return bool(self._by_client)

    def __contains__(self, job: object) -> bool:
        return isinstance(job, Job) and job in self._by_client.get(job.client, ())

    def __iter__(self) -> Iterator[Job]:
        """The jobs in the order they will start (were nothing to arrive)."""
        lines = list(self._by_client.values())
        for i in range(max(map(len, lines), default=0)):
            yield from (jobs[i] for jobs in lines if i < len(jobs))

    def count(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def push(self, job: Job) -> None:
        self._by_client.setdefault(job.client, deque()).append(job)

    def first(self) -> Job | None:
        return next(iter(self), None)

    def pop(self) -> Job:
        client, jobs = next(iter(self._by_client.items()))
        job = jobs.popleft()
        del self._by_client[client]
        if jobs:
            self._by_client[client] = jobs  # its turn is over: to the back
        return job

    def remove(self, job: Job) -> bool:
        jobs = self._by_client.get(job.client)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self._by_client[job.client]
        return True

    def with_job(self, job: Job) -> list[Job]:
        """The order were ``job`` pushed now."""
        line = _FairLine()
        for client, jobs in self._by_client.items():
            line._by_client[client] = deque(jobs)
        line.push(job)
        return list(line)

    def clear(self) -> None:
        self._by_client.clear()


class JobQueue:
    """Two lines (sampling, training), the ordering rule between them, and admission."""

    def __init__(
        self, max_size: int, max_training_overtakes: int, kept_for_new: int | None = None
    ) -> None:
        self.max_size = max_size
        self.max_training_overtakes = max_training_overtakes
        # Admission: a client may fill the queue but for the places kept for new clients.
        self.share = ShareRule(
            capacity=max_size,
            per_client=max_size,
            kept_for_new=quarter(max_size) if kept_for_new is None else kept_for_new,
            capacity_setting=QUEUE_SIZE_SETTING,
            per_client_setting=QUEUE_SIZE_SETTING,
            kept_setting=QUEUE_KEPT_SETTING,
        )
        self._sampling = _FairLine()
        self._training = _FairLine()
        # Sampling jobs started since the first queued training job became first in line.
        self._overtakes = 0

    def __len__(self) -> int:
        return len(self._sampling) + len(self._training)

    def waiting(self, client: str) -> int:
        """Jobs of ``client`` waiting."""
        return self._sampling.count(client) + self._training.count(client)

    def admit(self, job: Job, running: Iterable[Job]) -> None:
        """Raise ``QueueFullError`` (naming the bound and its setting, with a retry delay)
        unless ``job``'s client may queue one more (``server.shares``)."""
        refusal = self.share.refusal(self.waiting(job.client), len(self))
        if refusal is not None:
            raise _queue_full(refusal, self.retry_after(running))

    def push(self, job: Job) -> None:
        (self._sampling if job.is_sampling else self._training).push(job)

    def __contains__(self, job: object) -> bool:
        return job in self._sampling or job in self._training

    def remove(self, job: Job) -> bool:
        """Take ``job`` out of its line; False if it was not queued. The training job behind
        a removed first one starts its own overtake count."""
        line = self._sampling if job.is_sampling else self._training
        if line is self._training and line.first() is job:
            self._overtakes = 0
        return line.remove(job)

    def take_all(self) -> list[Job]:
        """Empty the queue (draining); the jobs in queue order."""
        jobs = self.planned_order()
        self._sampling.clear()
        self._training.clear()
        return jobs

    def pop_next(self) -> Job | None:
        """The next job under the ordering rule, counting the overtake it makes."""
        if _training_next(
            bool(self._sampling), bool(self._training), self._overtakes, self.max_training_overtakes
        ):
            self._overtakes = 0
            return self._training.pop()
        if not self._sampling:
            return None
        # Overtakes count against the training job first in line; none waits: nothing to count.
        self._overtakes = self._overtakes + 1 if self._training else 0
        return self._sampling.pop()

    def planned_order(self) -> list[Job]:
        """The queued jobs in the order the workers will start them."""
        order = _planned_order(
            list(self._sampling), list(self._training), self._overtakes, self.max_training_overtakes
        )
        return [job for job in order if isinstance(job, Job)]  # no refill: real jobs only

    def renumber(self) -> list[Job]:
        """Give every queued job its 1-based position; returns those whose position changed."""
        moved = []
        for position, job in enumerate(self.planned_order(), start=1):
            if job.queue_position != position:
                job.queue_position = position
                moved.append(job)
        return moved

    def estimate_with_wait(self, job: Job, running: Iterable[Job], workers: int) -> float:
        """``job``'s estimated run time plus its wait before it starts, in the order the
        workers will take the jobs, were it queued now (see the module docstring)."""
        running = list(running)
        sampling = self._sampling.with_job(job) if job.is_sampling else list(self._sampling)
        training = list(self._training) if job.is_sampling else self._training.with_job(job)
        ahead = _planned_order(
            sampling,
            training,
            self._overtakes,
            self.max_training_overtakes,
            refill_s=self._sampling_load(running),
            until=job,
        )
        wait = sum(j.estimate if isinstance(j, Job) else j for j in ahead)
        wait += sum(_remaining(j) for j in running)
        return wait / max(1, workers) + job.estimate

    def retry_after(self, running: Iterable[Job]) -> float:
        """Estimated seconds until a queue slot frees: the next running job to finish."""
        remaining = [_remaining(j) for j in running]
        return min(remaining) if remaining else 1.0

    def _sampling_load(self, running: list[Job]) -> float | None:
        """Mean estimate of the sampling jobs queued or running now (None: no sampling load).
        While there is sampling load, more sampling jobs are assumed to keep arriving."""
        jobs = [*self._sampling, *(j for j in running if j.is_sampling)]
        return sum(j.estimate for j in jobs) / len(jobs) if jobs else None


def _queue_full(refusal: Refusal, retry_after_s: float) -> QueueFullError:
    """The refusal of a job the queue will not take, in words: which bound, its setting."""
    retry = f"retry in about {max(1, round(retry_after_s))} s or on another replica"
    if refusal.bound == "kept-for-new-clients":
        message = (
            f"this client has {refusal.held} jobs waiting and the queue's last "
            f"{refusal.limit} places are kept for clients with none ({refusal.setting}); "
            f"{retry}"
        )
        subject = "job-queue-kept-for-new-clients"
    else:
        message = (
            f"the job queue is full ({refusal.limit} jobs waiting, {refusal.setting}); {retry}"
        )
        subject = "job-queue"
    return QueueFullError(
        message,
        subject=subject,
        limit=refusal.limit,
        setting=refusal.setting,
        retry_after_s=retry_after_s,
    )


def _remaining(job: Job) -> float:
    """Seconds a job still needs: its estimate, less what it has run."""
    if job.started_monotonic is None:
        return job.estimate
    return max(0.0, job.estimate - (time.monotonic() - job.started_monotonic))


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
