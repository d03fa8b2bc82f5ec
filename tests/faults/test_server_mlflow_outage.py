"""The registry is a dependency, not a single point of failure: a real server against a real
``mlflow server`` that is killed and restarted, or hung (SIGSTOP: the process holds its socket
but answers nothing). One scenario per test, each with its own server and MLflow, resources
(threads, fds, temp files) checked afterwards.

- Killed: a cached edit model is still sampled; listing, describing and deleting answer
  UNAVAILABLE with a retry hint (and a refused delete keeps the cached copy); an Edit spools;
  after the restart the spool drains and every edit model has exactly one version.
- Hung: every request that needs MLflow ends UNAVAILABLE before its own deadline (none hangs
  until DEADLINE_EXCEEDED), health stays SERVING, a cached edit model is still sampled, an
  Edit spools instead of waiting out MLflow's timeouts, and the threads waiting for MLflow
  stay bounded.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from support import server as support
from support.registry import MlflowServer

from registry import EditModelRegistry, RegistryConfig
from server._proto import forgedit_pb2 as pb

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]

MODEL = "outage-edit-models"
UNKNOWN_ID = "em_" + "a" * 26


@pytest.fixture()
def mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    # MLflow reads its HTTP settings from the environment on every request; the first registry
    # of a process would otherwise decide them for every later test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    yield server
    if server.pgid is not None and server.group_alive():
        os.killpg(server.pgid, signal.SIGCONT)
    server.stop()
    assert not server.group_alive(), "mlflow server processes outlived stop()"


def _registry(tmp_path: Path, uri: str) -> EditModelRegistry:
    return EditModelRegistry(
        RegistryConfig(
            data_dir=tmp_path / "data" / "registry",
            tracking_uri=uri,
            registered_model=MODEL,
            experiment=MODEL,
            flush_initial_backoff_s=0.5,
            flush_max_backoff_s=2.0,
        )
    )


def _sample(edit_model_id: str) -> pb.SampleRequest:
    return pb.SampleRequest(
        edit_model_id=edit_model_id,
        target_prompts=["A photo of a pear."],
        sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[1]),
    )


def _edit_and_register(h: support.Harness, photo: bytes, seed: int = 7) -> pb.RegisteredEvent:
    outcome = support.stream(h.stub.Edit, support.edit_request(photo, training={"seed": seed}))
    assert outcome.code == grpc.StatusCode.OK, (outcome.details, outcome.kinds())
    return outcome.of("registered")[0]


def _assert_unavailable_with_hint(outcome: support.Outcome, what: str) -> None:
    assert outcome.code == grpc.StatusCode.UNAVAILABLE, f"{what}: {outcome.code} {outcome.details}"
    assert outcome.detail(error_details_pb2.RetryInfo) is not None, what


def _registry_calls(h: support.Harness, edit_model_id: str) -> dict[str, Any]:
    """Every request kind that needs MLflow, as (method, request)."""
    return {
        "list": (h.stub.ListEditModels, pb.ListEditModelsRequest()),
        "list_filtered": (h.stub.ListEditModels, pb.ListEditModelsRequest(base_model="tiny")),
        "describe": (h.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=edit_model_id)),
        "delete": (h.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=edit_model_id)),
    }


def test_mlflow_killed_then_restarted(
    tmp_path: Path, tiny_model_dir: Path, mlflow: MlflowServer
) -> None:
    registry = _registry(tmp_path, mlflow.uri)
    photo = support.encoded("PNG", (64, 64))
    try:
        with support.running_server(tmp_path, tiny_model_dir, registry=registry) as h:
            registered = _edit_and_register(h, photo)
            assert not registered.spooled and registered.version >= 1
            before = support.Resources.now()

            mlflow.kill()
            # The replica's own verified copy is sampled without the registry.
            sampled = support.stream(h.stub.Sample, _sample(registered.edit_model_id))
            assert sampled.code == grpc.StatusCode.OK, sampled.details
            assert len(sampled.of("image")) == 1

            for what, (call, request) in _registry_calls(h, registered.edit_model_id).items():
                _, outcome = support.unary(call, request)
                _assert_unavailable_with_hint(outcome, what)
            # The refused delete kept the cached copy: it is sampled again.
            again = support.stream(h.stub.Sample, _sample(registered.edit_model_id))
            assert again.code == grpc.StatusCode.OK, again.details
            # Not cached here and MLflow down: UNAVAILABLE, not INTERNAL.
            unknown = support.stream(h.stub.Sample, _sample(UNKNOWN_ID))
            _assert_unavailable_with_hint(unknown, "sample of an uncached id")
            spooled = _edit_and_register(h, photo, seed=8)
            assert spooled.spooled

            mlflow.start()
            trash = h.data_dir / "registry" / "spool" / "trash"
            assert support.wait_for(
                # Flushed, and the flusher done deleting the entry (rename, then rmtree).
                lambda: registry.spool_size()[0] == 0 and not any(trash.iterdir()),
                timeout=60,
            )
            listed, outcome = support.unary(h.stub.ListEditModels, pb.ListEditModelsRequest())
            assert outcome.code == grpc.StatusCode.OK, outcome.details
            ids = [m.edit_model_id for m in listed.edit_models]
            assert sorted(ids) == sorted({registered.edit_model_id, spooled.edit_model_id})
            support.assert_nothing_left_behind(h)
            support.assert_resources_back(before)
    finally:
        registry.close()


def test_mlflow_hung_requests_end_unavailable_before_their_deadline(
    tmp_path: Path,
    tiny_model_dir: Path,
    mlflow: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MLflow's own HTTP timeout and retries as in production (the server's defaults): no
    # request or job may wait for them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    registry = _registry(tmp_path, mlflow.uri)
    photo = support.encoded("PNG", (64, 64))
    clients = 16
    try:
        with support.running_server(
            tmp_path, tiny_model_dir, registry=registry, registry_threads=4
        ) as h:
            registered = _edit_and_register(h, photo)
            before = support.Resources.now()
            assert mlflow.pgid is not None
            os.killpg(mlflow.pgid, signal.SIGSTOP)

            calls = _registry_calls(h, UNKNOWN_ID)  # a delete that may complete later is harmless
            outcomes: list[tuple[str, support.Outcome]] = []
            lock = threading.Lock()

            def client(i: int) -> None:
                what = sorted(calls)[i % len(calls)]
                call, request = calls[what]
                if i % 5 == 4:  # an uncached id: its description needs MLflow
                    what, result = (
                        "sample",
                        support.stream(h.stub.Sample, _sample(UNKNOWN_ID), timeout=3.0),
                    )
                else:
                    _, result = support.unary(call, request, timeout=3.0)
                with lock:
                    outcomes.append((what, result))

            def burst() -> None:
                threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
                for t in threads:
                    t.start()
                # Health answers while every request waits for MLflow.
                assert h.health() == health_pb2.HealthCheckResponse.SERVING
                for t in threads:
                    t.join(60)

            burst()
            assert len(outcomes) == clients
            for what, outcome in outcomes:
                _assert_unavailable_with_hint(outcome, what)
            # A second burst needs no more threads: those waiting for MLflow are bounded.
            after_first = support.Resources.now()
            outcomes.clear()
            burst()
            assert all(o.code == grpc.StatusCode.UNAVAILABLE for _, o in outcomes)
            after_second = support.Resources.now()
            assert after_second.threads <= after_first.threads
            assert after_second.pooled <= after_first.pooled
            waiting = [t for t in threading.enumerate() if t.name.startswith("registry-call")]
            assert len(waiting) <= 4

            # A cached edit model is still sampled, well within MLflow's HTTP timeout.
            sampled = support.stream(h.stub.Sample, _sample(registered.edit_model_id), timeout=30)
            assert sampled.code == grpc.StatusCode.OK, sampled.details
            # An Edit neither waits out MLflow's timeouts: its lookups give up, it spools.
            spooled = _edit_and_register(h, photo, seed=8)
            assert spooled.spooled
            assert h.health() == health_pb2.HealthCheckResponse.SERVING

            os.killpg(mlflow.pgid, signal.SIGCONT)
            trash = h.data_dir / "registry" / "spool" / "trash"
            assert support.wait_for(
                lambda: registry.spool_size()[0] == 0 and not any(trash.iterdir()), timeout=120
            )
            # Answered again once MLflow has worked off the calls that waited for it.
            assert support.wait_for(
                lambda: (
                    support.unary(h.stub.ListEditModels, pb.ListEditModelsRequest())[1].code
                    == grpc.StatusCode.OK
                ),
                timeout=60,
                interval=0.5,
            )
            support.assert_nothing_left_behind(h)
            support.assert_resources_back(before)
    finally:
        registry.close()


def test_mlflow_hung_every_sample_of_a_cached_model_is_served(
    tmp_path: Path,
    tiny_model_dir: Path,
    mlflow: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 21.7: a cached, verified edit model is sampled without MLflow, always; also while
    another job holds its cache lock (loading it from disk, which asks MLflow whether it still
    exists and waits out ``confirm_timeout_s`` on a hung MLflow). Three cached models through
    a memory cache of two, so loads keep going to disk while other Samples of the same model
    are described."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    registry = _registry(tmp_path, mlflow.uri)
    photo = support.encoded("PNG", (64, 64))
    try:
        with support.running_server(tmp_path, tiny_model_dir, registry=registry) as h:
            models = [_edit_and_register(h, photo, seed=s).edit_model_id for s in (7, 8, 9)]
            before = support.Resources.now()
            assert mlflow.pgid is not None
            os.killpg(mlflow.pgid, signal.SIGSTOP)

            outcomes: list[support.Outcome] = []
            lock = threading.Lock()

            def client(i: int) -> None:
                for n in range(3):
                    edit_model_id = models[(i + n) % len(models)]
                    result = support.stream(h.stub.Sample, _sample(edit_model_id), timeout=120)
                    with lock:
                        outcomes.append(result)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            codes = [(o.code, o.details) for o in outcomes if o.code != grpc.StatusCode.OK]
            assert len(outcomes) == 12 and not codes, codes
            assert all(len(o.of("image")) == 1 for o in outcomes)

            os.killpg(mlflow.pgid, signal.SIGCONT)
            support.assert_nothing_left_behind(h, timeout=120)
            support.assert_resources_back(before)
    finally:
        registry.close()
