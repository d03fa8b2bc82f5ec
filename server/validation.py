"""Request checks at the edge, before any decoding or model work.

``check_edit_request`` and ``check_sample_request`` turn a request message into a plan the scheduler
can run, or raise ``InvalidInputError`` whose ``field`` is the request field's path
(``sweep.gammas``, ``training.width``, ``target_prompts``, ...) so the client gets one
``BadRequest`` field violation naming the problem and what is accepted.

This module owns only what is the server's: its limits, the request's field paths and the
decoding of protobuf enums. Configs, seeds and strategies are built by the rules the engine CLI
shares (``forgedit.requests``), whose errors are re-raised with the request's field path.

Order matters: cheap, bounded checks first (sizes and counts of every repeated field, lengths
of strings, enum values, numeric ranges), then the engine's own config checks
(``forgedit.requests``, ``forgedit.config``), and only then the image is decoded, by
``forgedit.images.load_image`` with the server's byte, pixel and format limits (it refuses a
decompression bomb from the header, before decoding pixels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forgedit.config import SweepConfig, TrainingConfig, check_prompt, check_resolution
from forgedit.errors import InvalidInputError
from forgedit.requests import (
    TrainSeedFrom,
    build_sweep_config,
    build_training_config,
    random_seed,
    random_seeds,
    stage_count,
    training_with_seed,
)
from forgedit.requests import check_strategies as check_variant_strategies
from registry.ids import validate_edit_model_id
from server import wire
from server._proto import forgedit_pb2 as pb
from server.ports import BaseModelInfo

if TYPE_CHECKING:
    from forgedit.images import LoadedImage
    from server.settings import ServerSettings

REQUEST_ID_PATTERN = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
_STRATEGY_NAME = re.compile(r"\A[a-z0-9_+]{1,64}\Z")

# The engine's field names -> the request's field paths, for engine checks that we reuse.
_SWEEP_FIELDS = {
    "prompt": "target_prompts",
    "interpolation": "sweep.interpolation",
    "gammas": "sweep.gammas",
    "alphas": "sweep.alphas",
    "forget": "sweep.forget_strategies",
    "forget_degree": "sweep.forget_degree",
    "seeds": "sweep.seeds",
    "steps": "sweep.steps",
    "guidance": "sweep.guidance",
    "sweep": "sweep",
}
_TRAINING_FIELDS = {
    "size": "training.width",
    "seed": "training.seed",
    "vae_seed": "training.vae_seed",
    "updates": "training.updates",
    "batch_size": "training.batch_size",
    "mode": "training.mode",
    "precision": "training.precision",
    "delta_format": "training.delta_format",
    "stages": "training",
    "unet_lr": "training",
    "text_lr": "training",
}


@dataclass(frozen=True)
class Limits:
    """The server's request limits (from ``ServerSettings``)."""

    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_prompt_chars: int = 1000
    max_prompts: int = 16
    max_sweep_values: int = 64
    max_sweep_images: int = 256
    max_steps: int = 200
    max_training_updates: int = 5000
    # Not a limit but the one request default the settings own: the delta format when a
    # request leaves it unset (None: the precision mode's default).
    default_delta_format: str | None = None
    max_batch_pixels: int = 2048 * 2048
    sampling_batch: int = 8  # images per denoising batch (the server's max_batch)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Limits:
        return cls(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            image_formats=tuple(f.upper() for f in settings.image_formats),
            max_prompt_chars=settings.max_prompt_chars,
            max_prompts=settings.max_prompts,
            max_sweep_values=settings.max_sweep_values,
            max_sweep_images=settings.max_sweep_images,
            max_steps=settings.max_steps,
            max_training_updates=settings.max_training_updates,
            default_delta_format=settings.delta_format,
            max_batch_pixels=settings.max_batch_pixels,
            sampling_batch=settings.max_batch,
        )


