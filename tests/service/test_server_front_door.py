"""The server's front door against a real server: health that application traffic cannot
starve, bounded long-lived streams, authentication before the payload is read, malformed
requests answered INVALID_ARGUMENT (UNAUTHENTICATED first), and reflection v1 + v1alpha.

The long-lived streams watch a job whose fine-tune is held by a gate (the real tiny engine
behind it), so they stay open and idle for as long as the test needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from support import server as support

from server._proto import forgedit_pb2 as pb
from server.main import HEALTH_PORT_REFLECTION_STREAMS, default_engine_factory
from server.service import SERVICE_NAME
from server.settings import ServerSettings
from server.transport import client_options

SERVING = health_pb2.HealthCheckResponse.SERVING
METHOD = f"/{SERVICE_NAME}/"


class GatedEngine:
    """The real engine, whose fine-tunes wait until ``gate`` opens."""

    def __init__(self, engine: Any, gate: threading.Event) -> None:
        self._engine = engine
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def finetune(self, *args: Any, **kwargs: Any) -> Any:
        self._gate.wait(120)
        return self._engine.finetune(*args, **kwargs)


@pytest.fixture(scope="module")
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, gate: threading.Event
) -> Iterator[Any]:
    settings = ServerSettings(
        base_models={"tiny": tiny_model_dir / "stable-diffusion"}, blip_dir=tiny_model_dir / "blip"
    )
    real = default_engine_factory(settings, dict(settings.base_models))
    with support.running_server(
        tmp_path_factory.mktemp("server-front-door"),
        tiny_model_dir,
        engine_factory=lambda name, device: GatedEngine(real(name, device), gate),
        health_port=0,
    ) as h:
        yield h
        gate.set()


def check(channel: grpc.Channel, service: str) -> int:
    """One health check with a deadline (a starved server fails it; no timing asserted)."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def held_job(h: Any) -> str:
    """Submit a detached Edit (held at the gate) and return its job id."""
    request = support.edit_request(support.sample_photo(), detach=True)
    call = h.stub.Edit(request, metadata=support.AUTH, timeout=60)
    job_id = str(next(call).event.job_id)
    call.cancel()  # detached: the job goes on
    assert support.wait_for(lambda: h.server.streams.open_calls == 0)
    return job_id


def open_watch(h: Any, job_id: str) -> tuple[Any, grpc.StatusCode, str]:
    """Open one WatchJob stream and wait for its first answer: an event (the stream is open)
    or the status that refused it."""
    call = h.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=support.AUTH, timeout=120)
    try:
        next(call)
    except grpc.RpcError as e:
        return call, e.code(), e.details() or ""
    return call, grpc.StatusCode.OK, ""


def test_64_idle_watch_streams_leave_health_serving_and_the_rest_are_refused(harness: Any) -> None:
    per_client = harness.server.settings.max_streams_per_client
    job_id = held_job(harness)
    opened = [open_watch(harness, job_id) for _ in range(64)]
    try:
        codes = [code for _, code, _ in opened]
        assert codes.count(grpc.StatusCode.OK) == per_client
        refused = [details for _, code, details in opened if code != grpc.StatusCode.OK]
        assert len(refused) == 64 - per_client
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in codes[per_client:])
        assert "FORGEDIT_MAX_STREAMS_PER_CLIENT" in refused[0]
        # Liveness and readiness answer, on the gRPC port and on the probes' own port.
        health_channel = grpc.insecure_channel(
            f"127.0.0.1:{harness.server.health_port}", options=client_options()
        )
        with health_channel:
            for channel in (harness.channel, health_channel):
                assert check(channel, "") == SERVING
                assert check(channel, SERVICE_NAME) == SERVING
        # Unary calls still get through while the streams stay open.
        job, outcome = support.unary(harness.stub.GetJob, pb.GetJobRequest(job_id=job_id))
        assert outcome.code == grpc.StatusCode.OK and job.job.job_id == job_id
    finally:
        for call, _, _ in opened:
            call.cancel()
    # Slots come back when streams end: a new stream is accepted again.
    assert support.wait_for(
        lambda: open_watch(harness, job_id)[1] == grpc.StatusCode.OK, timeout=30
    )


