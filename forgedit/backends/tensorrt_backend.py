"""The UNet on TensorRT (CUDA only): one refittable engine per (GPU model, TensorRT version, base
model, resolution, batch profile, converted graph), refitted per edit model, never rebuilt.

Written against the Python API of TensorRT 10.16 (the last 10.x) and 11.4 (NVIDIA's documentation
and migration guide, "Migrating from TensorRT 10.x to 11.x"); ``tensorrt_profile`` refuses other
majors and 10.x before 10.12 (``reason="unsupported_version"``). TensorRT cannot be installed on
this project's machines (ENVIRONMENT.md): everything that needs no GPU (the version switch, the
refit map from the file, the plan cache) is unit-tested; the rest runs in ``tests/unit/
test_backends.py``'s GPU test and ``benchmarks/bench_gpu.py`` where TensorRT is installed.

Building (``_build``), the same on both majors:

1. the cached ONNX export (``onnx_export``), weights as external data, converted once to mixed
   FP16 by ModelOpt AutoCast and checked on ONNX Runtime (``fp16``): TensorRT 11 has no
   ``BuilderFlag.FP16``; precision lives in the graph;
2. a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x; the only
   kind on 11.x), parsed with ``OnnxParser.parse_from_file``, which reads the external weights
   beside the file: never ``parse(bytes)``, which cannot carry a graph over protobuf's 2 GB;
3. ``BuilderFlag.REFIT`` (and ``STRIP_PLAN`` for a weight-stripped plan), one optimisation
   profile of 1 .. ``max_rows`` rows.

Loading: the plan is cached on disk with a manifest (``plan_identity``); one that does not match
is rebuilt. After every build or load the refit map (``refit_map``, read from the converted graph
file) is checked against ``Refitter.get_all_weights``: every UNet parameter must be a refittable
engine weight. A weight-stripped plan is then filled from the same file, NVIDIA's documented
route: ``OnnxParserRefitter.refit_from_file``, ``get_missing_weights`` empty,
``refit_cuda_engine``.

Refit per edit model: the engine remembers which state it holds (``LoadedWeights``); a sync hands
``Refitter.set_named_weights`` exactly the changed tensors, in the type the engine holds them,
then ``refit_cuda_engine``. TensorRT may have merged weights at build time; ``get_missing_weights``
then names the partners it also needs, supplied from the live parameters (unchanged, so this
alters nothing) or the graph's own constants. A weight TensorRT refuses, one still missing, a
failed ``refit_cuda_engine`` (``refit_failed``) or a failed execution (``run_failed``) raises
``BackendUnavailableError``: the job finishes on torch (``forgedit.engine``), the engine is
dropped and loaded afresh for the next job, never a half-swapped engine.

The engine is always wrapped in ``CanariedBackend`` by the selection (``select.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from forgedit.backends.base import (
    DEFAULT_MAX_GRAPHS,
    TEXT_LENGTH,
    BackendUnavailableError,
    CompiledBackend,
    LoadedWeights,
    Shape,
)
from forgedit.backends.fp16 import fp16_graph
from forgedit.backends.onnx_export import DATA_INPUTS, OUTPUT, OnnxExport, backend_export
from forgedit.backends.refit_map import RefitMap, RefitMapError
from forgedit.durable import JsonObject, write_bytes_atomic, write_json_atomic
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger("forgedit.backends")

PLAN_FILE = "unet.plan"
PLAN_MANIFEST = "plan.json"
# [first supported, first unsupported) as (major, minor): 10.12 is where NVIDIA's docs make
# strongly typed networks the recommended build (weak typing deprecated), 11 removed it.
SUPPORTED_VERSIONS = ((10, 12), (12, 0))
TENSORRT_INSTALL = "deploy/requirements/cuda.txt pins it (pip install tensorrt-cu12 on CUDA)"


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or ``BackendUnavailableError`` saying it is not installed."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(
            f"TensorRT is not installed ({TENSORRT_INSTALL}, on a CUDA machine)",
            "not_installed",
        ) from e
    return tensorrt


@dataclass(frozen=True)
class TensorRTProfile:
    """How this TensorRT version builds the UNet: the network-creation flags and the builder
    flags (by ``BuilderFlag`` member name). Precision is never a flag: it is the graph's."""

    version: str
    major: int
    minor: int
    network_flags: int
    builder_flags: tuple[str, ...]

    def describe(self) -> str:
        typing = "STRONGLY_TYPED" if self.major == 10 else "strongly typed (always on 11.x)"
        return f"TensorRT {self.version}: {typing}, {' + '.join(self.builder_flags)}"


