"""``EditModelRegistry``: register every fine-tune in MLflow, fetch it by ID on any replica, and
lose nothing when MLflow fails.

Registration (``register``)
    1. Idempotency and dedupe, before any work: a version (or spool entry) tagged with the
       same request key is returned as is; one with the same dedupe key (image sha256, base
       fingerprint, training-config fingerprint, seed included) is returned with
       ``deduped=True``.
    2. Write-ahead: the complete entry (an MLflow pyfunc model directory whose
       ``artifacts/edit_model`` is the edit-model artifact, the input image, the contact sheet,
       and JSON metadata) is written to the local spool atomically. From here on the ID is
       usable on this replica and survives a crash.
    3. Publish: one MLflow run per edit model (reused if an interrupted attempt left one):
       training config as params, the loss curve as step metrics, timings, ``forgedit.*``
       tags; artifacts uploaded file by file; their sizes checked against the manifest; the run
       finished; and only then the model version created (tagged like the run), so a reader
       never sees a version without its complete artifacts.
    4. Reconcile: if two attempts raced (same ID, or same request id from two replicas), every
       version but the oldest deletes itself, so exactly one version remains.
    5. The spool entry's edit model moves into the disk cache (a rename) and the entry is
       removed. If MLflow is unavailable at step 1 or 3, the entry stays spooled, ``register``
       returns ``spooled=True`` at once, and the flusher (``start``) retries with backoff.

Fetching (``fetch`` for a verified directory, ``load`` for an ``EditModel``)
    memory → spool → disk cache → download. A download goes to a private temporary directory,
    is checked against the version's ``forgedit.manifest_sha256`` tag, every payload sha256 in
    the manifest, and the registered base-model fingerprint, then renamed into the cache. A
    corrupted download is discarded and retried (``fetch_attempts``), never used; a cached copy
    that fails verification is discarded and downloaded again. One file lock per ID makes
    concurrent fetches of the same ID (threads or processes of a replica) download once.

Threading: all public methods are thread-safe. Cancellation: none of the calls is
interruptible; each MLflow request is bounded by the HTTP timeout of ``RegistryConfig``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import forgedit
from forgedit.artifact import (
    DELTA_FILE,
    EMBEDDING_FILE,
    MANIFEST_FILE,
    EditModel,
    load_edit_model,
    read_manifest,
    sha256_file,
    verify_files,
)
from forgedit.config import TrainingConfig
from forgedit.errors import BaseModelMismatchError, EditModelError, InvalidInputError
from registry.backend import MlflowBackend, redact
from registry.cache import CACHE_WRITE_ERRORS, DiskCache, MemoryCache
from registry.config import RegistryConfig
from registry.errors import (
    EditModelNotFoundError,
    RegistryConflictError,
    RegistryError,
    RegistryIntegrityError,
    RegistryUnavailableError,
)
from registry.fsutil import copy_file_durable
from registry.ids import new_edit_model_id, validate_edit_model_id
from registry.locks import LockBusy, file_lock
from registry.pyfunc_signature import sweep_signature
from registry.records import (
    MAX_USER_TAGS,
    TAG_BASE_FINGERPRINT,
    TAG_BASE_NAME,
    TAG_DEDUPE,
    TAG_ID,
    TAG_MANIFEST,
    TAG_PRINCIPAL,
    TAG_PROMPT,
    TAG_REQUEST_KEY,
    TAG_RUN_DATA,
    EditModelInfo,
    EditModelPage,
    FetchedEditModel,
    RegisteredEditModel,
    Source,
    check_base_model_name,
    check_principal,
    check_request_id,
    check_sha256,
    dedupe_key,
    describe_manifest,
    finite,
    info_from_tags,
    metric_key,
    request_key,
    training_params,
)
from registry.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)
T = TypeVar("T")

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_PATH = "model"  # the pyfunc model inside the run
EDIT_MODEL_ARTIFACT_PATH = "model/artifacts/edit_model"
INPUTS_ARTIFACT_PATH = "inputs"
CONTACT_SHEET_NAME = "contact_sheet.png"
_PYFUNC_REQUIREMENTS = (
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
)
_USER_TAG_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")

ImageInput = bytes | str | os.PathLike[str]
_REQUEST_LOCK_STRIPES = 64
_LOOKUP_THREADS = 2  # optional lookups (see _ask) that may wait for MLflow at once


@dataclass(frozen=True)
class FlushResult:
    registered: list[str]
    remaining: int


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
        # Striped locks: bounded memory however many request ids a long-lived server sees.
        self._request_locks = [threading.Lock() for _ in range(_REQUEST_LOCK_STRIPES)]
        self._lookup_slots = threading.BoundedSemaphore(_LOOKUP_THREADS)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher (idempotent). It registers spooled edit models as soon
        as MLflow answers, retrying with exponential backoff."""
        if self._flusher is not None and self._flusher.is_alive():
            return
        self._stop.clear()
        self._flusher = threading.Thread(
            target=self._flush_loop, name="registry-spool-flusher", daemon=True
        )
        self._flusher.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the flusher. Spooled entries stay on disk for the next start."""
        self._stop.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout)
            self._flusher = None

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
        check_request_id(request_id)
        if principal:
            check_principal(principal)
        user_tags = _check_user_tags(tags or {})
        rkey = request_key(request_id) if request_id else None
        keys = _keys_of(edit_model)
        dkey = dedupe_key(*keys)
        # Without the image's hash there is nothing to deduplicate on.
        dedupe = dedupe and bool(keys[0])
        with self._request_lock(rkey or dkey):
            existing, reachable = self._existing(rkey, dkey, dedupe, principal)
            if existing is not None:
                return existing
            entry = self._spool_edit_model(
                edit_model, request_id, input_image, contact_sheet, user_tags, principal
            )
            if reachable:
                try:
                    return self._publish(entry)
                except RegistryError as e:
                    self._note_spooled(entry.edit_model_id, e)
            else:
                self._note_spooled(entry.edit_model_id, None)
            self._wake.set()
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
            versions = self._ask(
                lambda: self._backend.find_versions(dedupe_key=dkey, **mine),
                self.config.lookup_timeout_s,
            )
        except RegistryUnavailableError:
            log.warning("MLflow unavailable: cannot look for an existing edit model to reuse")
            return None
        return _version_info(versions[0]) if versions else None

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
        return _version_info(versions[0])

    def cached_info(self, edit_model_id: str) -> EditModelInfo | None:
        """Describe the edit model from this replica's own copy, without asking MLflow: its
        spool entry, or its disk-cache copy whose manifest still matches the registered one.
        ``None`` if there is no such copy, or if the copy is busy (being downloaded, installed
        or evicted right now), so that the caller asks the registry instead.

        A registered copy is reported with status ``cached`` and the version it was cached
        at; a deletion through another replica is noticed when the copy is next loaded
        (``confirm_cached``). Raises ``InvalidEditModelIdError`` (before any I/O)."""
        edit_model_id = validate_edit_model_id(edit_model_id)
        entry = self._spool.get(edit_model_id)
        if entry is not None:
            return info_from_tags(entry.tags, status="spooled", version=None, run_id=None)
        try:
            with self._disk.lock(edit_model_id, blocking=False):
                return self._describe_cached_copy(edit_model_id)
        except LockBusy:
            return None

    def _describe_cached_copy(self, edit_model_id: str) -> EditModelInfo | None:
        """``cached_info`` of the disk copy (caller holds its lock)."""
        origin = self._disk.origin(edit_model_id)
        if origin is None or "principal" not in origin or not self._disk.has(edit_model_id):
            return None  # (a copy cached before owners were recorded: ask the registry)
        path = self._disk.path(edit_model_id)
        try:
            manifest_sha = sha256_file(path / MANIFEST_FILE)
            if manifest_sha != origin.get("manifest_sha256"):
                return None
            tags = describe_manifest(read_manifest(path), edit_model_id, "", manifest_sha)
            if origin["principal"]:
                tags[TAG_PRINCIPAL] = str(origin["principal"])
        except (OSError, EditModelError, KeyError, TypeError, ValueError):
            return None  # unreadable: the fetch path will discard and download it
        version = str(origin.get("version") or "")
        return info_from_tags(
            tags,
            status="cached",
            version=int(version) if version.isdigit() else None,
            run_id=None,
        )

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
        items += [_version_info(v) for v in versions]
        return EditModelPage(items, token)

    def fetch(self, edit_model_id: str) -> FetchedEditModel:
        """A verified local directory of the edit model (spool, disk cache or download).

        Every payload hash is checked on every call (a cached copy may rot). Raises
        ``InvalidEditModelIdError`` (before any I/O), ``EditModelNotFoundError``,
        ``RegistryIntegrityError`` (every download attempt was corrupted),
        ``RegistryUnavailableError`` (not cached here and MLflow does not answer).
        """
        edit_model_id = validate_edit_model_id(edit_model_id)
        spooled = self._read_spooled(edit_model_id, verify_files)
        if spooled is not None:
            path, manifest = spooled
            return FetchedEditModel(edit_model_id, path, "spool", manifest)
        with self._disk.lock(edit_model_id):
            path, source = self._cached_or_downloaded(edit_model_id)
            if source == "download":  # verified by _download a moment ago
                return FetchedEditModel(edit_model_id, path, "download", read_manifest(path))
            try:
                manifest = verify_files(path)
            except EditModelError:
                self._discard_corrupt(edit_model_id, "cached copy")
                path, source = self._cached_or_downloaded(edit_model_id)
                manifest = read_manifest(path)  # a fresh download, verified by _download
            return FetchedEditModel(edit_model_id, path, source, manifest)

    def load(
        self, edit_model_id: str, *, expected_base_fingerprint: str | None = None
    ) -> EditModel:
        """The edit model in memory (memory cache, else ``fetch`` path and
        ``forgedit.artifact.load_edit_model``, which verifies every hash).

        Raises what ``fetch`` raises, and ``BaseModelMismatchError`` when
        ``expected_base_fingerprint`` differs from the edit model's.
        """
        edit_model_id = validate_edit_model_id(edit_model_id)
        model = self._memory.get(edit_model_id)
        if model is not None and self._still_exists(edit_model_id) is False:
            self._forget_local(edit_model_id)
            raise EditModelNotFoundError(edit_model_id)
        if model is None:
            spooled = self._read_spooled(edit_model_id, load_edit_model)
            if spooled is not None:
                model = spooled[1]
            else:
                with self._disk.lock(edit_model_id):
                    path, source = self._cached_or_downloaded(edit_model_id)
                    try:
                        model = load_edit_model(path)
                    except EditModelError:
                        if source == "download":
                            raise
                        self._discard_corrupt(edit_model_id, "cached copy")
                        path, source = self._cached_or_downloaded(edit_model_id)
                        model = load_edit_model(path)
            self._memory.put(edit_model_id, model)
        if (
            expected_base_fingerprint is not None
            and model.base_model_fingerprint != expected_base_fingerprint
        ):
            raise BaseModelMismatchError(
                f"edit model {edit_model_id} was fine-tuned on base model "
                f"{model.base_model_name!r} (fingerprint {model.base_model_fingerprint[:12]}…), "
                f"not on the loaded one (fingerprint {expected_base_fingerprint[:12]}…)"
            )
        return model

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
        with self._publish_lock(edit_model_id, self.config.lookup_timeout_s):
            entry = self._spool.get(edit_model_id)
            if entry is not None:
                _write_input(contact_sheet, entry.extras_dir, CONTACT_SHEET_NAME, force_name=True)
                return
            versions = self._ask(
                lambda: self._backend.find_versions(edit_model_id=edit_model_id),
                self.config.lookup_timeout_s,
            )
            if not versions or not versions[0].run_id:
                raise EditModelNotFoundError(edit_model_id)
            staging = self._spool.new_staging()
            try:
                sheet = _write_input(contact_sheet, staging, CONTACT_SHEET_NAME, force_name=True)
                self._backend.upload_file(versions[0].run_id, sheet, None)
            finally:
                self._spool.discard_staging(staging)

    # -- delete --------------------------------------------------------------------------------

    def delete(self, edit_model_id: str) -> None:
        """Delete the edit model everywhere: its spool entry, every model version with its ID,
        its run(s) and their artifact bytes, and this replica's cached copies. Other replicas
        stop serving their cached copies at their next fetch (``confirm_cached``).

        Raises ``InvalidEditModelIdError``, ``EditModelNotFoundError``, and
        ``RegistryUnavailableError`` if MLflow does not answer (a spooled copy is deleted even
        then, and nothing is raised if that was the only copy).
        """
        edit_model_id = validate_edit_model_id(edit_model_id)
        with file_lock(self._locks / f"publish-{edit_model_id}.lock"):
            found = self._spool.get(edit_model_id) is not None
            if found:
                self._spool.remove(edit_model_id)
            try:
                versions = self._backend.find_versions(edit_model_id=edit_model_id)
                runs = {r.info.run_id: r for r in self._backend.find_runs(edit_model_id)}
            except RegistryUnavailableError:
                if found:
                    self._forget_local(edit_model_id)
                    return
                # The edit model still exists in MLflow: keep serving this replica's copy.
                raise
            self._forget_local(edit_model_id)
            for version in versions:
                self._backend.delete_version(version)
                if version.run_id and version.run_id not in runs:
                    runs[version.run_id] = self._backend.get_run(version.run_id)
            for run in runs.values():
                self._backend.delete_run(run)
            if not (found or versions or runs):
                raise EditModelNotFoundError(edit_model_id)
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
        registered = []
        for entry in self._spool.entries():
            try:
                result = self._publish(entry)
            except RegistryUnavailableError:
                break
            except RegistryError as e:
                log.error("could not register spooled edit model %s: %s", entry.edit_model_id, e)
                continue
            registered.append(result.edit_model_id)
        count, nbytes = self._spool.update_metrics()
        if registered:
            log.info(
                "registered %d spooled edit model(s); %d still waiting (%d bytes)",
                len(registered),
                count,
                nbytes,
            )
        return FlushResult(registered, count)

    def _flush_loop(self) -> None:
        backoff = self.config.flush_initial_backoff_s
        while not self._stop.is_set():
            if self._spool.entries():
                try:
                    remaining = self.flush_spool().remaining
                except Exception:  # never let one bad entry kill the flusher
                    log.exception("the spool flusher failed; retrying later")
                    remaining = 1
                if remaining:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.config.flush_max_backoff_s)
                    continue
            backoff = self.config.flush_initial_backoff_s
            # Wake on a new spooled entry, or poll now and then (another process may spool).
            self._wake.wait(self.config.flush_max_backoff_s)
            self._wake.clear()

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

    # -- register: internals ---------------------------------------------------------------------

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
            _check_same(entry.tags, dkey, principal)
            return RegisteredEditModel(entry.edit_model_id, None, spooled=True), True
        if dedupe and (entry := self._spool.find(dedupe_key=dkey, principal=scope)) is not None:
            return RegisteredEditModel(entry.edit_model_id, None, deduped=True, spooled=True), True

        def lookup() -> RegisteredEditModel | None:
            if rkey is not None and (versions := self._backend.find_versions(request_key=rkey)):
                _check_same(versions[0].tags, dkey, principal)
                return _registered(versions[0])
            if dedupe and (versions := self._backend.find_versions(dedupe_key=dkey, **mine)):
                return _registered(versions[0], deduped=True)
            return None

        try:
            # Unanswered in time: spool (the flusher reconciles duplicates by request key).
            return self._ask(lookup, self.config.lookup_timeout_s), True
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
        staging = self._spool.new_staging()
        try:
            manifest = _write_pyfunc_model(staging / "model", edit_model)
            extras = staging / "extras"
            extras.mkdir()
            if input_image is not None:
                _write_input(input_image, extras, "input_image")
            if contact_sheet is not None:
                _write_input(contact_sheet, extras, CONTACT_SHEET_NAME, force_name=True)
            edit_model_id = new_edit_model_id()
            manifest_sha = sha256_file(staging / "model/artifacts/edit_model" / MANIFEST_FILE)
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
                "spooled_at": _now(),
            }
            return self._spool.commit(staging, edit_model_id, meta)
        except BaseException:
            self._spool.discard_staging(staging)
            raise

    def _publish(self, entry: SpoolEntry) -> RegisteredEditModel:
        """Register one spool entry in MLflow (idempotent, crash-safe); remove it on success."""
        edit_model_id = entry.edit_model_id
        with file_lock(self._locks / f"publish-{edit_model_id}.lock"):
            if self._spool.get(edit_model_id) is None:  # published meanwhile by another process
                versions = self._backend.find_versions(edit_model_id=edit_model_id)
                if not versions:
                    raise EditModelNotFoundError(edit_model_id)  # deleted meanwhile
                return _registered(versions[0])
            tags = entry.tags
            versions = self._backend.find_versions(edit_model_id=edit_model_id)
            version = versions[0] if versions else self._upload_and_create_version(entry)
            winner = self._reconcile(version, tags.get(TAG_REQUEST_KEY) or None)
            if winner.tags.get(TAG_ID) == edit_model_id:
                self._adopt_into_cache(entry, _origin(tags, winner.version))
            self._spool.remove(edit_model_id)
        log.info(
            "registered edit model %s as version %s of %r",
            winner.tags.get(TAG_ID),
            winner.version,
            self.config.registered_model,
        )
        return _registered(winner)

    def _upload_and_create_version(self, entry: SpoolEntry) -> Any:
        tags = entry.tags
        meta = entry.meta
        runs = self._backend.find_runs(entry.edit_model_id)
        if runs:  # an earlier attempt died part-way: finish that run instead of leaving it
            run = runs[0]
        else:
            run = self._backend.create_run(
                entry.edit_model_id, {**meta.get("user_tags", {}), **tags}
            )
        run_id = run.info.run_id
        if run.data.tags.get(TAG_RUN_DATA) != "true":
            metrics = [
                ("loss", float(v), step) for step, v in enumerate(meta.get("loss", [])) if finite(v)
            ]
            metrics += [
                (metric_key(f"time_{k}"), float(v), 0)
                for k, v in meta.get("timings", {}).items()
                if finite(v)
            ]
            self._backend.log_run_data(run_id, meta.get("params", {}), metrics, {})
            self._backend.set_tag(run_id, TAG_RUN_DATA, "true")
        self._backend.upload_dir(run_id, entry.model_dir, MODEL_ARTIFACT_PATH)
        for extra in sorted(entry.extras_dir.iterdir()):
            where = None if extra.name == CONTACT_SHEET_NAME else INPUTS_ARTIFACT_PATH
            self._backend.upload_file(run_id, extra, where)
        # The upload is complete only if MLflow holds every byte we meant to store.
        expected = {
            name: (entry.edit_model_dir / name).stat().st_size
            for name in (DELTA_FILE, EMBEDDING_FILE, MANIFEST_FILE)
        }
        stored = self._backend.artifact_sizes(run_id, EDIT_MODEL_ARTIFACT_PATH)
        if any(stored.get(name) != size for name, size in expected.items()):
            raise RegistryUnavailableError(
                f"the upload of edit model {entry.edit_model_id} is incomplete; it stays "
                "spooled and will be uploaded again"
            )
        self._backend.finish_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        description = (
            f"Forgedit edit model {entry.edit_model_id} on base model "
            f"{tags.get(TAG_BASE_NAME, '')!r}: {tags.get(TAG_PROMPT, '')!r}"
        )
        return self._backend.create_version(run_id, source, tags, description)

    def _reconcile(self, mine: Any, rkey: str | None) -> Any:
        """Exactly one version per edit model / request: the oldest wins, losers delete
        themselves (and their run, unless the winner shares it)."""
        candidates = {
            v.version: v for v in self._backend.find_versions(edit_model_id=mine.tags[TAG_ID])
        }
        if rkey:
            candidates.update({v.version: v for v in self._backend.find_versions(request_key=rkey)})
        candidates.setdefault(mine.version, mine)
        winner = min(candidates.values(), key=lambda v: int(v.version))
        if int(winner.version) != int(mine.version):
            log.warning(
                "edit model version %s duplicates version %s; deleting the duplicate",
                mine.version,
                winner.version,
            )
            self._backend.delete_version(mine)
            if mine.run_id and mine.run_id != winner.run_id:
                self._backend.delete_run(self._backend.get_run(mine.run_id))
        return winner

    def _adopt_into_cache(self, entry: SpoolEntry, origin: dict[str, str]) -> None:
        """The registering replica keeps its copy: move it from the spool into the cache.

        The version exists by now, so this is only an optimisation: if the disk refuses (full,
        read-only, permissions), the registration still succeeds, the copy is dropped with the
        spool entry, a warning is logged and ``forgedit_registry_cache_write_errors_total``
        counts it; a later fetch downloads the model again."""
        edit_model_id = entry.edit_model_id
        try:
            with self._disk.lock(edit_model_id):
                tmp = self._disk.new_tmp()
                try:
                    if self._spool.take_edit_model(entry, tmp / "edit_model"):
                        self._disk.install(edit_model_id, tmp / "edit_model", origin)
                finally:
                    _rmtree(tmp)
                self._disk.evict(keep=edit_model_id)
        except OSError as e:
            CACHE_WRITE_ERRORS.inc()
            log.warning(
                "edit model %s is registered but could not be kept in the local cache (%s); "
                "it will be downloaded when next used",
                edit_model_id,
                redact(f"{type(e).__name__}: {e.strerror or e}"),
            )

    # -- fetch: internals ------------------------------------------------------------------------

    def _read_spooled(self, edit_model_id: str, read: Callable[[Path], T]) -> tuple[Path, T] | None:
        """``read`` the spooled edit model; ``None`` if it is not (or no longer) spooled.

        The flusher may publish the entry meanwhile, moving its files into the cache; a read
        that fails then waits for that publish to finish and reports "not spooled", so the
        caller finds the copy in the cache instead of failing."""
        entry = self._spool.get(edit_model_id)
        if entry is None:
            return None
        try:
            return entry.edit_model_dir, read(entry.edit_model_dir)
        except EditModelError:
            with file_lock(self._locks / f"publish-{edit_model_id}.lock"):
                pass  # an in-flight publish has finished once we hold its lock
            if self._spool.get(edit_model_id) is None:
                return None
            raise

    def _cached_or_downloaded(self, edit_model_id: str) -> tuple[Path, Source]:
        """Path of a copy in the disk cache, downloading it if needed (caller holds the ID's
        lock). A cached copy's manifest is checked against the registered manifest hash here;
        its payload hashes are checked by the caller."""
        if self._disk.has(edit_model_id):
            if self._still_exists(edit_model_id) is False:
                self._forget_local(edit_model_id)
                raise EditModelNotFoundError(edit_model_id)
            path = self._disk.path(edit_model_id)
            origin = self._disk.origin(edit_model_id) or {}
            try:
                if sha256_file(path / MANIFEST_FILE) == origin.get("manifest_sha256"):
                    self._disk.touch(edit_model_id)
                    return path, "cache"
            except FileNotFoundError:
                pass
            self._discard_corrupt(edit_model_id, "cached copy")
        versions = self._backend.find_versions(edit_model_id=edit_model_id)
        if not versions:
            raise EditModelNotFoundError(edit_model_id)
        return self._download(edit_model_id, versions[0]), "download"

    def _download(self, edit_model_id: str, version: Any) -> Path:
        origin = _origin(version.tags, version.version)
        for attempt in range(1, self.config.fetch_attempts + 1):
            tmp = self._disk.new_tmp()
            try:
                local = self._backend.download_dir(version.run_id, EDIT_MODEL_ARTIFACT_PATH, tmp)
                _verify_against_origin(local, origin, edit_model_id)
                path = self._disk.install(edit_model_id, local, origin)
                self._disk.evict(keep=edit_model_id)
                return path
            except EditModelError as e:
                log.warning(
                    "download %d/%d of edit model %s was corrupted (%s); discarded",
                    attempt,
                    self.config.fetch_attempts,
                    edit_model_id,
                    e,
                )
            finally:
                _rmtree(tmp)
        raise RegistryIntegrityError(
            f"edit model {edit_model_id} is corrupted in the registry: "
            f"{self.config.fetch_attempts} download(s) failed verification"
        )

    def _discard_corrupt(self, edit_model_id: str, what: str) -> None:
        log.warning("%s of edit model %s failed verification; discarded", what, edit_model_id)
        self._forget_local(edit_model_id)

    def _forget_local(self, edit_model_id: str) -> None:
        self._memory.discard(edit_model_id)
        self._disk.discard(edit_model_id)

    def _still_exists(self, edit_model_id: str) -> bool | None:
        """Whether MLflow still has the ID (``None``: unknown, MLflow did not answer within
        ``confirm_timeout_s``, see ``_ask``)."""
        if self._spool.get(edit_model_id) is not None:
            return True  # spooled here, not yet in MLflow
        if not self.config.confirm_cached:
            return None
        try:
            versions = self._ask(
                lambda: self._backend.find_versions(edit_model_id=edit_model_id),
                self.config.confirm_timeout_s,
            )
        except RegistryUnavailableError:
            return None
        return bool(versions)

    @contextmanager
    def _publish_lock(self, edit_model_id: str, timeout_s: float) -> Iterator[None]:
        """The edit model's publish lock, waited for at most ``timeout_s``; then
        ``RegistryUnavailableError`` (its holder is waiting for MLflow)."""
        path = self._locks / f"publish-{edit_model_id}.lock"
        deadline = _monotonic() + timeout_s
        while True:
            try:
                with file_lock(path, blocking=False):
                    yield
                return
            except LockBusy:
                if _monotonic() >= deadline:
                    raise RegistryUnavailableError(
                        f"edit model {edit_model_id} is being published to MLflow, which is "
                        "not answering; try again later"
                    ) from None
                self._stop.wait(0.05)

    def _ask(self, question: Callable[[], T], timeout_s: float) -> T:
        """``question()`` (an MLflow lookup whose answer is optional to the caller), waited for
        at most ``timeout_s`` on at most ``_LOOKUP_THREADS`` threads.

        Against a hung MLflow a lookup would otherwise hold the device's worker for MLflow's
        HTTP timeout and retries (minutes). Raises ``RegistryUnavailableError`` when it does
        not answer in time, or at once while earlier lookups still wait; the thread left
        waiting ends with MLflow's HTTP timeout."""
        if not self._lookup_slots.acquire(blocking=False):
            raise RegistryUnavailableError(
                "the MLflow registry is not answering (earlier lookups still wait for it)"
            )
        answer: list[Any] = []
        done = threading.Event()

        def ask() -> None:
            try:
                answer.append(question())
            except BaseException as e:  # re-raised in the caller
                answer.append(e)
            finally:
                self._lookup_slots.release()
                done.set()

        threading.Thread(target=ask, name="registry-lookup", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("MLflow did not answer a lookup within %.1f s", timeout_s)
            raise RegistryUnavailableError(
                f"the MLflow registry did not answer within {timeout_s:g} s; try again later"
            )
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]


