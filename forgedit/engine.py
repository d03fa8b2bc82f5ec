"""The Forgedit engine: one resident base model, fine-tunes that become edit models, and
batched edit sweeps over them.

    engine = Engine.load("models/stable-diffusion-v1-4", blip_dir="models/blip")
    source = engine.source_prompt(image, "A photo of a sitting dog.")
    edit_model = engine.finetune(image, source, TrainingConfig.for_mode("joint", seed=1))
    images = engine.sample(edit_model, SweepConfig(prompts=("A photo of a sitting dog.",),
                                                   forget=("encoderkv",), seeds=(1, 2)))

Previews (``forgedit.preview``, not part of the original) are the engine's too: ``preview``
makes the training-free one with the base model before a fine-tune, and ``sample`` hands out
each image's x0 estimate every ``x0_every`` steps when asked.

Training depends only on the image and its source prompt, never on the target prompt, so
one edit model serves any number of edits. An edit model is a delta over the base model;
``sample`` writes it into the resident UNet in place and restores the base bit-exactly after.
Whatever just trained is sampled through the same delta path as an edit model loaded from
disk, so both give identical images.

Not thread-safe: one job at a time per Engine. The one step a job cannot interrupt, exporting
or building the sampling UNet for a new resolution, runs off the job's thread
(``forgedit.background``): a cancelled job stops waiting for it at once, the build finishes in
the background, and the engine's next call (or ``settle``) waits for it first.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from forgedit import delta as delta_format
from forgedit import forgetting
from forgedit.artifact import EditModel, MadeOnBase, check_fits_base, fits_base
from forgedit.backends.base import (
    DEFAULT_MAX_GRAPHS,
    BackendUnavailableError,
    NoisePredictor,
    Shape,
    example_inputs,
)
from forgedit.backends.canary import CANARY_TOLERANCE, CanaryResult, compare
from forgedit.backends.select import (
    BackendChain,
    BackendConfig,
    FallbackCallback,
    check_backend_name,
)
from forgedit.backends.torch_backend import TorchBackend
from forgedit.background import BackgroundWork
from forgedit.config import (
    ImageSpec,
    OutputConfig,
    Precision,
    SweepConfig,
    TrainingConfig,
    check_prompt,
    is_x0_step,
)
from forgedit.errors import EngineNotReadyError, ModelDirectoryError
from forgedit.events import CancelToken, SamplingCallback, SamplingProgress, TrainingCallback
from forgedit.interpolation import vector_projection, vector_subtraction
from forgedit.preview import PREVIEW_STEPS, LatentRGB, Preview, PreviewCallback, sdedit
from forgedit.requests import check_device
from forgedit.sampling import decode, denoise, initial_latents
from forgedit.text import encode_prompt
from forgedit.training import finetune as run_finetune
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from PIL import Image

    from forgedit.caption import Captioner
    from forgedit.models import BaseModel


T = TypeVar("T")


@dataclass(frozen=True)
class ResolutionReadiness:
    """Whether one declared resolution of an engine is ready to serve: its compiled UNet (if
    the backend compiles one) is built or loaded and its canary passed. ``canary_error`` is
    the canary's relative error against torch (None where nothing was compiled: torch)."""

    height: int
    width: int
    backend: str
    ready: bool
    canary_error: float | None
    seconds: float
    message: str = ""


@dataclass(frozen=True)
class EditedImage:
    spec: ImageSpec
    image: Image.Image
    backend: str = "torch"  # the UNet backend that sampled it

    def png_bytes(self) -> bytes:
        """PNG bytes that depend only on the pixels (no metadata, no timestamps)."""
        from forgedit.images import encode_png

        return encode_png(self.image)

    def encoded(self, output: OutputConfig) -> bytes:
        """The image encoded as ``output`` asks (``forgedit.images.encode_image``)."""
        from forgedit.images import encode_image

        return encode_image(self.image, output)


