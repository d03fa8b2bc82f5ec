"""GPU benchmark at SD 1.x scale: an SD-1.x-config UNet, CLIP text encoder and VAE with random
weights (real shapes, so time and memory are real) at 512x512. Prints JSON, asserts nothing.

For each precision (faithful, fast) and sampling backend (torch eager, torch.compile, ONNX
Runtime's CUDA provider and TensorRT where they import), in a fresh subprocess so peak memory is
per configuration:

* one fine-tune of 40 joint updates of batch 10 (always eager torch: backends only sample),
  on ``make-random-model --preset sd1``'s model,
* 12 images at DDIM 50 in one batched sweep (max batch 12 = 24 UNet rows with guidance),
* the backend's one-time preparation (ONNX export + engine build or load + canary) and the
  first one-step edit (torch.compile's compilation, the first refit),
* peak GPU memory (torch's allocator; TensorRT's own workspace is not included).

One command on a CUDA machine (nothing is downloaded; the model is built from configs):

    .venv/bin/python benchmarks/bench_gpu.py --out results-gpu.json

``--tiny --device cpu`` runs the same script on the tiny model on a CPU, to check the script
itself, in a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from photos import add_photo_arguments, chosen_photo

REPO = Path(__file__).resolve().parent.parent
PROMPT = "A photo of a sitting dog."
BACKENDS = ("torch", "torch.compile", "onnxruntime", "tensorrt")


def write_sd1_model(root: Path, tiny: bool) -> Path:
    """A diffusers SD 1.x directory with random weights in SD 1.x's own shapes
    (``make-random-model --preset sd1``; ``tiny``: the tiny test model's)."""
    from forgedit.zoo.tiny import make_random_model

    return make_random_model(root / "model", "tiny" if tiny else "sd1")


def run_one(
    model_dir: str, precision: str, backend: str, device: str, size: int, photo: Path
) -> dict:
    import torch

    from forgedit.config import SweepConfig, TrainingConfig
    from forgedit.engine import Engine
    from forgedit.images import load_image

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fallbacks: list[Any] = []
    with tempfile.TemporaryDirectory() as cache:
        engine = Engine.load(
            model_dir,
            device=device,
            precision=precision,  # type: ignore[arg-type]
            unet_backend=backend if backend in ("onnxruntime", "tensorrt") else "torch",
            torch_compile=backend == "torch.compile",
            cache_dir=cache,
            max_batch=12,
            on_backend_fallback=fallbacks.append,
        )
        t = time.perf_counter()
        # export (+ FP16 conversion) / build or load, and the canary
        (readiness,) = engine.prepare_resolutions([(size, size)], 12)
        prepare_s = time.perf_counter() - t
        sweep = SweepConfig(
            prompts=(PROMPT,), gammas=(0.6, 1.0), seeds=tuple(range(6)), forget=("encoderkv",)
        )
        config = TrainingConfig.for_mode(
            "joint", height=size, width=size, seed=0, precision=precision
        )  # type: ignore[arg-type]
        per_stage = max(1, 40 // len(config.stages))
        config = dataclasses.replace(
            config,
            stages=tuple(
                dataclasses.replace(s, updates=per_stage, batch_size=10) for s in config.stages
            ),
        )
        image = load_image(photo).image
        edit_model = engine.finetune(image, PROMPT, config)
        # Warm-up: compile / first refit happen here, not in the timed sweep.
        t = time.perf_counter()
        engine.sample(edit_model, dataclasses.replace(sweep, steps=1, seeds=(0,)), max_batch=12)
        warmup_s = time.perf_counter() - t
        t = time.perf_counter()
        images = engine.sample(edit_model, dataclasses.replace(sweep, steps=50), max_batch=12)
        if cuda:
            torch.cuda.synchronize()
        sampling_s = time.perf_counter() - t
        t = time.perf_counter()
        engine.finetune(image, PROMPT, config)
        if cuda:
            torch.cuda.synchronize()
        training_s = time.perf_counter() - t
    return {
        "precision": precision,
        "backend": backend,
        # Which backend made the images (a job-scope fallback shows here, not in the
        # replica's backend), and what the compiled graphs hold.
        "sampled_with": sorted({e.backend for e in images}),
        "replica_backend": engine.sampling_backend,
        "canary_relative_error": readiness.canary_error,
        "compiled_resident_bytes": engine.compiled_bytes,
        "fallbacks": [dataclasses.asdict(f) for f in fallbacks],
        "training_updates": config.total_updates,
        "training_seconds": training_s,
        "sampling_seconds_12_images_ddim50": sampling_s,
        "seconds_per_image": sampling_s / 12,
        "prepare_seconds": prepare_s,
        "first_edit_warmup_seconds": warmup_s,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 64 px")
    parser.add_argument("--precisions", default="faithful,fast")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    add_photo_arguments(parser, tedbench_photo="dog2_standing.png")
    args = parser.parse_args()
    photo = chosen_photo(parser, args)
    if args.one:
        model_dir, precision, backend, size = args.one
        print(json.dumps(run_one(model_dir, precision, backend, args.device, int(size), photo)))
        return
    import torch

    size = 64 if args.tiny else 512
    runs = []
    with tempfile.TemporaryDirectory(prefix="forgedit-bench-gpu-") as work:
        model_dir = write_sd1_model(Path(work) / "model", args.tiny)
        for precision in args.precisions.split(","):
            for backend in args.backends.split(","):
                cmd = [sys.executable, __file__, "--device", args.device, "--photo", str(photo)]
                cmd += ["--one"]
                cmd += [str(model_dir), precision, backend, str(size)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                    runs.append({"precision": precision, "backend": backend, "error": tail[0]})
                else:
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), file=sys.stderr)
    report = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        },
        "resolution": size,
        "model": "tiny" if args.tiny else "SD 1.x shapes, random weights",
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
