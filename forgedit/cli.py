"""The offline command line, ``python -m forgedit``: edit one image on this machine.

    python -m forgedit edit photo.jpg --prompt "A photo of a sitting dog." \\
        --base-model sd-1-4 --blip blip-base --forget encoderkv,decoderattn --seeds 1,2

Subcommands:
    edit             caption → fine-tune → sweep of edits, written as PNGs, a contact sheet and
                     summary.json (or sample from a saved edit model with --load-model)
    make-tiny-model  write the tiny deterministic test model (SD-1.x-shaped UNet + tiny BLIP)
    strategies       what each forgetting strategy reverts, in tensors and parameters

Contract of ``edit``:
1. Every argument is checked before any model is loaded (lists parsed, the training and sweep
   configs built, the image decoded under limits, --out and --save-model checked).
2. Results are staged in a hidden directory inside --out and moved into place only when the
   whole sweep has been written: --out never holds half a run.
3. Bad input of any kind prints ONE line ``error: <message>`` on stderr and exits with 2,
   without a traceback. Ctrl-C cancels at the next training update or denoising step and
   exits with 130; the first Ctrl-C cancels cleanly, a second one aborts at once.
4. Progress bars go to stderr; stdout carries only the result (``--json``: one JSON object).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO, TypeVar, cast

from forgedit.backends.names import BACKEND_CHOICES
from forgedit.config import (
    DELTA_FORMATS,
    INTERPOLATIONS,
    MAX_BATCH,
    PRECISIONS,
    TRAINING_MODES,
    Precision,
    SweepConfig,
    TrainingConfig,
    TrainingMode,
    check_prompt,
    content_seed,
    override_stages,
)
from forgedit.durable import fsync_dir
from forgedit.errors import (
    CancelledError,
    EditModelError,
    ForgeditError,
    InvalidInputError,
    ModelDirectoryError,
)
from forgedit.events import CancelToken, SamplingProgress, TrainingProgress
from forgedit.forgetting import STRATEGIES, check_strategy, variant_for_mode
from forgedit.images import LoadedImage, contact_sheet, encode_png, load_image

if TYPE_CHECKING:
    from PIL import Image

    from forgedit.artifact import EditModel
    from forgedit.backends.select import Fallback
    from forgedit.engine import EditedImage, Engine

PROG = "python -m forgedit"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONTACT_SHEET = "contact_sheet.png"
SUMMARY = "summary.json"
CONTACT_SHEET_MAX_IMAGES = 64  # beyond this a sheet stops being "readable at a glance"
_RANDOM_SEED_BOUND = 2**32  # random seeds are drawn below this: short enough to retype
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Argument parsing


class _UsageError(Exception):
    """argparse's complaint, reported like every other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and sys.exit(2)
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Forgedit text-guided image editing, offline, on this machine.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_edit(sub)

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write the tiny deterministic test model",
        description="Write a tiny, deterministic SD-1.x-shaped pipeline to DIR/stable-diffusion "
        "and a tiny BLIP captioner to DIR/blip, in the real on-disk formats. Useful to try the "
        "whole pipeline in seconds; its edits are noise, not pictures.",
        formatter_class=_Formatter,
    )
    tiny.add_argument("directory", metavar="DIR", help="where to write the model (created)")

    strategies = sub.add_parser(
        "strategies",
        help="what each forgetting strategy reverts",
        description="Count the UNet tensors and parameters each forgetting strategy reverts to "
        "their pretrained values, for vanilla and DreamBooth Forgedit. Without --base-model the "
        "counts are for an SD 1.x UNet (built on the meta device: no weights needed).",
        formatter_class=_Formatter,
    )
    strategies.add_argument("--base-model", metavar="DIR", help="count on this base model's UNet")
    strategies.add_argument("--device", default="cpu", help="device to load it on (default: cpu)")
    strategies.add_argument("--json", action="store_true", help="print JSON instead of a table")

    build = sub.add_parser(
        "build-engine",
        help="prebuild the TensorRT engine of a base model",
        description="Export a base model's UNet to ONNX and build its refittable FP16 TensorRT\n"
        "engine for one resolution and batch profile (1 .. 2 x max batch rows), then run its\n"
        "canary against torch. The plan is cached in --engine-cache, where edit finds it; to\n"
        "prebuild for a server, point it at the server's FORGEDIT_DATA_DIR/engines. Needs a\n"
        "CUDA device and TensorRT.",
        formatter_class=_Formatter,
    )
    build.add_argument("--base-model", metavar="DIR", required=True, help="SD 1.x directory")
    build.add_argument("--size", metavar="WxH", help="image size (default: the model's native)")
    build.add_argument("--max-batch", metavar="N", default="8", help="images per batch (8)")
    build.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    build.add_argument(
        "--engine-cache", metavar="DIR", help="plan cache (default: as edit --engine-cache)"
    )
    return parser