# -- helpers -----------------------------------------------------------------------------------


def _keys_of(edit_model: EditModel | str | os.PathLike[str]) -> tuple[str, str, str, str]:
    """(image sha256, base fingerprint, training-config fingerprint, source prompt), without
    hashing payload."""
    if isinstance(edit_model, EditModel):
        return (
            edit_model.image_sha256,
            edit_model.base_model_fingerprint,
            edit_model.training.fingerprint(),
            edit_model.source_prompt,
        )
    manifest = read_manifest(edit_model)
    try:
        config_fp = TrainingConfig.from_dict(manifest["training"]).fingerprint()
    except (KeyError, TypeError, ValueError) as e:
        raise EditModelError(
            f"edit model manifest has an unreadable training config: {e}"
        ) from None
    base = manifest.get("base_model") or {}
    return (
        str(manifest.get("image_sha256", "")),
        str(base.get("fingerprint", "")),
        config_fp,
        str(manifest.get("source_prompt", "")),
    )


def _write_pyfunc_model(
    model_dir: Path, edit_model: EditModel | str | os.PathLike[str]
) -> dict[str, Any]:
    """Write the MLflow pyfunc model directory with the edit model inside; return its verified
    manifest.

    ``mlflow.pyfunc.save_model`` would copy the artifact through a temporary directory; for a
    1.2 GB delta that is two extra full copies. So it is given an empty placeholder directory
    and the edit model is written straight into ``artifacts/edit_model`` afterwards (the
    MLmodel file records only that relative path, not the content).
    """
    placeholder = model_dir.parent / "edit_model"
    placeholder.mkdir()
    with warnings.catch_warnings():
        # MLflow nags about type hints, which predict() leaves out on purpose (pyfunc_model.py).
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc

        mlflow.pyfunc.save_model(
            path=str(model_dir),
            python_model=str(PYFUNC_CODE),
            artifacts={"edit_model": str(placeholder)},
            pip_requirements=_pip_requirements(),
            code_paths=[str(Path(forgedit.__file__).parent)],
            # Declares the keys a loader may override with load_model(model_config=...);
            # empty means "from the environment, then the default" (pyfunc_model.py).
            model_config={"base_model_dir": "", "vae_dir": "", "device": "", "precision": ""},
            signature=sweep_signature(),
        )
    placeholder.rmdir()
    target = model_dir / "artifacts" / "edit_model"
    if isinstance(edit_model, EditModel):
        edit_model.save(target)  # hashes what it writes: no second pass needed
        return read_manifest(target)
    source = Path(edit_model)
    target.mkdir(parents=True, exist_ok=True)
    for name in (DELTA_FILE, EMBEDDING_FILE, MANIFEST_FILE):
        if not (source / name).is_file():
            raise EditModelError(f"edit model is incomplete: {name} is missing")
        copy_file_durable(source / name, target / name)
    return verify_files(target)  # the copy, not the source, is what we will upload


