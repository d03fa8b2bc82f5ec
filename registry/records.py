"""What the registry says about an edit model: result types, the MLflow tags that carry the
same facts, and the checks of what a caller may put into them (request id, principal, tags).

Every fact the registry searches or lists by is a tag on the registered model *version*
(``forgedit.*``), so listing and lookup need one search call and no run fetches. The run carries
the same tags plus params (the training config, flattened) and metrics (loss curve, timings).
Tag values derived from client input are hashed (``request_key``) or validated hex before they
ever appear in an MLflow filter string.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from forgedit.artifact import DELTA_FILE
from forgedit.config import TrainingConfig
from forgedit.errors import EditModelError, InvalidInputError
from registry.errors import RegistryConflictError

# Version and run tags. Keys contain dots, so filter strings quote them with backticks.
TAG_ID = "forgedit.edit_model_id"
TAG_REQUEST_KEY = "forgedit.request_key"
TAG_REQUEST_ID = "forgedit.request_id"
TAG_IMAGE = "forgedit.image_sha256"
TAG_BASE_NAME = "forgedit.base_model_name"
TAG_BASE_FINGERPRINT = "forgedit.base_model_fingerprint"
TAG_MODE = "forgedit.training_mode"
TAG_CONFIG = "forgedit.config_fingerprint"
TAG_DEDUPE = "forgedit.dedupe_key"
TAG_MANIFEST = "forgedit.manifest_sha256"
EVAL_TAG_PREFIX = "forgedit.eval."  # scores recorded by `forgedit eval` (record_scores)
TAG_BYTES = "forgedit.artifact_bytes"
TAG_PROMPT = "forgedit.source_prompt"
TAG_CREATED = "forgedit.created_at"
TAG_WIDTH = "forgedit.width"
TAG_HEIGHT = "forgedit.height"
# The whole training config as canonical JSON (seed included): reproducible from the API alone.
TAG_TRAINING = "forgedit.training"
# Who made it (a principal name of the service's tokens); absent on older edit models.
TAG_PRINCIPAL = "forgedit.principal"
TAG_DELTA_FORMAT = "forgedit.delta_format"
TAG_DELTA_BYTES = "forgedit.delta_bytes"
# Run-only tag: params and metrics were logged (a retried upload must not log the curve twice).
TAG_RUN_DATA = "forgedit.run_data_logged"
# A caller's label ``key=value`` is the tag ``forgedit.label.<key>`` (``check_labels``).
TAG_LABEL_PREFIX = "forgedit.label."
# Expiry: Unix seconds after which the edit model is refused and swept (absent: never), and a
# marker the sweep searches by (MLflow's tag filters compare strings for equality only).
TAG_EXPIRES_AT = "forgedit.expires_at"
TAG_EXPIRING = "forgedit.expiring"

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_BASE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_PRINCIPAL = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
MAX_REQUEST_ID_CHARS = 256
MAX_USER_TAGS = 20
# Labels (Kubernetes-like): keys start and end with a lowercase letter or digit and may hold
# '.', '_' and '-' between; values the same with uppercase letters too. Both alphabets are
# quote-free, so a label may appear in an MLflow filter string as is.
MAX_LABELS = 16
MAX_LABEL_CHARS = 63
_LABEL_KEY = re.compile(r"\A[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?\Z")
_LABEL_VALUE = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z")
LABEL_RULE = (
    f"at most {MAX_LABELS} labels; keys of 1-{MAX_LABEL_CHARS} lowercase letters, digits, "
    f"'.', '_' or '-', values of 1-{MAX_LABEL_CHARS} letters, digits, '.', '_' or '-', each "
    "starting and ending with a letter or digit"
)
# Time-to-live bounds: a second up to ten years.
MAX_TTL_S = 10 * 365 * 24 * 3600
_USER_TAG_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")

Source = Literal["memory", "spool", "cache", "download"]
Status = Literal["registered", "spooled", "cached"]


@dataclass(frozen=True)
class RegisteredEditModel:
    """The outcome of ``register``.

    ``version`` is the MLflow model version, ``None`` while ``spooled``. ``deduped`` means an
    edit model of the same image, base model and training config (seed included) already
    existed and is returned instead of registering a second one.
    """

    edit_model_id: str
    version: int | None
    deduped: bool = False
    spooled: bool = False


@dataclass(frozen=True)
class EditModelInfo:
    """One edit model as ``show`` and ``list`` describe it (no payload is downloaded)."""

    edit_model_id: str
    status: Status
    version: int | None
    run_id: str | None
    base_model_name: str
    base_model_fingerprint: str
    image_sha256: str
    training_mode: str
    config_fingerprint: str
    source_prompt: str
    request_id: str
    created_at: float
    size_bytes: int
    width: int = 0  # the resolution it was fine-tuned (and samples) at; 0 if unrecorded
    height: int = 0
    training_json: str = ""  # the manifest's training config, canonical JSON; "" if unrecorded

    @property
    def train_seed(self) -> int:
        """The training seed, from ``training_json`` (0 if unrecorded)."""
        try:
            return int(json.loads(self.training_json)["seed"]) if self.training_json else 0
        except (ValueError, KeyError, TypeError):
            return 0

    principal: str = ""  # who made it; "" if unrecorded
    delta_format: str = ""  # fp32, fp16 or int8; "" if unrecorded
    delta_bytes: int = 0  # size of the stored delta file
    labels: Mapping[str, str] = field(default_factory=dict)  # the caller's labels
    expires_at: float | None = None  # Unix seconds; None: never expires


@dataclass(frozen=True)
class FetchedEditModel:
    """A verified local copy of an edit model. ``path`` is an edit-model directory
    (``forgedit.artifact`` format) valid until the cache evicts it; ``source`` says where it
    came from."""

    edit_model_id: str
    path: Path
    source: Source
    manifest: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class EditModelPage:
    items: list[EditModelInfo]
    next_page_token: str | None


def request_key(request_id: str) -> str:
    """The searchable form of a client's request id (sha256 hex: safe in filter strings)."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def dedupe_key(
    image_sha256: str,
    base_fingerprint: str,
    config_fingerprint: str,
    source_prompt: str,
    governance: str = "",
) -> str:
    """Same image bytes, base model, training config (seed included) and source prompt: the
    inputs that determine an edit model. The source prompt initialises the learned embedding,
    so a caller-given prompt makes a different model from BLIP's caption. ``governance``
    (``governance_key``: labels and time-to-live) keeps a model a caller asked to expire or
    label differently from being handed out as another's; "" leaves the key as before."""
    parts = [image_sha256, base_fingerprint, config_fingerprint, source_prompt]
    blob = json.dumps([*parts, governance] if governance else parts)
    return hashlib.sha256(blob.encode()).hexdigest()


