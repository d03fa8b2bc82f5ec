"""Floods against a real server (real tiny engine, real embedded registry), one server per
scenario: clients that need no token, or one greedy principal, must not take the capacity that
everyone else's work needs, and the replica's readiness stays true (issues 21.1 and 21.3).

- Anonymous streams: reflection and ``Health.Watch`` need no token (reflection on the gRPC port
  used not to either) and were not counted, so 64 of them took every concurrent-call slot of
  the gRPC port; authenticated calls then got RESOURCE_EXHAUSTED while the probes' port still
  said SERVING. Health calls whose request is held back did the same.
- Greedy principals: the stream bound (48) was three per-client bounds (16), so three clients
  took every slot; with ``detach`` one principal filled the whole queue.

Each scenario ends with the server idle and ready, and the process's threads and file
descriptors back where they were.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from support import server as support

from server._proto import forgedit_pb2 as pb
from server.main import default_engine_factory
from server.service import SERVICE_NAME
from server.settings import ServerSettings
from server.transport import client_options

SERVING = health_pb2.HealthCheckResponse.SERVING
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
QUICK_TRAINING = {"updates": 2, "batch_size": 1}


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Held:
    """Calls left open by a flood: each waits on ``release`` to send (or finish) its request."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[Any] = []

    def requests(self, first: Any) -> Iterator[Any]:
        if first is not None:
            yield first
        self.release.wait(120)

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def first_answer(call: Any) -> grpc.StatusCode:
    """OK once a streaming call answered (it is open), else the status that ended it."""
    try:
        next(call)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def refused_by(call: Any) -> str:
    """The QuotaFailure subject of a refused call."""
    status = rpc_status.from_call(call)
    assert status is not None, call.details()
    for detail in status.details:
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(quota):
            return str(quota.violations[0].subject)
    raise AssertionError(f"no QuotaFailure in {call.details()}")


