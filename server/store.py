"""The server's view of the edit-model registry: the few calls it makes, and their wire form.

``EditModelStore`` wraps a ``registry.EditModelRegistry`` (or anything with the same methods,
see ``server.ports.RegistryLike``) and converts its records to ``forgedit.v1.EditModel``.
Errors pass through unchanged (``registry.errors``) and are mapped in ``server.errors``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from google.protobuf import timestamp_pb2

from forgedit.artifact import EditModel
from forgedit.config import TrainingConfig
from forgedit.errors import ForgeditError
from registry.errors import EditModelNotFoundError
from server._proto import forgedit_pb2 as pb
from server.auth import Principal
from server.errors import UnservedBaseModelError
from server.ports import BaseModelInfo, RegistryLike
from server.validation import DELTA_FORMATS

log = logging.getLogger("server.store")

_DELTA_FORMATS = {name: number for number, name in DELTA_FORMATS.items()}
_MODES = {
    "joint": pb.TRAINING_MODE_JOINT,
    "two_stage": pb.TRAINING_MODE_TWO_STAGE,
    "dreambooth": pb.TRAINING_MODE_DREAMBOOTH,
}


class EditModelStore:
    """Register, load, describe, list and delete edit models through the registry."""

    def __init__(self, registry: RegistryLike) -> None:
        self.registry = registry

    def register(
        self, edit_model: EditModel, *, request_id: str, image_bytes: bytes, principal: str
    ) -> Any:
        """Store a freshly trained edit model, recording the ``principal`` that made it;
        returns the registry's ``RegisteredEditModel`` (id, version, deduped, spooled). A retry
        with the same request id returns the first registration instead of creating a second
        version; deduplication only returns the same principal's edit models."""
        return self.registry.register(
            edit_model, request_id=request_id, input_image=image_bytes, principal=principal
        )

    def add_contact_sheet(self, edit_model_id: str, png: bytes) -> bool:
        """Attach the contact sheet of a job's sampled edits to its edit model. Best effort:
        the images already reached the client, so a registry failure is logged, not raised.
        Returns whether it was stored."""
        try:
            self.registry.add_contact_sheet(edit_model_id, png)
        except ForgeditError as e:
            log.warning("contact sheet not stored for %s: %s", edit_model_id, e)
            return False
        return True

    def find_trained(
        self,
        image_sha256: str,
        base_fingerprint: str,
        source_prompt: str,
        training: TrainingConfig,
        principal: str,
    ) -> Any:
        """The registry's record of an edit model already fine-tuned on the same image bytes,
        base model, source prompt and training config (seed included), or None. Training again
        would reproduce exactly that model, so it is reused instead (one fine-tune serves
        unlimited edits); only ``principal``'s own. None also when the registry cannot be
        asked."""
        return self.registry.find_existing(
            image_sha256, base_fingerprint, training.fingerprint(), source_prompt, principal
        )

    def load(self, edit_model_id: str) -> EditModel:
        """The verified edit model (from the registry's caches when it can)."""
        return self.registry.load(edit_model_id)

    def show(self, edit_model_id: str, principal: Principal) -> Any:
        """Describe an edit model ``principal`` may see; another principal's is
        ``EditModelNotFoundError`` exactly as if it did not exist."""
        info = self.registry.show(edit_model_id)
        if not principal.may_see(getattr(info, "principal", "")):
            raise EditModelNotFoundError(edit_model_id)
        return info

    def list(
        self,
        *,
        base_model: str | None,
        image_sha256: str | None,
        page_size: int,
        page_token: str | None,
        principal: Principal,
    ) -> Any:
        """A page of the edit models ``principal`` may see (an admin's: everyone's)."""
        return self.registry.list_models(
            base_model=base_model,
            image_sha256=image_sha256,
            page_size=page_size,
            page_token=page_token,
            principal=None if principal.admin else principal.name,
        )

    def delete(self, edit_model_id: str, principal: Principal) -> None:
        """Delete an edit model ``principal`` may see (else ``EditModelNotFoundError``)."""
        self.show(edit_model_id, principal)
        self.registry.delete(edit_model_id)

    @staticmethod
    def check_served(info: Any, base_models: Iterable[BaseModelInfo]) -> None:
        """Raise ``UnservedBaseModelError`` unless ``info``'s base model is loaded here."""
        served = list(base_models)
        if not any(b.fingerprint == info.base_model_fingerprint for b in served):
            raise UnservedBaseModelError(
                f"edit model {info.edit_model_id} was fine-tuned on base model "
                f"{info.base_model_name!r}, which this server does not serve; served: "
                f"{', '.join(b.name for b in served)}"
            )


def edit_model_to_proto(info: Any) -> pb.EditModel:
    """A registry ``EditModelInfo`` as the wire's ``EditModel``."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(float(info.created_at) * 1e9))
    return pb.EditModel(
        edit_model_id=info.edit_model_id,
        version=info.version or 0,
        base_model=info.base_model_name,
        base_fingerprint=info.base_model_fingerprint,
        image_sha256=info.image_sha256,
        source_prompt=info.source_prompt,
        training_mode=_MODES.get(info.training_mode, pb.TRAINING_MODE_UNSPECIFIED),
        create_time=created,
        size_bytes=int(info.size_bytes),
        width=int(info.width),
        height=int(info.height),
        train_seed=int(info.train_seed),
        training_config_json=info.training_json,
        principal=getattr(info, "principal", ""),
        delta_format=_DELTA_FORMATS.get(info.delta_format, pb.DELTA_FORMAT_UNSPECIFIED),
        delta_bytes=int(info.delta_bytes),
    )
