"""The one builder of what a request asks for: typed options (``forgedit.options``) in, the
engine's configs and seeds out. The engine CLI (``forgedit.cli``) and the server
(``server.plans``) both call it, so the same options mean the same edit on both.

* ``build_edit``: the below for an edit, after its source prompt's checks (``build_sample``
  the same for a stored edit model: its sweep, output and previews);
* ``build_training``: the variant's schedule with the per-stage overrides, the size, the
  precision and delta format, and where the training seed comes from (``TrainSeedFrom``);
* ``build_sweep``: the variant's sweep defaults, its forgetting strategies, the
  interpolation's coefficients (α only for vp) and the sampling seeds (drawn when unset);
* ``build_output``: the images' encoding (PNG; WebP or JPEG with a quality);
* ``build_preview``: which previews the job streams, within the bound on x0 previews;
* ``training_with_seed``: the final training seed once the content is known;
* ``check_device``/``default_device``: a device this machine has.

Each rule is a check of ``forgedit.config`` (or ``forgedit.forgetting``), called here with the
option's path as the error's ``field``: an ``InvalidInputError`` from this module already names
the request field (``sweep.gammas``, ``training.stage2_updates``, ``target_prompts``). The
configs run the same checks again on construction, for callers that build them directly.
What a front end adds is only its own: its syntax (flags, protobuf enums) and its limits.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from forgedit.config import (
    ALPHA_RANGE,
    DEFAULT_FORGET_DEGREE,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DELTA_FORMATS,
    GAMMA_RANGE,
    IMAGE_FORMATS,
    INTERPOLATIONS,
    MAX_SWEEP_IMAGES,
    PRECISIONS,
    TRAINING_MODES,
    DeltaFormat,
    OutputConfig,
    Precision,
    PreviewConfig,
    SweepConfig,
    TrainingConfig,
    TrainingMode,
    check_batch_size,
    check_choice,
    check_forget_degree,
    check_guidance,
    check_prompt,
    check_prompts,
    check_quality,
    check_resolution,
    check_seed,
    check_steps,
    check_sweep_size,
    check_updates,
    check_values,
    check_x0_every,
    content_seed,
    default_stages,
    default_sweep,
    override_stages,
    valid_side,
)
from forgedit.errors import InvalidInputError
from forgedit.options import (
    EditOptions,
    OutputOptions,
    PreviewOptions,
    SampleOptions,
    SweepOptions,
    TrainingOptions,
)

# Random seeds are drawn below this bound: large enough never to repeat by chance in practice,
# short enough to retype from a summary or a log.
RANDOM_SEED_BOUND = 2**32

# Where a fine-tune's seed comes from: the request ("given"), a function of the content the
# fine-tune sees ("content", the default: the same inputs reuse one edit model), or a fresh
# draw ("random").
TrainSeedFrom = Literal["given", "content", "random"]


def random_seed() -> int:
    """One fresh random seed in [0, ``RANDOM_SEED_BOUND``)."""
    return secrets.randbelow(RANDOM_SEED_BOUND)


def random_seeds(count: int) -> tuple[int, ...]:
    """``count`` fresh random seeds (the sampling seeds of a request that gives none)."""
    return tuple(random_seed() for _ in range(count))


# -- how much a request may ask for --------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """How much work one request may ask for, beyond what each value may be (the checks of
    ``forgedit.config``). The defaults bound nothing the engine does not; a service passes its
    own, from its settings (``server.validation.Limits.bounds``)."""

    max_total_updates: int | None = None  # optimiser updates of all stages together
    max_sweep_images: int = MAX_SWEEP_IMAGES
    # Activation memory grows with width × height × batch: the largest batch a device takes
    # (training's largest stage batch, and one image when sampling), None: unbounded; and the
    # setting that raises it, named in the error.
    max_batch_pixels: int | None = None
    batch_pixels_setting: str = "max_batch_pixels"
    # x0 previews one job may send (None: unbounded), and the setting that raises it.
    max_x0_previews: int | None = None
    x0_previews_setting: str = "max_x0_previews"


def check_batch_pixels(
    height: int, width: int, batch: int, bounds: Bounds, *, what: str, field: str
) -> None:
    """Refuse work whose largest batch cannot fit the device: a valid-looking 2048² batch of
    64 is refused up front instead of failing in the allocator minutes later."""
    pixels = height * width * batch
    if bounds.max_batch_pixels is not None and pixels > bounds.max_batch_pixels:
        raise InvalidInputError(
            f"{what} at {width}x{height} with batch {batch} needs {pixels:,} pixels per batch; "
            f"at most {bounds.max_batch_pixels:,} are accepted (width × height × batch, "
            f"{bounds.batch_pixels_setting}); lower the resolution or the batch size",
            field=field,
        )


# -- an edit ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditConfigs:
    """What an edit runs: its fine-tune and its sweep, how its images are encoded and which
    previews it streams. The training seed is final unless ``train_seed_from`` is "content"
    (``training_with_seed`` makes it final)."""

    source_prompt: str | None  # None: caption the image
    training: TrainingConfig
    train_seed_from: TrainSeedFrom
    sweep: SweepConfig
    output: OutputConfig = OutputConfig()
    preview: PreviewConfig = PreviewConfig()


@dataclass(frozen=True)
class SampleConfigs:
    """What sampling a stored edit model runs: the sweep, the encoding, the previews."""

    sweep: SweepConfig
    output: OutputConfig = OutputConfig()
    preview: PreviewConfig = PreviewConfig()


def build_edit(
    options: EditOptions,
    *,
    native_height: int,
    native_width: int,
    precision: Precision = "faithful",
    delta_format: DeltaFormat | None = None,
    bounds: Bounds = Bounds(),
) -> EditConfigs:
    """``build_training`` and then ``build_sweep`` (with the training's variant), after the
    caller's source prompt, if any, passed the prompt checks; and one image at the training's
    resolution must fit a sampling batch (``bounds``). Then the output and the previews (the
    training-free preview on unless the options turn it off)."""
    if options.source_prompt is not None:
        check_prompt(options.source_prompt, "source_prompt")
    training, seed_from = build_training(
        options.training,
        native_height=native_height,
        native_width=native_width,
        precision=precision,
        delta_format=delta_format,
        bounds=bounds,
    )
    sweep = build_sweep(options.sweep, options.target_prompts, training.mode, bounds)
    check_batch_pixels(training.height, training.width, 1, bounds, what="sampling", field="sweep")
    output = build_output(options.output)
    preview = build_preview(options.preview, sweep, bounds, has_training=True)
    return EditConfigs(options.source_prompt, training, seed_from, sweep, output, preview)


def build_sample(options: SampleOptions, mode: str, bounds: Bounds = Bounds()) -> SampleConfigs:
    """``build_sweep`` over an edit model trained in ``mode``, the output and the previews (a
    sample has no fine-tune, so no training-free preview)."""
    sweep = build_sweep(options.sweep, options.target_prompts, mode, bounds)
    output = build_output(options.output)
    preview = build_preview(options.preview, sweep, bounds, has_training=False)
    return SampleConfigs(sweep, output, preview)


# -- training ---------------------------------------------------------------------------------


def build_training(
    options: TrainingOptions,
    *,
    native_height: int,
    native_width: int,
    precision: Precision = "faithful",
    delta_format: DeltaFormat | None = None,
    bounds: Bounds = Bounds(),
) -> tuple[TrainingConfig, TrainSeedFrom]:
    """The fine-tune's config, and where its seed comes from.

    Unset options take the variant's schedule (``default_stages``), the base model's native
    size, and the front end's ``precision`` and ``delta_format`` (None: the precision's
    default). ``updates``/``batch_size`` override the first stage, ``stage2_*`` two_stage's
    second. The seed is the given one, a fresh draw (``fresh_seed``), or, unset, a placeholder
    0 until the content seed is known (``training_with_seed``)."""
    # 1. The variant, the numerics and how Δ is stored.
    mode: TrainingMode = options.mode or "joint"
    check_choice("training mode", mode, TRAINING_MODES, "training.mode")
    precision = options.precision or precision
    check_choice("precision", precision, PRECISIONS, "training.precision")
    delta_format = options.delta_format or delta_format
    if delta_format is not None:
        check_choice("delta format", delta_format, DELTA_FORMATS, "training.delta_format")

    # 2. The working resolution.
    height = options.height if options.height is not None else native_height
    width = options.width if options.width is not None else native_width
    check_resolution(height, width, "training.height" if valid_side(width) else "training.width")

    # 3. The seeds.
    seed, seed_from = _training_seed(options)
    vae_seed = options.vae_seed if options.vae_seed is not None else 0
    check_seed(vae_seed, "training.vae_seed")

    # 4. The schedule: the variant's stages with the per-stage overrides.
    stages = default_stages(mode)
    updates = _per_stage(options.updates, options.stage2_updates, "updates", mode, len(stages))
    batch_sizes = _per_stage(
        options.batch_size, options.stage2_batch_size, "batch_size", mode, len(stages)
    )
    for value, field in zip(updates, ("training.updates", "training.stage2_updates"), strict=False):
        if value is not None:
            check_updates(value, field)
    for value, field in zip(
        batch_sizes, ("training.batch_size", "training.stage2_batch_size"), strict=False
    ):
        if value is not None:
            check_batch_size(value, field)

    config = TrainingConfig(
        mode=mode,
        height=height,
        width=width,
        seed=seed,
        vae_seed=vae_seed,
        precision=precision,
        stages=stages,
        delta_format=delta_format,
    )
    config = override_stages(config, updates=updates, batch_sizes=batch_sizes)

    # 5. The work it asks for, within ``bounds``.
    largest_batch = max(stage.batch_size for stage in config.stages)
    check_batch_pixels(
        height, width, largest_batch, bounds, what="training", field="training.batch_size"
    )
    if bounds.max_total_updates is not None and config.total_updates > bounds.max_total_updates:
        raise InvalidInputError(
            f"training would run {config.total_updates} updates; at most "
            f"{bounds.max_total_updates} are accepted",
            field="training.updates",
        )
    return config, seed_from


def stage_names(mode: TrainingMode) -> tuple[str, ...]:
    """The optimisation stages ``mode`` trains, in order (two_stage: embedding, unet)."""
    return tuple(stage.name for stage in default_stages(mode))


def _training_seed(options: TrainingOptions) -> tuple[int, TrainSeedFrom]:
    if options.seed is not None and options.fresh_seed:
        raise InvalidInputError(
            "training.fresh_seed asks for a random seed, but training.seed gives one; set one "
            "of them",
            field="training.fresh_seed",
        )
    if options.seed is not None:
        check_seed(options.seed, "training.seed")
        return options.seed, "given"
    if options.fresh_seed:
        return random_seed(), "random"
    return 0, "content"  # a placeholder until the content is known (``training_with_seed``)


def _per_stage(
    first: int | None, second: int | None, name: str, mode: str, stages: int
) -> list[int | None]:
    """[first, second] as ``override_stages`` takes them, trailing unset values dropped; a
    second-stage value for a one-stage mode is refused naming its field."""
    if second is not None and stages < 2:
        raise InvalidInputError(
            f"training.stage2_{name} applies to the second (UNet) stage of two_stage training; "
            f"{mode} training has {stages} stage (set training.{name} for it)",
            field=f"training.stage2_{name}",
        )
    values = [first, second]
    while values and values[-1] is None:
        values.pop()
    return values


def training_with_seed(
    config: TrainingConfig,
    seed_from: TrainSeedFrom,
    *,
    image_sha256: str,
    base_fingerprint: str,
    source_prompt: str,
    salt: str = "",
) -> TrainingConfig:
    """The training config with its final seed, once the base model and the source prompt
    are known. A "given" seed, or a "random" one without ``salt``, is already final. A
    "content" seed is ``content_seed`` of what the fine-tune sees, so the same image, base
    model, source prompt and config train the same edit model (and a stored one is reused);
    a "random" seed with a ``salt`` (a request id) is that function salted with it: random
    looking, yet a retry of the same request gets the same seed."""
    if seed_from == "given" or (seed_from == "random" and not salt):
        return config
    seed = content_seed(
        image_sha256,
        base_fingerprint,
        source_prompt,
        config,
        salt=salt if seed_from == "random" else "",
    )
    return dataclasses.replace(config, seed=seed)


# -- the sweep --------------------------------------------------------------------------------


def build_sweep(
    options: SweepOptions, target_prompts: Sequence[str], mode: str, bounds: Bounds = Bounds()
) -> SweepConfig:
    """The sweep over an edit model trained in ``mode``: unset options take the variant's
    defaults (``default_sweep``) and the original's (50 DDIM steps, guidance 7.5, no partial
    forgetting); unset seeds are ``seed_count`` (default 1) fresh random ones.

    α applies to vp only: alphas with vs are refused (vs has no α), not ignored."""
    # 1. What to edit toward.
    check_prompts(target_prompts, "target_prompts")
    variant = default_sweep(mode)

    # 2. The interpolation and its coefficients.
    interpolation = options.interpolation or "vs"
    check_choice("interpolation", interpolation, INTERPOLATIONS, "sweep.interpolation")
    if options.gammas:
        check_values("sweep.gammas", options.gammas, GAMMA_RANGE)
    if options.alphas:
        if interpolation != "vp":
            raise InvalidInputError(
                "sweep.alphas applies only to sweep.interpolation vp (vs ignores α)",
                field="sweep.alphas",
            )
        check_values("sweep.alphas", options.alphas, ALPHA_RANGE)

    # 3. Forgetting: the variant's strategies, and how far reverted tensors go back.
    check_strategies(options.forget_strategies, mode)
    forget_degree = options.forget_degree
    if forget_degree is None:
        forget_degree = DEFAULT_FORGET_DEGREE
    check_forget_degree(forget_degree, "sweep.forget_degree")

    # 4. Seeds, and the denoising loop.
    seeds = _sweep_seeds(options)
    steps = options.steps if options.steps is not None else DEFAULT_STEPS
    check_steps(steps, "sweep.steps")
    guidance = options.guidance if options.guidance is not None else DEFAULT_GUIDANCE
    check_guidance(guidance, "sweep.guidance")

    # 5. The grid, at most ``bounds.max_sweep_images`` (the config checks the engine's bound).
    sweep = SweepConfig(
        prompts=tuple(target_prompts),
        interpolation=interpolation,
        gammas=options.gammas or variant.gammas,
        alphas=options.alphas or variant.alphas,
        forget=options.forget_strategies or variant.forget,
        forget_degree=forget_degree,
        seeds=seeds,
        steps=steps,
        guidance=guidance,
    )
    check_sweep_size(sweep.num_images, limit=bounds.max_sweep_images)
    return sweep


def check_strategies(names: Sequence[str], mode: str) -> None:
    """Refuse a forgetting strategy the variant of ``mode`` does not define."""
    from forgedit.forgetting import check_strategy, variant_for_mode

    variant = variant_for_mode(mode)
    for name in names:
        check_strategy(name, variant, field="sweep.forget_strategies")


def _sweep_seeds(options: SweepOptions) -> tuple[int, ...]:
    for seed in options.seeds:
        check_seed(seed, "sweep.seeds")
    if options.seeds:
        return options.seeds
    count = options.seed_count if options.seed_count is not None else 1
    if not 1 <= count <= MAX_SWEEP_IMAGES:
        raise InvalidInputError(
            f"seed_count must be 1..{MAX_SWEEP_IMAGES}, got {count}", field="sweep.seed_count"
        )
    return random_seeds(count)


# -- output and previews ----------------------------------------------------------------------


def build_output(options: OutputOptions) -> OutputConfig:
    """The images' encoding: PNG unless the options ask for webp or jpeg; a quality only with
    those two (1..100, unset: ``DEFAULT_QUALITY``)."""
    image_format = options.format or "png"
    check_choice("image format", image_format, IMAGE_FORMATS, "output.format")
    if options.quality is not None:
        check_quality(options.quality, image_format, "output.quality")
    return OutputConfig(image_format, options.quality)


def build_preview(
    options: PreviewOptions, sweep: SweepConfig, bounds: Bounds = Bounds(), *, has_training: bool
) -> PreviewConfig:
    """Which previews the job streams. The training-free preview is on by default for a job
    that fine-tunes (``has_training``: an edit) and refused when asked for one that does not.
    x0 previews every ``x0_every`` (1..the sweep's steps) denoising steps, at most
    ``bounds.max_x0_previews`` in all (refused up front, naming the smallest ``x0_every`` that
    fits, rather than cut short)."""
    if options.training_free and not has_training:
        raise InvalidInputError(
            "preview.training_free previews the edit while an edit model is fine-tuned; a "
            "sample fine-tunes nothing (leave it unset, or false)",
            field="preview.training_free",
        )
    training_free = has_training and options.training_free is not False
    preview = PreviewConfig(training_free=training_free)
    if options.x0_every is None:
        return preview
    check_x0_every(options.x0_every, sweep.steps, "preview.x0_every")
    preview = PreviewConfig(training_free=training_free, x0_every=options.x0_every)
    limit = bounds.max_x0_previews
    if limit is not None and preview.x0_count(sweep) > limit:
        per_image = limit // sweep.num_images  # previews each image may have
        hint = (
            # The smallest k with floor(steps / k) <= per_image.
            f"set preview.x0_every to at least {sweep.steps // (per_image + 1) + 1}"
            if per_image >= 1
            else "this sweep has more images than that; leave preview.x0_every unset"
        )
        raise InvalidInputError(
            f"preview.x0_every {options.x0_every} over {sweep.num_images} images of "
            f"{sweep.steps} steps asks for {preview.x0_count(sweep)} x0 previews; at most "
            f"{limit} are sent per job ({bounds.x0_previews_setting}); {hint}",
            field="preview.x0_every",
        )
    return preview


# -- devices ----------------------------------------------------------------------------------


def default_device() -> str:
    """CUDA when this machine has it, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(value: str) -> str:
    """``value`` in torch's spelling, if this machine has that device; otherwise one error
    naming what is accepted here and the kinds Forgedit runs on."""
    import torch

    try:
        kind: str | None = torch.device(value).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if kind not in available:
        raise InvalidInputError(
            f"device {value!r} is not available on this machine; accepted here: "
            f"{', '.join(available)} (Forgedit runs on cpu, cuda, cuda:N)",
            field="device",
        )
    return str(torch.device(value))
