"""Request options and how they become ``EditRequest`` / ``SampleRequest`` messages.

Unset options (``None`` or empty) are left unset on the wire, so the server applies its
defaults, which follow the original Forgedit implementation (FORGEDIT_SPEC.md): joint training,
vs interpolation, γ ∈ {0.5, 0.6, 0.7} … The SDK checks only what it must to build a message
(names, types, enum values); ranges are the server's to judge, with field violations.
"""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

from forgedit_client._proto import forgedit_pb2 as pb
from forgedit_client.errors import InvalidOptionError
from forgedit_client.events import (
    DELTA_FORMATS,
    IMAGE_FORMATS,
    INTERPOLATIONS,
    PRECISIONS,
    TRAINING_MODES,
)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class TrainingOptions:
    """How the edit model is fine-tuned. ``mode``: joint | two_stage | dreambooth; ``seed``
    unset = derived by the server from the image, base model, source prompt and the rest of
    these options, so the same inputs reuse one stored edit model (reported back in
    ``Completed.train_seed``); ``fresh_seed=True`` asks for a new random fine-tune instead;
    ``width``/``height`` unset = the base model's native size; ``updates``/``batch_size``
    override the first stage, ``stage2_updates``/``stage2_batch_size`` two_stage's second (UNet)
    stage (e.g. a quick test run); ``precision``: faithful | fast, for training and sampling
    (unset: the server's); ``delta_format``: how the edit model stores its delta, fp32 | fp16 |
    int8 (unset: the server's default, fp32 for faithful, int8 for fast)."""

    mode: str | None = None
    seed: int | None = None
    vae_seed: int | None = None
    width: int | None = None
    height: int | None = None
    precision: str | None = None
    updates: int | None = None
    batch_size: int | None = None
    stage2_updates: int | None = None
    stage2_batch_size: int | None = None
    fresh_seed: bool = False
    delta_format: str | None = None

    def to_proto(self) -> Any:
        msg: Any = pb.TrainingOptions()
        if self.mode is not None:
            msg.mode = _enum("mode", self.mode, TRAINING_MODES)
        if self.precision is not None:
            msg.precision = _enum("precision", self.precision, PRECISIONS)
        if self.delta_format is not None:
            msg.delta_format = _enum("delta_format", self.delta_format, DELTA_FORMATS)
        for name in (
            "seed",
            "vae_seed",
            "width",
            "height",
            "updates",
            "batch_size",
            "stage2_updates",
            "stage2_batch_size",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, _int(name, value))
        msg.fresh_seed = bool(self.fresh_seed)
        return msg


@dataclass(frozen=True)
class SweepOptions:
    """What to sample: the grid forget strategy × prompt × seed × γ × α.

    ``gammas`` are γ for vs and β for vp; ``alphas`` are vp's only (the server refuses them
    with vs, which has no α); ``forget`` names
    forgetting strategies (e.g. ``encoderattn``, ``decoderattn+decoder2``); ``seeds`` empty =
    ``seed_count`` random seeds (reported back per image); ``steps`` DDIM steps; ``guidance``
    the classifier-free guidance scale; ``forget_degree`` d ∈ [0, 1] (0 = full revert)."""

    interpolation: str | None = None
    gammas: tuple[float, ...] = ()
    alphas: tuple[float, ...] = ()
    forget: tuple[str, ...] = ()
    forget_degree: float | None = None
    seeds: tuple[int, ...] = ()
    seed_count: int | None = None
    steps: int | None = None
    guidance: float | None = None

    def to_proto(self) -> Any:
        msg: Any = pb.SweepOptions()
        if self.interpolation is not None:
            msg.interpolation = _enum("interpolation", self.interpolation, INTERPOLATIONS)
        msg.gammas.extend(_float("gammas", g) for g in self.gammas)
        msg.alphas.extend(_float("alphas", a) for a in self.alphas)
        msg.forget_strategies.extend(_str("forget", s) for s in self.forget)
        msg.seeds.extend(_int("seeds", s) for s in self.seeds)
        if self.forget_degree is not None:
            msg.forget_degree = _float("forget_degree", self.forget_degree)
        if self.seed_count is not None:
            msg.seed_count = _int("seed_count", self.seed_count)
        if self.steps is not None:
            msg.steps = _int("steps", self.steps)
        if self.guidance is not None:
            msg.guidance = _float("guidance", self.guidance)
        return msg