def _pip_requirements() -> list[str]:
    reqs = []
    for name in _PYFUNC_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _write_input(source: ImageInput, directory: Path, name: str, force_name: bool = False) -> Path:
    """Store an image (bytes or a file) in ``directory`` atomically; return its path. The
    suffix follows the image's magic bytes unless ``force_name``."""
    if isinstance(source, bytes):
        head = source[:16]
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"the {name} file does not exist", field=name)
        with open(path, "rb") as f:
            head = f.read(16)
    target = directory / (name if force_name else name + _image_suffix(head))
    tmp = directory / f".{target.name}.tmp"
    if isinstance(source, bytes):
        with open(tmp, "wb") as out:
            out.write(source)
            out.flush()
            os.fsync(out.fileno())
    else:
        copy_file_durable(Path(source), tmp)
    os.replace(tmp, target)
    return target


def _image_suffix(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return ".bin"


def _check_user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    if len(tags) > MAX_USER_TAGS:
        raise InvalidInputError(
            f"at most {MAX_USER_TAGS} tags are accepted, got {len(tags)}", field="tags"
        )
    out = {}
    for key, value in tags.items():
        if (
            not isinstance(key, str)
            or not 1 <= len(key) <= 64
            or not set(key) <= _USER_TAG_KEY
            or key.startswith(("forgedit.", "mlflow."))
        ):
            raise InvalidInputError(
                f"tag key {str(key)[:40]!r} is not accepted: use 1-64 letters, digits, '_', '-' "
                "or '.', not starting with 'forgedit.' or 'mlflow.'",
                field="tags",
            )
        if not isinstance(value, str) or len(value) > 1000:
            raise InvalidInputError(
                f"tag {key!r} must be text of at most 1000 characters", field="tags"
            )
        out[key] = value
    return out


def _check_same(tags: Mapping[str, str], dkey: str, principal: str = "") -> None:
    if principal and tags.get(TAG_PRINCIPAL, "") != principal:
        # Another principal's request: say nothing about its edit model.
        raise RegistryConflictError("request id is already in use; use a new request id")
    if tags.get(TAG_DEDUPE) != dkey:
        raise RegistryConflictError(
            f"request id was already used to register edit model {tags.get(TAG_ID)} from a "
            "different image, base model or training config; use a new request id"
        )


def _registered(version: Any, deduped: bool = False) -> RegisteredEditModel:
    return RegisteredEditModel(version.tags[TAG_ID], int(version.version), deduped=deduped)


def _version_info(version: Any) -> EditModelInfo:
    return info_from_tags(
        version.tags, status="registered", version=int(version.version), run_id=version.run_id
    )


def _origin(tags: Mapping[str, str], version: Any = None) -> dict[str, str]:
    """What the registry vouched for, kept beside a cached copy (``origin.json``). The version
    number lets ``cached_info`` describe the copy while MLflow is down."""
    return {
        "manifest_sha256": tags.get(TAG_MANIFEST, ""),
        "base_model_fingerprint": tags.get(TAG_BASE_FINGERPRINT, ""),
        "version": str(version or ""),
        # Who may see it: a copy described from disk while MLflow is down keeps its owner.
        "principal": tags.get(TAG_PRINCIPAL, ""),
    }


def _verify_against_origin(path: Path, origin: Mapping[str, str], edit_model_id: str) -> None:
    """The copy is exactly what was registered: the manifest's sha256 matches the version tag,
    every payload matches the manifest, and the base fingerprint matches the registered one.
    Raises ``EditModelError`` otherwise."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file() or sha256_file(manifest_file) != origin["manifest_sha256"]:
        raise EditModelError(
            f"edit model {edit_model_id}: {MANIFEST_FILE} differs from the registered one"
        )
    manifest = verify_files(path)
    fingerprint = (manifest.get("base_model") or {}).get("fingerprint")
    if fingerprint != origin["base_model_fingerprint"]:
        raise EditModelError(
            f"edit model {edit_model_id}: base-model fingerprint differs from the registered one"
        )


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _now() -> float:
    import time

    return time.time()


def _monotonic() -> float:
    import time

    return time.monotonic()
