"""Sampling edits: DDIM with classifier-free guidance, a whole batch of images per loop
(FORGEDIT_SPEC.md §6).

The scheduler is built by hand with the original's arguments and NOT from the model's
``scheduler_config.json``: ``steps_offset=0`` and "leading" spacing give timesteps
980, 960, …, 0 for 50 steps (SD's own config would give 981…1), and ``set_alpha_to_one=False``
makes the last step use ᾱ_0 = 0.99915. That is what produced the paper's results.

Batching: forgetting and the UNet are shared by every image of one strategy; only the text
embedding and the initial noise differ. So all images of a strategy go through one loop
(``[uncond × B, cond × B]``, 2B UNet rows with guidance). Each image's initial latent comes
from its own CPU generator seeded with that image's seed, so an image is the same batched
or alone, up to the ~1e-6 by which batched matmuls round differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from forgedit.backends.base import NoisePredictor
from forgedit.events import CancelToken

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

StepCallback = Callable[[int, int], None]  # (step, steps), 1-based
# (step, steps, x0): DDIM's estimate of the clean latents after a step, [B, C, h, w]. A
# by-product of the step (``pred_original_sample``): watching it changes nothing.
X0Callback = Callable[[int, int, torch.Tensor], None]


def make_ddim_scheduler() -> DDIMScheduler:
    """The original's DDIM, exactly (spec §3.3). Also supplies ``add_noise`` for training."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def initial_latents(
    seeds: Sequence[int], channels: int, height: int, width: int, vae_scale_factor: int
) -> torch.Tensor:
    """``randn(1, C, H/8, W/8)`` per seed from its own CPU generator, stacked to [B, C, h, w]."""
    shape = (1, channels, height // vae_scale_factor, width // vae_scale_factor)
    return torch.cat(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
    )


@torch.no_grad()
def denoise(
    unet: NoisePredictor,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    unconditional: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    on_step: StepCallback | None = None,
    on_x0: X0Callback | None = None,
    cancel: CancelToken | None = None,
    start_step: int = 0,
) -> torch.Tensor:
    """Run deterministic DDIM (η = 0) from ``latents`` [B, C, h, w] under ``conditioning``
    [B, 77, D]. Guidance is ε_u + w·(ε_c − ε_u) with ``unconditional`` = E("") [1, 77, D];
    it is skipped for w ≤ 1, as the original. Checks ``cancel`` before every step; after
    each, ``on_step`` hears of it and ``on_x0`` gets the step's x0 estimate.

    ``start_step`` > 0 skips the schedule's first timesteps: ``latents`` are then already
    noised to timestep ``start_step`` of the schedule (SDEdit, ``forgedit.preview``). The
    sweep's sampling always starts at 0, from pure noise.

    ``unet`` is whichever backend the engine chose (``forgedit.backends``); this loop neither
    knows nor cares. Its ε comes back as fp32 (fast mode's fp16 autocast lives in the torch
    backend)."""
    device = unet.device
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(steps)
    guided = guidance > 1.0
    batch = latents.shape[0]
    latents = latents.to(device)
    if start_step == 0:
        latents = latents * scheduler.init_noise_sigma  # (1 for DDIM)
    if guided:
        conditioning = torch.cat([unconditional.expand(batch, -1, -1), conditioning])
    conditioning = conditioning.to(device)
    for i, t in enumerate(scheduler.timesteps.to(device)):
        if i < start_step:
            continue
        if cancel is not None:
            cancel.check()
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = unet.predict(model_input, t, conditioning)
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
        latents, x0 = scheduler.step(noise_pred, t, latents, eta=0.0, return_dict=False)
        if on_step is not None:
            on_step(i + 1, steps)
        if on_x0 is not None:
            on_x0(i + 1, steps, x0)
    return latents


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Latents → images in [0, 1], [B, 3, H, W] on the CPU. ``1 / s * z``, not ``z / s``: the
    original's form, which rounds differently by one ulp (spec §15.6)."""
    latents = 1 / scaling_factor * latents
    image = vae.decode(latents).sample
    return (image / 2 + 0.5).clamp(0, 1).cpu().float()
