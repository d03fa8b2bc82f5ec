"""Quality of the shipped toy world (forgedit.zoo.shapes) on its held-out split.

    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py --out benchmarks/results-quality-DATE.json
    python benchmarks/bench_quality.py --parts edits --modes two_stage --per-kind 3   # one part

Parts (each on held-out scenes, never seen in training; rules in forgedit.zoo.shapes.quality):

- ``captions``: BLIP's greedy caption (as the engine runs it) equals the scene's.
- ``t2i``: text-to-image accuracy of the base model: for every caption of the world and each
  seed, DDIM 50 steps with guidance 7.5 from the base model alone; right when the toy CLIP's
  top-1 among all 54 captions is the prompt.
- ``edits``: per mode, ``--per-kind`` colour, shape and background edits; BLIP captions the
  input, the edit model is fine-tuned with the mode's defaults and sampled over the mode's
  default sweep (γ grid and forgetting strategy, one seed); success by the toy rule. Reported
  per kind at the best sweep point (the γ with the highest success rate over that kind's
  cases) and averaged over all sweep points.

Writes one JSON with every case's numbers; BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def load(device: str = "cpu") -> tuple[Any, Any]:
    from forgedit.engine import Engine
    from forgedit.eval.scorers import ClipScorer
    from forgedit.zoo.shapes import shapes_model

    model = shapes_model()
    engine = Engine.load(model.stable_diffusion, blip_dir=model.blip, device=device)
    return engine, ClipScorer.load(model.clip, device)


def captions(engine: Any, count: int) -> dict[str, Any]:
    from forgedit.zoo.shapes import world
    from forgedit.zoo.shapes.quality import caption_correct

    wrong = []
    for index, scene in enumerate(world.scenes("heldout", count)):
        caption = engine.captioner.caption(scene.render())
        if not caption_correct(caption, scene):
            wrong.append({"index": index, "caption": caption, "truth": scene.blip_caption})
    return {"images": count, "accuracy": 1 - len(wrong) / count, "wrong": wrong[:20]}


def text_to_image(engine: Any, clip: Any, seeds: list[int]) -> dict[str, Any]:
    """Base-model generations (no edit model) for every caption × seed."""
    from forgedit.images import to_pil
    from forgedit.sampling import decode, denoise, initial_latents
    from forgedit.text import encode_prompt
    from forgedit.zoo.shapes import world
    from forgedit.zoo.shapes.quality import top1_caption

    base = engine.base
    size = engine.native_height
    unet = engine.unet_predictor(size, size, len(seeds))
    uncond = encode_prompt(base.tokenizer, base.text_encoder, "")
    right, per_attribute = 0, defaultdict(int)
    rows = []
    for caption in world.all_captions():
        cond = encode_prompt(base.tokenizer, base.text_encoder, caption).expand(len(seeds), -1, -1)
        latents = initial_latents(seeds, 4, size, size, base.vae_scale_factor)
        latents = denoise(unet, latents, cond, uncond, steps=50, guidance=7.5)
        for seed, image in zip(
            seeds, to_pil(decode(base.vae, latents, base.scaling_factor)), strict=True
        ):
            predicted = top1_caption(clip, image)
            ok = predicted == caption
            right += ok
            words, guess = caption.split(), predicted.split()
            for k, name in ((4, "colour"), (5, "shape"), (8, "background")):
                per_attribute[name] += words[k] == guess[k]
            rows.append({"caption": caption, "seed": seed, "top1": predicted, "right": ok})
    total = len(rows)
    return {
        "images": total,
        "accuracy": right / total,
        "attribute_accuracy": {k: v / total for k, v in per_attribute.items()},
        "wrong": [r for r in rows if not r["right"]][:30],
    }


def edits(engine: Any, clip: Any, mode: str, per_kind: int) -> dict[str, Any]:
    from forgedit.config import SweepConfig
    from forgedit.options import TrainingOptions
    from forgedit.requests import build_training
    from forgedit.zoo.shapes import world
    from forgedit.zoo.shapes.quality import PRESERVATION_THRESHOLD, edit_outcome

    size = engine.native_height
    cases = []
    for kind in world.EDIT_KINDS:
        for i in range(per_kind):
            case = world.edit_case(kind, i)
            image = case.source.render()
            started = time.perf_counter()
            source = engine.source_prompt(image, case.target_prompt)
            config, _ = build_training(
                TrainingOptions(mode=mode, seed=1000 + i),
                native_height=size,
                native_width=size,
                precision="faithful",
            )
            model = engine.finetune(image, source, config)
            sweep = SweepConfig.for_mode(mode, prompts=(case.target_prompt,), seeds=(1,))
            outcomes = []
            for edited in engine.sample(model, sweep):
                outcome = edit_outcome(clip, edited.image, case)
                outcomes.append(
                    {"forget": edited.spec.forget, "gamma": edited.spec.gamma, **outcome.to_dict()}
                )
            cases.append(
                {
                    "kind": kind,
                    "index": i,
                    "source_prompt": source,
                    "target_prompt": case.target_prompt,
                    "seconds": round(time.perf_counter() - started, 1),
                    "outcomes": outcomes,
                }
            )
            best = max(o["success"] for o in outcomes)
            print(f"  {mode} {kind} {i}: {source!r} -> success at any γ: {best}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for kind in world.EDIT_KINDS:
        of_kind = [c for c in cases if c["kind"] == kind]
        points = sorted({(o["forget"], o["gamma"]) for c in of_kind for o in c["outcomes"]})
        rate = {
            p: statistics.fmean(
                o["success"]
                for c in of_kind
                for o in c["outcomes"]
                if (o["forget"], o["gamma"]) == p
            )
            for p in points
        }
        best_point = max(points, key=lambda p: rate[p])
        summary[kind] = {
            "cases": len(of_kind),
            "best_point": {"forget": best_point[0], "gamma": best_point[1]},
            "success_at_best_point": rate[best_point],
            "success_averaged": statistics.fmean(rate.values()),
            "success_by_point": {f"{f} γ={g:g}": r for (f, g), r in rate.items()},
            "any_point": statistics.fmean(
                max(o["success"] for o in c["outcomes"]) for c in of_kind
            ),
        }
    return {
        "mode": mode,
        "per_kind": per_kind,
        "preservation_threshold": PRESERVATION_THRESHOLD,
        "summary": summary,
        "cases": cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="captions,t2i,edits")
    parser.add_argument("--modes", default="joint,two_stage,dreambooth")
    parser.add_argument("--per-kind", type=int, default=6)
    parser.add_argument("--per-kind-slow", type=int, default=3, help="for two_stage, dreambooth")
    parser.add_argument("--captions", type=int, default=300)
    parser.add_argument("--t2i-seeds", default="1,2")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    engine, clip = load()
    parts = args.parts.split(",")
    result: dict[str, Any] = {
        "benchmark": "quality of the shapes toy world (held-out split)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    }
    from forgedit.durable import write_json_atomic

    def save() -> None:  # after every part: a long run keeps what it finished
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(args.out, result)

    if "captions" in parts:
        result["captions"] = captions(engine, args.captions)
        print(f"captions: {result['captions']['accuracy']:.3f}", file=sys.stderr)
        save()
    if "t2i" in parts:
        seeds = [int(s) for s in args.t2i_seeds.split(",")]
        result["text_to_image"] = text_to_image(engine, clip, seeds)
        print(f"t2i: {result['text_to_image']['accuracy']:.3f}", file=sys.stderr)
        save()
    if "edits" in parts:
        result["edits"] = {}
        for mode in args.modes.split(","):
            per_kind = args.per_kind if mode == "joint" else args.per_kind_slow
            result["edits"][mode] = edits(engine, clip, mode, per_kind)
            print(json.dumps(result["edits"][mode]["summary"], indent=1), file=sys.stderr)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
