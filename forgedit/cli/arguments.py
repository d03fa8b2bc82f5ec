"""Checking ``edit``'s arguments before any model is loaded: flags parsed into plain values,
the training and sweep configs built by ``forgedit.requests`` (the rules the server shares),
the image decoded under limits, --out and --save-model checked (``check_edit_args``)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from forgedit.config import (
    MAX_BATCH,
    SweepConfig,
    TrainingConfig,
    check_prompt,
    override_stages,
)
from forgedit.errors import EditModelError, InvalidInputError, ModelDirectoryError
from forgedit.images import LoadedImage, load_image
from forgedit.requests import (
    TrainSeedFrom,
    build_sweep_config,
    build_training_config,
    check_device,
    default_device,
    random_seed,
)
from forgedit.zoo.shapes import is_shapes_name, shapes_model

T = TypeVar("T")


@dataclass
class EditCommand:
    """A fully checked ``edit`` invocation: all ``run_edit`` needs, nothing left to check.
    Paths keep the spelling the user typed."""

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
    # Where the training seed comes from (``forgedit.requests.TrainSeedFrom``), or "edit
    # model" with --load-model (no training).
    train_seed_from: str
    random_seeds: bool


def check_edit_args(args: argparse.Namespace) -> EditCommand:
    """Check every argument of ``edit``; raise ``ForgeditError`` naming the first problem.

    Loads no model. Reads at most the image (under ``ImageLimits``) and, with --load-model,
    the edit model's manifest.
    """
    # 1. Prompts and model directories (their layout, not their weights).
    prompts = tuple(args.prompt)
    for p in prompts:
        check_prompt(p, "--prompt")
    if args.source_prompt is not None:
        check_prompt(args.source_prompt, "--source-prompt")
    if is_shapes_name(args.base_model):  # the shipped toy world, by name, with its own BLIP
        shipped = shapes_model()
        args.base_model = os.fspath(shipped.stable_diffusion)
        args.blip = args.blip or os.fspath(shipped.blip)
    base_model = existing_dir(args.base_model, "--base-model")
    vae = existing_dir(args.vae, "--vae")
    blip = existing_dir(args.blip, "--blip")
    load_model = existing_dir(args.load_model, "--load-model")
    if vae is not None and base_model is None:
        raise InvalidInputError(
            "--vae needs --base-model (the tiny model has its own VAE)", field="vae"
        )
    _check_model_directories(args, base_model, vae, blip)

    # 2. Device, precision and the training config (or the loaded edit model's).
    size = parse_size(args.size) if args.size is not None else None
    device = parse_device(args.device)
    precision = args.precision or ("fast" if device.startswith("cuda") else "faithful")
    manifest: dict[str, Any] | None = None
    if load_model is not None:
        manifest = _check_load_model(args, load_model, size)
        config = _manifest_training(manifest)
        train_seed_from = "edit model"
    else:
        config, train_seed_from = _training_config(args, base_model, blip, size, precision)

    # 3. The sweep, with the variant's defaults and forgetting strategies.
    sweep, random_seeds = _sweep_config(args, prompts, config.mode)

    # 4. Batching and where the results go.
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

    # 5. Only now, with every cheap check passed, decode the image.
    image = load_image(args.image)
    if manifest is not None and manifest.get("image_sha256") not in ("", None, image.sha256):
        print(
            f"warning: {args.image!r} is not the image this edit model was trained on; it is "
            "used only as the contact sheet's input tile",
            file=sys.stderr,
        )
    return EditCommand(
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
    (the tiny model's convention, with cache rather than data)."""
    home = os.environ.get("FORGEDIT_HOME")
    if home:
        return Path(home) / "engines"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "forgedit" / "engines"


def _manifest_training(manifest: dict[str, Any]) -> TrainingConfig:
    """The training config a loaded edit model's manifest records."""
    try:
        return TrainingConfig.from_dict(manifest["training"])
    except (TypeError, ValueError, KeyError) as e:
        raise EditModelError(f"edit model manifest has a malformed training config: {e}") from None