def _wrap_list(title: str, items: str) -> str:
    return textwrap.fill(
        items, width=96, initial_indent=f"  {title:<18}", subsequent_indent=" " * 20
    )


def _add_edit(sub: Any) -> None:
    vanilla = ", ".join(STRATEGIES["vanilla"])
    dreambooth = ", ".join(STRATEGIES["dreambooth"])
    edit = sub.add_parser(
        "edit",
        help="edit an image: caption, fine-tune, sweep",
        description=(
            "Fine-tune an edit model on IMAGE and sample a sweep of edits toward --prompt:\n"
            "every combination of --forget × --seeds × --gammas (× --alphas for vp).\n"
            "Writes one PNG per edit, contact_sheet.png and summary.json into --out."
        ),
        epilog=(
            "forgetting strategies (--forget):\n"
            f"{_wrap_list('joint, two_stage:', vanilla)}\n"
            f"{_wrap_list('dreambooth:', dreambooth)}\n"
            "  encoder* revert UNet down_blocks (keep identity, free the layout);\n"
            "  decoder* revert up_blocks (keep the layout, free the appearance).\n\n"
            "examples:\n"
            f"  {PROG} edit dog.jpg --prompt 'A photo of a sitting dog.'   # tiny test model\n"
            f"  {PROG} edit dog.jpg --prompt 'A photo of a sitting dog.' --base-model sd14 \\\n"
            "      --blip blip-base --forget encoderkv,noencoder --seeds 1,2 --save-model m1\n"
            f"  {PROG} edit dog.jpg --prompt 'A dog jumping.' --base-model sd14 --load-model m1"
        ),
        formatter_class=_Formatter,
    )
    edit.add_argument("image", metavar="IMAGE", help="the photo to edit (PNG, JPEG or WEBP)")
    edit.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="target prompt; repeat for several prompts over the same edit model",
    )
    edit.add_argument(
        "--source-prompt",
        metavar="TEXT",
        help="text describing IMAGE as it is; default: a BLIP caption (prefixed with "
        "'A photo of ' when the first --prompt contains it, as the original)",
    )
    models = edit.add_argument_group("models")
    models.add_argument(
        "--base-model",
        metavar="DIR",
        help="a diffusers Stable Diffusion 1.x directory; default: the tiny test model",
    )
    models.add_argument("--vae", metavar="DIR", help="a separate VAE directory (e.g. for *noVAE)")
    models.add_argument(
        "--blip",
        metavar="DIR",
        help="a BLIP captioning directory (blip-image-captioning-base); needed with "
        "--base-model unless --source-prompt or --load-model is given",
    )
    models.add_argument(
        "--load-model",
        metavar="DIR",
        help="sample from a saved edit model instead of training (made on the same base model)",
    )
    models.add_argument(
        "--save-model", metavar="DIR", help="save the edit model here (must not exist, or be empty)"
    )

    training = edit.add_argument_group("training")
    training.add_argument(
        "--mode",
        choices=TRAINING_MODES,
        help="joint: vanilla Forgedit (default); two_stage: Forgedit transferred to Imagic; "
        "dreambooth: DreamBooth-Forgedit",
    )
    training.add_argument(
        "--train-seed",
        metavar="N|random",
        help="seed of the training noise; default: derived from the image, base model, source "
        "prompt and training config (the same inputs give the same edit model); 'random' for "
        "a fresh fine-tune; always reported",
    )
    training.add_argument(
        "--updates",
        metavar="N[,N]",
        help="override the optimiser updates of the first training stage, or of each stage "
        "with a list (joint: 40; two_stage: 400,1000; dreambooth: 100); for quick trials",
    )
    training.add_argument(
        "--delta-format",
        choices=DELTA_FORMATS,
        help="how the edit model stores its Δ: fp32 (exact), fp16, or int8 with one scale per "
        "output channel (a quarter of fp32, within 1/255 of its images) (default: fp32 with "
        "--precision faithful, int8 with fast)",
    )
    training.add_argument(
        "--batch-size",
        metavar="N[,N]",
        help="override the batch size of the first training stage, or of each stage with a "
        f"list (joint: 10; two_stage: 1,1; dreambooth: 4; each 1..{MAX_BATCH})",
    )

    sweep = edit.add_argument_group("sweep")
    sweep.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        default="vs",
        help="vs: e = γ·e_tgt + (1−γ)·e_opt; vp: e = β·(e_tgt ⊥ e_opt) + α·e_opt (default: vs)",
    )
    sweep.add_argument(
        "--gammas",
        metavar="LIST",
        help="γ for vs, β for vp, comma-separated, each in [-1, 3] (default: 0.5,0.6,0.7; "
        "dreambooth: 0.8,0.9,...,1.6 as the original's DreamBooth driver; the original "
        "suggests 1.0-1.6 for vp)",
    )
    sweep.add_argument(
        "--alphas",
        metavar="LIST",
        help="vp only: α values, comma-separated, each in [0, 3] (default: 0.8,0.9,1.1; "
        "dreambooth: 0.8,0.9)",
    )
    sweep.add_argument(
        "--forget",
        metavar="LIST",
        help="forgetting strategies to sweep, comma-separated (default: encoderattn for "
        "two_stage, donotforget otherwise); see below",
    )
    sweep.add_argument(
        "--forget-degree",
        metavar="D",
        default="0",
        help="d in θ = d·θ_ft + (1−d)·θ_pre for reverted tensors, in [0, 1] (default: 0)",
    )
    sweep.add_argument(
        "--seeds",
        metavar="LIST",
        help="sampling seeds, comma-separated, each in [0, 2^63-1] (default: one random seed, "
        "reported)",
    )
    sweep.add_argument("--steps", metavar="N", default="50", help="DDIM steps (default: 50)")
    sweep.add_argument(
        "--guidance", metavar="S", default="7.5", help="classifier-free guidance (default: 7.5)"
    )
    sweep.add_argument(
        "--size",
        metavar="WxH",
        help="WIDTHxHEIGHT, multiples of 8, e.g. 512x512 (default: the base model's native "
        "size, 512x512 for SD 1.x, 64x64 for the tiny model); the image is squashed to it",
    )

    run = edit.add_argument_group("run")
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="faithful: the original's numerics in fp32; fast: mixed precision "
        "(default: faithful on cpu, fast on cuda)",
    )
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    run.add_argument(
        "--max-batch",
        metavar="N",
        default="8",
        help=f"images per denoising batch, 1..{MAX_BATCH} (default: 8)",
    )
    run.add_argument(
        "--out", metavar="DIR", default="out", help="output directory, new or empty (default: out)"
    )
    run.add_argument(
        "--unet-backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="which UNet samples: auto = TensorRT on CUDA where it imports and its canary "
        "passes, else ONNX Runtime where installed, else torch; fallbacks are reported "
        "(default: auto)",
    )
    run.add_argument(
        "--engine-cache",
        metavar="DIR",
        help="where ONNX exports and TensorRT plans are cached (default: "
        "$FORGEDIT_HOME/engines, else ~/.cache/forgedit/engines)",
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


# --------------------------------------------------------------------------------------------
# Validation: everything that can be checked without loading a model


@dataclass
class EditPlan:
    """A fully validated ``edit`` invocation. Paths keep the spelling the user typed."""

    image_arg: str
    image: LoadedImage
    prompts: tuple[str, ...]
    source_prompt: str | None
    base_model: Path | None  # None: the tiny model
    vae: Path | None
    blip: Path | None
    load_model: Path | None
    save_model: Path | None
    config: TrainingConfig  # height/width provisional when size_given is False
    size_given: bool
    sweep: SweepConfig
    device: str
    precision: str
    max_batch: int
    unet_backend: str
    engine_cache: Path
    out: Path
    json: bool
    train_seed_from: str  # "content", "random", "given" or "edit model" (--load-model)
    random_seeds: bool


def validate_edit(args: argparse.Namespace) -> EditPlan:
    """Check every argument of ``edit``; raise ``ForgeditError`` naming the first problem.

    Loads no model. Reads at most the image (under ``ImageLimits``) and, with --load-model,
    the edit model's manifest.
    """
    prompts = tuple(args.prompt)
    for p in prompts:
        check_prompt(p, "--prompt")
    if args.source_prompt is not None:
        check_prompt(args.source_prompt, "--source-prompt")

    base_model = _existing_dir(args.base_model, "--base-model")
    vae = _existing_dir(args.vae, "--vae")
    blip = _existing_dir(args.blip, "--blip")
    load_model = _existing_dir(args.load_model, "--load-model")
    if vae is not None and base_model is None:
        raise InvalidInputError(
            "--vae needs --base-model (the tiny model has its own VAE)", field="vae"
        )
    _check_model_directories(args, base_model, vae, blip)

    size = _parse_size(args.size) if args.size is not None else None
    device = _check_device(args.device)
    precision = args.precision or ("fast" if device.startswith("cuda") else "faithful")

    manifest: dict[str, Any] | None = None
    if load_model is not None:
        manifest = _check_load_model(args, load_model, size)
        try:
            config = TrainingConfig.from_dict(manifest["training"])
        except (TypeError, ValueError, KeyError) as e:
            raise EditModelError(
                f"edit model manifest has a malformed training config: {e}"
            ) from None
        train_seed_from = "edit model"
    else:
        if base_model is not None and blip is None and args.source_prompt is None:
            raise InvalidInputError(
                "with --base-model, pass --blip DIR (a BLIP captioning model) or --source-prompt "
                "TEXT describing the image; the source prompt cannot be guessed",
                field="blip",
            )
        mode = args.mode or "joint"
        train_seed_from = _train_seed_from(args.train_seed)
        # A content seed is known only once the base model and source prompt are (after
        # loading and captioning): 0 stands in until then (``_edit_model``).
        if train_seed_from == "given":
            train_seed = _parse_int(args.train_seed, "--train-seed")
        else:
            train_seed = _random_seed() if train_seed_from == "random" else 0
        width, height = size or (512, 512)  # provisional: the native size is known after load
        config = TrainingConfig.for_mode(
            cast(TrainingMode, mode),
            height=height,
            width=width,
            seed=train_seed,
            precision=precision,
            delta_format=args.delta_format,
        )
        config = _override_stages(config, args.updates, args.batch_size)
        if args.save_model is not None:
            _check_new_model_dir(args.save_model)

    interpolation = args.interpolation
    if args.alphas is not None and interpolation != "vp":
        raise InvalidInputError(
            "--alphas applies only to --interpolation vp (vs ignores α)", field="alphas"
        )
    variant = variant_for_mode(config.mode)
    random_seeds = args.seeds is None
    sweep_kwargs: dict[str, Any] = {
        "prompts": prompts,
        "interpolation": interpolation,
        "forget_degree": _parse_float(args.forget_degree, "--forget-degree"),
        "seeds": (_random_seed(),)
        if random_seeds
        else tuple(_parse_list(args.seeds, "--seeds", int)),
        "steps": _parse_int(args.steps, "--steps"),
        "guidance": _parse_float(args.guidance, "--guidance"),
    }
    if args.forget is not None:
        forget = _parse_list(args.forget, "--forget", str)
        for name in forget:
            check_strategy(name, variant)
        sweep_kwargs["forget"] = tuple(forget)
    if args.gammas is not None:
        sweep_kwargs["gammas"] = tuple(_parse_list(args.gammas, "--gammas", float))
    if args.alphas is not None:
        sweep_kwargs["alphas"] = tuple(_parse_list(args.alphas, "--alphas", float))
    sweep = SweepConfig.for_mode(config.mode, **sweep_kwargs)

    max_batch = _parse_int(args.max_batch, "--max-batch")
    if not 1 <= max_batch <= MAX_BATCH:
        raise InvalidInputError(
            f"--max-batch must be 1..{MAX_BATCH}, got {max_batch}", field="max_batch"
        )
    out = _check_out_dir(args.out)
    if args.save_model is not None:
        save, out_abs = Path(args.save_model).absolute(), out.absolute()
        if save == out_abs or save in out_abs.parents:
            raise InvalidInputError(
                f"--save-model {args.save_model!r} must not be --out or contain it; the edit "
                "model is a directory of its own (it may be inside --out)",
                field="save_model",
            )
    image = load_image(args.image)
    if manifest is not None and manifest.get("image_sha256") not in ("", None, image.sha256):
        print(
            f"warning: {args.image!r} is not the image this edit model was trained on; it is "
            "used only as the contact sheet's input tile",
            file=sys.stderr,
        )
    return EditPlan(
        image_arg=args.image,
        image=image,
        prompts=prompts,
        source_prompt=args.source_prompt,
        base_model=base_model,
        vae=vae,
        blip=blip,
        load_model=load_model,
        save_model=Path(args.save_model) if args.save_model is not None else None,
        config=config,
        size_given=size is not None or load_model is not None,
        sweep=sweep,
        device=device,
        precision=precision,
        max_batch=max_batch,
        unet_backend=args.unet_backend,
        engine_cache=(
            Path(args.engine_cache) if args.engine_cache is not None else default_engine_cache()
        ),
        out=out,
        json=args.json,
        train_seed_from=train_seed_from,
        random_seeds=random_seeds,
    )


def _check_model_directories(
    args: argparse.Namespace, base_model: Path | None, vae: Path | None, blip: Path | None
) -> None:
    """The directories' layout (files present, right kind of model), without reading weights."""
    if base_model is not None:
        from forgedit.models import check_base_model_directory

        check_base_model_directory(args.base_model, vae_directory=args.vae)
    if blip is not None:
        from forgedit.caption import check_blip_directory

        check_blip_directory(blip, args.blip)


def _check_load_model(
    args: argparse.Namespace, directory: Path, size: tuple[int, int] | None
) -> dict[str, Any]:
    from forgedit.artifact import read_manifest

    for flag, value in (
        ("--save-model", args.save_model),
        ("--train-seed", args.train_seed),
        ("--updates", args.updates),
        ("--batch-size", args.batch_size),
        ("--delta-format", args.delta_format),
        ("--source-prompt", args.source_prompt),
    ):
        if value is not None:
            raise InvalidInputError(
                f"{flag} is used only for training, but --load-model skips training; drop one "
                "of them",
                field=flag.lstrip("-").replace("-", "_"),
            )
    manifest = read_manifest(directory)
    try:
        training = manifest["training"]
        mode, height, width = training["mode"], training["height"], training["width"]
    except (KeyError, TypeError):
        raise EditModelError("edit model manifest has no training config") from None
    if args.mode is not None and args.mode != mode:
        raise InvalidInputError(
            f"--mode {args.mode} differs from the edit model's training mode {mode}; omit --mode "
            "with --load-model",
            field="mode",
        )
    if size is not None and size != (width, height):
        raise InvalidInputError(
            f"--size {size[0]}x{size[1]} differs from the edit model's resolution "
            f"{width}x{height}; an edit model samples at the size it was trained at",
            field="size",
        )
    return manifest


def _override_stages(
    config: TrainingConfig, updates: str | None, batch_size: str | None
) -> TrainingConfig:
    """Apply --updates / --batch-size with ``override_stages``: the i-th value is stage i's,
    so one value replaces the first stage's (two_stage has two)."""
    stages = config.stages
    parsed: dict[str, list[int | None]] = {}
    for flag, text in (("--updates", updates), ("--batch-size", batch_size)):
        values = _parse_list(text, flag, int) if text is not None else []
        if len(values) > len(stages):
            raise InvalidInputError(
                f"{flag} takes one value (for the first stage) or one per stage "
                f"({len(stages)}: {', '.join(s.name for s in stages)}), got {len(values)}",
                field=flag.lstrip("-").replace("-", "_"),
            )
        parsed[flag] = list(values)
    return override_stages(config, updates=parsed["--updates"], batch_sizes=parsed["--batch-size"])


_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def _parse_size(text: str) -> tuple[int, int]:
    """'512x512' → (width, height); the sides are checked by ``check_resolution`` later."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidInputError(
            f"--size must be WIDTHxHEIGHT, e.g. 512x512 or 768x512, got {text!r}", field="size"
        )
    width, height = int(m.group(1)), int(m.group(2))
    from forgedit.config import check_resolution

    check_resolution(height, width)
    return width, height


def _parse_list(text: str, flag: str, kind: Callable[[str], T]) -> list[T]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise InvalidInputError(
            f"{flag} must be a comma-separated list without empty items, got {text!r}",
            field=flag.lstrip("-").replace("-", "_"),
        )
    return [_convert(s, flag, kind) for s in items]


def _parse_int(text: str, flag: str) -> int:
    return _convert(text.strip(), flag, int)


def _parse_float(text: str, flag: str) -> float:
    value = _convert(text.strip(), flag, float)
    if not math.isfinite(value):
        raise InvalidInputError(
            f"{flag} must be a finite number, got {text!r}",
            field=flag.lstrip("-").replace("-", "_"),
        )
    return value


def _convert(text: str, flag: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(text)
    except ValueError:
        what = "whole numbers" if kind is int else "numbers" if kind is float else "values"
        raise InvalidInputError(
            f"{flag} takes {what}, got {text!r}", field=flag.lstrip("-").replace("-", "_")
        ) from None


def _train_seed_from(value: str | None) -> str:
    """Where --train-seed comes from: unset → derived from the content, 'random' → a fresh
    random fine-tune, a number → given."""
    if value is None:
        return "content"
    return "random" if value.strip().lower() == "random" else "given"


def _random_seed() -> int:
    return secrets.randbelow(_RANDOM_SEED_BOUND)


def _existing_dir(value: str | None, flag: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise ModelDirectoryError(f"{flag} {value!r} does not exist")
    if not path.is_dir():
        raise ModelDirectoryError(f"{flag} {value!r} is not a directory")
    return path


def _check_new_model_dir(value: str) -> None:
    path = Path(value)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidInputError(
            f"--save-model {value!r} already exists and is not an empty directory; choose a new "
            "directory",
            field="save_model",
        )
    _check_creatable(path, "--save-model", value)


def _check_out_dir(value: str) -> Path:
    """--out must be a new directory or an empty one, and writable."""
    path = Path(value)
    if path.exists():
        if not path.is_dir():
            raise InvalidInputError(f"--out {value!r} is not a directory", field="out")
        if any(path.iterdir()):
            raise InvalidInputError(
                f"--out {value!r} is not empty; choose a new or empty directory so results of "
                "different runs do not mix",
                field="out",
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise InvalidInputError(f"--out {value!r} is not writable", field="out")
    else:
        _check_creatable(path, "--out", value)
    return path


def _check_creatable(path: Path, flag: str, value: str) -> None:
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"{flag} {value!r} cannot be created (no write permission)",
            field=flag.lstrip("-").replace("-", "_"),
        )


def _check_device(value: str | None) -> str:
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InvalidInputError(
            f"unknown device {value!r}; accepted: cpu, cuda, cuda:N", field="device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"--device {value} requested but no CUDA device is available; use --device cpu",
            field="device",
        )
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(
            f"unsupported device {value!r}; accepted: cpu, cuda, cuda:N", field="device"
        )
    return str(device)


# --------------------------------------------------------------------------------------------
# Output: staged, then moved into place


class StagedOutput:
    """Files of one run, written into a hidden staging directory inside ``out`` and moved
    into ``out`` by ``commit``. ``abort`` removes everything this run wrote, including ``out``
    itself (and parents) if this run created them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._created = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".forgedit-", suffix=".partial", dir=out))
        self._moved: list[Path] = []

    def write(self, name: str, data: bytes) -> None:
        with open(self.staging / name, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        for item in sorted(self.staging.iterdir()):
            target = self.out / item.name
            os.replace(item, target)
            self._moved.append(target)
        self.staging.rmdir()
        fsync_dir(self.out)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for target in self._moved:
            target.unlink(missing_ok=True)
        for directory in self._created:  # innermost first
            try:
                directory.rmdir()
            except OSError:
                break


def image_file_name(
    index: int,
    forget: str,
    interpolation: str,
    gamma: float,
    alpha: float,
    seed: int,
    prompt_slug: str | None = None,
) -> str:
    """``{index:03d}[_{prompt}]_{forget}_{interp}_g{gamma}[_a{alpha}]_s{seed}.png``: safe on
    every file system, sortable, and every number printed as typed (0.6, not 0.6000000001).
    α appears only for vp (vs ignores it)."""
    parts = [f"{index:03d}"]
    if prompt_slug:
        parts.append(prompt_slug)
    parts += [_safe(forget), interpolation, f"g{gamma:g}"]
    if interpolation == "vp":
        parts.append(f"a{alpha:g}")
    parts.append(f"s{seed}")
    return "_".join(parts) + ".png"


def slug(text: str, max_chars: int = 32) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_chars``: 'A photo of a dog.' →
    'a-photo-of-a-dog'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:max_chars].strip("-")
    return out or "prompt"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", name)


