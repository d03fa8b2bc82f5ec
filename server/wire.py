"""Every conversion between the wire (``forgedit.v1`` protobuf) and the domain, in one place.

In: ``edit_call`` and ``sample_call`` decode a request message once, into the engine's typed
options (``forgedit.options``, named as the proto names its fields) and the call's own fields
(``server.plans``). Enums become the engine's names (``"joint"``, ``"vp"``, ``"int8"``), an
unset optional field becomes ``None``, UNSPECIFIED means unset; an enum number that is not in a
table is refused here, naming the field and the accepted values. After this, nothing reads the
request message but ``payload_digest``.

Out: every message the server sends that is not a bare RPC envelope: each event of a job's
stream (``event`` wraps the kinds: ``accepted``, ``queued``, ``preview``, ``captioned``,
``training``, ``registered``, ``sampling``, ``image``, ``completed``; and ``heartbeat``) and
the resources
(``job_message``, ``edit_model_to_proto``). The runner, the scheduler and the job call these
and build no protobuf themselves. The tables below are the only place that pairs an enum with
the engine's name, so a new enum value is added once.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from forgedit.config import (
    DeltaFormat,
    ImageFormat,
    Interpolation,
    OutputConfig,
    Precision,
    TrainingMode,
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
from forgedit.preview import PreviewKind
from server._proto import forgedit_pb2 as pb
from server.plans import EditCall, SampleCall

if TYPE_CHECKING:
    from forgedit.config import ImageSpec
    from forgedit.engine import EditedImage
    from forgedit.events import PhaseTimer, SamplingProgress, TrainingProgress
    from forgedit.preview import Preview
    from registry import EditModelInfo
    from server.errors import MappedError

E = TypeVar("E")  # one protobuf enum type
N = TypeVar("N", bound=str)  # the engine's names for one enum

# -- wire -> domain (request decoding) ------------------------------------------------------

TRAINING_MODES: dict[pb.TrainingMode, TrainingMode] = {
    pb.TRAINING_MODE_JOINT: "joint",
    pb.TRAINING_MODE_TWO_STAGE: "two_stage",
    pb.TRAINING_MODE_DREAMBOOTH: "dreambooth",
}
INTERPOLATIONS: dict[pb.Interpolation, Interpolation] = {
    pb.INTERPOLATION_VS: "vs",
    pb.INTERPOLATION_VP: "vp",
}
PRECISIONS: dict[pb.Precision, Precision] = {
    pb.PRECISION_FAITHFUL: "faithful",
    pb.PRECISION_FAST: "fast",
}
DELTA_FORMATS: dict[pb.DeltaFormat, DeltaFormat] = {
    pb.DELTA_FORMAT_FP32: "fp32",
    pb.DELTA_FORMAT_FP16: "fp16",
    pb.DELTA_FORMAT_INT8: "int8",
}
IMAGE_FORMATS: dict[pb.ImageFormat, ImageFormat] = {
    pb.IMAGE_FORMAT_PNG: "png",
    pb.IMAGE_FORMAT_WEBP: "webp",
    pb.IMAGE_FORMAT_JPEG: "jpeg",
}
PREVIEW_KINDS: dict[pb.PreviewKind, PreviewKind] = {
    pb.PREVIEW_KIND_TRAINING_FREE: "training_free",
    pb.PREVIEW_KIND_X0_ESTIMATE: "x0",
}


def edit_call(request: pb.EditRequest) -> EditCall:
    """An ``EditRequest`` as the call it asks for."""
    return EditCall(
        request_id=request.request_id,
        detach=request.detach,
        base_model=request.base_model,
        image=bytes(request.image),
        options=EditOptions(
            target_prompts=tuple(request.target_prompts),
            source_prompt=request.source_prompt if request.HasField("source_prompt") else None,
            training=training_options(request.training),
            sweep=sweep_options(request.sweep),
            output=output_options(request.output),
            preview=preview_options(request.preview),
        ),
    )


def sample_call(request: pb.SampleRequest) -> SampleCall:
    """A ``SampleRequest`` as the call it asks for."""
    return SampleCall(
        request_id=request.request_id,
        detach=request.detach,
        edit_model_id=request.edit_model_id,
        options=SampleOptions(
            target_prompts=tuple(request.target_prompts),
            sweep=sweep_options(request.sweep),
            output=output_options(request.output),
            preview=preview_options(request.preview),
        ),
    )


def training_options(message: pb.TrainingOptions) -> TrainingOptions:
    def optional(name: str) -> int | None:
        return int(getattr(message, name)) if message.HasField(name) else None

    return TrainingOptions(
        mode=_decode(TRAINING_MODES, message.mode, "training.mode", pb.TrainingMode),
        seed=optional("seed"),
        vae_seed=optional("vae_seed"),
        width=optional("width"),
        height=optional("height"),
        precision=_decode(PRECISIONS, message.precision, "training.precision", pb.Precision),
        updates=optional("updates"),
        batch_size=optional("batch_size"),
        stage2_updates=optional("stage2_updates"),
        stage2_batch_size=optional("stage2_batch_size"),
        fresh_seed=message.fresh_seed,
        delta_format=_decode(
            DELTA_FORMATS, message.delta_format, "training.delta_format", pb.DeltaFormat
        ),
    )


def sweep_options(message: pb.SweepOptions) -> SweepOptions:
    return SweepOptions(
        interpolation=_decode(
            INTERPOLATIONS, message.interpolation, "sweep.interpolation", pb.Interpolation
        ),
        gammas=tuple(message.gammas),
        alphas=tuple(message.alphas),
        forget_strategies=tuple(message.forget_strategies),
        forget_degree=message.forget_degree if message.HasField("forget_degree") else None,
        seeds=tuple(message.seeds),
        seed_count=message.seed_count if message.HasField("seed_count") else None,
        steps=message.steps if message.HasField("steps") else None,
        guidance=message.guidance if message.HasField("guidance") else None,
    )


def output_options(message: pb.OutputOptions) -> OutputOptions:
    return OutputOptions(
        format=_decode(IMAGE_FORMATS, message.format, "output.format", pb.ImageFormat),
        quality=message.quality if message.HasField("quality") else None,
    )


def preview_options(message: pb.PreviewOptions) -> PreviewOptions:
    return PreviewOptions(
        training_free=message.training_free if message.HasField("training_free") else None,
        x0_every=message.x0_every if message.HasField("x0_every") else None,
    )


def _decode(table: Mapping[E, N], number: E, field: str, enum: EnumTypeWrapper) -> N | None:
    """The engine's name of an enum value; None for 0 (UNSPECIFIED: unset). A number outside
    the table is refused naming the accepted values, e.g. "unknown delta format 7; accepted:
    DELTA_FORMAT_FP32, DELTA_FORMAT_FP16, DELTA_FORMAT_INT8"."""
    if number == 0:
        return None
    name = table.get(number)
    if name is None:
        what = re.sub(r"(?<!^)(?=[A-Z])", " ", enum.DESCRIPTOR.name).lower()  # "delta format"
        raise InvalidInputError(
            f"unknown {what} {number}; accepted: " + ", ".join(map(enum.Name, table)),
            field=field,
        )
    return name


