"""Interceptors around every call: the server's front door.

In pipeline order (the first is outermost; see ``server.main``):

``MetricsInterceptor``: observes ``forgedit_rpc_duration_seconds{method,code}`` when a call
ends, whatever way it ends: OK, an error status, a refusal by the interceptors inside it, or the
client going away (CANCELLED).

``DrainingInterceptor``: once draining starts (``server.lifecycle``), new calls other than
health checks end UNAVAILABLE at once (calls already running continue), so a load balancer
retries them on another replica.

``server.auth.BearerTokenInterceptor`` (when tokens are configured): UNAUTHENTICATED before the
payload is read.

``CallLimitInterceptor``: bounds every call that can hold the server for long, on every port,
exempt from tokens or not: every stream (Edit, Sample, WatchJob, reflection; each holds a
server thread while open) and every health call (``Check`` and ``Watch``, which need no token).
gRPC admits at most ``FORGEDIT_GRPC_THREADS`` calls at once and refuses the rest; these pools
(``server.main`` builds them) add up to less, so they can never take the capacity that unary
calls of authenticated clients need. Each pool is shared fairly (``server.shares``): a limit
in all, one per client (its principal with tokens, else its IP address; a health call's
address) and the last slots kept for clients that hold none. A call takes its slot *before
its request is read* (a client that holds its message back holds a slot, not an uncounted
thread) and keeps it until it ends; over a bound it ends RESOURCE_EXHAUSTED naming the bound's
setting, with QuotaFailure and RetryInfo.

``RequestDecodingInterceptor``: a request that is not a valid protobuf of its method's type (or
has a text field that is not UTF-8) ends INVALID_ARGUMENT naming the problem, with one brief
WARNING log line (at most one per 10 s, counting the ones left out), instead of gRPC's
INTERNAL "Exception deserializing request!" and an ERROR traceback; one that could not be
parsed for lack of memory ends RESOURCE_EXHAUSTED (``server.errors``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from forgedit.errors import InvalidInputError
from server.auth import Authenticator, address_of, refusing_handler
from server.errors import StreamLimitError, UnavailableError, to_rpc_status
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.shares import Refusal, ShareRule

log = logging.getLogger("server.interceptors")

_HEALTH = "/grpc.health.v1.Health/"

# A handler's behaviour and deserializer take and return any method's messages (and
# streams of them): the interceptors here wrap every method alike, so Any is the honest type.
Behavior = Callable[..., Any]
Deserializer = Callable[[bytes], Any]
Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]
_LENGTH_DELIMITED = 2  # the wire type of strings, bytes and messages


def wrap_behavior(
    handler: grpc.RpcMethodHandler,
    around: Callable[[Behavior], Behavior],
    request_deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour replaced by ``around(behaviour)``, same shape; and with
    ``request_deserializer`` instead of its own when given."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(around(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(around(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(around(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(around(handler.stream_stream), **kwargs)


class DrainingInterceptor(grpc.ServerInterceptor):
    """New calls end UNAVAILABLE once the lifecycle is draining (it decides; this asks)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.lifecycle.draining or method.startswith(_HEALTH):
            return handler
        return refusing_handler(
            handler, UnavailableError("the server is shutting down; retry on another replica")
        )


# ------------------------------------------------------------------------------- call pools


class CallLimiter:
    """One pool of call slots (open streams, health calls) shared by clients under a
    ``ShareRule`` (``server.shares``). Thread-safe."""

    def __init__(self, rule: ShareRule, *, noun: str, subject: str) -> None:
        self.rule = rule
        self.noun = noun  # "open streams": what the refusal says there are too many of
        self.subject = subject  # "streams": the QuotaFailure subject of its bounds
        self._lock = threading.Lock()
        self._total = 0
        self._per_client: Counter[str] = Counter()

    def acquire(self, client: str) -> Callable[[], None]:
        """Take a slot for ``client``; returns its release (idempotent) or raises
        ``StreamLimitError`` naming the bound that was reached and its setting."""
        with self._lock:
            refusal = self.rule.refusal(self._per_client[client], self._total)
            if refusal is not None:
                raise self._refused(refusal)
            self._total += 1
            self._per_client[client] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._total -= 1
                self._per_client[client] -= 1
                if self._per_client[client] <= 0:
                    del self._per_client[client]

        return release

    @property
    def open_calls(self) -> int:
        with self._lock:
            return self._total

    def _refused(self, refusal: Refusal) -> StreamLimitError:
        limit, setting, noun = refusal.limit, refusal.setting, self.noun
        if refusal.bound == "capacity":
            message = (
                f"too many {noun} on this replica: at most {limit} ({setting}); retry later "
                "or on another replica"
            )
        elif refusal.bound == "per-client":
            message = (
                f"too many {noun} from this client: at most {limit} ({setting}); close one, "
                "or retry when one ends"
            )
        else:
            message = (
                f"this client has {refusal.held} {noun} and the last {limit} of this "
                f"replica's are kept for clients with none ({setting}); close one, or retry "
                "when one ends or on another replica"
            )
        subject = self.subject if refusal.bound == "capacity" else f"{self.subject}-{refusal.bound}"
        return StreamLimitError(
            message, subject=subject, limit=limit, setting=setting, retry_after_s=5.0
        )


