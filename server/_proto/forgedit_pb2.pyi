import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_MODE_UNSPECIFIED: _ClassVar[TrainingMode]
    TRAINING_MODE_JOINT: _ClassVar[TrainingMode]
    TRAINING_MODE_TWO_STAGE: _ClassVar[TrainingMode]
    TRAINING_MODE_DREAMBOOTH: _ClassVar[TrainingMode]

class Interpolation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERPOLATION_UNSPECIFIED: _ClassVar[Interpolation]
    INTERPOLATION_VS: _ClassVar[Interpolation]
    INTERPOLATION_VP: _ClassVar[Interpolation]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FAITHFUL: _ClassVar[Precision]
    PRECISION_FAST: _ClassVar[Precision]

class DeltaFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELTA_FORMAT_UNSPECIFIED: _ClassVar[DeltaFormat]
    DELTA_FORMAT_FP32: _ClassVar[DeltaFormat]
    DELTA_FORMAT_FP16: _ClassVar[DeltaFormat]
    DELTA_FORMAT_INT8: _ClassVar[DeltaFormat]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_EDIT: _ClassVar[JobKind]
    JOB_KIND_SAMPLE: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_CANCELLING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class PreviewKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREVIEW_KIND_UNSPECIFIED: _ClassVar[PreviewKind]
    PREVIEW_KIND_TRAINING_FREE: _ClassVar[PreviewKind]
    PREVIEW_KIND_X0_ESTIMATE: _ClassVar[PreviewKind]
TRAINING_MODE_UNSPECIFIED: TrainingMode
TRAINING_MODE_JOINT: TrainingMode
TRAINING_MODE_TWO_STAGE: TrainingMode
TRAINING_MODE_DREAMBOOTH: TrainingMode
INTERPOLATION_UNSPECIFIED: Interpolation
INTERPOLATION_VS: Interpolation
INTERPOLATION_VP: Interpolation
PRECISION_UNSPECIFIED: Precision
PRECISION_FAITHFUL: Precision
PRECISION_FAST: Precision
DELTA_FORMAT_UNSPECIFIED: DeltaFormat
DELTA_FORMAT_FP32: DeltaFormat
DELTA_FORMAT_FP16: DeltaFormat
DELTA_FORMAT_INT8: DeltaFormat
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_EDIT: JobKind
JOB_KIND_SAMPLE: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_CANCELLING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
PREVIEW_KIND_UNSPECIFIED: PreviewKind
PREVIEW_KIND_TRAINING_FREE: PreviewKind
PREVIEW_KIND_X0_ESTIMATE: PreviewKind

class TrainingOptions(_message.Message):
    __slots__ = ("mode", "seed", "vae_seed", "width", "height", "precision", "updates", "batch_size", "stage2_updates", "stage2_batch_size", "fresh_seed", "delta_format")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VAE_SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STAGE2_UPDATES_FIELD_NUMBER: _ClassVar[int]
    STAGE2_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FRESH_SEED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FORMAT_FIELD_NUMBER: _ClassVar[int]
    mode: TrainingMode
    seed: int
    vae_seed: int
    width: int
    height: int
    precision: Precision
    updates: int
    batch_size: int
    stage2_updates: int
    stage2_batch_size: int
    fresh_seed: bool
    delta_format: DeltaFormat
    def __init__(self, mode: _Optional[_Union[TrainingMode, str]] = ..., seed: _Optional[int] = ..., vae_seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., updates: _Optional[int] = ..., batch_size: _Optional[int] = ..., stage2_updates: _Optional[int] = ..., stage2_batch_size: _Optional[int] = ..., fresh_seed: _Optional[bool] = ..., delta_format: _Optional[_Union[DeltaFormat, str]] = ...) -> None: ...