@dataclass(frozen=True)
class EditRequestPlan:
    """A validated Edit request: everything the worker needs, nothing left to check."""

    request_id: str
    image: LoadedImage
    image_bytes: bytes
    base_model: str
    source_prompt: str | None  # None: caption with BLIP
    training: TrainingConfig  # its seed is a placeholder while train_seed_from is "content"
    sweep: SweepConfig
    detach: bool
    # "given" (the request's seed), "content" (derived from the content once the source prompt
    # and base model are known: ``training_for``) or "random" (fresh_seed).
    train_seed_from: TrainSeedFrom = "given"

    @property
    def images_total(self) -> int:
        return self.sweep.num_images

    def training_for(self, base_fingerprint: str, source_prompt: str) -> TrainingConfig:
        """The training config with its final seed. The content seed (``content_seed``) makes
        the same image + base model + source prompt + config train the same edit model, so
        the runner finds and reuses a stored one on any replica. A fresh fine-tune with a
        request id gets a seed salted with that id: random-looking, yet a retry of the same
        request (after its job expired, or on another replica) gets the same one
        (``forgedit.requests.training_with_seed``). Without a request id a fresh seed was
        drawn at validation: nothing to keep a retry consistent."""
        return training_with_seed(
            self.training,
            self.train_seed_from,
            image_sha256=self.image.sha256,
            base_fingerprint=base_fingerprint,
            source_prompt=source_prompt,
            salt=self.request_id,
        )


@dataclass(frozen=True)
class SampleRequestPlan:
    """A validated Sample request."""

    request_id: str
    edit_model_id: str
    sweep: SweepConfig
    detach: bool

    @property
    def images_total(self) -> int:
        return self.sweep.num_images


def validate_request_id(request_id: str) -> str:
    if request_id and not REQUEST_ID_PATTERN.match(request_id):
        raise InvalidInputError(
            "request_id must be 1-128 characters of A-Z a-z 0-9 . _ : - "
            f"(got {len(request_id)} characters)",
            field="request_id",
        )
    return request_id


def check_edit_request(
    request: pb.EditRequest,
    limits: Limits,
    base_models: Mapping[str, BaseModelInfo],
    default_base_model: str,
    default_precision: str = "faithful",
) -> EditRequestPlan:
    """Check an Edit request and decode its image; raise ``InvalidInputError`` otherwise.
    ``default_precision`` (the server's FORGEDIT_PRECISION) applies when the request leaves
    precision unset; the plan's precision is used for training and sampling alike."""
    from forgedit.images import ImageLimits, load_image

    request_id = validate_request_id(request.request_id)
    if not request.image:
        raise InvalidInputError(
            f"image is required: the bytes of a {'/'.join(limits.image_formats)} file",
            field="image",
        )
    if len(request.image) > limits.max_image_bytes:
        raise InvalidInputError(
            f"image is {len(request.image) / 2**20:.1f} MiB; at most "
            f"{limits.max_image_bytes / 2**20:g} MiB is accepted",
            field="image",
        )
    _check_prompts(request.target_prompts, limits)
    source_prompt: str | None = None
    if request.HasField("source_prompt"):
        source_prompt = request.source_prompt
        _check_text(source_prompt, "source_prompt", limits)
    name = request.base_model or default_base_model
    base = base_models.get(name)
    if base is None:
        raise InvalidInputError(
            f"unknown base model {_shown(name)}; this server serves: {', '.join(base_models)}",
            field="base_model",
        )
    if source_prompt is None and not base.can_caption:
        raise InvalidInputError(
            "source_prompt is required: this server has no BLIP captioner for base model "
            f"{base.name!r}",
            field="source_prompt",
        )
    training = _training_config(request.training, limits, base, default_precision)
    sweep = _sweep_config(request.target_prompts, request.sweep, limits, training.mode)
    check_sampling_memory(sweep, training.height, training.width, limits)
    options = request.training
    seed_from: TrainSeedFrom = (
        "given" if options.HasField("seed") else ("random" if options.fresh_seed else "content")
    )

    # Only now, with every cheap check passed, meet the image decoder.
    image_limits = ImageLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=limits.max_image_pixels,
        formats=limits.image_formats,
    )
    image = load_image(bytes(request.image), limits=image_limits)
    return EditRequestPlan(
        request_id,
        image,
        bytes(request.image),
        base.name,
        source_prompt,
        training,
        sweep,
        request.detach,
        seed_from,
    )