@dataclass(frozen=True)
class Pool:
    """Which calls a ``CallLimiter`` counts: those whose method starts with ``prefix`` ("":
    any), streaming ones only unless ``unary``; a call's client is its address when
    ``by_address`` (calls that need no token), else ``Authenticator.client_of``."""

    prefix: str
    limiter: CallLimiter
    by_address: bool = False
    unary: bool = False


class CallLimitInterceptor(grpc.ServerInterceptor):
    """Every call a pool counts takes a slot of it before its request is read, and holds it
    until the call ends (see the module docstring). The first pool that matches counts it."""

    def __init__(self, pools: Sequence[Pool], authenticator: Authenticator) -> None:
        self.pools = tuple(pools)
        self.authenticator = authenticator

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        streaming = handler.request_streaming or handler.response_streaming
        for pool in self.pools:
            if method.startswith(pool.prefix) and (streaming or pool.unary):
                return self._admitting(handler, pool, method)
        return handler

    def _admit(self, pool: Pool, method: str, context: grpc.ServicerContext) -> None:
        """Take the call's slot (released when the call ends, whichever way), or end it
        RESOURCE_EXHAUSTED."""
        client = address_of(context) if pool.by_address else self.authenticator.client_of(context)
        try:
            release = pool.limiter.acquire(client)
        except StreamLimitError as exc:
            log.info("refused %s: %s", method, exc)
            context.abort_with_status(to_rpc_status(exc).grpc_status())
            raise  # unreachable: abort raises
        if not context.add_callback(release):
            release()  # the call has ended already

    def _admitting(
        self, handler: grpc.RpcMethodHandler, pool: Pool, method: str
    ) -> grpc.RpcMethodHandler:
        """``handler`` behind admission. A unary-request handler would make gRPC receive and
        parse the whole request before any behaviour runs, holding a server thread for as
        long as a client takes to send it; so it becomes request-streaming (the request
        iterator is lazy), admits first, then reads the one request message itself. A
        non-blocking behaviour (``Health.Watch``) stays non-blocking."""
        admit = self._admit
        if handler.request_streaming:

            def around(inner: Behavior) -> Behavior:
                def streaming(requests: Any, context: grpc.ServicerContext) -> Any:
                    admit(pool, method, context)
                    return inner(requests, context)

                return streaming

            return wrap_behavior(handler, around)

        deserialize = handler.request_deserializer
        serialize = handler.response_serializer
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if getattr(inner, "experimental_non_blocking", False):

            def non_blocking(
                requests: Any, context: grpc.ServicerContext, send_response_callback: Any = None
            ) -> None:
                admit(pool, method, context)
                inner(_one_request(requests, deserialize, context), context, send_response_callback)

            non_blocking.experimental_non_blocking = True  # type: ignore[attr-defined]
            return grpc.stream_stream_rpc_method_handler(
                non_blocking, response_serializer=serialize
            )

        def behavior(requests: Any, context: grpc.ServicerContext) -> Any:
            admit(pool, method, context)
            return inner(_one_request(requests, deserialize, context), context)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(behavior, response_serializer=serialize)
        return grpc.stream_unary_rpc_method_handler(behavior, response_serializer=serialize)


def _one_request(
    requests: Iterator[bytes], deserialize: Deserializer | None, context: grpc.ServicerContext
) -> Any:
    """The one request message of a unary-request call, read from its request stream and
    parsed by the method's own deserializer (``RequestDecodingInterceptor``'s tolerant one for
    our service). A call that carried none, or bytes that do not parse, is INVALID_ARGUMENT."""
    data = next(requests, None)
    if data is None:
        problem = "the call carried no request message; send exactly one"
    else:
        try:
            return deserialize(data) if deserialize is not None else data
        except DecodeError:
            problem = f"the request is not a valid protobuf message ({len(data)} bytes)"
    error = InvalidInputError(problem, field="request")
    context.abort_with_status(to_rpc_status(error).grpc_status())
    raise AssertionError("unreachable: abort raises")


# ------------------------------------------------------------------------------- decoding


MALFORMED_LOG_INTERVAL_S = 10.0


class LogBudget:
    """At most one log line per ``interval_s``; the next allowed line reports how many were
    suppressed meanwhile. A client sending garbage in a loop costs the log one line per
    interval, not one per request."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._suppressed = 0

    def take(self) -> tuple[bool, int]:
        """(whether to log now, how many lines were suppressed since the last one)."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return False, 0
            self._next = now + self.interval_s
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed


class UnparsedRequest:
    """What the tolerant deserializer returns, in place of raising (gRPC would log a
    traceback and answer INTERNAL), for bytes it could not turn into a request: ``error`` says
    why, an ``InvalidInputError`` naming the problem and the field (``malformed``), or the
    ``MemoryError`` that parsing ran into (not the client's fault: RESOURCE_EXHAUSTED)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    @property
    def malformed(self) -> bool:
        return isinstance(self.error, InvalidInputError)

    @property
    def problem(self) -> str:
        return str(self.error)

    @property
    def field(self) -> str:
        return getattr(self.error, "field", None) or "request"


def tolerant_deserializer(deserializer: Deserializer) -> Deserializer:
    """``deserializer`` that returns an ``UnparsedRequest`` instead of raising. Protobuf does
    all the parsing: the request type's own ``FromString``, and on a UTF-8 error a second
    parse of the same bytes as an ``Empty`` (every field then unknown, kept as raw bytes) to
    find which top-level text field it was."""
    # A generated FromString is bound to its message class: that names the type.
    message_type: type[Message] | None = getattr(deserializer, "__self__", None)
    type_name = message_type.DESCRIPTOR.full_name if message_type is not None else "request"

    def malformed(problem: str, field: str = "request") -> UnparsedRequest:
        return UnparsedRequest(InvalidInputError(problem, field=field))

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except MemoryError as exc:
            return UnparsedRequest(exc)
        except DecodeError as exc:
            if "UTF-8" not in str(exc):
                return malformed(
                    f"the request is not a valid {type_name} protobuf message ({len(data)} "
                    "bytes that do not parse); send a serialized forgedit.v1 request"
                )
            field = _first_bad_utf8_field(message_type, data) if message_type else None
            if field is not None:
                return malformed(
                    f"field {field!r} of {type_name} is not valid UTF-8; text fields "
                    "(prompts, ids) must be UTF-8",
                    field,
                )
            return malformed(
                f"a text field of {type_name} is not valid UTF-8; text fields (prompts, "
                "ids) must be UTF-8"
            )

    return parse


def _first_bad_utf8_field(message_type: type[Message], data: bytes) -> str | None:
    """Name of the first top-level string field of ``message_type`` whose bytes in ``data``
    are not UTF-8, or None (a nested one). Parsed as an ``Empty``, every field of ``data`` is
    an unknown field that protobuf keeps as raw bytes, unchecked."""
    strings = {f.number: f.name for f in message_type.DESCRIPTOR.fields if f.type == f.TYPE_STRING}
    raw = empty_pb2.Empty()
    try:
        raw.ParseFromString(data)
    except DecodeError:
        return None
    for field in UnknownFieldSet(raw):
        if field.field_number in strings and field.wire_type == _LENGTH_DELIMITED:
            try:
                bytes(field.data).decode("utf-8")
            except UnicodeDecodeError:
                return strings[field.field_number]
    return None


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Malformed requests end INVALID_ARGUMENT (see the module docstring). Innermost, so
    authentication and admission come first."""

    def __init__(self, prefix: str, log_budget: LogBudget | None = None) -> None:
        self.prefix = prefix
        self.log_budget = log_budget or LogBudget(MALFORMED_LOG_INTERVAL_S)

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or handler.request_streaming
            or handler.request_deserializer is None
            or not method.startswith(self.prefix)
        ):
            return handler

        def refuse(request: UnparsedRequest, context: grpc.ServicerContext) -> None:
            allowed, suppressed = self.log_budget.take() if request.malformed else (False, 0)
            if allowed:
                log.warning(
                    "malformed request to %s from %s: %s%s",
                    method,
                    context.peer(),
                    request.problem,
                    f" ({suppressed} more since the last such line)" if suppressed else "",
                )
            mapped = to_rpc_status(request.error, context=f"parsing a request to {method}")
            context.abort_with_status(mapped.grpc_status())

        def around(inner: Behavior) -> Behavior:
            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, UnparsedRequest):
                    refuse(request, context)
                return inner(request, context)

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if isinstance(request, UnparsedRequest):
                    refuse(request, context)
                yield from inner(request, context)

            return stream if handler.response_streaming else unary

        return wrap_behavior(handler, around, tolerant_deserializer(handler.request_deserializer))


class MetricsInterceptor(grpc.ServerInterceptor):
    """Time every call of our service, labelled by method name and final status code
    (refusals by the interceptors inside this one included)."""

    def __init__(self, metrics: Metrics, service_prefix: str) -> None:
        self.metrics = metrics
        self.prefix = service_prefix

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(self.prefix):
            return handler
        method = full[len(self.prefix) :]  # a bounded set: the service's method names

        def around(inner: Behavior) -> Behavior:
            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                call = _Call(self.metrics, method, context)
                try:
                    response = inner(request, context)
                except BaseException:
                    call.failed()
                    raise
                call.succeeded()
                return response

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = _Call(self.metrics, method, context)
                try:
                    yield from inner(request, context)
                except BaseException:
                    call.failed()
                    raise
                call.succeeded()

            return stream if handler.response_streaming else unary

        return wrap_behavior(handler, around)


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
