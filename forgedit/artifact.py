"""The edit-model artifact: what one fine-tune leaves behind, and all a replica needs to sample
new edits from it without retraining (ARCHITECTURE.md, "The edit-model artifact").

A directory of exactly three files::

    delta.safetensors      θ_ft − θ_pre for every trained tensor, keyed "unet.<name>" or
                           "text_encoder.<name>", in the training config's delta format
                           (``forgedit.delta``: fp32 by default in faithful mode, int8 with
                           per-output-channel scales by default in fast, or fp16)
    embedding.safetensors  "source_embedding": the optimised e_opt, fp32, [1, 77, D]
    manifest.json          format version, base-model fingerprint, resolution, source prompt,
                           training config, loss curve, timings, sha256 of the two files above

Safetensors and JSON only, never pickle. Writes go to a temporary sibling directory that is
fsynced and renamed into place, so a reader sees either no artifact or a whole one. Loading
verifies every hash and, when asked, the base-model fingerprint, and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from forgedit import delta as delta_format
from forgedit.config import DeltaFormat, TrainingConfig, legacy_delta_format
from forgedit.durable import JsonObject, fsync_dir, fsync_file
from forgedit.errors import BaseModelMismatchError, EditModelError

FORMAT = "forgedit.edit-model"
FORMAT_VERSION = 1
DELTA_FILE = "delta.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
MANIFEST_FILE = "manifest.json"
PAYLOAD_FILES = (DELTA_FILE, EMBEDDING_FILE)
_HASH_CHUNK = 8 * 1024 * 1024


class MadeOnBase(Protocol):
    """Anything that records the base model it was fine-tuned on: an ``EditModel``, or a
    registry record of one (whose payload need not be loaded to decide where it can run)."""

    @property
    def base_model_name(self) -> str: ...

    @property
    def base_model_fingerprint(self) -> str: ...


def fits_base(edit_model: MadeOnBase, base_fingerprint: str) -> bool:
    """Whether ``edit_model`` can be sampled on the base model with ``base_fingerprint``: the
    one compatibility rule. An edit model is a Δ over exactly the weights it was fine-tuned
    on, so only the same weights (the same fingerprint) take it; its resolution and variant
    are its own and any base model of the same weights samples them."""
    return edit_model.base_model_fingerprint == base_fingerprint


def check_fits_base(
    edit_model: MadeOnBase, base_fingerprint: str, base_name: str | None = None
) -> None:
    """Raise ``BaseModelMismatchError`` unless ``fits_base``, naming both base models."""
    if fits_base(edit_model, base_fingerprint):
        return
    loaded = f"{base_name!r} " if base_name else ""
    raise BaseModelMismatchError(
        f"this edit model was fine-tuned on base model {edit_model.base_model_name!r} "
        f"(fingerprint {edit_model.base_model_fingerprint[:12]}…), not on the loaded base "
        f"model {loaded}(fingerprint {base_fingerprint[:12]}…); load it with the base model "
        "it was made on"
    )


@dataclass
class EditModel:
    """A fine-tuned edit model, held as a delta over its base model.

    ``delta`` maps "unet.<param>" / "text_encoder.<param>" to θ_ft − θ_pre (CPU tensors),
    decoded: what ``ResidentWeights`` writes, whatever ``training.delta_format`` stores.
    ``delta_scales`` are the int8 scales it was decoded with (empty for fp32/fp16), so that
    saving it again writes the same bytes. ``source_embedding`` is e_opt, fp32, shape
    [1, 77, D]. In dreambooth mode it is E_ft(source) as encoded by the fine-tuned text
    encoder at the end of training.
    """

    delta: dict[str, torch.Tensor]
    source_embedding: torch.Tensor
    base_model_name: str
    base_model_fingerprint: str
    source_prompt: str
    training: TrainingConfig
    loss_curve: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    image_sha256: str = ""
    created_at: float = field(default_factory=time.time)
    delta_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.training.height

    @property
    def width(self) -> int:
        return self.training.width

    @property
    def delta_format(self) -> DeltaFormat:
        return self.training.stored_format

    @property
    def delta_bytes(self) -> int:
        """Bytes the decoded Δ takes in memory (the stored size is in the manifest)."""
        return sum(t.numel() * t.element_size() for t in self.delta.values())

    def payload(self) -> dict[str, torch.Tensor]:
        """The tensors of ``delta.safetensors``: Δ encoded in the delta format."""
        return delta_format.encode(self.delta, self.delta_format, self.delta_scales)

    def manifest(
        self,
        file_hashes: Mapping[str, str],
        file_sizes: Mapping[str, int],
        payload: Mapping[str, torch.Tensor] | None = None,
    ) -> JsonObject:
        stored = self.payload() if payload is None else payload
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": {
                "name": self.base_model_name,
                "fingerprint": self.base_model_fingerprint,
            },
            "resolution": {"height": self.height, "width": self.width},
            "source_prompt": self.source_prompt,
            "image_sha256": self.image_sha256,
            "training": self.training.to_dict(),
            "loss_curve": [float(x) for x in self.loss_curve],
            "timings": dict(self.timings),
            "delta": {
                "format": self.delta_format,
                "tensors": len(self.delta),
                "parameters": sum(t.numel() for t in self.delta.values()),
                "dtype": _dtype_name(stored),
            },
            "created_at": self.created_at,
            "files": {
                name: {"sha256": file_hashes[name], "bytes": file_sizes[name]}
                for name in PAYLOAD_FILES
            },
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the artifact to ``directory`` atomically and return its path.

        ``directory`` must not exist, or be an empty directory. Raises ``EditModelError``
        otherwise; on any failure nothing is left at ``directory``.
        """
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise EditModelError(
                f"cannot save the edit model to {os.fspath(directory)!r}: it already exists and "
                "is not an empty directory"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            payload = self.payload()
            # One metadata key only: safetensors writes several in an arbitrary order, and the
            # same edit model must give the same bytes. The delta format lives in the manifest.
            save_file(payload, tmp / DELTA_FILE, metadata={"format": FORMAT})
            save_file(
                {
                    "source_embedding": self.source_embedding.detach()
                    .to("cpu", torch.float32)
                    .contiguous()
                },
                tmp / EMBEDDING_FILE,
                metadata={"format": FORMAT},
            )
            hashes = {name: sha256_file(tmp / name) for name in PAYLOAD_FILES}
            sizes = {name: (tmp / name).stat().st_size for name in PAYLOAD_FILES}
            manifest = self.manifest(hashes, sizes, payload)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            for name in (*PAYLOAD_FILES, MANIFEST_FILE):
                fsync_file(tmp / name)
            if target.exists():
                target.rmdir()  # empty, checked above
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Stream a file through sha256 (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: str | os.PathLike[str]) -> JsonObject:
    """Read and structurally check ``manifest.json`` (no payload hashing)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EditModelError(
            f"not an edit model: {MANIFEST_FILE} is missing (expected {', '.join(PAYLOAD_FILES)} "
            f"and {MANIFEST_FILE})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EditModelError(f"edit model {MANIFEST_FILE} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EditModelError(f"not an edit model: {MANIFEST_FILE} has no format {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EditModelError(
            f"edit model format version {version!r} is not supported; this engine reads "
            f"version {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(PAYLOAD_FILES):
        raise EditModelError(f"edit model manifest must list exactly {', '.join(PAYLOAD_FILES)}")
    stored_delta_format(manifest)
    return manifest


def stored_delta_format(manifest: JsonObject) -> DeltaFormat:
    """The delta format a manifest declares (its training config's ``delta_format``; what
    the precision implied for artifacts from before the field). Raises ``EditModelError`` for
    a format this engine does not read."""
    training = manifest.get("training")
    if not isinstance(training, Mapping):
        raise EditModelError("edit model manifest has no training config")
    legacy = legacy_delta_format(str(training.get("precision", "faithful")))
    return delta_format.check_stored_format(training.get("delta_format", legacy))


def verify_files(directory: str | os.PathLike[str]) -> JsonObject:
    """Check every payload file against the manifest's sha256 and size; return the manifest.

    Raises ``EditModelError`` naming the first file that is missing or differs.
    """
    manifest = read_manifest(directory)
    for name, meta in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise EditModelError(f"edit model is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise EditModelError(
                f"edit model file {name} is {size} bytes, the manifest says {meta.get('bytes')}"
            )
        if sha256_file(path) != meta.get("sha256"):
            raise EditModelError(
                f"edit model file {name} does not match its sha256 in the manifest (corrupted)"
            )
    return manifest


def load_edit_model(
    directory: str | os.PathLike[str],
    *,
    expected_base_fingerprint: str | None = None,
) -> EditModel:
    """Load and verify an edit model.

    Raises ``BaseModelMismatchError`` when ``expected_base_fingerprint`` is given and differs
    from the one the edit model was trained on, and ``EditModelError`` for anything malformed.
    """
    manifest = verify_files(directory)
    base = manifest.get("base_model") or {}
    made_on = _ManifestBase(str(base.get("name", "")), str(base.get("fingerprint", "")))
    if expected_base_fingerprint is not None:
        check_fits_base(made_on, expected_base_fingerprint)
    try:
        payload = load_file(Path(directory) / DELTA_FILE)
        embedding = load_file(Path(directory) / EMBEDDING_FILE)["source_embedding"]
        training = TrainingConfig.from_dict(manifest["training"])
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise EditModelError(f"edit model payload cannot be read: {e}") from None
    decoded = delta_format.decode(payload, training.stored_format)
    return EditModel(
        delta=decoded.tensors,
        delta_scales=decoded.scales,
        source_embedding=embedding,
        base_model_name=made_on.base_model_name,
        base_model_fingerprint=made_on.base_model_fingerprint,
        source_prompt=str(manifest.get("source_prompt", "")),
        training=training,
        loss_curve=[float(x) for x in manifest.get("loss_curve", [])],
        timings={k: float(v) for k, v in manifest.get("timings", {}).items()},
        image_sha256=str(manifest.get("image_sha256", "")),
        created_at=float(manifest.get("created_at", 0.0)),
    )


@dataclass(frozen=True)
class _ManifestBase:
    """The base model a manifest names, checked before its payload is read."""

    base_model_name: str
    base_model_fingerprint: str


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    return ",".join(sorted(dtypes)) if dtypes else "none"
