"""What one registered edit model is on disk: an MLflow pyfunc model directory with the
edit-model artifact inside, and its extras (the input image, the contact sheet).

The spool writes an entry in this layout and the publisher uploads it as is, so the artifact
paths of a run (``MODEL_ARTIFACT_PATH``, ``EDIT_MODEL_ARTIFACT_PATH``, …) are defined here once.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Any

import forgedit
from forgedit.artifact import (
    DELTA_FILE,
    EMBEDDING_FILE,
    MANIFEST_FILE,
    EditModel,
    read_manifest,
    verify_files,
)
from forgedit.durable import write_bytes_atomic
from forgedit.errors import EditModelError, InvalidInputError
from registry.fsutil import copy_file_durable
from registry.pyfunc_signature import sweep_signature

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_PATH = "model"  # the pyfunc model inside the run
EDIT_MODEL_ARTIFACT_PATH = "model/artifacts/edit_model"
INPUTS_ARTIFACT_PATH = "inputs"
# The contact sheet's file name without its suffix, which follows its encoding (the request's
# image format: contact_sheet.png, .webp or .jpg).
CONTACT_SHEET_STEM = "contact_sheet"
# The edit-model files whose sizes prove an upload complete.
EDIT_MODEL_FILES = (DELTA_FILE, EMBEDDING_FILE, MANIFEST_FILE)
_PYFUNC_REQUIREMENTS = (
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
)

ImageInput = bytes | str | os.PathLike[str]


def write_pyfunc_model(
    model_dir: Path, edit_model: EditModel | str | os.PathLike[str]
) -> dict[str, Any]:
    """Write the MLflow pyfunc model directory with the edit model inside; return its verified
    manifest.

    ``mlflow.pyfunc.save_model`` would copy the artifact through a temporary directory; for a
    1.2 GB delta that is two extra full copies. So it is given an empty placeholder directory
    and the edit model is written straight into ``artifacts/edit_model`` afterwards (the
    MLmodel file records only that relative path, not the content).
    """
    placeholder = model_dir.parent / "edit_model"
    placeholder.mkdir()
    with warnings.catch_warnings():
        # MLflow nags about type hints, which predict() leaves out on purpose (pyfunc_model.py).
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc

        mlflow.pyfunc.save_model(
            path=str(model_dir),
            python_model=str(PYFUNC_CODE),
            artifacts={"edit_model": str(placeholder)},
            pip_requirements=_pip_requirements(),
            code_paths=[str(Path(forgedit.__file__).parent)],
            # Declares the keys a loader may override with load_model(model_config=...);
            # empty means "from the environment, then the default" (pyfunc_model.py).
            model_config={"base_model_dir": "", "vae_dir": "", "device": "", "precision": ""},
            signature=sweep_signature(),
        )
    placeholder.rmdir()
    target = model_dir / "artifacts" / "edit_model"
    if isinstance(edit_model, EditModel):
        edit_model.save(target)  # hashes what it writes: no second pass needed
        return read_manifest(target)
    source = Path(edit_model)
    target.mkdir(parents=True, exist_ok=True)
    for name in EDIT_MODEL_FILES:
        if not (source / name).is_file():
            raise EditModelError(f"edit model is incomplete: {name} is missing")
        copy_file_durable(source / name, target / name)
    return verify_files(target)  # the copy, not the source, is what we will upload


def write_image(source: ImageInput, directory: Path, name: str, force_name: bool = False) -> Path:
    """Store an image (bytes or a file) in ``directory`` atomically; return its path. The
    suffix follows the image's magic bytes unless ``force_name``. Raises
    ``InvalidInputError`` for a path that is not a file."""
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"the {name} file does not exist", field=name)
        data = path.read_bytes()  # an input image or a contact sheet: megabytes at most
    target = directory / (name if force_name else name + _image_suffix(data[:16]))
    return write_bytes_atomic(data, target)


def is_contact_sheet(name: str) -> bool:
    """Whether a file name is a contact sheet's (in any of its encodings)."""
    return Path(name).stem == CONTACT_SHEET_STEM


def write_contact_sheet(source: ImageInput, directory: Path) -> Path:
    """Store a contact sheet in ``directory`` as ``contact_sheet`` + its encoding's suffix,
    replacing one there already (of any encoding); return its path."""
    written = write_image(source, directory, CONTACT_SHEET_STEM)
    for old in directory.iterdir():
        if old != written and is_contact_sheet(old.name):
            old.unlink()
    return written


def _image_suffix(head: bytes) -> str:
    """The file suffix of an image's magic bytes (``.bin`` for anything else), so that a
    stored input image opens in any viewer straight from the MLflow UI."""
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return ".bin"


def _pip_requirements() -> list[str]:
    """The pyfunc's requirements, pinned to the versions installed here when known."""
    reqs = []
    for name in _PYFUNC_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs
