"""The UNet on TensorRT (CUDA only): one refittable FP16 engine per (GPU model, TensorRT
version, base model, resolution, batch profile), refitted per edit model, never rebuilt.

Built from the same cached ONNX export as ONNX Runtime, with the weight inputs turned back into
initializers (TensorRT refits initializers by their ONNX names, which the export's name map
records). The plan is cached on disk with a manifest; a plan whose manifest does not match is
rebuilt. ``strip_weights=True`` builds a weight-stripped plan (``BuilderFlag.STRIP_PLAN``,
smaller on disk) that is refitted with the base weights at load.

Refit: the engine remembers which state it holds (``LoadedWeights``); a sync hands
``trt.Refitter.set_named_weights`` exactly the changed tensors, then ``refit_cuda_engine``.
TensorRT may have merged weights at build time (a fused Conv + bias); ``get_missing_weights``
then names the partners it also needs, which are supplied from the live parameters (they are
unchanged, so this alters nothing). A weight TensorRT refuses, a weight still missing after
that, or a failed ``refit_cuda_engine`` is ``BackendUnavailableError(reason="refit_failed")``:
the engine falls back to the next backend rather than sample with half-swapped weights.

The engine is always wrapped in ``CanariedBackend`` by the selection (``select.py``).

This module imports ``tensorrt`` lazily; on a machine without it every entry point raises
``BackendUnavailableError(reason="not_installed")``. It cannot be installed on the project's
machines (ENVIRONMENT.md), so everything but the calls into TensorRT itself is tested with ONNX
Runtime standing in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from forgedit.backends.base import (
    BackendUnavailableError,
    CompiledBackend,
    LoadedWeights,
    Shape,
)
from forgedit.backends.onnx_export import DATA_INPUTS, OUTPUT, export_unet
from forgedit.durable import JsonObject, write_bytes_atomic, write_json_atomic
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger("forgedit.backends")

PLAN_FILE = "unet.plan"
PLAN_MANIFEST = "plan.json"


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or ``BackendUnavailableError`` saying it is not installed."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(
            "TensorRT is not installed (pip install tensorrt from NVIDIA's index, on a CUDA "
            "machine)",
            "not_installed",
        ) from e
    return tensorrt


def plan_identity(
    gpu_name: str, trt_version: str, fingerprint: str, shape: Shape, strip_weights: bool
) -> JsonObject:
    """Everything a cached plan depends on; its hash is the cache key."""
    return {
        "gpu": gpu_name,
        "tensorrt_version": trt_version,
        "base_model_fingerprint": fingerprint,
        "latent_height": shape.latent_height,
        "latent_width": shape.latent_width,
        "min_rows": 1,
        "max_rows": shape.max_rows,
        "precision": "fp16",
        "refittable": True,
        "weights_stripped": strip_weights,
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


def weights_as_initializers(graph_path: Path) -> bytes:
    """The export with its weight inputs removed from ``graph.input`` (their initializers
    stay): TensorRT builds them as refittable constants instead of runtime tensors."""
    import onnx

    model = onnx.load(str(graph_path))
    initializers = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return bytes(model.SerializeToString())


class TensorRTBackend(CompiledBackend):
    """Refittable TensorRT engines, one per ``Shape``, on a CUDA device."""

    name = "tensorrt"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        weights: ResidentWeights,
        *,
        fingerprint: str,
        cache_dir: Path,
        strip_weights: bool = False,
    ) -> None:
        super().__init__(unet, weights)
        if self.device.type != "cuda":
            raise BackendUnavailableError("TensorRT needs a CUDA device", "no_cuda")
        self._trt = import_tensorrt()
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir)
        self.strip_weights = strip_weights

    def _compile(self, shape: Shape) -> _Engine:
        export = export_unet(self.unet, self.fingerprint, shape, self.cache_dir / "onnx")
        identity = plan_identity(
            torch.cuda.get_device_name(self.device),
            str(self._trt.__version__),
            self.fingerprint,
            shape,
            self.strip_weights,
        )
        entry = self.cache_dir / "tensorrt" / plan_key(identity)
        plan = read_cached_plan(entry, identity)
        if plan is None:
            try:
                plan = self._build(export.path, shape)
            except BackendUnavailableError:
                raise
            except Exception as e:  # TensorRT raises plain RuntimeErrors
                raise BackendUnavailableError(
                    f"TensorRT could not build the UNet engine: {e}", "build_failed"
                ) from e
            write_plan(entry, identity, plan)
        engine = _Engine(self, plan, export.name_map, shape)
        if self.strip_weights:  # the plan holds no weights: refit them all from the base
            engine.refit({n: p.detach() for n, p in self.unet.named_parameters()}, self.weights)
        return engine

    # -- building -------------------------------------------------------------------------

    def _build(self, graph_path: Path, shape: Shape) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(weights_as_initializers(graph_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailableError(
                f"TensorRT could not parse the ONNX export: {errors}", "build_failed"
            )
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.REFIT)
        if self.strip_weights:
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        profile = builder.create_optimization_profile()
        channels = int(self.unet.config["in_channels"])
        text_width = int(self.unet.config["cross_attention_dim"])
        latent = (shape.latent_height, shape.latent_width)
        for name, tail in (
            (DATA_INPUTS[0], (channels, *latent)),
            (DATA_INPUTS[2], (77, text_width)),
        ):
            profile.set_shape(name, (1, *tail), (shape.max_rows, *tail), (shape.max_rows, *tail))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailableError("TensorRT returned no engine", "build_failed")
        log.info("built a TensorRT engine for %s", shape.describe())
        return bytes(plan)


class _Engine:
    """One deserialised engine, its execution context and the weights it holds."""

    def __init__(
        self, backend: TensorRTBackend, plan: bytes, name_map: dict[str, str], shape: Shape
    ) -> None:
        trt = backend._trt
        self._trt = trt
        self._logger = backend._logger
        self._device = backend.device
        self._name_map = name_map
        self._unet = backend.unet
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailableError("TensorRT could not load the cached plan", "build_failed")
        self.context = self.engine.create_execution_context()
        # A full plan holds the base weights; a stripped one is refitted to them at once.
        self.loaded = LoadedWeights({})

    @property
    def device(self) -> torch.device:
        return self._device

    def sync(self, weights: ResidentWeights) -> None:
        self.loaded.sync(weights, lambda tensors, new_edit_model: self.refit(tensors, weights))

    def refit(self, tensors: Mapping[str, torch.Tensor], weights: ResidentWeights) -> None:
        """Set exactly ``tensors`` (plus the merge partners TensorRT asks for), then refit."""
        trt = self._trt
        refitter = trt.Refitter(self.engine, self._logger)
        keep: list[np.ndarray] = []  # TensorRT reads the arrays during refit_cuda_engine

        def put(name: str, tensor: torch.Tensor) -> None:
            array = np.ascontiguousarray(tensor.to("cpu", torch.float32).numpy())
            keep.append(array)
            if not refitter.set_named_weights(self._name_map[name], trt.Weights(array)):
                raise BackendUnavailableError(
                    f"TensorRT refused weights {self._name_map[name]!r} (not refittable)",
                    "refit_failed",
                )

        for name, tensor in tensors.items():
            put(name, tensor)
        onnx_to_torch = {v: k for k, v in self._name_map.items()}
        partners = [onnx_to_torch[n] for n in refitter.get_missing_weights() if n in onnx_to_torch]
        for name in partners:
            put(name, weights.parameter(f"unet.{name}").detach())
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
        self.context.set_input_shape(DATA_INPUTS[0], tuple(sample.shape))
        self.context.set_input_shape(DATA_INPUTS[2], tuple(text.shape))
        for name, tensor in ((DATA_INPUTS[0], sample), (DATA_INPUTS[1], t), (DATA_INPUTS[2], text)):
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream(self._device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out
