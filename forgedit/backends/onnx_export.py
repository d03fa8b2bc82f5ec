"""One ONNX export of a base model's UNet, shared by ONNX Runtime and TensorRT, cached on disk.

The export keeps every UNet parameter as a named graph *input* (with the base weights as its
default), so a session can take any edit model's weights without a new export. Only the legacy
exporter with ``keep_initializers_as_inputs=True, do_constant_folding=False`` keeps a clean
one-to-one torch-name → ONNX-name map (ENVIRONMENT.md, "ONNX"); the map is computed here and
checked complete: every parameter tensor of the UNet is exactly one graph input of its shape.
An incomplete map is an ``ExportError`` at export time, never a silent base weight at request
time.

Cache: ``CACHE/<key>/`` holds ``unet.onnx`` and ``manifest.json`` (base fingerprint, shape,
torch and onnx versions, opset, input names, the name map, the graph file's sha256). The key
hashes all of them but the map, so a different torch, onnx, base model, resolution or batch
profile gets its own entry. An entry whose manifest does not match, or whose graph file does
not hash to what the manifest says, is rebuilt, never trusted. Entries are built in a
temporary directory beside the target and published with one rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from forgedit.artifact import sha256_file
from forgedit.backends.base import Shape, example_inputs
from forgedit.durable import JsonObject, fsync_tree, write_json_atomic

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger("forgedit.backends")

OPSET = 17
MANIFEST_VERSION = 1
DATA_INPUTS = ("sample", "timestep", "encoder_hidden_states")
OUTPUT = "noise_pred"
GRAPH_FILE = "unet.onnx"
MANIFEST_FILE = "manifest.json"


class ExportError(RuntimeError):
    """The UNet could not be exported with a complete weight-name map."""


@dataclass(frozen=True)
class OnnxExport:
    """A verified export: the graph file and the torch-name → ONNX-input-name map."""

    path: Path
    name_map: dict[str, str]
    manifest: JsonObject
    seconds: float  # export time, 0.0 when it came from the cache


class _UNetGraph(torch.nn.Module):
    """The UNet as a plain (sample, timestep, text) → ε function, for the exporter."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


def expected_manifest(fingerprint: str, shape: Shape) -> JsonObject:
    """Every field a cached export must match (the name map and file hash come on top)."""
    import onnx

    return {
        "manifest_version": MANIFEST_VERSION,
        "base_model_fingerprint": fingerprint,
        "latent_height": shape.latent_height,
        "latent_width": shape.latent_width,
        "max_rows": shape.max_rows,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "opset": OPSET,
        "exporter": "torch.onnx legacy, keep_initializers_as_inputs, no constant folding",
    }


def cache_key(expected: JsonObject) -> str:
    """A short, filesystem-safe hash of what an export depends on."""
    text = json.dumps(expected, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def export_unet(
    unet: UNet2DConditionModel, fingerprint: str, shape: Shape, cache_dir: Path
) -> OnnxExport:
    """The cached export for (``fingerprint``, ``shape``), exporting it if the cache has no
    entry that matches. ``unet`` must hold the *base* weights' shapes (values are only the
    graph's defaults; the backends bind the live ones). Raises ``ExportError``."""
    expected = expected_manifest(fingerprint, shape)
    entry = cache_dir / cache_key(expected)
    cached = _load_entry(entry, expected, unet)
    if cached is not None:
        return cached
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache_dir))
    try:
        graph = staging / GRAPH_FILE
        _export(unet, shape, graph)
        name_map = check_name_map(unet, _graph_inputs(graph))
        manifest = {
            **expected,
            "inputs": list(DATA_INPUTS),
            "output": OUTPUT,
            "name_map": name_map,
            "graph_sha256": sha256_file(graph),
        }
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        fsync_tree(staging)
        if entry.exists():  # a stale or corrupt entry: replaced, never trusted
            shutil.rmtree(entry)
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info("exported the UNet to ONNX (%s) in %.2f s", shape.describe(), seconds)
    return OnnxExport(entry / GRAPH_FILE, name_map, manifest, seconds)


def check_name_map(
    unet: UNet2DConditionModel, graph_inputs: dict[str, tuple[int | str, ...]]
) -> dict[str, str]:
    """Torch parameter name → ONNX input name, checked complete and one-to-one, shapes equal.

    The graph's weight inputs are the wrapper's ``unet.<name>``; anything else (a renamed,
    merged or folded weight) leaves a parameter unmapped and is an ``ExportError``."""
    name_map: dict[str, str] = {}
    problems: list[str] = []
    for name, p in unet.named_parameters():
        onnx_name = f"unet.{name}"
        if onnx_name not in graph_inputs:
            problems.append(f"{name} (no graph input)")
        elif tuple(graph_inputs[onnx_name]) != tuple(p.shape):
            problems.append(f"{name} (shape {graph_inputs[onnx_name]} vs {tuple(p.shape)})")
        else:
            name_map[name] = onnx_name
    extra = set(graph_inputs) - set(name_map.values()) - set(DATA_INPUTS)
    if problems or extra:
        total = sum(1 for _ in unet.parameters())
        raise ExportError(
            f"the ONNX export maps {len(name_map)} of the UNet's {total} parameter tensors to "
            f"graph inputs; unmapped: {', '.join(problems[:3]) or 'none'}; unexpected inputs: "
            f"{', '.join(sorted(extra)[:3]) or 'none'}"
        )
    return name_map


def _export(unet: UNet2DConditionModel, shape: Shape, path: Path) -> None:
    sample, timestep, text = example_inputs(unet, shape, rows=2)
    dynamic = {"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"}, OUTPUT: {0: "batch"}}
    # The tracer warns about shape checks in diffusers' blocks becoming constants: true and
    # harmless here, since the resolution is fixed per export (only the batch is dynamic).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _UNetGraph(unet).eval(),
            (sample, timestep, text),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(DATA_INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=dynamic,
            keep_initializers_as_inputs=True,
            do_constant_folding=False,
        )


def _graph_inputs(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Input name → shape (ints, or the symbolic name of a dynamic axis)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs: dict[str, tuple[int | str, ...]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = tuple(d.dim_param or d.dim_value for d in dims)
    return inputs


def _load_entry(entry: Path, expected: JsonObject, unet: UNet2DConditionModel) -> OnnxExport | None:
    """The cached entry if its manifest matches ``expected`` and its graph its hash."""
    manifest_path, graph = entry / MANIFEST_FILE, entry / GRAPH_FILE
    if not manifest_path.is_file() or not graph.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ONNX cache entry %s has an unreadable manifest; rebuilding", entry.name)
        return None
    mismatched = [k for k, v in expected.items() if manifest.get(k) != v]
    if mismatched:
        log.warning("ONNX cache entry %s differs in %s; rebuilding", entry.name, mismatched)
        return None
    if manifest.get("graph_sha256") != sha256_file(graph):
        log.warning("ONNX cache entry %s: graph file does not match its hash; rebuilding", entry)
        return None
    name_map = manifest.get("name_map")
    params = dict(unet.named_parameters())
    if not isinstance(name_map, dict) or set(name_map) != set(params):
        log.warning("ONNX cache entry %s has an incomplete name map; rebuilding", entry.name)
        return None
    return OnnxExport(graph, name_map, manifest, 0.0)
