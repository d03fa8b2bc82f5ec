"""Transport settings shared by server and SDK: message sizes and keepalive.

The SDK (``clients/python``) uses matching values; change both together.

Message size
    ``MAX_MESSAGE_BYTES`` (64 MiB) bounds every message in both directions. A 4096×4096 RGB PNG
    of noise (the worst case; real photos compress far better) is about 48 MiB, so one fits,
    and the request's own image limit (``FORGEDIT_MAX_IMAGE_BYTES``) stays below it. A message
    over the limit is refused by gRPC itself with RESOURCE_EXHAUSTED before our code sees it.

Keepalive (client and server ping each other so dead peers are noticed during long silent
phases, and idle-connection reapers in load balancers see traffic)
    server: pings an idle connection every ``SERVER_KEEPALIVE_TIME_MS`` (30 s) and drops it when
        the ping is not acknowledged within ``KEEPALIVE_TIMEOUT_MS`` (10 s); accepts client
        pings no more often than every ``MIN_CLIENT_PING_INTERVAL_MS`` (10 s), also without
        calls in flight.
    client (SDK): ``CLIENT_KEEPALIVE_TIME_MS`` (30 s, >= the server's minimum, or the server
        answers GOAWAY "too_many_pings"), ``KEEPALIVE_TIMEOUT_MS``, ``permit_without_calls``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * MIB

SERVER_KEEPALIVE_TIME_MS = 30_000
CLIENT_KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000


def server_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_connection_age_s: float | None = None,
    max_connection_age_grace_s: float | None = None,
) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC server. ``max_connection_age_s``: connections are sent
    GOAWAY after this long so clients re-resolve (new replicas get traffic); calls open then
    get ``max_connection_age_grace_s`` to finish (None: unbounded)."""
    age: list[tuple[str, int]] = []
    if max_connection_age_s is not None:
        age.append(("grpc.max_connection_age_ms", round(max_connection_age_s * 1000)))
        if max_connection_age_grace_s is not None:
            age.append(
                ("grpc.max_connection_age_grace_ms", round(max_connection_age_grace_s * 1000))
            )
    return [
        *age,
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # SO_REUSEPORT would let two servers silently share a port in tests; be explicit.
        ("grpc.so_reuseport", 0),
    ]


def client_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel arguments a client should use (tests and benchmarks use these; the SDK mirrors
    them)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca_file`` clients must present a
    certificate signed by that CA (mutual TLS)."""
    root = client_ca_file.read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )
