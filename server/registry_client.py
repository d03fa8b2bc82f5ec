"""The server's view of the edit-model registry: the few calls it makes, bounded and filtered.

``RegistryClient`` wraps a ``registry.EditModelRegistry`` (or anything with the same methods,
see ``server.ports.RegistryLike``): it bounds the calls made for a request and shows a
principal only its own edit models. Its records go on the wire through
``server.wire.edit_model_to_proto``. Errors pass through unchanged (``registry.errors``) and
are mapped in ``server.errors``.

Registry calls made for a request (``show``, ``describe_for_sampling``, ``list``, ``delete``)
run on a small bounded pool (``RegistryCalls``) and are waited for at most the registry timeout
or most of the request's own remaining deadline, whichever is shorter. A hung MLflow (a stopped
process answers no byte) therefore costs a request thread at most that long, ends in
UNAVAILABLE with a retry hint, and ties up at most ``threads`` pool threads however many
requests arrive; once they are all waiting, further calls are refused at once. A call that
timed out keeps running in its pool thread until MLflow's own HTTP timeout ends it, so a
delete that timed out may still complete (a retry then answers NOT_FOUND).
The worker's calls (``find_trained``, ``register``, ``load``, ``add_contact_sheet``) are not
bounded here: they run on the device's thread, under MLflow's HTTP timeout, and ``register``
spools when MLflow does not answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, TypeVar

from forgedit.artifact import EditModel
from forgedit.config import TrainingConfig
from forgedit.errors import ForgeditError
from registry.errors import EditModelNotFoundError, RegistryUnavailableError
from server.auth import Principal
from server.ports import RegistryLike

if TYPE_CHECKING:
    from registry import EditModelInfo, EditModelPage, RegisteredEditModel

log = logging.getLogger("server.registry_client")
T = TypeVar("T")

# A call may use at most this share of the request's remaining deadline, so that the
# UNAVAILABLE answer reaches the client before its deadline does.
DEADLINE_SHARE = 0.8


class RegistryCalls:
    """A bounded pool for registry calls made on request threads (see the module docstring)."""

    def __init__(self, threads: int, timeout_s: float) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="registry-call")
        self._slots = threading.BoundedSemaphore(threads)

    def run(self, what: str, fn: Callable[[], T], remaining_s: float | None) -> T:
        """``fn()``'s result, or ``RegistryUnavailableError`` if it has not answered within
        the timeout (or ``DEADLINE_SHARE`` of ``remaining_s``), or if every pool thread is
        still waiting for MLflow. ``what`` completes "could not …" in the message."""
        timeout = self.timeout_s
        if remaining_s is not None:
            timeout = max(0.0, min(timeout, remaining_s * DEADLINE_SHARE))
        if not self._slots.acquire(blocking=False):
            raise RegistryUnavailableError(
                f"the MLflow registry is not answering (could not {what}: every registry call "
                "is still waiting for it); try again later"
            )
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            log.warning("registry call timed out after %.1f s (could not %s)", timeout, what)
            raise RegistryUnavailableError(
                f"the MLflow registry did not answer within {timeout:.1f} s (could not {what}); "
                "try again later"
            ) from None

    def close(self) -> None:
        """Stop taking calls; calls still waiting for MLflow end with its HTTP timeout."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class RegistryClient:
    """Register, load, describe, list and delete edit models through the registry."""

    def __init__(self, registry: RegistryLike, calls: RegistryCalls | None = None) -> None:
        self.registry = registry
        self.calls = calls or RegistryCalls(threads=8, timeout_s=10.0)

    def register(
        self,
        edit_model: EditModel,
        *,
        request_id: str,
        image_bytes: bytes,
        principal: str,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
    ) -> RegisteredEditModel:
        """Store a freshly trained edit model, recording the ``principal`` that made it, its
        ``labels`` and its time-to-live; returns the registry's ``RegisteredEditModel`` (id,
        version, deduped, spooled). A retry with the same request id returns the first
        registration instead of creating a second version; deduplication only returns the
        same principal's edit models."""
        return self.registry.register(
            edit_model,
            request_id=request_id,
            input_image=image_bytes,
            principal=principal,
            labels=labels,
            ttl_s=ttl_s,
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
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
    ) -> EditModelInfo | None:
        """The registry's record of an edit model already fine-tuned on the same image bytes,
        base model, source prompt and training config (seed included), or None. Training again
        would reproduce exactly that model, so it is reused instead (one fine-tune serves
        unlimited edits); only ``principal``'s own, made with the same ``labels`` and
        time-to-live, and not expired. None also when the registry cannot be asked."""
        return self.registry.find_existing(
            image_sha256,
            base_fingerprint,
            training.fingerprint(),
            source_prompt,
            principal,
            labels=labels,
            ttl_s=ttl_s,
        )

    def load(self, edit_model_id: str) -> EditModel:
        """The verified edit model (from the registry's caches when it can)."""
        return self.registry.load(edit_model_id)

    def show(
        self, edit_model_id: str, principal: Principal, *, remaining_s: float | None = None
    ) -> EditModelInfo:
        """Describe an edit model ``principal`` may see (bounded, see the module docstring);
        another principal's is ``EditModelNotFoundError`` exactly as if it did not exist."""
        info = self.calls.run(
            f"describe edit model {edit_model_id}",
            lambda: self.registry.show(edit_model_id),
            remaining_s,
        )
        return self._visible(info, edit_model_id, principal)

    def describe_for_sampling(
        self, edit_model_id: str, principal: Principal, *, remaining_s: float | None
    ) -> EditModelInfo:
        """What a Sample needs to know before queueing (training mode, base model): from this
        replica's own verified copy when it has one, so that sampling a cached or spooled edit
        model never waits for, or fails with, MLflow; otherwise from the registry. Another
        principal's edit model is ``EditModelNotFoundError`` either way."""
        local = self.registry.cached_info(edit_model_id)
        if local is not None:
            return self._visible(local, edit_model_id, principal)
        return self.show(edit_model_id, principal, remaining_s=remaining_s)

    @staticmethod
    def _visible(info: EditModelInfo, edit_model_id: str, principal: Principal) -> EditModelInfo:
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
        labels: Mapping[str, str] | None = None,
        remaining_s: float | None = None,
    ) -> EditModelPage:
        """A page of the edit models ``principal`` may see (an admin's: everyone's), with
        every one of ``labels``."""
        return self.calls.run(
            "list edit models",
            lambda: self.registry.list_models(
                base_model=base_model,
                image_sha256=image_sha256,
                page_size=page_size,
                page_token=page_token,
                principal=None if principal.admin else principal.name,
                labels=labels,
            ),
            remaining_s,
        )

    def delete(
        self, edit_model_id: str, principal: Principal, *, remaining_s: float | None = None
    ) -> None:
        """Delete an edit model ``principal`` may see (else ``EditModelNotFoundError``). A
        deletion an outage interrupted is finished for whoever retries it: it was decided
        already, and the ID is refused to everyone meanwhile."""
        if not self.registry.deletion_pending(edit_model_id):
            self.show(edit_model_id, principal, remaining_s=remaining_s)
        self.calls.run(
            f"delete edit model {edit_model_id}",
            lambda: self.registry.delete(edit_model_id),
            remaining_s,
        )

    def close(self) -> None:
        self.calls.close()