def tensorrt_profile(trt: ModuleType, *, strip_weights: bool) -> TensorRTProfile:
    """The build settings for the installed ``trt`` module, selected by its version;
    ``BackendUnavailableError(reason="unsupported_version")`` outside ``SUPPORTED_VERSIONS``.

    - 10.12 .. 10.x: a strongly typed network must be asked for
      (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); weak typing is the default there.
    - 11.x: every network is strongly typed (the flag is accepted and ignored, so it is left
      out); ``BuilderFlag.FP16`` and the other precision flags no longer exist.
    - both: ``BuilderFlag.REFIT`` (edit models are refitted), plus ``STRIP_PLAN`` for a
      weight-stripped plan (filled from the ONNX file at load).
    """
    version = str(trt.__version__)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise BackendUnavailableError(
            f"cannot read the TensorRT version {version!r}", "unsupported_version"
        )
    major, minor = int(match[1]), int(match[2])
    (low, high) = SUPPORTED_VERSIONS
    if not low <= (major, minor) < high:
        raise BackendUnavailableError(
            f"TensorRT {version} is not supported: this build needs 10.12 .. 10.x or 11.x "
            "(strongly typed networks; refit from the ONNX file)",
            "unsupported_version",
        )
    network_flags = 0
    if major == 10:
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    builder_flags = ("REFIT", "STRIP_PLAN") if strip_weights else ("REFIT",)
    for flag in builder_flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise BackendUnavailableError(
                f"TensorRT {version} has no BuilderFlag.{flag}", "unsupported_version"
            )
    return TensorRTProfile(version, major, minor, network_flags, builder_flags)


def plan_identity(
    gpu_name: str,
    profile: TensorRTProfile,
    fingerprint: str,
    shape: Shape,
    graph_sha256: str,
) -> JsonObject:
    """Everything a cached plan depends on; its hash is the cache key. ``graph_sha256`` is
    the converted graph's (so a new conversion, or another export, gets a new plan)."""
    return {
        "gpu": gpu_name,
        "tensorrt_version": profile.version,
        "network_flags": profile.network_flags,
        "builder_flags": list(profile.builder_flags),
        "base_model_fingerprint": fingerprint,
        "latent_height": shape.latent_height,
        "latent_width": shape.latent_width,
        "min_rows": 1,
        "max_rows": shape.max_rows,
        "precision": "mixed fp16 (ModelOpt AutoCast graph, strongly typed)",
        "graph_sha256": graph_sha256,
    }


def plan_key(identity: JsonObject) -> str:
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:24]


def read_cached_plan(entry: Path, identity: JsonObject) -> bytes | None:
    """The cached plan of ``entry`` if its manifest is exactly ``identity`` and the plan's
    sha256 is the one recorded; else None (rebuild, never trust)."""
    try:
        manifest = json.loads((entry / PLAN_MANIFEST).read_text(encoding="utf-8"))
        plan = (entry / PLAN_FILE).read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.pop("plan_sha256", None) != _sha256(plan):
        log.warning("TensorRT plan %s does not match its hash; rebuilding", entry.name)
        return None
    if manifest != dict(identity):
        log.warning("TensorRT plan %s does not match this machine; rebuilding", entry.name)
        return None
    return plan


