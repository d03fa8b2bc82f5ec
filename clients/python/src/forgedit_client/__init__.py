"""Python SDK of the Forgedit gRPC service (``forgedit-client``; no torch needed).

Sync: ``ForgeditClient``; asyncio: ``AsyncForgeditClient``. Both stream typed events
(``forgedit_client.events``) and assemble a ``JobResult``. Errors reported by the service are
``ForgeditRpcError`` (status code, message, field violations, retry hint). The command line is
``forgedit`` (``forgedit --help``).
"""

from forgedit_client.aio import AsyncForgeditClient
from forgedit_client.channel import TlsConfig
from forgedit_client.client import ForgeditClient, Timeouts
from forgedit_client.errors import (
    FieldViolation,
    ForgeditClientError,
    ForgeditRpcError,
    InvalidOptionError,
)
from forgedit_client.events import (
    Accepted,
    Captioned,
    Completed,
    EditModelInfo,
    Event,
    Heartbeat,
    ImageParams,
    ImageReady,
    JobInfo,
    PhaseTimings,
    Preview,
    Queued,
    Registered,
    SamplingProgress,
    TrainingProgress,
    UnknownEvent,
)
from forgedit_client.options import OutputOptions, PreviewOptions, SweepOptions, TrainingOptions
from forgedit_client.results import JobResult
from forgedit_client.retry import RetryPolicy
from forgedit_client.stream import AsyncEventStream, EventStream

__version__ = "0.1.0"

__all__ = [
    "Accepted",
    "AsyncEventStream",
    "AsyncForgeditClient",
    "Captioned",
    "Completed",
    "EditModelInfo",
    "Event",
    "EventStream",
    "FieldViolation",
    "ForgeditClient",
    "ForgeditClientError",
    "ForgeditRpcError",
    "Heartbeat",
    "ImageParams",
    "ImageReady",
    "InvalidOptionError",
    "JobInfo",
    "JobResult",
    "OutputOptions",
    "PhaseTimings",
    "Preview",
    "PreviewOptions",
    "Queued",
    "Registered",
    "RetryPolicy",
    "SamplingProgress",
    "SweepOptions",
    "Timeouts",
    "TlsConfig",
    "TrainingOptions",
    "TrainingProgress",
    "UnknownEvent",
    "__version__",
]
