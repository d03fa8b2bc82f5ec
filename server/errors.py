"""The server's own errors, and the one place where every error becomes a gRPC status.

Domain errors come from ``forgedit.errors`` (the engine) and ``registry.errors``; this module
adds what only a service can get wrong (queue full, request id conflict, unknown job, deadline
too short, draining, authentication). ``to_rpc_status`` maps any exception to a
``google.rpc.Status`` with machine-readable details:

=============================  =====================  ========================================
error                          status                 details
=============================  =====================  ========================================
InvalidInputError (+ image,    INVALID_ARGUMENT       BadRequest.field_violations[field]
strategy, edit-model id)
QuotaError (QueueFullError,    RESOURCE_EXHAUSTED     RetryInfo(retry_delay), QuotaFailure
StreamLimitError)                                     (the bound, naming its setting)
out of host memory            RESOURCE_EXHAUSTED     QuotaFailure(memory), RetryInfo
(MemoryError, the CPU
allocator's failure; also
behind another error)
out of device memory          RESOURCE_EXHAUSTED     QuotaFailure(device-memory)
(torch's OutOfMemoryError)
RequestConflictError,          ALREADY_EXISTS         ErrorInfo
RegistryConflictError
JobNotFoundError,              NOT_FOUND              ResourceInfo
EditModelNotFoundError
BaseModelMismatchError,        FAILED_PRECONDITION    PreconditionFailure
UnservedBaseModelError,
other EditModelError
RegistryIntegrityError         DATA_LOSS              ErrorInfo
DeadlineTooShortError          DEADLINE_EXCEEDED      ErrorInfo(estimated_seconds)
CancelledError                 CANCELLED              ErrorInfo(reason)
UnavailableError,              UNAVAILABLE            RetryInfo
RegistryUnavailableError
UnauthenticatedError           UNAUTHENTICATED        ErrorInfo
anything else                  INTERNAL               ErrorInfo(reference); the message is
                                                      opaque, the traceback only in the log
=============================  =====================  ========================================

Running out of memory is never the client's fault, wherever it happens in a request (decoding
its image, parsing its message, inside the registry or the engine): the engine lets
``MemoryError`` through, and a layer that wraps it in its own error (the registry, a loader)
keeps it as the cause, which ``to_rpc_status`` follows.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from forgedit.errors import (
    BaseModelMismatchError,
    CancelledError,
    EditModelError,
    InvalidInputError,
)
from registry.errors import (
    EditModelNotFoundError,
    RegistryConflictError,
    RegistryIntegrityError,
    RegistryUnavailableError,
)

DOMAIN = "forgedit.v1"
log = logging.getLogger("server.errors")


class ServiceError(Exception):
    """Base of the server's own errors. ``str(err)`` is the client-visible sentence."""


class QuotaError(ServiceError):
    """A bounded share is taken (``server.shares``): ``subject`` names the bound for
    QuotaFailure, ``limit`` and ``setting`` what it is and what sets it, ``retry_after_s``
    when to try again."""

    def __init__(
        self, message: str, *, subject: str, limit: int, setting: str, retry_after_s: float
    ) -> None:
        super().__init__(message)
        self.subject = subject
        self.limit = limit
        self.setting = setting
        self.retry_after_s = retry_after_s


class QueueFullError(QuotaError):
    """The job queue, or this client's share of it, is full (``server.queueing``);
    ``retry_after_s`` is the estimated wait for a free place."""


class RequestConflictError(ServiceError):
    """A request id was reused with a different payload."""


class JobNotFoundError(ServiceError, LookupError):
    """No running or retained job has this id (or request id), or none this principal may see:
    the two are worded alike, naming only what the caller asked by (``by_id``,
    ``by_request_id``), so the answer never reveals another principal's job."""

    def __init__(self, what: str) -> None:
        super().__init__(f"job {what} was not found (unknown, or finished and expired)")
        self.what = what

    @classmethod
    def by_id(cls, job_id: str) -> JobNotFoundError:
        return cls(repr(job_id[:80]))

    @classmethod
    def by_request_id(cls, request_id: str) -> JobNotFoundError:
        return cls(f"with request_id {request_id[:80]!r}")


class UnservedBaseModelError(ServiceError):
    """An edit model's base model is not loaded on this replica."""


class DeadlineTooShortError(ServiceError):
    """The call's deadline ends before the job's estimated completion."""

    def __init__(self, remaining_s: float, estimated_s: float) -> None:
        super().__init__(
            f"the deadline leaves {remaining_s:.1f} s but the job is estimated to take "
            f"{estimated_s:.1f} s (including the queue); allow more time or request less work"
        )
        self.remaining_s = remaining_s
        self.estimated_s = estimated_s


