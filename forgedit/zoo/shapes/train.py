"""Train the toy world's models from scratch, deterministically, on one CPU thread.

    OMP_NUM_THREADS=1 python -m forgedit.zoo.shapes.train            # every stage, then export
    python -m forgedit.zoo.shapes.train --smoke --work /tmp/s --out /tmp/s/model   # minutes
    python -m forgedit.zoo.shapes.train --stages unet                 # one stage (resumes)

Stages, each written to ``--work`` and skipped when already done (the UNet also resumes from
its last checkpoint, bit-exactly):

1. ``tokenizer``: SD's CLIP BPE tokenizer restricted to the world's words (below).
2. ``clip``: the scoring CLIP (vision + text), contrastive, every batch the 54 captions once.
3. ``blip``: the BLIP captioner, teacher-forced cross-entropy on ``Scene.blip_caption``.
4. ``vae``: the AutoencoderKL (4 levels, 8 px per latent), L1 + L2 + a tiny KL, as SD's.
5. ``latents``: the training set's posteriors (mean, std) and the latent scaling factor.
6. ``unet``: UNet2DConditionModel + CLIP text encoder, jointly, on SD's noise schedule
   (scaled_linear 0.00085–0.012, 1000 steps), ε-prediction with min-SNR-5 weighting, 10 %
   caption dropout to the empty prompt (classifier-free guidance), EMA weights kept.
7. ``export``: fp16 copies in the real layouts (diffusers pipeline, BLIP and CLIP in
   transformers' formats) and ``manifest.json`` (sha256 per file, this config, the commit
   of this code, run times), renamed into ``--out`` in one step.

The tokenizer is SD's CLIP BPE algorithm and file format (``vocab.json`` + ``merges.txt``)
with only the merges that SD's tokenizer applies to the world's words, so every caption
splits into exactly the tokens SD's tokenizer gives (ids renumbered); any other word falls
back to smaller pieces, never to an unknown token. The full 49,408-token vocabulary would
spend 49,408 × width parameters per text tower on ~20 rows that are ever trained: with two
text towers that is half of the 20 MB the shipped model may take.

Determinism: every random draw comes from a generator seeded from ``TrainConfig.seed`` (model
initialisation, data order, noise, timesteps, caption dropout) and scenes from
``world.scene("train", i)``; run with one thread (``OMP_NUM_THREADS=1``) for identical bytes.

Measured run time on the project's machine (2 cores shared with other sessions, one thread):
about 72 minutes for the shipped files, the UNet stage (23 min) and the CLIP (31 min) most of
it; each stage's seconds are in the manifest (``run_times_s``) and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from forgedit.zoo.shapes import world

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every number that affects the trained files."""

    seed: int = 17
    image_size: int = world.NATIVE_SIZE
    # tokenizer / text towers
    text_width: int = 64
    text_layers: int = 3
    # scoring CLIP
    clip_steps: int = 3000
    clip_refine_steps: int = 1500
    clip_refine_lr: float = 3e-4
    clip_lr: float = 1e-3
    clip_vision_layers: int = 3
    # BLIP
    blip_steps: int = 1500
    blip_batch: int = 32
    blip_lr: float = 5e-4
    # VAE
    vae_steps: int = 900
    vae_batch: int = 8
    vae_lr: float = 5e-4
    vae_widths: tuple[int, ...] = (16, 32, 64, 64)
    vae_kl_weight: float = 1e-6
    # latents
    unet_images: int = 6000
    # UNet + text encoder
    unet_steps: int = 1400
    unet_batch: int = 32
    unet_lr: float = 5e-4
    unet_warmup: int = 250
    unet_widths: tuple[int, ...] = (32, 64, 96, 96)
    unet_heads: int = 4
    caption_dropout: float = 0.1
    prefix_drop: float = 0.25  # train "a red circle ..." too (BLIP's form, no "a photo of")
    trailing_period: float = 0.25
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    # augmentation of the scorers' and captioner's inputs (edits are blurrier than renders)
    blur_sigma_max: float = 0.8
    # ViT patch of the CLIP and BLIP vision towers: 16 px patches (16 per image) learned shape
    # as well as 8 px ones in a probe, at two thirds of the time per update
    vision_patch: int = 16
    noise_std: float = 0.03

    def smoke(self) -> TrainConfig:
        """The same pipeline with a few steps per stage: checks everything in minutes."""
        return dataclasses.replace(
            self,
            clip_steps=30,
            blip_steps=30,
            vae_steps=30,
            unet_images=512,
            unet_steps=60,
            unet_warmup=10,
            checkpoint_every=25,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


STAGES = ("tokenizer", "clip", "blip", "vae", "latents", "unet", "export")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_WORDS = (
    "a photo of on background "
    + " ".join(world.COLOURS)
    + " "
    + " ".join(world.SHAPES)
    + " "
    + " ".join(world.BACKGROUNDS)
).split()
# BLIP's vocabulary: BERT-uncased-style specials, the caption words, BLIP's [DEC]/[ENC].
BLIP_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BLIP_ADDED = ("[DEC]", "[ENC]")
BLIP_WORDS = tuple(dict.fromkeys(TOKENIZER_WORDS))
PNDM_SD14 = {  # SD 1.4's scheduler_config.json (the engine builds its own DDIM regardless)
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# 1. Tokenizer


def restricted_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to ``words``, in CLIP's order. BPE merges the
    lowest-ranked adjacent pair first, so these alone tokenize ``words`` exactly as all of
    CLIP's merges do."""
    from forgedit.zoo.tiny import clip_bpe_merges

    merges = clip_bpe_merges()
    ranks = {pair: i for i, pair in enumerate(merges)}
    used: set[int] = set()
    for text in words:
        word = [*text[:-1], text[-1] + "</w>"]
        while len(word) > 1:
            candidates = [ranks[p] for p in itertools.pairwise(word) if p in ranks]
            if not candidates:
                break
            rank = min(candidates)
            used.add(rank)
            first, second = merges[rank]
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
    return [merges[i] for i in sorted(used)]


def stage_tokenizer(cfg: TrainConfig, work: Path) -> None:
    from forgedit.zoo.tiny import write_clip_tokenizer_files

    target = work / "tokenizer"
    shutil.rmtree(target, ignore_errors=True)
    write_clip_tokenizer_files(target, restricted_merges(TOKENIZER_WORDS))


def load_tokenizer(work: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(work / "tokenizer", local_files_only=True)


def text_config(cfg: TrainConfig, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """[N, 77] ids, padded as SD pads (to 77 with <|endoftext|>)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


# ----------------------------------------------------------------------------------------------
# Data


def render_batch(
    split: world.Split, indices: Iterator[int] | Sequence[int]
) -> tuple[torch.Tensor, list[world.Scene]]:
    """Scenes ``indices`` of ``split`` as [B, 3, H, W] floats in [0, 1]."""
    scenes = [world.scene(split, i) for i in indices]
    return _to_tensor([s.render() for s in scenes]), scenes


def _to_tensor(images: Sequence[Any]) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def balanced_batch(step: int, seed: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """Every caption of the world once, each with random geometry (the contrastive batch)."""
    rng = np.random.default_rng([seed, step])
    scenes = []
    for text in world.all_captions():
        colour, shape, background = _attributes(text)
        while True:  # redraw until the drawn scene has these attributes (1/54 each)
            s = world.random_scene(rng)
            s = dataclasses.replace(s, colour=colour, background=background)
            if s.shape == shape:
                break
        scenes.append(s)
    return _to_tensor([s.render() for s in scenes]), scenes


def _attributes(text: str) -> tuple[str, str, str]:
    words = text.removeprefix(world.CAPTION_PREFIX).split()
    return words[1], words[2], words[5]


def augment(pixels: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (σ up to ``blur_sigma_max`` px, half the images) and pixel noise:
    edited images are softer than renders."""
    b = pixels.shape[0]
    sigma = torch.rand(b, generator=generator) * cfg.blur_sigma_max
    sigma = torch.where(torch.rand(b, generator=generator) < 0.5, sigma, torch.zeros(b))
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # σ→0 gives a delta
    k = kernel.repeat_interleave(3, 0)  # [3B, 7]
    flat = pixels.reshape(1, 3 * b, *pixels.shape[2:])
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, k[:, None, None, :], groups=3 * b)
    flat = F.conv2d(flat, k[:, None, :, None], groups=3 * b)
    out = flat.reshape_as(pixels)
    out = out + cfg.noise_std * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """What the CLIP and BLIP image processors do to a 64 px image (no resize needed)."""
    mean = torch.tensor(CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(CLIP_STD)[None, :, None, None]
    return (pixels - mean) / std


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# 2. The scoring CLIP


def clip_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width,
        num_hidden_layers=cfg.clip_vision_layers,
        num_attention_heads=4,
        image_size=cfg.image_size,
        patch_size=cfg.vision_patch,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=text_config(cfg, tokenizer).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=cfg.text_width,
    )
    return CLIPModel(config)


def stage_clip(cfg: TrainConfig, work: Path) -> None:
    """Two phases: ``clip_steps`` from scratch (kept in ``clip-phase1/``, so a resumed run
    skips it), then ``clip_refine_steps`` at the lower ``clip_refine_lr`` on new images."""
    from transformers import CLIPModel

    tokenizer = load_tokenizer(work)
    phase1 = work / "clip-phase1"
    if (phase1 / "config.json").is_file():
        model = CLIPModel.from_pretrained(phase1)
        log("clip: phase 1 done before, loaded")
    else:
        torch.manual_seed(cfg.seed + 1)
        model = clip_model(cfg, tokenizer)
        _train_clip(model, tokenizer, cfg, range(cfg.clip_steps), cfg.clip_lr, cfg.seed + 2)
        save_module(model, phase1)
    refine = range(cfg.clip_steps, cfg.clip_steps + cfg.clip_refine_steps)
    _train_clip(model, tokenizer, cfg, refine, cfg.clip_refine_lr, cfg.seed + 12)
    model.eval()
    save_module(model, work / "clip")


def _train_clip(
    model: Any, tokenizer: Any, cfg: TrainConfig, steps: range, lr: float, seed: int
) -> None:
    """Contrastive updates over ``steps`` (batch k shows every caption once, with the
    geometry of ``balanced_batch(k)``), cosine schedule over the range."""
    model.train()
    captions = world.all_captions()
    ids = tokenizer(captions, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(captions))
    for i, step in enumerate(steps):
        set_lr(optimizer, cosine_lr(i, len(steps), lr, 50))
        pixels, _ = balanced_batch(step, cfg.seed + 3)
        pixels = normalise(augment(pixels, cfg, generator))
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
        logits = out.logits_per_image
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 100 == 0 or i == len(steps) - 1:
            acc = (logits.argmax(1) == labels).float().mean().item()
            log(f"clip step {step} loss {loss.item():.4f} batch top-1 {acc:.3f}")


# ----------------------------------------------------------------------------------------------
# 3. BLIP


def blip_vocabulary() -> list[str]:
    return [*BLIP_SPECIAL, *BLIP_WORDS, *BLIP_ADDED]


def blip_model(cfg: TrainConfig) -> Any:
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipTextConfig,
        BlipVisionConfig,
    )

    vocab = blip_vocabulary()
    ids = {t: i for i, t in enumerate(vocab)}
    text = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.text_width,
        encoder_hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=ids["[DEC]"],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
    )
    vision = BlipVisionConfig(
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=cfg.image_size,
        patch_size=cfg.vision_patch,
        hidden_act="quick_gelu",  # as the CLIP vision tower it starts from
    )
    config = BlipConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.text_width
    )
    return BlipForConditionalGeneration(config)


