"""What a device's worker does with one job, step by step, as events.

Edit (``JobRunner._edit``): 0. decode the input image (its pixels exist only while the job
runs: a queued or finished job keeps no pixels); 1. the training-free preview → ``preview``
(unless the request turned it off); 2. source prompt (BLIP caption, or the caller's) →
``captioned``; 3. fine-tune → ``training`` after every update; 4. register → ``registered``;
5. sample the sweep → ``sampling`` after every denoising step, ``preview`` every k steps per
image when the request asked for x0 previews, and ``image`` per finished image; 6. attach a
contact sheet to the edit model; 7. ``completed`` with the timings of every phase. Each step
is one small helper (``_first_look``, ``_caption``, ``_finetune_or_reuse``, ``_register``,
``_sample``, ``_complete``); ``_phase`` times a step once (the job's ``PhaseTimer``) for its
timings and its histogram. Every event is built by ``server.wire``; the runner says which and when.

Previews are never results (``forgedit.preview``). The training-free one runs on the job's
own device before the fine-tune: its cost is its own time, a few percent of the job
(BENCHMARKS.md), reported as the ``preview`` phase. A job's previews are bounded: x0 previews
by count (refused up front, ``forgedit.requests.build_preview``), all previews by bytes
(``_PreviewStream``: past the budget they are not sent, and the job goes on). Images and
previews are encoded as the request asks (PNG, WebP or JPEG), and so is the contact sheet.

An Edit whose fine-tune is stored already (same image bytes, base model, source prompt and
training config, seed included) reuses it: ``registered(deduplicated=true)`` follows
``captioned`` and no training happens. The training seed defaults to a function of exactly
those inputs (``EditRequestPlan.training_for``), so by default the same image and settings reuse one
fine-tune, and a retried request finds the model its first attempt stored.

The request's precision (or the server's default) applies to training and to sampling.

Sample (``JobRunner._sample_stored``): load the edit model from the registry (its local cache
first), pick the engine of its base model (the engine's own rule, ``EngineLike.accepts``; that this
replica serves it was checked before queueing), then sample and complete as above.

Errors propagate to the scheduler, which maps them to the job's final status. Cancellation is
the engine's: it checks the job's ``CancelToken`` after every training update and denoising
step and raises ``CancelledError``; we also check between phases. The engine restores the
resident base weights on every exit, so a failed or cancelled job leaves the device clean.
A cancelled Edit that had already registered its edit model keeps it (it is whole and
reusable); one cancelled during training registers nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from forgedit.config import OutputConfig, Precision, SweepConfig, TrainingConfig
from forgedit.events import SamplingProgress, TrainingProgress
from forgedit.images import contact_sheet, encode_image, sheet_label
from server import wire
from server.estimator import Estimator
from server.jobs import Job
from server.metrics import Metrics
from server.plans import EditRequestPlan, SampleRequestPlan
from server.ports import EngineLike
from server.registry_client import RegistryClient
from server.validation import Limits, sampling_batch_size

if TYPE_CHECKING:
    from PIL import Image
    from prometheus_client import Histogram

    from forgedit.artifact import EditModel
    from forgedit.engine import EditedImage
    from forgedit.preview import Preview
    from registry import EditModelInfo

log = logging.getLogger("server.runner")


class JobRunner:
    """Runs Edit and Sample jobs on a worker's engines. Stateless between jobs."""

    def __init__(
        self,
        registry: RegistryClient,
        metrics: Metrics,
        estimator: Estimator,
        limits: Limits,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.estimator = estimator
        self.limits = limits  # the sampling batch and the device's pixel budget

    def __call__(self, job: Job, engines: Mapping[str, EngineLike]) -> None:
        if isinstance(job.plan, EditRequestPlan):
            self._edit(job, job.plan, engines)
        else:
            assert isinstance(job.plan, SampleRequestPlan)  # a running job has its plan
            self._sample_stored(job, job.plan, engines)

    # -- the two jobs -----------------------------------------------------------------------

    def _edit(self, job: Job, plan: EditRequestPlan, engines: Mapping[str, EngineLike]) -> None:
        engine = engines[plan.base_model]
        previews = _PreviewStream(job, plan.output, self.metrics, self.limits.max_preview_bytes)

        # 0. The input image's pixels, for this run only (the plan keeps its checked bytes).
        image = plan.image.decode().image

        # 1. A first look at the edit within seconds: the base model's training-free preview,
        # before anything is trained (not part of the original Forgedit).
        if plan.preview.training_free:
            self._first_look(job, plan, engine, image, previews)
            job.cancel.check()

        # 2. The source prompt: training depends on it, never on the target prompt.
        source_prompt = self._caption(job, plan, engine, image)
        job.cancel.check()

        # 3. Fine-tune the edit model, unless the very same fine-tune is stored already (the
        # default, content-derived seed makes that the rule for a repeated image).
        training = plan.training_for(engine.fingerprint, source_prompt)
        edit_model, existing = self._finetune_or_reuse(
            job, plan, engine, image, source_prompt, training
        )

        # 4. Register a fresh fine-tune; a reused one is registered already.
        if existing is None:
            edit_model_id = self._register(job, plan, edit_model)
        else:
            edit_model_id = self._announce_reused(job, existing)
        job.cancel.check()

        # 5. Sample the sweep.
        edited = self._sample(
            job, engine, edit_model, plan.sweep, plan.output, previews, training.precision
        )

        # 6. The registry keeps a contact sheet of the sampled edits next to the model, for
        # people browsing MLflow, in the request's image format. Only a fresh fine-tune gets
        # one: a reused model has its own.
        if existing is None:
            self.registry.add_contact_sheet(
                edit_model_id, _contact_sheet(image, edited, plan.output)
            )

        # 7. Done.
        self._complete(job, edit_model_id, plan.sweep, train_seed=training.seed)

    def _sample_stored(
        self, job: Job, plan: SampleRequestPlan, engines: Mapping[str, EngineLike]
    ) -> None:
        # 1. The stored edit model, and the engine of its base model (that this replica serves
        # it was checked before the job was queued).
        job.edit_model_id = plan.edit_model_id
        edit_model = self.registry.load(plan.edit_model_id)
        engine = _engine_for(edit_model, engines)
        job.cancel.check()

        # 2. Sample the sweep.
        previews = _PreviewStream(job, plan.output, self.metrics, self.limits.max_preview_bytes)
        self._sample(job, engine, edit_model, plan.sweep, plan.output, previews)

        # 3. Done.
        self._complete(job, plan.edit_model_id, plan.sweep)

    # -- the steps --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _phase(self, job: Job, name: str, histogram: Histogram | None = None) -> Iterator[None]:
        """Time the block as phase ``name`` of the job's timings and, when given, in its
        histogram: one measurement for both. A block that raises records nothing."""
        with job.timings.phase(name):
            yield
        if histogram is not None:
            histogram.observe(job.timings.seconds(name))

    def _first_look(
        self,
        job: Job,
        plan: EditRequestPlan,
        engine: EngineLike,
        image: Image.Image,
        previews: _PreviewStream,
    ) -> None:
        """The training-free preview of the first target prompt at the job's resolution,
        deterministic from its first sampling seed and its VAE seed; emits ``preview``. Timed
        as the ``preview`` phase: its whole cost to the job."""
        with self._phase(job, "preview"):
            shown = engine.preview(
                image,
                plan.sweep.prompts[0],
                height=plan.training.height,
                width=plan.training.width,
                seed=plan.sweep.seeds[0],
                vae_seed=plan.training.vae_seed,
                guidance=plan.sweep.guidance,
                precision=plan.training.precision,
                cancel=job.cancel,
            )
            previews.send(shown)  # its encoding is part of its cost

    def _caption(
        self, job: Job, plan: EditRequestPlan, engine: EngineLike, image: Image.Image
    ) -> str:
        """The caller's source prompt, or BLIP's caption of the image; emits ``captioned``."""
        if plan.source_prompt is None:
            with self._phase(job, "captioning", self.metrics.captioning):
                source_prompt = engine.source_prompt(image, plan.sweep.prompts[0])
        else:
            source_prompt = plan.source_prompt
        job.emit(wire.captioned(source_prompt, from_caption=plan.source_prompt is None))
        return source_prompt

    def _finetune_or_reuse(
        self,
        job: Job,
        plan: EditRequestPlan,
        engine: EngineLike,
        image: Image.Image,
        source_prompt: str,
        training: TrainingConfig,
    ) -> tuple[EditModel, EditModelInfo | None]:
        """(edit model, the registry's record of it when it was stored already, else None).
        A fresh fine-tune emits ``training`` after every update and feeds the estimator."""
        existing = self.registry.find_trained(
            plan.image.sha256,
            engine.fingerprint,
            source_prompt,
            training,
            job.principal,
            labels=plan.labels,
            ttl_s=plan.ttl_s,
        )
        if existing is not None:
            log.info(
                "reusing edit model %s (same image, base model, source prompt and training config)",
                existing.edit_model_id,
            )
            return self.registry.load(existing.edit_model_id), existing

        def on_training(progress: TrainingProgress) -> None:
            job.emit(wire.training(progress))

        histogram = self.metrics.training.labels(base_model=plan.base_model)
        with self._phase(job, "training", histogram):
            edit_model = engine.finetune(
                image,
                source_prompt,
                training,
                image_sha256=plan.image.sha256,
                on_progress=on_training,
                cancel=job.cancel,
            )
        updates = len(edit_model.loss_curve) or training.total_updates
        self.estimator.observe_training(
            training.samples_in(updates), job.timings.seconds("training"), plan.step_cost
        )
        job.cancel.check()
        return edit_model, None

    def _register(self, job: Job, plan: EditRequestPlan, edit_model: EditModel) -> str:
        """Upload and verify first, create the version last (the registry's contract), so
        nobody ever sees half a model; emits ``registered``. Not cancellable: it is short and
        a half-done registration is exactly what cancelling here could leave behind."""
        with self._phase(job, "registration", self.metrics.registration):
            registered = self.registry.register(
                edit_model,
                request_id=plan.request_id,
                image_bytes=plan.image.data,
                principal=job.principal,
                labels=plan.labels,
                ttl_s=plan.ttl_s,
            )
        job.edit_model_id = registered.edit_model_id
        job.emit(
            wire.registered(
                registered.edit_model_id,
                registered.version,
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
        return str(registered.edit_model_id)

    @staticmethod
    def _announce_reused(job: Job, existing: EditModelInfo) -> str:
        """Emit ``registered(deduplicated=true)`` for an edit model stored already."""
        job.edit_model_id = existing.edit_model_id
        job.emit(
            wire.registered(
                existing.edit_model_id,
                existing.version,
                deduplicated=True,
                spooled=existing.status == "spooled",
            )
        )
        return str(existing.edit_model_id)

    def _sample(
        self,
        job: Job,
        engine: EngineLike,
        edit_model: EditModel,
        sweep: SweepConfig,
        output: OutputConfig,
        previews: _PreviewStream,
        precision: Precision | None = None,
    ) -> list[EditedImage]:
        """Sample the sweep in ``precision`` (None: the engine's, i.e. the server default),
        emitting progress, the x0 previews the request asked for, and each image as it
        finishes, encoded as ``output`` asks; return the engine's ``EditedImage``s."""
        stream = _SamplingStream(job, engine, self.metrics, output)
        assert job.plan is not None  # a running job has its plan (``Job.finish`` drops it)
        x0_every = job.plan.preview.x0_every
        with self._phase(job, "sampling"):
            edited = engine.sample(
                edit_model,
                sweep,
                on_image=stream.on_image,
                on_progress=stream.on_progress,
                x0_every=x0_every,
                on_preview=previews.send if x0_every is not None else None,
                cancel=job.cancel,
                # Batches that fit the device's pixel budget at this resolution.
                max_batch=sampling_batch_size(
                    edit_model.training.height, edit_model.training.width, self.limits
                ),
                precision=precision,
            )
        # A refit, canary or run failure may have finished the job on torch: report the
        # backend that made its last image (each image says which one made it).
        job.sampling_backend = edited[-1].backend if edited else engine.sampling_backend
        self.estimator.observe_sampling(
            sweep.num_images * sweep.steps, job.timings.seconds("sampling"), job.plan.step_cost
        )
        return list(edited)

    @staticmethod
    def _complete(job: Job, edit_model_id: str, sweep: SweepConfig, *, train_seed: int = 0) -> None:
        """Emit ``completed`` with the timings of every phase; the job's total is its time
        since it was created (queue wait included), computed here once. ``train_seed``: the
        Edit's training seed (0, i.e. unset on the wire, for a Sample)."""
        job.timings.record("total", job.elapsed_s)
        job.emit(
            wire.completed(
                job.timings,
                sampling_backend=job.sampling_backend,
                edit_model_id=edit_model_id,
                images=sweep.num_images,
                train_seed=train_seed,
            )
        )


class _SamplingStream:
    """The job's events and per-image metrics while the engine samples: ``sampling`` after
    every denoising step, ``image`` per finished image. A batch's images finish together, so
    the first one carries the batch's time, split over its images (one observation each)."""

    def __init__(self, job: Job, engine: EngineLike, metrics: Metrics, output: OutputConfig):
        self.job = job
        self.engine = engine
        self.metrics = metrics
        self.output = output
        self.last = time.perf_counter()
        self.pending = 0  # images of the batch that just finished, to split its time
        self.first = True

    def on_progress(self, progress: SamplingProgress) -> None:
        self.pending = progress.batch_images
        self.job.emit(wire.sampling(progress))

    def on_image(self, edited: EditedImage) -> None:
        job = self.job
        now = time.perf_counter()
        if self.pending:
            per_image = (now - self.last) / self.pending
            for _ in range(self.pending):
                self.metrics.sampling_image.labels(
                    method=job.method, backend=edited.backend
                ).observe(per_image)
            self.pending = 0
            self.last = now
        if self.first:
            self.first = False
            self.metrics.time_to_first_image.labels(method=job.method).observe(job.elapsed_s)
        job.emit(wire.image(edited, self.output))
        self.metrics.images.labels(method=job.method).inc()


class _PreviewStream:
    """A job's previews on their way out: each encoded as the job's images are, sent while
    the job's preview bytes stay within ``max_bytes`` (then dropped, counted, logged once: a
    preview is never worth failing or slowing a job for), and the time to the first of each
    kind observed once."""

    def __init__(self, job: Job, output: OutputConfig, metrics: Metrics, max_bytes: int) -> None:
        self.job = job
        self.output = output
        self.metrics = metrics
        self.budget = max_bytes
        self.seen: set[str] = set()  # kinds sent so far
        self.dropping = False

    def send(self, shown: Preview) -> None:
        job = self.job
        data = b"" if self.dropping else encode_image(shown.image, self.output)
        if self.dropping or len(data) > self.budget:
            if not self.dropping:
                log.info("preview byte budget of this job spent: later previews are not sent")
            self.dropping = True
            self.metrics.previews_dropped.labels(method=job.method).inc()
            return
        self.budget -= len(data)
        job.emit(wire.preview(shown, data, self.output))
        self.metrics.previews.labels(method=job.method, kind=shown.kind).inc()
        if shown.kind not in self.seen:
            self.seen.add(shown.kind)
            self.metrics.time_to_first_preview.labels(method=job.method, kind=shown.kind).observe(
                job.elapsed_s
            )


def _engine_for(edit_model: EditModel, engines: Mapping[str, EngineLike]) -> EngineLike:
    """The engine that accepts the edit model (the engine's own rule). The service refuses an
    edit model of a base model this replica does not serve before queueing
    (``ServedModels.require_served``, by the same rule), so a miss here is a bug, not a
    client mistake."""
    for engine in engines.values():
        if engine.accepts(edit_model):
            return engine
    raise RuntimeError(
        f"no engine for edit model base {edit_model.base_model_name!r}, which was checked "
        "before queueing"
    )


def _contact_sheet(original: Image.Image, edited: list[EditedImage], output: OutputConfig) -> bytes:
    """The input beside the sampled edits (as many as a sheet shows), each labelled by its
    parameters, encoded as the job's images are."""
    sheet = contact_sheet(original, [(e.image, sheet_label(e.spec)) for e in edited])
    return encode_image(sheet, output)
