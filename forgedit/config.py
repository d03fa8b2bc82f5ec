"""What a fine-tune and a sweep are made of: every number that affects results, with the
original's defaults (FORGEDIT_SPEC.md §3, §4, §6, §7, §8).

The configs are frozen dataclasses that validate themselves on construction and round-trip
through plain JSON (``to_dict`` / ``from_dict``): the edit-model manifest, the registry's
params and the gRPC request all carry the same dictionary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from forgedit.durable import JsonObject
from forgedit.errors import InvalidInputError

TrainingMode = Literal["joint", "two_stage", "dreambooth"]
Precision = Literal["faithful", "fast"]
Interpolation = Literal["vs", "vp"]
UnetSubset = Literal["forgedit", "all"]
DeltaFormat = Literal["fp32", "fp16", "int8"]  # how an edit model stores Δ (forgedit.delta)
ImageFormat = Literal["png", "webp", "jpeg"]  # how result images are encoded (OutputConfig)

TRAINING_MODES: tuple[str, ...] = get_args(TrainingMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
DELTA_FORMATS: tuple[str, ...] = get_args(DeltaFormat)
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)

# Accepted ranges. They bound work and catch typos; the science lives well inside them.
MAX_SEED = 2**63 - 1
GAMMA_RANGE = (-1.0, 3.0)  # γ (vs) / β (vp); the original sweeps 0.0-1.9, γ>1 extrapolates
ALPHA_RANGE = (0.0, 3.0)  # vp's α; the original uses 0.8, 0.9, 1.1
MAX_PROMPT_CHARS = 1000  # CLIP truncates at 77 tokens anyway; this only stops abuse
MAX_DDIM_STEPS = 1000  # the training schedule has 1000 timesteps
GUIDANCE_RANGE = (0.0, 50.0)
MAX_SWEEP_IMAGES = 4096
MAX_RESOLUTION = 2048
MAX_UPDATES = 100_000
MAX_BATCH = 64
# A sweep's defaults where the variants agree (``default_sweep`` has the rest).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_FORGET_DEGREE = 0.0
# Lossy image encodings (WebP, JPEG): quality 1..100, and the default when a request sets none.
QUALITY_RANGE = (1, 100)
DEFAULT_QUALITY = 90

# The Adam eps the original effectively ran with on a GPU: accelerate's GradScaler multiplied
# the loss by 65536 and the gradients were never unscaled (spec §3.4).
GRAD_SCALER_INIT_SCALE = 65536.0


@dataclass(frozen=True)
class EarlyStop:
    """Stop before the update of iteration k when ``loss < threshold`` and
    ``batch_size * k > min_samples`` (the original: 0.03 and 350, checked before the update)."""

    threshold: float = 0.03
    min_samples: int = 350


@dataclass(frozen=True)
class Stage:
    """One optimisation stage: which parts train, at what learning rate, for how long.

    ``unet_lr=None`` freezes the UNet; ``text_lr=None`` freezes the text side. The text side is
    the free source embedding in ``joint``/``two_stage`` and the whole CLIP text encoder in
    ``dreambooth``.
    """

    name: str
    updates: int
    batch_size: int
    unet_lr: float | None
    text_lr: float | None
    unet_subset: UnetSubset = "forgedit"
    early_stop: EarlyStop | None = None

    def __post_init__(self) -> None:
        check_updates(self.updates, stage=self.name)
        check_batch_size(self.batch_size, stage=self.name)
        for name, lr in (("unet_lr", self.unet_lr), ("text_lr", self.text_lr)):
            if lr is not None and not (math.isfinite(lr) and 0 < lr < 1):
                raise InvalidInputError(
                    f"stage {self.name!r}: {name} must be in (0, 1), got {lr}", field=name
                )
        if self.unet_lr is None and self.text_lr is None:
            raise InvalidInputError(f"stage {self.name!r} trains nothing", field="stages")


def default_stages(mode: TrainingMode) -> tuple[Stage, ...]:
    """The original's schedule for each mode (spec §3.3, §7, §8)."""
    if mode == "joint":
        # "textsteps=400" in the original means 400 // bsz = 40 Adam updates of batch 10.
        return (
            Stage(
                "joint",
                updates=40,
                batch_size=10,
                unet_lr=6e-5,
                text_lr=1e-3,
                early_stop=EarlyStop(),
            ),
        )
    if mode == "two_stage":
        # Forgedit transferred to Imagic (the supplementary letter): embedding, then UNet.
        return (
            Stage("embedding", updates=400, batch_size=1, unet_lr=None, text_lr=1e-3),
            Stage("unet", updates=1000, batch_size=1, unet_lr=6e-5, text_lr=None),
        )
    if mode == "dreambooth":
        # DreamBooth-Forgedit: full UNet and text encoder, 400 // 4 = 100 updates, no early stop.
        return (
            Stage(
                "dreambooth",
                updates=100,
                batch_size=4,
                unet_lr=5e-6,
                text_lr=5e-6,
                unet_subset="all",
            ),
        )
    raise InvalidInputError(
        f"unknown training mode {mode!r}; accepted: {', '.join(TRAINING_MODES)}", field="mode"
    )


