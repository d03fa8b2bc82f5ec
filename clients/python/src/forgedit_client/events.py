"""Typed events of a job's stream, and the resources the service returns.

The wire carries ``forgedit.v1.Event`` with a ``oneof kind``; callers get one small frozen
dataclass per kind instead, so ``match``/``isinstance`` works and no protobuf type leaks into
user code. Every event carries ``job_id`` and ``sequence`` (1, 2, 3, … within a job), which
is what re-attaching uses to skip events already seen.

Order of an Edit job (ARCHITECTURE.md): ``Accepted`` → ``Queued``* → ``Preview``
(training-free) → ``Captioned`` → ``TrainingProgress``* → ``Registered`` →
``SamplingProgress``*/``Preview`` (x0)*/``ImageReady``* → ``Completed``, with ``Heartbeat`` in
silences. A Sample job has no captioning, training or registration, and no training-free
preview. A ``Preview`` is never a result: only ``ImageReady`` is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from forgedit_client._proto import forgedit_pb2 as pb
from forgedit_client.files import write_atomic

# Enum values by the names the SDK and CLI accept (the proto's names, lower case, no prefix).
TRAINING_MODES: dict[str, int] = {
    "joint": pb.TRAINING_MODE_JOINT,
    "two_stage": pb.TRAINING_MODE_TWO_STAGE,
    "dreambooth": pb.TRAINING_MODE_DREAMBOOTH,
}
INTERPOLATIONS: dict[str, int] = {"vs": pb.INTERPOLATION_VS, "vp": pb.INTERPOLATION_VP}
PRECISIONS: dict[str, int] = {"faithful": pb.PRECISION_FAITHFUL, "fast": pb.PRECISION_FAST}
DELTA_FORMATS: dict[str, int] = {
    "fp32": pb.DELTA_FORMAT_FP32,
    "fp16": pb.DELTA_FORMAT_FP16,
    "int8": pb.DELTA_FORMAT_INT8,
}
IMAGE_FORMATS: dict[str, int] = {
    "png": pb.IMAGE_FORMAT_PNG,
    "webp": pb.IMAGE_FORMAT_WEBP,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
}
# File name suffix per image format.
SUFFIXES: dict[str, str] = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
PREVIEW_KINDS: dict[str, int] = {
    "training_free": pb.PREVIEW_KIND_TRAINING_FREE,
    "x0": pb.PREVIEW_KIND_X0_ESTIMATE,
}
JOB_STATES: dict[int, str] = {
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_CANCELLING: "cancelling",
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
}
JOB_KINDS: dict[int, str] = {pb.JOB_KIND_EDIT: "edit", pb.JOB_KIND_SAMPLE: "sample"}
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


def _name_of(value: int, names: dict[str, int]) -> str:
    """The SDK name of an enum value; ``""`` for UNSPECIFIED or a value newer than this SDK."""
    for name, v in names.items():
        if v == value:
            return name
    return ""


def _time(ts: Any) -> datetime | None:
    """A ``google.protobuf.Timestamp`` as an aware UTC datetime; None when unset."""
    if not ts.seconds and not ts.nanos:
        return None
    # timezone.utc, not datetime.UTC: the SDK supports Python 3.10.
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)  # noqa: UP017


# ------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Fields every event has."""

    job_id: str
    sequence: int


@dataclass(frozen=True)
class Accepted(Event):
    """The job exists; always the first event. ``queue_position`` 0 means it starts now."""

    queue_position: int
    images_total: int
    estimated_seconds: float


@dataclass(frozen=True)
class Queued(Event):
    """The job moved up in the queue (1-based position)."""

    position: int


@dataclass(frozen=True)
class Captioned(Event):
    """The source prompt fine-tuning uses; ``from_caption`` False when the caller gave it."""

    source_prompt: str
    from_caption: bool


@dataclass(frozen=True)
class TrainingProgress(Event):
    """After each optimiser update (1-based ``update`` of ``total``, counted across stages)."""

    update: int
    total: int
    loss: float
    eta_seconds: float
    stage: str


@dataclass(frozen=True)
class Registered(Event):
    """The edit model is stored under ``edit_model_id`` (reusable by ``sample``)."""

    edit_model_id: str
    version: int
    deduplicated: bool
    spooled: bool


@dataclass(frozen=True)
class SamplingProgress(Event):
    """After each denoising step of the batch running now."""

    images_done: int
    images_total: int
    step: int
    steps: int
    forget: str