@dataclass(frozen=True)
class OutputOptions:
    """How the job's images (and previews) are encoded. ``format``: png (lossless, the
    default) | webp | jpeg; ``quality``: webp/jpeg only, 1..100 (unset: the server's 90). The
    server refuses a quality with png, or out of range, naming the accepted values. Flat
    keywords: ``image_format=``, ``image_quality=``."""

    format: str | None = None
    quality: int | None = None

    def to_proto(self) -> Any:
        msg: Any = pb.OutputOptions()
        if self.format is not None:
            msg.format = _enum("image_format", self.format, IMAGE_FORMATS)
        if self.quality is not None:
            msg.quality = _int("image_quality", self.quality)
        return msg


@dataclass(frozen=True)
class PreviewOptions:
    """Previews while the job runs (``Preview`` events; never results). ``training_free``: an
    Edit's preview by the base model before the fine-tune (unset: on for Edit; a Sample has
    no fine-tune and refuses True); ``x0_every``: every this many denoising steps, a
    low-resolution x0 preview of each image (unset: none). Flat keywords:
    ``training_free_preview=``, ``x0_every=``."""

    training_free: bool | None = None
    x0_every: int | None = None

    def to_proto(self) -> Any:
        msg: Any = pb.PreviewOptions()
        if self.training_free is not None:
            if not isinstance(self.training_free, bool):
                raise InvalidOptionError(
                    f"training_free_preview must be True or False, got {self.training_free!r}"
                )
            msg.training_free = self.training_free
        if self.x0_every is not None:
            msg.x0_every = _int("x0_every", self.x0_every)
        return msg


@dataclass(frozen=True)
class JobOptions:
    """Every option group of one Edit or Sample request."""

    training: TrainingOptions
    sweep: SweepOptions
    output: OutputOptions
    preview: PreviewOptions


_TRAINING_FIELDS = {f.name for f in fields(TrainingOptions)}
_SWEEP_FIELDS = {f.name for f in fields(SweepOptions)}
# Keyword aliases callers reach for naturally (the CLI's --train-seed, the proto's name).
_ALIASES = {"train_seed": "seed", "forget_strategies": "forget", "training_mode": "mode"}
# Flat keywords of the output and preview groups (their field names alone would be vague).
_OUTPUT_KEYWORDS = {"image_format": "format", "image_quality": "quality"}
_PREVIEW_KEYWORDS = {"training_free_preview": "training_free", "x0_every": "x0_every"}


def split_options(
    options: Mapping[str, Any],
    training: TrainingOptions | None = None,
    sweep: SweepOptions | None = None,
    output: OutputOptions | None = None,
    preview: PreviewOptions | None = None,
    *,
    allow_training: bool = True,
) -> JobOptions:
    """Merge flat keyword options (``gammas=[0.5], mode="joint", image_format="webp"``) into
    the option groups.

    Keywords override fields of the groups given. Raises ``InvalidOptionError`` for an
    unknown name, naming the accepted ones. ``allow_training=False`` (Sample) rejects training
    options, since a stored edit model is never re-trained.
    """
    t: dict[str, Any] = dict((training or TrainingOptions()).__dict__)
    s: dict[str, Any] = dict((sweep or SweepOptions()).__dict__)
    o: dict[str, Any] = dict((output or OutputOptions()).__dict__)
    p: dict[str, Any] = dict((preview or PreviewOptions()).__dict__)
    for key, value in options.items():
        name = _ALIASES.get(key, key)
        if name == "seed" and key == "seed":
            # A bare `seed` is ambiguous; say which one is meant.
            raise InvalidOptionError("use train_seed= for training or seeds=[...] for sampling")
        if key in _OUTPUT_KEYWORDS:
            o[_OUTPUT_KEYWORDS[key]] = value
        elif key in _PREVIEW_KEYWORDS:
            p[_PREVIEW_KEYWORDS[key]] = value
        elif name in _SWEEP_FIELDS:
            s[name] = tuple(value) if isinstance(value, list | tuple) else value
        elif name in _TRAINING_FIELDS and allow_training:
            t[name] = value
        elif name in _TRAINING_FIELDS:
            raise InvalidOptionError(
                f"{key!r} is a training option; sampling a stored edit model does not train"
            )
        else:
            raise InvalidOptionError(
                f"unknown option {key!r}; accepted: {', '.join(_accepted(allow_training))}"
            )
    for name in ("gammas", "alphas", "forget", "seeds"):
        if isinstance(s[name], str | int | float):
            s[name] = (s[name],)
        s[name] = tuple(s[name])
    return JobOptions(
        TrainingOptions(**t), SweepOptions(**s), OutputOptions(**o), PreviewOptions(**p)
    )