def default_delta_format(precision: str) -> DeltaFormat:
    """``faithful`` keeps Δ exact (fp32); ``fast`` stores int8, which measured more accurate
    than the fp16 weights fast mode samples with on a GPU (BENCHMARKS.md)."""
    return "fp32" if precision == "faithful" else "int8"


def legacy_delta_format(precision: str) -> DeltaFormat:
    """What edit models stored before the format could be chosen: fp32 in faithful mode, fp16
    in fast mode. Artifacts that do not name their format are read as this."""
    return "fp32" if precision == "faithful" else "fp16"


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines an edit model, given the image, the base model and the
    source prompt. Two equal configs on the same inputs give the same edit model."""

    mode: TrainingMode = "joint"
    height: int = 512
    width: int = 512
    seed: int = 0
    vae_seed: int = 0
    precision: Precision = "faithful"
    stages: tuple[Stage, ...] = field(default_factory=lambda: default_stages("joint"))
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # How the edit model stores Δ (forgedit.delta); None = the precision mode's default.
    delta_format: DeltaFormat | None = None

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, TRAINING_MODES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.delta_format is None:
            object.__setattr__(self, "delta_format", default_delta_format(self.precision))
        else:
            check_choice("delta format", self.delta_format, DELTA_FORMATS, "delta_format")
        check_resolution(self.height, self.width)
        for name, seed in (("seed", self.seed), ("vae_seed", self.vae_seed)):
            check_seed(seed, name)
        if not self.stages:
            raise InvalidInputError("a training config needs at least one stage", field="stages")

    @classmethod
    def for_mode(cls, mode: TrainingMode = "joint", **overrides: Any) -> TrainingConfig:
        """The original's settings for ``mode``, with top-level fields overridden (Any: the
        fields' types differ; construction checks every one)."""
        stages = overrides.pop("stages", None) or default_stages(mode)
        return cls(mode=mode, stages=tuple(stages), **overrides)

    @property
    def stored_format(self) -> DeltaFormat:
        """The delta format, resolved (``delta_format`` is never None after construction)."""
        return self.delta_format or default_delta_format(self.precision)

    @property
    def trains_text_encoder(self) -> bool:
        return self.mode == "dreambooth"

    @property
    def total_updates(self) -> int:
        return sum(s.updates for s in self.stages)

    @property
    def total_samples(self) -> int:
        """Images through the UNet in training (updates × batch size, all stages): what
        training time is proportional to."""
        return sum(s.updates * s.batch_size for s in self.stages)

    def samples_in(self, updates_done: int) -> int:
        """Samples of the first ``updates_done`` updates (fewer than planned after an early
        stop)."""
        samples = 0
        for s in self.stages:
            n = min(updates_done, s.updates)
            samples += n * s.batch_size
            updates_done -= n
        return samples

    @property
    def loss_scale(self) -> float:
        """Faithful mode multiplies the loss by the GradScaler's initial scale, as the original
        did on a GPU: with Adam this equals eps 1e-8/65536 (spec §3.4). Powers of two scale
        exactly, so this reproduces the original bit for bit where eps-only emulation would
        round differently."""
        return GRAD_SCALER_INIT_SCALE if self.precision == "faithful" else 1.0

    def to_dict(self) -> JsonObject:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: JsonObject) -> TrainingConfig:
        data = dict(data)
        stages = []
        for s in data.pop("stages"):
            s = dict(s)
            es = s.pop("early_stop", None)
            stages.append(Stage(**s, early_stop=EarlyStop(**es) if es else None))
        data["adam_betas"] = tuple(data.get("adam_betas", (0.9, 0.999)))
        # Manifests from before the field existed stored what the precision implied then.
        data.setdefault("delta_format", legacy_delta_format(data.get("precision", "faithful")))
        return cls(stages=tuple(stages), **data)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: part of the registry's dedupe key.

        A delta format equal to what the engine stored before the field existed is left out,
        so edit models registered before it keep their fingerprint (and keep deduping)."""
        data = self.to_dict()
        if data["delta_format"] == legacy_delta_format(self.precision):
            del data["delta_format"]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def override_stages(
    config: TrainingConfig,
    *,
    updates: Sequence[int | None] = (),
    batch_sizes: Sequence[int | None] = (),
) -> TrainingConfig:
    """Per-stage overrides of the schedule: the i-th value replaces stage i's, ``None`` keeps
    it. The one rule behind the engine CLI's ``--updates 400,1000`` / ``--batch-size`` and the
    gRPC request's ``updates``/``stage2_updates`` and ``batch_size``/``stage2_batch_size``:
    a single value always means the first stage. ``Stage`` validates the numbers."""
    stages = list(config.stages)
    for name, values in (("updates", updates), ("batch_size", batch_sizes)):
        if len(values) > len(stages):
            raise InvalidInputError(
                f"{name} was given for {len(values)} stages, but {config.mode} training has "
                f"{len(stages)} ({', '.join(s.name for s in stages)})",
                field=name,
            )
        for i, value in enumerate(values):
            if value is not None:
                change: JsonObject = {name: value}
                stages[i] = dataclasses.replace(stages[i], **change)
    return dataclasses.replace(config, stages=tuple(stages))


def content_seed(
    image_sha256: str,
    base_fingerprint: str,
    source_prompt: str,
    config: TrainingConfig,
    *,
    salt: str = "",
) -> int:
    """The default training seed: a deterministic function of everything a fine-tune sees
    (the image bytes' sha256, the base model's fingerprint, the source prompt and the training
    config other than its seed). Training never sees the target prompt, so the same image and
    settings give the same seed, hence the same edit model, and a stored one is reused (on any
    replica, after any restart). A fresh fine-tune needs an explicit (random) seed; ``salt``
    (e.g. a request id) gives a different but equally reproducible one."""
    training = config.to_dict()
    training.pop("seed")
    blob = json.dumps(
        {
            "image_sha256": image_sha256,
            "base_fingerprint": base_fingerprint,
            "source_prompt": source_prompt,
            "training": training,
            **({"salt": salt} if salt else {}),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") & MAX_SEED


@dataclass(frozen=True)
class ImageSpec:
    """One image of a sweep, with everything needed to reproduce it.

    ``gamma`` is the interpolation's strength coefficient: γ of vector subtraction (vs), β of
    vector projection (vp). One field for both keeps the sweep grid, the manifests and the
    wire format (``gammas``) unchanged; ``strength_symbol`` says which one it is."""

    index: int
    prompt: str
    forget: str
    interpolation: Interpolation
    gamma: float  # γ for vs, β for vp (``strength_symbol``)
    alpha: float  # vp's α; 0.0 for vs (unused there)
    seed: int
    guidance: float
    steps: int
    forget_degree: float

    @property
    def strength_symbol(self) -> str:
        """What ``gamma`` holds, as the paper writes it: "γ" for vs, "β" for vp."""
        return "β" if self.interpolation == "vp" else "γ"

    def to_dict(self) -> JsonObject:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SweepConfig:
    """A grid of edits over one edit model.

    Images are ordered strategy → prompt → seed → gamma → alpha, so that all images of one
    forgetting strategy are contiguous and can share one batched denoising loop. (The original
    loops seed → strategy → gamma → alpha, one image at a time; the set is the same.)
    """

    prompts: tuple[str, ...]
    interpolation: Interpolation = "vs"
    gammas: tuple[float, ...] = (0.5, 0.6, 0.7)
    alphas: tuple[float, ...] = (0.8, 0.9, 1.1)
    forget: tuple[str, ...] = ("donotforget",)
    forget_degree: float = DEFAULT_FORGET_DEGREE
    seeds: tuple[int, ...] = (0,)
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE

    def __post_init__(self) -> None:
        check_prompts(self.prompts)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        check_values("gammas", self.gammas, GAMMA_RANGE)
        if self.interpolation == "vp":
            check_values("alphas", self.alphas, ALPHA_RANGE)
        if not self.forget:
            raise InvalidInputError("at least one forgetting strategy is required", field="forget")
        check_forget_degree(self.forget_degree)
        if not self.seeds:
            raise InvalidInputError("at least one seed is required", field="seeds")
        for s in self.seeds:
            check_seed(s, "seeds")
        check_steps(self.steps)
        check_guidance(self.guidance)
        check_sweep_size(self.num_images)

    @classmethod
    def for_mode(cls, mode: str, **given: Any) -> SweepConfig:
        """A sweep over an edit model trained in ``mode``: the variant's defaults
        (``default_sweep``) for whatever ``given`` leaves out (Any: the fields' types differ;
        construction checks every one)."""
        return cls(**{**dataclasses.asdict(default_sweep(mode)), **given})

    @property
    def effective_alphas(self) -> tuple[float, ...]:
        # vs ignores α; the original sweeps textlist=[0] for vs.
        return self.alphas if self.interpolation == "vp" else (0.0,)

    @property
    def num_images(self) -> int:
        return (
            len(self.prompts)
            * len(self.forget)
            * len(self.seeds)
            * len(self.gammas)
            * len(self.effective_alphas)
        )

    def images(self) -> Iterator[ImageSpec]:
        index = 0
        for forget in self.forget:
            for prompt in self.prompts:
                for seed in self.seeds:
                    for gamma in self.gammas:
                        for alpha in self.effective_alphas:
                            yield ImageSpec(
                                index,
                                prompt,
                                forget,
                                self.interpolation,
                                gamma,
                                alpha,
                                seed,
                                self.guidance,
                                self.steps,
                                self.forget_degree,
                            )
                            index += 1

    def to_dict(self) -> JsonObject:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OutputConfig:
    """How result images (and previews) are encoded: PNG (lossless, the default: its bytes
    depend only on the pixels), or WebP or JPEG at ``quality`` 1..100. Not part of the
    original, which saved PNGs; the pixels are the same whatever the encoding."""

    format: ImageFormat = "png"
    quality: int | None = None  # WebP and JPEG only; None there: DEFAULT_QUALITY

    def __post_init__(self) -> None:
        check_choice("image format", self.format, IMAGE_FORMATS, "format")
        if self.quality is not None:
            check_quality(self.quality, self.format)

    @property
    def lossy_quality(self) -> int:
        """The quality a lossy encoder uses (PNG has none)."""
        return self.quality if self.quality is not None else DEFAULT_QUALITY

    @property
    def suffix(self) -> str:
        """The file name suffix of this encoding: .png, .webp or .jpg."""
        return ".jpg" if self.format == "jpeg" else f".{self.format}"


@dataclass(frozen=True)
class PreviewConfig:
    """Which previews a job streams (``forgedit.preview``; not part of the original
    Forgedit): the training-free preview before an Edit's fine-tune, and the x0 estimate of
    each image every ``x0_every`` denoising steps (None: none)."""

    training_free: bool = False
    x0_every: int | None = None

    def __post_init__(self) -> None:
        if self.x0_every is not None:
            check_x0_every(self.x0_every, MAX_DDIM_STEPS)

    def x0_steps(self, steps: int) -> tuple[int, ...]:
        """The 1-based denoising steps of a ``steps``-step loop that send an x0 preview."""
        if self.x0_every is None:
            return ()
        return tuple(s for s in range(1, steps + 1) if is_x0_step(s, self.x0_every))

    def x0_count(self, sweep: SweepConfig) -> int:
        """How many x0 previews ``sweep`` sends: one per image at each ``x0_steps`` step."""
        return sweep.num_images * len(self.x0_steps(sweep.steps))


@dataclass(frozen=True)
class VariantSweep:
    """What a variant's sweep defaults to, where the variants differ."""

    gammas: tuple[float, ...]
    alphas: tuple[float, ...]
    forget: tuple[str, ...]


