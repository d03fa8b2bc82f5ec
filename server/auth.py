"""Bearer-token authentication and principals, checked before a request's payload is read.

Tokens and principals
    ``FORGEDIT_AUTH_TOKENS`` lists the accepted tokens. Each entry is either an object
    ``{"name": "alice", "token": "...", "admin": false}`` (the token's principal is ``name``) or,
    the older form, a plain string: its principal is ``token-`` + the first 12 hex digits of the
    token's SHA-256, a stable name that does not reveal the token. Jobs and edit models record
    the principal that made them; only that principal (or an admin) sees them. With no token
    configured there is no authentication and every call is the one ``anonymous`` principal,
    which sees everything (as before principals existed).

Checking
    Every call must carry ``authorization: Bearer <token>`` metadata naming one of the tokens;
    otherwise it ends UNAUTHENTICATED. Tokens are compared with ``hmac.compare_digest`` against
    every configured token (no early exit, so the time taken does not reveal which or how much
    of a token matched). Only health (``grpc.health.v1``) is exempt: probes and load balancers
    must work without credentials. Reflection on the gRPC port needs a token like any other
    call: a reflection stream holds a server thread for as long as its client keeps it open, so
    an exempt one would be capacity any anonymous client could claim; tooling has a token, and
    the probes' own port (``FORGEDIT_HEALTH_PORT``, never reachable by clients in deploy/k8s)
    still answers reflection without one. Tokens are never logged.

Clients
    Fair shares (``server.shares``: open streams, queued jobs) count per client: its principal
    with tokens, else its IP address (``client_of``); calls that need no token count by
    address (``address_of``), so one host's many connections share.

Before the payload (what gRPC Python allows)
    A server interceptor runs when the call's headers have arrived, before any request message
    is received: ``intercept_service`` sees only the method name and the metadata. The handler
    it returns decides how the request is read: a handler of a unary-request shape makes the
    server receive *and deserialize* the whole message before the behaviour runs, whereas a
    request-streaming handler is given a lazy iterator. So a refusal is a request-streaming
    handler without a deserializer that aborts without touching the iterator: the status is
    sent while the payload is still unread; the transport discards what the client sends after
    it (the stream is reset). Only the flow-control window the client managed to send lands in
    the server's buffers. The server's thread pool still runs the refusal (briefly), and gRPC
    had to accept the connection and headers; nothing earlier can be refused from Python.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from pydantic import BaseModel, Field, SecretStr

from server.errors import UnauthenticatedError, to_rpc_status

log = logging.getLogger("server.auth")

# The only calls that need no token (see the module docstring, "Checking").
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)

# gRPC metadata: text values, and bytes ones under keys ending in -bin.
Metadata = Sequence[tuple[str, str | bytes]] | None


class TokenEntry(BaseModel):
    """One accepted token with its principal (an entry of ``FORGEDIT_AUTH_TOKENS``)."""

    model_config = {"frozen": True, "extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$", description="Principal.")
    token: SecretStr
    admin: bool = False


@dataclass(frozen=True)
class Principal:
    """Who a call is: jobs and edit models record ``name``; ``admin`` sees everyone's."""

    name: str
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        """Whether a job or edit model recorded as made by ``owner`` is visible to this
        principal. Records made before principals existed (``owner == ""``) are admins'."""
        return self.admin or owner == self.name


ANONYMOUS = Principal("anonymous", admin=True)


def legacy_principal_name(token: str) -> str:
    """The principal of a plain-string token: stable, and a hash prefix reveals nothing usable
    about a high-entropy token."""
    return "token-" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def token_entries(tokens: Sequence[SecretStr | TokenEntry]) -> list[TokenEntry]:
    """Both forms of ``FORGEDIT_AUTH_TOKENS`` entries as ``TokenEntry`` (see the docstring)."""
    entries = []
    for item in tokens:
        if isinstance(item, TokenEntry):
            entries.append(item)
        else:
            secret = item.get_secret_value()
            entries.append(TokenEntry(name=legacy_principal_name(secret), token=item))
    return entries


class Authenticator:
    """Resolves a call's metadata to its ``Principal`` (the one owner of the token rule)."""

    def __init__(self, tokens: Sequence[SecretStr | TokenEntry]) -> None:
        entries = token_entries(tokens)
        if any(not e.token.get_secret_value() for e in entries):
            raise ValueError("tokens must not be empty")
        self._entries = [
            (e.token.get_secret_value().encode("utf-8"), Principal(e.name, e.admin))
            for e in entries
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, metadata: Metadata) -> Principal:
        """The caller's principal; ``UnauthenticatedError`` naming what is wrong otherwise."""
        if not self._entries:
            return ANONYMOUS
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise UnauthenticatedError(
                "missing credentials: send 'authorization: Bearer <token>' metadata"
            )
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError(
                "malformed credentials: expected 'authorization: Bearer <token>'"
            )
        presented = token.strip().encode("utf-8")
        found: Principal | None = None
        for accepted, principal in self._entries:
            if hmac.compare_digest(presented, accepted):  # every entry: no early exit
                found = principal
        if found is None:
            raise UnauthenticatedError("the bearer token is not valid")
        return found

    def principal_of(self, context: grpc.ServicerContext) -> Principal:
        """The principal of a running call (the interceptor already refused bad tokens)."""
        return self.identify(context.invocation_metadata())

    def client_of(self, context: grpc.ServicerContext) -> str:
        """Who a call counts against for fair shares: its principal with tokens, else its
        peer's IP address (``address_of``)."""
        if self.enabled:
            return "principal:" + self.principal_of(context).name
        return address_of(context)


def address_of(context: grpc.ServicerContext) -> str:
    """The peer's IP address (``ipv4:127.0.0.1:54321`` -> ``address:ipv4:127.0.0.1``), so one
    host's many connections count as one client."""
    peer = context.peer() or "unknown"
    return "address:" + (peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without an accepted bearer token before their payload is read (see the
    module docstring)."""

    def __init__(self, authenticator: Authenticator) -> None:
        if not authenticator.enabled:
            raise ValueError("at least one token is required")
        self._auth = authenticator

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        try:
            self._auth.identify(handler_call_details.invocation_metadata)
        except UnauthenticatedError as problem:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            log.info("refused %s: %s", method, problem)
            return refusing_handler(handler, problem)
        return continuation(handler_call_details)


def refusing_handler(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler that ends the call with ``error``'s status without reading the request: it is
    request-streaming (the request iterator is lazy and never advanced) and has no
    deserializer. The response shape follows ``handler``'s, so the client sees a normal end."""
    status = to_rpc_status(error).grpc_status()

    # Any: it stands in for every method's behaviour, whatever its messages.
    def refuse(_requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )
