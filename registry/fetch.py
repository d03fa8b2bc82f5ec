"""Fetching an edit model by ID on any replica: memory → spool → disk cache → download.

A download goes to a private temporary directory, is checked against the version's
``forgedit.manifest_sha256`` tag, every payload sha256 in the manifest, and the registered
base-model fingerprint, then renamed into the cache. A corrupted download is discarded and
retried (``fetch_attempts``), never used; a cached copy that fails verification is discarded
and downloaded again. One file lock per ID makes concurrent fetches of the same ID (threads or
processes of a replica) download once. A cached copy is served only while MLflow still has the
ID, or while MLflow does not answer within ``confirm_timeout_s`` (``confirm_cached``).

Deletions (``forget_deleted``): an ID this replica deleted, or found deleted in MLflow, is
remembered (the last ``DELETED_REMEMBERED`` of them, until the process restarts) and refused
without asking MLflow, also during an outage; its copies are dropped, and a disk that refuses
to let go of one is logged and counted (``forgedit_registry_cache_delete_errors_total``),
never served, and tried again at the next use of the ID.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from forgedit.artifact import (
    MANIFEST_FILE,
    EditModel,
    load_edit_model,
    read_manifest,
    sha256_file,
    verify_files,
)
from forgedit.errors import BaseModelMismatchError, EditModelError
from registry.backend import MlflowBackend
from registry.cache import (
    CACHE_DELETE_ERRORS,
    EDIT_MODEL_DIR,
    LOADS,
    ORIGIN_FILE,
    DiskCache,
    MemoryCache,
    cache_origin,
)
from registry.config import RegistryConfig
from registry.errors import EditModelNotFoundError, RegistryIntegrityError, RegistryUnavailableError
from registry.fsutil import read_json
from registry.lookups import BoundedLookups
from registry.packaging import EDIT_MODEL_ARTIFACT_PATH
from registry.publish import publish_lock
from registry.records import (
    TAG_PRINCIPAL,
    EditModelInfo,
    FetchedEditModel,
    Source,
    describe_manifest,
    info_from_tags,
)
from registry.spool import Spool

log = logging.getLogger(__name__)
T = TypeVar("T")

DELETED_REMEMBERED = 4096  # deleted IDs a replica refuses without asking MLflow (~0.5 MB)


class EditModelFetcher:
    """The read side of ``EditModelRegistry``: verified local copies of edit models."""

    def __init__(
        self,
        config: RegistryConfig,
        backend: MlflowBackend,
        spool: Spool,
        disk: DiskCache,
        memory: MemoryCache,
        lookups: BoundedLookups,
        locks: Path,
    ) -> None:
        self.config = config
        self._backend = backend
        self._spool = spool
        self._disk = disk
        self._memory = memory
        self._lookups = lookups
        self._locks = locks
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._deleted_lock = threading.Lock()

    def fetch(self, edit_model_id: str) -> FetchedEditModel:
        """``EditModelRegistry.fetch`` for a validated ID: every payload hash is checked on
        every call (a cached copy may rot)."""
        self._refuse_if_deleted(edit_model_id)
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

    def load(self, edit_model_id: str, expected_base_fingerprint: str | None = None) -> EditModel:
        """``EditModelRegistry.load`` for a validated ID: the memory cache, else the ``fetch``
        path and ``forgedit.artifact.load_edit_model``, which verifies every hash and owns the
        check that the edit model fits ``expected_base_fingerprint``
        (``BaseModelMismatchError``)."""
        self._refuse_if_deleted(edit_model_id)
        model = self._memory.get(edit_model_id)
        if model is not None and self.still_exists(edit_model_id) is False:
            self.forget_deleted(edit_model_id)
            raise EditModelNotFoundError(edit_model_id)
        if model is not None and expected_base_fingerprint in (None, model.base_model_fingerprint):
            LOADS.labels(source="memory").inc()
            return model
        # Not in memory, or in memory but for another base model: load_edit_model says which.

        def read(path: Path) -> EditModel:
            return load_edit_model(path, expected_base_fingerprint=expected_base_fingerprint)

        spooled = self._read_spooled(edit_model_id, read)
        source: Source = "spool"
        if spooled is not None:
            model = spooled[1]
        else:
            with self._disk.lock(edit_model_id):
                path, source = self._cached_or_downloaded(edit_model_id)
                try:
                    model = read(path)
                except BaseModelMismatchError:
                    raise  # a sound copy, for another base model
                except EditModelError:
                    if source == "download":
                        raise
                    self._discard_corrupt(edit_model_id, "cached copy")
                    path, source = self._cached_or_downloaded(edit_model_id)
                    model = read(path)
        LOADS.labels(source=source).inc()
        self._memory.put(edit_model_id, model)
        return model

    def cached_info(self, edit_model_id: str) -> EditModelInfo | None:
        """``EditModelRegistry.cached_info`` for a validated ID: no MLflow call, and no wait
        for the copy's lock (a loader may hold it while MLflow does not answer). Raises
        ``EditModelNotFoundError`` for an ID known to be deleted."""
        self._refuse_if_deleted(edit_model_id)
        entry = self._spool.get(edit_model_id)
        if entry is not None:
            return info_from_tags(entry.tags, status="spooled", version=None, run_id=None)
        with self._disk.pinned(edit_model_id) as copy:
            return None if copy is None else self._describe_cached_copy(edit_model_id, copy)

    def forget_local(self, edit_model_id: str) -> None:
        """Drop this replica's cached copies (memory and disk) of the edit model."""
        self._memory.discard(edit_model_id)
        self._disk.discard(edit_model_id)

    def forget_deleted(self, edit_model_id: str) -> None:
        """The edit model no longer exists in the registry (deleted through this replica, or
        found gone): refuse it from now on without asking MLflow, and drop its copies. A disk
        that refuses is logged and counted, not raised (see the module docstring)."""
        with self._deleted_lock:
            self._deleted[edit_model_id] = None
            self._deleted.move_to_end(edit_model_id)
            while len(self._deleted) > DELETED_REMEMBERED:
                self._deleted.popitem(last=False)
        self._memory.discard(edit_model_id)
        try:
            self._disk.discard(edit_model_id)
        except OSError as e:
            CACHE_DELETE_ERRORS.inc()
            log.warning(
                "edit model %s is deleted but its cached copy could not be removed (%s: %s); "
                "it is never served, and removed at the next use of the ID",
                edit_model_id,
                type(e).__name__,
                e.strerror or e,
            )

    def still_exists(self, edit_model_id: str) -> bool | None:
        """Whether MLflow still has the ID (``None``: unknown, MLflow did not answer within
        ``confirm_timeout_s``, or ``confirm_cached`` is off)."""
        if self._spool.get(edit_model_id) is not None:
            return True  # spooled here, not yet in MLflow
        if not self.config.confirm_cached:
            return None
        try:
            versions = self._lookups.ask(
                lambda: self._backend.find_versions(edit_model_id=edit_model_id),
                self.config.confirm_timeout_s,
            )
        except RegistryUnavailableError:
            return None
        return bool(versions)

    # -- internals -------------------------------------------------------------------------------

    def _refuse_if_deleted(self, edit_model_id: str) -> None:
        """Raise ``EditModelNotFoundError`` for an ID known to be deleted, after trying again
        to remove a copy the disk refused to let go of before."""
        if edit_model_id not in self._deleted:
            return
        if self._disk.has(edit_model_id):
            with contextlib.suppress(OSError):  # counted when the deletion first failed
                self.forget_local(edit_model_id)
        raise EditModelNotFoundError(edit_model_id)

    def _describe_cached_copy(self, edit_model_id: str, copy: Path) -> EditModelInfo | None:
        """``cached_info`` of one disk copy (``DiskCache.pinned``); ``None`` if it is
        unreadable or not what the registry vouched for (the fetch path then replaces it)."""
        try:
            origin = read_json(copy / ORIGIN_FILE)
            if not isinstance(origin, dict) or "principal" not in origin:
                # (a copy cached before origin.json recorded its owner: the registry describes it)
                return None
            path = copy / EDIT_MODEL_DIR
            manifest_sha = sha256_file(path / MANIFEST_FILE)
            if manifest_sha != origin.get("manifest_sha256"):
                return None
            tags = describe_manifest(read_manifest(path), edit_model_id, "", manifest_sha)
        except (OSError, EditModelError, KeyError, TypeError, ValueError):
            return None  # unreadable: the fetch path will discard and download it
        # Who made it is a registry tag, not in the manifest: origin.json keeps it.
        tags[TAG_PRINCIPAL] = str(origin["principal"] or "")
        version = str(origin.get("version") or "")
        return info_from_tags(
            tags,
            status="cached",
            version=int(version) if version.isdigit() else None,
            run_id=None,
        )

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
        except BaseModelMismatchError:
            raise  # a sound copy, for another base model
        except EditModelError:
            with publish_lock(self._locks, edit_model_id):
                pass  # an in-flight publish has finished once we hold its lock
            if self._spool.get(edit_model_id) is None:
                return None
            raise

    def _cached_or_downloaded(self, edit_model_id: str) -> tuple[Path, Source]:
        """Path of a copy in the disk cache, downloading it if needed (caller holds the ID's
        lock). A cached copy's manifest is checked against the registered manifest hash here;
        its payload hashes are checked by the caller."""
        if self._disk.has(edit_model_id):
            if self.still_exists(edit_model_id) is False:
                self.forget_deleted(edit_model_id)
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
        """Download, verify and install the version's edit model, retrying a corrupted
        download up to ``fetch_attempts`` times; then ``RegistryIntegrityError``."""
        origin = cache_origin(version.tags, version.version)
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
                shutil.rmtree(tmp, ignore_errors=True)
        raise RegistryIntegrityError(
            f"edit model {edit_model_id} is corrupted in the registry: "
            f"{self.config.fetch_attempts} download(s) failed verification"
        )

    def _discard_corrupt(self, edit_model_id: str, what: str) -> None:
        log.warning("%s of edit model %s failed verification; discarded", what, edit_model_id)
        self.forget_local(edit_model_id)


def _verify_against_origin(path: Path, origin: Mapping[str, str], edit_model_id: str) -> None:
    """The copy is exactly what was registered: the manifest's sha256 matches the version tag,
    every payload matches the manifest, and the base fingerprint matches the registered one
    (an integrity check of the copy, not whether it fits a loaded base model). Raises
    ``EditModelError`` otherwise."""
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
