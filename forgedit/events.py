"""Progress reports, cancellation and phase timings, shared by training and sampling.

One callback per phase is both the progress hook and the interrupt point (as diffusers'
``callback_on_step_end``): the engine calls it after every training update and every denoising
step, and checks the ``CancelToken`` right after, so a cancel takes effect within one step.
``PhaseTimer`` is the one clock of a run's phases (the CLI's summary, a server job's timings).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from forgedit.errors import CancelledError


@dataclass(frozen=True)
class TrainingProgress:
    stage: str  # "joint", "embedding", "unet" or "dreambooth"
    update: int  # 1-based, counted across stages
    total: int  # planned updates across stages (an early stop may end sooner)
    loss: float
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.update * (self.total - self.update) if self.update else 0.0


@dataclass(frozen=True)
class SamplingProgress:
    forget: str  # the strategy being sampled
    images_done: int  # finished images across the whole sweep
    images_total: int
    batch_images: int  # images in the denoising loop running now
    step: int  # 1-based denoising step of that loop
    steps: int
    elapsed_s: float


TrainingCallback = Callable[[TrainingProgress], None]
SamplingCallback = Callable[[SamplingProgress], None]


class CancelToken:
    """A thread-safe flag a caller sets to stop a running job at its next step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise ``CancelledError`` if cancelled."""
        if self._event.is_set():
            raise CancelledError(self.reason)


class PhaseTimer:
    """Wall-clock seconds per named phase of one run (``timings``), e.g. ``caption``,
    ``training``, ``sampling``. Not thread-safe: one run, one timer."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``, added to what the phase took before. A block
        that raises records nothing: a failed phase has no duration worth reporting."""
        started = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - started)

    def record(self, name: str, seconds: float) -> None:
        """Add ``seconds`` measured elsewhere (a queue wait, a total) to phase ``name``."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def seconds(self, name: str) -> float:
        """What phase ``name`` took so far (0.0 if it never ran)."""
        return self.timings.get(name, 0.0)
