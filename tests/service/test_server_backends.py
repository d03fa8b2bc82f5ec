"""``FORGEDIT_UNET_BACKEND=onnxruntime`` against torch, through real servers sharing one real
registry: the same edits within 2/255 (vs and vp, several strategies, an edit model just
trained and the same one loaded from the registry, two edit models one after the other), the
backend reported in ``CompletedEvent`` timings and in the metrics."""

from __future__ import annotations

import io
import re
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from support.server import (
    assert_nothing_left_behind,
    edit_request,
    running_server,
    sample_photo,
    stream,
)

from server._proto import forgedit_pb2 as pb

VS = pb.SweepOptions(
    steps=4, gammas=[0.6, 1.0], seeds=[3], forget_strategies=["encoderkv", "noencoder"]
)
VP = pb.SweepOptions(
    steps=4,
    gammas=[0.8],
    alphas=[0.9],
    seeds=[5],
    interpolation=pb.INTERPOLATION_VP,
    forget_strategies=["donotforget", "encoderattn"],
)


def pixels(outcome: Any) -> list[np.ndarray]:
    images = sorted(outcome.of("image"), key=lambda i: i.index)
    return [np.asarray(Image.open(io.BytesIO(i.png)), dtype=np.int16) for i in images]


def max_difference(a: Any, b: Any) -> int:
    pa, pb_ = pixels(a), pixels(b)
    assert len(pa) == len(pb_) > 0
    return max(int(np.abs(x - y).max()) for x, y in zip(pa, pb_, strict=True))


def sample(harness: Any, edit_model_id: str, sweep: pb.SweepOptions) -> Any:
    request = pb.SampleRequest(
        edit_model_id=edit_model_id, target_prompts=["A photo of a pear."], sweep=sweep
    )
    outcome = stream(harness.stub.Sample, request)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    return outcome


@pytest.fixture(scope="module")
def onnxruntime_results(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    registry: Any,
) -> dict[str, Any]:
    """On the ONNX Runtime server: two fresh edit models, each sampled right after training
    (vs), then the first sampled again after the second (vp)."""
    results: dict[str, Any] = {}
    with running_server(
        tmp_path_factory.mktemp("server-ort"),
        tiny_model_dir,
        registry=registry,
        unet_backend="onnxruntime",
    ) as h:
        # Ready means exported: the export happened at start-up, not inside a request.
        (entry,) = (h.data_dir / "engines" / "onnx").iterdir()
        assert (entry / "manifest.json").is_file() and (entry / "unet.onnx").is_file()
        for name, seed in (("a", 7), ("b", 8)):
            request = edit_request(
                sample_photo(),
                request_id=f"ort-{name}",
                training={"seed": seed},
                sweep={"steps": 4, "gammas": [0.6, 1.0], "seeds": [3]},
            )
            request.sweep.forget_strategies[:] = ["encoderkv", "noencoder"]
            outcome = stream(h.stub.Edit, request)
            assert outcome.code == grpc.StatusCode.OK, outcome.details
            results[f"edit_{name}"] = outcome
            results[f"id_{name}"] = outcome.of("completed")[0].edit_model_id
        results["vp_a"] = sample(h, results["id_a"], VP)
        results["vp_b"] = sample(h, results["id_b"], VP)
        url = f"http://127.0.0.1:{h.server.metrics_port}/metrics"
        results["metrics"] = urllib.request.urlopen(url, timeout=10).read().decode()
        assert_nothing_left_behind(h)
    return results


def test_onnxruntime_server_reports_its_backend(onnxruntime_results: dict[str, Any]) -> None:
    for key in ("edit_a", "edit_b", "vp_a", "vp_b"):
        completed = onnxruntime_results[key].of("completed")[0]
        assert completed.timings.sampling_backend == "onnxruntime"
    metrics = onnxruntime_results["metrics"]
    assert 'forgedit_sampling_image_seconds_count{backend="onnxruntime",method="Edit"} 8.0' in (
        metrics
    )
    assert 'forgedit_sampling_image_seconds_count{backend="torch",method="Edit"} 0.0' in metrics
    # One observation per image (2 edits x 4 images; 2 samples x 2 images).
    assert (
        'forgedit_sampling_image_seconds_count{backend="onnxruntime",method="Sample"} 4.0'
        in metrics
    )
    assert re.search(r'forgedit_unet_backend_degraded\{base_model="[^"]+"\} 0\.0', metrics)
    # Every fallback series exists, at 0: nothing fell back.
    assert (
        'forgedit_unet_backend_fallbacks_total{backend="tensorrt",reason="canary_failed"} 0.0'
        in metrics
    )
    assert (
        'forgedit_unet_backend_fallbacks_total{backend="onnxruntime",reason="not_installed"} 0.0'
        in metrics
    )


def test_torch_server_samples_the_same_edits(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    registry: Any,
    onnxruntime_results: dict[str, Any],
) -> None:
    """The torch server loads both edit models from the registry and samples the same sweeps:
    the fresh-trained vs images and the later vp images match within 2/255."""
    r = onnxruntime_results
    with running_server(
        tmp_path_factory.mktemp("server-torch"), tiny_model_dir, registry=registry
    ) as h:
        vs_a = sample(h, r["id_a"], VS)
        vs_b = sample(h, r["id_b"], VS)
        vp_a = sample(h, r["id_a"], VP)
        vp_b = sample(h, r["id_b"], VP)
        assert_nothing_left_behind(h)
    assert vs_a.of("completed")[0].timings.sampling_backend == "torch"
    assert max_difference(vs_a, r["edit_a"]) <= 2
    assert max_difference(vs_b, r["edit_b"]) <= 2
    assert max_difference(vp_a, r["vp_a"]) <= 2
    assert max_difference(vp_b, r["vp_b"]) <= 2
    # The two edit models differ, so stale weights of one under the other would have shown.
    assert max_difference(vs_a, vs_b) > 2


@pytest.mark.backend_fallback("tensorrt:no_cuda")
def test_a_backend_that_cannot_serve_is_counted_and_the_next_one_serves(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FORGEDIT_UNET_BACKEND=tensorrt on this CPU machine: TensorRT cannot serve (no CUDA), so
    the replica becomes ready on ONNX Runtime, says why in the log, and counts it."""
    with (
        caplog.at_level("WARNING", logger="forgedit.backends"),
        running_server(tmp_path, tiny_model_dir, unet_backend="tensorrt") as h,
    ):
        url = f"http://127.0.0.1:{h.server.metrics_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    assert (
        'forgedit_unet_backend_fallbacks_total{backend="tensorrt",reason="no_cuda"} 1.0' in metrics
    )
    assert (
        'forgedit_unet_backend_fallbacks_total{backend="onnxruntime",reason="canary_failed"} 0.0'
        in metrics
    )
    assert any(
        "UNet backend tensorrt unavailable (no_cuda)" in r.getMessage() for r in caplog.records
    )
    # The state the fallback alert reads: this replica serves on a fallback backend.
    assert re.search(r'forgedit_unet_backend_degraded\{base_model="[^"]+"\} 1\.0', metrics)
