"""``EditModelRegistry``: register every fine-tune in MLflow, fetch it by ID on any replica, and
lose nothing when MLflow fails. The facade over the registry's parts; each has its own module.

Registration (``register``, here)
    1. Idempotency and dedupe, before any work: a version (or spool entry) tagged with the
       same request key is returned as is; one with the same dedupe key (image sha256, base
       fingerprint, training-config fingerprint, seed included) is returned with
       ``deduped=True``.
    2. Write-ahead: the complete entry (an MLflow pyfunc model directory whose
       ``artifacts/edit_model`` is the edit-model artifact, the input image, the contact sheet,
       and JSON metadata; ``registry.packaging``) is written to the local spool atomically
       (``registry.spool``). From here on the ID is usable on this replica and survives a
       crash.
    3. Publish (``registry.publish``): run, artifacts checked, version created last, racing
       duplicates reconciled, the copy moved into the cache, the entry removed. If MLflow is
       unavailable at step 1 or 3, the entry stays spooled, ``register`` returns
       ``spooled=True`` at once, and the flusher (``start``) retries with backoff.

Fetching (``fetch`` for a verified directory, ``load`` for an ``EditModel``;
``registry.fetch``): memory → spool → disk cache → download, every copy verified.

Threading: all public methods are thread-safe. Cancellation: none of the calls is
interruptible; each MLflow request is bounded by the HTTP timeout of ``RegistryConfig``, and
lookups whose answer is optional by ``lookup_timeout_s`` (``registry.lookups``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from forgedit.artifact import MANIFEST_FILE, EditModel, read_manifest, sha256_file
from forgedit.errors import InvalidInputError
from registry.backend import MlflowBackend
from registry.cache import DiskCache, MemoryCache
from registry.config import RegistryConfig
from registry.errors import (
    EditModelNotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from registry.fetch import EditModelFetcher
from registry.ids import new_edit_model_id, validate_edit_model_id
from registry.lookups import BoundedLookups
from registry.packaging import (
    ImageInput,
    write_contact_sheet,
    write_image,
    write_pyfunc_model,
)
from registry.publish import (
    FlushResult,
    Publisher,
    SpoolFlusher,
    publish_lock,
    publish_lock_within,
)
from registry.records import (
    TAG_PRINCIPAL,
    EditModelInfo,
    EditModelPage,
    FetchedEditModel,
    RegisteredEditModel,
    check_base_model_name,
    check_principal,
    check_request_id,
    check_same_request,
    check_sha256,
    check_user_tags,
    dedupe_inputs,
    dedupe_key,
    describe_manifest,
    info_from_tags,
    registered,
    request_key,
    training_params,
    version_info,
)
from registry.spool import EDIT_MODEL_SUBDIR, EXTRAS_DIR, MODEL_DIR, Spool, SpoolEntry

__all__ = ["EditModelRegistry", "FlushResult", "ImageInput"]

log = logging.getLogger(__name__)

_REQUEST_LOCK_STRIPES = 64
_LOOKUP_THREADS = 2  # optional lookups (registry.lookups) that may wait for MLflow at once


class EditModelRegistry:
    """Edit models in MLflow, with a local spool and caches. See the module docstring.

    Build one per process with a ``RegistryConfig``; call ``start()`` to run the spool flusher
    in a background thread and ``close()`` (or use it as a context manager) to stop it.
    """

    def __init__(self, config: RegistryConfig) -> None:
        config.apply_mlflow_defaults()
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._locks = data / "locks"
        self._backend = MlflowBackend(config)
        self._spool = Spool(data / "spool")
        self._disk = DiskCache(data / "cache", self._locks, config.cache_max_bytes)
        self._memory = MemoryCache(config.memory_cache_models)
        self._lookups = BoundedLookups(_LOOKUP_THREADS)
        self._fetcher = EditModelFetcher(
            config, self._backend, self._spool, self._disk, self._memory, self._lookups, self._locks
        )
        self._publisher = Publisher(config, self._backend, self._spool, self._disk, self._locks)
        self._flusher = SpoolFlusher(config, self._publisher, self._spool)
        # Striped locks: bounded memory however many request ids a long-lived server sees.
        self._request_locks = [threading.Lock() for _ in range(_REQUEST_LOCK_STRIPES)]

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher (idempotent). It registers spooled edit models as soon
        as MLflow answers, retrying with exponential backoff."""
        self._flusher.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the flusher. Spooled entries stay on disk for the next start."""
        self._flusher.close(timeout)

    def __enter__(self) -> EditModelRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- register ----------------------------------------------------------------------------

    def register(
        self,
        edit_model: EditModel | str | os.PathLike[str],
        *,
        request_id: str = "",
        input_image: ImageInput | None = None,
        contact_sheet: ImageInput | None = None,
        tags: Mapping[str, str] | None = None,
        dedupe: bool = True,
        principal: str = "",
    ) -> RegisteredEditModel:
        """Register an edit model (an ``EditModel`` or an edit-model directory).

        ``request_id`` makes the call idempotent: the same id returns the same edit model, even
        after a timeout or a crash; the same id with a different edit model (image, base
        model or training config) raises ``RegistryConflictError``. With ``dedupe``, an
        existing edit model of the same image bytes, base model, training config (seed
        included) and source prompt is returned with ``deduped=True`` instead of registering
        another.
        ``input_image`` and ``contact_sheet`` (bytes or a file path) are stored as artifacts.
        ``tags`` are extra run tags (at most 20; keys of letters, digits, ``_ - .``).
        ``principal`` (a service's token name) is recorded as ``forgedit.principal``; with it,
        the request id and deduplication only ever match that principal's edit models (another
        principal's request id is a conflict, never its model).

        Never raises ``RegistryUnavailableError``: when MLflow does not answer, the edit model
        is spooled and the result says ``spooled=True`` (its ID is usable here at once).
        Raises ``InvalidInputError`` for bad arguments and ``EditModelError`` for a malformed
        or corrupted edit-model directory.
        """
        # 1. Check inputs.
        check_request_id(request_id)
        if principal:
            check_principal(principal)
        user_tags = check_user_tags(tags or {})
        rkey = request_key(request_id) if request_id else None
        keys = _keys_of(edit_model)
        dkey = dedupe_key(*keys)
        # Without the image's hash there is nothing to deduplicate on.
        dedupe = dedupe and bool(keys[0])
        with self._request_lock(rkey or dkey):
            # 2. The same request, or the same edit model, registered before.
            existing, reachable = self._existing(rkey, dkey, dedupe, principal)
            if existing is not None:
                return existing
            # 3. Write-ahead into the spool.
            entry = self._spool_edit_model(
                edit_model, request_id, input_image, contact_sheet, user_tags, principal
            )
            # 4. Publish now, or leave it to the flusher.
            if reachable:
                try:
                    return self._publisher.publish(entry)
                except RegistryError as e:
                    self._note_spooled(entry.edit_model_id, e)
            else:
                self._note_spooled(entry.edit_model_id, None)
            self._flusher.wake()
            return RegisteredEditModel(entry.edit_model_id, None, spooled=True)

    def find_existing(
        self,
        image_sha256: str,
        base_model_fingerprint: str,
        config_fingerprint: str,
        source_prompt: str,
        principal: str | None = None,
    ) -> EditModelInfo | None:
        """An edit model of the same image bytes, base model, training config (seed included)
        and source prompt, registered or spooled here; ``None`` if there is none, or if MLflow
        does not answer (then training again is the safe choice, and ``register`` dedupes
        later). With ``principal``, only that principal's edit models."""
        check_sha256(image_sha256, "image_sha256")
        mine = {} if principal is None else {"principal": check_principal(principal)}
        dkey = dedupe_key(image_sha256, base_model_fingerprint, config_fingerprint, source_prompt)
        entry = self._spool.find(dedupe_key=dkey, principal=principal)
        if entry is not None:
            return info_from_tags(entry.tags, status="spooled", version=None, run_id=None)
        try:
            versions = self._lookups.ask(
                lambda: self._backend.find_versions(dedupe_key=dkey, **mine),
                self.config.lookup_timeout_s,
            )
        except RegistryUnavailableError:
            log.warning("MLflow unavailable: cannot look for an existing edit model to reuse")
            return None
        return version_info(versions[0]) if versions else None

    # -- read ----------------------------------------------------------------------------------

    def show(self, edit_model_id: str) -> EditModelInfo:
        """Describe one edit model (registered or spooled here). Raises
        ``InvalidEditModelIdError``, ``EditModelNotFoundError``, ``RegistryUnavailableError``."""
        edit_model_id = validate_edit_model_id(edit_model_id)
        entry = self._spool.get(edit_model_id)
        if entry is not None:
            return info_from_tags(entry.tags, status="spooled", version=None, run_id=None)
        versions = self._backend.find_versions(edit_model_id=edit_model_id)
        if not versions:
            raise EditModelNotFoundError(edit_model_id)
        return version_info(versions[0])

    def cached_info(self, edit_model_id: str) -> EditModelInfo | None:
        """Describe the edit model from this replica's own copy, without asking MLflow and
        without waiting for the copy's lock (a loader may hold it for as long as MLflow takes
        to answer): its spool entry, or its disk-cache copy whose manifest still matches the
        registered one. ``None`` if there is no such copy, so that the caller asks the
        registry instead.

        A registered copy is reported with status ``cached`` and the version it was cached
        at; a deletion through another replica is noticed when the copy is next loaded
        (``confirm_cached``). Raises ``InvalidEditModelIdError`` (before any I/O) and
        ``EditModelNotFoundError`` for an ID this replica knows to be deleted."""
        return self._fetcher.cached_info(validate_edit_model_id(edit_model_id))

    def list_models(
        self,
        *,
        base_model: str | None = None,
        image_sha256: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
        principal: str | None = None,
    ) -> EditModelPage:
        """Registered edit models, newest first, optionally filtered by base-model name, image
        sha256 and the ``principal`` that made them. The first page (no ``page_token``) also
        lists this replica's spooled edit models that match, ahead of the registered ones.
        Raises ``InvalidInputError`` for a bad filter, page size (1-1000) or token,
        ``RegistryUnavailableError``."""
        if not 1 <= page_size <= 1000:
            raise InvalidInputError(
                f"page size must be 1..1000, got {page_size}", field="page_size"
            )
        wanted: dict[str, str] = {}
        if base_model is not None:
            wanted["base_model_name"] = check_base_model_name(base_model)
        if image_sha256 is not None:
            wanted["image_sha256"] = check_sha256(image_sha256, "image_sha256")
        if principal is not None:
            wanted["principal"] = check_principal(principal)
        if page_token is not None and (
            not page_token
            or len(page_token) > 512
            or not all(c.isalnum() or c in "+/=_-" for c in page_token)
        ):
            raise InvalidInputError("page token is not one this service issued", field="page_token")
        items: list[EditModelInfo] = []
        if page_token is None:
            for entry in self._spool.entries():
                tags = entry.tags
                if all(tags.get(f"forgedit.{k}") == v for k, v in wanted.items()):
                    items.append(info_from_tags(tags, status="spooled", version=None, run_id=None))
        try:
            versions, token = self._backend.page_versions(wanted, page_size, page_token)
        except RegistryError as e:
            if page_token is not None and not isinstance(e, RegistryUnavailableError):
                raise InvalidInputError(
                    "page token is not one this service issued", field="page_token"
                ) from e
            raise
        items += [version_info(v) for v in versions]
        return EditModelPage(items, token)

    def fetch(self, edit_model_id: str) -> FetchedEditModel:
        """A verified local directory of the edit model (spool, disk cache or download).

        Every payload hash is checked on every call (a cached copy may rot). Raises
        ``InvalidEditModelIdError`` (before any I/O), ``EditModelNotFoundError``,
        ``RegistryIntegrityError`` (every download attempt was corrupted),
        ``RegistryUnavailableError`` (not cached here and MLflow does not answer).
        """
        return self._fetcher.fetch(validate_edit_model_id(edit_model_id))

    def load(
        self, edit_model_id: str, *, expected_base_fingerprint: str | None = None
    ) -> EditModel:
        """The edit model in memory (memory cache, else ``fetch`` path and
        ``forgedit.artifact.load_edit_model``, which verifies every hash).

        Raises what ``fetch`` raises, and ``BaseModelMismatchError`` (from
        ``load_edit_model``, the owner of that check) when ``expected_base_fingerprint``
        differs from the edit model's.
        """
        return self._fetcher.load(validate_edit_model_id(edit_model_id), expected_base_fingerprint)

    def add_contact_sheet(self, edit_model_id: str, contact_sheet: ImageInput) -> None:
        """Attach (or replace) the contact sheet of sampled edits, which exists only after
        sampling, i.e. after ``register`` returned. A spooled edit model keeps it in its spool
        entry and uploads it with the model.

        Being a convenience, it waits at most ``lookup_timeout_s`` for a publish of the same
        edit model in progress (the flusher may be stuck on a hung MLflow) and for the version
        lookup. Raises ``InvalidEditModelIdError``, ``EditModelNotFoundError``,
        ``RegistryUnavailableError`` (the caller may ignore it: the sheet is a convenience).
        """
        edit_model_id = validate_edit_model_id(edit_model_id)
        with publish_lock_within(
            self._locks, edit_model_id, self.config.lookup_timeout_s, self._flusher.stop_event
        ):
            entry = self._spool.get(edit_model_id)
            if entry is not None:
                write_contact_sheet(contact_sheet, entry.extras_dir)
                return
            versions = self._lookups.ask(
                lambda: self._backend.find_versions(edit_model_id=edit_model_id),
                self.config.lookup_timeout_s,
            )
            if not versions or not versions[0].run_id:
                raise EditModelNotFoundError(edit_model_id)
            staging = self._spool.new_staging()
            try:
                sheet = write_contact_sheet(contact_sheet, staging)
                self._backend.upload_file(versions[0].run_id, sheet, None)
            finally:
                self._spool.discard_staging(staging)

    # -- delete --------------------------------------------------------------------------------

    def delete(self, edit_model_id: str) -> None:
        """Delete the edit model everywhere: its spool entry, every model version with its ID,
        its run(s) and their artifact bytes in MLflow (the source of truth), then this
        replica's cached copies. From then on this replica refuses the ID without asking
        MLflow; other replicas refuse it at their next use of it (``confirm_cached``). A local
        copy the disk refuses to remove is logged and counted, not raised
        (``EditModelFetcher.forget_deleted``).

        Raises ``InvalidEditModelIdError``, ``EditModelNotFoundError``, and
        ``RegistryUnavailableError`` if MLflow does not answer (a spooled copy is deleted even
        then, and nothing is raised if that was the only copy).
        """
        edit_model_id = validate_edit_model_id(edit_model_id)
        with publish_lock(self._locks, edit_model_id):
            found = self._spool.get(edit_model_id) is not None
            if found:
                self._spool.remove(edit_model_id)
            try:
                versions = self._backend.find_versions(edit_model_id=edit_model_id)
                runs = {r.info.run_id: r for r in self._backend.find_runs(edit_model_id)}
            except RegistryUnavailableError:
                if found:
                    self._fetcher.forget_deleted(edit_model_id)
                    return
                # The edit model still exists in MLflow: keep serving this replica's copy.
                raise
            if not (found or versions or runs):
                raise EditModelNotFoundError(edit_model_id)
            # Versions first: once they are gone no replica serves the ID (each confirms it
            # with MLflow before using a copy), so this replica's copies can go too.
            for version in versions:
                self._backend.delete_version(version)
                if version.run_id and version.run_id not in runs:
                    runs[version.run_id] = self._backend.get_run(version.run_id)
            self._fetcher.forget_deleted(edit_model_id)
            for run in runs.values():
                self._backend.delete_run(run)
            log.info(
                "deleted edit model %s (%d version(s), %d run(s))",
                edit_model_id,
                len(versions),
                len(runs),
            )

    # -- spool -----------------------------------------------------------------------------------

    def spool_size(self) -> tuple[int, int]:
        """(edit models, bytes) waiting in this replica's spool."""
        return self._spool.update_metrics()

    def flush_spool(self) -> FlushResult:
        """Try to register every spooled edit model now, oldest first. Stops at the first
        "MLflow unavailable"; other failures are logged and the entry is kept for later."""
        return self._publisher.flush()

    # -- register: internals ---------------------------------------------------------------------

    def _note_spooled(self, edit_model_id: str, error: BaseException | None) -> None:
        count, nbytes = self._spool.update_metrics()
        log.warning(
            "edit model %s kept in the local spool (%s); %d edit model(s), %d bytes waiting "
            "for MLflow",
            edit_model_id,
            error or "MLflow unavailable",
            count,
            nbytes,
        )

    @contextmanager
    def _request_lock(self, key: str) -> Iterator[None]:
        """Serialise registrations of one request (or one dedupe key) within this process."""
        with self._request_locks[int(key[:8], 16) % _REQUEST_LOCK_STRIPES]:
            yield

    def _existing(
        self, rkey: str | None, dkey: str, dedupe: bool, principal: str = ""
    ) -> tuple[RegisteredEditModel | None, bool]:
        """(the edit model to return instead of registering, whether MLflow answered). With a
        ``principal``, deduplication looks at its edit models only, and its request id must not
        name another principal's."""
        scope = principal or None
        mine = {"principal": principal} if principal else {}
        if rkey is not None and (entry := self._spool.find(request_key=rkey)) is not None:
            check_same_request(entry.tags, dkey, principal)
            return RegisteredEditModel(entry.edit_model_id, None, spooled=True), True
        if dedupe and (entry := self._spool.find(dedupe_key=dkey, principal=scope)) is not None:
            return RegisteredEditModel(entry.edit_model_id, None, deduped=True, spooled=True), True

        def lookup() -> RegisteredEditModel | None:
            if rkey is not None and (versions := self._backend.find_versions(request_key=rkey)):
                check_same_request(versions[0].tags, dkey, principal)
                return registered(versions[0])
            if dedupe and (versions := self._backend.find_versions(dedupe_key=dkey, **mine)):
                return registered(versions[0], deduped=True)
            return None

        try:
            # Unanswered in time: spool (the flusher reconciles duplicates by request key).
            return self._lookups.ask(lookup, self.config.lookup_timeout_s), True
        except RegistryUnavailableError:
            return None, False

    def _spool_edit_model(
        self,
        edit_model: EditModel | str | os.PathLike[str],
        request_id: str,
        input_image: ImageInput | None,
        contact_sheet: ImageInput | None,
        user_tags: dict[str, str],
        principal: str = "",
    ) -> SpoolEntry:
        """Write the complete entry (pyfunc model, extras, metadata) into the spool; return it.
        Nothing is left behind if writing fails."""
        staging = self._spool.new_staging()
        try:
            manifest = write_pyfunc_model(staging / MODEL_DIR, edit_model)
            extras = staging / EXTRAS_DIR
            extras.mkdir()
            if input_image is not None:
                write_image(input_image, extras, "input_image")
            if contact_sheet is not None:
                write_contact_sheet(contact_sheet, extras)
            edit_model_id = new_edit_model_id()
            manifest_sha = sha256_file(staging / MODEL_DIR / EDIT_MODEL_SUBDIR / MANIFEST_FILE)
            tags = describe_manifest(manifest, edit_model_id, request_id, manifest_sha)
            if principal:
                tags[TAG_PRINCIPAL] = principal
            meta = {
                "edit_model_id": edit_model_id,
                "request_id": request_id,
                "tags": tags,
                "user_tags": user_tags,
                "params": training_params(manifest["training"]),
                "loss": [float(x) for x in manifest.get("loss_curve", [])],
                "timings": {str(k): float(v) for k, v in manifest.get("timings", {}).items()},
                "spooled_at": time.time(),
            }
            return self._spool.commit(staging, edit_model_id, meta)
        except BaseException:
            self._spool.discard_staging(staging)
            raise


def _keys_of(edit_model: EditModel | str | os.PathLike[str]) -> tuple[str, str, str, str]:
    """``dedupe_key``'s inputs of an edit model or an edit-model directory, without hashing
    payload."""
    if isinstance(edit_model, EditModel):
        return (
            edit_model.image_sha256,
            edit_model.base_model_fingerprint,
            edit_model.training.fingerprint(),
            edit_model.source_prompt,
        )
    return dedupe_inputs(read_manifest(edit_model))