class SweepOptions(_message.Message):
    __slots__ = ("interpolation", "gammas", "alphas", "forget_strategies", "forget_degree", "seeds", "seed_count", "steps", "guidance")
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    GAMMAS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    FORGET_STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    FORGET_DEGREE_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SEED_COUNT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    interpolation: Interpolation
    gammas: _containers.RepeatedScalarFieldContainer[float]
    alphas: _containers.RepeatedScalarFieldContainer[float]
    forget_strategies: _containers.RepeatedScalarFieldContainer[str]
    forget_degree: float
    seeds: _containers.RepeatedScalarFieldContainer[int]
    seed_count: int
    steps: int
    guidance: float
    def __init__(self, interpolation: _Optional[_Union[Interpolation, str]] = ..., gammas: _Optional[_Iterable[float]] = ..., alphas: _Optional[_Iterable[float]] = ..., forget_strategies: _Optional[_Iterable[str]] = ..., forget_degree: _Optional[float] = ..., seeds: _Optional[_Iterable[int]] = ..., seed_count: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("format", "quality")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    quality: int
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class PreviewOptions(_message.Message):
    __slots__ = ("training_free", "x0_every")
    TRAINING_FREE_FIELD_NUMBER: _ClassVar[int]
    X0_EVERY_FIELD_NUMBER: _ClassVar[int]
    training_free: bool
    x0_every: int
    def __init__(self, training_free: _Optional[bool] = ..., x0_every: _Optional[int] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("request_id", "image", "target_prompts", "source_prompt", "base_model", "training", "sweep", "detach", "output", "preview")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: bytes
    target_prompts: _containers.RepeatedScalarFieldContainer[str]
    source_prompt: str
    base_model: str
    training: TrainingOptions
    sweep: SweepOptions
    detach: bool
    output: OutputOptions
    preview: PreviewOptions
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[bytes] = ..., target_prompts: _Optional[_Iterable[str]] = ..., source_prompt: _Optional[str] = ..., base_model: _Optional[str] = ..., training: _Optional[_Union[TrainingOptions, _Mapping]] = ..., sweep: _Optional[_Union[SweepOptions, _Mapping]] = ..., detach: _Optional[bool] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., preview: _Optional[_Union[PreviewOptions, _Mapping]] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("request_id", "edit_model_id", "target_prompts", "sweep", "detach", "output", "preview")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    edit_model_id: str
    target_prompts: _containers.RepeatedScalarFieldContainer[str]
    sweep: SweepOptions
    detach: bool
    output: OutputOptions
    preview: PreviewOptions
    def __init__(self, request_id: _Optional[str] = ..., edit_model_id: _Optional[str] = ..., target_prompts: _Optional[_Iterable[str]] = ..., sweep: _Optional[_Union[SweepOptions, _Mapping]] = ..., detach: _Optional[bool] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., preview: _Optional[_Union[PreviewOptions, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class GetEditModelRequest(_message.Message):
    __slots__ = ("edit_model_id",)
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    edit_model_id: str
    def __init__(self, edit_model_id: _Optional[str] = ...) -> None: ...

class GetEditModelResponse(_message.Message):
    __slots__ = ("edit_model",)
    EDIT_MODEL_FIELD_NUMBER: _ClassVar[int]
    edit_model: EditModel
    def __init__(self, edit_model: _Optional[_Union[EditModel, _Mapping]] = ...) -> None: ...

class ListEditModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "base_model", "image_sha256")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    base_model: str
    image_sha256: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., base_model: _Optional[str] = ..., image_sha256: _Optional[str] = ...) -> None: ...

class ListEditModelsResponse(_message.Message):
    __slots__ = ("edit_models", "next_page_token")
    EDIT_MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edit_models: _containers.RepeatedCompositeFieldContainer[EditModel]
    next_page_token: str
    def __init__(self, edit_models: _Optional[_Iterable[_Union[EditModel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteEditModelRequest(_message.Message):
    __slots__ = ("edit_model_id",)
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    edit_model_id: str
    def __init__(self, edit_model_id: _Optional[str] = ...) -> None: ...

class DeleteEditModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "request_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class EditModel(_message.Message):
    __slots__ = ("edit_model_id", "version", "base_model", "base_fingerprint", "image_sha256", "source_prompt", "training_mode", "width", "height", "train_seed", "create_time", "size_bytes", "training_config_json", "principal", "delta_format", "delta_bytes")
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_MODE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SEED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    DELTA_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    edit_model_id: str
    version: int
    base_model: str
    base_fingerprint: str
    image_sha256: str
    source_prompt: str
    training_mode: TrainingMode
    width: int
    height: int
    train_seed: int
    create_time: _timestamp_pb2.Timestamp
    size_bytes: int
    training_config_json: str
    principal: str
    delta_format: DeltaFormat
    delta_bytes: int
    def __init__(self, edit_model_id: _Optional[str] = ..., version: _Optional[int] = ..., base_model: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., image_sha256: _Optional[str] = ..., source_prompt: _Optional[str] = ..., training_mode: _Optional[_Union[TrainingMode, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., train_seed: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., training_config_json: _Optional[str] = ..., principal: _Optional[str] = ..., delta_format: _Optional[_Union[DeltaFormat, str]] = ..., delta_bytes: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "request_id", "kind", "state", "queue_position", "edit_model_id", "last_sequence", "create_time", "start_time", "end_time", "error_code", "error_message", "principal")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    kind: JobKind
    state: JobState
    queue_position: int
    edit_model_id: str
    last_sequence: int
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    error_code: int
    error_message: str
    principal: str
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ..., edit_model_id: _Optional[str] = ..., last_sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("job_id", "sequence", "time", "accepted", "queued", "captioned", "training", "registered", "sampling", "image", "heartbeat", "completed", "preview")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    CAPTIONED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    accepted: AcceptedEvent
    queued: QueuedEvent
    captioned: CaptionedEvent
    training: TrainingEvent
    registered: RegisteredEvent
    sampling: SamplingEvent
    image: ImageEvent
    heartbeat: HeartbeatEvent
    completed: CompletedEvent
    preview: PreviewEvent
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accepted: _Optional[_Union[AcceptedEvent, _Mapping]] = ..., queued: _Optional[_Union[QueuedEvent, _Mapping]] = ..., captioned: _Optional[_Union[CaptionedEvent, _Mapping]] = ..., training: _Optional[_Union[TrainingEvent, _Mapping]] = ..., registered: _Optional[_Union[RegisteredEvent, _Mapping]] = ..., sampling: _Optional[_Union[SamplingEvent, _Mapping]] = ..., image: _Optional[_Union[ImageEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatEvent, _Mapping]] = ..., completed: _Optional[_Union[CompletedEvent, _Mapping]] = ..., preview: _Optional[_Union[PreviewEvent, _Mapping]] = ...) -> None: ...

class AcceptedEvent(_message.Message):
    __slots__ = ("job_id", "queue_position", "images_total", "estimated_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    queue_position: int
    images_total: int
    estimated_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., queue_position: _Optional[int] = ..., images_total: _Optional[int] = ..., estimated_seconds: _Optional[float] = ...) -> None: ...

class QueuedEvent(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class CaptionedEvent(_message.Message):
    __slots__ = ("source_prompt", "from_caption")
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    FROM_CAPTION_FIELD_NUMBER: _ClassVar[int]
    source_prompt: str
    from_caption: bool
    def __init__(self, source_prompt: _Optional[str] = ..., from_caption: _Optional[bool] = ...) -> None: ...

class TrainingEvent(_message.Message):
    __slots__ = ("update", "total", "loss", "eta_seconds", "stage")
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    update: int
    total: int
    loss: float
    eta_seconds: float
    stage: str
    def __init__(self, update: _Optional[int] = ..., total: _Optional[int] = ..., loss: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., stage: _Optional[str] = ...) -> None: ...

class RegisteredEvent(_message.Message):
    __slots__ = ("edit_model_id", "version", "deduplicated", "spooled")
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    SPOOLED_FIELD_NUMBER: _ClassVar[int]
    edit_model_id: str
    version: int
    deduplicated: bool
    spooled: bool
    def __init__(self, edit_model_id: _Optional[str] = ..., version: _Optional[int] = ..., deduplicated: _Optional[bool] = ..., spooled: _Optional[bool] = ...) -> None: ...

class SamplingEvent(_message.Message):
    __slots__ = ("images_done", "images_total", "step", "steps", "forget")
    IMAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    images_done: int
    images_total: int
    step: int
    steps: int
    forget: str
    def __init__(self, images_done: _Optional[int] = ..., images_total: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., forget: _Optional[str] = ...) -> None: ...

class ImageParams(_message.Message):
    __slots__ = ("prompt", "forget", "interpolation", "gamma", "alpha", "seed", "guidance", "steps", "forget_degree")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FORGET_DEGREE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    forget: str
    interpolation: Interpolation
    gamma: float
    alpha: float
    seed: int
    guidance: float
    steps: int
    forget_degree: float
    def __init__(self, prompt: _Optional[str] = ..., forget: _Optional[str] = ..., interpolation: _Optional[_Union[Interpolation, str]] = ..., gamma: _Optional[float] = ..., alpha: _Optional[float] = ..., seed: _Optional[int] = ..., guidance: _Optional[float] = ..., steps: _Optional[int] = ..., forget_degree: _Optional[float] = ...) -> None: ...

class ImageEvent(_message.Message):
    __slots__ = ("index", "png", "data", "params", "width", "height", "format")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    index: int
    png: bytes
    data: bytes
    params: ImageParams
    width: int
    height: int
    format: ImageFormat
    def __init__(self, index: _Optional[int] = ..., png: _Optional[bytes] = ..., data: _Optional[bytes] = ..., params: _Optional[_Union[ImageParams, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class PreviewEvent(_message.Message):
    __slots__ = ("kind", "index", "data", "format", "width", "height", "step", "steps")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    kind: PreviewKind
    index: int
    data: bytes
    format: ImageFormat
    width: int
    height: int
    step: int
    steps: int
    def __init__(self, kind: _Optional[_Union[PreviewKind, str]] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class HeartbeatEvent(_message.Message):
    __slots__ = ("state", "queue_position")
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    queue_position: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ...) -> None: ...

class PhaseTimings(_message.Message):
    __slots__ = ("queue_wait_seconds", "captioning_seconds", "training_seconds", "registration_seconds", "sampling_seconds", "total_seconds", "sampling_backend", "preview_seconds")
    QUEUE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAPTIONING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_wait_seconds: float
    captioning_seconds: float
    training_seconds: float
    registration_seconds: float
    sampling_seconds: float
    total_seconds: float
    sampling_backend: str
    preview_seconds: float
    def __init__(self, queue_wait_seconds: _Optional[float] = ..., captioning_seconds: _Optional[float] = ..., training_seconds: _Optional[float] = ..., registration_seconds: _Optional[float] = ..., sampling_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., sampling_backend: _Optional[str] = ..., preview_seconds: _Optional[float] = ...) -> None: ...

class CompletedEvent(_message.Message):
    __slots__ = ("timings", "edit_model_id", "images", "train_seed")
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EDIT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SEED_FIELD_NUMBER: _ClassVar[int]
    timings: PhaseTimings
    edit_model_id: str
    images: int
    train_seed: int
    def __init__(self, timings: _Optional[_Union[PhaseTimings, _Mapping]] = ..., edit_model_id: _Optional[str] = ..., images: _Optional[int] = ..., train_seed: _Optional[int] = ...) -> None: ...
