"""The commands besides ``edit``: ``strategies``, ``build-engine`` and ``make-tiny-model``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from forgedit.cli.arguments import (
    default_engine_cache,
    existing_dir,
    parse_device,
    parse_max_batch,
    parse_size,
)
from forgedit.cli.edit import warn_fallback
from forgedit.errors import ForgeditError, InvalidInputError

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


def run_strategies(args: argparse.Namespace, stdout: TextIO) -> None:
    from forgedit.forgetting import strategy_counts

    unet: UNet2DConditionModel | None = None
    if args.base_model is not None:
        from forgedit.models import load_base_model

        existing_dir(args.base_model, "--base-model")
        unet = load_base_model(args.base_model, device=parse_device(args.device)).unet
    counts = strategy_counts(unet)
    if args.json:
        print(json.dumps(counts, indent=2), file=stdout)
        return
    print(f"{'variant':<11} {'strategy':<22} {'tensors':>8} {'parameters':>14}", file=stdout)
    for variant, strategies in counts.items():
        for name, c in strategies.items():
            print(f"{variant:<11} {name:<22} {c['tensors']:>8} {c['parameters']:>14,}", file=stdout)


def run_build_engine(args: argparse.Namespace, stdout: TextIO) -> None:
    """``build-engine``: refuse at once (exit 2) where TensorRT or CUDA is missing, before
    loading anything; else build (or load), canary, and say where the plan is."""
    from forgedit.backends.base import BackendUnavailableError
    from forgedit.backends.tensorrt_backend import import_tensorrt

    try:
        import_tensorrt()
    except BackendUnavailableError as e:
        raise ForgeditError(
            f"build-engine needs TensorRT and a CUDA device; {e}. Other backends need no "
            "prebuilt engine (edit --unet-backend onnxruntime or torch)"
        ) from e
    device = parse_device(args.device)
    if not device.startswith("cuda"):
        raise InvalidInputError(
            f"build-engine needs a CUDA device, got {args.device!r}", field="device"
        )
    max_batch = parse_max_batch(args.max_batch)
    base_dir = existing_dir(args.base_model, "--base-model")
    assert base_dir is not None
    from forgedit.engine import Engine

    engine = Engine.load(
        base_dir,
        device=device,
        unet_backend="tensorrt",
        cache_dir=Path(args.engine_cache) if args.engine_cache else default_engine_cache(),
        max_batch=max_batch,
        on_backend_fallback=warn_fallback,
    )
    base = engine.base
    width, height = parse_size(args.size) if args.size else (base.native_width, base.native_height)
    shape = engine.sampling_shape(height, width, max_batch)
    engine.unet_predictor(height, width, max_batch)  # build or load, then the canary
    if engine.sampling_backend != "tensorrt":
        raise ForgeditError("the TensorRT engine failed its canary; see the warning above")
    print(
        f"TensorRT engine ready for {base.name} at {width}x{height} ({shape.describe()})",
        file=stdout,
    )


def run_make_tiny_model(args: argparse.Namespace, stdout: TextIO) -> None:
    from forgedit.zoo.tiny import make_tiny_model

    path = Path(args.directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidInputError(
            f"{args.directory!r} already exists and is not an empty directory; choose a new one",
            field="directory",
        )
    make_tiny_model(path)
    print(f"wrote the tiny model to {args.directory} (stable-diffusion/, blip/)", file=stdout)
