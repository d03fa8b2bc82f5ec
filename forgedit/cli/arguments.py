"""Checking ``edit``'s arguments before any model is loaded: the flags read into the engine's
typed options (``forgedit.options``, the gRPC request's names), the configs built from them by
``forgedit.requests`` (the one builder the server calls too), the image decoded under limits,
--out and --save-model checked (``check_edit_args``).

This module owns only the command line's syntax (lists, sizes, ``--train-seed random``, one
value per training stage); every rule about the values is the builder's, whose errors name the
option, spelled as a flag by ``forgedit.cli.parser.in_flags`` when reported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast

from forgedit.config import (
    MAX_BATCH,
    DeltaFormat,
    ImageFormat,
    Interpolation,
    OutputConfig,
    Precision,
    SweepConfig,
    TrainingConfig,
    TrainingMode,
)
from forgedit.durable import JsonObject
from forgedit.errors import EditModelError, InvalidInputError, ModelDirectoryError
from forgedit.images import LoadedImage, load_image
from forgedit.options import EditOptions, OutputOptions, SweepOptions, TrainingOptions
from forgedit.requests import (
    TrainSeedFrom,
    build_edit,
    build_output,
    build_sweep,
    check_device,
    default_device,
    stage_names,
)
from forgedit.zoo import DEFAULT_BUILTIN, builtin_names, is_builtin_name

T = TypeVar("T")


@dataclass
class EditCommand:
    """A fully checked ``edit`` invocation: all ``run_edit`` needs, nothing left to check.
    Paths keep the spelling the user typed."""

    image_arg: str
    image: LoadedImage
    options: EditOptions  # what the flags ask for, as the server's request would
    base_model: Path | None  # None: the built-in ``builtin``
    builtin: str | None  # a built-in base model's name (``forgedit.zoo``) when base_model is None
    vae: Path | None
    blip: Path | None
    load_model: Path | None
    save_model: Path | None
    config: TrainingConfig  # height/width provisional when size_given is False
    size_given: bool
    sweep: SweepConfig
    output: OutputConfig  # how the images and the contact sheet are encoded
    device: str
    precision: Precision
    max_batch: int
    unet_backend: str
    engine_cache: Path
    out: Path
    json: bool
    # Where the training seed comes from (``forgedit.requests.TrainSeedFrom``), or "edit
    # model" with --load-model (no training).
    train_seed_from: TrainSeedFrom | Literal["edit model"]

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.options.target_prompts

    @property
    def source_prompt(self) -> str | None:
        return self.options.source_prompt

    @property
    def random_seeds(self) -> bool:
        """Whether the sampling seeds were drawn at random (no --seeds)."""
        return not self.options.sweep.seeds


def check_edit_args(args: argparse.Namespace) -> EditCommand:
    """Check every argument of ``edit``; raise ``ForgeditError`` naming the first problem.

    Loads no model. Reads at most the image (under ``ImageLimits``) and, with --load-model,
    the edit model's manifest.
    """
    # 1. The options, read from the flags (their syntax only), and the model directories
    # (their layout, not their weights).
    options = edit_options(args)
    builtin = os.fspath(args.base_model) if is_builtin_name(args.base_model) else None
    base_model = None
    if builtin is None:
        names = ", ".join(builtin_names())
        also = f"; give a diffusers SD 1.x directory or a built-in's name ({names})"
        base_model = existing_dir(args.base_model, "--base-model", also)
    vae = existing_dir(args.vae, "--vae")
    blip = existing_dir(args.blip, "--blip")
    load_model = existing_dir(args.load_model, "--load-model")
    if vae is not None and base_model is None:
        raise InvalidInputError(
            "--vae needs --base-model (the built-in model has its own VAE)", field="vae"
        )
    _check_model_directories(args, base_model, vae, blip)

    # 2. Device and precision; the training config (or the loaded edit model's) and the
    # sweep, built by the rules the server shares (``forgedit.requests``).
    device = parse_device(args.device)
    precision: Precision = options.training.precision or (
        "fast" if device.startswith("cuda") else "faithful"
    )
    train_seed_from: TrainSeedFrom | Literal["edit model"]
    if load_model is not None:
        manifest = _check_load_model(args, load_model, options.training)
        config = _manifest_training(manifest)
        sweep = build_sweep(options.sweep, options.target_prompts, config.mode)
        output = build_output(options.output)
        train_seed_from = "edit model"
        trained_on = manifest.get("image_sha256")
    else:
        if base_model is not None and blip is None and options.source_prompt is None:
            raise InvalidInputError(
                "with --base-model, pass --blip DIR (a BLIP captioning model) or "
                "--source-prompt TEXT describing the image; the source prompt cannot be guessed",
                field="blip",
            )
        # The native size is known only after loading: 512x512 stands in until then.
        edit = build_edit(options, native_height=512, native_width=512, precision=precision)
        config, sweep, train_seed_from = edit.training, edit.sweep, edit.train_seed_from
        output = edit.output  # (its previews are the service's: this CLI writes at the end)
        if args.save_model is not None:
            _check_new_model_dir(args.save_model)
        trained_on = None

    # 3. Batching and where the results go.
    max_batch = parse_max_batch(args.max_batch)
    out = _check_out_dir(args.out)
    if args.save_model is not None:
        save, out_abs = Path(args.save_model).absolute(), out.absolute()
        if save == out_abs or save in out_abs.parents:
            raise InvalidInputError(
                f"--save-model {args.save_model!r} must not be --out or contain it; the edit "
                "model is a directory of its own (it may be inside --out)",
                field="save_model",
            )

    # 4. Only now, with every cheap check passed, decode the image.
    image = load_image(args.image)
    if trained_on not in ("", None, image.sha256):
        print(
            f"warning: {args.image!r} is not the image this edit model was trained on; it is "
            "used only as the contact sheet's input tile",
            file=sys.stderr,
        )
    return EditCommand(
        image_arg=args.image,
        image=image,
        options=options,
        base_model=base_model,
        builtin=(builtin or DEFAULT_BUILTIN) if base_model is None else None,
        vae=vae,
        blip=blip,
        load_model=load_model,
        save_model=Path(args.save_model) if args.save_model is not None else None,
        config=config,
        size_given=options.training.width is not None or load_model is not None,
        sweep=sweep,
        output=output,
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
    )


def edit_options(args: argparse.Namespace) -> EditOptions:
    """What ``edit``'s flags ask for, as the engine's options: lists split, numbers parsed,
    ``--size WxH`` as width and height, ``--train-seed random`` as a fresh seed, and
    ``--updates``/``--batch-size`` one value per training stage. Values are not judged here
    (``forgedit.requests`` does), except that a list cannot have more values than stages."""
    width, height = parse_size(args.size) if args.size is not None else (None, None)
    mode = cast(TrainingMode | None, args.mode)
    updates = _per_stage(args.updates, "--updates", mode)
    batch_sizes = _per_stage(args.batch_size, "--batch-size", mode)
    seed: int | None = None
    fresh_seed = False
    if args.train_seed is not None:
        if args.train_seed.strip().lower() == "random":
            fresh_seed = True
        else:
            seed = parse_int(args.train_seed, "--train-seed")
    training = TrainingOptions(
        mode=mode,
        seed=seed,
        width=width,
        height=height,
        precision=cast(Precision | None, args.precision),
        updates=updates[0],
        batch_size=batch_sizes[0],
        stage2_updates=updates[1],
        stage2_batch_size=batch_sizes[1],
        fresh_seed=fresh_seed,
        delta_format=cast(DeltaFormat | None, args.delta_format),
    )
    sweep = SweepOptions(
        interpolation=cast(Interpolation, args.interpolation),
        gammas=_floats(args.gammas, "--gammas"),
        alphas=_floats(args.alphas, "--alphas"),
        forget_strategies=tuple(parse_list(args.forget, "--forget", str)) if args.forget else (),
        forget_degree=parse_float(args.forget_degree, "--forget-degree"),
        seeds=tuple(parse_list(args.seeds, "--seeds", int)) if args.seeds is not None else (),
        steps=parse_int(args.steps, "--steps"),
        guidance=parse_float(args.guidance, "--guidance"),
    )
    output = OutputOptions(
        format=cast(ImageFormat | None, args.image_format),
        quality=(
            parse_int(args.image_quality, "--image-quality")
            if args.image_quality is not None
            else None
        ),
    )
    return EditOptions(tuple(args.prompt), args.source_prompt, training, sweep, output)


def parse_device(value: str | None) -> str:
    """--device (``forgedit.requests.check_device``), or CUDA when this machine has it."""
    return check_device(value) if value is not None else default_device()


def parse_max_batch(text: str) -> int:
    """--max-batch: images per denoising batch, 1..``MAX_BATCH``."""
    max_batch = parse_int(text, "--max-batch")
    if not 1 <= max_batch <= MAX_BATCH:
        raise InvalidInputError(
            f"--max-batch must be 1..{MAX_BATCH}, got {max_batch}", field="max_batch"
        )
    return max_batch


def default_engine_cache() -> Path:
    """``$FORGEDIT_HOME/engines`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/forgedit/engines``
    (the built-in models' convention, with cache rather than data)."""
    home = os.environ.get("FORGEDIT_HOME")
    if home:
        return Path(home) / "engines"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "forgedit" / "engines"


def _manifest_training(manifest: JsonObject) -> TrainingConfig:
    """The training config a loaded edit model's manifest records."""
    try:
        return TrainingConfig.from_dict(manifest["training"])
    except (TypeError, ValueError, KeyError) as e:
        raise EditModelError(f"edit model manifest has a malformed training config: {e}") from None


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
    args: argparse.Namespace, directory: Path, training: TrainingOptions
) -> JsonObject:
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
        recorded = manifest["training"]
        mode, height, width = recorded["mode"], recorded["height"], recorded["width"]
    except (KeyError, TypeError):
        raise EditModelError("edit model manifest has no training config") from None
    if training.mode is not None and training.mode != mode:
        raise InvalidInputError(
            f"--mode {training.mode} differs from the edit model's training mode {mode}; omit "
            "--mode with --load-model",
            field="mode",
        )
    if training.width is not None and (training.width, training.height) != (width, height):
        raise InvalidInputError(
            f"--size {training.width}x{training.height} differs from the edit model's "
            f"resolution {width}x{height}; an edit model samples at the size it was trained at",
            field="size",
        )
    return manifest


def _per_stage(text: str | None, flag: str, mode: TrainingMode | None) -> tuple[int | None, ...]:
    """One per-stage flag (--updates, --batch-size) as (first stage, second stage): one value
    is the first stage's, a list gives each stage's, so a list may not be longer than the
    training mode has stages (two_stage: 2)."""
    values: list[int | None] = list(parse_list(text, flag, int)) if text is not None else []
    stages = stage_names(mode or "joint")
    if len(values) > len(stages):
        raise InvalidInputError(
            f"{flag} takes one value (for the first stage) or one per stage "
            f"({len(stages)}: {', '.join(stages)}), got {len(values)}",
            field=flag.lstrip("-").replace("-", "_"),
        )
    return (*values, None, None)[:2]


def _floats(text: str | None, flag: str) -> tuple[float, ...]:
    return tuple(parse_list(text, flag, float)) if text is not None else ()


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' → (width, height) (``forgedit.config.parse_size``)."""
    from forgedit.config import parse_size as parse

    return parse(text, "--size")


def parse_list(text: str, flag: str, kind: Callable[[str], T]) -> list[T]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise InvalidInputError(
            f"{flag} must be a comma-separated list without empty items, got {text!r}",
            field=flag.lstrip("-").replace("-", "_"),
        )
    return [_convert(s, flag, kind) for s in items]


def parse_int(text: str, flag: str) -> int:
    return _convert(text.strip(), flag, int)


def parse_float(text: str, flag: str) -> float:
    """A number as typed; its range (finite included) is the builder's to judge."""
    return _convert(text.strip(), flag, float)


def _convert(text: str, flag: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(text)
    except ValueError:
        what = "whole numbers" if kind is int else "numbers" if kind is float else "values"
        raise InvalidInputError(
            f"{flag} takes {what}, got {text!r}", field=flag.lstrip("-").replace("-", "_")
        ) from None


def existing_dir(value: str | None, flag: str, accepted: str = "") -> Path | None:
    """``value`` as an existing directory (None stays None); ``accepted`` (e.g. "; or a
    built-in's name …") ends the error, naming what else the flag takes."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise ModelDirectoryError(f"{flag} {value!r} does not exist{accepted}")
    if not path.is_dir():
        raise ModelDirectoryError(f"{flag} {value!r} is not a directory{accepted}")
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
