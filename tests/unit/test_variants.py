"""The two other Forgedit variants, checked against what the original does rather than only
that they run: DreamBooth-Forgedit against an independently computed reference, and the
two stages of Forgedit-transferred-to-Imagic against the letter's split of what trains."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from forgedit.backends.base import Shape
from forgedit.backends.torch_backend import TorchBackend
from forgedit.config import SweepConfig, TrainingConfig, default_sweep
from forgedit.engine import Engine
from forgedit.images import to_pil
from forgedit.models import load_base_model
from forgedit.sampling import decode, denoise, initial_latents
from forgedit.text import encode_prompt
from forgedit.weights import ResidentWeights

SIZE = 64
SOURCE = "A photo of a dog"
TARGET = "A photo of a sitting dog."


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir / "stable-diffusion")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A deterministic, structured picture (no file needed)."""
    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _dreambooth(updates: int, lr: float) -> TrainingConfig:
    """DreamBooth-Forgedit's schedule, shortened, with a learning rate large enough that the
    tiny text encoder visibly moves (at 5e-6 and a few updates it would barely change, and a
    base-encoder bug would hide inside the tolerance)."""
    (stage,) = TrainingConfig.for_mode("dreambooth").stages
    stage = dataclasses.replace(stage, updates=updates, batch_size=2, unet_lr=lr, text_lr=lr)
    return TrainingConfig.for_mode("dreambooth", stages=(stage,), height=SIZE, width=SIZE, seed=3)