class UnavailableError(ServiceError):
    """The replica is not ready (warming up) or is draining; retry elsewhere or later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnauthenticatedError(ServiceError):
    """No bearer token, or not one the server accepts."""


class StreamLimitError(QuotaError):
    """A new call would exceed a bound on the calls the front door counts: open streams,
    health calls (``server.interceptors.StreamLimiter``)."""


def shown(value: str) -> str:
    """A short, printable rendering of a client string for an error message."""
    text = "".join(c if c.isprintable() else "?" for c in value[:40])
    return repr(text) + ("…" if len(value) > 40 else "")


@dataclass(frozen=True)
class MappedError:
    """An exception as the client sees it, plus a bounded label for metrics."""

    status: status_pb2.Status
    reason: str  # lower-case status name, a bounded metric label

    @property
    def code(self) -> grpc.StatusCode:
        return _GRPC_CODES[self.status.code]

    def grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.status)


def to_rpc_status(exc: BaseException, *, context: str = "") -> MappedError:
    """Map ``exc`` to the status the client gets (see the module table).

    ``context`` (e.g. "job j-123") goes into the log line of an unexpected error only.
    Unexpected errors are logged here with their traceback and a fresh reference id.
    """
    if isinstance(exc, InvalidInputError):
        field = exc.field or "request"
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=str(exc))
        return _status(
            code_pb2.INVALID_ARGUMENT,
            str(exc),
            error_details_pb2.BadRequest(field_violations=[violation]),
        )
    if isinstance(exc, QuotaError):
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            str(exc),
            _retry_info(exc.retry_after_s),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=exc.subject, description=f"at most {exc.limit} ({exc.setting})"
                    )
                ]
            ),
        )
    memory = _out_of_memory(exc)
    if memory == "device":
        # Admission (FORGEDIT_MAX_BATCH_PIXELS) should have refused it; the limit is too high
        # for this device. Still the client's request size, not an internal error.
        log.warning("a job ran out of device memory %s: %s", context, str(exc)[:200])
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            "the device ran out of memory for this request; lower the resolution, the batch "
            "size or the number of images (the operator may lower FORGEDIT_MAX_BATCH_PIXELS)",
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject="device-memory", description="the request did not fit"
                    )
                ]
            ),
        )
    if memory == "host":
        # The replica's memory, shared by every request: it may pass, so a retry is sensible.
        log.warning("out of memory %s: %s", context, str(exc)[:200] or type(exc).__name__)
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            "the server ran out of memory for this request; retry later or on another "
            "replica, or request less (a smaller image, a lower resolution, fewer images; the "
            "operator may lower FORGEDIT_MAX_IMAGE_PIXELS or FORGEDIT_MAX_BATCH_PIXELS)",
            _retry_info(5.0),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject="memory", description="the server could not allocate memory"
                    )
                ]
            ),
        )
    if isinstance(exc, RequestConflictError | RegistryConflictError):
        return _status(code_pb2.ALREADY_EXISTS, str(exc), _error_info("REQUEST_ID_REUSED"))
    if isinstance(exc, JobNotFoundError):
        return _status(
            code_pb2.NOT_FOUND,
            str(exc),
            error_details_pb2.ResourceInfo(resource_type="job", resource_name=exc.what),
        )
    if isinstance(exc, EditModelNotFoundError):
        return _status(
            code_pb2.NOT_FOUND,
            str(exc),
            error_details_pb2.ResourceInfo(
                resource_type="edit_model", resource_name=exc.edit_model_id
            ),
        )
    if isinstance(exc, RegistryIntegrityError):
        return _status(code_pb2.DATA_LOSS, str(exc), _error_info("EDIT_MODEL_CORRUPT"))
    if isinstance(exc, BaseModelMismatchError | UnservedBaseModelError | EditModelError):
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="BASE_MODEL", subject="edit_model", description=str(exc)
        )
        return _status(
            code_pb2.FAILED_PRECONDITION,
            str(exc),
            error_details_pb2.PreconditionFailure(violations=[violation]),
        )
    if isinstance(exc, DeadlineTooShortError):
        return _status(
            code_pb2.DEADLINE_EXCEEDED,
            str(exc),
            _error_info(
                "DEADLINE_TOO_SHORT",
                estimated_seconds=f"{exc.estimated_s:.3f}",
                remaining_seconds=f"{exc.remaining_s:.3f}",
            ),
        )
    if isinstance(exc, CancelledError):
        message = f"the job was cancelled ({exc})" if str(exc) else "the job was cancelled"
        return _status(code_pb2.CANCELLED, message, _error_info("CANCELLED", reason=str(exc)))
    if isinstance(exc, UnavailableError):
        return _status(code_pb2.UNAVAILABLE, str(exc), _retry_info(exc.retry_after_s))
    if isinstance(exc, RegistryUnavailableError):
        return _status(code_pb2.UNAVAILABLE, str(exc), _retry_info(5.0))
    if isinstance(exc, UnauthenticatedError):
        return _status(code_pb2.UNAUTHENTICATED, str(exc), _error_info("UNAUTHENTICATED"))
    reference = uuid.uuid4().hex[:12]
    log.error(
        "unexpected error %s; reference=%s",
        context or "",
        reference,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return _status(
        code_pb2.INTERNAL,
        f"internal error; quote reference {reference} to the operator",
        _error_info("INTERNAL", reference=reference),
    )


def _out_of_memory(exc: BaseException) -> str | None:
    """ "device" for torch's ``OutOfMemoryError`` (CUDA and other accelerators); "host" for
    Python's ``MemoryError`` or the CPU allocator's ``RuntimeError`` ("can't allocate
    memory"); None otherwise. Recognised without importing torch, on ``exc`` or on the errors
    it was raised from (its cause or context: a layer that wrapped it in its own error)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "OutOfMemoryError":
            return "device"
        if isinstance(error, MemoryError) or (
            isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
        ):
            return "host"
        error = error.__cause__ or error.__context__
    return None


def cancelled_status(reason: str) -> MappedError:
    """The status of a job stopped by a cancel request (``reason`` e.g. "client cancelled")."""
    return to_rpc_status(CancelledError(reason))


def _status(code: int, message: str, *details: object) -> MappedError:
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return MappedError(status, code_pb2.Code.Name(code).lower())


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = max(1, round(seconds))
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=whole))


def _error_info(reason: str, /, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
