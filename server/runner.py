"""What a device's worker does with one job, step by step, as events.

Edit: 1. source prompt (BLIP caption, or the caller's) → ``captioned``; 2. fine-tune →
``training`` after every update; 3. register → ``registered``; 4. sample the sweep →
``sampling`` after every denoising step and ``image`` per finished image; 5. ``completed``
with the timings of every phase.

An Edit whose fine-tune is stored already (same image bytes, base model, source prompt and
training config, seed included) reuses it: ``registered(deduplicated=true)`` follows
``captioned`` and no training happens. The training seed defaults to a function of exactly
those inputs (``EditPlan.training_for``), so by default the same image and settings reuse one
fine-tune, and a retried request finds the model its first attempt stored.

The request's precision (or the server's default) applies to training and to sampling.

Sample: load the edit model from the registry (its local cache first), pick the engine of its
base model, then 4. and 5. as above.

Errors propagate to the scheduler, which maps them to the job's final status. Cancellation is
the engine's: it checks the job's ``CancelToken`` after every training update and denoising
step and raises ``CancelledError``; we also check between phases. The engine restores the
resident base weights on every exit, so a failed or cancelled job leaves the device clean.
A cancelled Edit that had already registered its edit model keeps it (it is whole and
reusable); one cancelled during training registers nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from forgedit.config import Precision, TrainingConfig
from forgedit.events import SamplingProgress, TrainingProgress
from forgedit.images import contact_sheet, encode_png
from forgedit.requests import sheet_label
from server._proto import forgedit_pb2 as pb
from server.errors import UnservedBaseModelError
from server.jobs import Job
from server.metrics import Metrics
from server.ports import EngineLike
from server.scheduler import Estimator
from server.store import EditModelStore
from server.validation import EditPlan, Limits, SamplePlan, sampling_batch_size

log = logging.getLogger("server.runner")

_INTERPOLATION = {"vs": pb.INTERPOLATION_VS, "vp": pb.INTERPOLATION_VP}


class JobRunner:
    """Runs Edit and Sample jobs on a worker's engines. Stateless between jobs."""

    def __init__(
        self,
        store: EditModelStore,
        metrics: Metrics,
        estimator: Estimator,
        *,
        max_batch: int = 8,
        limits: Limits | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.estimator = estimator
        self.max_batch = max_batch
        self.limits = limits or Limits(sampling_batch=max_batch)

    def __call__(self, job: Job, engines: Mapping[str, EngineLike]) -> None:
        started = time.perf_counter()
        try:
            if isinstance(job.plan, EditPlan):
                self._edit(job, job.plan, engines)
            else:
                assert isinstance(job.plan, SamplePlan)
                self._sample_stored(job, job.plan, engines)
        finally:
            job.timings.total = job.timings.queue_wait + time.perf_counter() - started

    # -- Edit -------------------------------------------------------------------------------

    def _edit(self, job: Job, plan: EditPlan, engines: Mapping[str, EngineLike]) -> None:
        engine = engines[plan.base_model]
        image = plan.image.image

        # 1. The source prompt: training depends on it, never on the target prompt.
        if plan.source_prompt is None:
            t = time.perf_counter()
            source_prompt = engine.source_prompt(image, plan.sweep.prompts[0])
            job.timings.captioning = time.perf_counter() - t
            self.metrics.captioning.observe(job.timings.captioning)
        else:
            source_prompt = plan.source_prompt
        job.emit(
            captioned=pb.CaptionedEvent(
                source_prompt=source_prompt, from_caption=plan.source_prompt is None
            )
        )
        job.cancel.check()

        # 2. Fine-tune the edit model, unless the very same fine-tune is stored already (the
        # default, content-derived seed makes that the rule for a repeated image).
        training = plan.training_for(engine.base.fingerprint, source_prompt)
        existing = self.store.find_trained(
            plan.image.sha256,
            engine.base.fingerprint,
            source_prompt,
            training,
            job.principal,
        )
        if existing is not None:
            self._reuse(job, plan, engine, existing, training)
            return

        def on_training(p: TrainingProgress) -> None:
            job.emit(
                training=pb.TrainingEvent(
                    update=p.update, total=p.total, loss=p.loss, eta_seconds=p.eta_s, stage=p.stage
                )
            )

        t = time.perf_counter()
        edit_model = engine.finetune(
            image,
            source_prompt,
            training,
            image_sha256=plan.image.sha256,
            on_progress=on_training,
            cancel=job.cancel,
        )
        job.timings.training = time.perf_counter() - t
        self.metrics.training.labels(base_model=plan.base_model).observe(job.timings.training)
        updates = len(edit_model.loss_curve) or training.total_updates
        self.estimator.observe_training(training.samples_in(updates), job.timings.training)
        job.cancel.check()

        # 3. Register it: upload and verify first, create the version last (the registry's
        # contract), so nobody ever sees half a model. Not cancellable: it is short and a
        # half-done registration is exactly what cancelling here could leave behind.
        t = time.perf_counter()
        registered = self.store.register(
            edit_model,
            request_id=plan.request_id,
            image_bytes=plan.image_bytes,
            principal=job.principal,
        )
        job.timings.registration = time.perf_counter() - t
        self.metrics.registration.observe(job.timings.registration)
        job.edit_model_id = registered.edit_model_id
        job.emit(
            registered=pb.RegisteredEvent(
                edit_model_id=registered.edit_model_id,
                version=registered.version or 0,
                deduplicated=registered.deduped,
                spooled=registered.spooled,
            )
        )
        log.info(
            "edit model %s registered (version %s%s)",
            registered.edit_model_id,
            registered.version,
            ", spooled" if registered.spooled else "",
        )
        job.cancel.check()

        # 4. and 5.
        edited = self._sample(job, engine, edit_model, plan.sweep, training.precision)
        # The registry keeps a contact sheet of the sampled edits next to the model, for
        # people browsing MLflow. Only a fresh fine-tune gets one: a reused model has its own.
        self.store.add_contact_sheet(registered.edit_model_id, _contact_sheet_png(image, edited))
        job.emit(
            completed=pb.CompletedEvent(
                timings=self._final_timings(job),
                edit_model_id=registered.edit_model_id,
                images=plan.sweep.num_images,
                train_seed=training.seed,
            )
        )

    def _reuse(
        self,
        job: Job,
        plan: EditPlan,
        engine: EngineLike,
        existing: Any,
        training: TrainingConfig,
    ) -> None:
        """Steps 3-5 with a stored edit model instead of a new fine-tune."""
        log.info(
            "reusing edit model %s (same image, base model, source prompt and training config)",
            existing.edit_model_id,
        )
        edit_model = self.store.load(existing.edit_model_id)
        job.edit_model_id = existing.edit_model_id
        job.emit(
            registered=pb.RegisteredEvent(
                edit_model_id=existing.edit_model_id,
                version=existing.version or 0,
                deduplicated=True,
                spooled=existing.status == "spooled",
            )
        )
        job.cancel.check()
        self._sample(job, engine, edit_model, plan.sweep, training.precision)
        job.emit(
            completed=pb.CompletedEvent(
                timings=self._final_timings(job),
                edit_model_id=existing.edit_model_id,
                images=plan.sweep.num_images,
                train_seed=training.seed,
            )
        )

    # -- Sample -----------------------------------------------------------------------------

    def _sample_stored(self, job: Job, plan: SamplePlan, engines: Mapping[str, EngineLike]) -> None:
        job.edit_model_id = plan.edit_model_id
        edit_model = self.store.load(plan.edit_model_id)
        engine = next(
            (
                e
                for e in engines.values()
                if e.base.fingerprint == edit_model.base_model_fingerprint
            ),
            None,
        )
        if engine is None:
            raise UnservedBaseModelError(
                f"edit model {plan.edit_model_id} was fine-tuned on base model "
                f"{edit_model.base_model_name!r}, which this server does not serve; "
                f"served: {', '.join(engines)}"
            )
        job.cancel.check()
        self._sample(job, engine, edit_model, plan.sweep)
        job.emit(
            completed=pb.CompletedEvent(
                timings=self._final_timings(job),
                edit_model_id=plan.edit_model_id,
                images=plan.sweep.num_images,
            )
        )

    # -- shared -----------------------------------------------------------------------------

    def _sample(
        self,
        job: Job,
        engine: EngineLike,
        edit_model: Any,
        sweep: Any,
        precision: Precision | None = None,
    ) -> list[Any]:
        """Sample the sweep in ``precision`` (None: the engine's, i.e. the server default),
        emitting progress and each image as it finishes; return the engine's
        ``EditedImage``s."""
        started = time.perf_counter()
        last = [started]
        pending = [0]  # images of the batch that just finished, to split its time
        first = [True]

        def on_progress(p: SamplingProgress) -> None:
            pending[0] = p.batch_images
            job.emit(
                sampling=pb.SamplingEvent(
                    images_done=p.images_done,
                    images_total=p.images_total,
                    step=p.step,
                    steps=p.steps,
                    forget=p.forget,
                )
            )

        def on_image(edited: Any) -> None:
            now = time.perf_counter()
            if pending[0]:
                # The first image of a batch carries the batch's time, split over its images;
                # the batch's other images observe nothing (one observation per image).
                per_image = (now - last[0]) / pending[0]
                for _ in range(pending[0]):
                    self.metrics.sampling_image.labels(
                        method=job.method, backend=engine.sampling_backend
                    ).observe(per_image)
                pending[0] = 0
                last[0] = now
            spec = edited.spec
            png = edited.png_bytes()
            if first[0]:
                first[0] = False
                self.metrics.time_to_first_image.labels(method=job.method).observe(
                    time.monotonic() - job.created_monotonic
                )
            job.emit(
                image=pb.ImageEvent(
                    index=spec.index,
                    png=png,
                    width=edited.image.width,
                    height=edited.image.height,
                    params=pb.ImageParams(
                        prompt=spec.prompt,
                        forget=spec.forget,
                        interpolation=_INTERPOLATION[spec.interpolation],
                        gamma=spec.gamma,
                        alpha=spec.alpha,
                        seed=spec.seed,
                        guidance=spec.guidance,
                        steps=spec.steps,
                        forget_degree=spec.forget_degree,
                    ),
                )
            )
            self.metrics.images.labels(method=job.method).inc()

        edited = engine.sample(
            edit_model,
            sweep,
            on_image=on_image,
            on_progress=on_progress,
            cancel=job.cancel,
            # Batches that fit the device's pixel budget at this resolution.
            max_batch=sampling_batch_size(
                edit_model.training.height, edit_model.training.width, self.limits
            ),
            precision=precision,
        )
        job.timings.sampling = time.perf_counter() - started
        # A canary failure during the job may have moved the engine to the next backend.
        job.timings.sampling_backend = engine.sampling_backend
        self.estimator.observe_sampling(sweep.num_images * sweep.steps, job.timings.sampling)
        return list(edited)

    @staticmethod
    def _final_timings(job: Job) -> pb.PhaseTimings:
        timings = job.timings.to_proto()
        assert job.started_monotonic is not None
        timings.total_seconds = time.monotonic() - job.created_monotonic
        return timings


CONTACT_SHEET_MAX_IMAGES = 64


def _contact_sheet_png(original: Any, edited: list[Any]) -> bytes:
    """The input beside (at most 64 of) the sampled edits, each labelled by its parameters."""
    results = []
    for e in edited[:CONTACT_SHEET_MAX_IMAGES]:
        results.append((e.image, sheet_label(e.spec)))
    return encode_png(contact_sheet(original, results))