def check_sample_request(
    request: pb.SampleRequest, limits: Limits, training_mode_of: Callable[[str], str]
) -> SampleRequestPlan:
    """Check a Sample request. The sweep's defaults and strategy names depend on the edit
    model's variant, so once the cheap checks pass ``training_mode_of(edit_model_id)`` is asked
    for its training mode (it raises for an unknown edit model)."""
    request_id = validate_request_id(request.request_id)
    edit_model_id = validate_edit_model_id(request.edit_model_id)
    _check_prompts(request.target_prompts, limits)
    _check_sweep_options(request.sweep, limits)
    mode = training_mode_of(edit_model_id)
    sweep = _sweep_config(request.target_prompts, request.sweep, limits, mode)
    return SampleRequestPlan(request_id, edit_model_id, sweep, request.detach)


def check_strategies(sweep: SweepConfig, mode: str) -> None:
    """Refuse a forgetting strategy the edit model's variant does not define."""
    _reraise(check_variant_strategies, _SWEEP_FIELDS, sweep.forget, mode)


def check_batch_pixels(
    height: int, width: int, batch: int, limits: Limits, *, what: str, field: str
) -> None:
    """Refuse work whose largest batch cannot fit a device: activation memory grows with
    pixels × batch (``max_batch_pixels``, a per-device setting), so a valid-looking 2048² batch
    of 64 is refused up front instead of failing in the allocator minutes later."""
    pixels = height * width * batch
    if pixels > limits.max_batch_pixels:
        raise InvalidInputError(
            f"{what} at {width}x{height} with batch {batch} needs {pixels:,} pixels per batch; "
            f"this server accepts at most {limits.max_batch_pixels:,} (width × height × batch, "
            "FORGEDIT_MAX_BATCH_PIXELS); lower the resolution or the batch size",
            field=field,
        )


def check_sampling_memory(sweep: SweepConfig, height: int, width: int, limits: Limits) -> None:
    """``check_batch_pixels`` for sampling: a denoising batch of one image must fit; larger
    sweeps are split into batches that fit (``sampling_batch_size``)."""
    check_batch_pixels(height, width, 1, limits, what="sampling", field="sweep")