def governance_key(labels: Mapping[str, str], ttl_s: float | None) -> str:
    """``dedupe_key``'s governance part: "" without labels and time-to-live."""
    if not labels and ttl_s is None:
        return ""
    return json.dumps({"labels": dict(sorted(labels.items())), "ttl_s": ttl_s}, sort_keys=True)


def manifest_training(manifest: Mapping[str, Any]) -> TrainingConfig:
    """The training config a manifest records; ``EditModelError`` if it is unreadable."""
    try:
        return TrainingConfig.from_dict(manifest["training"])
    except (KeyError, TypeError, ValueError) as e:
        raise EditModelError(
            f"edit model manifest has an unreadable training config: {e}"
        ) from None


def dedupe_inputs(manifest: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """``dedupe_key``'s inputs as a manifest records them: (image sha256, base fingerprint,
    training-config fingerprint, source prompt), without hashing any payload."""
    base = manifest.get("base_model") or {}
    return (
        str(manifest.get("image_sha256", "")),
        str(base.get("fingerprint", "")),
        manifest_training(manifest).fingerprint(),
        str(manifest.get("source_prompt", "")),
    )


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInputError(
            f"request id must be text of at most {MAX_REQUEST_ID_CHARS} characters",
            field="request_id",
        )
    if any(not c.isprintable() for c in request_id):
        raise InvalidInputError(
            "request id contains control characters; use printable text", field="request_id"
        )
    return request_id


def check_sha256(value: str, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise InvalidInputError(f"{name} must be 64 lowercase hex digits (a sha256)", field=name)
    return value


def check_base_model_name(value: str) -> str:
    if not isinstance(value, str) or not _BASE_NAME.match(value):
        raise InvalidInputError(
            "base model name must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field="base_model",
        )
    return value


def check_principal(value: str) -> str:
    """A principal name as it may appear in a tag and a filter string (no quotes possible)."""
    if not _PRINCIPAL.match(value):
        raise InvalidInputError(
            f"principal {value[:80]!r} is not valid: 1-64 letters, digits, '.', '_', '@' or "
            "'-', starting with a letter or digit",
            field="principal",
        )
    return value


def check_user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """A caller's extra run tags: at most ``MAX_USER_TAGS``, keys of 1-64 letters, digits,
    ``_ - .`` outside the ``forgedit.``/``mlflow.`` namespaces, values of at most 1000
    characters. Raises ``InvalidInputError`` naming the first bad one."""
    if len(tags) > MAX_USER_TAGS:
        raise InvalidInputError(
            f"at most {MAX_USER_TAGS} tags are accepted, got {len(tags)}", field="tags"
        )
    out = {}
    for key, value in tags.items():
        if (
            not isinstance(key, str)
            or not 1 <= len(key) <= 64
            or not set(key) <= _USER_TAG_KEY
            or key.startswith(("forgedit.", "mlflow."))
        ):
            raise InvalidInputError(
                f"tag key {str(key)[:40]!r} is not accepted: use 1-64 letters, digits, '_', '-' "
                "or '.', not starting with 'forgedit.' or 'mlflow.'",
                field="tags",
            )
        if not isinstance(value, str) or len(value) > 1000:
            raise InvalidInputError(
                f"tag {key!r} must be text of at most 1000 characters", field="tags"
            )
        out[key] = value
    return out


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """A caller's labels (``LABEL_RULE``), the one check of them: on an Edit, and as a
    ``ListEditModels`` filter. Raises ``InvalidInputError`` naming the first bad one and what
    is accepted."""
    if len(labels) > MAX_LABELS:
        raise InvalidInputError(f"{len(labels)} labels given; {LABEL_RULE}", field=field)
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise InvalidInputError(
                f"label key {str(key)[:80]!r} is not accepted; {LABEL_RULE}", field=field
            )
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise InvalidInputError(
                f"label {key!r} has value {str(value)[:80]!r}, which is not accepted; {LABEL_RULE}",
                field=field,
            )
    return dict(sorted(labels.items()))


def check_ttl(ttl_s: float, field: str = "ttl_seconds") -> float:
    """A time-to-live in seconds: 1 s to ten years."""
    if not isinstance(ttl_s, int | float) or not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidInputError(
            f"time-to-live must be 1..{MAX_TTL_S} seconds (ten years), got {ttl_s!r}",
            field=field,
        )
    return float(ttl_s)


def label_tags(labels: Mapping[str, str]) -> dict[str, str]:
    """Checked labels as tags (``forgedit.label.<key>``)."""
    return {TAG_LABEL_PREFIX + k: v for k, v in labels.items()}


def governance_tags(labels: Mapping[str, str], expires_at: float | None) -> dict[str, str]:
    """The tags of an edit model's labels and expiry (checked values)."""
    tags = label_tags(labels)
    if expires_at is not None:
        tags[TAG_EXPIRES_AT] = repr(float(expires_at))
        tags[TAG_EXPIRING] = "true"
    return tags


def expires_at_of(tags: Mapping[str, str]) -> float | None:
    """The expiry a version's (or spool entry's, or cached copy's) tags record; ``None``:
    never. An unreadable value counts as already expired: refusing is the safe side."""
    raw = tags.get(TAG_EXPIRES_AT)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def is_expired(tags: Mapping[str, str], now: float) -> bool:
    expires_at = expires_at_of(tags)
    return expires_at is not None and expires_at <= now


def check_same_request(tags: Mapping[str, str], dkey: str, principal: str = "") -> None:
    """The edit model ``tags`` describe, found by a request id, is the one this request
    would register (same dedupe key, same principal); else ``RegistryConflictError``."""
    if principal and tags.get(TAG_PRINCIPAL, "") != principal:
        # Another principal's request: say nothing about its edit model.
        raise RegistryConflictError("request id is already in use; use a new request id")
    if tags.get(TAG_DEDUPE) != dkey:
        raise RegistryConflictError(
            f"request id was already used to register edit model {tags.get(TAG_ID)} from a "
            "different image, base model or training config; use a new request id"
        )


def describe_manifest(
    manifest: Mapping[str, Any], edit_model_id: str, request_id: str, manifest_sha256: str
) -> dict[str, str]:
    """The ``forgedit.*`` tags of an edit model, from its manifest."""
    base = manifest.get("base_model") or {}
    training = manifest_training(manifest)
    image, fingerprint, config_fp, source_prompt = dedupe_inputs(manifest)
    size = sum(int(f["bytes"]) for f in manifest["files"].values())
    return {
        TAG_ID: edit_model_id,
        TAG_REQUEST_KEY: request_key(request_id) if request_id else "",
        TAG_REQUEST_ID: request_id,
        TAG_IMAGE: image,
        TAG_BASE_NAME: str(base.get("name", "")),
        TAG_BASE_FINGERPRINT: fingerprint,
        TAG_MODE: training.mode,
        TAG_CONFIG: config_fp,
        TAG_DEDUPE: dedupe_key(image, fingerprint, config_fp, source_prompt),
        TAG_MANIFEST: manifest_sha256,
        TAG_BYTES: str(size),
        TAG_PROMPT: source_prompt[:1000],
        TAG_CREATED: repr(float(manifest.get("created_at", 0.0))),
        TAG_WIDTH: str(int((manifest.get("resolution") or {}).get("width", 0))),
        TAG_HEIGHT: str(int((manifest.get("resolution") or {}).get("height", 0))),
        TAG_TRAINING: json.dumps(training.to_dict(), sort_keys=True, separators=(",", ":")),
        TAG_DELTA_FORMAT: training.stored_format,
        TAG_DELTA_BYTES: str(int(manifest["files"][DELTA_FILE]["bytes"])),
    }


def info_from_tags(
    tags: Mapping[str, str], *, status: Status, version: int | None, run_id: str | None
) -> EditModelInfo:
    def num(key: str) -> float:
        try:
            return float(tags.get(key, "0") or 0)
        except ValueError:
            return 0.0

    return EditModelInfo(
        edit_model_id=tags.get(TAG_ID, ""),
        status=status,
        version=version,
        run_id=run_id,
        base_model_name=tags.get(TAG_BASE_NAME, ""),
        base_model_fingerprint=tags.get(TAG_BASE_FINGERPRINT, ""),
        image_sha256=tags.get(TAG_IMAGE, ""),
        training_mode=tags.get(TAG_MODE, ""),
        config_fingerprint=tags.get(TAG_CONFIG, ""),
        source_prompt=tags.get(TAG_PROMPT, ""),
        request_id=tags.get(TAG_REQUEST_ID, ""),
        created_at=num(TAG_CREATED),
        size_bytes=int(num(TAG_BYTES)),
        width=int(num(TAG_WIDTH)),
        height=int(num(TAG_HEIGHT)),
        training_json=tags.get(TAG_TRAINING, ""),
        principal=tags.get(TAG_PRINCIPAL, ""),
        delta_format=tags.get(TAG_DELTA_FORMAT, ""),
        delta_bytes=int(num(TAG_DELTA_BYTES)),
        labels={
            k.removeprefix(TAG_LABEL_PREFIX): v
            for k, v in sorted(tags.items())
            if k.startswith(TAG_LABEL_PREFIX)
        },
        expires_at=expires_at_of(tags),
    )


def registered(version: Any, deduped: bool = False) -> RegisteredEditModel:
    """``register``'s result for an MLflow model version."""
    return RegisteredEditModel(version.tags[TAG_ID], int(version.version), deduped=deduped)


def version_info(version: Any) -> EditModelInfo:
    """``show``'s description of an MLflow model version (from its tags alone)."""
    return info_from_tags(
        version.tags, status="registered", version=int(version.version), run_id=version.run_id
    )


def training_params(training: Mapping[str, Any]) -> dict[str, str]:
    """The training config flattened to MLflow params: ``stages.0.unet_lr`` → ``"6e-05"``."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, list | tuple):
            out[prefix] = json.dumps(list(value))
        else:
            out[prefix] = "None" if value is None else str(value)

    walk("", training)
    return out


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / `` and space."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)[:200]


def finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