def _reference_dreambooth_images(
    tiny_model_dir: Path, delta: dict[str, torch.Tensor], sweep: SweepConfig
) -> list[np.ndarray]:
    """What the original's DreamBooth pipeline computes, written out independently of the
    engine's weight swapping and caching: a separate copy of the base model with θ_pre + Δ
    written into BOTH the UNet and the text encoder, then E_ft(source), E_ft(target) and
    E_ft("") all from that fine-tuned encoder, vs, and the same DDIM loop."""
    base = load_base_model(tiny_model_dir / "stable-diffusion")
    modules = {"unet": base.unet, "text_encoder": base.text_encoder}
    with torch.no_grad():
        for key, d in delta.items():
            component, name = key.split(".", 1)
            param = dict(modules[component].named_parameters())[name]
            param.copy_(param + d.to(param.dtype))
        source = encode_prompt(base.tokenizer, base.text_encoder, SOURCE).float()
        target = encode_prompt(base.tokenizer, base.text_encoder, TARGET).float()
        empty = encode_prompt(base.tokenizer, base.text_encoder, "").float()
    # The eager UNet, through the same noise-predictor interface denoise() calls.
    backend = TorchBackend(base.unet, ResidentWeights(modules))
    unet = backend.predictor(Shape(SIZE // 8, SIZE // 8, 2))
    images = []
    for spec in sweep.images():
        conditioning = spec.gamma * target + (1 - spec.gamma) * source
        latents = initial_latents(
            [spec.seed], base.unet.config["in_channels"], SIZE, SIZE, base.vae_scale_factor
        )
        z = denoise(unet, latents, conditioning, empty, steps=spec.steps, guidance=spec.guidance)
        (image,) = to_pil(decode(base.vae, z, base.scaling_factor))
        images.append(np.asarray(image, dtype=np.int16))
    return images


def test_dreambooth_edits_match_an_independent_reference(
    engine: Engine, photo: Image.Image, tiny_model_dir: Path
) -> None:
    edit_model = engine.finetune(photo, SOURCE, _dreambooth(updates=3, lr=1e-3))
    assert any(k.startswith("text_encoder.") for k in edit_model.delta)
    sweep = SweepConfig(prompts=(TARGET,), gammas=(0.8, 1.2), seeds=(5,), steps=8)
    edited = [np.asarray(e.image, dtype=np.int16) for e in engine.sample(edit_model, sweep)]
    reference = _reference_dreambooth_images(tiny_model_dir, edit_model.delta, sweep)
    worst = max(int(np.abs(a - b).max()) for a, b in zip(edited, reference, strict=True))
    assert worst <= 2, f"DreamBooth edits differ from the reference by up to {worst}/255"


def test_dreambooth_stored_source_embedding_is_the_fine_tuned_encoders(
    engine: Engine, photo: Image.Image, tiny_model_dir: Path
) -> None:
    """E_ft(source) stored at the end of training equals re-encoding the source prompt with
    the fine-tuned encoder, which is what the original does at edit time."""
    edit_model = engine.finetune(photo, SOURCE, _dreambooth(updates=2, lr=1e-3))
    base = load_base_model(tiny_model_dir / "stable-diffusion")
    with torch.no_grad():
        for key, d in edit_model.delta.items():
            if key.startswith("text_encoder."):
                name = key.removeprefix("text_encoder.")
                param = dict(base.text_encoder.named_parameters())[name]
                param.copy_(param + d)
        again = encode_prompt(base.tokenizer, base.text_encoder, SOURCE).float()
    assert torch.allclose(again, edit_model.source_embedding, atol=1e-5)


def test_dreambooth_default_sweep_is_the_drivers() -> None:
    """DD sweeps i in [8, 17): γ/β 0.8-1.6, vp textalpha in {0.8, 0.9}, no forgetting."""
    defaults = default_sweep("dreambooth")
    assert defaults.gammas == (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6)
    assert defaults.alphas == (0.8, 0.9)
    assert defaults.forget == ("donotforget",)
    sweep = SweepConfig.for_mode("dreambooth", prompts=(TARGET,), interpolation="vp")
    assert sweep.gammas == defaults.gammas and sweep.alphas == (0.8, 0.9)
    assert sweep.forget_degree == 0.0


def test_two_stage_default_forgetting_is_encoderattn() -> None:
    assert SweepConfig.for_mode("two_stage", prompts=(TARGET,)).forget == ("encoderattn",)
    assert SweepConfig.for_mode("joint", prompts=(TARGET,)).forget == ("donotforget",)
    # What the caller gives wins over the variant's default.
    given = SweepConfig.for_mode("two_stage", prompts=(TARGET,), forget=("noencoder",))
    assert given.forget == ("noencoder",)


def test_two_stage_schedule_is_the_letters() -> None:
    stages = TrainingConfig.for_mode("two_stage").stages
    assert [(s.updates, s.batch_size) for s in stages] == [(400, 1), (1000, 1)]
    assert stages[0].unet_lr is None and stages[0].text_lr == 1e-3
    assert stages[1].text_lr is None and stages[1].unet_lr == 6e-5


def test_two_stage_trains_the_embedding_then_only_the_unet(
    engine: Engine, photo: Image.Image
) -> None:
    """Stage 1 moves e only (the UNet stays bit-identical to the base); stage 2 moves only
    the Forgedit UNet subset (e stays exactly where stage 1 left it)."""
    base_unet = {k: v.detach().clone() for k, v in engine.base.unet.named_parameters()}
    with torch.no_grad():
        e0 = encode_prompt(engine.base.tokenizer, engine.base.text_encoder, SOURCE).float()

    def config(updates: tuple[int, ...]) -> TrainingConfig:
        stages = TrainingConfig.for_mode("two_stage").stages
        stages = tuple(
            dataclasses.replace(s, updates=u) for s, u in zip(stages, updates, strict=True)
        )
        return TrainingConfig.for_mode("two_stage", stages=stages, height=SIZE, width=SIZE, seed=4)

    seen_unet_after_stage1: list[bool] = []

    def on_progress(p) -> None:  # type: ignore[no-untyped-def]
        if p.stage == "embedding":
            same = all(torch.equal(base_unet[k], v) for k, v in engine.base.unet.named_parameters())
            seen_unet_after_stage1.append(same)

    stage1_only = engine.finetune(photo, SOURCE, config((3, 1)), on_progress=on_progress)
    assert seen_unet_after_stage1 == [True, True, True]
    both = engine.finetune(photo, SOURCE, config((3, 4)))
    # Stage 2 did not touch e: the embedding after 3+1 and 3+4 updates is stage 1's.
    assert torch.equal(both.source_embedding, stage1_only.source_embedding)
    assert not torch.equal(both.source_embedding, e0)
    # ...and trained only the Forgedit UNet subset, which did move.
    assert all(k.startswith(("unet.down_blocks.", "unet.up_blocks.")) for k in both.delta)
    assert not any(k.startswith("text_encoder.") for k in both.delta)
    assert any(bool(d.abs().max() > 0) for d in both.delta.values())