def payload_digest(kind: int, request: pb.EditRequest | pb.SampleRequest, principal: str) -> str:
    """Identity of a request for idempotency: everything but request_id and detach, and who
    sent it (another principal's request id is a conflict, never its job)."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    copy.ClearField("detach")
    blob = copy.SerializeToString(deterministic=True)
    who = principal.encode("utf-8") + b"\0"
    return hashlib.sha256(bytes([kind]) + who + blob).hexdigest()


# -- domain -> wire: the events of a job's stream -----------------------------------------------

# One of an ``Event``'s kinds (its oneof ``kind``), as the builders below return them.
EventKind = (
    pb.AcceptedEvent
    | pb.QueuedEvent
    | pb.CaptionedEvent
    | pb.TrainingEvent
    | pb.RegisteredEvent
    | pb.SamplingEvent
    | pb.ImageEvent
    | pb.PreviewEvent
    | pb.CompletedEvent
)
_KIND_FIELD = {
    field.message_type.full_name: field.name
    for field in pb.Event.DESCRIPTOR.oneofs_by_name["kind"].fields
}


def event(job_id: str, sequence: int, kind: EventKind) -> pb.Event:
    """The ``Event`` envelope of one kind: the job, its sequence number, the time now."""
    field = _KIND_FIELD[kind.DESCRIPTOR.full_name]
    return pb.Event(job_id=job_id, sequence=sequence, time=now(), **{field: kind})


def heartbeat(job_id: str, sequence: int, state: pb.JobState, queue_position: int) -> pb.Event:
    """A stream's heartbeat: not buffered, it carries the job's latest sequence number."""
    return pb.Event(
        job_id=job_id,
        sequence=sequence,
        time=now(),
        heartbeat=pb.HeartbeatEvent(state=state, queue_position=queue_position),
    )


def accepted(
    job_id: str, queue_position: int, images_total: int, estimated_s: float
) -> pb.AcceptedEvent:
    return pb.AcceptedEvent(
        job_id=job_id,
        queue_position=queue_position,
        images_total=images_total,
        estimated_seconds=estimated_s,
    )


def queued(position: int) -> pb.QueuedEvent:
    return pb.QueuedEvent(position=position)


def captioned(source_prompt: str, *, from_caption: bool) -> pb.CaptionedEvent:
    return pb.CaptionedEvent(source_prompt=source_prompt, from_caption=from_caption)


def training(progress: TrainingProgress) -> pb.TrainingEvent:
    return pb.TrainingEvent(
        update=progress.update,
        total=progress.total,
        loss=progress.loss,
        eta_seconds=progress.eta_s,
        stage=progress.stage,
    )


def registered(
    edit_model_id: str, version: int | None, *, deduplicated: bool, spooled: bool
) -> pb.RegisteredEvent:
    return pb.RegisteredEvent(
        edit_model_id=edit_model_id,
        version=version or 0,
        deduplicated=deduplicated,
        spooled=spooled,
    )


def sampling(progress: SamplingProgress) -> pb.SamplingEvent:
    return pb.SamplingEvent(
        images_done=progress.images_done,
        images_total=progress.images_total,
        step=progress.step,
        steps=progress.steps,
        forget=progress.forget,
    )


def image(edited: EditedImage, output: OutputConfig = OutputConfig()) -> pb.ImageEvent:
    """One finished image, encoded as ``output`` asks, and the parameters it was made with.
    PNG goes in ``png`` (the field every client knows), WebP and JPEG in ``data``."""
    message = pb.ImageEvent(
        index=edited.spec.index,
        width=edited.image.width,
        height=edited.image.height,
        params=image_params(edited.spec),
        format=IMAGE_FORMAT_NUMBERS[output.format],
    )
    if output.format == "png":
        message.png = edited.encoded(output)
    else:
        message.data = edited.encoded(output)
    return message


def preview(shown: Preview, data: bytes, output: OutputConfig) -> pb.PreviewEvent:
    """A preview (never a result), its image already encoded as ``output`` asks (the runner
    encodes it once, to count its bytes against the job's budget)."""
    return pb.PreviewEvent(
        kind=PREVIEW_KIND_NUMBERS[shown.kind],
        index=shown.index,
        data=data,
        format=IMAGE_FORMAT_NUMBERS[output.format],
        width=shown.image.width,
        height=shown.image.height,
        step=shown.step,
        steps=shown.steps,
    )


def completed(
    timings: PhaseTimer,
    *,
    sampling_backend: str,
    edit_model_id: str,
    images: int,
    train_seed: int = 0,
) -> pb.CompletedEvent:
    """The last event: the job's seconds per phase (``PhaseTimer`` names: queue_wait,
    preview, captioning, training, registration, sampling, total; 0 for a phase it did not
    have)."""
    return pb.CompletedEvent(
        timings=pb.PhaseTimings(
            queue_wait_seconds=timings.seconds("queue_wait"),
            captioning_seconds=timings.seconds("captioning"),
            training_seconds=timings.seconds("training"),
            registration_seconds=timings.seconds("registration"),
            sampling_seconds=timings.seconds("sampling"),
            sampling_backend=sampling_backend,
            total_seconds=timings.seconds("total"),
            preview_seconds=timings.seconds("preview"),
        ),
        edit_model_id=edit_model_id,
        images=images,
        train_seed=train_seed,
    )


def image_params(spec: ImageSpec) -> pb.ImageParams:
    """The parameters one sampled image was made with, as sent in its ``ImageEvent``."""
    return pb.ImageParams(
        prompt=spec.prompt,
        forget=spec.forget,
        interpolation=INTERPOLATION_NUMBERS[spec.interpolation],
        gamma=spec.gamma,
        alpha=spec.alpha,
        seed=spec.seed,
        guidance=spec.guidance,
        steps=spec.steps,
        forget_degree=spec.forget_degree,
    )


# -- domain -> wire: resources ------------------------------------------------------------------


def _inverse(table: Mapping[E, str]) -> dict[str, E]:
    """The encoding table of a decoding one."""
    return {name: number for number, name in table.items()}


TRAINING_MODE_NUMBERS = _inverse(TRAINING_MODES)
INTERPOLATION_NUMBERS = _inverse(INTERPOLATIONS)
DELTA_FORMAT_NUMBERS = _inverse(DELTA_FORMATS)
IMAGE_FORMAT_NUMBERS = _inverse(IMAGE_FORMATS)
PREVIEW_KIND_NUMBERS = _inverse(PREVIEW_KINDS)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Unix time in seconds as a protobuf ``Timestamp`` (nanosecond resolution)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def now() -> timestamp_pb2.Timestamp:
    return timestamp(time.time())


def edit_model_to_proto(info: EditModelInfo) -> pb.EditModel:
    """A registry ``EditModelInfo`` as the wire's ``EditModel``; a training mode or delta
    format this server does not know is sent as UNSPECIFIED rather than refused."""
    return pb.EditModel(
        edit_model_id=info.edit_model_id,
        version=info.version or 0,
        base_model=info.base_model_name,
        base_fingerprint=info.base_model_fingerprint,
        image_sha256=info.image_sha256,
        source_prompt=info.source_prompt,
        training_mode=TRAINING_MODE_NUMBERS.get(info.training_mode, pb.TRAINING_MODE_UNSPECIFIED),
        create_time=timestamp(float(info.created_at)),
        size_bytes=int(info.size_bytes),
        width=int(info.width),
        height=int(info.height),
        train_seed=int(info.train_seed),
        training_config_json=info.training_json,
        principal=info.principal,
        delta_format=DELTA_FORMAT_NUMBERS.get(info.delta_format, pb.DELTA_FORMAT_UNSPECIFIED),
        delta_bytes=int(info.delta_bytes),
    )


def job_message(
    *,
    job_id: str,
    request_id: str,
    kind: pb.JobKind,
    state: pb.JobState,
    queue_position: int,
    edit_model_id: str,
    last_sequence: int,
    principal: str,
    created_at: float,
    started_at: float | None,
    ended_at: float | None,
    error: MappedError | None,
) -> pb.Job:
    """A job's state as the wire's ``Job`` (``server.jobs.Job.to_proto`` passes one
    consistent snapshot, taken under the job's lock). Times are Unix seconds."""
    message = pb.Job(
        job_id=job_id,
        request_id=request_id,
        kind=kind,
        state=state,
        queue_position=queue_position,
        edit_model_id=edit_model_id,
        last_sequence=last_sequence,
        create_time=timestamp(created_at),
        principal=principal,
    )
    if started_at is not None:
        message.start_time.CopyFrom(timestamp(started_at))
    if ended_at is not None:
        message.end_time.CopyFrom(timestamp(ended_at))
    if error is not None:
        message.error_code = error.status.code
        message.error_message = error.status.message
    return message
