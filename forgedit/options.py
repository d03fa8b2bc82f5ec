"""What a caller asks the engine for, as plain typed options named as the gRPC contract names
them (``proto/forgedit/v1/forgedit.proto``: ``TrainingOptions``, ``SweepOptions``,
``OutputOptions``, ``PreviewOptions``).

The server's wire decodes each request message into these once (``server.wire``); the engine
CLI builds them from its flags (``forgedit.cli.arguments``). ``forgedit.requests`` is the one
builder that turns them into the engine's configs and seeds, so both front ends mean the same
thing by the same values, and its errors name an option by its path here, which is the
request's field path (``sweep.gammas``, ``training.width``, ``target_prompts``).

Every option may be left unset (``None``, or an empty tuple): the variant's default, which is
the original Forgedit's (``forgedit.config``). Nothing here is checked: the builder checks.

A new option is a field here, a rule in the builder, the proto field, the CLI flag (with its
row in ``forgedit.cli.parser.FLAGS``) and the SDK option (``clients/python``'s ``options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from forgedit.config import DeltaFormat, ImageFormat, Interpolation, Precision, TrainingMode


@dataclass(frozen=True)
class TrainingOptions:
    """How to fine-tune the edit model (``forgedit.v1.TrainingOptions``)."""

    mode: TrainingMode | None = None  # None: joint (vanilla Forgedit)
    seed: int | None = None  # None: derived from the content (or drawn, with fresh_seed)
    vae_seed: int | None = None  # None: 0, as the original
    width: int | None = None  # None: the base model's native size
    height: int | None = None
    precision: Precision | None = None  # None: the front end's default
    updates: int | None = None  # the first stage's optimiser updates
    batch_size: int | None = None  # the first stage's batch size
    stage2_updates: int | None = None  # two_stage's second (UNet) stage
    stage2_batch_size: int | None = None
    fresh_seed: bool = False  # a fresh random fine-tune instead of the content seed
    delta_format: DeltaFormat | None = None  # None: the front end's default for the precision


@dataclass(frozen=True)
class SweepOptions:
    """What to sample from an edit model (``forgedit.v1.SweepOptions``): the grid forgetting
    strategy × prompt × seed × γ (β for vp) × α (vp only)."""

    interpolation: Interpolation | None = None  # None: vs
    gammas: tuple[float, ...] = ()  # γ for vs, β for vp
    alphas: tuple[float, ...] = ()  # vp only
    forget_strategies: tuple[str, ...] = ()
    forget_degree: float | None = None
    seeds: tuple[int, ...] = ()  # empty: ``seed_count`` random seeds
    seed_count: int | None = None  # None: 1
    steps: int | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class OutputOptions:
    """How the job's images are encoded (``forgedit.v1.OutputOptions``)."""

    format: ImageFormat | None = None  # None: png
    quality: int | None = None  # webp and jpeg only; None: DEFAULT_QUALITY


@dataclass(frozen=True)
class PreviewOptions:
    """Which previews the job streams (``forgedit.v1.PreviewOptions``)."""

    training_free: bool | None = None  # None: on for an edit (a sample has no fine-tune)
    x0_every: int | None = None  # None: no x0 previews


@dataclass(frozen=True)
class EditOptions:
    """An edit: fine-tune on one image, then sample (``forgedit.v1.EditRequest`` less what
    only the service has: the image bytes, the base model's name, request id and detach)."""

    target_prompts: tuple[str, ...]
    source_prompt: str | None = None  # None: BLIP's caption of the image
    training: TrainingOptions = field(default_factory=TrainingOptions)
    sweep: SweepOptions = field(default_factory=SweepOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    preview: PreviewOptions = field(default_factory=PreviewOptions)


@dataclass(frozen=True)
class SampleOptions:
    """New edits from a stored edit model (``forgedit.v1.SampleRequest``, less its id)."""

    target_prompts: tuple[str, ...]
    sweep: SweepOptions = field(default_factory=SweepOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    preview: PreviewOptions = field(default_factory=PreviewOptions)
