"""Declared resolutions and the startup probe, through real servers on loopback (the tiny
model, ONNX Runtime where a graph is compiled, one real registry shared by the servers).

- ``forgedit.v1.Engines`` (the startup probe's health name) is NOT_SERVING while the engines
  warm up, SERVING once every declared resolution is ready, and never if one cannot be.
- A replica serves the sizes of ``FORGEDIT_RESOLUTIONS``, built at start-up: a request at one
  of them compiles nothing new; one at another size is refused with INVALID_ARGUMENT naming
  the served sizes (an Edit's size, or the size a Sample's edit model was trained at), and
  the replica stays ready; with ``FORGEDIT_OTHER_RESOLUTIONS=torch`` it is served on torch,
  still without building a graph.
- ``forgedit_unet_compiled_bytes{base_model}`` counts the compiled graphs' memory.

About 40 s on an idle 2-core machine, 2 minutes under load (three ONNX Runtime exports of the
tiny UNet, four short jobs).
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.server import (
    assert_nothing_left_behind,
    edit_request,
    refused,
    running_server,
    sample_photo,
    stream,
)

from forgedit.errors import EngineNotReadyError
from server._proto import forgedit_pb2 as pb
from server.lifecycle import ENGINES_SERVICE, READINESS_SERVICE
from server.main import create_server, default_engine_factory
from server.settings import ServerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def metrics_of(harness: Any) -> str:
    url = f"http://127.0.0.1:{harness.server.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def compiled_bytes(metrics: str) -> float:
    match = re.search(r'forgedit_unet_compiled_bytes\{base_model="tiny"\} (\S+)', metrics)
    assert match, "no forgedit_unet_compiled_bytes series"
    return float(match.group(1))


def exports(harness: Any) -> list[Path]:
    return sorted((harness.data_dir / "engines" / "onnx").iterdir())


def edit_at(width: int, height: int, request_id: str) -> pb.EditRequest:
    return edit_request(
        sample_photo(),
        request_id=request_id,
        training={"width": width, "height": height},
        sweep={"steps": 2, "gammas": [0.6], "seeds": [3]},
    )


@pytest.fixture(scope="module")
def off_size_edit_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, registry: Any
) -> str:
    """An edit model trained at 96x96 on a replica that serves only the native 64x64 compiled
    and other sizes on torch (``FORGEDIT_OTHER_RESOLUTIONS=torch``): the job runs, on torch,
    and builds no graph for 96x96."""
    with running_server(
        tmp_path_factory.mktemp("server-torch-others"),
        tiny_model_dir,
        registry=registry,
        unet_backend="onnxruntime",
        other_resolutions="torch",
    ) as h:
        assert len(exports(h)) == 1  # the native size, at start-up
        outcome = stream(h.stub.Edit, edit_at(96, 96, "off-size"))
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        assert outcome.of("completed")[0].timings.sampling_backend == "torch"
        assert len(exports(h)) == 1  # nothing was built inside the request
        metrics = metrics_of(h)
        assert 'forgedit_sampling_image_seconds_count{backend="torch",method="Edit"} 1.0' in (
            metrics
        )
        # Served on torch by the operator's choice: not a fallback, not degraded.
        assert 'forgedit_unet_backend_degraded{base_model="tiny"} 0.0' in metrics
        assert_nothing_left_behind(h)
        return str(outcome.of("completed")[0].edit_model_id)


@pytest.fixture(scope="module")
def declared(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, registry: Any
) -> Iterator[Any]:
    """A replica declaring 64x64 and 96x64 (width x height), refusing other sizes."""
    with running_server(
        tmp_path_factory.mktemp("server-declared"),
        tiny_model_dir,
        registry=registry,
        unet_backend="onnxruntime",
        resolutions="64x64,96x64",
    ) as h:
        # Every test here compares with an ONNX Runtime replica: one on a fallback would not be.
        assert 'forgedit_unet_backend_degraded{base_model="tiny"} 0.0' in metrics_of(h)
        yield h


def test_every_declared_resolution_is_built_before_the_replica_is_ready(declared: Any) -> None:
    assert len(exports(declared)) == 2
    assert declared.health(ENGINES_SERVICE) == SERVING
    # Both graphs are resident and counted: an ONNX Runtime session holds its own weights.
    assert compiled_bytes(metrics_of(declared)) > 2 * 1e6


def test_a_declared_size_other_than_the_native_one_samples_on_its_compiled_graph(
    declared: Any,
) -> None:
    outcome = stream(declared.stub.Edit, edit_at(96, 64, "declared-wide"))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.of("completed")[0].timings.sampling_backend == "onnxruntime"
    (image,) = outcome.of("image")
    assert (image.width, image.height) == (96, 64)
    assert len(exports(declared)) == 2  # the one built at start-up
    assert_nothing_left_behind(declared)


def test_an_edit_at_an_undeclared_size_is_refused_naming_the_served_ones(declared: Any) -> None:
    outcome = stream(declared.stub.Edit, edit_at(96, 96, "undeclared"))
    refused(
        outcome,
        "training.height",  # 96 wide is served (96x64); 96 high is not
        "96x96",
        "served resolutions: 64x64, 96x64 (FORGEDIT_RESOLUTIONS)",
    )
    outcome = stream(declared.stub.Edit, edit_at(128, 64, "undeclared-width"))
    refused(outcome, "training.width", "128x64", "64x64, 96x64")
    assert len(exports(declared)) == 2
    assert_nothing_left_behind(declared)  # nothing queued, still SERVING


def test_a_sample_of_an_edit_model_trained_at_an_undeclared_size_is_refused(
    declared: Any, off_size_edit_model: str
) -> None:
    request = pb.SampleRequest(
        edit_model_id=off_size_edit_model,
        target_prompts=["A photo of a pear."],
        sweep=pb.SweepOptions(steps=2, seeds=[1]),
    )
    outcome = stream(declared.stub.Sample, request)
    refused(
        outcome,
        "edit_model_id",
        f"edit model {off_size_edit_model} was fine-tuned at 96x96",
        "64x64, 96x64",
    )
    assert_nothing_left_behind(declared)


class _GatedWarmup:
    """The real engine, whose warm-up waits for ``gate`` (or fails, as one whose declared
    resolution could not be made ready)."""

    def __init__(self, engine: Any, gate: threading.Event, fail: bool) -> None:
        self._engine = engine
        self._gate = gate
        self._fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def warmup(self) -> None:
        self._gate.wait(60)
        if self._fail:
            raise EngineNotReadyError("base model 'tiny' is not ready at 96x64 (canary failed)")
        self._engine.warmup()


@pytest.mark.parametrize("fail", [False, True], ids=["ready", "never-ready"])
def test_the_startup_probes_service_waits_for_the_engines(
    tmp_path: Path, tiny_model_dir: Path, fail: bool
) -> None:
    """On the probes' own port: liveness at once; the startup probe's ``forgedit.v1.Engines``
    and readiness only once the engines are warmed up, and never if one cannot be."""
    settings = ServerSettings(
        grpc_port=0,
        health_port=0,
        metrics_port=None,
        data_dir=tmp_path / "data",
        base_models={"tiny": tiny_model_dir / "stable-diffusion"},
        blip_dir=tiny_model_dir / "blip",
        unet_backend="torch",
        log_format="text",
    )
    real = default_engine_factory(settings, dict(settings.base_models))
    gate = threading.Event()
    server, _ = create_server(
        settings,
        engine_factory=lambda name, device: _GatedWarmup(real(name, device), gate, fail),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.health_port}")
    health = health_pb2_grpc.HealthStub(channel)

    def status(service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health.Check(request, timeout=5).status)

    try:
        assert status("") == SERVING
        assert (status(ENGINES_SERVICE), status(READINESS_SERVICE)) == (NOT_SERVING, NOT_SERVING)
        gate.set()
        assert server.wait_ready(60) is not fail
        expected = NOT_SERVING if fail else SERVING
        assert (status(ENGINES_SERVICE), status(READINESS_SERVICE)) == (expected, expected)
        if fail:
            assert isinstance(server.lifecycle.startup_error, EngineNotReadyError)
    finally:
        gate.set()
        channel.close()
        server.stop()


@pytest.mark.gpu
def test_a_tensorrt_replica_serves_every_image_on_tensorrt(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """On a CUDA machine with TensorRT: the replica is ready only once its TensorRT engine is
    built and its canary passed, and every image of an Edit and a Sample comes from TensorRT.
    A fallback anywhere fails this test (here, and through the conftest guard): it never
    passes by comparing torch with torch."""
    pytest.importorskip("tensorrt")
    with running_server(
        tmp_path,
        tiny_model_dir,
        devices=["cuda:0"],
        unet_backend="tensorrt",
        resolutions="64x64",
        precision="fast",
    ) as h:
        assert h.health(ENGINES_SERVICE) == SERVING
        edit = stream(h.stub.Edit, edit_at(64, 64, "trt-edit"))
        assert edit.code == grpc.StatusCode.OK, edit.details
        assert edit.of("completed")[0].timings.sampling_backend == "tensorrt"
        request = pb.SampleRequest(
            edit_model_id=edit.of("completed")[0].edit_model_id,
            target_prompts=["A photo of a pear."],
            sweep=pb.SweepOptions(steps=2, seeds=[1, 2]),
        )
        sample = stream(h.stub.Sample, request)
        assert sample.code == grpc.StatusCode.OK, sample.details
        assert sample.of("completed")[0].timings.sampling_backend == "tensorrt"
        metrics = metrics_of(h)
        assert 'forgedit_unet_backend_degraded{base_model="tiny"} 0.0' in metrics
        assert not re.search(r"forgedit_unet_backend_fallbacks_total\{[^}]*\} [1-9]", metrics)
        assert not re.search(
            r'forgedit_sampling_image_seconds_count\{backend="torch",[^}]*\} [1-9]', metrics
        )
        assert compiled_bytes(metrics) > 0
        assert_nothing_left_behind(h)
