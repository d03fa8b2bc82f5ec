"""How long a job will take, before it runs: the deadline check, retry hints, AcceptedEvent.

Estimates come from measured rates, kept as exponential moving averages that start from priors
(``settings.TimePrior``, per base-model size and device); the job runner feeds every finished
phase back (``observe_training``, ``observe_sampling``).

Rates are per UNet step *at the base model's native size*: a job at another resolution costs
its plan's ``step_cost`` times as much per step (``ServedModels.step_cost``, from the UNet's
FLOPs: 768x768 is 2.7 times a 512x512 SD-1.x step, not 2.25), and what it measured is divided
by the same factor before it updates a rate.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from forgedit.preview import PREVIEW_DENOISING_STEPS
from server.plans import EditRequestPlan

if TYPE_CHECKING:
    from server.jobs import Job


class Estimator:
    """Run-time estimates from measured rates (exponential moving averages), starting from
    priors (``settings.TimePrior``, per base-model size and device). Used for the up-front
    deadline check, queue-full retry hints and AcceptedEvent.

    Training is counted in samples (updates × batch size), not updates: a joint update (batch
    10) costs about ten two_stage updates (batch 1), and one rate must serve both. Both rates
    are at the native size; ``step_cost`` converts (see the module docstring)."""

    def __init__(self, seconds_per_training_sample: float, seconds_per_image_step: float) -> None:
        self._lock = threading.Lock()
        self.seconds_per_training_sample = seconds_per_training_sample
        self.seconds_per_image_step = seconds_per_image_step
        self.fixed_overhead_s = 0.05

    def observe_training(self, samples: int, seconds: float, step_cost: float = 1.0) -> None:
        if samples > 0:
            self._update("seconds_per_training_sample", seconds / (samples * step_cost))

    def observe_sampling(self, image_steps: int, seconds: float, step_cost: float = 1.0) -> None:
        if image_steps > 0:
            self._update("seconds_per_image_step", seconds / (image_steps * step_cost))

    def estimate(self, job: Job) -> float:
        plan = job.plan
        assert plan is not None, "estimated at submission, before it finished"
        sweep = plan.sweep
        image_steps = sweep.num_images * sweep.steps
        if plan.preview.training_free:  # a few guided steps of one image (forgedit.preview)
            image_steps += PREVIEW_DENOISING_STEPS
        seconds = image_steps * self.seconds_per_image_step
        if isinstance(plan, EditRequestPlan):
            seconds += plan.training.total_samples * self.seconds_per_training_sample
        return self.fixed_overhead_s + seconds * plan.step_cost

    def _update(self, name: str, value: float) -> None:
        with self._lock:
            setattr(self, name, 0.7 * getattr(self, name) + 0.3 * value)
