"""Learning the image: the fine-tune that makes an edit model (FORGEDIT_SPEC.md §3, §7, §8).

All three modes share one loop; a ``Stage`` says what trains and for how long:

* ``joint`` (vanilla Forgedit): the source embedding e (lr 1e-3) and UNet down_blocks.1-3 /
  up_blocks.1-3 (lr 6e-5) together, 40 updates of batch 10, with the original's early stop.
* ``two_stage`` (Forgedit transferred to Imagic): 400 updates of e alone, then 1000 of the
  same UNet subset alone, batch 1.
* ``dreambooth`` (DreamBooth-Forgedit): the whole UNet and the whole CLIP text encoder (both
  5e-6), 100 updates of batch 4; e is re-encoded through the text encoder at every update.

Every update draws, from ONE CPU generator seeded with the training seed and in the original's
order, the noise ε for the whole batch and then the timesteps t. The batch is the same image
latent repeated (the original uses no augmentation). The loss is the original's
``mse(reduction="none").mean([1, 2, 3]).mean()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from forgedit.config import Stage, TrainingConfig
from forgedit.events import CancelToken, TrainingCallback, TrainingProgress
from forgedit.forgetting import trained_parameter_names
from forgedit.sampling import make_ddim_scheduler
from forgedit.text import encode_prompt, tokenize
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class TrainingResult:
    source_embedding: torch.Tensor  # e_opt (or E_ft(source) in dreambooth), fp32, CPU
    loss_curve: list[float]  # one loss per performed update
    trained_keys: list[str]  # "unet.<name>" / "text_encoder.<name>", in parameter order
    stopped_early: bool


@torch.no_grad()
def encode_image(
    vae: AutoencoderKL, pixels: torch.Tensor, seed: int, scaling_factor: float
) -> torch.Tensor:
    """z0 = scaling_factor · a *sample* of the VAE posterior, drawn from its own CPU generator
    (seed 0 by default, as the original)."""
    device = next(vae.parameters()).device
    generator = torch.Generator("cpu").manual_seed(seed)
    posterior = vae.encode(pixels.to(device, torch.float32)).latent_dist
    return scaling_factor * posterior.sample(generator=generator)


def finetune(
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    weights: ResidentWeights,
    pixels: torch.Tensor,
    source_prompt: str,
    config: TrainingConfig,
    scaling_factor: float,
    on_progress: TrainingCallback | None = None,
    cancel: CancelToken | None = None,
) -> TrainingResult:
    """Fine-tune in place on the resident modules and return e_opt and the loss curve.

    The trained tensors are left holding θ_ft and are registered with ``weights`` (which holds
    their pristine copies); the caller reads the delta and calls ``weights.restore()``.
    Raises ``CancelledError`` at the first update boundary after ``cancel`` is set.
    """
    device = next(unet.parameters()).device

    # 1. Encode the image once: z0, a sample of the VAE posterior from its own generator.
    scheduler = make_ddim_scheduler()
    z0 = encode_image(vae, pixels, config.vae_seed, scaling_factor)

    # 2. Say what trains, and keep pristine copies of it to restore and to take Δ against.
    trained_keys = _trained_keys(config, weights)
    weights.begin_training(trained_keys)

    # 3. The source embedding e: the text side's starting point.
    with torch.no_grad():
        source_embedding = encode_prompt(tokenizer, text_encoder, source_prompt).detach().clone()
    trainee = _Trainee(
        unet=unet,
        text_encoder=text_encoder,
        scheduler=scheduler,
        z0=z0,
        embedding=torch.nn.Parameter(source_embedding, requires_grad=False),
        source_ids=tokenize(tokenizer, source_prompt).to(device),
        generator=torch.Generator("cpu").manual_seed(config.seed),
        trains_encoder=config.trains_text_encoder,
        autocast=config.precision == "fast" and device.type == "cuda",
    )

    # 4. The optimisation, stage by stage, until the schedule or the early stop ends it.
    loss_curve: list[float] = []
    stopped_early = False
    started = time.perf_counter()
    unet.train()
    try:
        for stage in config.stages:
            optimizer = _stage_optimizer(trainee, stage, config, weights, trained_keys)
            for k in range(stage.updates):
                if cancel is not None:
                    cancel.check()
                loss = _loss(trainee, stage)
                value = loss.item()
                # Checked before the update, as the original: the triggering batch is not used.
                if _early_stop(stage, k, value):
                    stopped_early = True
                    break
                (loss * config.loss_scale).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_curve.append(value)
                if on_progress is not None:
                    elapsed = time.perf_counter() - started
                    on_progress(
                        TrainingProgress(
                            stage.name, len(loss_curve), config.total_updates, value, elapsed
                        )
                    )
            if stopped_early:
                break
        if cancel is not None:
            cancel.check()
    finally:
        unet.eval()
        trainee.freeze()

    # 5. e_opt: the optimised embedding, or the fine-tuned encoder's E(source) in dreambooth.
    with torch.no_grad():
        if trainee.trains_encoder:
            final = encode_prompt(tokenizer, text_encoder, source_prompt)
        else:
            final = trainee.embedding.detach()
    return TrainingResult(
        final.to("cpu", torch.float32).clone(), loss_curve, trained_keys, stopped_early
    )


@dataclass
class _Trainee:
    """What one fine-tune's updates read: the modules, the encoded image, the text side and
    the one generator every update draws ε and t from."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    scheduler: DDIMScheduler
    z0: torch.Tensor
    embedding: torch.nn.Parameter
    source_ids: torch.Tensor
    generator: torch.Generator
    trains_encoder: bool
    autocast: bool  # fast mode on CUDA: bf16 autocast and fused Adam

    def freeze(self) -> None:
        """Nothing requires a gradient (the state between stages and after training)."""
        for p in (*self.unet.parameters(), *self.text_encoder.parameters()):
            p.requires_grad_(False)
        self.embedding.requires_grad_(False)


