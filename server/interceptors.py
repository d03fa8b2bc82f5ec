"""Interceptors around every call: draining (SIGTERM) and per-call metrics.

``DrainingInterceptor``: once draining starts, new calls other than health checks end
UNAVAILABLE at once (calls already running continue), so a load balancer retries them on
another replica.

``MetricsInterceptor``: observes ``forgedit_rpc_duration_seconds{method,code}`` when a call
ends, whatever way it ends: OK, an error status, or the client going away (CANCELLED).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from server.auth import refusing_handler
from server.errors import UnavailableError
from server.metrics import Metrics

_HEALTH = "/grpc.health.v1.Health/"


class DrainingInterceptor(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self._draining = threading.Event()

    def start_draining(self) -> None:
        self._draining.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.draining or method.startswith(_HEALTH):
            return handler
        return refusing_handler(
            handler, UnavailableError("the server is shutting down; retry on another replica")
        )


class MetricsInterceptor(grpc.ServerInterceptor):
    """Time every call of our service, labelled by method name and final status code."""

    def __init__(self, metrics: Metrics, service_prefix: str) -> None:
        self.metrics = metrics
        self.prefix = service_prefix

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(self.prefix):
            return handler
        method = full[len(self.prefix) :]  # a bounded set: the service's method names
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                call = _Call(self.metrics, method, context)
                try:
                    response = inner_unary(request, context)
                except BaseException:
                    call.failed()
                    raise
                call.succeeded()
                return response

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = _Call(self.metrics, method, context)
                try:
                    yield from inner_stream(request, context)
                except BaseException:
                    call.failed()
                    raise
                call.succeeded()

            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        return handler


class _Call:
    """Observes one call's duration once, when it ends (the RPC's termination callback also
    covers a client that went away mid-stream)."""

    def __init__(self, metrics: Metrics, method: str, context: grpc.ServicerContext) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.code: str | None = None
        self._lock = threading.Lock()
        self._observed = False
        context.add_callback(self._terminated)

    def succeeded(self) -> None:
        self.code = "OK"

    def failed(self) -> None:
        code = self.context.code()
        self.code = code.name if code is not None and code != grpc.StatusCode.OK else "UNKNOWN"

    def _terminated(self) -> None:
        with self._lock:
            if self._observed:
                return
            self._observed = True
        code = self.code or "CANCELLED"  # ended before the handler did: the client left
        self.metrics.rpc_duration.labels(method=self.method, code=code).observe(
            time.perf_counter() - self.started
        )