def write_plan(entry: Path, identity: JsonObject, plan: bytes) -> None:
    """Store a plan and its manifest (identity + the plan's sha256), each atomically; the
    manifest last, so a crash in between leaves an entry that ``read_cached_plan`` rejects."""
    entry.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(plan, entry / PLAN_FILE)
    write_json_atomic(entry / PLAN_MANIFEST, {**identity, "plan_sha256": _sha256(plan)})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TensorRTBackend(CompiledBackend):
    """Refittable TensorRT engines, one per ``Shape`` (at most ``max_graphs``), on CUDA."""

    name = "tensorrt"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        weights: ResidentWeights,
        *,
        fingerprint: str,
        cache_dir: Path,
        strip_weights: bool = False,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        super().__init__(unet, weights, max_graphs)
        if self.device.type != "cuda":
            raise BackendUnavailableError("TensorRT needs a CUDA device", "no_cuda")
        self._trt = import_tensorrt()
        self.profile = tensorrt_profile(self._trt, strip_weights=strip_weights)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir)
        self.strip_weights = strip_weights
        self.export_seconds = 0.0  # ONNX export and FP16 conversion
        self.session_seconds = 0.0  # engine build (or plan load) and refit-map check
        self.last_export: OnnxExport | None = None

    def _compile(self, shape: Shape) -> _Engine:
        export = backend_export(
            self.unet, self.fingerprint, shape, self.cache_dir / "onnx", self.weights
        )
        self.last_export = export
        graph = fp16_graph(export, self.unet, shape)
        self.export_seconds += export.seconds + graph.seconds
        started = time.perf_counter()
        try:
            refit_map = RefitMap.from_graph(
                graph.path, {n: tuple(p.shape) for n, p in self.unet.named_parameters()}
            )
        except RefitMapError as e:
            raise BackendUnavailableError(str(e), "build_failed") from e
        identity = plan_identity(
            torch.cuda.get_device_name(self.device),
            self.profile,
            self.fingerprint,
            shape,
            graph.sha256,
        )
        entry = self.cache_dir / "tensorrt" / plan_key(identity)
        plan = read_cached_plan(entry, identity)
        if plan is None:
            try:
                plan = self._build(graph.path, shape)
            except BackendUnavailableError:
                raise
            except Exception as e:  # TensorRT raises plain RuntimeErrors
                raise BackendUnavailableError(
                    f"TensorRT could not build the UNet engine: {e}", "build_failed"
                ) from e
            write_plan(entry, identity, plan)
        engine = _Engine(self, plan, refit_map, shape)
        self.session_seconds += time.perf_counter() - started
        return engine

    def _build(self, graph_path: Path, shape: Shape) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(self.profile.network_flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(graph_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailableError(
                f"TensorRT could not parse the ONNX graph: {errors}", "build_failed"
            )
        config = builder.create_builder_config()
        for flag in self.profile.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        profile = builder.create_optimization_profile()
        channels = int(self.unet.config["in_channels"])
        text_width = int(self.unet.config["cross_attention_dim"])
        latent = (shape.latent_height, shape.latent_width)
        for name, tail in (
            (DATA_INPUTS[0], (channels, *latent)),
            (DATA_INPUTS[2], (TEXT_LENGTH, text_width)),
        ):
            profile.set_shape(name, (1, *tail), (shape.max_rows, *tail), (shape.max_rows, *tail))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailableError("TensorRT returned no engine", "build_failed")
        log.info("built a TensorRT engine for %s (%s)", shape.describe(), self.profile.describe())
        return bytes(plan)


class _Engine:
    """One deserialised engine, its execution context and the weights it holds."""

    def __init__(
        self, backend: TensorRTBackend, plan: bytes, refit_map: RefitMap, shape: Shape
    ) -> None:
        trt = backend._trt
        self._trt = trt
        self._logger = backend._logger
        self._device = backend.device
        self._map = refit_map
        self._unet = backend.unet
        self._plan_bytes = len(plan)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailableError("TensorRT could not load the cached plan", "build_failed")
        refitter = trt.Refitter(self.engine, self._logger)
        try:
            unsupplied = refit_map.check_engine(refitter.get_all_weights())
        except RefitMapError as e:
            raise BackendUnavailableError(str(e), "build_failed") from e
        if unsupplied:
            log.warning(
                "%d refittable engine weights are neither UNet parameters nor graph "
                "initializers (e.g. %r); a refit that needs them will fall back",
                len(unsupplied),
                unsupplied[0],
            )
        if backend.strip_weights:
            self._fill_from_graph(refitter)
        self.context = self.engine.create_execution_context()
        self.loaded = LoadedWeights({})  # the plan (or the file it was filled from) is the base

    def _fill_from_graph(self, refitter: Any) -> None:  # trt.Refitter: no stubs without TensorRT
        """A weight-stripped plan gets its weights from the graph file it was built from."""
        parser_refitter = self._trt.OnnxParserRefitter(refitter, self._logger)
        if not parser_refitter.refit_from_file(str(self._map.graph)):
            errors = "; ".join(
                str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)
            )
            raise BackendUnavailableError(
                f"TensorRT could not refit the weight-stripped plan from its graph: {errors}",
                "build_failed",
            )
        missing = list(refitter.get_missing_weights())
        if missing or not refitter.refit_cuda_engine():
            raise BackendUnavailableError(
                f"TensorRT could not fill the weight-stripped plan ({len(missing)} weights "
                "missing)",
                "build_failed",
            )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def resident_bytes(self) -> int:
        """The engine's weights (about the plan's size) and its activation memory."""
        return self._plan_bytes + int(getattr(self.engine, "device_memory_size_v2", 0))

    def sync(self, weights: ResidentWeights) -> None:
        self.loaded.sync(weights, lambda tensors, new_edit_model: self.refit(tensors, weights))

    def refit(self, tensors: Mapping[str, torch.Tensor], weights: ResidentWeights) -> None:
        """Set exactly ``tensors`` (plus the merge partners TensorRT asks for), then refit."""
        trt = self._trt
        refitter = trt.Refitter(self.engine, self._logger)
        keep: list[np.ndarray] = []  # TensorRT reads the arrays during refit_cuda_engine

        def put(engine_name: str, array: np.ndarray) -> None:
            keep.append(array)
            if not refitter.set_named_weights(engine_name, trt.Weights(array)):
                raise BackendUnavailableError(
                    f"TensorRT refused weights {engine_name!r} (not refittable)", "refit_failed"
                )

        for name, tensor in tensors.items():
            slot = self._map.slots[name]
            put(slot.engine_name, slot.array(tensor))
        partners = list(refitter.get_missing_weights())
        for engine_name in partners:
            torch_name = self._map.torch_name(engine_name)
            if torch_name is not None:
                slot = self._map.slots[torch_name]
                put(engine_name, slot.array(weights.parameter(f"unet.{torch_name}")))
            elif engine_name in self._map.constants:
                put(engine_name, self._map.constant(engine_name))
        missing = list(refitter.get_missing_weights())
        if missing:
            raise BackendUnavailableError(
                f"incomplete TensorRT refit: {len(missing)} weights missing (e.g. {missing[0]!r})",
                "refit_failed",
            )
        if not refitter.refit_cuda_engine():
            raise BackendUnavailableError("TensorRT refit_cuda_engine failed", "refit_failed")
        log.debug("refitted %d tensors (+%d merged partners)", len(tensors), len(partners))

    def predict(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        sample = sample.to(self._device, torch.float32).contiguous()
        text = encoder_hidden_states.to(self._device, torch.float32).contiguous()
        t = torch.as_tensor(timestep, dtype=torch.int64, device=self._device).reshape(())
        out = torch.empty_like(sample[:, : int(self._unet.config["out_channels"])])
        context = self.context
        context.set_input_shape(DATA_INPUTS[0], tuple(sample.shape))
        context.set_input_shape(DATA_INPUTS[2], tuple(text.shape))
        for name, tensor in ((DATA_INPUTS[0], sample), (DATA_INPUTS[1], t), (DATA_INPUTS[2], text)):
            context.set_tensor_address(name, tensor.data_ptr())
        context.set_tensor_address(OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream(self._device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendUnavailableError("TensorRT execution failed", "run_failed")
        stream.synchronize()
        return out

    def close(self) -> None:
        del self.context, self.engine
