"""The mixed-FP16 graph TensorRT builds: converted once per export, cached beside it, checked.

TensorRT 11 removed the precision builder flags (``BuilderFlag.FP16`` and the rest): every network
is strongly typed, so reduced precision must live in the ONNX graph. NVIDIA's documented route is
ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``), which converts an fp32
graph to fp16 except the nodes whose inputs, outputs or initializers would overflow or lose too
much in fp16 (it runs the graph once on ONNX Runtime's CPU provider to find them). TensorRT 10.12+
builds the same strongly typed graph, so one converted graph serves both major versions.

The conversion reads ``unet-constants.onnx`` (weights as initializers) and writes ``fp16/unet.onnx``
with its weights in ``fp16/unet.weights`` (external data again: the fp16 SD UNet is 1.7 GB, and
nothing here relies on it staying under protobuf's 2 GB). ``keep_io_types=True`` keeps the
inputs and the output fp32, so a TensorRT engine takes the same tensors as every other backend.
Initializer names are kept, so the refit map (``refit_map``) is built from the converted file.

Checked before it is trusted: ONNX Runtime on the CPU runs the fp32 and the fp16 graph on the
canary's inputs (``example_inputs``), and the fp16 output must be within ``FP16_TOLERANCE`` of
the fp32 one (relative to its largest magnitude), the TensorRT canary's own tolerance: a graph
that already misses it here could never pass the canary on a GPU. (ONNX Runtime's CPU provider
computes nodes it has no fp16 kernel for in fp32 between fp16 casts, so this checks what the
conversion kept and rounded, not TensorRT's kernels, which the canary checks.)

Cache: ``fp16/manifest.json`` records the source graph's sha256, the ModelOpt, onnx and
onnxruntime versions, the options, the measured error, and the sha256 of both files; an entry
that does not match is converted again. Built in a temporary directory, published by rename.

AutoCast's cost is in its graph clean-up, quadratic in the number of nodes (about 5 minutes for
the ~4,900 nodes of an SD-1.x-shaped UNet on one CPU core, BENCHMARKS.md): once per export.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgedit.backends.base import BackendUnavailableError, Shape, example_inputs
from forgedit.backends.canary import CANARY_TOLERANCE
from forgedit.backends.onnx_export import (
    DATA_INPUTS,
    OnnxExport,
    file_records,
    mismatched_file,
    publish_entry,
)

log = logging.getLogger("forgedit.backends")

FP16_DIR = "fp16"
GRAPH_FILE = "unet.onnx"
WEIGHTS_FILE = "unet.weights"
MANIFEST_FILE = "manifest.json"
FP16_TOLERANCE = CANARY_TOLERANCE["tensorrt"]
AUTOCAST_OPTIONS = {"low_precision_type": "fp16", "keep_io_types": True}
MODELOPT_INSTALL = "pip install -r deploy/requirements/fp16.txt"


@dataclass(frozen=True)
class Fp16Graph:
    """A converted, checked graph: its file (weights beside it) and its manifest."""

    directory: Path
    manifest: dict[str, Any]
    seconds: float  # conversion + check, 0.0 when it came from the cache

    @property
    def path(self) -> Path:
        return self.directory / GRAPH_FILE

    @property
    def sha256(self) -> str:
        return str(self.manifest["files"][GRAPH_FILE]["sha256"])

    @property
    def relative_error(self) -> float:
        return float(self.manifest["relative_error"])


def import_autocast() -> Any:
    """``modelopt.onnx.autocast``, or ``BackendUnavailableError`` saying how to install it."""
    try:
        import modelopt.onnx.autocast as autocast
    except ImportError as e:
        raise BackendUnavailableError(
            f"the mixed-FP16 conversion needs NVIDIA ModelOpt AutoCast ({MODELOPT_INSTALL}): {e}",
            "not_installed",
        ) from e
    return autocast


def expected_manifest(export: OnnxExport) -> dict[str, Any]:
    import importlib.metadata

    import onnx
    import onnxruntime

    return {
        "source_graph_sha256": export.manifest["files"][export.constants_path.name]["sha256"],
        "source_weights_sha256": export.manifest["files"][export.weights_path.name]["sha256"],
        "modelopt_version": importlib.metadata.version("nvidia-modelopt"),
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "autocast": AUTOCAST_OPTIONS,
        "tolerance": FP16_TOLERANCE,
    }


def fp16_graph(export: OnnxExport, unet: Any, shape: Shape, *, threads: int = 1) -> Fp16Graph:
    """The mixed-FP16 graph of ``export``, converting and checking it if the cache has none
    that matches. ``unet`` gives the canary inputs' widths. Raises
    ``BackendUnavailableError`` (``not_installed`` without ModelOpt, ``build_failed`` if the
    conversion fails or misses the tolerance)."""
    autocast = import_autocast()
    expected = expected_manifest(export)
    entry = export.directory / FP16_DIR
    cached = _load_entry(entry, expected)
    if cached is not None:
        return cached
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{FP16_DIR}.", dir=export.directory))
    try:
        converted = _convert(autocast, export.constants_path)
        import onnx

        onnx.save_model(
            converted,
            str(staging / GRAPH_FILE),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=WEIGHTS_FILE,
            size_threshold=0,
        )
        del converted
        error = relative_difference(
            export.constants_path, staging / GRAPH_FILE, unet, shape, threads=threads
        )
        if not error <= FP16_TOLERANCE:  # NaN fails too
            raise BackendUnavailableError(
                f"the mixed-FP16 UNet graph is {error:.2e} from the fp32 one on ONNX Runtime "
                f"(tolerance {FP16_TOLERANCE:.0e}); TensorRT would fail its canary",
                "build_failed",
            )
        manifest = {
            **expected,
            "relative_error": error,
            "files": file_records(staging, (GRAPH_FILE, WEIGHTS_FILE)),
        }
        publish_entry(staging, entry, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info(
        "converted the UNet graph to mixed FP16 in %.0f s (%.2e from fp32 on ONNX Runtime)",
        seconds,
        error,
    )
    return Fp16Graph(entry, manifest, seconds)


def _convert(autocast: Any, source: Path) -> Any:
    """AutoCast with its per-node INFO chatter silenced (thousands of lines on a UNet)."""
    modelopt_log = logging.getLogger("modelopt")
    level = modelopt_log.level
    modelopt_log.setLevel(logging.WARNING)
    try:
        return autocast.convert_to_mixed_precision(onnx_path=str(source), **AUTOCAST_OPTIONS)
    except Exception as e:
        raise BackendUnavailableError(
            f"ModelOpt AutoCast could not convert the UNet graph to mixed FP16: {e}",
            "build_failed",
        ) from e
    finally:
        modelopt_log.setLevel(level)


def relative_difference(
    reference: Path, candidate: Path, unet: Any, shape: Shape, *, threads: int = 1
) -> float:
    """max |ε_candidate − ε_reference| / max |ε_reference| on the canary's inputs, both graphs
    on ONNX Runtime's CPU provider (one at a time, so only one graph's weights are resident)."""
    sample, timestep, text = example_inputs(unet, shape, rows=min(2, shape.max_rows))
    feed = {
        DATA_INPUTS[0]: sample.numpy(),
        DATA_INPUTS[1]: np.asarray(int(timestep), dtype=np.int64),
        DATA_INPUTS[2]: text.numpy(),
    }
    expected = _run_on_cpu(reference, feed, threads)
    got = _run_on_cpu(candidate, feed, threads)
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(got - expected).max()) / scale


def _run_on_cpu(path: Path, feed: dict[str, np.ndarray], threads: int) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0], dtype=np.float32)


def _load_entry(entry: Path, expected: dict[str, Any]) -> Fp16Graph | None:
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
        log.info("the cached mixed-FP16 graph %s is for another export or tool; converting", entry)
        return None
    if mismatched_file(entry, manifest.get("files"), (GRAPH_FILE, WEIGHTS_FILE)) is not None:
        log.warning("the cached mixed-FP16 graph %s does not match its hash; converting", entry)
        return None
    return Fp16Graph(entry, manifest, 0.0)
