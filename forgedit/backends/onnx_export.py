"""One ONNX export of a base model's UNet, shared by ONNX Runtime and TensorRT, cached on disk,
at any size.

Real size is the design point: SD-1.x's fp32 UNet is 3.4 GB, over protobuf's 2 GB limit for one
message, so the graph and the weights are written apart, at every size (the tiny test model takes
exactly the path SD takes):

1. The legacy exporter writes the graph alone (``export_params=False``): every UNet parameter is a
   named graph input with no value. Only the legacy exporter with
   ``keep_initializers_as_inputs=True, do_constant_folding=False`` keeps a clean one-to-one
   torch-name → ONNX-name map (ENVIRONMENT.md, "ONNX"); the map is checked complete: every
   parameter tensor is exactly one graph input of its shape, nothing else is. An incomplete map
   is an ``ExportError`` at export time, never a silent base weight at request time.
2. ``_write_weights`` streams each parameter's *base* value (``base_value``: never an edit model
   that happens to be loaded) into one external-data file, ``unet.weights`` (fp32, each tensor
   4 KiB-aligned, one tensor in memory at a time, hashed as it is written), and records it as an
   initializer pointing into that file. No byte of a weight ever goes through protobuf.

Graphs of one cache entry (``CACHE/<key>/``), all sharing ``unet.weights``:

``unet.onnx``
    weights are graph inputs whose initializers (defaults) are the base weights. ONNX Runtime
    binds an edit model's changed tensors over them (IOBinding) and leaves the rest to the
    defaults.
``unet-constants.onnx``
    the same graph with the weights as initializers only: constants that TensorRT can refit by
    their ONNX names (``OnnxParser.parse_from_file`` reads the external data beside the file),
    and the input of the mixed-FP16 conversion (``fp16.py``, cached in ``fp16/``).
``manifest.json``
    base fingerprint, shape, torch and onnx versions, opset, inputs, the name map, and the
    sha256 and size of every file. The cache key hashes all of it but the map and the hashes,
    so another torch, onnx, base model, resolution or batch profile gets its own entry. An entry
    whose manifest does not match, or whose files do not hash to what it says, is rebuilt,
    never trusted (hashing 3.4 GB takes seconds, once per process start).

Entries are built in a temporary directory beside the target and published with one rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from forgedit.artifact import sha256_file
from forgedit.backends.base import BackendUnavailableError, Shape, example_inputs
from forgedit.durable import JsonObject, fsync_tree, write_json_atomic
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger("forgedit.backends")

OPSET = 17
MANIFEST_VERSION = 2  # 2: weights as external data
DATA_INPUTS = ("sample", "timestep", "encoder_hidden_states")
OUTPUT = "noise_pred"
GRAPH_FILE = "unet.onnx"
CONSTANTS_GRAPH_FILE = "unet-constants.onnx"
WEIGHTS_FILE = "unet.weights"
MANIFEST_FILE = "manifest.json"
ENTRY_FILES = (GRAPH_FILE, CONSTANTS_GRAPH_FILE, WEIGHTS_FILE)
ALIGNMENT = 4096  # each tensor starts on a page, so a runtime may map it instead of copying

BaseValues = Callable[[str], torch.Tensor]
"""The base value of a UNet parameter by its torch name (``ResidentWeights.base_value``)."""


class ExportError(RuntimeError):
    """The UNet could not be exported with a complete weight-name map."""


@dataclass(frozen=True)
class OnnxExport:
    """A verified export: its directory, the torch-name → ONNX-name map and its manifest."""

    directory: Path
    name_map: dict[str, str]
    manifest: JsonObject
    seconds: float  # export time, 0.0 when it came from the cache

    @property
    def path(self) -> Path:
        """The graph with the weights as inputs (ONNX Runtime)."""
        return self.directory / GRAPH_FILE

    @property
    def constants_path(self) -> Path:
        """The graph with the weights as initializers (TensorRT, the FP16 conversion)."""
        return self.directory / CONSTANTS_GRAPH_FILE

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def weights_bytes(self) -> int:
        return int(self.manifest["files"][WEIGHTS_FILE]["bytes"])

    @property
    def graph_bytes(self) -> int:
        """Bytes on disk of the graph ONNX Runtime loads and its weights."""
        files = self.manifest["files"]
        return int(files[GRAPH_FILE]["bytes"]) + int(files[WEIGHTS_FILE]["bytes"])


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
    """Every field a cached export must match (the name map and file hashes come on top)."""
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
        "weights": f"external data, fp32, {ALIGNMENT}-byte aligned",
    }


def cache_key(expected: JsonObject) -> str:
    """A short, filesystem-safe hash of what an export depends on."""
    text = json.dumps(expected, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def export_unet(
    unet: UNet2DConditionModel,
    fingerprint: str,
    shape: Shape,
    cache_dir: Path,
    base_values: BaseValues | None = None,
) -> OnnxExport:
    """The cached export for (``fingerprint``, ``shape``), exporting it if the cache has no
    entry that matches. The weights written are ``base_values(name)`` (default: the live
    parameters, which must then hold the base). Raises ``ExportError``."""
    expected = expected_manifest(fingerprint, shape)
    entry = cache_dir / cache_key(expected)
    cached = _load_entry(entry, expected, unet)
    if cached is not None:
        return cached
    if base_values is None:
        params = dict(unet.named_parameters())

        def base_values(name: str) -> torch.Tensor:
            return params[name].detach()

    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache_dir))
    try:
        graph = staging / GRAPH_FILE
        _export_graph(unet, shape, graph)
        name_map = check_name_map(unet, _graph_inputs(graph))
        weights_sha256 = _write_weights(graph, staging / WEIGHTS_FILE, name_map, base_values)
        hashes = {WEIGHTS_FILE: weights_sha256}
        _write_constants_graph(graph, staging / CONSTANTS_GRAPH_FILE)
        manifest = {
            **expected,
            "inputs": list(DATA_INPUTS),
            "output": OUTPUT,
            "name_map": name_map,
            "files": file_records(staging, ENTRY_FILES, hashes),
        }
        publish_entry(staging, entry, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info(
        "exported the UNet to ONNX (%s, %.2f GB of weights) in %.1f s",
        shape.describe(),
        manifest["files"][WEIGHTS_FILE]["bytes"] / 1e9,
        seconds,
    )
    return OnnxExport(entry, name_map, manifest, seconds)


def backend_export(
    unet: UNet2DConditionModel,
    fingerprint: str,
    shape: Shape,
    cache_dir: Path,
    weights: ResidentWeights,
) -> OnnxExport:
    """``export_unet`` for a compiled backend: the base values from ``weights`` (whatever edit
    model is loaded), and a failure to export or to write the cache as
    ``BackendUnavailableError(reason="build_failed")``, so the replica falls back to the next
    backend instead of failing to start (the message names no path)."""
    try:
        return export_unet(
            unet,
            fingerprint,
            shape,
            cache_dir,
            base_values=lambda name: weights.base_value(f"unet.{name}"),
        )
    except ExportError as e:
        raise BackendUnavailableError(f"the UNet could not be exported: {e}", "build_failed") from e
    except OSError as e:
        raise BackendUnavailableError(
            f"the UNet's ONNX export could not be written ({e.strerror or type(e).__name__})",
            "build_failed",
        ) from e


def file_records(
    directory: Path, names: Iterable[str], known: Mapping[str, str] | None = None
) -> dict[str, JsonObject]:
    """A cache entry's record of its files: name → bytes and sha256 (``known`` hashes, computed
    while writing, are not computed again)."""
    known = known or {}
    return {
        name: {
            "bytes": (directory / name).stat().st_size,
            "sha256": known.get(name) or sha256_file(directory / name),
        }
        for name in names
    }


def mismatched_file(directory: Path, records: object, names: Iterable[str]) -> str | None:
    """The first of ``names`` that is missing from ``directory`` or differs from its record
    (size, then sha256), else None: a cache entry is trusted only when this is None."""
    for name in names:
        recorded = records.get(name) if isinstance(records, dict) else None
        path = directory / name
        if (
            not isinstance(recorded, dict)
            or not path.is_file()
            or path.stat().st_size != recorded.get("bytes")
            or sha256_file(path) != recorded.get("sha256")
        ):
            return name
    return None


def publish_entry(staging: Path, entry: Path, manifest: JsonObject) -> None:
    """Write ``manifest`` into the finished ``staging`` directory, make it durable and rename it
    to ``entry``, replacing a stale or damaged one (never trusted, never patched)."""
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    fsync_tree(staging)
    if entry.exists():
        shutil.rmtree(entry)
    staging.rename(entry)


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


def _export_graph(unet: UNet2DConditionModel, shape: Shape, path: Path) -> None:
    """The graph alone: every parameter a named input without a value."""
    sample, timestep, text = example_inputs(unet, shape, rows=2)
    dynamic = {"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"}, OUTPUT: {0: "batch"}}
    # The tracer warns about shape checks in diffusers' blocks becoming constants: true and
    # harmless here, since the resolution is fixed per export (only the batch is dynamic).
    # torch also warns that the legacy exporter is not its default: it is chosen on purpose.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            _UNetGraph(unet).eval(),
            (sample, timestep, text),
            str(path),
            dynamo=False,
            export_params=False,
            opset_version=OPSET,
            input_names=list(DATA_INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=dynamic,
            keep_initializers_as_inputs=True,
            do_constant_folding=False,
        )


def _write_weights(
    graph_path: Path, weights_path: Path, name_map: dict[str, str], base_values: BaseValues
) -> str:
    """Stream every weight's base value into ``weights_path`` (graph-input order, aligned)
    and give the graph an initializer per weight pointing into it; returns the file's sha256."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    torch_names = {onnx_name: name for name, onnx_name in name_map.items()}
    digest = hashlib.sha256()
    offset = 0
    with open(weights_path, "wb") as f:
        for value in model.graph.input:
            name = torch_names.get(value.name)
            if name is None:
                continue  # a data input
            array = base_values(name).to("cpu", torch.float32).contiguous().numpy()
            padding = b"\0" * (-offset % ALIGNMENT)
            for chunk in (padding, array.reshape(-1).view(np.uint8).data):
                f.write(chunk)
                digest.update(chunk)
            offset += len(padding)
            tensor = onnx.TensorProto(
                name=value.name,
                data_type=onnx.TensorProto.FLOAT,
                dims=list(array.shape),
                data_location=onnx.TensorProto.EXTERNAL,
            )
            for key, entry in (
                ("location", WEIGHTS_FILE),
                ("offset", str(offset)),
                ("length", str(array.nbytes)),
            ):
                tensor.external_data.add(key=key, value=entry)
            model.graph.initializer.append(tensor)
            offset += array.nbytes
    onnx.save(model, str(graph_path))
    return digest.hexdigest()


def _write_constants_graph(graph_path: Path, path: Path) -> None:
    """The graph with its weight inputs removed from ``graph.input`` (their initializers, in
    the same external-data file, stay): weights become constants."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    data_inputs = [v for v in model.graph.input if v.name in DATA_INPUTS]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)
    onnx.save(model, str(path))


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
    """The cached entry if its manifest matches ``expected`` and every file its hash."""
    manifest_path = entry / MANIFEST_FILE
    if not manifest_path.is_file():
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
    damaged = mismatched_file(entry, manifest.get("files"), ENTRY_FILES)
    if damaged is not None:
        log.warning("ONNX cache entry %s: %s does not match its hash; rebuilding", entry, damaged)
        return None
    name_map = manifest.get("name_map")
    params = dict(unet.named_parameters())
    if not isinstance(name_map, dict) or set(name_map) != set(params):
        log.warning("ONNX cache entry %s has an incomplete name map; rebuilding", entry.name)
        return None
    return OnnxExport(entry, name_map, manifest, 0.0)
