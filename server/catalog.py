"""The base models this replica serves, as their engines describe themselves once loaded.

``resolve`` answers an Edit's ``base_model`` (empty: the first configured one); ``require_served``
answers whether a stored edit model can be sampled here, by the engine's own compatibility
rule (``forgedit.artifact.fits_base``, which ``EngineLike.accepts`` applies too): the one
check, made before a Sample is queued.

Resolutions: each base model is served compiled at the sizes its engine declared and built at
warm-up (``FORGEDIT_RESOLUTIONS``; default: its native size). ``check_size`` is the one check
of a job's resolution, for an Edit (the size it asks for) and a Sample (the size its edit model
was trained at, in ``require_served``): another size is refused with INVALID_ARGUMENT naming
the served ones, or, when the operator chose ``FORGEDIT_OTHER_RESOLUTIONS=torch``, admitted
(the engine samples it on eager torch, ``Engine.compiled_batch``). ``step_cost`` scales run-time
estimates by resolution (``forgedit.backends.cost``, through ``EngineLike.relative_step_cost``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal, Protocol

from forgedit.artifact import MadeOnBase, fits_base
from forgedit.errors import InvalidInputError
from server.errors import UnservedBaseModelError, shown
from server.ports import BaseModelInfo


class StoredEditModel(MadeOnBase, Protocol):
    """A registered edit model, as far as serving it goes (``registry.EditModelInfo``)."""

    @property
    def edit_model_id(self) -> str: ...

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...


OtherResolutions = Literal["refuse", "torch"]


def shown_sizes(sizes: Sequence[tuple[int, int]]) -> str:
    """``[(height, width), ...]`` as the settings write them: '512x512, 768x512' (W x H)."""
    return ", ".join(f"{width}x{height}" for height, width in sizes)


class ServedModels:
    """Name -> ``BaseModelInfo`` of each served base model, in the configured order (the
    first is the default). Filled by the device workers as they load (``add``). Thread-safe."""

    def __init__(
        self, names: Sequence[str], other_resolutions: OtherResolutions = "refuse"
    ) -> None:
        if not names:
            raise ValueError("a replica serves at least one base model")
        self.names = tuple(names)
        self.other_resolutions = other_resolutions
        self._lock = threading.Lock()
        self._loaded: dict[str, BaseModelInfo] = {}
        self._step_costs: dict[tuple[str, int, int], float] = {}

    @classmethod
    def of(
        cls, *infos: BaseModelInfo, other_resolutions: OtherResolutions = "refuse"
    ) -> ServedModels:
        """A catalog of models known already (tests, tools)."""
        catalog = cls([info.name for info in infos], other_resolutions)
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
        for height, width in info.served_sizes:  # counted now, in the worker, not in a request
            self.step_cost(info, height, width)

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

    def require_served(self, edit_model: StoredEditModel) -> BaseModelInfo:
        """The base model loaded here that ``edit_model`` (an artifact, or the registry's
        record of one) fits. Raises ``UnservedBaseModelError`` if none does, and
        ``InvalidInputError`` (``check_size``) if it was trained at a size not served."""
        served = self.loaded()
        base = next((b for b in served if fits_base(edit_model, b.fingerprint)), None)
        if base is None:
            raise UnservedBaseModelError(
                f"edit model {edit_model.edit_model_id} was fine-tuned on base model "
                f"{edit_model.base_model_name!r}, which this server does not serve; served: "
                f"{', '.join(base.name for base in served)}"
            )
        self.check_size(
            base,
            int(edit_model.height),
            int(edit_model.width),
            field="edit_model_id",
            what=f"edit model {edit_model.edit_model_id} was fine-tuned at",
        )
        return base

    def check_size(
        self,
        base: BaseModelInfo,
        height: int,
        width: int,
        *,
        field: str,
        what: str = "the requested resolution is",
    ) -> None:
        """Raise ``InvalidInputError`` (``field``) naming the served sizes unless ``base`` is
        served at ``height`` × ``width``, or other sizes are served on torch."""
        if (height, width) in base.served_sizes or self.other_resolutions == "torch":
            return
        raise InvalidInputError(
            f"{what} {width}x{height}, which this server does not serve for base model "
            f"{base.name!r}; served resolutions: {shown_sizes(base.served_sizes)} "
            "(FORGEDIT_RESOLUTIONS)",
            field=field,
        )

    def step_cost(self, base: BaseModelInfo, height: int, width: int) -> float:
        """One UNet step of ``base`` at ``height`` × ``width`` over one at its native size
        (1.0 where the engine says nothing); counted once per size, then remembered."""
        key = (base.name, height, width)
        with self._lock:
            cost = self._step_costs.get(key)
        if cost is None:
            cost = 1.0 if base.step_cost is None else float(base.step_cost(height, width))
            with self._lock:
                self._step_costs[key] = cost
        return cost
