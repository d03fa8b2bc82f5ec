"""The command line's grammar: subcommands, flags and their help (``build_parser``), and
which flag sets which request option (``FLAGS``, ``in_flags``).

Parsing only splits and names the arguments; ``forgedit.cli.arguments`` reads them into the
engine's options, and ``forgedit.requests`` judges those.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from typing import NoReturn

from forgedit.backends.names import BACKEND_CHOICES
from forgedit.config import (
    DEFAULT_QUALITY,
    DELTA_FORMATS,
    IMAGE_FORMATS,
    INTERPOLATIONS,
    MAX_BATCH,
    PRECISIONS,
    TRAINING_MODES,
)
from forgedit.forgetting import STRATEGIES

PROG = "python -m forgedit"

# The request options (``forgedit.options``, named by their path, as the builder's errors name
# them) and the ``edit`` flag that sets each. The one place the two spellings meet.
FLAGS = {
    "target_prompts": "--prompt",
    "source_prompt": "--source-prompt",
    "training.mode": "--mode",
    "training.seed": "--train-seed",
    "training.fresh_seed": "--train-seed random",
    "training.width": "--size",
    "training.height": "--size",
    "training.precision": "--precision",
    "training.updates": "--updates",
    "training.stage2_updates": "--updates",
    "training.batch_size": "--batch-size",
    "training.stage2_batch_size": "--batch-size",
    "training.delta_format": "--delta-format",
    "sweep.interpolation": "--interpolation",
    "sweep.gammas": "--gammas",
    "sweep.alphas": "--alphas",
    "sweep.forget_strategies": "--forget",
    "sweep.forget_degree": "--forget-degree",
    "sweep.seeds": "--seeds",
    "sweep.steps": "--steps",
    "sweep.guidance": "--guidance",
    "output.format": "--image-format",
    "output.quality": "--image-quality",
}
# Options with no flag: the CLI keeps their defaults (VAE seed 0; one random sampling seed),
# and it makes no previews: it writes its results only when the whole sweep is done.
UNFLAGGED = frozenset(
    {"training.vae_seed", "sweep.seed_count", "preview.training_free", "preview.x0_every"}
)
_OPTION = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, FLAGS)) + r")(?!\w|\.\w)")


def in_flags(message: str) -> str:
    """An error message of the request builder with every option path spelled as its flag:
    "sweep.alphas applies only to sweep.interpolation vp" → "--alphas applies only to
    --interpolation vp"."""
    return _OPTION.sub(lambda m: FLAGS[m.group(1)], message)


class UsageError(Exception):
    """argparse's complaint, reported like every other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print usage and sys.exit(2)
        raise UsageError(f"{message} (see '{self.prog} --help')")


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


def _add_edit(sub: argparse._SubParsersAction[_Parser]) -> None:
    vanilla = ", ".join(STRATEGIES["vanilla"])
    dreambooth = ", ".join(STRATEGIES["dreambooth"])
    edit = sub.add_parser(
        "edit",
        help="edit an image: caption, fine-tune, sweep",
        description=(
            "Fine-tune an edit model on IMAGE and sample a sweep of edits toward --prompt:\n"
            "every combination of --forget × --seeds × --gammas (× --alphas for vp).\n"
            "Writes one PNG per edit (or WebP/JPEG: --image-format), contact_sheet.png and\n"
            "summary.json into --out."
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
        "--image-format",
        choices=IMAGE_FORMATS,
        help="how the edits and the contact sheet are encoded: png (lossless, default), webp or "
        "jpeg (lossy, at --image-quality)",
    )
    run.add_argument(
        "--image-quality",
        metavar="N",
        help=f"webp/jpeg quality 1..100 (default: {DEFAULT_QUALITY}); not with png",
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
