"""The ``forgedit`` command line's arguments.

Sweep and training flags mirror the engine's own command line (``python -m forgedit edit``):
lists are comma-separated (``--gammas 0.5,0.6 --forget encoderkv,noencoder``), sizes are
``WIDTHxHEIGHT``. Values are parsed here into Python types; ranges are the server's to check
(it answers INVALID_ARGUMENT naming the field).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TypeVar

from forgedit_client.channel import LOAD_BALANCING_POLICIES
from forgedit_client.client import DEFAULT_TARGET
from forgedit_client.events import (
    DELTA_FORMATS,
    IMAGE_FORMATS,
    INTERPOLATIONS,
    PRECISIONS,
    TRAINING_MODES,
)

PROG = "forgedit"
T = TypeVar("T")


def parse_list(kind: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse type: ``"0.5,0.6"`` → ``[0.5, 0.6]`` with a message naming ``what``."""

    def parse(text: str) -> list[T]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: give at least one value")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what}: expected comma-separated {kind.__name__} values, got {text!r}"
            ) from None

    return parse


def per_stage(what: str) -> Callable[[str], list[int]]:
    """An argparse type: one value (the first stage's) or one per stage, at most two, as the
    engine CLI's --updates/--batch-size."""
    parse_values = parse_list(non_negative_int, what)

    def parse(text: str) -> list[int]:
        values = parse_values(text)
        if len(values) > 2:
            raise argparse.ArgumentTypeError(
                f"{what}: one value (the first stage's) or one per stage (at most 2), got "
                f"{len(values)}"
            )
        return values

    return parse


def train_seed(text: str) -> int | str:
    """An argparse type: a seed, or 'random' for a fresh fine-tune."""
    if text.strip().lower() == "random":
        return "random"
    return non_negative_int(text)


def parse_size(text: str) -> tuple[int, int]:
    """``"512x384"`` → ``(512, 384)`` (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 512x512, got {text!r}")
    return int(parts[0]), int(parts[1])


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks. Deliberately not ArgumentDefaultsHelpFormatter: it would
    print the value of FORGEDIT_TOKEN in --help."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Edit images with Forgedit through a forgedit-server: fine-tune an edit "
        "model on one photo, stream its progress, save every edited image, and re-sample "
        "stored edit models by ID.",
        epilog=(
            "exit status: 0 success, 2 invalid input (INVALID_ARGUMENT or a bad flag), "
            "130 interrupted (the job is cancelled unless --detach), 1 any other error.\n\n"
            "examples:\n"
            f"  {PROG} edit cat.jpg 'A photo of a cat wearing a hat' --out out/\n"
            f"  {PROG} edit dog.jpg 'A sitting dog' --gammas 0.5,0.6 --forget encoderkv "
            "--seeds 1,2 --out out/\n"
            f"  {PROG} sample EDIT_MODEL_ID 'A jumping dog' --out out2/\n"
            f"  {PROG} edit cat.jpg 'A cat wearing a hat' --image-format webp --x0-every 10 "
            "--out out3/\n"
            f"  {PROG} --json models list --image-sha256 HEX"
        ),
        formatter_class=_Formatter,
    )
    add_connection_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_edit(commands)
    _add_sample(commands)
    _add_models(commands)
    _add_jobs(commands)
    return parser


def add_connection_flags(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """The global flags. Added to the main parser with real defaults and to every command
    with ``suppress=True`` (no default), so they work before or after the command name."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    conn = parser.add_argument_group("connection")
    conn.add_argument(
        "--server",
        default=default(os.environ.get("FORGEDIT_SERVER", DEFAULT_TARGET)),
        help="host:port of the service (env FORGEDIT_SERVER; default localhost:50051)",
    )
    conn.add_argument(
        "--load-balancing",
        choices=LOAD_BALANCING_POLICIES,
        default=default(os.environ.get("FORGEDIT_LOAD_BALANCING") or None),
        help="over several replicas (a dns:/// or ipv4:a,b target): round_robin, or affinity "
        "(Sample lands where its edit model is hot) (env FORGEDIT_LOAD_BALANCING; "
        "default pick_first)",
    )
    conn.add_argument(
        "--token",
        default=default(os.environ.get("FORGEDIT_TOKEN")),
        help="bearer token (env FORGEDIT_TOKEN; prefer the variable: flags show in `ps`)",
    )
    conn.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="use TLS (system roots unless --ca)",
    )
    conn.add_argument(
        "--ca", default=default(None), metavar="PEM", help="CA to trust (implies --tls)"
    )
    conn.add_argument("--cert", default=default(None), metavar="PEM", help="client cert (mTLS)")
    conn.add_argument("--key", default=default(None), metavar="PEM", help="client key (mTLS)")
    conn.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable JSON on stdout (progress and messages stay on stderr)",
    )
    conn.add_argument(
        "--quiet", action="store_true", default=default(False), help="no progress display"
    )


