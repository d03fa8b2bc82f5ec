"""``python -m forgedit eval DATASET --base-model M --out DIR``: edit and score a benchmark
folder in TEdBench's layout (``forgedit.eval``), in this process or through a running server
(``--target``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, TextIO

from forgedit.config import TRAINING_MODES
from forgedit.errors import InvalidInputError


def add_eval_parser(sub: Any, formatter: Any) -> None:
    parser = sub.add_parser(
        "eval",
        help="edit and score a TEdBench-layout folder",
        description=(
            "Edit every pair of DATASET (originals/ + input_list.json of {img_name, "
            "target_text[, source_text]}) and score every output: CLIP score and CLIP "
            "directional similarity (--clip), LPIPS against the input (--lpips, optional), "
            "SSIM and PSNR against the input. The best output per pair is the one with the "
            "highest CLIP directional similarity (ties: higher SSIM). Writes scores.json, "
            "scores.csv, images/ and one contact sheet per pair to --out. With --base-model "
            "shapes everything needed ships with the package: write the toy world's held-out "
            "edits with --write-shapes-heldout N."
        ),
        formatter_class=formatter,
    )
    parser.add_argument("dataset", metavar="DATASET", help="TEdBench-layout folder")
    parser.add_argument(
        "--base-model",
        metavar="M",
        required=True,
        help="'shapes' (the shipped toy world), 'tiny', or a diffusers SD 1.x directory; with "
        "--target, the name of a base model the server serves",
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="new or empty directory")
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="edit through this forgedit-server (its bearer token: env FORGEDIT_TOKEN)",
    )
    parser.add_argument(
        "--blip",
        metavar="DIR",
        help="BLIP captioner (in process; default: the base model's own for shapes and tiny)",
    )
    parser.add_argument(
        "--clip",
        metavar="DIR",
        help="CLIP model for scoring, e.g. "
        "clip-vit-large-patch14 (default for shapes: the toy world's CLIP)",
    )
    parser.add_argument(
        "--lpips",
        metavar="FILE",
        help="LPIPS (AlexNet, v0.1) weights as safetensors; without it LPIPS is not computed",
    )
    parser.add_argument("--mode", choices=TRAINING_MODES, default="joint")
    parser.add_argument(
        "--forget", metavar="S1,S2", help="forgetting strategies (default: the variant's)"
    )
    parser.add_argument("--gammas", metavar="G1,G2", help="γ values (default: the variant's)")
    parser.add_argument("--seeds", metavar="S1,S2", default="1", help="sampling seeds (1)")
    parser.add_argument(
        "--use-source-text",
        action="store_true",
        help="fine-tune on each pair's source_text instead of BLIP's caption",
    )
    parser.add_argument(
        "--write-shapes-heldout",
        type=int,
        metavar="N",
        help="first write N colour, N shape and N background edits of the toy "
        "world's held-out split to DATASET (new or empty)",
    )
    parser.add_argument(
        "--registry",
        metavar="URI",
        help="with --target: the MLflow tracking URI of the server's registry; each pair's "
        "edit-model version is tagged with its best output's scores (forgedit.eval.*)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_eval(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> dict[str, Any]:
    """Check the arguments, edit and score every pair, write the report; return its summary."""
    from forgedit.cli.arguments import parse_list
    from forgedit.eval.dataset import read_dataset, write_shapes_dataset
    from forgedit.eval.run import EvalOptions, evaluate, write_report

    # 1. Cheap checks first: the dataset, the options, the output directory.
    if args.write_shapes_heldout is not None:
        if args.write_shapes_heldout < 1:
            raise InvalidInputError("--write-shapes-heldout must be at least 1")
        write_shapes_dataset(args.dataset, args.write_shapes_heldout)
    pairs = read_dataset(args.dataset)
    if args.registry and not args.target:
        raise InvalidInputError(
            "--registry needs --target: only a server registers the edit models it trains",
            field="registry",
        )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"--out {args.out!r} exists and is not an empty directory")
    options = EvalOptions(
        mode=args.mode,
        forget=tuple(parse_list(args.forget, "--forget", str)) if args.forget else None,
        gammas=tuple(parse_list(args.gammas, "--gammas", float)) if args.gammas else None,
        seeds=tuple(parse_list(args.seeds, "--seeds", int)),
        use_source_text=args.use_source_text,
    )

    # 2. The scorers and the editor.
    scorers = _scorers(args)
    editor = _editor(args)

    # 3. Edit and score, one pair at a time.
    def progress(report: Any) -> None:
        best = report.best_scores
        print(
            f"eval: {report.pair.pair_id} {len(report.outputs)} outputs in "
            f"{report.edit.seconds:.0f} s; best clip={best['clip_score']:.3f} "
            f"direction={best['clip_direction']:.3f} ssim={best['ssim']:.3f}",
            file=stderr,
        )

    report = evaluate(pairs, editor, scorers, options, dataset=args.dataset, on_pair=progress)
    write_report(report, out)
    if args.registry:
        _record_scores(args.registry, report, stderr)
    summary = {"out": args.out, **report.summary()}
    if args.json:
        print(json.dumps(summary, indent=2), file=stdout)
    else:
        best = summary["best"]
        print(
            f"{summary['pairs']} pairs, {summary['outputs']} outputs; best per pair (means):",
            file=stdout,
        )
        for metric, value in best.items():
            print(f"  {metric:18} {'n/a' if value is None else f'{value:.4f}'}", file=stdout)
        print(f"report: {os.path.join(args.out, 'scores.json')}", file=stdout)
    return summary


def _scorers(args: argparse.Namespace) -> Any:
    from forgedit.eval.run import Scorers
    from forgedit.eval.scorers import ClipScorer, Lpips

    clip_dir = args.clip
    if clip_dir is None:
        if args.base_model != "shapes":
            raise InvalidInputError(
                "--clip DIR is needed to score (a CLIP model directory such as "
                "clip-vit-large-patch14); only --base-model shapes brings its own",
                field="clip",
            )
        from forgedit.zoo.shapes import shapes_model

        clip_dir = shapes_model().clip
        clip_name = "shapes toy CLIP"
    else:
        clip_name = Path(clip_dir).name
    lpips = Lpips.load(args.lpips, args.device) if args.lpips else None
    return Scorers(
        clip=ClipScorer.load(clip_dir, args.device),
        lpips=lpips,
        clip_name=clip_name,
        lpips_name=Path(args.lpips).name if args.lpips else None,
    )


def _editor(args: argparse.Namespace) -> Any:
    from forgedit.eval.run import InProcessEditor, RemoteEditor

    if args.target:
        from forgedit_client import ForgeditClient

        # The server's bearer token, from the environment as the SDK's CLI takes it (a flag
        # would show in the process list).
        client = ForgeditClient(args.target, token=os.environ.get("FORGEDIT_TOKEN") or None)
        return RemoteEditor(client, args.target, args.base_model)
    from forgedit.engine import Engine
    from forgedit.zoo import builtin_named

    builtin = builtin_named(args.base_model)  # a built-in's name: tiny, shapes
    if builtin is not None:
        base_dir, blip = builtin.stable_diffusion, args.blip or builtin.blip
    else:
        base_dir, blip = Path(args.base_model), args.blip
    engine = Engine.load(base_dir, blip_dir=blip, device=args.device)
    return InProcessEditor(engine, args.base_model)


def _record_scores(uri: str, report: Any, stderr: TextIO) -> None:
    """Tag each pair's edit-model version with its best output's scores. The one place the
    engine's command line reaches into ``registry`` (imported here, only for ``--registry``)."""
    import tempfile

    from registry import EditModelRegistry, RegistryConfig

    with (
        tempfile.TemporaryDirectory(prefix="forgedit-eval-") as scratch,
        EditModelRegistry(RegistryConfig(data_dir=Path(scratch), tracking_uri=uri)) as registry,
    ):
        for pair in report.pairs:
            if pair.edit.edit_model_id:
                version = registry.record_scores(
                    pair.edit.edit_model_id,
                    pair.best_scores,
                    source=f"forgedit eval {Path(report.dataset).name} {pair.pair.pair_id}",
                )
                print(f"eval: tagged {pair.edit.edit_model_id} (version {version})", file=stderr)
