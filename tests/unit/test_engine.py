"""The engine end to end on the tiny SD-1.x-shaped model: determinism, batching, in-place
swaps, every training mode, cancellation, and learning that actually lowers the loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgedit.artifact import load_edit_model
from forgedit.config import Stage, SweepConfig, TrainingConfig
from forgedit.engine import Engine
from forgedit.errors import BaseModelMismatchError, CancelledError, UnknownStrategyError
from forgedit.events import CancelToken
from forgedit.images import load_image
from forgedit.sampling import make_ddim_scheduler
from forgedit.training import encode_image

SIZE = 64
PROMPT = "A photo of a sitting dog."


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir / "stable-diffusion", blip_dir=tiny_model_dir / "blip")


@pytest.fixture(scope="module")
def photo(photos_dir: Path):  # type: ignore[no-untyped-def]
    return load_image(photos_dir / "cat.jpg").image


def quick(mode: str = "joint", updates: int = 4, batch: int = 2, **kw: object) -> TrainingConfig:
    stages = tuple(
        dataclasses.replace(s, updates=updates, batch_size=batch)
        for s in TrainingConfig.for_mode(mode).stages
    )
    return TrainingConfig.for_mode(mode, stages=stages, height=SIZE, width=SIZE, seed=1, **kw)


def sweep(**kw: object) -> SweepConfig:
    return SweepConfig(
        **{"prompts": (PROMPT,), "steps": 6, "seeds": (1, 2), "gammas": (0.5, 1.0), **kw}
    )  # type: ignore[arg-type]


def unet_state(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.base.unet.state_dict().items()}


def pixels(images: list) -> list[np.ndarray]:  # type: ignore[type-arg]
    return [np.asarray(e.image, dtype=np.int16) for e in images]


@pytest.fixture(scope="module")
def edit_model(engine: Engine, photo):  # type: ignore[no-untyped-def]
    return engine.finetune(photo, "A photo of a dog", quick())


def test_ddim_timesteps_are_the_originals() -> None:
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))


def test_source_prompt_rule(engine: Engine, photo) -> None:  # type: ignore[no-untyped-def]
    source = engine.source_prompt(photo, PROMPT)
    assert source.startswith("A photo of ")
    assert not engine.source_prompt(photo, "A goat hits a cat.").startswith("A photo of ")


def test_same_seeds_give_identical_models_and_images(engine: Engine, photo, edit_model) -> None:  # type: ignore[no-untyped-def]
    again = engine.finetune(photo, "A photo of a dog", quick())
    assert again.loss_curve == edit_model.loss_curve
    assert all(torch.equal(again.delta[k], v) for k, v in edit_model.delta.items())
    first = engine.sample(edit_model, sweep())
    second = engine.sample(again, sweep())
    assert [e.png_bytes() for e in first] == [e.png_bytes() for e in second]


def test_training_touches_exactly_the_trained_subset(engine: Engine, edit_model) -> None:  # type: ignore[no-untyped-def]
    assert len(edit_model.delta) == 518
    assert all(k.startswith(("unet.down_blocks.", "unet.up_blocks.")) for k in edit_model.delta)
    assert not any(
        k.startswith(("unet.down_blocks.0.", "unet.up_blocks.0.")) for k in edit_model.delta
    )
    assert all(v.dtype == torch.float32 for v in edit_model.delta.values())


def test_base_is_restored_bit_exactly(engine: Engine, photo, edit_model) -> None:  # type: ignore[no-untyped-def]
    before = unet_state(engine)
    encoder_before = {k: v.clone() for k, v in engine.base.text_encoder.state_dict().items()}
    engine.sample(edit_model, sweep(forget=("encoderkv", "decoderattn"), forget_degree=0.3))
    engine.finetune(photo, "A photo of a dog", quick("dreambooth", updates=1))
    after = unet_state(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        torch.equal(v, engine.base.text_encoder.state_dict()[k]) for k, v in encoder_before.items()
    )


def test_batched_equals_unbatched(engine: Engine, edit_model) -> None:  # type: ignore[no-untyped-def]
    batched = pixels(engine.sample(edit_model, sweep(), max_batch=8))
    single = pixels(engine.sample(edit_model, sweep(), max_batch=1))
    # fp32 batched matmuls round differently by ~1e-6: at most one 8-bit level apart.
    assert max(int(np.abs(a - b).max()) for a, b in zip(batched, single, strict=True)) <= 1


def test_loaded_edit_model_gives_the_same_images(
    engine: Engine,
    edit_model,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    edit_model.save(tmp_path / "em")
    loaded = load_edit_model(tmp_path / "em", expected_base_fingerprint=engine.base.fingerprint)
    assert [e.png_bytes() for e in engine.sample(loaded, sweep())] == [
        e.png_bytes() for e in engine.sample(edit_model, sweep())
    ]


def test_strategies_change_the_images(engine: Engine, edit_model) -> None:  # type: ignore[no-untyped-def]
    s = dict(seeds=(1,), gammas=(0.7,))
    keep = pixels(engine.sample(edit_model, sweep(forget=("donotforget",), **s)))[0]
    decoder = pixels(engine.sample(edit_model, sweep(forget=("decoderattn",), **s)))[0]
    assert np.abs(keep - decoder).max() > 0


def test_vp_sweep_and_images_in_order(engine: Engine, edit_model) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    result = engine.sample(
        edit_model,
        sweep(
            interpolation="vp", gammas=(1.0,), alphas=(0.8, 1.1), forget=("encoderkv", "noencoder")
        ),
        on_image=lambda e: seen.append(e.spec.index),
        max_batch=3,
    )
    assert seen == list(range(8)) == [e.spec.index for e in result]
    assert all(e.image.size == (SIZE, SIZE) for e in result)


def test_unknown_strategy_and_other_base_are_refused(engine: Engine, edit_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownStrategyError, match="nodecoder"):
        engine.sample(edit_model, sweep(forget=("nodecoder",)))  # DreamBooth-only strategy
    alien = dataclasses.replace(edit_model, base_model_fingerprint="0" * 64)
    with pytest.raises(BaseModelMismatchError, match="fine-tuned on base model"):
        engine.sample(alien, sweep())


def test_engine_says_what_a_server_needs_without_its_internals(
    engine: Engine, edit_model, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    assert engine.fingerprint == edit_model.base_model_fingerprint
    assert engine.base_model_name == edit_model.base_model_name
    assert (engine.native_height, engine.native_width) == (SIZE, SIZE)
    assert engine.can_caption
    assert not Engine(engine.base).can_caption  # no BLIP captioner loaded
    # One rule decides where an edit model can run, for an edit model or a record of one.
    assert engine.accepts(edit_model)
    assert not engine.accepts(dataclasses.replace(edit_model, base_model_fingerprint="0" * 64))
    record = SimpleNamespace(base_model_name="tiny", base_model_fingerprint=engine.fingerprint)
    assert engine.accepts(record)


@pytest.mark.parametrize("mode", ["two_stage", "dreambooth"])
def test_every_training_mode_runs(engine: Engine, photo, mode: str) -> None:  # type: ignore[no-untyped-def]
    before = unet_state(engine)
    model = engine.finetune(photo, "A photo of a dog", quick(mode, updates=2))
    assert len(model.loss_curve) == model.training.total_updates
    if mode == "dreambooth":
        assert any(k.startswith("text_encoder.") for k in model.delta)
        assert len([k for k in model.delta if k.startswith("unet.")]) == 686
        images = engine.sample(model, sweep(forget=("nodecoder",), seeds=(1,)))
    else:
        assert len(model.delta) == 518
        images = engine.sample(model, sweep(forget=("encoderattn",), seeds=(1,)))
    assert len(images) == 2
    after = unet_state(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cancel_during_training_stops_within_one_update(engine: Engine, photo) -> None:  # type: ignore[no-untyped-def]
    token = CancelToken()
    updates: list[int] = []

    def progress(p) -> None:  # type: ignore[no-untyped-def]
        updates.append(p.update)
        if p.update == 3:
            token.cancel()

    before = unet_state(engine)
    with pytest.raises(CancelledError):
        engine.finetune(
            photo, "A photo of a dog", quick(updates=10), on_progress=progress, cancel=token
        )
    assert updates == [1, 2, 3]
    assert all(torch.equal(before[k], v) for k, v in unet_state(engine).items())


def test_cancel_during_sampling_stops_within_one_step(engine: Engine, edit_model) -> None:  # type: ignore[no-untyped-def]
    token = CancelToken()
    steps: list[int] = []

    def progress(p) -> None:  # type: ignore[no-untyped-def]
        steps.append(p.step)
        if p.step == 2:
            token.cancel()

    before = unet_state(engine)
    with pytest.raises(CancelledError):
        engine.sample(edit_model, sweep(steps=20), on_progress=progress, cancel=token)
    assert steps == [1, 2]
    assert all(torch.equal(before[k], v) for k, v in unet_state(engine).items())


def test_faithful_and_fast_differ_only_slightly(engine: Engine, photo, edit_model) -> None:  # type: ignore[no-untyped-def]
    fast = engine.finetune(photo, "A photo of a dog", quick(precision="fast"))
    assert fast.delta_format == "int8" and fast.delta_scales
    # Same draws, same data: the two runs differ only by Adam's eps and the Δ storage format.
    np.testing.assert_allclose(fast.loss_curve, edit_model.loss_curve, rtol=1e-3, atol=1e-4)
    a = pixels(engine.sample(edit_model, sweep(seeds=(1,))))
    b = pixels(engine.sample(fast, sweep(seeds=(1,))))
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) <= 8


@pytest.mark.slow
def test_forty_joint_updates_lower_the_loss(engine: Engine, photo) -> None:  # type: ignore[no-untyped-def]
    """The original's schedule (40 updates of batch 10) on a TEdBench photo lowers the
    denoising loss, measured on fixed draws before and after so batch noise cannot fake it."""
    config = TrainingConfig.for_mode("joint", height=SIZE, width=SIZE, seed=0)
    base = engine.base
    source = "A photo of a dog"

    from forgedit.images import preprocess
    from forgedit.text import encode_prompt

    z0 = encode_image(base.vae, preprocess(photo, SIZE, SIZE), 0, base.scaling_factor)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn((40, *z0.shape[1:]), generator=generator)
    t = torch.randint(1000, (40,), generator=generator)
    scheduler = make_ddim_scheduler()
    noisy = scheduler.add_noise(z0.repeat(40, 1, 1, 1), noise, t)

    def loss(embedding: torch.Tensor) -> float:
        with torch.no_grad():
            pred = base.unet(noisy, t, embedding.repeat(40, 1, 1)).sample
        return float(torch.nn.functional.mse_loss(pred, noise))

    with torch.no_grad():
        before = loss(encode_prompt(base.tokenizer, base.text_encoder, source))
    model = engine.finetune(photo, source, config)
    assert len(model.loss_curve) in range(36, 41)
    with engine.weights.edit_model(model.delta) as live:
        live.set_forgetting([], 0.0)
        after = loss(model.source_embedding)
    assert after < before * 0.9, (before, after)


def test_stage_override_validation() -> None:
    with pytest.raises(ValueError, match="updates"):
        Stage("joint", updates=0, batch_size=1, unet_lr=1e-5, text_lr=None)


def test_unavailable_device_is_refused_clearly() -> None:
    from forgedit.errors import InvalidInputError
    from forgedit.requests import check_device

    check_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="accepted here: cpu"):
            check_device("cuda")
    with pytest.raises(InvalidInputError, match="not available"):
        check_device("tpu")


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_compact_delta_formats_sample_within_one_level_of_fp32(
    engine: Engine, photo, edit_model, tmp_path: Path, fmt: str
) -> None:  # type: ignore[no-untyped-def]
    """The same fine-tune stored as fp16 or int8 samples images within 1/255 of the fp32 edit
    model's (vs and vp, with and without forgetting at a degree between 0 and 1), and a saved
    and reloaded copy samples exactly the job's own images."""
    compact = engine.finetune(photo, "A photo of a dog", quick(delta_format=fmt))
    assert compact.loss_curve == edit_model.loss_curve  # storage never changes training
    assert any(not torch.equal(compact.delta[k], v) for k, v in edit_model.delta.items())
    compact.save(tmp_path / fmt)
    reloaded = load_edit_model(tmp_path / fmt, expected_base_fingerprint=engine.base.fingerprint)
    for kw in (
        {"forget": ("donotforget", "encoderattn"), "forget_degree": 0.5},
        {"interpolation": "vp", "gammas": (1.2,), "forget": ("decoderkv",), "forget_degree": 0.3},
    ):
        exact = pixels(engine.sample(edit_model, sweep(**kw)))
        ours = engine.sample(compact, sweep(**kw))
        difference = max(int(np.abs(x - y).max()) for x, y in zip(exact, pixels(ours), strict=True))
        assert difference <= 1, (fmt, kw, difference)
        again = engine.sample(reloaded, sweep(**kw))
        assert [e.png_bytes() for e in again] == [e.png_bytes() for e in ours]
