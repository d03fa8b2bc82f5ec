"""The toy world's trained models, shipped with the package (``--base-model shapes``).

One coloured shape on a plain background (``forgedit.zoo.shapes.world`` renders it), and an
SD-1.x-shaped pipeline trained from scratch on it by ``forgedit.zoo.shapes.train``, all fp16 in
the real on-disk formats under ``model/``:

``model/stable-diffusion/``  a diffusers ``StableDiffusionPipeline`` (AutoencoderKL, 8 px per
                             latent; UNet2DConditionModel with SD 1.x's 686 tensor names;
                             CLIPTextModel; SD's CLIP BPE tokenizer restricted to the world's
                             words), native 64×64 px
``model/blip/``              a ``BlipForConditionalGeneration`` captioner
                             (``blip-image-captioning-base`` layout)
``model/clip/``              a ``CLIPModel`` (vision + text) for scoring edits
``model/manifest.json``      sha256 of every file, the training config, the commit of the
                             training code and its run times

``shapes_model()`` checks every file against the manifest before handing out the directories,
so a corrupted or half-updated checkout fails loudly instead of editing badly. The name
``shapes`` is resolved where every built-in's is, ``forgedit.zoo.builtin_base_model``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgedit.errors import ModelDirectoryError

NAME = "shapes"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "forgedit.zoo.shapes"
SD_SUBDIR = "stable-diffusion"
BLIP_SUBDIR = "blip"
CLIP_SUBDIR = "clip"


@dataclass(frozen=True)
class ShapesModel:
    """The checked directories of the shipped toy-world model."""

    root: Path
    stable_diffusion: Path
    blip: Path
    clip: Path
    manifest: dict[str, Any]


def default_model_dir() -> Path:
    """Where the package keeps the shipped files (``forgedit/zoo/shapes/model``)."""
    return Path(__file__).resolve().parent / "model"


def shapes_model(directory: str | os.PathLike[str] | None = None) -> ShapesModel:
    """The toy-world model at ``directory`` (default: the shipped one), every file checked
    against ``manifest.json``. Raises ``ModelDirectoryError`` naming each missing, changed or
    unlisted file."""
    root = Path(directory) if directory is not None else default_model_dir()
    manifest = verify_manifest(root)
    return ShapesModel(
        root=root,
        stable_diffusion=root / SD_SUBDIR,
        blip=root / BLIP_SUBDIR,
        clip=root / CLIP_SUBDIR,
        manifest=manifest,
    )


def manifest_files(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` except the manifest itself."""
    from forgedit.artifact import sha256_file

    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST
    }


def verify_manifest(root: Path) -> dict[str, Any]:
    """Read ``root/manifest.json`` and check that the files under ``root`` are exactly the
    ones it lists, with its sha256s."""
    shown = "the shipped shapes model" if root == default_model_dir() else os.fspath(root)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ModelDirectoryError(
            f"{shown} has no {MANIFEST}: the toy-world model is missing from this checkout "
            "(it ships with the package; re-install, or re-train it with "
            "python -m forgedit.zoo.shapes.train)"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelDirectoryError(f"{shown}: {MANIFEST} is not readable JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ModelDirectoryError(f"{shown}: {MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    listed: dict[str, str] = manifest.get("files") or {}
    found = manifest_files(root) if root.is_dir() else {}
    missing = sorted(set(listed) - set(found))
    changed = sorted(f for f in listed if f in found and found[f] != listed[f])
    extra = sorted(set(found) - set(listed))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if changed:
        problems.append(f"changed (sha256 differs) {', '.join(changed)}")
    if extra:
        problems.append(f"not in the manifest {', '.join(extra)}")
    if problems:
        raise ModelDirectoryError(
            f"{shown} does not match its {MANIFEST}: {'; '.join(problems)}; restore the "
            "files from the repository or re-train with python -m forgedit.zoo.shapes.train"
        )
    return manifest
