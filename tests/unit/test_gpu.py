"""CUDA-only checks. Skipped without a GPU (conftest marks them); run them on an A100 node
with `scripts/test.sh -m gpu`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from forgedit import delta
from forgedit.config import SweepConfig, TrainingConfig
from forgedit.engine import Engine
from forgedit.images import load_image

pytestmark = pytest.mark.gpu


def _config(precision: str) -> TrainingConfig:
    stages = tuple(
        dataclasses.replace(s, updates=4, batch_size=2)
        for s in TrainingConfig.for_mode("joint").stages
    )
    return TrainingConfig.for_mode(
        "joint", stages=stages, height=64, width=64, seed=1, precision=precision
    )  # type: ignore[arg-type]


def _images(engine: Engine, model) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    sweep = SweepConfig(prompts=("A photo of a sitting dog.",), seeds=(1, 2), steps=10)
    return [np.asarray(e.image, dtype=np.int16) for e in engine.sample(model, sweep)]


def test_cuda_faithful_matches_cpu(tiny_model_dir: Path, photos_dir: Path) -> None:
    photo = load_image(photos_dir / "cat.jpg").image
    sd = tiny_model_dir / "stable-diffusion"
    cpu, gpu = Engine.load(sd), Engine.load(sd, device="cuda")
    a = _images(cpu, cpu.finetune(photo, "A photo of a dog", _config("faithful")))
    b = _images(gpu, gpu.finetune(photo, "A photo of a dog", _config("faithful")))
    # Same CPU draws; only kernels differ (cuDNN vs oneDNN), so a few 8-bit levels at most.
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) <= 4


def test_cuda_fast_mode_runs_and_stays_close(tiny_model_dir: Path, photos_dir: Path) -> None:
    photo = load_image(photos_dir / "cat.jpg").image
    engine = Engine.load(tiny_model_dir / "stable-diffusion", device="cuda", precision="fast")
    model = engine.finetune(photo, "A photo of a dog", _config("fast"))
    assert model.delta_format == "int8"  # fast mode's default, dequantised to fp32 on load
    assert all(v.dtype == torch.float32 for v in model.delta.values())
    images = _images(engine, model)
    assert all(img.shape == (64, 64, 3) for img in images)
    assert torch.cuda.max_memory_allocated() > 0
    # One fine-tune stored exactly and as int8: within one 8-bit level under fp16 autocast.
    exact = engine.finetune(
        photo, "A photo of a dog", dataclasses.replace(_config("fast"), delta_format="fp32")
    )
    int8 = delta.decode(delta.encode(exact.delta, "int8"), "int8")
    compact = dataclasses.replace(
        exact,
        training=dataclasses.replace(exact.training, delta_format="int8"),
        delta=int8.tensors,
        delta_scales=int8.scales,
    )
    a, b = _images(engine, exact), _images(engine, compact)
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) <= 1


def test_the_requested_precision_is_the_sampling_precision(
    tiny_model_dir: Path, photos_dir: Path
) -> None:
    """A server's engine has one default precision; a request's precision overrides it for
    sampling too (fp16 autocast on CUDA in fast mode, none in faithful)."""
    photo = load_image(photos_dir / "cat.jpg").image
    engine = Engine.load(tiny_model_dir / "stable-diffusion", device="cuda")  # faithful
    model = engine.finetune(photo, "A photo of a dog", _config("faithful"))
    sweep = SweepConfig(prompts=("A photo of a sitting dog.",), seeds=(1, 2), steps=10)

    def images(**kw: object) -> list[bytes]:
        return [e.png_bytes() for e in engine.sample(model, sweep, **kw)]  # type: ignore[arg-type]

    default = images()
    assert images(precision="faithful") == default
    assert images(precision="fast") != default


def test_cuda_previews_match_cpu_and_x0_previews_change_nothing(
    tiny_model_dir: Path, photos_dir: Path
) -> None:
    """The training-free preview and x0 previews on CUDA: the same CPU draws, so the preview is
    within a few 8-bit levels of the CPU's; fast mode's fp16 autocast runs it too."""
    photo = load_image(photos_dir / "cat.jpg").image
    sd = tiny_model_dir / "stable-diffusion"
    cpu, gpu = Engine.load(sd), Engine.load(sd, device="cuda")
    kw = {"height": 64, "width": 64, "seed": 3}
    a = np.asarray(cpu.preview(photo, "A photo of a dog.", **kw).image, dtype=np.int16)  # type: ignore[arg-type]
    b = np.asarray(gpu.preview(photo, "A photo of a dog.", **kw).image, dtype=np.int16)  # type: ignore[arg-type]
    assert int(np.abs(a - b).max()) <= 4
    fast = gpu.preview(photo, "A photo of a dog.", precision="fast", **kw)  # type: ignore[arg-type]
    assert fast.image.size == (64, 64)
    model = gpu.finetune(photo, "A photo of a dog", _config("faithful"))
    sweep = SweepConfig(prompts=("A photo of a sitting dog.",), seeds=(1, 2), steps=10)
    seen: list = []  # type: ignore[type-arg]
    watched = gpu.sample(model, sweep, x0_every=5, on_preview=seen.append)
    plain = gpu.sample(model, sweep)
    # (Two CUDA runs need not be bit-identical: kernels may reorder sums.)
    for x, y in zip(watched, plain, strict=True):
        diff = np.abs(np.asarray(x.image, np.int16) - np.asarray(y.image, np.int16))
        assert int(diff.max()) <= 1
    assert len(seen) == sweep.num_images * 2 and seen[0].image.size == (8, 8)