def default_sweep(mode: str) -> VariantSweep:
    """The sweep each variant's original driver runs, where it differs from ``SweepConfig``'s
    field defaults (vanilla's): γ/β, vp's α and the forgetting strategy.

    * ``joint``: γ 0.5-0.7, α 0.8/0.9/1.1, no forgetting.
    * ``two_stage``: the same grid with ``encoderattn``, the letter's default strategy for
      Forgedit transferred to Imagic.
    * ``dreambooth``: DD's ``i in range(8, 17)``, i.e. γ/β 0.8-1.6, and vp α 0.8/0.9; DD's
      ``freeze_list = ['orig']``, i.e. no forgetting.
    """
    check_choice("mode", mode, TRAINING_MODES)
    if mode == "dreambooth":
        return VariantSweep(gamma_grid(8, 17), (0.8, 0.9), ("donotforget",))
    forget = ("encoderattn",) if mode == "two_stage" else ("donotforget",)
    return VariantSweep((0.5, 0.6, 0.7), (0.8, 0.9, 1.1), forget)


def gamma_grid(start: int, end: int) -> tuple[float, ...]:
    """The original's γ grid ``i * 0.1 for i in range(start, end)``, computed as ``i / 10`` so
    the values print as 0.3 and not 0.30000000000000004 (spec §4)."""
    return tuple(i / 10 for i in range(start, end))


