"""Engine benchmark: prints JSON, asserts nothing (timings on shared machines are noisy).

For each preset (``tiny``: the tiny model at 64 px; ``small``: a 4-level SD-shaped UNet with
wider channels at 128 px) and precision mode, in a fresh subprocess so peak memory is per
configuration, it runs one whole job (load → caption → fine-tune → save → sample) and reports:

* seconds per training update (median over the run),
* seconds per sampled image (a batched sweep, median over chunks),
* peak resident memory,
* the job's time by phase,

plus the size of the edit-model artifact next to what the original saves (the whole
pipeline), for the preset and, computed from shapes, for SD 1.x.

    .venv/bin/python benchmarks/bench_engine.py [--presets tiny,small] [--updates N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from photos import add_photo_arguments, chosen_photo

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # name: (UNet widths, resolution, images in the sweep, DDIM steps)
    "tiny": (None, 64, 12, 50),
    "small": ((64, 128, 256, 256), 128, 6, 50),
}


def run_one(preset: str, precision: str, updates: int | None, photo: Path) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(1)
    from forgedit.config import SweepConfig, TrainingConfig
    from forgedit.engine import Engine
    from forgedit.images import load_image
    from forgedit.zoo.tiny import make_tiny_model

    widths, size, n_images, steps = PRESETS[preset]
    phases: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="forgedit-bench-"))
    make_tiny_model(work / "model")
    model_dir = work / "model" / "stable-diffusion"
    if widths is not None:
        _widen_unet(model_dir / "unet", widths, size)

    t = time.perf_counter()
    engine = Engine.load(model_dir, blip_dir=work / "model" / "blip", precision=precision)  # type: ignore[arg-type]
    phases["load"] = time.perf_counter() - t
    image = load_image(photo).image
    prompt = "A photo of a cat wearing a hat."

    t = time.perf_counter()
    source = engine.source_prompt(image, prompt)
    phases["caption"] = time.perf_counter() - t

    config = TrainingConfig.for_mode("joint", height=size, width=size, seed=0, precision=precision)
    if updates is not None:
        config = dataclasses.replace(
            config, stages=tuple(dataclasses.replace(s, updates=updates) for s in config.stages)
        )
    stamps: list[float] = []
    t = time.perf_counter()
    edit_model = engine.finetune(
        image, source, config, on_progress=lambda p: stamps.append(time.perf_counter())
    )
    phases["training"] = time.perf_counter() - t
    per_update = [b - a for a, b in zip([t, *stamps], stamps, strict=False)]

    t = time.perf_counter()
    edit_model.save(work / "edit-model")
    phases["save_edit_model"] = time.perf_counter() - t
    artifact_bytes = sum(p.stat().st_size for p in (work / "edit-model").iterdir())
    pipeline_bytes = sum(p.stat().st_size for p in model_dir.rglob("*.safetensors"))

    seeds = tuple(range(n_images // 2))
    sweep = SweepConfig(prompts=(prompt,), gammas=(0.6, 1.0), seeds=seeds, steps=steps)
    chunk_times: list[float] = []
    last = [time.perf_counter()]

    def on_image(_: object) -> None:
        now = time.perf_counter()
        chunk_times.append(now - last[0])
        last[0] = now

    t = time.perf_counter()
    last[0] = t
    engine.sample(edit_model, sweep, on_image=on_image, max_batch=n_images)
    phases["sampling"] = time.perf_counter() - t

    return {
        "preset": preset,
        "precision": precision,
        "resolution": size,
        "unet_parameters": sum(p.numel() for p in engine.base.unet.parameters()),
        "training_updates": len(edit_model.loss_curve),
        "batch_size": config.stages[0].batch_size,
        "seconds_per_training_update_median": statistics.median(per_update),
        "sampled_images": sweep.num_images,
        "ddim_steps": steps,
        "seconds_per_image": phases["sampling"] / sweep.num_images,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "phases_seconds": phases,
        "edit_model_bytes": artifact_bytes,
        "original_pipeline_save_bytes": pipeline_bytes,
    }


def _widen_unet(unet_dir: Path, widths: tuple[int, ...], size: int) -> None:
    """Replace the tiny UNet by a wider one with the same names (the 'small' preset)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads((unet_dir / "config.json").read_text())
    config.update(block_out_channels=list(widths), norm_num_groups=32, sample_size=size // 8)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**config)
    unet.save_pretrained(unet_dir, safe_serialization=True)


def sd1_sizes() -> dict:
    """Edit-model size for SD 1.x from shapes alone (meta device), next to the original's save."""
    from forgedit.forgetting import sd1_meta_unet, trained_parameter_names

    params = dict(sd1_meta_unet().named_parameters())
    trained = sum(params[n].numel() for n in trained_parameter_names(params, "forgedit"))
    total = sum(p.numel() for p in params.values())
    embedding = 77 * 768 * 4
    # The original's save_pretrained: fp32 UNet + CLIP-L text encoder (123.06 M) + VAE (83.65 M).
    original = (total + 123_060_480 + 83_653_863) * 4
    return {
        "trained_parameters": trained,
        "edit_model_bytes_fp32_faithful": trained * 4 + embedding,
        "edit_model_bytes_fp16_fast": trained * 2 + embedding,
        "original_pipeline_save_bytes": original,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--precisions", default="faithful,fast")
    parser.add_argument(
        "--updates", type=int, default=None, help="training updates (default: the original's 40)"
    )
    add_photo_arguments(parser, tedbench_photo="dog2_standing.png")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    photo = chosen_photo(parser, args)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.updates, photo)))
        return

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    runs = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--one", preset, precision, "--photo", str(photo)]
            if args.updates is not None:
                cmd += ["--updates", str(args.updates)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "torch_threads": 1,
                },
                "runs": runs,
                "sd1_edit_model_size": sd1_sizes(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
