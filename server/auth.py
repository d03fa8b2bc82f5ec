"""Bearer-token authentication, as a server interceptor.

Every call must carry ``authorization: Bearer <token>`` metadata naming one of the configured
tokens; otherwise it ends UNAUTHENTICATED before reaching the service. Tokens are compared with
``hmac.compare_digest`` against every configured token (no early exit, so the time taken does
not reveal which or how much of a token matched). Health checks and reflection are exempt:
probes and tooling must work without credentials. Tokens are never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from server.errors import UnauthenticatedError, to_rpc_status

log = logging.getLogger("server.auth")

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without an accepted bearer token (see the module docstring)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("at least one non-empty token is required")
        self._tokens = [t.encode("utf-8") for t in tokens]

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata)
        if problem is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        log.info("refused %s: %s", method, problem)
        return refusing_handler(handler, UnauthenticatedError(problem))

    def _problem(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing credentials: send 'authorization: Bearer <token>' metadata"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed credentials: expected 'authorization: Bearer <token>'"
        presented = token.strip().encode("utf-8")
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(presented, accepted)
        return None if matched else "the bearer token is not valid"


def refusing_handler(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``error``'s status
    (the shape matters: it decides how the request stream is read)."""
    status = to_rpc_status(error).grpc_status()

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
