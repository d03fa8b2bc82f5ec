"""Every error the engine raises on purpose.

One hierarchy, so the command line maps it to exit status 2 and the server maps it to a gRPC
status in one place each. Messages name the problem *and* what is accepted, e.g.
``size must be a multiple of 8, got 500x512``. They never contain absolute paths of the
machine: callers pass what the user typed, and we echo only that.
"""

from __future__ import annotations


class ForgeditError(Exception):
    """Base class. ``str(err)`` is a complete, user-facing sentence."""


class InvalidInputError(ForgeditError, ValueError):
    """A request parameter is out of range or malformed (prompt, size, sweep, seed, ...).

    ``field`` names the offending parameter so a service can report a field violation.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidImageError(InvalidInputError):
    """The image is missing, corrupt, truncated, too large or of an unsupported format."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="image")


class UnknownStrategyError(InvalidInputError):
    """A forgetting strategy name that the chosen variant does not define."""

    def __init__(self, message: str, *, field: str = "forget") -> None:
        super().__init__(message, field=field)


class ModelDirectoryError(ForgeditError):
    """A base-model or BLIP directory is missing, incomplete, or of the wrong kind."""


class EngineNotReadyError(ForgeditError):
    """A declared resolution could not be made ready (built, loaded, canary passed)."""


class StrategyResolutionError(ForgeditError):
    """A forgetting pattern matched nothing it should on the loaded UNet (naming drift)."""


class EditModelError(ForgeditError):
    """An edit-model artifact is malformed, corrupted, or was made on another base model."""


class BaseModelMismatchError(EditModelError):
    """The edit model's base-model fingerprint differs from the loaded base model's."""


class CancelledError(ForgeditError):
    """The job was cancelled; raised at the next training update or denoising step."""