def sampling_batch_size(height: int, width: int, limits: Limits) -> int:
    """Images per denoising batch: the server's ``sampling_batch``, fewer when larger batches
    would exceed ``max_batch_pixels`` at this resolution (at least one)."""
    return max(1, min(limits.sampling_batch, limits.max_batch_pixels // (height * width)))


# ---------------------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[str], limits: Limits) -> None:
    if not prompts:
        raise InvalidInputError("at least one target prompt is required", field="target_prompts")
    if len(prompts) > limits.max_prompts:
        raise InvalidInputError(
            f"{len(prompts)} target prompts given; at most {limits.max_prompts} are accepted",
            field="target_prompts",
        )
    for prompt in prompts:
        _check_text(prompt, "target_prompts", limits)


def _check_text(text: str, field: str, limits: Limits) -> None:
    if len(text) > limits.max_prompt_chars:
        raise InvalidInputError(
            f"{field} has a prompt of {len(text)} characters; at most {limits.max_prompt_chars} "
            "are accepted",
            field=field,
        )
    try:
        check_prompt(text, field)
    except InvalidInputError as e:
        raise InvalidInputError(str(e), field=field) from None


def _check_count(values: Sequence[object], field: str, limits: Limits) -> None:
    if len(values) > limits.max_sweep_values:
        raise InvalidInputError(
            f"{field} has {len(values)} values; at most {limits.max_sweep_values} are accepted",
            field=field,
        )


def _training_config(
    options: pb.TrainingOptions, limits: Limits, base: BaseModelInfo, default_precision: str
) -> TrainingConfig:
    mode = wire.TRAINING_MODES.get(options.mode)
    if mode is None:
        raise InvalidInputError(
            f"unknown training mode {options.mode}; accepted: "
            + ", ".join(pb.TrainingMode.Name(m) for m in wire.TRAINING_MODES if m),
            field="training.mode",
        )
    precision = default_precision
    if options.precision != pb.PRECISION_UNSPECIFIED:
        decoded = wire.PRECISIONS.get(options.precision)
        if decoded is None:
            raise InvalidInputError(
                f"unknown precision {options.precision}; accepted: PRECISION_FAITHFUL, "
                "PRECISION_FAST",
                field="training.precision",
            )
        precision = decoded
    delta_format = limits.default_delta_format
    if options.delta_format != pb.DELTA_FORMAT_UNSPECIFIED:
        delta_format = wire.DELTA_FORMATS.get(options.delta_format)
        if delta_format is None:
            raise InvalidInputError(
                f"unknown delta format {options.delta_format}; accepted: "
                + ", ".join(pb.DeltaFormat.Name(f) for f in wire.DELTA_FORMATS),
                field="training.delta_format",
            )
    height = options.height if options.HasField("height") else base.height
    width = options.width if options.HasField("width") else base.width
    _reraise(check_resolution, {"size": "training.width"}, height, width)
    for name in ("updates", "stage2_updates"):
        value = getattr(options, name)
        if options.HasField(name) and not 1 <= value <= limits.max_training_updates:
            raise InvalidInputError(
                f"training.{name} must be 1..{limits.max_training_updates}, got {value}",
                field=f"training.{name}",
            )
    stages = stage_count(mode)
    for name in ("stage2_updates", "stage2_batch_size"):
        if options.HasField(name) and stages < 2:
            raise InvalidInputError(
                f"training.{name} applies to TRAINING_MODE_TWO_STAGE's second stage; {mode} "
                "training has 1 stage (set training.updates / training.batch_size for it)",
                field=f"training.{name}",
            )
    if options.HasField("seed") and options.fresh_seed:
        raise InvalidInputError(
            "training.fresh_seed asks for a random seed, but training.seed gives one; set one "
            "of them",
            field="training.fresh_seed",
        )
    # Unset: a placeholder until the content seed is derived (EditRequestPlan.training_for).
    seed = options.seed if options.HasField("seed") else 0
    if options.fresh_seed:
        seed = random_seed()
    vae_seed = options.vae_seed if options.HasField("vae_seed") else 0

    try:
        config = build_training_config(
            mode,
            height=height,
            width=width,
            seed=seed,
            vae_seed=vae_seed,
            precision=precision,
            delta_format=delta_format,
            updates=_per_stage(options, "updates", "stage2_updates"),
            batch_sizes=_per_stage(options, "batch_size", "stage2_batch_size"),
        )
    except InvalidInputError as e:
        if e.field in ("updates", "batch_size") and options.HasField(f"stage2_{e.field}"):
            field = f"training.stage2_{e.field}"
        else:
            field = _TRAINING_FIELDS.get(e.field or "", e.field or "training")
        raise InvalidInputError(str(e), field=field) from None
    check_batch_pixels(
        config.height,
        config.width,
        max(stage.batch_size for stage in config.stages),
        limits,
        what="training",
        field="training.batch_size",
    )
    if config.total_updates > limits.max_training_updates:
        raise InvalidInputError(
            f"training would run {config.total_updates} updates; at most "
            f"{limits.max_training_updates} are accepted",
            field="training.updates",
        )
    return config


def _per_stage(options: pb.TrainingOptions, first: str, second: str) -> list[int | None]:
    """The request's per-stage values as ``override_stages`` takes them: [first, second],
    trailing unset ones dropped (so a one-stage mode is refused only for a stage-2 value)."""
    values: list[int | None] = [
        getattr(options, name) if options.HasField(name) else None for name in (first, second)
    ]
    while values and values[-1] is None:
        values.pop()
    return values


def _check_sweep_options(options: pb.SweepOptions, limits: Limits) -> None:
    """The sweep's size checks that need no edit model (run before any registry lookup)."""
    for field, values in (
        ("sweep.gammas", options.gammas),
        ("sweep.alphas", options.alphas),
        ("sweep.seeds", options.seeds),
        ("sweep.forget_strategies", options.forget_strategies),
    ):
        _check_count(values, field, limits)


def _sweep_config(
    prompts: Sequence[str], options: pb.SweepOptions, limits: Limits, mode: str
) -> SweepConfig:
    _check_sweep_options(options, limits)
    interpolation = wire.INTERPOLATIONS.get(options.interpolation)
    if interpolation is None:
        raise InvalidInputError(
            f"unknown interpolation {options.interpolation}; accepted: INTERPOLATION_VS, "
            "INTERPOLATION_VP",
            field="sweep.interpolation",
        )
    for name in options.forget_strategies:
        if not _STRATEGY_NAME.match(name):
            raise InvalidInputError(
                f"forgetting strategy {_shown(name)} is not a strategy name (lower-case letters, "
                "digits, '_' and '+'), e.g. 'encoderattn' or 'decoderattn+decoder2'",
                field="sweep.forget_strategies",
            )
    if options.HasField("steps") and not 1 <= options.steps <= limits.max_steps:
        raise InvalidInputError(
            f"steps must be 1..{limits.max_steps}, got {options.steps}", field="sweep.steps"
        )
    if options.HasField("guidance") and not math.isfinite(options.guidance):
        raise InvalidInputError(
            f"guidance must be a finite number, got {options.guidance}", field="sweep.guidance"
        )
    if options.seeds:
        seeds = tuple(options.seeds)
    else:
        count = options.seed_count if options.HasField("seed_count") else 1
        if not 1 <= count <= limits.max_sweep_values:
            raise InvalidInputError(
                f"seed_count must be 1..{limits.max_sweep_values}, got {count}",
                field="sweep.seed_count",
            )
        seeds = random_seeds(count)

    kwargs: dict[str, object] = {
        "prompts": tuple(prompts),
        "interpolation": interpolation,
        "seeds": seeds,
    }
    if options.gammas:
        kwargs["gammas"] = tuple(options.gammas)
    if options.alphas:
        kwargs["alphas"] = tuple(options.alphas)
    if options.forget_strategies:
        kwargs["forget"] = tuple(options.forget_strategies)
    if options.HasField("forget_degree"):
        kwargs["forget_degree"] = options.forget_degree
    if options.HasField("steps"):
        kwargs["steps"] = options.steps
    if options.HasField("guidance"):
        kwargs["guidance"] = options.guidance
    sweep: SweepConfig = _reraise(lambda: build_sweep_config(mode, **kwargs), _SWEEP_FIELDS)
    if sweep.num_images > limits.max_sweep_images:
        raise InvalidInputError(
            f"the sweep has {sweep.num_images} images; at most {limits.max_sweep_images} are "
            "accepted (prompts × strategies × seeds × gammas × alphas)",
            field="sweep",
        )
    return sweep


def _reraise(fn, fields: Mapping[str, str], *args):
    """Call ``fn``; re-raise an engine ``InvalidInputError`` with the request's field path."""
    try:
        return fn(*args)
    except InvalidInputError as e:
        raise InvalidInputError(str(e), field=fields.get(e.field or "", e.field)) from None


def _shown(value: str) -> str:
    """A short, printable rendering of a client string for an error message."""
    text = "".join(c if c.isprintable() else "?" for c in value[:40])
    return repr(text) + ("…" if len(value) > 40 else "")
