"""Which TensorRT engine weight each UNet parameter is, read from the graph file TensorRT parsed.

TensorRT's ONNX parser names every weight it creates after the ONNX initializer it came from
(``INetworkDefinition.set_weights_name``), and ``Refitter.set_named_weights`` addresses weights by
those names. So the map from torch names to engine weight names is built from the very file the
engine was parsed from (``fp16/unet.onnx``), never assumed:

- every UNet parameter must be exactly one initializer of that file, of its shape; the map
  records the initializer's element type (a refit must hand TensorRT the type the strongly typed
  network holds: fp16 where AutoCast converted it, fp32 where it kept it) and which nodes read
  it, so transposed weights (a Linear's ``Transpose`` → ``MatMul``) and weights feeding fused
  patterns are listed like every other: a refit takes them in their ONNX layout, TensorRT applies
  what it folded;
- every other initializer (graph constants no parameter owns) is kept by name, so that when the
  refitter asks for a fused partner of a refitted weight (``Refitter.get_missing_weights``), it
  can be supplied from the file;
- after a build or load, ``check_engine`` compares the map with the engine's refittable weights
  (``Refitter.get_all_weights``): a UNet parameter without an engine weight of its name is an
  error at build time (an edit model could never reach it), never a silently stale weight at
  request time.

Nothing here imports TensorRT: the map and its checks are tested on real exported files on the
CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FP16_MAX = float(np.finfo(np.float16).max)


class RefitMapError(RuntimeError):
    """The graph or the engine does not hold every UNet parameter as a refittable weight."""


@dataclass(frozen=True)
class WeightSlot:
    """Where one UNet parameter lives in the engine: its engine weight name, the element type
    and shape the engine holds, and the ONNX ops that read it."""

    engine_name: str
    dtype: str  # numpy name: "float16" or "float32"
    shape: tuple[int, ...]
    consumers: tuple[str, ...]

    @property
    def transposed(self) -> bool:
        return "Transpose" in self.consumers

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` as the engine holds it: contiguous, in the slot's type (clamped to fp16's
        range for an fp16 slot, as the conversion clamps; an overflow would be inf)."""
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if self.dtype == "float16":
            array = np.clip(array, -FP16_MAX, FP16_MAX)
        return np.ascontiguousarray(array, dtype=self.dtype)


_ONNX_TO_NUMPY = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT, FLOAT16


@dataclass(frozen=True)
class RefitMap:
    """Torch parameter name → ``WeightSlot``, plus the graph's other initializers by name."""

    graph: Path
    slots: dict[str, WeightSlot]
    constants: frozenset[str]

    @classmethod
    def from_graph(cls, graph: Path, parameters: Mapping[str, tuple[int, ...]]) -> RefitMap:
        """Read ``graph`` (no weight data is loaded) and map every name of ``parameters``
        (torch name → shape) to its initializer ``unet.<name>``; ``RefitMapError`` naming the
        first few that are missing or misshapen."""
        import onnx

        model = onnx.load(str(graph), load_external_data=False)
        initializers = {t.name: t for t in model.graph.initializer}
        consumers: dict[str, list[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                if name in initializers:
                    consumers.setdefault(name, []).append(node.op_type)
        slots: dict[str, WeightSlot] = {}
        problems: list[str] = []
        for name, shape in parameters.items():
            tensor = initializers.get(f"unet.{name}")
            if tensor is None:
                problems.append(f"{name} (no initializer)")
                continue
            dims = tuple(int(d) for d in tensor.dims)
            dtype = _ONNX_TO_NUMPY.get(tensor.data_type)
            if dims != tuple(shape) or dtype is None:
                problems.append(f"{name} (shape {dims}, type {tensor.data_type})")
                continue
            slots[name] = WeightSlot(
                tensor.name, dtype, dims, tuple(sorted(set(consumers.get(tensor.name, ()))))
            )
        if problems:
            raise RefitMapError(
                f"{graph.name} holds {len(slots)} of the UNet's {len(parameters)} parameters as "
                f"refittable initializers; missing or changed: {', '.join(problems[:3])}"
            )
        owned = {slot.engine_name for slot in slots.values()}
        return cls(graph, slots, frozenset(set(initializers) - owned))

    def check_engine(self, refittable: Iterable[str]) -> list[str]:
        """Check the engine's refittable weight names against the map: every UNet parameter
        must be one (``RefitMapError`` naming the first few that are not, transposed ones
        marked). Returns the engine weights that are neither a parameter nor a graph
        initializer (a refit can supply them only if TensorRT never asks: logged by the
        caller)."""
        names = set(refittable)
        missing = [
            f"{n}{' (transposed)' if s.transposed else ''}"
            for n, s in self.slots.items()
            if s.engine_name not in names
        ]
        if missing:
            raise RefitMapError(
                f"the engine has no refittable weight for {len(missing)} of the UNet's "
                f"{len(self.slots)} parameters (e.g. {', '.join(missing[:3])}); an edit model "
                "could never reach them"
            )
        owned = {s.engine_name for s in self.slots.values()}
        return sorted(names - owned - self.constants)

    def torch_name(self, engine_name: str) -> str | None:
        """The UNet parameter an engine weight is, if any."""
        return self._by_engine_name.get(engine_name)

    @property
    def _by_engine_name(self) -> dict[str, str]:
        cached: dict[str, str] | None = self.__dict__.get("_reverse")
        if cached is None:
            cached = {slot.engine_name: name for name, slot in self.slots.items()}
            object.__setattr__(self, "_reverse", cached)
        return cached

    def constant(self, engine_name: str) -> np.ndarray:
        """A graph initializer no parameter owns, read from the file (small: these are the
        graph's own constants)."""
        import onnx
        from onnx import numpy_helper

        if engine_name not in self.constants:
            raise KeyError(engine_name)
        model = onnx.load(str(self.graph), load_external_data=False)
        tensor: Any = next(t for t in model.graph.initializer if t.name == engine_name)
        return np.ascontiguousarray(numpy_helper.to_array(tensor, base_dir=str(self.graph.parent)))