@dataclass(frozen=True)
class ImageParams:
    """Everything needed to reproduce one image. ``gamma`` is γ for vs and β for vp; ``alpha``
    is vp's α (0 for vs)."""

    prompt: str
    forget: str
    interpolation: str
    gamma: float
    alpha: float
    seed: int
    guidance: float
    steps: int
    forget_degree: float

    def label(self) -> str:
        """A short human label, e.g. ``encoderkv γ=0.6 seed=1`` (vp adds ``α=0.9``)."""
        parts = [self.forget, f"{'β' if self.interpolation == 'vp' else 'γ'}={self.gamma:g}"]
        if self.interpolation == "vp":
            parts.append(f"α={self.alpha:g}")
        parts.append(f"seed={self.seed}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "forget": self.forget,
            "interpolation": self.interpolation,
            "gamma": self.gamma,
            "alpha": self.alpha,
            "seed": self.seed,
            "guidance": self.guidance,
            "steps": self.steps,
            "forget_degree": self.forget_degree,
        }


@dataclass(frozen=True)
class ImageReady(Event):
    """One finished image: its encoded bytes (``format``: png, webp or jpeg, as the request's
    ``image_format`` asked) and the parameters that made it."""

    index: int
    data: bytes = field(repr=False)
    params: ImageParams
    width: int
    height: int
    format: str = "png"

    @property
    def png(self) -> bytes:
        """The PNG bytes (the field's name before other formats existed); raises
        ``ValueError`` for a WebP or JPEG image: read ``data`` instead."""
        if self.format != "png":
            raise ValueError(f"this image is {self.format}, not png: read .data")
        return self.data

    @property
    def suffix(self) -> str:
        """The file name suffix of its format: .png, .webp or .jpg."""
        return SUFFIXES.get(self.format, ".bin")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image atomically (temp file, fsync, rename); returns the path."""
        return write_atomic(Path(path), self.data)


@dataclass(frozen=True)
class Preview(Event):
    """A preview, NEVER a result. ``kind``: ``training_free`` (an Edit's first look by the
    base model, before the fine-tune) or ``x0`` (image ``index``'s x0 estimate at denoising
    ``step`` of ``steps``, at 1/8 of its size). Encoded like the job's images (``format``)."""

    kind: str
    index: int
    data: bytes = field(repr=False)
    format: str
    width: int
    height: int
    step: int
    steps: int

    @property
    def suffix(self) -> str:
        return SUFFIXES.get(self.format, ".bin")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the preview atomically; returns the path."""
        return write_atomic(Path(path), self.data)


@dataclass(frozen=True)
class Heartbeat(Event):
    """The job is alive during a silence; ``state`` e.g. ``queued`` or ``running``."""

    state: str
    queue_position: int


@dataclass(frozen=True)
class PhaseTimings:
    """Wall-clock seconds per phase; 0 for phases the job does not have. ``sampling_backend``
    names the UNet backend that sampled ("torch", "onnxruntime", "tensorrt"; "" from servers
    that do not say)."""

    queue_wait_seconds: float = 0.0
    captioning_seconds: float = 0.0
    training_seconds: float = 0.0
    registration_seconds: float = 0.0
    sampling_seconds: float = 0.0
    total_seconds: float = 0.0
    sampling_backend: str = ""
    preview_seconds: float = 0.0  # the training-free preview (Edit)

    def to_dict(self) -> dict[str, float | str]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Completed(Event):
    """The job finished successfully; always the last event of a successful job."""

    timings: PhaseTimings
    edit_model_id: str
    images: int
    train_seed: int


@dataclass(frozen=True)
class UnknownEvent(Event):
    """An event kind newer than this SDK (the server was upgraded first); safe to ignore."""

    kind: str


def event_from_proto(message: Any) -> Event:
    """Map one ``forgedit.v1.Event`` to its dataclass. Never raises on well-formed messages;
    an unset or unknown ``kind`` becomes ``UnknownEvent``."""
    kind = message.WhichOneof("kind")
    common = {"job_id": message.job_id, "sequence": message.sequence}
    if kind == "accepted":
        a = message.accepted
        return Accepted(
            **common,
            queue_position=a.queue_position,
            images_total=a.images_total,
            estimated_seconds=a.estimated_seconds,
        )
    if kind == "queued":
        return Queued(**common, position=message.queued.position)
    if kind == "captioned":
        c = message.captioned
        return Captioned(**common, source_prompt=c.source_prompt, from_caption=c.from_caption)
    if kind == "training":
        t = message.training
        return TrainingProgress(
            **common,
            update=t.update,
            total=t.total,
            loss=t.loss,
            eta_seconds=t.eta_seconds,
            stage=t.stage,
        )
    if kind == "registered":
        r = message.registered
        return Registered(
            **common,
            edit_model_id=r.edit_model_id,
            version=r.version,
            deduplicated=r.deduplicated,
            spooled=r.spooled,
        )
    if kind == "sampling":
        s = message.sampling
        return SamplingProgress(
            **common,
            images_done=s.images_done,
            images_total=s.images_total,
            step=s.step,
            steps=s.steps,
            forget=s.forget,
        )
    if kind == "image":
        i = message.image
        encoded = i.WhichOneof("encoded")
        return ImageReady(
            **common,
            index=i.index,
            data=i.data if encoded == "data" else i.png,
            params=image_params_from_proto(i.params),
            width=i.width,
            height=i.height,
            format=_name_of(i.format, IMAGE_FORMATS) or "png",  # unset: an older server's PNG
        )
    if kind == "preview":
        v = message.preview
        return Preview(
            **common,
            kind=_name_of(v.kind, PREVIEW_KINDS),
            index=v.index,
            data=v.data,
            format=_name_of(v.format, IMAGE_FORMATS) or "png",
            width=v.width,
            height=v.height,
            step=v.step,
            steps=v.steps,
        )
    if kind == "heartbeat":
        h = message.heartbeat
        return Heartbeat(
            **common, state=JOB_STATES.get(h.state, ""), queue_position=h.queue_position
        )
    if kind == "completed":
        c = message.completed
        return Completed(
            **common,
            timings=timings_from_proto(c.timings),
            edit_model_id=c.edit_model_id,
            images=c.images,
            train_seed=c.train_seed,
        )
    return UnknownEvent(**common, kind=kind or "")


def image_params_from_proto(p: Any) -> ImageParams:
    return ImageParams(
        prompt=p.prompt,
        forget=p.forget,
        interpolation=_name_of(p.interpolation, INTERPOLATIONS),
        gamma=p.gamma,
        alpha=p.alpha,
        seed=p.seed,
        guidance=p.guidance,
        steps=p.steps,
        forget_degree=p.forget_degree,
    )


def timings_from_proto(t: Any) -> PhaseTimings:
    return PhaseTimings(
        queue_wait_seconds=t.queue_wait_seconds,
        captioning_seconds=t.captioning_seconds,
        training_seconds=t.training_seconds,
        registration_seconds=t.registration_seconds,
        sampling_seconds=t.sampling_seconds,
        total_seconds=t.total_seconds,
        sampling_backend=t.sampling_backend,
        preview_seconds=t.preview_seconds,
    )


# ---------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class EditModelInfo:
    """A stored, per-image edit model (metadata only; the weights stay on the server)."""

    edit_model_id: str
    version: int
    base_model: str
    base_fingerprint: str
    image_sha256: str
    source_prompt: str
    training_mode: str
    width: int
    height: int
    train_seed: int
    create_time: datetime | None
    size_bytes: int
    training_config_json: str = field(repr=False)
    principal: str = ""  # the token name that made it (the server shows it only to it / admins)
    delta_format: str = ""  # fp32 | fp16 | int8; "" from a server that does not report it
    delta_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["create_time"] = self.create_time.isoformat() if self.create_time else None
        return d


def edit_model_from_proto(m: Any) -> EditModelInfo:
    return EditModelInfo(
        edit_model_id=m.edit_model_id,
        version=m.version,
        base_model=m.base_model,
        base_fingerprint=m.base_fingerprint,
        image_sha256=m.image_sha256,
        source_prompt=m.source_prompt,
        training_mode=_name_of(m.training_mode, TRAINING_MODES),
        width=m.width,
        height=m.height,
        train_seed=m.train_seed,
        create_time=_time(m.create_time),
        size_bytes=m.size_bytes,
        training_config_json=m.training_config_json,
        principal=m.principal,
        delta_format=_name_of(m.delta_format, DELTA_FORMATS),
        delta_bytes=m.delta_bytes,
    )


@dataclass(frozen=True)
class JobInfo:
    """The state of a running or recently finished job (``state`` e.g. ``running``)."""

    job_id: str
    request_id: str
    kind: str
    state: str
    queue_position: int
    edit_model_id: str
    last_sequence: int
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    error_code: int
    error_message: str
    principal: str = ""  # the token name that submitted it

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("create_time", "start_time", "end_time"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


def job_from_proto(j: Any) -> JobInfo:
    return JobInfo(
        job_id=j.job_id,
        request_id=j.request_id,
        kind=JOB_KINDS.get(j.kind, ""),
        state=JOB_STATES.get(j.state, ""),
        queue_position=j.queue_position,
        edit_model_id=j.edit_model_id,
        last_sequence=j.last_sequence,
        create_time=_time(j.create_time),
        start_time=_time(j.start_time),
        end_time=_time(j.end_time),
        error_code=j.error_code,
        error_message=j.error_message,
        principal=j.principal,
    )
