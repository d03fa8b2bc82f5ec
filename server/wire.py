"""Every conversion between the wire (``forgedit.v1`` protobuf) and the domain, in one place.

Requests come in as protobuf enums and leave the edge as the engine's plain names
(``"joint"``, ``"vp"``, ``"int8"``); results go out the other way. The tables below are the
only place that pairs the two, so a new enum value is added once. Decoding tables map an
UNSPECIFIED value to the engine's default where the request may leave it unset; a value that
is not in a table is the caller's to refuse (``server.validation`` names the field).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import timestamp_pb2

from server._proto import forgedit_pb2 as pb

if TYPE_CHECKING:
    from forgedit.config import ImageSpec
    from server.jobs import Job, Timings

E = TypeVar("E")  # one protobuf enum type

# -- wire -> domain (request decoding) ------------------------------------------------------

TRAINING_MODES = {
    pb.TRAINING_MODE_UNSPECIFIED: "joint",
    pb.TRAINING_MODE_JOINT: "joint",
    pb.TRAINING_MODE_TWO_STAGE: "two_stage",
    pb.TRAINING_MODE_DREAMBOOTH: "dreambooth",
}
INTERPOLATIONS = {
    pb.INTERPOLATION_UNSPECIFIED: "vs",
    pb.INTERPOLATION_VS: "vs",
    pb.INTERPOLATION_VP: "vp",
}
# UNSPECIFIED is absent on purpose: it means "the server's default", decided by the caller.
PRECISIONS = {pb.PRECISION_FAITHFUL: "faithful", pb.PRECISION_FAST: "fast"}
DELTA_FORMATS = {
    pb.DELTA_FORMAT_FP32: "fp32",
    pb.DELTA_FORMAT_FP16: "fp16",
    pb.DELTA_FORMAT_INT8: "int8",
}

# -- domain -> wire (responses) -------------------------------------------------------------


def _inverse(table: dict[E, str]) -> dict[str, E]:
    """The encoding table of a decoding one; a name decoded from UNSPECIFIED and from its own
    value encodes as its own value (the last one in the table wins)."""
    return {name: number for number, name in table.items()}


TRAINING_MODE_NUMBERS = _inverse(TRAINING_MODES)
INTERPOLATION_NUMBERS = _inverse(INTERPOLATIONS)
DELTA_FORMAT_NUMBERS = _inverse(DELTA_FORMATS)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Unix time in seconds as a protobuf ``Timestamp`` (nanosecond resolution)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def now() -> timestamp_pb2.Timestamp:
    return timestamp(time.time())


def edit_model_to_proto(info: Any) -> pb.EditModel:
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
        principal=getattr(info, "principal", ""),
        delta_format=DELTA_FORMAT_NUMBERS.get(info.delta_format, pb.DELTA_FORMAT_UNSPECIFIED),
        delta_bytes=int(info.delta_bytes),
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


def phase_timings(timings: Timings) -> pb.PhaseTimings:
    """A job's per-phase wall-clock seconds as the ``CompletedEvent``'s ``PhaseTimings``."""
    return pb.PhaseTimings(
        queue_wait_seconds=timings.queue_wait,
        captioning_seconds=timings.captioning,
        training_seconds=timings.training,
        registration_seconds=timings.registration,
        sampling_seconds=timings.sampling,
        sampling_backend=timings.sampling_backend,
        total_seconds=timings.total,
    )


def job_to_proto(job: Job) -> pb.Job:
    """A job's state as the wire's ``Job`` (call ``Job.to_proto``, which holds its lock)."""
    message = pb.Job(
        job_id=job.job_id,
        request_id=job.request_id,
        kind=job.kind,
        state=job.state.value,
        queue_position=job.queue_position,
        edit_model_id=job.edit_model_id,
        last_sequence=job.last_sequence,
        create_time=timestamp(job.created_at),
        principal=job.principal,
    )
    if job.started_at is not None:
        message.start_time.CopyFrom(timestamp(job.started_at))
    if job.ended_at is not None:
        message.end_time.CopyFrom(timestamp(job.ended_at))
    if job.error is not None:
        message.error_code = job.error.status.code
        message.error_message = job.error.status.message
    return message
