"""The registry's errors, in the engine's hierarchy so the server maps them in one place.

=============================  ===================================  ==========================
error                          meaning                              suggested gRPC status
=============================  ===================================  ==========================
InvalidEditModelIdError        the ID is malformed (before any I/O)  INVALID_ARGUMENT
EditModelNotFoundError         no edit model has this ID             NOT_FOUND
RegistryUnavailableError       MLflow cannot be reached              UNAVAILABLE
RegistryIntegrityError         stored bytes fail their sha256 or     DATA_LOSS
                               the base-model fingerprint
RegistryConflictError          a request id reused for a different   ALREADY_EXISTS
                               edit model
=============================  ===================================  ==========================

Messages are complete sentences, name the edit-model ID where there is one, and never contain
machine paths, URIs with credentials, or tracebacks.
"""

from __future__ import annotations

from forgedit.errors import EditModelError, ForgeditError, InvalidInputError


class RegistryError(ForgeditError):
    """Base class for everything the registry raises on purpose."""


class InvalidEditModelIdError(RegistryError, InvalidInputError):
    """A string that is not a well-formed edit-model ID. Raised before any I/O."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="edit_model_id")


class EditModelNotFoundError(RegistryError, LookupError):
    """No registered or spooled edit model has this ID."""

    def __init__(self, edit_model_id: str) -> None:
        super().__init__(f"edit model {edit_model_id} was not found in the registry")
        self.edit_model_id = edit_model_id


class RegistryUnavailableError(RegistryError):
    """MLflow did not answer (connection refused, timeout, 5xx, throttled).

    Transient: retrying later may succeed. ``register`` never raises it (it spools instead).
    """


class RegistryIntegrityError(RegistryError, EditModelError):
    """Stored bytes do not match their sha256, or the edit model's base-model fingerprint does
    not match the one it was registered with. The bad copy has been discarded."""


class RegistryConflictError(RegistryError):
    """A request id was reused with a different edit model (image, base model or config)."""
