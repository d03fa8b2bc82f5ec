"""Channels to a Forgedit server: message size, keepalive, TLS/mTLS and the bearer token.

Keepalive and message-size values match the server's (``server/transport.py``; change both
together):

- ``MAX_MESSAGE_BYTES`` 64 MiB in both directions: one 4096×4096 PNG fits (an image event or
  an input image).
- the client pings every 30 s (``KEEPALIVE_TIME_MS``) also without calls in flight and drops
  the connection when a ping is not answered within 10 s (``KEEPALIVE_TIMEOUT_MS``), so a dead
  replica is noticed during long silent phases (training, a queue wait) and a proxy's idle
  reaper sees traffic. 30 s is above the server's minimum accepted ping interval (10 s); a
  client pinging faster would be sent GOAWAY ``too_many_pings``.

The token: over TLS it is attached as call credentials (``authorization: Bearer …``), which
gRPC refuses to send over plaintext. On a plaintext channel — loopback development only — the
SDK sends the same header as call metadata instead.

Balancing over several replicas (a ``dns:///`` name of a headless Service, or an
``ipv4:host:port,host:port`` list) uses gRPC's own load-balancing policies:

- ``"round_robin"``: every call goes to the next replica.
- ``"affinity"`` (``AFFINITY``): gRPC's ring-hash policy (gRFC A42) hashing the request header
  ``forgedit-affinity`` (gRFC A76's ``requestHashHeader``). The SDK sets that header to the
  edit-model ID on Sample, GetEditModel and DeleteEditModel, so one edit model keeps landing on
  the replica that has it hot in memory, and to the request id on Edit; a stream's re-attach
  (WatchJob) and cancel carry its call's key, so they reach the replica running the job. Calls
  without a key (List, and Get/Cancel by job id without ``affinity=``) get a random hash. When
  a key's replica is down, the ring's next replica takes its calls, so a retry lands elsewhere.
  In grpcio 1.85 (C-core) the policy is registered as ``ring_hash_experimental`` and honours
  ``requestHashHeader`` only with ``GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY=true``
  (read when a channel is created): without it every pick fails and calls wait until their
  deadline. ``channel_options`` therefore sets it for this process, and refuses to build the
  channel if it was set to false.

The header is sent whatever the policy, so a gRPC-aware proxy or mesh can hash on it too
(e.g. Envoy's ``hash_policy: header: forgedit-affinity`` under ``ring_hash``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from forgedit_client.errors import InvalidOptionError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

AFFINITY = "affinity"
AFFINITY_HEADER = "forgedit-affinity"
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin", AFFINITY)
RING_HASH_HEADER_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
_AFFINITY_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": AFFINITY_HEADER}}]
}


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings. ``root_certificates`` PEM of the CA that signed the server (None = the
    system roots); ``certificate_chain`` + ``private_key`` PEM for mutual TLS;
    ``server_name_override`` when the certificate's name differs from the target's host."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> TlsConfig:
        return cls(
            root_certificates=Path(ca).read_bytes() if ca else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
            private_key=Path(key).read_bytes() if key else None,
            server_name_override=server_name_override,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def channel_options(
    *, load_balancing: str | None = None, tls: TlsConfig | None = None
) -> list[tuple[str, object]]:
    """The channel arguments the SDK uses (see the module docstring for the values).

    ``load_balancing``: ``None`` or ``"pick_first"`` (one connection, to the first address
    that answers), ``"round_robin"`` (spread calls over every address a ``dns:///`` or
    ``ipv4:`` target resolves to) or ``"affinity"`` (ring hash on the call's key; see the
    module docstring). Raises ``InvalidOptionError`` (a ``ValueError``) for another value.
    """
    if load_balancing is not None and load_balancing not in LOAD_BALANCING_POLICIES:
        raise InvalidOptionError(
            f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}, "
            f"got {load_balancing!r}"
        )
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.primary_user_agent", "forgedit-client-python"),
    ]
    if load_balancing == AFFINITY:
        _enable_request_hash_header()
        options.append(("grpc.service_config", json.dumps(_AFFINITY_SERVICE_CONFIG)))
    elif load_balancing:
        options.append(("grpc.lb_policy_name", load_balancing))
    if tls is not None and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return options


def _enable_request_hash_header() -> None:
    """Let gRPC C-core's ring hash read the request header (see the module docstring)."""
    value = os.environ.get(RING_HASH_HEADER_ENV)
    if value is None:
        os.environ[RING_HASH_HEADER_ENV] = "true"
    elif value.strip().lower() not in ("1", "true", "yes"):
        raise InvalidOptionError(
            f"load_balancing='affinity' needs {RING_HASH_HEADER_ENV}=true (it is {value!r}): "
            "without it gRPC's ring hash cannot pick a replica and every call would wait"
        )


def affinity_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The header the ``affinity`` policy (and a hashing proxy) routes on; none without a
    key."""
    return ((AFFINITY_HEADER, key),) if key else ()


def _token_credentials(token: str) -> grpc.CallCredentials:
    return grpc.access_token_call_credentials(token)


def sync_channel(
    target: str,
    *,
    tls: TlsConfig | None,
    token: str | None,
    load_balancing: str | None = None,
) -> grpc.Channel:
    options = channel_options(load_balancing=load_balancing, tls=tls)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    creds = tls.credentials()
    if token:
        creds = grpc.composite_channel_credentials(creds, _token_credentials(token))
    return grpc.secure_channel(target, creds, options=options)


def aio_channel(
    target: str,
    *,
    tls: TlsConfig | None,
    token: str | None,
    load_balancing: str | None = None,
) -> grpc.aio.Channel:
    options = channel_options(load_balancing=load_balancing, tls=tls)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    creds = tls.credentials()
    if token:
        creds = grpc.composite_channel_credentials(creds, _token_credentials(token))
    return grpc.aio.secure_channel(target, creds, options=options)


def call_metadata(*, tls: TlsConfig | None, token: str | None) -> Sequence[tuple[str, str]]:
    """Per-call metadata: the bearer header on plaintext channels (TLS uses call creds)."""
    if token and tls is None:
        return (("authorization", f"Bearer {token}"),)
    return ()