def _add_sweep_flags(p: argparse.ArgumentParser) -> None:
    sweep = p.add_argument_group("sweep")
    sweep.add_argument(
        "--interpolation",
        choices=sorted(INTERPOLATIONS),
        help="vs: e = γ·e_tgt + (1−γ)·e_opt; vp: e = β·(e_tgt ⊥ e_opt) + α·e_opt "
        "(server default: vs)",
    )
    sweep.add_argument(
        "--gammas",
        type=parse_list(float, "--gammas"),
        metavar="LIST",
        help="γ for vs, β for vp, comma-separated (server default: 0.5,0.6,0.7)",
    )
    sweep.add_argument(
        "--alphas",
        type=parse_list(float, "--alphas"),
        metavar="LIST",
        help="vp only: α values, comma-separated (server default: 0.8,0.9,1.1)",
    )
    sweep.add_argument(
        "--forget",
        type=parse_list(str, "--forget"),
        metavar="LIST",
        help="forgetting strategies, comma-separated, e.g. encoderkv,decoderattn+decoder2 "
        "(server default: donotforget)",
    )
    sweep.add_argument(
        "--forget-degree",
        type=float,
        metavar="D",
        help="d in θ = d·θ_ft + (1−d)·θ_pre for reverted tensors, in [0, 1] (default: 0)",
    )
    sweep.add_argument(
        "--seeds",
        type=parse_list(non_negative_int, "--seeds"),
        metavar="LIST",
        help="sampling seeds, comma-separated (default: random, reported per image)",
    )
    sweep.add_argument(
        "--seed-count", type=non_negative_int, metavar="N", help="random seeds when no --seeds"
    )
    sweep.add_argument("--steps", type=non_negative_int, metavar="N", help="DDIM steps (50)")
    sweep.add_argument("--guidance", type=float, metavar="S", help="CFG scale (default: 7.5)")


def _add_output_flags(p: argparse.ArgumentParser, *, edit: bool) -> None:
    output = p.add_argument_group("images and previews")
    output.add_argument(
        "--image-format",
        choices=sorted(IMAGE_FORMATS),
        help="how the server encodes the images (and previews): png (lossless, default), "
        "webp or jpeg (lossy, at --image-quality); files get the matching suffix",
    )
    output.add_argument(
        "--image-quality",
        type=non_negative_int,
        metavar="N",
        help="webp/jpeg quality 1..100 (server default: 90); refused with png",
    )
    if edit:
        output.add_argument(
            "--no-preview",
            action="store_true",
            help="skip the training-free preview: by default the server first shows the base "
            "model's take on the edit, within seconds, written to preview.png (never the "
            "result)",
        )
    output.add_argument(
        "--x0-every",
        type=non_negative_int,
        metavar="K",
        help="every K denoising steps, a low-resolution preview of each image's current "
        "estimate, written to previews/x0-NNN.png (the latest per image; default: none)",
    )


def _add_run_flags(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    run = p.add_argument_group("run")
    run.add_argument(
        "--out",
        metavar="DIR",
        required=out_required,
        help="directory for the images, results.json, contact_sheet.png and the previews (created)",
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="keep the job running if this command exits or loses its connection; "
        "re-attach with `forgedit jobs watch`",
    )
    run.add_argument(
        "--request-id",
        metavar="ID",
        help="idempotency key: running the command again with the same ID re-attaches to "
        "the same job (default: a fresh one)",
    )
    run.add_argument(
        "--timeout", type=float, metavar="S", help="overall deadline in seconds (default: SDK's)"
    )
    run.add_argument("--no-sheet", action="store_true", help="skip the contact sheet")


def _add_edit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "edit",
        help="fine-tune an edit model on IMAGE and sample edits",
        description="Fine-tune an edit model on IMAGE (BLIP caption unless --source-prompt), "
        "register it, and sample the sweep toward each PROMPT. Within seconds, before the "
        "fine-tune ends, the server sends a training-free preview of the first PROMPT (the "
        "base model's own edit, written to preview.png; never the result).",
        formatter_class=_Formatter,
    )
    p.add_argument("image", metavar="IMAGE", help="the photo to edit (PNG, JPEG or WebP)")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="target prompt(s)")
    p.add_argument("--source-prompt", metavar="TEXT", help="describe IMAGE (default: BLIP)")
    p.add_argument("--base-model", metavar="NAME", help="base model name (server default)")
    training = p.add_argument_group("training")
    training.add_argument("--mode", choices=sorted(TRAINING_MODES), help="default: joint")
    training.add_argument(
        "--train-seed",
        type=train_seed,
        metavar="N|random",
        help="default: derived from the image and settings, so the same inputs reuse one edit "
        "model; 'random': a fresh fine-tune; reported",
    )
    training.add_argument("--vae-seed", type=non_negative_int, metavar="N", help="default: 0")
    training.add_argument(
        "--size", type=parse_size, metavar="WxH", help="working size (default: base model's)"
    )
    training.add_argument("--precision", choices=sorted(PRECISIONS), help="server default")
    training.add_argument(
        "--delta-format",
        choices=sorted(DELTA_FORMATS),
        help="how the edit model stores its delta (server default: fp32 faithful, int8 fast)",
    )
    training.add_argument(
        "--updates",
        type=per_stage("--updates"),
        metavar="N[,N]",
        help="optimiser updates of the first stage, or of each stage (two_stage: 400,1000)",
    )
    training.add_argument(
        "--batch-size",
        type=per_stage("--batch-size"),
        metavar="N[,N]",
        help="batch size of the first stage, or of each stage (two_stage: 1,1)",
    )
    _add_sweep_flags(p)
    _add_output_flags(p, edit=True)
    _add_run_flags(p)
    add_connection_flags(p, suppress=True)


def _add_sample(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "sample",
        help="sample edits from a stored edit model (no training)",
        description="Sample the sweep toward each PROMPT from the stored edit model MODEL_ID.",
        formatter_class=_Formatter,
    )
    p.add_argument("edit_model_id", metavar="MODEL_ID", help="as printed by `forgedit edit`")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="target prompt(s)")
    _add_sweep_flags(p)
    _add_output_flags(p, edit=False)
    _add_run_flags(p)
    add_connection_flags(p, suppress=True)


def _add_models(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("models", help="list, show or delete stored edit models")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="stored edit models, newest first")
    ls.add_argument("--base-model", metavar="NAME", help="only this base model's")
    ls.add_argument("--image-sha256", metavar="HEX", help="only those made on this image")
    ls.add_argument("--limit", type=non_negative_int, metavar="N", help="at most N (default: all)")
    show = sub.add_parser("show", help="one edit model's metadata")
    show.add_argument("edit_model_id", metavar="MODEL_ID")
    delete = sub.add_parser("delete", help="delete a stored edit model")
    delete.add_argument("edit_model_id", metavar="MODEL_ID")
    for leaf in (ls, show, delete):
        add_connection_flags(leaf, suppress=True)


def _add_jobs(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("jobs", help="watch, show or cancel running jobs")
    sub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    watch = sub.add_parser(
        "watch",
        help="re-attach to a job: replay its events and follow it (never cancels it)",
    )
    watch.add_argument("job_id", metavar="JOB_ID", nargs="?", help="the job id")
    watch.add_argument("--request-id", metavar="ID", help="find the job by its request id")
    watch.add_argument("--out", metavar="DIR", help="also write the job's images here")
    watch.add_argument("--no-sheet", action="store_true", help="skip the contact sheet")
    watch.add_argument("--timeout", type=float, metavar="S", help="deadline in seconds")
    show = sub.add_parser("show", help="a job's state")
    show.add_argument("job_id", metavar="JOB_ID")
    cancel = sub.add_parser("cancel", help="ask a job to stop")
    cancel.add_argument("job_id", metavar="JOB_ID")
    for leaf in (watch, show, cancel):
        add_connection_flags(leaf, suppress=True)