def _accepted(allow_training: bool) -> list[str]:
    names = set(_SWEEP_FIELDS) | set(_OUTPUT_KEYWORDS) | set(_PREVIEW_KEYWORDS)
    if allow_training:
        names |= (_TRAINING_FIELDS - {"seed"}) | {"train_seed"}
    return sorted(names)


def new_request_id() -> str:
    """A fresh idempotency key (so a retry or re-attach finds the same job)."""
    return uuid.uuid4().hex


def check_request_id(request_id: str) -> str:
    if not REQUEST_ID_RE.match(request_id):
        raise InvalidOptionError(
            "request_id must be 1-128 characters of letters, digits and . _ : -, "
            f"got {request_id[:40]!r}"
        )
    return request_id


def prompts_tuple(prompts: str | Iterable[str]) -> tuple[str, ...]:
    """One prompt or several; at least one, each a string."""
    items = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    if not items:
        raise InvalidOptionError("at least one target prompt is required")
    for p in items:
        if not isinstance(p, str):
            raise InvalidOptionError(f"prompts must be text, got {type(p).__name__}")
    return items


ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO | Any


def image_bytes(image: ImageInput) -> bytes:
    """The encoded image to send: raw bytes as given, a file's content, a binary stream's
    content, or a PIL image encoded as PNG. The server detects the format from the content
    (PNG, JPEG, WebP) and enforces its limits; nothing is decoded here."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise InvalidOptionError(f"image file not found: {os.fspath(image)}")
        return path.read_bytes()
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise InvalidOptionError("image stream must be opened in binary mode")
        return data
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise InvalidOptionError(
        f"image must be bytes, a path, a binary file or a PIL image, got {type(image).__name__}"
    )


def edit_request(
    image: ImageInput,
    prompts: str | Iterable[str],
    *,
    options: JobOptions,
    source_prompt: str | None,
    base_model: str | None,
    request_id: str,
    detach: bool,
) -> Any:
    """Build an ``EditRequest``."""
    msg = pb.EditRequest(
        request_id=check_request_id(request_id),
        image=image_bytes(image),
        target_prompts=list(prompts_tuple(prompts)),
        base_model=base_model or "",
        training=options.training.to_proto(),
        sweep=options.sweep.to_proto(),
        output=options.output.to_proto(),
        preview=options.preview.to_proto(),
        detach=detach,
    )
    if source_prompt is not None:
        msg.source_prompt = _str("source_prompt", source_prompt)
    return msg


def sample_request(
    edit_model_id: str,
    prompts: str | Iterable[str],
    *,
    options: JobOptions,
    request_id: str,
    detach: bool,
) -> Any:
    """Build a ``SampleRequest`` (the training options are not part of it)."""
    return pb.SampleRequest(
        request_id=check_request_id(request_id),
        edit_model_id=_str("edit_model_id", edit_model_id),
        target_prompts=list(prompts_tuple(prompts)),
        sweep=options.sweep.to_proto(),
        output=options.output.to_proto(),
        preview=options.preview.to_proto(),
        detach=detach,
    )


# ------------------------------------------------------------------------------- conversions


def _enum(name: str, value: str, accepted: Mapping[str, int]) -> int:
    key = value.lower().replace("-", "_") if isinstance(value, str) else value
    if key not in accepted:
        raise InvalidOptionError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    return accepted[key]


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise InvalidOptionError(f"{name} must not be negative, got {value}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptionError(f"{name} must be a number, got {value!r}")
    # NaN and infinities are sent as given: the server owns ranges and says which are valid.
    return float(value)


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidOptionError(f"{name} must be text, got {type(value).__name__}")
    return value
