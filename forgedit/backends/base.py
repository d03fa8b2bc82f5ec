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

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from forgedit.weights import ResidentWeights, WeightState

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


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

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release sessions and engines."""


class CompiledUNet(NoisePredictor, Protocol):
    """One compiled UNet for one ``Shape`` (an ONNX Runtime session, a TensorRT engine): a
    noise predictor that holds its own copy of the weights, brought up to date by ``sync``."""

    loaded: LoadedWeights

    def sync(self, weights: ResidentWeights) -> None: ...


class CompiledBackend(UNetBackend):
    """A backend that compiles the UNet once per ``Shape`` and keeps each compiled UNet in
    sync with the live weights: subclasses say only how to ``_compile`` one."""

    def __init__(self, unet: UNet2DConditionModel, weights: ResidentWeights) -> None:
        super().__init__(unet, weights)
        self._compiled: dict[Shape, CompiledUNet] = {}

    @abstractmethod
    def _compile(self, shape: Shape) -> CompiledUNet:
        """Export, build or load the compiled UNet for ``shape`` (seconds, once)."""

    def prepare(self, shape: Shape) -> None:
        if shape not in self._compiled:
            self._compiled[shape] = self._compile(shape)

    def predictor(self, shape: Shape) -> NoisePredictor:
        self.prepare(shape)
        compiled = self._compiled[shape]
        compiled.sync(self.weights)
        return compiled

    def last_plan(self, shape: Shape) -> tuple[str, ...]:
        return self._compiled[shape].loaded.last_plan

    def close(self) -> None:
        self._compiled.clear()


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
