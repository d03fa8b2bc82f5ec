"""The SDK's errors: one exception type for every failure the service reports.

The service ends a failed call with a gRPC status and ``google.rpc`` details (``BadRequest``
field violations for validation, ``RetryInfo`` for a full queue or a draining replica,
``ErrorInfo`` with a ``reference`` for internal errors). ``ForgeditRpcError`` unpacks them so
callers and the CLI can show one clear line without knowing gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ForgeditClientError(Exception):
    """Base of everything the SDK raises on purpose."""


class InvalidOptionError(ForgeditClientError, ValueError):
    """An option was rejected by the SDK before anything was sent (unknown name, wrong type,
    unknown enum value). The message names the option and what is accepted."""


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ForgeditRpcError(ForgeditClientError):
    """A call ended with a non-OK gRPC status.

    Attributes: ``code`` (``grpc.StatusCode``), ``message`` (the server's sentence),
    ``field_violations`` (for INVALID_ARGUMENT), ``retry_delay`` (seconds, when the server
    suggested one), ``reference`` (quote it to the operator for INTERNAL errors),
    ``error_reason`` (``ErrorInfo.reason``), ``job_id`` (when the SDK knew the job).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
        reference: str | None = None,
        error_reason: str | None = None,
        job_id: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.retry_delay = retry_delay
        self.reference = reference
        self.error_reason = error_reason
        self.job_id = job_id
        super().__init__(self.one_line())

    @property
    def code_name(self) -> str:
        """``INVALID_ARGUMENT``, ``NOT_FOUND``, …"""
        return str(self.code.name)

    def one_line(self) -> str:
        """``CODE: message [field: problem; …] (retry in N s)`` — what the CLI prints."""
        text = f"{self.code_name}: {self.message}" if self.message else self.code_name
        extra = [f"{v.field}: {v.description}" for v in self.field_violations]
        # The message usually already is the first violation's sentence; don't repeat it.
        extra = [e for e in extra if e.split(": ", 1)[1] not in self.message]
        if extra:
            text += " [" + "; ".join(extra) + "]"
        if self.retry_delay is not None:
            text += f" (retry in {self.retry_delay:g} s)"
        if self.reference and self.reference not in text:
            text += f" (reference {self.reference})"
        return text

    def with_job(self, job_id: str | None) -> ForgeditRpcError:
        if not job_id or self.job_id:
            return self
        return ForgeditRpcError(
            self.code,
            self.message,
            field_violations=self.field_violations,
            retry_delay=self.retry_delay,
            reference=self.reference,
            error_reason=self.error_reason,
            job_id=job_id,
        )

    @classmethod
    def from_grpc(cls, error: grpc.RpcError, *, job_id: str | None = None) -> ForgeditRpcError:
        """Unpack a ``grpc.RpcError`` (sync or ``grpc.aio``) and its ``grpc-status-details``."""
        code = _call(error, "code") or grpc.StatusCode.UNKNOWN
        message = _call(error, "details") or ""
        violations: list[FieldViolation] = []
        retry_delay: float | None = None
        reference: str | None = None
        reason: str | None = None
        status = None
        try:
            status = rpc_status.from_call(error)
        except Exception:
            # A malformed details trailer must never hide the status itself.
            status = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                violations += [FieldViolation(v.field, v.description) for v in br.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                detail.Unpack(ri)
                retry_delay = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                ei = error_details_pb2.ErrorInfo()
                detail.Unpack(ei)
                reason = ei.reason or None
                reference = ei.metadata.get("reference") or reference
        return cls(
            code,
            message,
            field_violations=tuple(violations),
            retry_delay=retry_delay,
            reference=reference,
            error_reason=reason,
            job_id=job_id,
        )


def _call(error: Any, method: str) -> Any:
    fn = getattr(error, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:
        return None
