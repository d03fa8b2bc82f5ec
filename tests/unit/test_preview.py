"""Previews in the engine (``forgedit.preview``): the training-free SDEdit preview and the x0
previews while sampling, on the tiny model. Neither may change a result; both are
deterministic; the SDEdit loop starts mid-schedule; the latent → RGB map is a least-squares
fit that recovers a decoder that is linear."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from forgedit.config import PreviewConfig, SweepConfig, TrainingConfig
from forgedit.engine import Engine
from forgedit.errors import CancelledError, InvalidInputError
from forgedit.events import CancelToken
from forgedit.images import load_image
from forgedit.preview import PREVIEW_START, PREVIEW_STEPS, LatentRGB, Preview
from forgedit.sampling import denoise, make_ddim_scheduler

PROMPT = "A photo of a cat wearing a hat."


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir / "stable-diffusion", blip_dir=tiny_model_dir / "blip")


@pytest.fixture(scope="module")
def photo(photos_dir: Path) -> Any:
    return load_image(photos_dir / "cat.jpg").image


@pytest.fixture(scope="module")
def edit_model(engine: Engine, photo: Any) -> Any:
    stages = tuple(
        dataclasses.replace(s, updates=2, batch_size=1)
        for s in TrainingConfig.for_mode("joint").stages
    )
    config = TrainingConfig.for_mode("joint", stages=stages, height=64, width=64, seed=1)
    return engine.finetune(photo, "A photo of a cat", config)


def unet_state(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.base.unet.state_dict().items()}


# -- the training-free preview ----------------------------------------------------------------


def test_training_free_preview_is_deterministic_from_the_seeds(engine: Engine, photo: Any) -> None:
    before = unet_state(engine)

    def look(**kw: Any) -> Preview:
        return engine.preview(photo, PROMPT, **{"height": 48, "width": 64, "seed": 3, **kw})

    first, again = look(), look()
    assert first.kind == "training_free" and first.image.size == (64, 48)  # width x height
    assert (first.step, first.steps, first.index) == (PREVIEW_STEPS, PREVIEW_STEPS, 0)
    assert first.image.tobytes() == again.image.tobytes()
    assert look(seed=4).image.tobytes() != first.image.tobytes()  # the sampling seed's noise
    assert look(vae_seed=1).image.tobytes() != first.image.tobytes()  # the fine-tune's encode
    other = engine.preview(photo, "A photo of a dog.", height=48, width=64, seed=3)
    assert other.image.tobytes() != first.image.tobytes()
    # The base model ran it and is untouched: the preview trains nothing.
    after = unet_state(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_cancelled_preview_stops_and_a_bad_prompt_is_refused(engine: Engine, photo: Any) -> None:
    token = CancelToken()
    token.cancel("stop")
    with pytest.raises(CancelledError):
        engine.preview(photo, PROMPT, height=64, width=64, seed=1, cancel=token)
    with pytest.raises(InvalidInputError):
        engine.preview(photo, "bad\x00prompt", height=64, width=64, seed=1)


class _CountingPredictor:
    """ε = 0 everywhere, remembering the timesteps it was asked about: DDIM then scales the
    latents by sqrt(ᾱ_prev / ᾱ_t) per step, which the test can compute independently."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.timesteps: list[int] = []

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, _: torch.Tensor) -> Any:
        self.timesteps.append(int(timestep))
        return torch.zeros_like(sample)


def test_sdedit_denoises_only_the_last_steps_of_its_schedule() -> None:
    unet = _CountingPredictor()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(1, 77, 8)
    out = denoise(
        unet, latents, text, text, steps=PREVIEW_STEPS, guidance=1.0, start_step=PREVIEW_START
    )
    assert unet.timesteps == [500, 400, 300, 200, 100, 0]  # strength 0.6 of 10 steps
    scheduler = make_ddim_scheduler()
    alphas = scheduler.alphas_cumprod
    expected = latents * torch.sqrt(scheduler.final_alpha_cumprod / alphas[500])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# -- x0 previews --------------------------------------------------------------------------------


def test_x0_previews_come_every_k_steps_per_image_and_change_nothing(
    engine: Engine, edit_model: Any
) -> None:
    sweep = SweepConfig(prompts=(PROMPT,), steps=6, seeds=(1, 2), gammas=(0.5, 1.0))
    plain = engine.sample(edit_model, sweep, max_batch=3)
    seen: list[Preview] = []
    watched = engine.sample(edit_model, sweep, max_batch=3, x0_every=2, on_preview=seen.append)
    # Watching the x0 estimate is a by-product of the step: the same bytes come out.
    assert [e.image.tobytes() for e in watched] == [e.image.tobytes() for e in plain]
    config = PreviewConfig(x0_every=2)
    assert len(seen) == config.x0_count(sweep) == 4 * 3
    assert {(p.index, p.step) for p in seen} == {(i, s) for i in range(4) for s in (2, 4, 6)}
    assert all(p.kind == "x0" and p.steps == 6 and p.image.size == (8, 8) for p in seen)
    # Chunks of 3 then 1: each image's previews arrive before the next chunk starts.
    assert [p.index for p in seen[:9]] == [0, 1, 2] * 3
    # Without a callback, x0_every asks for nothing.
    assert len(engine.sample(edit_model, sweep, x0_every=1)) == 4


def test_the_latent_rgb_map_is_fitted_once_and_deterministically(engine: Engine) -> None:
    first = engine.latent_rgb
    assert engine.latent_rgb is first
    base = engine.base
    again = LatentRGB.fit(
        base.vae, base.scaling_factor, base.unet.config["in_channels"], base.vae_scale_factor
    )
    assert torch.equal(again.weight, first.weight) and torch.equal(again.bias, first.bias)
    rgb = first(torch.zeros(2, 4, 5, 7))
    assert rgb.shape == (2, 3, 5, 7) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1


class _LinearDecoder(torch.nn.Module):
    """A "VAE" whose decode is linear: a 1×1 convolution, then nearest upsampling by 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            # Small enough that no decoded value is clamped to [0, 1].
            self.conv.weight.copy_(torch.tensor([[0.02, -0.01, 0.005, 0.0]] * 3).view(3, 4, 1, 1))
            self.conv.weight[1, :, 0, 0] = torch.tensor([0.0, 0.015, -0.005, 0.01])
            self.conv.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=torch.nn.functional.interpolate(self.conv(z), scale_factor=8))


def test_the_least_squares_fit_recovers_a_linear_decoder() -> None:
    vae = _LinearDecoder()
    scaling = 0.5
    fitted = LatentRGB.fit(vae, scaling, 4, 8)  # type: ignore[arg-type]
    # decode() computes clamp((W (z / s) + b) / 2 + 0.5): linear while nothing clamps.
    weight = vae.conv.weight[:, :, 0, 0].detach() / (2 * scaling)
    bias = vae.conv.bias.detach() / 2 + 0.5
    assert np.allclose(fitted.weight.numpy(), weight.numpy(), atol=1e-5)
    assert np.allclose(fitted.bias.numpy(), bias.numpy(), atol=1e-5)