def _training_config(
    args: argparse.Namespace,
    base_model: Path | None,
    blip: Path | None,
    size: tuple[int, int] | None,
    precision: str,
) -> tuple[TrainingConfig, TrainSeedFrom]:
    """The fine-tune's config from --mode, --size, --train-seed, --delta-format, --updates and
    --batch-size, and where its seed comes from."""
    if base_model is not None and blip is None and args.source_prompt is None:
        raise InvalidInputError(
            "with --base-model, pass --blip DIR (a BLIP captioning model) or --source-prompt "
            "TEXT describing the image; the source prompt cannot be guessed",
            field="blip",
        )
    mode = args.mode or "joint"
    seed_from = _train_seed_from(args.train_seed)
    # A content seed is known only once the base model and source prompt are (after loading
    # and captioning): 0 stands in until then (``forgedit.requests.training_with_seed``).
    if seed_from == "given":
        train_seed = parse_int(args.train_seed, "--train-seed")
    else:
        train_seed = random_seed() if seed_from == "random" else 0
    width, height = size or (512, 512)  # provisional: the native size is known after load
    config = build_training_config(
        mode,
        height=height,
        width=width,
        seed=train_seed,
        precision=precision,
        delta_format=args.delta_format,
    )
    config = apply_stage_flags(config, args.updates, args.batch_size)
    if args.save_model is not None:
        _check_new_model_dir(args.save_model)
    return config, seed_from


def _sweep_config(
    args: argparse.Namespace, prompts: tuple[str, ...], mode: str
) -> tuple[SweepConfig, bool]:
    """The sweep from --interpolation, --gammas, --alphas, --forget, --forget-degree, --seeds,
    --steps and --guidance, and whether its seeds were drawn at random."""
    interpolation = args.interpolation
    if args.alphas is not None and interpolation != "vp":
        raise InvalidInputError(
            "--alphas applies only to --interpolation vp (vs ignores α)", field="alphas"
        )
    random_seeds = args.seeds is None
    given: dict[str, Any] = {
        "prompts": prompts,
        "interpolation": interpolation,
        "forget_degree": parse_float(args.forget_degree, "--forget-degree"),
        "seeds": (
            (random_seed(),) if random_seeds else tuple(parse_list(args.seeds, "--seeds", int))
        ),
        "steps": parse_int(args.steps, "--steps"),
        "guidance": parse_float(args.guidance, "--guidance"),
    }
    if args.forget is not None:
        given["forget"] = tuple(parse_list(args.forget, "--forget", str))
    if args.gammas is not None:
        given["gammas"] = tuple(parse_list(args.gammas, "--gammas", float))
    if args.alphas is not None:
        given["alphas"] = tuple(parse_list(args.alphas, "--alphas", float))
    return build_sweep_config(mode, **given), random_seeds


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


def apply_stage_flags(
    config: TrainingConfig, updates: str | None, batch_size: str | None
) -> TrainingConfig:
    """Apply --updates / --batch-size with ``override_stages`` (the rule the server's
    ``updates``/``stage2_updates`` follow): the i-th value is stage i's, so one value replaces
    the first stage's (two_stage has two)."""
    return override_stages(
        config,
        updates=_per_stage(updates, "--updates", config),
        batch_sizes=_per_stage(batch_size, "--batch-size", config),
    )


def _per_stage(text: str | None, flag: str, config: TrainingConfig) -> list[int | None]:
    """One flag's comma-separated values, refused (naming the flag) if there are more values
    than ``config`` has stages."""
    values: list[int | None] = list(parse_list(text, flag, int)) if text is not None else []
    stages = config.stages
    if len(values) > len(stages):
        raise InvalidInputError(
            f"{flag} takes one value (for the first stage) or one per stage "
            f"({len(stages)}: {', '.join(s.name for s in stages)}), got {len(values)}",
            field=flag.lstrip("-").replace("-", "_"),
        )
    return values


_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
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


def _train_seed_from(value: str | None) -> TrainSeedFrom:
    """Where --train-seed comes from: unset → derived from the content, 'random' → a fresh
    random fine-tune, a number → given."""
    if value is None:
        return "content"
    return "random" if value.strip().lower() == "random" else "given"


def existing_dir(value: str | None, flag: str) -> Path | None:
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
