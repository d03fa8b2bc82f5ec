"""The interface every sampling UNet implements, and the one weight-swap mechanism they share.

``denoise`` calls a ``NoisePredictor``: ``predict(sample, timestep, encoder_hidden_states)``
→ ε. It never knows which backend computes it. A ``UNetBackend`` hands out predictors for one
(resolution, batch profile), compiling or exporting whatever it needs in ``prepare`` (called at
start-up or on first use of a resolution, never inside a denoising loop).

The weights stay one mechanism. ``ResidentWeights`` writes an edit model (and each forgetting
strategy) into the live torch parameters and reports, per tensor, what it holds now
(``ResidentWeights.state``). A backend that keeps its own copy of the weights (an ONNX Runtime
session, a TensorRT engine) remembers the state it last loaded and, before every sampling loop,
receives exactly the tensors whose state differs (``refit_plan``): the diff against what *it*
holds, never against the base. Switching strategy touches only the tensors whose coefficient
changed; restoring the base is the same operation with the base's (empty) state.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from forgedit.weights import ResidentWeights, WeightState

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger("forgedit.backends")


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here (not installed, wrong device, canary failed). ``reason`` is a
    short bounded code for metrics (``names.FALLBACK_REASONS``); the message says why in
    words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoisePredictor(Protocol):
    """What the denoising loop calls: one UNet evaluation, ε for every row of ``sample``."""

    @property
    def device(self) -> torch.device: ...

    def predict(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Shape:
    """What one compiled UNet serves: latent size and the most rows per call (CFG doubles a
    batch, so ``max_rows`` = 2 × max batch)."""

    latent_height: int
    latent_width: int
    max_rows: int

    def describe(self) -> str:
        return f"{self.latent_height}x{self.latent_width} latents, batch 1..{self.max_rows}"


def refit_plan(live: Mapping[str, WeightState], loaded: Mapping[str, WeightState]) -> list[str]:
    """The UNet tensors a backend must receive: every name whose live state differs from the
    state the backend loaded last (absent = pristine base). Sorted, so a refit is repeatable."""
    return sorted(
        name for name in live.keys() | loaded.keys() if live.get(name) != loaded.get(name)
    )


class LoadedWeights:
    """The weights one compiled UNet holds, as states, and the sync that brings it up to date.

    ``apply`` is the backend's way of taking tensors (ONNX Runtime rebinds, TensorRT refits);
    it receives a ``new_edit_model`` flag when the plan crosses an edit-model boundary, so a
    backend whose bindings persist can clear them first.
    """

    def __init__(self, state: Mapping[str, WeightState]) -> None:
        self.state: dict[str, WeightState] = dict(state)
        self.last_plan: tuple[str, ...] = ()

    def sync(self, weights: ResidentWeights, apply: ApplyWeights) -> tuple[str, ...]:
        """Send the changed tensors to ``apply(tensors, new_edit_model=...)``; returns their
        names (also kept as ``last_plan``, for tests and logs)."""
        live = weights.state("unet")
        names = refit_plan(live, self.state)
        if names:
            generations = {g for g, _ in live.values()} | {g for g, _ in self.state.values()}
            tensors = {n: weights.parameter(f"unet.{n}").detach() for n in names}
            apply(tensors, new_edit_model=len(generations) > 1)
        self.state = dict(live)
        self.last_plan = tuple(names)
        return self.last_plan


class ApplyWeights(Protocol):
    """Write changed tensors into a backend (``LoadedWeights.sync``)."""

    def __call__(self, tensors: dict[str, torch.Tensor], *, new_edit_model: bool) -> None: ...


class UNetBackend(ABC):
    """One way of running the sampling UNet of one resident base model.

    ``name`` is one of ``BACKEND_NAMES``. Not thread-safe (one job at a time per engine)."""

    name: str

    def __init__(self, unet: UNet2DConditionModel, weights: ResidentWeights) -> None:
        self.unet = unet
        self.weights = weights

    @property
    def device(self) -> torch.device:
        return torch.device(next(self.unet.parameters()).device)

    @abstractmethod
    def prepare(self, shape: Shape) -> None:
        """Export, build or load what ``shape`` needs (may take seconds: start-up, or first use
        of a new resolution). Idempotent."""

    @abstractmethod
    def predictor(self, shape: Shape) -> NoisePredictor:
        """A predictor for ``shape`` holding the live weights (synced on every call: call it
        once per denoising loop, after the forgetting strategy is set)."""

    def last_plan(self, shape: Shape) -> tuple[str, ...]:
        """The tensor names the last sync of ``shape`` sent (empty for in-place torch)."""
        return ()

    def build_id(self, shape: Shape) -> int:
        """Which build of ``shape`` serves now (0: nothing compiled, as for torch)."""
        return 0

    def discard(self, shape: Shape) -> None:  # noqa: B027 - nothing compiled by default
        """Forget what was compiled for ``shape`` (after a failure left it in an unknown
        state): the next ``prepare`` loads or builds it afresh."""

    @property
    def resident_bytes(self) -> int:
        """Memory held beside the torch model (compiled graphs and their weights)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release sessions and engines."""


class CompiledUNet(NoisePredictor, Protocol):
    """One compiled UNet for one ``Shape`` (an ONNX Runtime session, a TensorRT engine): a
    noise predictor that holds its own copy of the weights, brought up to date by ``sync``.
    ``resident_bytes`` is what it holds beside the torch model (its weights, plus a TensorRT
    engine's activation memory): an estimate for capacity planning, not an allocator's
    count."""

    loaded: LoadedWeights

    @property
    def resident_bytes(self) -> int: ...

    def sync(self, weights: ResidentWeights) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CompiledGraph:
    """One entry of a ``CompiledGraphs`` cache: the compiled UNet and its build number (which
    changes whenever the shape is compiled anew, so a canary result never outlives what it
    checked)."""

    unet: CompiledUNet
    build_id: int


class CompiledGraphs:
    """A bounded LRU of compiled UNets by ``Shape``, and the memory they hold.

    An ONNX Runtime session holds its own copy of the weights (3.4 GB for SD 1.x), a TensorRT
    engine its own on the GPU; a replica that served every resolution ever asked for would
    run out of memory. ``capacity`` bounds the entries; adding one more closes the least
    recently used. ``resident_bytes`` sums what the entries report (the server's gauge)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a compiled-graph cache holds at least 1 graph, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Shape, CompiledGraph] = OrderedDict()
        self._builds = 0
        self.evictions = 0

    def __contains__(self, shape: object) -> bool:
        return shape in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> list[Shape]:
        """Least recently used first."""
        return list(self._entries)

    def get(self, shape: Shape) -> CompiledGraph:
        """The entry of ``shape`` (``KeyError`` if absent), now the most recently used."""
        entry = self._entries[shape]
        self._entries.move_to_end(shape)
        return entry

    def put(self, shape: Shape, unet: CompiledUNet) -> CompiledGraph:
        """Add (or replace) ``shape``'s compiled UNet; closes what falls out of the cache."""
        self.discard(shape)
        self._builds += 1
        entry = self._entries[shape] = CompiledGraph(unet, self._builds)
        while len(self._entries) > self.capacity:
            evicted, old = self._entries.popitem(last=False)
            self.evictions += 1
            log.info("evicting the compiled UNet for %s (LRU)", evicted.describe())
            old.unet.close()
        return entry

    def discard(self, shape: Shape) -> None:
        """Drop and close ``shape``'s compiled UNet, if any."""
        entry = self._entries.pop(shape, None)
        if entry is not None:
            entry.unet.close()

    def clear(self) -> None:
        for shape in list(self._entries):
            self.discard(shape)

    @property
    def resident_bytes(self) -> int:
        return sum(e.unet.resident_bytes for e in self._entries.values())


DEFAULT_MAX_GRAPHS = 2


class CompiledBackend(UNetBackend):
    """A backend that compiles the UNet once per ``Shape`` and keeps each compiled UNet in
    sync with the live weights: subclasses say only how to ``_compile`` one. At most
    ``max_graphs`` compiled UNets stay resident (``CompiledGraphs``)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        weights: ResidentWeights,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        super().__init__(unet, weights)
        self.graphs = CompiledGraphs(max_graphs)

    @abstractmethod
    def _compile(self, shape: Shape) -> CompiledUNet:
        """Export, build or load the compiled UNet for ``shape`` (seconds, once)."""

    def prepare(self, shape: Shape) -> None:
        if shape not in self.graphs:
            self.graphs.put(shape, self._compile(shape))

    def predictor(self, shape: Shape) -> NoisePredictor:
        self.prepare(shape)
        compiled = self.graphs.get(shape).unet
        compiled.sync(self.weights)
        return compiled

    def build_id(self, shape: Shape) -> int:
        return self.graphs.get(shape).build_id if shape in self.graphs else 0

    def discard(self, shape: Shape) -> None:
        self.graphs.discard(shape)

    def last_plan(self, shape: Shape) -> tuple[str, ...]:
        return self.graphs.get(shape).unet.loaded.last_plan

    @property
    def resident_bytes(self) -> int:
        return self.graphs.resident_bytes

    def close(self) -> None:
        self.graphs.clear()


def example_inputs(unet: UNet2DConditionModel, shape: Shape, rows: int) -> tuple[torch.Tensor, ...]:
    """Fixed inputs (sample, timestep, text) for export and canaries: seeded noise of the
    UNet's own channel and text widths, at timestep 980 (the first DDIM step)."""
    generator = torch.Generator("cpu").manual_seed(0)
    channels = int(unet.config["in_channels"])
    width = int(unet.config["cross_attention_dim"])
    sample = torch.randn(
        (rows, channels, shape.latent_height, shape.latent_width), generator=generator
    )
    text = torch.randn((rows, TEXT_LENGTH, width), generator=generator)
    return sample, torch.tensor(980, dtype=torch.int64), text


TEXT_LENGTH = 77  # CLIP's context: every SD 1.x conditioning is [B, 77, D]
