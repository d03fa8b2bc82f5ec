"""How the cost of one UNet step scales with the resolution, for run-time estimates.

A UNet step's time tracks its floating-point operations on a compute-bound accelerator, and
they do not scale with the pixel count alone: convolutions grow with the latent area, self-
attention with its square. So the ratio is counted, not assumed: ``unet_step_flops`` runs the
UNet once on the *meta* device (no memory, no weights, about a second) under torch's
``FlopCounterMode``, and the counts are cached per (architecture, latent size). For SD 1.x,
768×768 costs 2.7× a 512×512 step and 1024×1024 5.8×, where the pixel ratios are 2.25 and 4.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import torch

from forgedit.backends.base import TEXT_LENGTH


def unet_step_flops(unet_config: Mapping[str, Any], latent_height: int, latent_width: int) -> int:
    """FLOPs of one UNet evaluation of one row at the given latent size."""
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    return _flops(json.dumps(config, sort_keys=True, default=list), latent_height, latent_width)


def relative_step_cost(
    unet_config: Mapping[str, Any], latent: tuple[int, int], reference: tuple[int, int]
) -> float:
    """FLOPs of a step at ``latent`` (height, width) over those at ``reference``."""
    return unet_step_flops(unet_config, *latent) / unet_step_flops(unet_config, *reference)


@functools.lru_cache(maxsize=64)
def _flops(config_json: str, latent_height: int, latent_width: int) -> int:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel.from_config(config)
        sample = torch.empty(1, int(config["in_channels"]), latent_height, latent_width)
        text = torch.empty(1, TEXT_LENGTH, int(config["cross_attention_dim"]))
        timestep = torch.tensor(980)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=text)
    return int(counter.get_total_flops())