def blip_ids(captions: Sequence[str]) -> torch.Tensor:
    """[DEC] caption words [SEP], padded with [PAD]: what BLIP's decoder is trained on."""
    vocab = {t: i for i, t in enumerate(blip_vocabulary())}
    rows = [[vocab["[DEC]"], *(vocab[w] for w in c.split()), vocab["[SEP]"]] for c in captions]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [vocab["[PAD]"]] * (width - len(r)) for r in rows])


def clip_vision_to_blip(clip_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained CLIP vision tower's weights under BLIP's vision names (BLIP fuses q, k, v
    into ``qkv`` and has no pre-LayerNorm, which is left out; its patch bias starts at 0).
    Real BLIP starts from a pretrained ViT; the toy one from the toy CLIP's, which learned to
    tell the shapes apart."""
    out = {
        "embeddings.class_embedding": clip_vision["embeddings.class_embedding"][None, None],
        "embeddings.patch_embedding.weight": clip_vision["embeddings.patch_embedding.weight"],
        "embeddings.patch_embedding.bias": torch.zeros(
            clip_vision["embeddings.patch_embedding.weight"].shape[0]
        ),
        "embeddings.position_embedding": clip_vision["embeddings.position_embedding.weight"][None],
        "post_layernorm.weight": clip_vision["post_layernorm.weight"],
        "post_layernorm.bias": clip_vision["post_layernorm.bias"],
    }
    layers = {int(k.split(".")[2]) for k in clip_vision if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}self_attn.qkv.{part}"] = torch.cat(
                [clip_vision[f"{src}self_attn.{n}_proj.{part}"] for n in ("q", "k", "v")]
            )
            out[f"{dst}self_attn.projection.{part}"] = clip_vision[
                f"{src}self_attn.out_proj.{part}"
            ]
            for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{name}.{part}"] = clip_vision[f"{src}{name}.{part}"]
    return out


def stage_blip(cfg: TrainConfig, work: Path) -> None:
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed + 4)
    model = blip_model(cfg)
    clip: Any = CLIPModel.from_pretrained(work / "clip")
    vision = clip_vision_to_blip(clip.vision_model.state_dict())
    missing, unexpected = model.vision_model.load_state_dict(vision, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"CLIP → BLIP vision: missing {missing}, unexpected {unexpected}")
    model.train()
    pad = blip_vocabulary().index("[PAD]")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.blip_lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(cfg.seed + 5)
    for step in range(cfg.blip_steps):
        set_lr(optimizer, cosine_lr(step, cfg.blip_steps, cfg.blip_lr, 50))
        start = 10_000_000 + step * cfg.blip_batch  # train-split images the VAE never uses
        pixels, scenes = render_batch("train", range(start, start + cfg.blip_batch))
        pixels = normalise(augment(pixels, cfg, generator))
        ids = blip_ids([s.blip_caption for s in scenes])
        labels = ids.masked_fill(ids == pad, -100)
        out = model(
            pixel_values=pixels, input_ids=ids, attention_mask=(ids != pad).long(), labels=labels
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.blip_steps - 1:
            log(f"blip step {step} loss {out.loss.item():.4f}")
    model.eval()
    save_module(model, work / "blip")


# ----------------------------------------------------------------------------------------------
# 4. VAE


def vae_model(cfg: TrainConfig) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=cfg.vae_widths,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=cfg.image_size,
        scaling_factor=1.0,  # set by the latents stage (SD's 0.18215 was found the same way)
    )
    # Start the posterior nearly deterministic (σ ≈ 0.02): with σ = 1 the decoder sees noise
    # until the encoder outgrows it, and a 1000-update run stalls there.
    quant_conv: Any = vae.quant_conv  # type: ignore[attr-defined]
    with torch.no_grad():
        quant_conv.bias[4:] = -8.0
    return vae


def stage_vae(cfg: TrainConfig, work: Path) -> None:
    torch.manual_seed(cfg.seed + 6)
    vae = vae_model(cfg)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    for step in range(cfg.vae_steps):
        set_lr(optimizer, cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 50, floor=0.02))
        pixels, _ = render_batch("train", range(step * cfg.vae_batch, (step + 1) * cfg.vae_batch))
        x = pixels * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        l2 = (recon - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = l1 + l2 + cfg.vae_kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            psnr = 10 * math.log10(4.0 / max(l2.item(), 1e-12))  # signal range 2 ([-1, 1])
            log(f"vae step {step} l1 {l1.item():.4f} psnr {psnr:.2f} dB kl {kl.item():.1f}")
    vae.eval()
    save_module(vae, work / "vae")


# ----------------------------------------------------------------------------------------------
# 5. Latents


@torch.no_grad()
def stage_latents(cfg: TrainConfig, work: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.eval()
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    captions: list[str] = []
    for start in range(0, cfg.unet_images, 256):
        pixels, scenes = render_batch("train", range(start, min(start + 256, cfg.unet_images)))
        dist = vae.encode(pixels * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions.extend(s.caption for s in scenes)
    mean, std = torch.cat(means), torch.cat(stds)
    generator = torch.Generator().manual_seed(cfg.seed + 8)
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    scaling = 1.0 / sample.std().item()
    log(
        f"latents: {len(captions)} images, latent std {sample.std().item():.4f}, "
        f"scaling factor {scaling:.5f}"
    )
    target = work / "latents"
    target.mkdir(parents=True, exist_ok=True)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, target / "latents.safetensors")
    write_json(target / "latents.json", {"captions": captions, "scaling_factor": scaling})


# ----------------------------------------------------------------------------------------------
# 6. UNet + text encoder


def unet_model(cfg: TrainConfig) -> Any:
    from diffusers import UNet2DConditionModel

    from forgedit.zoo.tiny import sd1_unet_config

    config = {
        **sd1_unet_config(),
        "block_out_channels": cfg.unet_widths,
        "norm_num_groups": 8,
        "attention_head_dim": cfg.unet_heads,  # SD 1.x's legacy name for the head count
        "cross_attention_dim": cfg.text_width,
        "sample_size": cfg.image_size // 8,
    }
    return UNet2DConditionModel(**config)


def prompt_variants(caption: str) -> list[str]:
    """The prompt forms trained for one caption: as is, without "a photo of " (what BLIP
    says), each with and without a trailing period; index 0 is the caption itself."""
    bare = caption.removeprefix(world.CAPTION_PREFIX)
    return [caption, caption + ".", bare, bare + "."]


class UnetTraining:
    """The UNet stage's state: models, EMA copies, optimizer, generator; checkpointable."""

    def __init__(self, cfg: TrainConfig, work: Path) -> None:
        from transformers import CLIPTextModel

        from forgedit.sampling import make_ddim_scheduler

        self.cfg, self.work = cfg, work
        tokenizer = load_tokenizer(work)
        torch.manual_seed(cfg.seed + 9)
        self.unet = unet_model(cfg)
        torch.manual_seed(cfg.seed + 10)
        self.text_encoder = CLIPTextModel(text_config(cfg, tokenizer))
        self.ema = {
            "unet": {k: v.detach().clone() for k, v in self.unet.state_dict().items()},
            "text_encoder": {
                k: v.detach().clone() for k, v in self.text_encoder.state_dict().items()
            },
        }
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
        self.generator = torch.Generator().manual_seed(cfg.seed + 11)
        self.step = 0
        self.seconds_before = 0.0  # training time of earlier runs (resumed checkpoints)

        from safetensors.torch import load_file

        latents = load_file(work / "latents" / "latents.safetensors")
        meta = json.loads((work / "latents" / "latents.json").read_text())
        self.mean, self.std = latents["mean"], latents["std"]
        self.scaling = float(meta["scaling_factor"])
        captions = world.all_captions()
        index = {c: i for i, c in enumerate(captions)}
        self.caption_index = torch.tensor([index[c] for c in meta["captions"]])
        variants = [v for c in captions for v in prompt_variants(c)]
        self.variant_ids = token_ids(tokenizer, variants).view(len(captions), 4, 77)
        self.empty_ids = token_ids(tokenizer, [""])
        alphas = make_ddim_scheduler().alphas_cumprod
        self.alphas_cumprod = alphas.float()

    # -- checkpoints (safetensors + JSON, never pickle) --

    def save(self, directory: Path, seconds: float) -> None:
        from safetensors.torch import save_file

        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
        for part, state in self.ema.items():
            tensors |= {f"ema.{part}.{k}": v for k, v in state.items()}
        opt = self.optimizer.state_dict()
        for i, slot in opt["state"].items():
            tensors |= {f"opt.{i}.{k}": v for k, v in slot.items()}
        tensors["generator"] = self.generator.get_state()
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        write_json(
            tmp / "state.json",
            {"step": self.step, "seconds": seconds, "param_groups": opt["param_groups"]},
        )
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(directory / "state.safetensors")
        meta = json.loads((directory / "state.json").read_text())

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.unet.load_state_dict(part("unet."))
        self.text_encoder.load_state_dict(part("text_encoder."))
        self.ema = {name: part(f"ema.{name}.") for name in ("unet", "text_encoder")}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in part("opt.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.generator.set_state(tensors["generator"])
        self.step = int(meta["step"])
        self.seconds_before = float(meta["seconds"])

    # -- one update --

    def update(self) -> float:
        cfg, g = self.cfg, self.generator
        b = cfg.unet_batch
        set_lr(self.optimizer, cosine_lr(self.step, cfg.unet_steps, cfg.unet_lr, cfg.unet_warmup))
        pick = torch.randint(0, self.mean.shape[0], (b,), generator=g)
        z0 = self.mean[pick] + self.std[pick] * torch.randn(self.mean[pick].shape, generator=g)
        z0 = z0 * self.scaling
        # The prompt: 10 % dropped to "" (guidance), else one of the caption's forms.
        form = torch.zeros(b, dtype=torch.long)
        form += (torch.rand(b, generator=g) < cfg.trailing_period).long()
        form += 2 * (torch.rand(b, generator=g) < cfg.prefix_drop).long()
        ids = self.variant_ids[self.caption_index[pick], form]
        dropped = torch.rand(b, generator=g) < cfg.caption_dropout
        ids = torch.where(dropped[:, None], self.empty_ids, ids)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        a = self.alphas_cumprod[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        context = self.text_encoder(ids)[0]
        pred = self.unet(zt, t, context).sample
        snr = a.flatten() / (1 - a.flatten())
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-γ, ε-prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
                for key, value in module.state_dict().items():
                    self.ema[name][key].mul_(decay).add_(value, alpha=1 - decay)
        return loss.item()


def stage_unet(cfg: TrainConfig, work: Path) -> float:
    """Train (or resume) the UNet stage; returns its seconds over all runs."""
    run = UnetTraining(cfg, work)
    checkpoint = work / "unet-checkpoint"
    if (checkpoint / "state.json").is_file():
        run.load(checkpoint)
        log(f"unet: resumed at step {run.step}")
    losses: list[float] = []
    started = time.perf_counter()
    while run.step < cfg.unet_steps:
        losses.append(run.update())
        if run.step % 100 == 0 or run.step == cfg.unet_steps:
            rate = (time.perf_counter() - started) / len(losses)
            log(f"unet step {run.step} loss {np.mean(losses[-100:]):.4f} ({rate:.3f} s/step)")
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.unet_steps:
            run.save(checkpoint, run.seconds_before + time.perf_counter() - started)
    # The trained models are the EMA weights.
    run.unet.load_state_dict(run.ema["unet"])
    run.text_encoder.load_state_dict(run.ema["text_encoder"])
    save_module(run.unet, work / "unet")
    save_module(run.text_encoder, work / "text_encoder")
    return run.seconds_before + time.perf_counter() - started


# ----------------------------------------------------------------------------------------------
# 7. Export


def stage_export(cfg: TrainConfig, work: Path, out: Path, times: dict[str, float]) -> None:
    """Write the fp16 model directories and the manifest beside ``out``, then rename."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import BlipForConditionalGeneration, CLIPModel, CLIPTextModel

    from forgedit.zoo.shapes import BLIP_SUBDIR, CLIP_SUBDIR, MANIFEST, SD_SUBDIR, manifest_files

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sd = tmp / SD_SUBDIR
    meta = json.loads((work / "latents" / "latents.json").read_text())

    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(scaling_factor=round(float(meta["scaling_factor"]), 5))
    unet = UNet2DConditionModel.from_pretrained(work / "unet")
    text_encoder = CLIPTextModel.from_pretrained(work / "text_encoder")
    parts: tuple[tuple[str, Any], ...] = (
        ("unet", unet),
        ("vae", vae),
        ("text_encoder", text_encoder),
    )
    for name, module in parts:
        module.to(torch.float16).save_pretrained(
            sd / name, safe_serialization=True, variant="fp16", max_shard_size="4MB"
        )
    scheduler: Any = PNDMScheduler(**PNDM_SD14)
    scheduler.save_pretrained(sd / "scheduler")
    shutil.copytree(work / "tokenizer", sd / "tokenizer")
    write_json(sd / "model_index.json", model_index())

    blip: Any = BlipForConditionalGeneration.from_pretrained(work / "blip")
    blip.to(torch.float16).save_pretrained(
        tmp / BLIP_SUBDIR, safe_serialization=True, variant="fp16", max_shard_size="4MB"
    )
    write_blip_processor(tmp / BLIP_SUBDIR, cfg)

    clip: Any = CLIPModel.from_pretrained(work / "clip")
    clip.to(torch.float16).save_pretrained(
        tmp / CLIP_SUBDIR, safe_serialization=True, variant="fp16", max_shard_size="4MB"
    )
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(work / "tokenizer" / name, tmp / CLIP_SUBDIR / name)
    write_clip_processor(tmp / CLIP_SUBDIR, cfg)
    for generated in tmp.rglob("generation_config.json"):
        generated.unlink()  # captioning passes its generation arguments explicitly

    commits = stage_commits(work)
    files = manifest_files(tmp)
    manifest = {
        "format": "forgedit.zoo.shapes",
        "version": 1,
        "description": "the toy world (forgedit.zoo.shapes.world) trained from scratch by "
        "forgedit.zoo.shapes.train",
        # The commit each stage ran at; dirty if the training code differed from it then.
        "training_code_commit": commits,
        "training_config": cfg.to_dict(),
        "run_times_s": {k: round(v, 1) for k, v in times.items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "files": files,
    }
    write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    total = sum((out / f).stat().st_size for f in files)
    log(f"export: {len(files)} files, {total / 1e6:.2f} MB, in {out}")


def model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _version("diffusers"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_blip_processor(directory: Path, cfg: TrainConfig) -> None:
    """blip-image-captioning-base's processor files, at the toy world's 64 px."""
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in blip_vocabulary()), "utf-8")
    special = {
        "bos_token": "[DEC]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
        "additional_special_tokens": ["[ENC]"],
    }
    write_json(directory / "special_tokens_map.json", special)
    write_json(
        directory / "tokenizer_config.json",
        {
            **special,
            "do_basic_tokenize": True,
            "do_lower_case": True,
            "model_max_length": 512,
            "processor_class": "BlipProcessor",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": "BertTokenizer",
        },
    )
    write_json(
        directory / "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(CLIP_STD),
            "processor_class": "BlipProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": cfg.image_size, "width": cfg.image_size},
        },
    )


def write_clip_processor(directory: Path, cfg: TrainConfig) -> None:
    """openai/clip-vit-large-patch14's image-processor settings, at 64 px."""
    write_json(
        directory / "preprocessor_config.json",
        {
            "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(CLIP_STD),
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": cfg.image_size},
        },
    )


# ----------------------------------------------------------------------------------------------
# Files


def save_module(module: Any, directory: Path) -> None:
    """fp32 working copy of a stage's model (``save_pretrained``, safetensors)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)


def write_json(path: Path, data: Any) -> None:
    from forgedit.durable import write_json_atomic

    write_json_atomic(path, data)


# The code whose changes change the trained files.
TRAINING_CODE = (
    "forgedit/zoo/shapes/train.py",
    "forgedit/zoo/shapes/world.py",
    "forgedit/tiny.py",
    "forgedit/sampling.py",
)


def training_code_commit() -> tuple[str, bool]:
    """The commit of this checkout and whether the training code differs from it."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", *TRAINING_CODE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())


def _version(distribution: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(distribution)


# ----------------------------------------------------------------------------------------------
# Driver


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forgedit.zoo.shapes.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--work", type=Path, default=Path(".forgedit-data/shapes-train"))
    parser.add_argument(
        "--out", type=Path, default=None, help="default: the shipped model's directory"
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage")
    parser.add_argument("--force", action="store_true", help="redo stages already done")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.use_deterministic_algorithms(True)

    from forgedit.zoo.shapes import default_model_dir

    cfg = TrainConfig().smoke() if args.smoke else TrainConfig()
    work: Path = args.work
    out: Path = args.out or default_model_dir()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; accepted: {', '.join(STAGES)}")
    work.mkdir(parents=True, exist_ok=True)
    recorded = work / "config.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != cfg.to_dict():
        parser.error(f"{work} holds stages of another config; use a new --work directory")
    write_json(recorded, cfg.to_dict())

    # A runner may return its own duration (the UNet's, summed over resumed runs).
    runners: dict[str, Callable[[], float | None]] = {
        "tokenizer": lambda: stage_tokenizer(cfg, work),
        "clip": lambda: stage_clip(cfg, work),
        "blip": lambda: stage_blip(cfg, work),
        "vae": lambda: stage_vae(cfg, work),
        "latents": lambda: stage_latents(cfg, work),
        "unet": lambda: stage_unet(cfg, work),
        "export": lambda: stage_export(cfg, work, out, stage_times(work)),
    }
    for stage in stages:
        done = work / f"{stage}.done.json"
        if done.is_file() and stage != "export" and not args.force:
            log(f"{stage}: done before ({json.loads(done.read_text())['seconds']:.0f} s), skipped")
            continue
        log(f"{stage}: start")
        commit, dirty = training_code_commit()  # what this stage runs, recorded with it
        started = time.perf_counter()
        seconds = runners[stage]() or time.perf_counter() - started
        if stage != "export":
            write_json(done, {"seconds": seconds, "commit": commit, "dirty": dirty})
        log(f"{stage}: done in {seconds:.0f} s")
    return 0


def stage_commits(work: Path) -> dict[str, dict[str, Any]]:
    """{stage: {"commit", "dirty"}} as recorded when each finished stage started."""
    out = {}
    for stage in STAGES:
        path = work / f"{stage}.done.json"
        if path.is_file():
            record = json.loads(path.read_text())
            out[stage] = {"commit": record.get("commit"), "dirty": record.get("dirty")}
    return out


def stage_times(work: Path) -> dict[str, float]:
    """Seconds each finished stage took (the UNet's summed over resumed runs)."""
    return {
        stage: float(json.loads((work / f"{stage}.done.json").read_text())["seconds"])
        for stage in STAGES
        if (work / f"{stage}.done.json").is_file()
    }


if __name__ == "__main__":
    sys.exit(main())
