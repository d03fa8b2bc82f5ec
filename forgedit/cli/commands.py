"""The commands besides ``edit``: ``strategies``, ``build-engine``, ``make-tiny-model`` and
``make-random-model``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

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
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from forgedit.engine import Engine


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
    """``build-engine``: export the UNet (weights as external data), build or load the compiled
    graph of ``--backend`` for one resolution and batch profile, run its canary on the base
    weights, bind a random edit model (a seeded Δ over the tensors a fine-tune trains) and run
    the canary again. Refuses at once (exit 2) where TensorRT or CUDA is missing, before
    loading anything. Prints what it did, or ``--json`` figures (sizes, seconds, peak RSS,
    canary errors)."""
    import resource
    import time

    from forgedit.backends.base import BackendUnavailableError
    from forgedit.backends.tensorrt_backend import import_tensorrt

    backend = args.backend
    if backend == "tensorrt":
        try:
            import_tensorrt()
        except BackendUnavailableError as e:
            raise ForgeditError(
                f"build-engine --backend tensorrt needs TensorRT and a CUDA device; {e}. "
                "ONNX Runtime needs no GPU: build-engine --backend onnxruntime"
            ) from e
    device = parse_device(args.device or ("cuda" if backend == "tensorrt" else "cpu"))
    if backend == "tensorrt" and not device.startswith("cuda"):
        raise InvalidInputError(
            f"build-engine --backend tensorrt needs a CUDA device, got {args.device!r}",
            field="device",
        )
    max_batch = parse_max_batch(args.max_batch)
    base_dir = existing_dir(args.base_model, "--base-model")
    assert base_dir is not None
    size = parse_size(args.size) if args.size else None
    from forgedit.engine import Engine

    started = time.perf_counter()
    engine = Engine.load(
        base_dir,
        device=device,
        unet_backend=backend,
        cache_dir=Path(args.engine_cache) if args.engine_cache else default_engine_cache(),
        max_batch=max_batch,
        on_backend_fallback=warn_fallback,
    )
    base = engine.base
    width, height = size or (base.native_width, base.native_height)
    shape = engine.sampling_shape(height, width, max_batch)
    loaded = time.perf_counter()
    (ready,) = engine.prepare_resolutions([(height, width)], max_batch)
    prepared = time.perf_counter()
    if engine.sampling_backend != backend or not ready.ready:
        raise ForgeditError(
            f"the {backend} UNet could not be built or failed its canary; see the warning above"
        )
    delta = random_edit_delta(engine)
    with engine.weights.edit_model(delta) as live:
        live.set_forgetting([], 1.0)
        canary = engine.canary(height, width, max_batch)
    checked = time.perf_counter()
    if not canary.passed:
        raise ForgeditError(
            f"the {backend} UNet failed its canary with an edit model bound: relative error "
            f"{canary.relative_error:.2e} > {canary.tolerance:.0e}"
        )
    # The compiled backend itself (a canary wrapper keeps it as ``inner``): any of its kinds.
    inner: Any = getattr(engine.backends.current, "inner", engine.backends.current)
    export = inner.last_export
    summary = {
        "backend": backend,
        "base_model": base.name,
        "device": device,
        "size": f"{width}x{height}",
        "shape": shape.describe(),
        "unet_parameters": sum(p.numel() for p in base.unet.parameters()),
        "export_seconds": round(inner.export_seconds, 2),
        "build_seconds": round(inner.session_seconds, 2),
        "graph_bytes": export.graph_bytes,
        "weights_bytes": export.weights_bytes,
        "compiled_resident_bytes": engine.compiled_bytes,
        "load_seconds": round(loaded - started, 2),
        "prepare_seconds": round(prepared - loaded, 2),
        "edit_model_seconds": round(checked - prepared, 2),
        "total_seconds": round(checked - started, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "canary": {
            "tolerance": canary.tolerance,
            "base_relative_error": ready.canary_error,
            "edit_model_relative_error": canary.relative_error,
            "edit_model_max_abs_error": canary.max_abs_error,
            "edit_model_tensors": sum(1 for k in delta if k.startswith("unet.")),
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2), file=stdout)
        return
    print(
        f"{backend} UNet ready for {base.name} at {width}x{height} ({shape.describe()}): "
        f"canary {canary.relative_error:.1e} from torch with an edit model bound",
        file=stdout,
    )


def random_edit_delta(
    engine: Engine, seed: int = 0, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    """A stand-in edit model: a seeded Δ over exactly the UNet tensors a vanilla (joint)
    fine-tune trains, each ``scale`` × its tensor's RMS, stored fp16 (a delta format of the
    product) to halve its memory at real size."""
    import torch

    from forgedit.forgetting import trained_parameter_names

    generator = torch.Generator("cpu").manual_seed(seed)
    unet = engine.base.unet
    delta: dict[str, torch.Tensor] = {}
    for name in trained_parameter_names(engine.weights.names("unet"), "forgedit"):
        p = unet.get_parameter(name).detach()
        rms = float(p.float().pow(2).mean().sqrt()) or 1.0
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        delta[f"unet.{name}"] = (noise * (scale * rms)).to(torch.float16)
    return delta


def run_make_random_model(args: argparse.Namespace, stdout: TextIO) -> None:
    from forgedit.zoo.tiny import PRESETS, make_random_model

    path = Path(args.directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidInputError(
            f"{args.directory!r} already exists and is not an empty directory; choose a new one",
            field="directory",
        )
    make_random_model(path, args.preset)
    print(
        f"wrote a random {args.preset} model to {args.directory} ({PRESETS[args.preset].purpose})",
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
