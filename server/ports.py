"""What the server needs from the outside world, as small protocols.

The real implementations are ``forgedit.engine.Engine`` and ``registry.EditModelRegistry``;
tests inject the real ones on the tiny model, or a deterministic fake where a fault must be
injected (a slow step, a failing registry). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from forgedit.artifact import EditModel, MadeOnBase
    from forgedit.config import Precision, SweepConfig, TrainingConfig
    from forgedit.engine import EditedImage
    from forgedit.events import CancelToken, SamplingCallback, TrainingCallback
    from forgedit.preview import Preview, PreviewCallback
    from registry import EditModelInfo, EditModelPage, RegisteredEditModel


class EngineLike(Protocol):
    """One resident base model on one device; one job at a time (not thread-safe).

    The server reads only what this interface exposes, never the engine's internals (its base
    model's weights, its captioner)."""

    @property
    def fingerprint(self) -> str:
        """The weight fingerprint of the resident base model (what edit models record)."""
        ...

    @property
    def native_height(self) -> int:
        """The base model's native resolution: the default of a request that sets none."""
        ...

    @property
    def native_width(self) -> int: ...

    @property
    def can_caption(self) -> bool:
        """Whether a BLIP captioner is loaded (else requests must give a source prompt)."""
        ...

    def accepts(self, edit_model: MadeOnBase) -> bool:
        """Whether ``edit_model`` (or the registry's record of one) was fine-tuned on this
        engine's base model: the engine's own compatibility rule,
        ``forgedit.artifact.fits_base``, which the runner asks when it picks an engine and the
        served-models catalog applies before queueing (``server.catalog``)."""
        ...

    @property
    def sampling_backend(self) -> str:
        """The UNet backend that samples now (torch, onnxruntime or tensorrt)."""
        ...

    def source_prompt(self, image: Image.Image, target_prompt: str) -> str: ...

    def preview(
        self,
        image: Image.Image,
        prompt: str,
        *,
        height: int,
        width: int,
        seed: int,
        vae_seed: int = 0,
        guidance: float = 7.5,
        precision: Precision | None = None,
        cancel: CancelToken | None = None,
    ) -> Preview:
        """The training-free preview (``forgedit.preview.sdedit``), before a fine-tune."""
        ...

    def finetune(
        self,
        image: Image.Image,
        source_prompt: str,
        config: TrainingConfig,
        *,
        image_sha256: str = "",
        on_progress: TrainingCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> EditModel: ...

    def sample(
        self,
        edit_model: EditModel,
        sweep: SweepConfig,
        *,
        on_image: Callable[[EditedImage], None] | None = None,
        on_progress: SamplingCallback | None = None,
        cancel: CancelToken | None = None,
        max_batch: int = 8,
        precision: Precision | None = None,
        x0_every: int | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[EditedImage]: ...

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """The ``(height, width)`` sizes it serves compiled: ``warmup`` builds each, and its
        canary passes, or ``warmup`` raises. Any other size samples on eager torch."""
        ...

    def relative_step_cost(self, height: int, width: int) -> float:
        """One UNet step at ``height`` × ``width`` over one at the native size (estimates)."""
        ...

    def warmup(self) -> None: ...

    def settle(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` s) for work a cancelled job left running on the engine,
        an uninterruptible UNet build; True once none is. ``sample`` stops waiting for such a
        build as soon as its job is cancelled; the worker settles before its next job."""
        ...


# Builds the engine of one base model on one device: (base model name, device) -> engine.
# Called in the device's worker thread, so loading never blocks the RPC threads.
EngineFactory = Callable[[str, str], EngineLike]


@dataclass(frozen=True)
class BaseModelInfo:
    """What validation, routing and estimates need to know about a served base model."""

    name: str
    fingerprint: str
    height: int  # the native size
    width: int
    can_caption: bool
    # The (height, width) sizes served compiled (``EngineLike.resolutions``); () = native.
    resolutions: tuple[tuple[int, int], ...] = ()
    # ``EngineLike.relative_step_cost``; None: every size costs as the native one.
    step_cost: Callable[[int, int], float] | None = field(default=None, compare=False, repr=False)

    @property
    def served_sizes(self) -> tuple[tuple[int, int], ...]:
        """The ``(height, width)`` sizes served compiled."""
        return self.resolutions or ((self.height, self.width),)

    @property
    def default_size(self) -> tuple[int, int]:
        """A request's ``(height, width)`` when it sets none: the native size if served,
        else the first served one."""
        native = (self.height, self.width)
        return native if native in self.served_sizes else self.served_sizes[0]


class RegistryLike(Protocol):
    """The edit-model registry (``registry.EditModelRegistry``). Every method may raise the
    errors of ``registry.errors``; ids are validated by the registry before any I/O."""

    def start(self) -> None: ...

    def close(self, timeout: float = 10.0) -> None: ...

    def register(
        self,
        edit_model: EditModel,
        *,
        request_id: str = "",
        input_image: bytes | None = None,
        contact_sheet: bytes | None = None,
        tags: Mapping[str, str] | None = None,
        dedupe: bool = True,
        principal: str = "",
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
    ) -> RegisteredEditModel: ...

    def add_contact_sheet(self, edit_model_id: str, contact_sheet: bytes) -> None: ...

    def find_existing(
        self,
        image_sha256: str,
        base_model_fingerprint: str,
        config_fingerprint: str,
        source_prompt: str,
        principal: str | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
    ) -> EditModelInfo | None: ...

    def load(
        self, edit_model_id: str, *, expected_base_fingerprint: str | None = None
    ) -> EditModel: ...

    def show(self, edit_model_id: str) -> EditModelInfo: ...

    def cached_info(self, edit_model_id: str) -> EditModelInfo | None: ...

    def list_models(
        self,
        *,
        base_model: str | None = None,
        image_sha256: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
        principal: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> EditModelPage: ...

    def delete(self, edit_model_id: str) -> None: ...

    def deletion_pending(self, edit_model_id: str) -> bool: ...