def ready(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


# ----------------------------------------------------------------------------- anonymous


def test_anonymous_streams_and_held_health_calls_leave_authenticated_work_its_capacity(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    before = support.Resources.now()
    held = Held()
    with support.running_server(tmp_path, tiny_model_dir) as h:
        try:
            channel = h.channel
            reflect = channel.stream_stream(
                REFLECTION,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            watch = health_pb2_grpc.HealthStub(channel).Watch
            check = channel.stream_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            # 1. 64 anonymous reflection streams, left open: a token is needed on this port.
            streams = [reflect(held.requests(listing), timeout=120) for _ in range(64)]
            held.calls += streams
            assert {first_answer(c) for c in streams} == {grpc.StatusCode.UNAUTHENTICATED}
            # 2. 32 health watches: a few, counted by address, the rest refused at once.
            watches = [
                watch(health_pb2.HealthCheckRequest(service=""), timeout=120) for _ in range(32)
            ]
            held.calls += watches
            codes = [first_answer(c) for c in watches]
            assert codes.count(grpc.StatusCode.OK) == 2, codes  # a quarter of the 8 per address
            refused = [c for c, code in zip(watches, codes, strict=True) if code.name != "OK"]
            assert {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert refused_by(refused[0]).startswith("health-calls")
            # 3. 32 health checks whose request is held back: refused before it is read.
            checks = [check.future(held.requests(None), timeout=60) for _ in range(32)]
            held.calls += checks
            for future in checks:
                error = future.exception(timeout=30)
                assert isinstance(error, grpc.RpcError), "a held-back health check was admitted"
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # Authenticated work still has its capacity: unary calls and a whole Edit.
            _, outcome = support.unary(h.stub.ListEditModels, pb.ListEditModelsRequest())
            assert outcome.code == grpc.StatusCode.OK, outcome.details
            made = support.stream(
                h.stub.Edit, support.edit_request(support.sample_photo(), training=QUICK_TRAINING)
            )
            assert made.code == grpc.StatusCode.OK, made.details
            # ... and readiness says so truthfully.
            assert h.server.health_port is not None and ready(h.server.health_port) == SERVING
        finally:
            held.close()
        assert support.wait_for(lambda: h.server.streams.open_calls == 0)
        support.assert_nothing_left_behind(h)
    support.assert_resources_back(before)


def test_without_tokens_reflection_streams_count_like_any_stream(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """On a replica without tokens every call is anonymous: reflection streams count per
    address in the same pool as Edit, Sample and WatchJob, so unary calls keep their threads."""
    before = support.Resources.now()
    held = Held()
    with support.running_server(tmp_path, tiny_model_dir, tokens=()) as h:
        try:
            reflect = h.channel.stream_stream(
                REFLECTION,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            streams = [reflect(held.requests(listing), timeout=120) for _ in range(64)]
            held.calls += streams
            codes = [first_answer(c) for c in streams]
            per_client = h.server.settings.max_streams_per_client
            assert codes.count(grpc.StatusCode.OK) == per_client, codes
            refused = [c for c, code in zip(streams, codes, strict=True) if code.name != "OK"]
            assert refused_by(refused[0]) == "streams-per-client"
            assert "FORGEDIT_MAX_STREAMS_PER_CLIENT" in (refused[0].details() or "")
            _, outcome = support.unary(
                h.stub.ListEditModels, pb.ListEditModelsRequest(), metadata=()
            )
            assert outcome.code == grpc.StatusCode.OK, outcome.details
        finally:
            held.close()
        assert support.wait_for(lambda: h.server.streams.open_calls == 0)
        support.assert_nothing_left_behind(h)
    support.assert_resources_back(before)


# ----------------------------------------------------------------------------- greedy


class HeldEngine:
    """The real engine, whose fine-tunes wait until ``gate`` opens (or their job is
    cancelled): jobs stay running or queued for as long as the test needs."""

    def __init__(self, engine: Any, gate: threading.Event) -> None:
        self._engine = engine
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def finetune(self, *args: Any, **kwargs: Any) -> Any:
        while not self._gate.wait(0.02):
            kwargs["cancel"].check()
        return self._engine.finetune(*args, **kwargs)


PRINCIPALS = ("a", "b", "c", "d", "e")
TOKENS = {name: f"{name}-token-0123456789" for name in PRINCIPALS}


def test_greedy_principals_cannot_lock_the_others_out(tmp_path: Path, tiny_model_dir: Path) -> None:
    before = support.Resources.now()
    gate = threading.Event()
    settings = ServerSettings(
        base_models={"tiny": tiny_model_dir / "stable-diffusion"}, blip_dir=tiny_model_dir / "blip"
    )
    real = default_engine_factory(settings, dict(settings.base_models))
    tokens = [{"name": n, "token": t} for n, t in TOKENS.items()]
    opened: list[Any] = []
    with support.running_server(
        tmp_path,
        tiny_model_dir,
        tokens=tokens,
        engine_factory=lambda name, device: HeldEngine(real(name, device), gate),
    ) as h:
        jobs: dict[str, list[str]] = {n: [] for n in PRINCIPALS}

        def detached(name: str) -> tuple[grpc.StatusCode, Any]:
            """Submit a detached Edit as ``name``; (its status so far, the refused call)."""
            request = support.edit_request(
                support.sample_photo(), training=QUICK_TRAINING, detach=True
            )
            call = h.stub.Edit(request, metadata=auth(TOKENS[name]), timeout=60)
            try:
                jobs[name].append(next(call).event.job_id)
            except grpc.RpcError:
                return call.code(), call
            call.cancel()  # detached: the job goes on
            return grpc.StatusCode.OK, None

        def watch(name: str) -> tuple[grpc.StatusCode, Any]:
            request = pb.WatchJobRequest(job_id=jobs[name][0])
            call = h.stub.WatchJob(request, metadata=auth(TOKENS[name]), timeout=120)
            opened.append(call)
            return first_answer(call), call

        try:
            # One job each for a..d to watch (a's runs, held; the others wait).
            for name in "abcd":
                assert detached(name)[0] == grpc.StatusCode.OK
            assert support.wait_for(lambda: h.server.streams.open_calls == 0)

            # Streams: three greedy principals take what they may, a fourth still gets one.
            per_client = h.server.settings.max_streams_per_client  # 16 of 48, 12 kept
            taken = {}
            for name in "abc":
                codes = []
                while not codes or codes[-1] == grpc.StatusCode.OK:
                    code, call = watch(name)
                    codes.append(code)
                taken[name] = len(codes) - 1
                last = call
            assert taken == {"a": per_client, "b": per_client, "c": 48 - 12 - 2 * per_client}
            assert last.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused_by(last) == "streams-kept-for-new-clients"
            assert "FORGEDIT_STREAMS_KEPT_FOR_NEW_CLIENTS" in (last.details() or "")
            code, _ = watch("d")
            assert code == grpc.StatusCode.OK, "a fourth principal was locked out"
            code, refused = watch("d")
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # its first only, from the kept
            for call in opened:
                call.cancel()
            assert support.wait_for(lambda: h.server.streams.open_calls == 0)

            # The queue: a queues detached jobs until refused; e, with none, still gets in.
            waiting = h.scheduler.queue_depth()  # b, c and d's
            while (result := detached("a"))[0] == grpc.StatusCode.OK:
                pass
            code, refused = result
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert h.scheduler.queue_depth() == 16 - 4  # the last quarter kept
            assert len(jobs["a"]) - 1 == 12 - waiting  # a's first one is running
            assert refused_by(refused) == "job-queue-kept-for-new-clients"
            retry = rpc_status.from_call(refused)
            assert retry is not None and any(
                d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in retry.details
            )
            assert "FORGEDIT_QUEUE_KEPT_FOR_NEW_CLIENTS" in (refused.details() or "")
            assert detached("e")[0] == grpc.StatusCode.OK, "e was locked out of the queue"
            # ... and waits for one of a's jobs at most, not for all of them.
            e_job = h.scheduler.get(jobs["e"][0])
            a_jobs = [h.scheduler.get(j) for j in jobs["a"][1:]]
            assert e_job.queue_position < sorted(j.queue_position for j in a_jobs)[1]
        finally:
            for call in opened:
                call.cancel()
            for name, ids in jobs.items():
                for job_id in ids:
                    support.unary(
                        h.stub.CancelJob,
                        pb.CancelJobRequest(job_id=job_id),
                        metadata=auth(TOKENS[name]),
                    )
            gate.set()
        assert support.wait_for(lambda: h.server.streams.open_calls == 0)
        support.assert_nothing_left_behind(h)
    support.assert_resources_back(before)