def test_refused_stream_says_which_bound_and_when_to_retry(harness: Any) -> None:
    job_id = held_job(harness)
    per_client = harness.server.settings.max_streams_per_client
    opened = [open_watch(harness, job_id) for _ in range(per_client + 1)]
    try:
        call = opened[-1][0]
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        from grpc_status import rpc_status

        status = rpc_status.from_call(call)
        assert status is not None
        kinds = {d.TypeName() for d in status.details}
        assert {"google.rpc.QuotaFailure", "google.rpc.RetryInfo"} <= kinds
    finally:
        for call, _, _ in opened:
            call.cancel()


# ----------------------------------------------------------------------- before the payload


def test_unauthenticated_call_is_refused_before_its_payload_is_read(harness: Any) -> None:
    """The client sends headers but holds its message back: a server that read the payload
    before authenticating would wait for it (and the call would hit its deadline); the front
    door answers UNAUTHENTICATED while the message is still unsent."""
    release = threading.Event()

    def held_back() -> Iterator[bytes]:
        release.wait(60)
        yield pb.GetJobRequest(job_id="job_x").SerializeToString()

    call = harness.channel.stream_unary(f"{METHOD}GetJob")
    try:
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            future = call.future(held_back(), metadata=metadata, timeout=20)
            error = future.exception(timeout=30)
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert not release.is_set()
    finally:
        release.set()


def test_malformed_protobuf_is_invalid_argument_and_unauthenticated_first(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    get_job = harness.channel.unary_unary(f"{METHOD}GetJob")
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as raised:
            get_job(b"\xff\xff\xff\xff", metadata=support.AUTH, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "forgedit.v1.GetJobRequest" in (raised.value.details() or "")
    with pytest.raises(grpc.RpcError) as raised:
        get_job(b"\xff\xff\xff\xff", timeout=10)  # no token: that is said first
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Five malformed requests cost the log at most one brief line (one per 10 s).
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if "malformed request" in r.getMessage()]) <= 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_prompt_with_invalid_utf8_is_invalid_argument_naming_the_field(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    field = pb.EditRequest.DESCRIPTOR.fields_by_name["target_prompts"].number
    payload = bytes([field << 3 | 2, 3, 0x61, 0xFF, 0xFE])  # "a" + invalid UTF-8
    edit = harness.channel.unary_stream(f"{METHOD}Edit")
    with pytest.raises(grpc.RpcError) as raised:
        list(edit(payload, metadata=support.AUTH, timeout=10))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target_prompts" in (error.details() or "") and "UTF-8" in (error.details() or "")
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["target_prompts"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert check(harness.channel, SERVICE_NAME) == SERVING


# ------------------------------------------------------------------------------ reflection


@pytest.mark.parametrize("port", ["grpc", "health"])
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha_list_the_service(harness: Any, version: str, port: str) -> None:
    """On the probes' port without a token; on the gRPC port, where tokens are configured,
    with one (an anonymous reflection stream would hold a thread no principal accounts for)."""
    channel = harness.channel
    if port == "health":
        channel = grpc.insecure_channel(f"127.0.0.1:{harness.server.health_port}")
    info = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    if port == "grpc":
        with pytest.raises(grpc.RpcError) as refused:
            list(info(iter([request]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metadata = support.AUTH if port == "grpc" else ()
    (response,) = list(info(iter([request]), metadata=metadata, timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection"} <= names
    if port == "health":
        channel.close()


def test_open_reflection_streams_cannot_take_the_health_ports_threads(harness: Any) -> None:
    """Reflection streams left open on the health port are bounded; health still answers."""
    channel = grpc.insecure_channel(f"127.0.0.1:{harness.server.health_port}")
    release = threading.Event()

    def idle() -> Iterator[Any]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(60)  # keep the stream open

    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    calls = [info(idle(), timeout=60) for _ in range(6)]
    try:
        outcomes = []
        for call in calls:
            try:
                next(call)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                outcomes.append(e.code())
        assert outcomes.count(grpc.StatusCode.OK) == HEALTH_PORT_REFLECTION_STREAMS
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6 - outcomes.count(
            grpc.StatusCode.OK
        )
        assert check(channel, "") == SERVING and check(channel, SERVICE_NAME) == SERVING
    finally:
        release.set()
        for call in calls:
            call.cancel()
        channel.close()
