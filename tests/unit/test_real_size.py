"""The real size, in CI: ``make-random-model --preset sd1`` (SD 1.x's UNet, CLIP ViT-L/14 text
encoder and VAE with random weights: 860 M UNet parameters, 3.4 GB of fp32 weights, over
protobuf's 2 GB limit) and ``build-engine --backend onnxruntime --json`` on it, each in its own
process, exactly as an operator runs them. The export must keep every weight in the external-
data file, ONNX Runtime must load the graph from it, and the canary must hold on the base and
with a random edit model bound.

Cost (BENCHMARKS.md, "Real size"): the build takes about 160 s of CPU and 12.8 GiB at its peak
(6.4 minutes of wall clock under a load average of 6), the model about a minute and 4.5 GiB;
4.3 GB + 3.4 GB of disk under the test's temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROTOBUF_LIMIT = 2**31


def forgedit(*args: object, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "forgedit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_the_sd1_size_exports_builds_and_passes_its_canary(tmp_path: Path) -> None:
    import onnx

    model = tmp_path / "sd1"
    made = forgedit("make-random-model", "--preset", "sd1", model, timeout=900)
    assert made.returncode == 0, made.stderr
    cache = tmp_path / "engines"
    built = forgedit(
        "build-engine",
        "--base-model",
        model,
        "--backend",
        "onnxruntime",
        "--max-batch",
        "1",
        "--engine-cache",
        cache,
        "--json",
        timeout=1800,
    )
    assert built.returncode == 0, built.stderr
    figures = json.loads(built.stdout)
    assert figures["backend"] == "onnxruntime" and figures["size"] == "512x512"
    assert figures["unet_parameters"] == 859_520_964
    assert figures["weights_bytes"] > PROTOBUF_LIMIT  # the point of this test
    canary = figures["canary"]
    assert canary["base_relative_error"] < canary["tolerance"]
    assert canary["edit_model_relative_error"] < canary["tolerance"]
    assert canary["edit_model_tensors"] == 518
    # The graph files are small; every weight lives in the external-data file beside them.
    (entry,) = (cache / "onnx").iterdir()
    for name in ("unet.onnx", "unet-constants.onnx"):
        graph = onnx.load(str(entry / name), load_external_data=False)
        assert (entry / name).stat().st_size < 4_000_000
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    assert (entry / "unet.weights").stat().st_size == figures["weights_bytes"]
