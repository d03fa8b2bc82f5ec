"""Previews: a first look at an edit before its fine-tune ends, and each image's x0 estimate
while it is sampled. Neither is part of the original Forgedit (docs/DIVERGENCES.md), and
neither changes a result: the fine-tune and the sweep run exactly as without them.

**The training-free preview** (SDEdit, Meng et al. 2022) is the base model's own edit of the
input, made before any fine-tune, in numbered steps (``sdedit``):

1. the input image at the job's resolution, encoded by the VAE: the posterior sample of the
   job's VAE seed, as the fine-tune encodes it (``forgedit.training.encode_image``);
2. noised to timestep ``PREVIEW_START`` of a ``PREVIEW_STEPS``-step DDIM schedule (strength
   0.6: 500 of 1000) with the initial noise of the job's first sampling seed;
3. denoised from there toward the first target prompt with the job's guidance scale, in the
   remaining ``PREVIEW_STEPS - PREVIEW_START`` = 6 steps, by the base UNet in eager torch (no
   backend export or engine build on a job's critical path);
4. decoded by the VAE at full size.

So it is deterministic from the job's seeds, and costs one VAE encode, 6 guided UNet calls of
one image and one VAE decode: a few percent of a fine-tune's 40 updates of batch 10 (figures in
BENCHMARKS.md). It runs on the job's own device before the fine-tune, which simply starts after
it: overlapping it with training would compete for the same device for a saving of that same
few percent, at the price of a second thread touching the resident model.

**x0 previews** show, every k denoising steps, DDIM's current estimate of each image's clean
latents (``pred_original_sample``, a by-product of the step) at the latent grid's size (1/8 of
the image's side), mapped to RGB by ``LatentRGB``: a per-base-model linear map fitted once by
least squares on VAE decodes of a few latents, so a preview costs a 4×3 matrix product instead
of a VAE decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F

from forgedit.sampling import decode, denoise, initial_latents, make_ddim_scheduler

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from PIL import Image

    from forgedit.backends.base import NoisePredictor
    from forgedit.events import CancelToken

# The training-free preview's DDIM schedule, and the step it starts at: strength
# 1 - PREVIEW_START / PREVIEW_STEPS = 0.6 keeps the layout and colours of the input and leaves
# the prompt room to change it (SDEdit's usual 0.5-0.8).
PREVIEW_STEPS = 10
PREVIEW_START = 4
PREVIEW_DENOISING_STEPS = PREVIEW_STEPS - PREVIEW_START  # the UNet steps a preview runs

PreviewKind = Literal["training_free", "x0"]
PREVIEW_KINDS: tuple[PreviewKind, ...] = ("training_free", "x0")


@dataclass(frozen=True)
class Preview:
    """One preview image: never a result."""

    kind: PreviewKind
    image: Image.Image
    step: int  # x0: the 1-based denoising step; training_free: the steps it ran
    steps: int
    index: int = 0  # x0: the image's index in the sweep


PreviewCallback = Callable[[Preview], None]


@torch.no_grad()
def sdedit(
    unet: NoisePredictor,
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    conditioning: torch.Tensor,
    unconditional: torch.Tensor,
    *,
    seed: int,
    vae_seed: int,
    guidance: float,
    scaling_factor: float,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """The training-free preview's image, [1, 3, H, W] in [0, 1]: ``pixels`` [1, 3, H, W] in
    [-1, 1] noised to ``PREVIEW_START`` and denoised toward ``conditioning`` (see the module
    docstring). Checks ``cancel`` before every step."""
    from forgedit.training import encode_image

    # 1. The input's latents, as the fine-tune sees them.
    z0 = encode_image(vae, pixels, vae_seed, scaling_factor)
    _, channels, h, w = z0.shape
    # 2. Noised to the start timestep with the first sampling seed's noise.
    noise = initial_latents([seed], channels, h, w, 1).to(z0.device)
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(PREVIEW_STEPS)
    start = cast(torch.IntTensor, scheduler.timesteps[PREVIEW_START : PREVIEW_START + 1])
    noised = scheduler.add_noise(z0, noise, start)
    # 3. Denoised toward the target prompt by the base model.
    latents = denoise(
        unet,
        noised,
        conditioning,
        unconditional,
        steps=PREVIEW_STEPS,
        guidance=guidance,
        cancel=cancel,
        start_step=PREVIEW_START,
    )
    # 4. Decoded at full size.
    return decode(vae, latents, scaling_factor)


@dataclass(frozen=True)
class LatentRGB:
    """A linear map from latents [B, C, h, w] to RGB [B, 3, h, w] in [0, 1]: what a VAE decode
    followed by an 8×8 average would give, to first order. For previews only."""

    weight: torch.Tensor  # [3, C]
    bias: torch.Tensor  # [3]

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        vae: AutoencoderKL,
        scaling_factor: float,
        channels: int,
        vae_scale_factor: int,
        *,
        count: int = 4,
        size: int = 16,
        seed: int = 0,
    ) -> LatentRGB:
        """Least squares over ``count`` latents of ``size``² from a generator seeded with
        ``seed`` (deterministic): smooth random fields (a 4× bilinear upsampling of N(0, 1)
        plus a little fine noise), because x0 estimates are smooth too. Each latent pixel is
        paired with the average of its ``vae_scale_factor``² pixels in the VAE's decode; the
        map is fitted in float64. Costs ``count`` decodes of ``size · vae_scale_factor``² pixels
        (128² for SD: well under a second on a GPU)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        coarse = torch.randn(count, channels, size // 4, size // 4, generator=generator)
        fine = torch.randn(count, channels, size, size, generator=generator)
        smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        latents = smooth + 0.25 * fine
        device = next(vae.parameters()).device
        images = decode(vae, latents.to(device), scaling_factor)  # [count, 3, 8s, 8s]
        target = F.avg_pool2d(images, vae_scale_factor)  # [count, 3, s, s]
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
        solution = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
        return cls(solution[:-1].T.float().contiguous(), solution[-1].float().contiguous())

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], [B, 3, h, w] on the CPU, of ``latents`` [B, C, h, w]."""
        z = latents.detach().to("cpu", torch.float32)
        rgb = torch.einsum("bchw,rc->brhw", z, self.weight) + self.bias[None, :, None, None]
        return rgb.clamp(0, 1)