def sheet_label(spec: Any, with_prompt: bool) -> str:
    if spec.interpolation == "vp":
        label = f"{spec.forget} β={spec.gamma:g} α={spec.alpha:g} seed={spec.seed}"
    else:
        label = f"{spec.forget} γ={spec.gamma:g} seed={spec.seed}"
    return f"{slug(spec.prompt, 24)} {label}" if with_prompt else label


# --------------------------------------------------------------------------------------------
# Progress bars (stderr)


class _Progress:
    """tqdm bars for training (per update, with the loss) and sampling (per denoising step
    of every image in the running batch)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._train: Any = None
        self._sample: Any = None

    def training(self, p: TrainingProgress) -> None:
        from tqdm import tqdm

        if self._train is None:
            self._train = tqdm(
                total=p.total, desc="training", unit="update", file=self.stream, dynamic_ncols=True
            )
        self._train.set_description(f"training ({p.stage})")
        self._train.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
        self._train.update(p.update - self._train.n)

    def sampling(self, p: SamplingProgress) -> None:
        from tqdm import tqdm

        total = p.images_total * p.steps
        if self._sample is None:
            self._sample = tqdm(
                total=total, desc="sampling", unit="step", file=self.stream, dynamic_ncols=True
            )
        self._sample.set_description(f"sampling {p.forget}")
        self._sample.set_postfix(images=f"{p.images_done}/{p.images_total}", refresh=False)
        self._sample.update(p.images_done * p.steps + p.batch_images * p.step - self._sample.n)

    def image_done(self, done: int, total: int) -> None:
        if self._sample is not None:
            self._sample.set_postfix(images=f"{done}/{total}")

    def close(self) -> None:
        for bar in (self._train, self._sample):
            if bar is not None:
                bar.close()
        self._train = self._sample = None


# --------------------------------------------------------------------------------------------
# The edit command


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)


def run_edit(plan: EditPlan, cancel: CancelToken, stderr: TextIO) -> dict[str, Any]:
    """Load the models, get the source prompt, fine-tune (or load the edit model), sample the
    sweep and write the results. Returns the summary. Raises ``ForgeditError`` on bad input,
    ``CancelledError`` when ``cancel`` fires; on any failure --out is left as it was."""
    timer = _Timer()
    started = time.perf_counter()
    progress = _Progress(stderr)
    output = StagedOutput(plan.out)
    try:
        with timer.phase("load_models"):
            engine, base_dir_label = _load_engine(plan)
        cancel.check()

        edit_model, edit_model_dir = _edit_model(plan, engine, timer, progress, cancel)

        config = edit_model.training
        files: list[dict[str, Any]] = []
        results: list[tuple[Image.Image, str]] = []
        with_prompt = len(plan.prompts) > 1

        def on_image(edited: EditedImage) -> None:
            spec = edited.spec
            name = image_file_name(
                spec.index,
                spec.forget,
                spec.interpolation,
                spec.gamma,
                spec.alpha,
                spec.seed,
                slug(spec.prompt) if with_prompt else None,
            )
            output.write(name, encode_png(edited.image))
            files.append({"path": _display_path(plan.out, name), **spec.to_dict()})
            if len(results) < CONTACT_SHEET_MAX_IMAGES:
                results.append((edited.image, sheet_label(spec, with_prompt)))
            progress.image_done(len(files), plan.sweep.num_images)

        with timer.phase("sample"):
            engine.edit(
                edit_model,
                plan.sweep,
                on_image=on_image,
                on_progress=progress.sampling,
                cancel=cancel,
                max_batch=plan.max_batch,
            )
        progress.close()
        cancel.check()

        with timer.phase("contact_sheet"):
            sheet = contact_sheet(plan.image.image, results)
            output.write(CONTACT_SHEET, encode_png(sheet))
        timer.timings["total"] = round(time.perf_counter() - started, 4)
        summary = {
            "images": sorted(files, key=lambda f: f["index"]),
            "contact_sheet": _display_path(plan.out, CONTACT_SHEET),
            "contact_sheet_images": len(results),
            "summary": _display_path(plan.out, SUMMARY),
            "edit_model": edit_model_dir,
            "source_prompt": edit_model.source_prompt,
            "train_seed": config.seed,
            "seeds": list(plan.sweep.seeds),
            "random_seeds": plan.random_seeds,
            "random_train_seed": plan.train_seed_from == "random",
            "train_seed_from": plan.train_seed_from,
            "base_model": {
                "path": base_dir_label,
                "name": engine.base.name,
                "fingerprint": engine.base.fingerprint,
            },
            "image": {
                "path": plan.image_arg,
                "sha256": plan.image.sha256,
                "format": plan.image.format,
                "width": plan.image.width,
                "height": plan.image.height,
            },
            "size": {"width": config.width, "height": config.height},
            "device": plan.device,
            "precision": plan.precision,
            "unet_backend": {
                "requested": plan.unet_backend,
                "sampled_with": engine.sampling_backend,
                "fallbacks": [
                    {"backend": f.backend, "reason": f.reason, "message": f.message}
                    for f in engine.backends.fallbacks
                ],
            },
            "training": config.to_dict(),
            "loss_curve": [float(x) for x in edit_model.loss_curve],
            "sweep": plan.sweep.to_dict(),
            "timings": timer.timings,
        }
        output.write(SUMMARY, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
        output.commit()
        return summary
    except BaseException:
        progress.close()
        output.abort()
        raise


def _load_engine(plan: EditPlan) -> tuple[Engine, str]:
    """The engine on the requested (or tiny) base model, with a captioner only if needed."""
    from forgedit.engine import Engine

    blip_dir: Path | None
    if plan.base_model is None:
        from forgedit.tiny import BLIP_SUBDIR, SD_SUBDIR, ensure_tiny_model

        root = ensure_tiny_model()
        base_dir, label = root / SD_SUBDIR, "tiny"
        blip_dir = plan.blip or root / BLIP_SUBDIR
    else:
        base_dir, label = plan.base_model, os.fspath(plan.base_model)
        blip_dir = plan.blip
    needs_caption = plan.source_prompt is None and plan.load_model is None
    engine = Engine.load(
        base_dir,
        blip_dir=blip_dir if needs_caption else None,
        vae_dir=plan.vae,
        device=plan.device,
        precision=cast(Precision, plan.precision),
        unet_backend=plan.unet_backend,
        cache_dir=plan.engine_cache,
        max_batch=plan.max_batch,
        on_backend_fallback=_warn_fallback,
    )
    return engine, label


def _warn_fallback(fallback: Fallback) -> None:
    print(
        f"warning: UNet backend {fallback.backend} unavailable ({fallback.reason}): "
        f"{_one_line(fallback.message)}",
        file=sys.stderr,
    )


def default_engine_cache() -> Path:
    """``$FORGEDIT_HOME/engines`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/forgedit/engines``
    (the tiny model's convention, with cache rather than data)."""
    home = os.environ.get("FORGEDIT_HOME")
    if home:
        return Path(home) / "engines"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "forgedit" / "engines"


def _edit_model(
    plan: EditPlan, engine: Engine, timer: _Timer, progress: _Progress, cancel: CancelToken
) -> tuple[EditModel, str | None]:
    """Load the edit model given by --load-model, or caption, fine-tune and maybe save one."""
    from forgedit.artifact import load_edit_model

    if plan.load_model is not None:
        with timer.phase("load_edit_model"):
            model = load_edit_model(
                plan.load_model, expected_base_fingerprint=engine.base.fingerprint
            )
        return model, os.fspath(plan.load_model)

    config = plan.config
    if not plan.size_given:  # the base model's native resolution
        config = dataclasses.replace(
            config, height=engine.base.native_height, width=engine.base.native_width
        )
    with timer.phase("caption"):
        source_prompt = plan.source_prompt or engine.source_prompt(
            plan.image.image, plan.prompts[0]
        )
    if plan.train_seed_from == "content":
        seed = content_seed(plan.image.sha256, engine.base.fingerprint, source_prompt, config)
        config = dataclasses.replace(config, seed=seed)
    cancel.check()
    with timer.phase("train"):
        model = engine.finetune(
            plan.image.image,
            source_prompt,
            config,
            image_sha256=plan.image.sha256,
            on_progress=progress.training,
            cancel=cancel,
        )
    progress.close()
    cancel.check()
    if plan.save_model is None:
        return model, None
    with timer.phase("save_model"):
        model.save(plan.save_model)
    return model, os.fspath(plan.save_model)


def _display_path(out: Path, name: str) -> str:
    return os.fspath(out / name)


def _print_human(summary: dict[str, Any], stream: TextIO) -> None:
    print(f"source prompt: {summary['source_prompt']}", file=stream)
    print(
        f"train seed: {summary['train_seed']}   sampling seeds: "
        f"{','.join(map(str, summary['seeds']))}",
        file=stream,
    )
    for image in summary["images"]:
        print(image["path"], file=stream)
    print(f"contact sheet: {summary['contact_sheet']}", file=stream)
    print(f"summary: {summary['summary']}", file=stream)
    if summary["edit_model"]:
        print(f"edit model: {summary['edit_model']}", file=stream)
    timings = "  ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items())
    print(f"timings: {timings}", file=stream)


# --------------------------------------------------------------------------------------------
# The other commands


def run_strategies(args: argparse.Namespace, stdout: TextIO) -> None:
    from forgedit.forgetting import strategy_counts

    unet: Any = None
    if args.base_model is not None:
        from forgedit.models import load_base_model

        _existing_dir(args.base_model, "--base-model")
        unet = load_base_model(args.base_model, device=_check_device(args.device)).unet
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
    device = _check_device(args.device)
    if not device.startswith("cuda"):
        raise InvalidInputError(
            f"build-engine needs a CUDA device, got {args.device!r}", field="device"
        )
    max_batch = _parse_int(args.max_batch, "--max-batch")
    if not 1 <= max_batch <= MAX_BATCH:
        raise InvalidInputError(f"--max-batch must be 1..{MAX_BATCH}, got {max_batch}")
    base_dir = _existing_dir(args.base_model, "--base-model")
    assert base_dir is not None
    from forgedit.engine import Engine

    engine = Engine.load(
        base_dir,
        device=device,
        unet_backend="tensorrt",
        cache_dir=Path(args.engine_cache) if args.engine_cache else default_engine_cache(),
        max_batch=max_batch,
        on_backend_fallback=_warn_fallback,
    )
    base = engine.base
    width, height = _parse_size(args.size) if args.size else (base.native_width, base.native_height)
    shape = engine.sampling_shape(height, width, max_batch)
    engine.unet_predictor(height, width, max_batch)  # build or load, then the canary
    if engine.sampling_backend != "tensorrt":
        raise ForgeditError("the TensorRT engine failed its canary; see the warning above")
    print(
        f"TensorRT engine ready for {base.name} at {width}x{height} ({shape.describe()})",
        file=stdout,
    )


def run_make_tiny_model(args: argparse.Namespace, stdout: TextIO) -> None:
    from forgedit.tiny import make_tiny_model

    path = Path(args.directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidInputError(
            f"{args.directory!r} already exists and is not an empty directory; choose a new one",
            field="directory",
        )
    make_tiny_model(path)
    print(f"wrote the tiny model to {args.directory} (stable-diffusion/, blip/)", file=stdout)


# --------------------------------------------------------------------------------------------
# Entry point


def _quiet_libraries() -> None:
    """Keep stderr for our own progress bars: no per-file loading bars or backend notices
    from diffusers and transformers (errors still show)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


@contextlib.contextmanager
def _sigint_cancels(cancel: CancelToken) -> Iterator[None]:
    """First Ctrl-C: cancel at the next step. Second: KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel("interrupted")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None, *, cancel: CancelToken | None = None) -> int:
    """Run one command; return the exit status (0 ok, 2 bad input, 130 interrupted, 1 failed).

    ``cancel`` lets a caller (or a test) cancel a running ``edit`` as Ctrl-C would.
    """
    stdout, stderr = sys.stdout, sys.stderr
    cancel = cancel or CancelToken()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "edit":
            plan = validate_edit(args)
            _quiet_libraries()
            with _sigint_cancels(cancel):
                summary = run_edit(plan, cancel, stderr)
            if plan.json:
                print(json.dumps(summary, indent=2, ensure_ascii=False), file=stdout)
            else:
                _print_human(summary, stdout)
        elif args.command == "strategies":
            _quiet_libraries()
            run_strategies(args, stdout)
        elif args.command == "make-tiny-model":
            _quiet_libraries()
            run_make_tiny_model(args, stdout)
        elif args.command == "build-engine":
            run_build_engine(args, stdout)
        return EXIT_OK
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int | None) else EXIT_USAGE
    except (CancelledError, KeyboardInterrupt):
        print("error: interrupted; nothing was written to the output directory", file=stderr)
        return EXIT_INTERRUPTED
    except (ForgeditError, _UsageError) as e:
        print(f"error: {_one_line(str(e))}", file=stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, permissions changed mid-run, ...: no paths in the message
        print(
            f"error: {e.strerror or type(e).__name__}; nothing was written to the output directory",
            file=stderr,
        )
        return EXIT_FAILURE


def _one_line(text: str) -> str:
    return " ".join(text.split())