# -- the checks -------------------------------------------------------------------------------
# One function per rule. The configs call them on construction with their own names; the
# request builder (``forgedit.requests``) calls them first with the request's field path as the
# name (``sweep.steps``), so the error names what the caller sent and its ``field`` is that path.


def valid_side(side: int) -> bool:
    """An image side the engine works at: a multiple of 8 in 8..``MAX_RESOLUTION``."""
    return (
        isinstance(side, int)
        and not isinstance(side, bool)
        and 0 < side <= MAX_RESOLUTION
        and side % 8 == 0
    )


def check_resolution(height: int, width: int, field: str = "size") -> None:
    for v in (height, width):
        if not valid_side(v):
            raise InvalidInputError(
                f"size must be WIDTHxHEIGHT with each side a multiple of 8 between 8 and "
                f"{MAX_RESOLUTION}, got {width}x{height}",
                field=field,
            )


_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """'768x512' → (width, height), each side checked (``check_resolution``); ``name`` is the
    flag or setting the text came from, for the error."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidInputError(
            f"{name} must be WIDTHxHEIGHT, e.g. 512x512 or 768x512, got {text!r}", field=name
        )
    width, height = int(m.group(1)), int(m.group(2))
    check_resolution(height, width, field=name)
    return width, height


def check_seed(seed: int, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(
            f"{name} must be an integer in [0, 2^63-1], got {seed!r}", field=name
        )


def check_prompt(prompt: str, name: str = "prompt") -> None:
    field = name
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(f"{name} must be non-empty text", field=field)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInputError(
            f"{name} is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted",
            field=field,
        )
    bad = [c for c in prompt if (ord(c) < 32 and c not in "\t") or ord(c) == 127]
    if bad:
        raise InvalidInputError(
            f"{name} contains control characters (e.g. {bad[0]!r}); use printable text",
            field=field,
        )


def check_prompts(prompts: Sequence[str], name: str = "prompt") -> None:
    """At least one target prompt, each as ``check_prompt`` wants it."""
    if not prompts:
        raise InvalidInputError("at least one target prompt is required", field=name)
    for p in prompts:
        check_prompt(p, name)


def check_updates(value: int, name: str = "updates", *, stage: str | None = None) -> None:
    """One stage's optimiser updates: 1..``MAX_UPDATES``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_UPDATES:
        raise InvalidInputError(
            f"{_of_stage(stage)}{name} must be 1..{MAX_UPDATES}, got {value!r}", field=name
        )


