"""The base models this replica serves, as their engines describe themselves once loaded.

``resolve`` answers an Edit's ``base_model`` (empty: the first configured one); ``require_served``
answers whether a stored edit model can be sampled here, by the engine's own compatibility
rule (``forgedit.artifact.fits_base``, which ``EngineLike.accepts`` applies too): the one
check, made before a Sample is queued.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from forgedit.artifact import MadeOnBase, fits_base
from forgedit.errors import InvalidInputError
from server.errors import UnservedBaseModelError, shown
from server.ports import BaseModelInfo


class StoredEditModel(MadeOnBase, Protocol):
    """A registered edit model, as far as serving it goes (``registry.EditModelInfo``)."""

    @property
    def edit_model_id(self) -> str: ...


class ServedModels:
    """Name -> ``BaseModelInfo`` of each served base model, in the configured order (the
    first is the default). Filled by the device workers as they load (``add``). Thread-safe."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("a replica serves at least one base model")
        self.names = tuple(names)
        self._lock = threading.Lock()
        self._loaded: dict[str, BaseModelInfo] = {}

    @classmethod
    def of(cls, *infos: BaseModelInfo) -> ServedModels:
        """A catalog of models known already (tests, tools)."""
        catalog = cls([info.name for info in infos])
        for info in infos:
            catalog.add(info)
        return catalog

    @property
    def default(self) -> str:
        return self.names[0]

    def add(self, info: BaseModelInfo) -> None:
        """What a worker's engine says about a base model it loaded (the first one counts:
        every device loads the same weights)."""
        with self._lock:
            self._loaded.setdefault(info.name, info)

    def loaded(self) -> list[BaseModelInfo]:
        with self._lock:
            return [self._loaded[name] for name in self.names if name in self._loaded]

    def resolve(self, name: str) -> BaseModelInfo:
        """The base model an Edit names (``""``: the default). Raises ``InvalidInputError``
        (field ``base_model``) naming the served ones."""
        with self._lock:
            info = self._loaded.get(name or self.default)
        if info is None:
            raise InvalidInputError(
                f"unknown base model {shown(name)}; this server serves: {', '.join(self.names)}",
                field="base_model",
            )
        return info

    def require_served(self, edit_model: StoredEditModel) -> None:
        """Raise ``UnservedBaseModelError`` unless ``edit_model`` (an artifact, or the
        registry's record of one) fits a base model loaded here."""
        served = self.loaded()
        if not any(fits_base(edit_model, base.fingerprint) for base in served):
            raise UnservedBaseModelError(
                f"edit model {edit_model.edit_model_id} was fine-tuned on base model "
                f"{edit_model.base_model_name!r}, which this server does not serve; served: "
                f"{', '.join(base.name for base in served)}"
            )
