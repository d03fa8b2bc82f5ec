"""UNet backend benchmark: torch vs ONNX Runtime on the same edit model and seeds, in one run.
Prints JSON, asserts nothing (timings on shared machines are noisy).

For each preset of ``bench_engine.py`` (``tiny`` at 64 px, ``small`` at 128 px) it fine-tunes one
edit model, then for each backend reports:

* seconds per sampled image (one batched sweep, DDIM 50 steps, best of ``--repeats``, the
  backends interleaved),
* the largest pixel difference from torch's images (equal output: ≤ 2/255),
* the cost of loading an edit model into the backend (ResidentWeights' in-place write plus the
  backend's sync: nothing for torch, IOBinding for ONNX Runtime) and of switching the forgetting
  strategy (only the changed tensors),
* ONNX Runtime's one-time export and session creation.

    .venv/bin/python benchmarks/bench_backends.py [--presets tiny,small] [--out FILE]

One torch thread and one ONNX Runtime thread (as CI), unless ``--threads N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import PRESETS, _widen_unet  # one owner per preset
from photos import add_photo_arguments, chosen_photo

PROMPT = "A photo of a sitting dog."
REVERT = "noencoder"


def run_preset(
    preset: str, threads: int, repeats: int, updates: int, photo: Path
) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from forgedit.config import SweepConfig, TrainingConfig
    from forgedit.engine import Engine
    from forgedit.forgetting import resolve, variant_for_mode
    from forgedit.images import load_image
    from forgedit.zoo.tiny import make_tiny_model

    widths, size, n_images, steps = PRESETS[preset]
    work = Path(tempfile.mkdtemp(prefix="forgedit-bench-backends-"))
    make_tiny_model(work / "model")
    model_dir = work / "model" / "stable-diffusion"
    if widths is not None:
        _widen_unet(model_dir / "unet", widths, size)

    engines = {
        "torch": Engine.load(model_dir, unet_backend="torch", max_batch=n_images),
        "onnxruntime": Engine.load(
            model_dir, unet_backend="onnxruntime", cache_dir=work / "engines", max_batch=n_images
        ),
    }
    ort = engines["onnxruntime"]
    shape = ort.sampling_shape(size, size, n_images)
    t = time.perf_counter()
    ort.backends.current.prepare(shape)
    prepare_seconds = time.perf_counter() - t
    # The ONNX Runtime backend comes wrapped in its canary (``.inner``).
    export_seconds = getattr(getattr(ort.backends.current, "inner", None), "export_seconds", 0.0)

    config = TrainingConfig.for_mode("joint", height=size, width=size, seed=0)
    config = dataclasses.replace(
        config, stages=tuple(dataclasses.replace(s, updates=updates) for s in config.stages)
    )
    edit_model = engines["torch"].finetune(load_image(photo).image, PROMPT, config)
    seeds = tuple(range(n_images // 2))
    sweep = SweepConfig(
        prompts=(PROMPT,), gammas=(0.6, 1.0), seeds=seeds, steps=steps, forget=("encoderkv",)
    )

    results: dict[str, Any] = {}
    images: dict[str, list[Any]] = {}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():  # warm: first refit, allocator, caches
        engine.sample(edit_model, dataclasses.replace(sweep, steps=1), max_batch=n_images)
    # Interleaved, best of the repeats: other load on a shared machine hits both alike.
    for _ in range(repeats):
        for name, engine in engines.items():
            t = time.perf_counter()
            images[name] = engine.sample(edit_model, sweep, max_batch=n_images)
            times[name].append((time.perf_counter() - t) / sweep.num_images)
    for name, engine in engines.items():
        load_s, switch_s = _swap_costs(engine, edit_model, shape, resolve, variant_for_mode)
        results[name] = {
            "seconds_per_image": min(times[name]),
            "seconds_per_image_all": times[name],
            "load_edit_model_seconds": load_s,
            "switch_strategy_seconds": switch_s,
        }
    for name in engines:
        diffs = [
            int(np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max())
            for a, b in zip(images[name], images["torch"], strict=True)
        ]
        results[name]["max_pixel_difference_from_torch"] = max(diffs)
    return {
        "preset": preset,
        "resolution": size,
        "unet_parameters": sum(p.numel() for p in ort.base.unet.parameters()),
        "images": sweep.num_images,
        "ddim_steps": steps,
        "batch_rows": 2 * n_images,
        "backends": results,
        "speedup_onnxruntime_over_torch": results["torch"]["seconds_per_image"]
        / results["onnxruntime"]["seconds_per_image"],
        "onnx_export_seconds": export_seconds,
        "onnxruntime_prepare_seconds": prepare_seconds,
    }


def _swap_costs(
    engine: Any, edit_model: Any, shape: Any, resolve: Any, variant_for_mode: Any
) -> tuple[float, float]:
    """Median seconds to bring the backend to a freshly loaded edit model, and to switch the
    forgetting strategy (ResidentWeights' writes + the backend's sync), over 5 tries."""
    reverted = resolve(
        REVERT, variant_for_mode(edit_model.training.mode), engine.weights.names("unet")
    )
    loads, switches = [], []
    for _ in range(5):
        t = time.perf_counter()
        with engine.weights.edit_model(edit_model.delta) as live:
            live.set_forgetting([], 1.0)
            engine.backends.current.predictor(shape)
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            live.set_forgetting(reverted, 0.0)
            engine.backends.current.predictor(shape)
            switches.append(time.perf_counter() - t)
        engine.backends.current.predictor(shape)  # back to the base
    return statistics.median(loads), statistics.median(switches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--updates", type=int, default=20, help="training updates per stage")
    parser.add_argument("--out", help="also write the JSON here")
    add_photo_arguments(parser, tedbench_photo="dog2_standing.png")
    args = parser.parse_args()
    photo = chosen_photo(parser, args)
    import onnxruntime
    import torch

    report = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
        },
        "presets": [
            run_preset(p, args.threads, args.repeats, args.updates, photo)
            for p in args.presets.split(",")
        ],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