def check_batch_size(value: int, field: str = "batch_size", *, stage: str | None = None) -> None:
    """One stage's batch size: 1..``MAX_BATCH``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH:
        raise InvalidInputError(
            f"{_of_stage(stage)}batch size must be 1..{MAX_BATCH}, got {value!r}", field=field
        )


def check_steps(steps: int, name: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_DDIM_STEPS:
        raise InvalidInputError(f"{name} must be 1..{MAX_DDIM_STEPS}, got {steps!r}", field=name)


def check_guidance(guidance: float, name: str = "guidance") -> None:
    lo, hi = GUIDANCE_RANGE
    if not (_is_number(guidance) and math.isfinite(guidance) and lo <= guidance <= hi):
        raise InvalidInputError(
            f"{name} must be a finite number in [{lo}, {hi}], got {guidance!r}", field=name
        )


def check_forget_degree(degree: float, field: str = "forget_degree") -> None:
    if not (_is_number(degree) and math.isfinite(degree) and 0.0 <= degree <= 1.0):
        raise InvalidInputError(f"forget degree must be in [0, 1], got {degree!r}", field=field)


def check_sweep_size(num_images: int, field: str = "sweep", limit: int = MAX_SWEEP_IMAGES) -> None:
    if num_images > limit:
        raise InvalidInputError(
            f"the sweep has {num_images} images; at most {limit} are accepted "
            "(prompts × strategies × seeds × gammas × alphas)",
            field=field,
        )


def is_x0_step(step: int, every: int) -> bool:
    """Whether 1-based denoising ``step`` sends an x0 preview: every ``every``-th step."""
    return step % every == 0


def check_quality(quality: int, image_format: str, field: str = "quality") -> None:
    """A lossy encoding's quality, 1..100; PNG is lossless and takes none."""
    if image_format not in ("webp", "jpeg"):
        raise InvalidInputError(
            f"{field} applies only to the lossy image formats webp and jpeg; {image_format} is "
            "lossless (leave the quality unset)",
            field=field,
        )
    lo, hi = QUALITY_RANGE
    if isinstance(quality, bool) or not isinstance(quality, int) or not lo <= quality <= hi:
        raise InvalidInputError(
            f"{field} must be an integer {lo}..{hi} (unset: {DEFAULT_QUALITY}), got {quality!r}",
            field=field,
        )


def check_x0_every(every: int, steps: int, field: str = "x0_every") -> None:
    """An x0 preview every 1..``steps`` denoising steps."""
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= steps:
        raise InvalidInputError(
            f"{field} must be 1..{steps} (the denoising steps; leave it unset for no x0 "
            f"previews), got {every!r}",
            field=field,
        )


def check_choice(name: str, value: str, accepted: Sequence[str], field: str | None = None) -> None:
    if value not in accepted:
        raise InvalidInputError(
            f"unknown {name} {value!r}; accepted: {', '.join(accepted)}", field=field or name
        )


def check_values(name: str, values: Sequence[float], bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if not values:
        raise InvalidInputError(f"{name} must list at least one value", field=name)
    for v in values:
        if not (_is_number(v) and math.isfinite(v) and lo <= v <= hi):
            raise InvalidInputError(
                f"{name} values must be finite numbers in [{lo}, {hi}], got {v!r}", field=name
            )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _of_stage(stage: str | None) -> str:
    return f"stage {stage!r}: " if stage else ""
