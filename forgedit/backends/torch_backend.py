"""The eager PyTorch UNet (today's path), optionally through ``torch.compile``.

Its weights *are* the live parameters ``ResidentWeights`` writes in place, so a sync sends
nothing: the edit model is already there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from forgedit.backends.base import NoisePredictor, Shape, UNetBackend
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


class TorchBackend(UNetBackend):
    """Eager torch; ``compile=True`` wraps the UNet in ``torch.compile`` (a CUDA lever: on the
    CPU it measured slower, ENVIRONMENT.md). ``autocast_dtype`` is fast mode's fp16 on CUDA."""

    name = "torch"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        weights: ResidentWeights,
        *,
        compile: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(unet, weights)
        self.autocast_dtype = autocast_dtype
        # torch.compile wraps a module in a module (OptimizedModule); its stubs say Callable.
        self._module = cast(torch.nn.Module, torch.compile(unet)) if compile else unet

    def prepare(self, shape: Shape) -> None:
        """Nothing to build (``torch.compile`` compiles on the first call)."""

    def predictor(self, shape: Shape) -> NoisePredictor:
        return _TorchPredictor(self._module, self.device, self.autocast_dtype)


class _TorchPredictor:
    def __init__(
        self, module: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None
    ):
        self._module = module
        self._device = device
        self._autocast = autocast_dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def predict(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        with torch.autocast(
            self._device.type,
            dtype=self._autocast or torch.float32,
            enabled=self._autocast is not None,
        ):
            out = self._module(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        return out.sample.float()