class Engine:
    def __init__(
        self,
        base: BaseModel,
        captioner: Captioner | None = None,
        *,
        precision: Precision = "faithful",
        unet_backend: str = "torch",
        cache_dir: str | Path | None = None,
        max_batch: int = 8,
        on_backend_fallback: FallbackCallback | None = None,
        torch_compile: bool = False,
        max_compiled_graphs: int = DEFAULT_MAX_GRAPHS,
        resolutions: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """``unet_backend``: torch, onnxruntime, tensorrt or auto (``forgedit.backends``);
        accelerated backends export to ``cache_dir`` (a private temporary directory when
        None). ``max_batch`` sizes the batch profile ``warmup`` prepares. ``torch_compile``
        samples the torch backend's UNet through ``torch.compile`` (training stays eager).
        ``max_compiled_graphs`` bounds the compiled UNets (resolutions) held at once: each
        holds its own copy of the weights (``CompiledGraphs``). ``resolutions``: the
        ``(height, width)`` sizes this engine declares it serves (default: the native size);
        ``warmup`` builds them, and once it has, no other size is ever compiled
        (``compiled_batch``)."""
        self.base = base
        self.captioner = captioner
        self.precision = precision
        self.max_batch = max_batch
        self._resolutions = list(resolutions or [(base.native_height, base.native_width)])
        # Per declared resolution: built, canary passed (``warmup``; empty before it).
        self.readiness: list[ResolutionReadiness] = []
        self.weights = ResidentWeights({"unet": base.unet, "text_encoder": base.text_encoder})
        # UNet exports and builds, which no cancel token can interrupt (``prepare_sampling``).
        self._builds = BackgroundWork("forgedit-unet-build")
        self._latent_rgb: LatentRGB | None = None  # fitted on first use (``warmup`` does)
        fast_cuda = precision == "fast" and base.device.type == "cuda"
        check_backend_name(unet_backend)
        if cache_dir is None and unet_backend != "torch":
            self._temporary_cache = tempfile.TemporaryDirectory(prefix="forgedit-engines-")
            cache_dir = self._temporary_cache.name
        self.backends = BackendChain(
            base.unet,
            self.weights,
            BackendConfig(
                requested=unet_backend,
                cache_dir=Path(cache_dir) if cache_dir is not None else None,
                fingerprint=base.fingerprint,
                autocast_dtype=torch.float16 if fast_cuda else None,
                compile=torch_compile,
                max_graphs=max_compiled_graphs,
            ),
            on_fallback=on_backend_fallback,
        )
        if fast_cuda:
            # What an A100 rewards. On the CPU none of this measured faster (BENCHMARKS.md), so
            # fast mode there keeps fp32 compute and differs from faithful only in Adam's eps
            # and the default delta format (int8).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            unet: torch.nn.Module = base.unet  # (diffusers types ``to`` as if unbound)
            unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (stubs)

    @classmethod
    def load(
        cls,
        base_model_dir: str | Path,
        *,
        blip_dir: str | Path | None = None,
        vae_dir: str | Path | None = None,
        device: str = "cpu",
        precision: Precision = "faithful",
        unet_backend: str = "torch",
        cache_dir: str | Path | None = None,
        max_batch: int = 8,
        on_backend_fallback: FallbackCallback | None = None,
        torch_compile: bool = False,
    ) -> Engine:
        """Load a base model (and optionally a BLIP captioner) from local directories.
        ``backend``: the UNet backend keywords of ``Engine`` (``unet_backend``, ``cache_dir``,
        ``max_batch``, ``on_backend_fallback``, ``torch_compile``, ``max_compiled_graphs``)."""
        from forgedit.caption import Captioner
        from forgedit.models import load_base_model

        check_device(device)
        base = load_base_model(base_model_dir, device=device, vae_directory=vae_dir)
        captioner = Captioner.load(blip_dir, device=device) if blip_dir is not None else None
        return cls(
            base,
            captioner,
            precision=precision,
            unet_backend=unet_backend,
            cache_dir=cache_dir,
            max_batch=max_batch,
            on_backend_fallback=on_backend_fallback,
            torch_compile=torch_compile,
        )

    # -- what a server needs to know --------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """The loaded base model's fingerprint: which edit models this engine takes."""
        return self.base.fingerprint

    @property
    def base_model_name(self) -> str:
        return self.base.name

    @property
    def native_height(self) -> int:
        return self.base.native_height

    @property
    def native_width(self) -> int:
        return self.base.native_width

    @property
    def can_caption(self) -> bool:
        """Whether ``source_prompt`` works: a BLIP captioner is loaded."""
        return self.captioner is not None

    def accepts(self, edit_model: MadeOnBase) -> bool:
        """Whether ``edit_model`` (or a registry record of one) can be sampled here
        (``forgedit.artifact.fits_base``: the one compatibility rule)."""
        return fits_base(edit_model, self.fingerprint)

    # -- 1. the source prompt ---------------------------------------------------------------

    def source_prompt(self, image: Image.Image, target_prompt: str) -> str:
        """BLIP's caption of the (un-resized) image, with the "A photo of " rule (spec §2)."""
        from forgedit.caption import source_prompt_for

        self.settle()
        if self.captioner is None:
            raise ModelDirectoryError(
                "no BLIP captioner is loaded: give a source prompt, or a BLIP directory "
                "(blip-image-captioning-base layout)"
            )
        return source_prompt_for(self.captioner.caption(image), target_prompt)

    # -- 2. learning the image ----------------------------------------------------------------

    def finetune(
        self,
        image: Image.Image,
        source_prompt: str,
        config: TrainingConfig,
        *,
        image_sha256: str = "",
        on_progress: TrainingCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> EditModel:
        """Fine-tune an edit model on ``image`` described by ``source_prompt``.

        The base model is restored bit-exactly afterwards, also when cancelled (then
        ``CancelledError``) or failing."""
        from forgedit.images import preprocess

        check_prompt(source_prompt, "source prompt")
        self._builds.settle(cancel)  # a build a cancelled job left running uses the UNet
        base = self.base
        started = time.perf_counter()
        pixels = preprocess(image, config.height, config.width)
        try:
            result = run_finetune(
                unet=base.unet,
                vae=base.vae,
                text_encoder=base.text_encoder,
                tokenizer=base.tokenizer,
                weights=self.weights,
                pixels=pixels,
                source_prompt=source_prompt,
                config=config,
                scaling_factor=base.scaling_factor,
                on_progress=on_progress,
                cancel=cancel,
            )
            exact = self.weights.trained_delta(result.trained_keys, torch.float32)
        finally:
            self.weights.restore()
        # Sample what will be stored: Δ round-trips through its delta format now, so this
        # job's images equal those of the saved and reloaded edit model.
        delta = delta_format.decode(
            delta_format.encode(exact, config.stored_format), config.stored_format
        )
        del exact
        return EditModel(
            delta=delta.tensors,
            delta_scales=delta.scales,
            source_embedding=result.source_embedding,
            base_model_name=base.name,
            base_model_fingerprint=base.fingerprint,
            source_prompt=source_prompt,
            training=config,
            loss_curve=result.loss_curve,
            timings={"training": time.perf_counter() - started},
            image_sha256=image_sha256,
        )

    # -- a first look -------------------------------------------------------------------------

    def preview(
        self,
        image: Image.Image,
        prompt: str,
        *,
        height: int,
        width: int,
        seed: int,
        vae_seed: int = 0,
        guidance: float = 7.5,
        precision: Precision | None = None,
        cancel: CancelToken | None = None,
    ) -> Preview:
        """The training-free preview of editing ``image`` toward ``prompt`` at ``width`` ×
        ``height``: the base model's SDEdit of the input (``forgedit.preview.sdedit``), from
        the first sampling ``seed``'s noise and the fine-tune's ``vae_seed``. Not a result,
        and not part of the original Forgedit. Runs the base weights in eager torch (whatever
        backend samples), in ``precision`` (default: the engine's); raises ``CancelledError``
        within one step of ``cancel``."""
        from forgedit.images import preprocess, to_pil

        check_prompt(prompt, "target prompt")
        self._builds.settle(cancel)  # a build a cancelled job left running uses the UNet
        base = self.base
        pixels = preprocess(image, height, width)
        fast_cuda = (precision or self.precision) == "fast" and base.device.type == "cuda"
        unet = TorchBackend(
            base.unet, self.weights, autocast_dtype=torch.float16 if fast_cuda else None
        ).predictor(self.sampling_shape(height, width, 1))
        with torch.no_grad():
            target = encode_prompt(base.tokenizer, base.text_encoder, prompt).float()
            unconditional = encode_prompt(base.tokenizer, base.text_encoder, "").float()
        decoded = sdedit(
            unet,
            base.vae,
            pixels,
            target,
            unconditional,
            seed=seed,
            vae_seed=vae_seed,
            guidance=guidance,
            scaling_factor=base.scaling_factor,
            cancel=cancel,
        )
        return Preview("training_free", to_pil(decoded)[0], PREVIEW_STEPS, PREVIEW_STEPS)

    @property
    def latent_rgb(self) -> LatentRGB:
        """The base model's latent → RGB map of x0 previews, fitted once (``LatentRGB.fit``)."""
        if self._latent_rgb is None:
            base = self.base
            self._latent_rgb = LatentRGB.fit(
                base.vae,
                base.scaling_factor,
                base.unet.config["in_channels"],
                base.vae_scale_factor,
            )
        return self._latent_rgb

    # -- 3. sampling edits ----------------------------------------------------------------------

    def sample(
        self,
        edit_model: EditModel,
        sweep: SweepConfig,
        *,
        on_image: Callable[[EditedImage], None] | None = None,
        on_progress: SamplingCallback | None = None,
        cancel: CancelToken | None = None,
        max_batch: int = 8,
        precision: Precision | None = None,
        x0_every: int | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[EditedImage]:
        """Sample every image of ``sweep`` from ``edit_model``, in ``precision`` (default: the
        engine's).

        Images come strategy by strategy; within a strategy in chunks of at most
        ``max_batch`` images sharing one denoising loop. ``on_image`` is called for each image
        as its chunk finishes; with ``x0_every``, ``on_preview`` gets each image's x0 preview
        after every ``x0_every``-th denoising step (``latent_rgb``). Raises
        ``BaseModelMismatchError`` for an edit model of another base model,
        ``UnknownStrategyError`` for a strategy its variant lacks, and
        ``CancelledError`` within one denoising step of ``cancel``. The base weights are
        restored bit-exactly on every exit.

        A compiled backend whose refit, canary or run fails inside the job hands the job to
        torch (the chunk it failed in is sampled again from its first step), logged and
        reported with scope "job"; each ``EditedImage.backend`` says which backend made it.
        After ``warmup``, a resolution it did not declare samples on torch (``compiled_batch``).
        """
        # 1. Check inputs: the edit model fits this base model, its variant has the strategies.
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        check_fits_base(edit_model, self.fingerprint, self.base.name)
        variant = forgetting.variant_for_mode(edit_model.training.mode)
        unet_names = self.weights.names("unet")
        reverted = {s: forgetting.resolve(s, variant, unet_names) for s in sweep.forget}

        specs = list(sweep.images())
        done: list[EditedImage] = []
        started = time.perf_counter()
        # 2. Prepare the UNet backend before any denoising loop: the compiled UNet of this
        # resolution (built at warm-up; before any warm-up, on first use), or torch for a
        # resolution the engine does not compile (``compiled_batch``). A cancel stops the
        # wait for a build at once.
        rows = self.compiled_batch(edit_model.height, edit_model.width, max_batch)
        compiled = rows is not None
        if rows is not None:
            self.prepare_sampling(edit_model.height, edit_model.width, rows, cancel=cancel)
        shape = self.sampling_shape(edit_model.height, edit_model.width, rows or max_batch)
        with (
            self._sampling_precision(precision or self.precision),
            self.weights.edit_model(edit_model.delta) as live,
        ):
            # 3. Encode the target prompts with the edit model's text encoder (fine-tuned in
            # dreambooth mode, the base one otherwise), the negative prompt included: the
            # edit model's text-encoder Δ is already written when the block is entered.
            text = self._encode_targets(sweep)
            # 4. Per forgetting strategy: revert its blocks, then denoise in chunks on the
            # job's backend (the replica's, or torch once a refit, canary or run failed).
            job = _JobBackend(self, shape, precision or self.precision, compiled=compiled)
            for strategy, group in groupby(specs, key=lambda s: s.forget):
                live.set_forgetting(reverted[strategy], sweep.forget_degree)
                for chunk in _chunks(list(group), max_batch):
                    images, backend = job.run(
                        partial(
                            self._sample_chunk,
                            edit_model=edit_model,
                            chunk=chunk,
                            text=text,
                            done_before=len(done),
                            total=len(specs),
                            started=started,
                            on_progress=on_progress,
                            cancel=cancel,
                            x0_every=x0_every if on_preview is not None else None,
                            on_preview=on_preview,
                        )
                    )
                    for spec, image in zip(chunk, images, strict=True):
                        edited = EditedImage(spec, image, backend)
                        done.append(edited)
                        if on_image is not None:
                            on_image(edited)
        return done

    @contextmanager
    def _sampling_precision(self, precision: Precision) -> Iterator[None]:
        """Sample one job in its own precision: fast mode's fp16 autocast on CUDA is set per
        job on the torch backend. A compiled backend's precision is its graph's (ONNX Runtime
        fp32, TensorRT fp16) whatever the job asks (docs/DIVERGENCES.md)."""
        backend = self.backends.current
        if not isinstance(backend, TorchBackend):
            yield
            return
        saved = backend.autocast_dtype
        fast_cuda = precision == "fast" and self.base.device.type == "cuda"
        backend.autocast_dtype = torch.float16 if fast_cuda else None
        try:
            yield
        finally:
            backend.autocast_dtype = saved

    @property
    def sampling_backend(self) -> str:
        """The backend that samples now: torch, onnxruntime or tensorrt."""
        return self.backends.current.name

    @property
    def backend_degraded(self) -> bool:
        """Whether this engine samples on a fallback backend (not its chain's first)."""
        return self.backends.degraded

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """The ``(height, width)`` sizes this engine declares it serves (the constructor's
        ``resolutions``, or the last ``warmup``'s sizes)."""
        return list(self._resolutions)

    def compiled_batch(self, height: int, width: int, max_batch: int) -> int | None:
        """The batch profile a job at ``height`` × ``width`` in chunks of ``max_batch``
        samples on with the compiled backend, or None: on torch. Before any warm-up, every
        job compiles its own (built on first use, as the command line wants). After it, only
        the warmed-up graphs serve: a declared size, in chunks within the engine's
        ``max_batch`` (a profile takes 1 .. its rows), so a request never builds a graph
        (minutes and gigabytes on a GPU); anything else samples on torch, the reference (no
        build, the live weights exactly)."""
        if not self.readiness:
            return max_batch
        if (height, width) in self._resolutions and max_batch <= self.max_batch:
            return self.max_batch
        return None

    @property
    def compiled_bytes(self) -> int:
        """Memory held by compiled UNets beside the torch model (an estimate; 0 on torch)."""
        return self.backends.current.resident_bytes

    def warmup(self, sizes: Sequence[tuple[int, int]] | None = None) -> None:
        """Build or load the UNet backend's graph for every ``(height, width)`` of ``sizes``
        (default: the declared ``resolutions``; given, they become the declared ones) and
        ``max_batch``, with its canary, then run one small denoising step through every
        component, so the first request pays for no lazy initialisation (readiness probes
        wait for this). ``readiness`` then holds the report of each size
        (``prepare_resolutions``); raises ``EngineNotReadyError`` if one is not ready. It also
        fits the x0 previews' ``latent_rgb`` map."""
        if sizes:
            self._resolutions = list(sizes)
        self.readiness = self.prepare_resolutions(self._resolutions)
        not_ready = [r for r in self.readiness if not r.ready]
        if not_ready:
            raise EngineNotReadyError(
                f"base model {self.base.name!r} is not ready at "
                + ", ".join(f"{r.width}x{r.height} ({r.message or r.backend})" for r in not_ready)
            )
        base = self.base
        height, width = self._resolutions[0]
        with torch.no_grad():
            e = encode_prompt(base.tokenizer, base.text_encoder, "")
            latents = initial_latents(
                [0], base.unet.config["in_channels"], height, width, base.vae_scale_factor
            )
            unet = self.unet_predictor(height, width, self.max_batch)
            z = denoise(unet, latents, e, e, steps=1, guidance=7.5)
            decode(base.vae, z, base.scaling_factor)
        self.latent_rgb  # noqa: B018 - fitted now, not in a job's first x0 preview

    def prepare_resolutions(
        self, sizes: Sequence[tuple[int, int]] | None = None, max_batch: int | None = None
    ) -> list[ResolutionReadiness]:
        """Build or load the compiled UNet of every ``(height, width)`` of ``sizes`` (default:
        the native size) for ``max_batch`` (default: the engine's), and run its canary.
        A backend that cannot serve one of them is replaced by the next (replica scope) and
        every size is prepared again on that one, so the report describes one backend.
        Raises ``ValueError`` if the sizes do not all fit the compiled-graph cache."""
        sizes = list(sizes or [(self.base.native_height, self.base.native_width)])
        max_batch = max_batch or self.max_batch
        capacity = self.backends.config.max_graphs
        if len(set(sizes)) > capacity:
            raise ValueError(
                f"{len(set(sizes))} resolutions do not fit a cache of {capacity} compiled "
                "UNets; raise max_compiled_graphs"
            )
        while True:
            backend = self.backends.current
            seconds: dict[tuple[int, int], float] = {}
            for height, width in sizes:
                started = time.perf_counter()
                self.prepare_sampling(height, width, max_batch)
                seconds[(height, width)] = time.perf_counter() - started
            if self.backends.current is backend:
                break
        report = []
        for height, width in sizes:
            shape = self.sampling_shape(height, width, max_batch)
            result = getattr(backend, "results", {}).get(shape)
            report.append(
                ResolutionReadiness(
                    height,
                    width,
                    backend.name,
                    ready=result is None or result.passed,
                    canary_error=None if result is None else result.relative_error,
                    seconds=seconds[(height, width)],
                )
            )
        return report

    def canary(self, height: int, width: int, max_batch: int) -> CanaryResult:
        """The current backend's UNet against torch on the live weights (whatever edit model
        is loaded now), on the canary's inputs: ``build-engine``'s check of an edit model."""
        shape = self.sampling_shape(height, width, max_batch)
        backend = self.backends.current
        reference = TorchBackend(self.base.unet, self.weights)
        return compare(
            backend.predictor(shape),
            reference.predictor(shape),
            example_inputs(self.base.unet, shape, rows=min(2, shape.max_rows)),
            CANARY_TOLERANCE[backend.name],
        )

    def relative_step_cost(self, height: int, width: int) -> float:
        """The cost of one UNet step at ``height`` × ``width`` relative to the native size,
        from the UNet's FLOPs (``forgedit.backends.cost``): what a run-time estimate made at
        the native size scales by."""
        from forgedit.backends.cost import relative_step_cost

        base = self.base
        scale = base.vae_scale_factor
        return relative_step_cost(
            base.unet.config,
            (height // scale, width // scale),
            (base.native_height // scale, base.native_width // scale),
        )

    def sampling_shape(self, height: int, width: int, max_batch: int) -> Shape:
        """The compiled-UNet shape that serves images of ``height`` × ``width`` in chunks of
        at most ``max_batch`` (guidance doubles the rows)."""
        scale = self.base.vae_scale_factor
        return Shape(height // scale, width // scale, 2 * max_batch)

    def prepare_sampling(
        self, height: int, width: int, max_batch: int, *, cancel: CancelToken | None = None
    ) -> None:
        """Export, build or load the backend's UNet for this shape (seconds, once): called
        before any denoising loop. A backend that cannot serve is replaced by the next one.

        The build runs on a thread of its own (``forgedit.background``): ``CancelledError``
        within 50 ms of ``cancel``, while the build goes on to its end and is kept for the
        next job at this shape; every later call of this engine waits for it first
        (``settle``), as the build uses the UNet."""
        shape = self.sampling_shape(height, width, max_batch)
        self._builds.run(
            lambda: self._with_fallback(lambda: self.backends.current.prepare(shape)),
            f"the UNet build for {shape.describe()}",
            cancel,
        )

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for a UNet build that a cancelled job left running (True once none is), at
        most ``timeout`` seconds (False then). The server's worker calls it after every job,
        so the next job waits in the queue, where it can be cancelled or moved, not here."""
        return self._builds.settle(timeout=timeout)

    def unet_predictor(self, height: int, width: int, max_batch: int) -> NoisePredictor:
        """The current backend's UNet, synced to the live weights (outside a job: warm-up,
        tools). A backend that cannot serve is replaced by the next one (replica scope),
        logged and reported."""
        shape = self.sampling_shape(height, width, max_batch)
        return self._with_fallback(lambda: self.backends.current.predictor(shape))

    def _with_fallback(self, step: Callable[[], T]) -> T:
        while True:
            try:
                return step()
            except BackendUnavailableError as e:
                self.backends.fall_back(e)  # raises when no backend is left

    # -- helpers ------------------------------------------------------------------------------

    def _encode_targets(self, sweep: SweepConfig) -> dict[str, torch.Tensor]:
        base = self.base
        with torch.no_grad():
            encoded = {
                p: encode_prompt(base.tokenizer, base.text_encoder, p).float()
                for p in dict.fromkeys(sweep.prompts)
            }
            encoded[""] = encode_prompt(base.tokenizer, base.text_encoder, "").float()
        return encoded

    def _sample_chunk(
        self,
        unet: NoisePredictor,
        edit_model: EditModel,
        chunk: list[ImageSpec],
        text: dict[str, torch.Tensor],
        *,
        done_before: int,
        total: int,
        started: float,
        on_progress: SamplingCallback | None,
        cancel: CancelToken | None,
        x0_every: int | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[Image.Image]:
        from forgedit.images import to_pil

        base = self.base
        device = base.device
        source = edit_model.source_embedding.to(device, torch.float32)
        target = torch.cat([text[s.prompt] for s in chunk])
        gamma = torch.tensor([s.gamma for s in chunk], dtype=torch.float64)
        if chunk[0].interpolation == "vs":
            conditioning = vector_subtraction(source, target, gamma)
        else:
            alpha = torch.tensor([s.alpha for s in chunk], dtype=torch.float64)
            conditioning = vector_projection(source, target, gamma, alpha)
        latents = initial_latents(
            [s.seed for s in chunk],
            base.unet.config["in_channels"],
            edit_model.height,
            edit_model.width,
            base.vae_scale_factor,
        )

        def on_step(step: int, steps: int) -> None:
            if on_progress is not None:
                on_progress(
                    SamplingProgress(
                        chunk[0].forget,
                        done_before,
                        total,
                        len(chunk),
                        step,
                        steps,
                        time.perf_counter() - started,
                    )
                )

        def on_x0(step: int, steps: int, x0: torch.Tensor) -> None:
            if on_preview is None or x0_every is None or not is_x0_step(step, x0_every):
                return
            for spec, image in zip(chunk, to_pil(self.latent_rgb(x0)), strict=True):
                on_preview(Preview("x0", image, step, steps, spec.index))

        z = denoise(
            unet,
            latents,
            conditioning,
            text[""],
            steps=chunk[0].steps,
            guidance=chunk[0].guidance,
            on_step=on_step,
            on_x0=on_x0 if x0_every is not None else None,
            cancel=cancel,
        )
        return to_pil(decode(base.vae, z, base.scaling_factor))


def _chunks(items: list[ImageSpec], size: int) -> Iterator[list[ImageSpec]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _JobBackend:
    """The backend one job samples on: the replica's current one until a refit, a canary
    after a refit or a run fails inside the job, then torch (the reference, which needs no
    build and holds the live weights by construction) for the rest of the job. The failed
    compiled UNet is discarded, so the next job loads it afresh and runs its canary again."""

    def __init__(
        self, engine: Engine, shape: Shape, precision: Precision, *, compiled: bool = True
    ) -> None:
        self._engine = engine
        self._shape = shape
        self._precision = precision
        self.backend = engine.backends.current if compiled else self._torch()

    def run(self, sample_chunk: Callable[[NoisePredictor], T]) -> tuple[T, str]:
        """``sample_chunk`` on this job's UNet; on a backend failure, again on torch."""
        while True:
            backend = self.backend
            try:
                return sample_chunk(backend.predictor(self._shape)), backend.name
            except BackendUnavailableError as e:
                if isinstance(backend, TorchBackend):
                    raise  # the reference has nothing to fall back to
                self._engine.backends.fall_back_for_job(e)
                backend.discard(self._shape)
                self.backend = self._torch()

    def _torch(self) -> TorchBackend:
        """Eager torch on the live weights, in the job's precision."""
        fast_cuda = self._precision == "fast" and self._engine.base.device.type == "cuda"
        return TorchBackend(
            self._engine.base.unet,
            self._engine.weights,
            autocast_dtype=torch.float16 if fast_cuda else None,
        )
