"""Progress reports and cancellation, shared by training and sampling.

One callback per phase is both the progress hook and the interrupt point (as diffusers'
``callback_on_step_end``): the engine calls it after every training update and every denoising
step, and checks the ``CancelToken`` right after, so a cancel takes effect within one step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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
