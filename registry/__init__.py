"""The edit-model registry: every per-image edit model registered in MLflow, fetchable by ID
from any replica, with nothing lost or half-written when things fail (ARCHITECTURE.md,
"Registry").

Public API (everything a caller needs; see each docstring for contracts and errors)::

    config = RegistryConfig(data_dir=DATA)                 # embedded SQLite + local artifacts
    config = RegistryConfig(data_dir=DATA, tracking_uri="http://mlflow:5000")   # a server
    registry = EditModelRegistry(config); registry.start()   # flusher, retention sweep

    registry.register(edit_model_or_dir, request_id=..., input_image=..., contact_sheet=...,
                      labels={"k": "v"}, ttl_s=3600)
        -> RegisteredEditModel(edit_model_id, version, deduped, spooled)
    registry.find_existing(image_sha256, base_fingerprint, config_fingerprint, source_prompt)
        -> EditModelInfo | None
    registry.fetch(edit_model_id)  -> FetchedEditModel(edit_model_id, path, source, manifest)
    registry.load(edit_model_id, expected_base_fingerprint=...) -> forgedit EditModel
    registry.show(edit_model_id)   -> EditModelInfo
    registry.list_models(base_model=..., image_sha256=..., labels=..., page_size=...,
                         page_token=...) -> EditModelPage(items, next_page_token)
    registry.delete(edit_model_id)    # nothing of it remains in MLflow or here (deletion.py)
    registry.sweep_expired() -> [ids]; registry.pending_deletions() -> [ids]
    registry.flush_spool() -> FlushResult;  registry.spool_size() -> (count, bytes)
    registry.close()

    validate_edit_model_id(s) -> s   # raises InvalidEditModelIdError before any I/O

Errors (registry.errors, all ``forgedit.errors.ForgeditError``): InvalidEditModelIdError
(an InvalidInputError), EditModelNotFoundError, RegistryUnavailableError,
RegistryIntegrityError (an EditModelError), RegistryConflictError.

Metrics (default Prometheus registry): ``forgedit_registry_spooled_edit_models``,
``forgedit_registry_spooled_bytes``, ``forgedit_registry_cached_edit_models{tier}``.

MLflow-native use: every version is an MLflow pyfunc model (``registry/pyfunc_model.py``,
models-from-code) loadable with ``mlflow.pyfunc.load_model("models:/forgedit-edit-models/N",
model_config={"base_model_dir": DIR})``.
"""

from registry.config import RegistryConfig
from registry.errors import (
    EditModelNotFoundError,
    InvalidEditModelIdError,
    RegistryConflictError,
    RegistryError,
    RegistryIntegrityError,
    RegistryUnavailableError,
)
from registry.ids import is_edit_model_id, new_edit_model_id, validate_edit_model_id
from registry.publish import FlushResult
from registry.records import EditModelInfo, EditModelPage, FetchedEditModel, RegisteredEditModel
from registry.store import EditModelRegistry

__all__ = [
    "EditModelInfo",
    "EditModelNotFoundError",
    "EditModelPage",
    "EditModelRegistry",
    "FetchedEditModel",
    "FlushResult",
    "InvalidEditModelIdError",
    "RegisteredEditModel",
    "RegistryConfig",
    "RegistryConflictError",
    "RegistryError",
    "RegistryIntegrityError",
    "RegistryUnavailableError",
    "is_edit_model_id",
    "new_edit_model_id",
    "validate_edit_model_id",
]
