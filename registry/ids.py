"""Edit-model IDs: opaque, URL-safe, validated strictly before any I/O.

An ID is ``em_`` followed by 26 characters of lowercase RFC 4648 base32 (``a-z``, ``2-7``)
encoding 128 random bits, e.g. ``em_k5q2x7d3m4a6b2c7e5f3g2h4j6``. IDs are random rather than
derived from content: two fine-tunes of the same image with the same settings are found as
duplicates through the registry's dedupe key, not by colliding IDs, and an ID reveals nothing
about the image it was made from.

``validate_edit_model_id`` is the only way a client string enters the registry. It accepts
exactly the pattern above and nothing else (no path separators, no dots, no unicode, no
whitespace, bounded length), so a validated ID can be used as a directory name and inside an
MLflow filter string without escaping. No other client string ever becomes a path or an MLflow
source.
"""

from __future__ import annotations

import base64
import re
import secrets

from registry.errors import InvalidEditModelIdError

PREFIX = "em_"
_RANDOM_BYTES = 16  # 128 bits: collisions are not a practical concern
_BODY_CHARS = 26  # ceil(128 / 5) base32 characters, padding dropped
EDIT_MODEL_ID_PATTERN = re.compile(rf"\A{PREFIX}[a-z2-7]{{{_BODY_CHARS}}}\Z")
EDIT_MODEL_ID_LENGTH = len(PREFIX) + _BODY_CHARS


def new_edit_model_id() -> str:
    """A fresh random edit-model ID."""
    body = base64.b32encode(secrets.token_bytes(_RANDOM_BYTES)).decode("ascii")
    return PREFIX + body.rstrip("=").lower()


def validate_edit_model_id(value: object) -> str:
    """Return ``value`` if it is a well-formed edit-model ID; raise otherwise.

    Raises ``InvalidEditModelIdError`` (an ``InvalidInputError`` with ``field="edit_model_id"``)
    for anything else. The message never echoes more than a short, sanitised prefix of the
    rejected value, so a hostile string cannot flood logs or carry control characters.
    """
    if isinstance(value, str) and EDIT_MODEL_ID_PATTERN.match(value):
        return value
    raise InvalidEditModelIdError(
        f"edit-model ID {_describe(value)} is not valid: expected {PREFIX!r} followed by "
        f"{_BODY_CHARS} characters a-z or 2-7 ({EDIT_MODEL_ID_LENGTH} characters in all), "
        "as returned when the edit model was registered"
    )


def is_edit_model_id(value: object) -> bool:
    return isinstance(value, str) and EDIT_MODEL_ID_PATTERN.match(value) is not None


def _describe(value: object) -> str:
    if not isinstance(value, str):
        return f"of type {type(value).__name__}"
    shown = "".join(c if c.isascii() and c.isprintable() else "?" for c in value[:40])
    more = f"… ({len(value)} characters)" if len(value) > 40 else ""
    return repr(shown) + more