def _trained_keys(config: TrainingConfig, weights: ResidentWeights) -> list[str]:
    """Every tensor some stage trains, "unet.<name>" / "text_encoder.<name>", in parameter
    order without repeats."""
    unet_names = weights.names("unet")
    keys: list[str] = []
    for stage in config.stages:
        if stage.unet_lr is not None:
            keys += [f"unet.{n}" for n in trained_parameter_names(unet_names, stage.unet_subset)]
    if config.trains_text_encoder:
        keys += [f"text_encoder.{n}" for n in weights.names("text_encoder")]
    return list(dict.fromkeys(keys))


def _stage_optimizer(
    trainee: _Trainee,
    stage: Stage,
    config: TrainingConfig,
    weights: ResidentWeights,
    trained_keys: list[str],
) -> torch.optim.Adam:
    """Unfreeze what ``stage`` trains (and only that) and give it a fresh Adam, one parameter
    group per learning rate: the UNet subset, the text encoder, or the free embedding e."""
    unet_params = (
        [weights.parameter(k) for k in trained_keys if k.startswith("unet.")]
        if stage.unet_lr is not None
        else []
    )
    encoder_params = (
        [weights.parameter(k) for k in trained_keys if k.startswith("text_encoder.")]
        if trainee.trains_encoder and stage.text_lr is not None
        else []
    )
    for p in (*trainee.unet.parameters(), *trainee.text_encoder.parameters()):
        p.requires_grad_(False)
    for p in (*unet_params, *encoder_params):
        p.requires_grad_(True)
    embedding = trainee.embedding
    embedding.requires_grad_(stage.text_lr is not None and not trainee.trains_encoder)

    groups: list[dict[str, object]] = []
    if unet_params:
        groups.append({"params": unet_params, "lr": stage.unet_lr})
    if encoder_params:
        groups.append({"params": encoder_params, "lr": stage.text_lr})
    if embedding.requires_grad:
        groups.append({"params": [embedding], "lr": stage.text_lr})
    return torch.optim.Adam(
        groups,
        betas=config.adam_betas,
        eps=config.adam_eps,
        **({"fused": True} if trainee.autocast else {}),
    )


def _early_stop(stage: Stage, k: int, loss: float) -> bool:
    es = stage.early_stop
    return es is not None and loss < es.threshold and k * stage.batch_size > es.min_samples


def _loss(t: _Trainee, stage: Stage) -> torch.Tensor:
    """One batch's loss: the image latent repeated, noised at random timesteps, and the
    UNet's noise prediction against the noise (the original's per-sample mean, then mean)."""
    bsz = stage.batch_size
    device = t.z0.device
    latents = t.z0.repeat(bsz, 1, 1, 1)
    # ε first, then t, from the same generator: the original's draw order (spec §15.3).
    noise = torch.randn(latents.shape, generator=t.generator).to(device)
    timesteps = torch.randint(NUM_TRAIN_TIMESTEPS, (bsz,), generator=t.generator).to(device)
    noisy = t.scheduler.add_noise(latents, noise, timesteps)  # type: ignore[arg-type]  # (stubs: IntTensor)
    if t.trains_encoder:
        conditioning = t.text_encoder(t.source_ids)[0].repeat(bsz, 1, 1)
    else:
        conditioning = t.embedding.repeat(bsz, 1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.autocast):
        prediction = t.unet(noisy, timesteps, conditioning).sample
    return F.mse_loss(prediction.float(), noise, reduction="none").mean([1, 2, 3]).mean()
