"""Benchmark previews through the service and the SDK; prints JSON, asserts nothing.

For each preset of ``bench_engine.py`` (``tiny`` at 64 px, ``small`` at 128 px), a real
``forgedit-server`` (in this process, torch UNet, one torch thread, embedded registry) serves
Edits through the SDK (``ForgeditClient``): the original's joint fine-tune (40 updates of batch
10, a fresh seed each, so every Edit trains) and one image of 50 DDIM steps. Edits alternate
with the training-free preview on and off. It reports, medians over ``--repeats``:

* ``first_preview_s``: from issuing the call to the SDK's first ``Preview`` (client side);
* ``first_image_s``: to the first ``ImageReady``, with the preview on and with it off;
* ``preview_s`` and ``preview_fraction``: the server's ``PhaseTimings.preview_seconds``, and
  that over the job's ``total_seconds`` and over its ``training_seconds`` (the preview runs
  before the fine-tune on the same device: this is its whole cost);
* ``x0``: ``Sample`` of 2 images × 50 steps from the stored edit model, alternating no x0
  previews and one every step (the worst case, 100 previews): sampling seconds and the ratio;
* ``histograms``: ``forgedit_time_to_first_preview_seconds`` and
  ``forgedit_time_to_first_image_seconds`` (sum / count) as the server's metrics saw them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_previews.py [--presets tiny,small]
        [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_engine import PRESETS, _widen_unet
from photos import add_photo_arguments, chosen_photo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed_stream(stream: Any) -> dict[str, Any]:
    """Iterate an SDK stream; seconds (from the first ``next``) to its first preview, first
    image and end, and the final result."""
    from forgedit_client import ImageReady, Preview

    started = time.perf_counter()
    first_preview = first_image = None
    for event in stream:
        now = time.perf_counter() - started
        if isinstance(event, Preview) and first_preview is None:
            first_preview = now
        if isinstance(event, ImageReady) and first_image is None:
            first_image = now
    result = stream.result()
    return {
        "first_preview_s": first_preview,
        "first_image_s": first_image,
        "end_s": time.perf_counter() - started,
        "timings": result.timings.to_dict(),
        "edit_model_id": result.edit_model_id,
    }


def histogram(server: Any, name: str) -> dict[str, dict[str, float]]:
    """sum and count per label set of one histogram in the server's own registry."""
    out: dict[str, dict[str, float]] = {}
    for metric in server.serving.metrics.registry.collect():
        if metric.name != name:
            continue
        for sample in metric.samples:
            if sample.name.endswith(("_sum", "_count")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out.setdefault(labels, {})[sample.name.rsplit("_", 1)[1]] = sample.value
    return out


def run_preset(preset: str, repeats: int, photo: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from forgedit_client import ForgeditClient

    from forgedit.zoo.tiny import make_tiny_model
    from registry import EditModelRegistry, RegistryConfig
    from server.main import create_server
    from server.settings import ServerSettings

    widths, size, _, steps = PRESETS[preset]
    work = Path(tempfile.mkdtemp(prefix=f"bench-previews-{preset}-"))
    make_tiny_model(work / "model")
    model_dir = work / "model" / "stable-diffusion"
    if widths is not None:
        _widen_unet(model_dir / "unet", widths, size)
    settings = ServerSettings(
        grpc_port=0,
        health_port=None,
        metrics_port=None,
        data_dir=work / "data",
        base_models={preset: model_dir},
        blip_dir=work / "model" / "blip",
        unet_backend="torch",
        log_level="WARNING",
    )
    registry = EditModelRegistry(RegistryConfig(data_dir=work / "data" / "registry"))
    server, port = create_server(settings, registry=registry)
    assert server.wait_ready(600), server.lifecycle.startup_error
    image = photo.read_bytes()
    prompt = "A photo of a cat wearing a hat."
    edits: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    with ForgeditClient(f"127.0.0.1:{port}") as client:
        # Warm-up: one short Edit (first-use costs), not measured.
        client.edit(image, prompt, updates=2, batch_size=1, steps=2, gammas=[0.6]).result()
        for r in range(repeats):
            for mode in ("on", "off"):
                stream = client.edit(
                    image,
                    prompt,
                    fresh_seed=True,  # every Edit trains (no reuse of a stored fine-tune)
                    width=size,
                    height=size,
                    gammas=[0.6],
                    seeds=[r],
                    steps=steps,
                    training_free_preview=mode == "on",
                    timeout=None,
                )
                edits[mode].append(timed_stream(stream))
        model = edits["on"][0]["edit_model_id"]
        x0: dict[str, list[float]] = {"none": [], "every_step": []}
        for _ in range(repeats):
            for mode, every in (("none", None), ("every_step", 1)):
                result = client.sample(
                    model,
                    prompt,
                    gammas=[0.6],
                    seeds=[1, 2],
                    steps=steps,
                    x0_every=every,
                    timeout=None,
                ).result()
                assert result.timings is not None
                x0[mode].append(result.timings.sampling_seconds)
                if every is not None:
                    assert len(result.previews) == 2 * steps
    hist = {
        "time_to_first_preview": histogram(server, "forgedit_time_to_first_preview_seconds"),
        "time_to_first_image": histogram(server, "forgedit_time_to_first_image_seconds"),
    }
    server.stop()
    registry.close()

    on, off = edits["on"], edits["off"]
    preview_s = [e["timings"]["preview_seconds"] for e in on]
    return {
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "first_preview_s": median([e["first_preview_s"] for e in on]),
        "first_image_s": {
            "preview_on": median([e["first_image_s"] for e in on]),
            "preview_off": median([e["first_image_s"] for e in off]),
        },
        "end_s": {
            "preview_on": median([e["end_s"] for e in on]),
            "preview_off": median([e["end_s"] for e in off]),
        },
        "preview_s": median(preview_s),
        "training_s": median([e["timings"]["training_seconds"] for e in on]),
        "preview_fraction": {
            "of_total": median(
                [e["timings"]["preview_seconds"] / e["timings"]["total_seconds"] for e in on]
            ),
            "of_training": median(
                [e["timings"]["preview_seconds"] / e["timings"]["training_seconds"] for e in on]
            ),
        },
        "x0": {
            "images": 2,
            "previews": 2 * steps,
            "sampling_s_none": median(x0["none"]),
            "sampling_s_every_step": median(x0["every_step"]),
            "ratio": median(x0["every_step"]) / median(x0["none"]),
        },
        "histograms": hist,
        "raw": {"edits": edits, "x0": x0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    add_photo_arguments(parser, tedbench_photo="dog2_standing.png")
    args = parser.parse_args()
    photo = chosen_photo(parser, args)
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_before": os.getloadavg(),
        },
        "presets": {},
    }
    for preset in args.presets.split(","):
        result["presets"][preset] = run_preset(preset, args.repeats, photo)
    result["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
