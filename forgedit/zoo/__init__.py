"""The built-in base models: names that stand in for a base-model directory.

``builtin_base_model(name)`` is the one resolver of a built-in name. The engine CLI calls it for
``edit`` without ``--base-model``, the server when ``FORGEDIT_BASE_MODELS`` is empty, and the
registry's pyfunc for an edit model fine-tuned on a built-in (which then needs no directory).
It returns the built-in's directories, writing them first where the built-in is generated
(the tiny model is written on first use; two calls give byte-identical weights).

Built-ins:

``tiny``    a random, SD-1.x-shaped pipeline and BLIP captioner in the real on-disk formats
            (``forgedit.zoo.tiny``): the whole pipeline in seconds; its edits are noise.
``shapes``  the toy world (``forgedit.zoo.shapes``): a pipeline and BLIP trained on renders of
            one coloured shape on a plain background, shipped with the package and checked
            against its manifest; its edits are real and measurable (``forgedit eval``).

Where a base-model directory is expected (``--base-model``, ``FORGEDIT_BASE_MODELS``, the
pyfunc's ``base_model_dir``), a built-in's name stands for it (``builtin_named``); write
``./tiny`` for a directory of that name.

A new built-in is a module of this package that writes (or ships) it, and one line in
``BUILTINS``. Nothing in the engine imports this package: it is for front ends and tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forgedit.errors import ModelDirectoryError


@dataclass(frozen=True)
class BuiltinBaseModel:
    """Where a built-in base model lives once it exists."""

    name: str
    stable_diffusion: Path  # a diffusers SD-1.x directory (model_index.json, unet/, vae/, ...)
    blip: Path | None  # its BLIP captioner, or None when it ships none


def _tiny(directory: Path | None) -> BuiltinBaseModel:
    from forgedit.zoo.tiny import BLIP_SUBDIR, SD_SUBDIR, ensure_tiny_model

    root = ensure_tiny_model(directory)
    return BuiltinBaseModel("tiny", root / SD_SUBDIR, root / BLIP_SUBDIR)


def _shapes(directory: Path | None) -> BuiltinBaseModel:
    from forgedit.zoo.shapes import shapes_model

    model = shapes_model()  # shipped, never written: ``directory`` does not apply
    return BuiltinBaseModel("shapes", model.stable_diffusion, model.blip)


# Name -> how to get it into a directory (None: its default place, ``$FORGEDIT_HOME/<name>-model``
# or ``~/.local/share/forgedit/<name>-model``). The first one is the default base model.
BUILTINS: dict[str, Callable[[Path | None], BuiltinBaseModel]] = {
    "tiny": _tiny,
    "shapes": _shapes,
}
DEFAULT_BUILTIN = next(iter(BUILTINS))


def builtin_names() -> tuple[str, ...]:
    return tuple(BUILTINS)


def builtin_base_model(
    name: str = DEFAULT_BUILTIN, *, home: str | os.PathLike[str] | None = None
) -> BuiltinBaseModel:
    """The built-in base model ``name``, written first where it is generated and absent.

    ``home`` is the directory that keeps built-ins (each in ``<name>-model``); None: the
    user's default. Raises ``ModelDirectoryError`` for a name that is not built in (naming the
    built-ins) or for a directory that holds something else."""
    make = BUILTINS.get(name)
    if make is None:
        raise ModelDirectoryError(
            f"{name!r} is not a built-in base model; built in: {', '.join(BUILTINS)}"
        )
    return make(Path(home) / f"{name}-model" if home is not None else None)


def is_builtin_name(value: str | os.PathLike[str] | None) -> bool:
    """Whether a base-model value is a built-in's name (``tiny``, ``shapes``) rather than a
    directory. Reads nothing."""
    return value is not None and os.fspath(value) in BUILTINS


def builtin_named(
    value: str | os.PathLike[str] | None, *, home: str | os.PathLike[str] | None = None
) -> BuiltinBaseModel | None:
    """The built-in a base-model value stands for: the default one for None, the named one
    for a built-in's name; None for anything else (a directory, used as given)."""
    if value is None:
        return builtin_base_model(home=home)
    if is_builtin_name(value):
        return builtin_base_model(os.fspath(value), home=home)
    return None
