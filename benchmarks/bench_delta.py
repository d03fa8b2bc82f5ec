"""Delta formats (fp32, fp16, int8): bytes, image difference, and register / fetch / load time.

Prints one JSON document; asserts nothing. Three parts, each optional:

* ``sizes``: bytes of the edit model per format, as a fraction of what the original saves (the
  whole fp32 pipeline), for SD 1.x from shapes alone (meta device; joint, two_stage,
  dreambooth), and measured on disk for the tiny model and the small preset below.
* ``quality`` (per preset, tiny and small): one real fine-tune, stored in every format; the
  RMS of each format's Δ error next to rounding the fine-tuned weights to fp16 (what fast mode
  samples with on a GPU), the 1-D alternative (per-tensor int8 instead of fp16), and the largest
  pixel difference (0-255) of each format's images against the fp32 edit model's on the same
  seeds (vs and vp; donotforget and two strategies with forgetting at degree 0.5), for the
  training mode given (joint by default; dreambooth also trains the text encoder).
  Also: how much zstd shrinks each payload and at what CPU time.
* ``transfer``: an SD-1.x-sized edit model (random Δ of the real shapes) per format:
  register and fetch through the embedded MLflow store and a real ``mlflow server`` on
  loopback, ``load_edit_model`` (verify + read + dequantise), and the swap of the loaded Δ into
  the resident weights of an SD-1.x UNet. Children write and load the models, so this process
  never holds them.

    .venv/bin/python benchmarks/bench_delta.py [--parts sizes,quality,transfer]
        [--presets tiny,small] [--mode joint] [--updates N] [--steps 20]
        [--formats int8,fp16,fp32]
        [--scale 1.0] [--backends embedded,server] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from photos import add_photo_arguments, chosen_photo

# The sibling benchmarks, and the tests' helpers (random edit models, a real `mlflow server`).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FORMATS = ("fp32", "fp16", "int8")
EMBEDDING_BYTES = 77 * 768 * 4
# CLIP-L text encoder and SD VAE parameter counts (what the original's save_pretrained adds to
# the UNet; as in bench_engine.sd1_sizes).
CLIP_L_PARAMS = 123_060_480
VAE_PARAMS = 83_653_863


# -- sizes --------------------------------------------------------------------------------------


def stored_bytes(shapes: dict[str, tuple[int, ...]], fmt: str) -> int:
    """Tensor bytes of a Δ payload of these shapes in ``fmt`` (forgedit.delta's layout)."""
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        if fmt == "fp32":
            total += 4 * n
        elif fmt == "fp16" or len(shape) < 2:
            total += 2 * n
        else:
            total += n + 4 * shape[0]  # int8 values + one fp32 scale per output channel
    return total


def sd1_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """The Δ shapes of an SD-1.x edit model of ``variant`` (joint and two_stage train the same
    UNet subset; dreambooth the whole UNet and the CLIP-L text encoder)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgedit.forgetting import sd1_meta_unet, trained_parameter_names

    params = dict(sd1_meta_unet().named_parameters())
    subset = "all" if variant == "dreambooth" else "forgedit"
    shapes = {f"unet.{n}": tuple(params[n].shape) for n in trained_parameter_names(params, subset)}
    if variant == "dreambooth":
        config = CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
        )
        with torch.device("meta"):
            encoder = CLIPTextModel(config)
        shapes.update({f"text_encoder.{n}": tuple(p.shape) for n, p in encoder.named_parameters()})
    return shapes


def sizes() -> dict[str, Any]:
    from forgedit.forgetting import sd1_meta_unet

    unet_params = sum(p.numel() for p in sd1_meta_unet().parameters())
    original = (unet_params + CLIP_L_PARAMS + VAE_PARAMS) * 4
    out: dict[str, Any] = {"sd1_original_pipeline_save_bytes": original, "sd1": {}}
    for variant in ("joint", "two_stage", "dreambooth"):
        shapes = sd1_shapes(variant)
        row: dict[str, Any] = {"parameters": sum(_numel(s) for s in shapes.values())}
        for fmt in FORMATS:
            nbytes = stored_bytes(shapes, fmt) + EMBEDDING_BYTES
            row[fmt] = {"bytes": nbytes, "fraction_of_original": round(nbytes / original, 4)}
        out["sd1"][variant] = row
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- quality ------------------------------------------------------------------------------------


def quality(preset: str, mode: str, updates: int | None, steps: int, photo: Path) -> dict[str, Any]:
    """One fine-tune on ``preset``, stored in every format; errors, bytes and pixel
    differences against fp32."""
    import numpy as np
    import torch
    from bench_engine import PRESETS, _widen_unet

    from forgedit import delta as delta_format
    from forgedit.artifact import load_edit_model
    from forgedit.config import SweepConfig, TrainingConfig
    from forgedit.engine import Engine
    from forgedit.images import load_image
    from forgedit.zoo.tiny import make_tiny_model

    torch.set_num_threads(1)
    widths, size, _, _ = PRESETS[preset]
    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    try:
        make_tiny_model(work / "model")
        model_dir = work / "model" / "stable-diffusion"
        if widths is not None:
            _widen_unet(model_dir / "unet", widths, size)
        engine = Engine.load(model_dir)
        image = load_image(photo).image
        config = TrainingConfig.for_mode(mode, height=size, width=size, seed=0)  # type: ignore[arg-type]
        if updates is not None:
            stages = tuple(dataclasses.replace(s, updates=updates) for s in config.stages)
            config = dataclasses.replace(config, stages=stages)
        t = time.perf_counter()
        exact = engine.finetune(image, "A photo of a dog", config)
        train_s = time.perf_counter() - t
        # donotforget, and two strategies with forgetting, valid in the mode's variant.
        forget = (
            "donotforget",
            "encoderattn",
            "decoderkv" if mode != "dreambooth" else "decoderattn",
        )
        pipeline_bytes = sum(p.stat().st_size for p in model_dir.rglob("*.safetensors"))

        sweeps = {
            "vs": SweepConfig(
                prompts=("A photo of a sitting dog.",),
                gammas=(0.6, 1.0),
                forget=forget,
                forget_degree=0.5,
                seeds=(1, 2),
                steps=steps,
            ),
            "vp": SweepConfig(
                prompts=("A photo of a sitting dog.",),
                interpolation="vp",
                gammas=(1.2,),
                alphas=(0.9,),
                forget=forget,
                forget_degree=0.5,
                seeds=(1, 2),
                steps=steps,
            ),
        }

        def images(model: Any) -> dict[str, list[Any]]:
            return {
                name: [np.asarray(e.image, dtype=np.int16) for e in engine.sample(model, s)]
                for name, s in sweeps.items()
            }

        reference = images(exact)
        # Sampling restores the base bit-exactly, so the live weights are θ_pre again here.
        finetuned = {k: engine.weights.parameter(k).detach() + v for k, v in exact.delta.items()}
        numel = sum(v.numel() for v in exact.delta.values())

        def rms(errors: dict[str, torch.Tensor]) -> float:
            return float(
                (sum(float((e.double() ** 2).sum()) for e in errors.values()) / numel) ** 0.5
            )

        result: dict[str, Any] = {
            "preset": preset,
            "mode": mode,
            "resolution": size,
            "training_updates": len(exact.loss_curve),
            "training_s": round(train_s, 1),
            "ddim_steps": steps,
            "images_per_format": sum(s.num_images for s in sweeps.values()),
            "delta_parameters": numel,
            "delta_rms": rms(exact.delta),
            "original_pipeline_save_bytes": pipeline_bytes,
            "rms_error_of_finetuned_weights_in_fp16": rms(
                {k: w.half().float() - w for k, w in finetuned.items()}
            ),
            "formats": {},
        }
        # The 1-D alternative the issue asks about: per-tensor int8 instead of fp16.
        one_d = {k: v for k, v in exact.delta.items() if v.dim() < 2}
        per_tensor = {}
        for k, v in one_d.items():
            s = v.abs().max() / 127
            q = torch.round(v / s).clamp(-127, 127) if s > 0 else torch.zeros_like(v)
            per_tensor[k] = q * s - v
        result["one_d_tensors"] = {
            "tensors": len(one_d),
            "parameters": sum(v.numel() for v in one_d.values()),
            "rms_error_fp16": _rms_over({k: v.half().float() - v for k, v in one_d.items()}),
            "rms_error_int8_per_tensor": _rms_over(per_tensor),
        }
        for fmt in FORMATS:
            model = dataclasses.replace(
                exact, training=dataclasses.replace(exact.training, delta_format=fmt)
            )
            model.delta, model.delta_scales = exact.delta, {}
            directory = work / f"em-{fmt}"
            model.save(directory)
            loaded = load_edit_model(directory)
            ours = images(loaded)
            diff = {
                name: max(int(np.abs(a - b).max()) for a, b in zip(ref, ours[name], strict=True))
                for name, ref in reference.items()
            }
            payload = delta_format.encode(exact.delta, fmt)  # type: ignore[arg-type]
            artifact_bytes = sum(p.stat().st_size for p in directory.iterdir())
            result["formats"][fmt] = {
                "artifact_bytes": artifact_bytes,
                "delta_file_bytes": (directory / "delta.safetensors").stat().st_size,
                "fraction_of_original": round(artifact_bytes / pipeline_bytes, 4),
                "rms_error_vs_fp32_delta": rms(
                    {k: loaded.delta[k].float() - v for k, v in exact.delta.items()}
                ),
                "max_pixel_difference_vs_fp32": diff,
                "zstd": zstd_figures(directory / "delta.safetensors"),
                "payload_tensor_bytes": delta_format.payload_bytes(payload),
            }
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rms_over(errors: dict[str, Any]) -> float:
    n = sum(e.numel() for e in errors.values())
    return float((sum(float((e.double() ** 2).sum()) for e in errors.values()) / max(n, 1)) ** 0.5)


def zstd_figures(path: Path, level: int = 3) -> dict[str, Any]:
    """zstd (one thread) on a delta file: compressed fraction and MB/s both ways."""
    try:
        import zstandard
    except ImportError:
        return {"available": False}
    data = path.read_bytes()
    t = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=level).compress(data)
    compress_s = time.perf_counter() - t
    t = time.perf_counter()
    zstandard.ZstdDecompressor().decompress(packed)
    decompress_s = time.perf_counter() - t
    mb = len(data) / 1e6
    return {
        "level": level,
        "compressed_fraction": round(len(packed) / len(data), 4),
        "compress_mb_per_s": round(mb / max(compress_s, 1e-9), 1),
        "decompress_mb_per_s": round(mb / max(decompress_s, 1e-9), 1),
    }


# -- transfer -----------------------------------------------------------------------------------


def generate(directory: Path, fmt: str, scale: float) -> None:
    """Child process: an SD-1.x-sized edit model (random Δ, real shapes) stored as ``fmt``."""
    import torch
    from support.registry import random_edit_model, sd1_trained_subset_shapes

    torch.set_num_threads(1)
    shapes = sd1_trained_subset_shapes()
    if scale != 1.0:
        shapes = {k: s for i, (k, s) in enumerate(shapes.items()) if i < len(shapes) * scale}
    em = random_edit_model(0, shapes=shapes, dtype=torch.float32, delta_format=fmt)  # type: ignore[arg-type]
    em.source_embedding = torch.randn(1, 77, 768)
    em.save(directory)


def load_timing(directory: Path) -> None:
    """Child process: time ``load_edit_model`` (verify every sha256, read, dequantise), then
    writing it into the resident weights of an SD-1.x UNet (θ_pre + Δ into every trained
    tensor, the pristine copies taken on first use as a serving replica does once)."""
    import torch

    from forgedit.artifact import load_edit_model
    from forgedit.forgetting import sd1_meta_unet
    from forgedit.weights import ResidentWeights

    torch.set_num_threads(1)
    t = time.perf_counter()
    model = load_edit_model(directory)
    load_s = time.perf_counter() - t
    unet = sd1_meta_unet().to_empty(device="cpu")
    weights = ResidentWeights({"unet": unet})
    weights.snapshot(model.delta)  # once per replica, not per edit model
    swaps = []
    for _ in range(3):  # the first also pays the page faults of fresh memory
        t = time.perf_counter()
        with weights.edit_model(model.delta) as live:
            live.set_forgetting([], 0.0)
            swaps.append(time.perf_counter() - t)
    print(json.dumps({"load_edit_model_s": load_s, "swap_into_resident_s": min(swaps)}))


def transfer(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench_registry import machine
    from support.registry import MlflowServer

    from registry import EditModelRegistry, RegistryConfig
    from registry.fsutil import tree_bytes

    out: dict[str, Any] = {"scale": args.scale, "formats": {}}
    servers: dict[str, MlflowServer] = {}
    try:
        for fmt in args.formats.split(","):
            source = work / f"sd1-{fmt}"
            t = time.perf_counter()
            _child("--generate", source, "--format", fmt, "--scale", str(args.scale))
            row: dict[str, Any] = {
                "bytes_on_disk": tree_bytes(source),
                "generate_s": round(time.perf_counter() - t, 1),
            }
            loads = [
                json.loads(_child("--load", source).strip().splitlines()[-1])
                for _ in range(args.repeats)
            ]
            for key in ("load_edit_model_s", "swap_into_resident_s"):
                row[f"median_{key}"] = round(statistics.median(x[key] for x in loads), 2)
            for backend in filter(None, args.backends.split(",")):
                uri = None
                if backend == "server":
                    if "server" not in servers:
                        servers["server"] = MlflowServer(work / "mlflow-server")
                        servers["server"].start()
                    uri = servers["server"].uri
                registrar = EditModelRegistry(
                    RegistryConfig(data_dir=work / backend / f"a-{fmt}", tracking_uri=uri)
                )
                registrar._backend.experiment_id()  # store set-up is not part of the figure
                store_uri = registrar.config.resolved_tracking_uri
                timings: dict[str, list[float]] = {"register_s": [], "fetch_s": []}
                for i in range(args.repeats):
                    t = time.perf_counter()
                    result = registrar.register(source, dedupe=False)
                    timings["register_s"].append(time.perf_counter() - t)
                    assert not result.spooled, "MLflow did not take the edit model"
                    replica_dir = work / backend / f"b-{fmt}-{i}"
                    replica = EditModelRegistry(
                        RegistryConfig(data_dir=replica_dir, tracking_uri=store_uri)
                    )
                    t = time.perf_counter()
                    assert replica.fetch(result.edit_model_id).source == "download"
                    timings["fetch_s"].append(time.perf_counter() - t)
                    registrar.delete(result.edit_model_id)
                    shutil.rmtree(replica_dir, ignore_errors=True)
                row[backend] = {
                    f"median_{k}": round(statistics.median(v), 2) for k, v in timings.items()
                }
                shutil.rmtree(work / backend / f"a-{fmt}", ignore_errors=True)
            shutil.rmtree(source, ignore_errors=True)
            out["formats"][fmt] = row
    finally:
        for server in servers.values():
            server.stop()
    out["machine"] = machine()
    return out


def _child(*argv: object) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, *map(str, argv)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="sizes,quality,transfer")
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--mode", default="joint", help="quality: the training mode")
    parser.add_argument(
        "--updates", type=int, default=None, help="quality: updates per stage (default: the mode's)"
    )
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the compared images")
    parser.add_argument("--formats", default="int8,fp16,fp32", help="transfer: which formats")
    parser.add_argument("--scale", type=float, default=1.0, help="transfer: fraction of tensors")
    parser.add_argument("--backends", default="embedded,server", help="'' = load times only")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quality-of", help=argparse.SUPPRESS)
    add_photo_arguments(parser, tedbench_photo="dog2_standing.png")
    args = parser.parse_args()
    photo = chosen_photo(parser, args)
    if args.generate is not None:
        generate(args.generate, args.format, args.scale)
        return
    if args.load is not None:
        load_timing(args.load)
        return
    if args.quality_of is not None:
        print(json.dumps(quality(args.quality_of, args.mode, args.updates, args.steps, photo)))
        return

    parts = args.parts.split(",")
    report: dict[str, Any] = {}
    if "sizes" in parts:
        report["sizes"] = sizes()
    if "quality" in parts:
        report["quality"] = [
            json.loads(
                _child(
                    *("--quality-of", p, "--mode", args.mode, "--steps", args.steps),
                    *("--photo", photo),
                    *(("--updates", args.updates) if args.updates is not None else ()),
                )
                .strip()
                .splitlines()[-1]
            )
            for p in args.presets.split(",")
        ]
    if "transfer" in parts:
        work = Path(tempfile.mkdtemp(prefix="bench-delta-transfer-"))
        try:
            report["transfer"] = transfer(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
