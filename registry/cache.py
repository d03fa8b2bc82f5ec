"""The replica's caches of fetched edit models.

Disk (``DATA/cache``), bounded in bytes, least recently used first out::

    models/<edit-model-id>/edit_model/   a verified edit-model directory
    models/<edit-model-id>/origin.json   what the registry vouched for when it was downloaded
                                         (manifest sha256, base-model fingerprint, version,
                                         principal; ``cache_origin``)
    tmp/                                 downloads in progress (discarded at start-up)
    trash/                               copies being removed

A copy is installed by an atomic rename after verification, and touched (mtime) on every use;
eviction removes the oldest copies until the total fits, skipping any copy whose lock is held
(a fetch or load in progress, in any process). A copy only ever appears or disappears whole
(renamed in; renamed into ``trash/``), so ``pinned`` can read one without its lock. Memory: an
``OrderedDict`` of loaded ``EditModel`` objects bounded by count (an SD-1.x delta is ~1.2 GB).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from forgedit.artifact import EditModel
from forgedit.durable import write_json_atomic
from registry.fsutil import private_dir, read_json, remove_orphans, remove_tree, tree_bytes
from registry.ids import is_edit_model_id
from registry.locks import LockBusy, file_lock
from registry.records import TAG_BASE_FINGERPRINT, TAG_MANIFEST, TAG_PRINCIPAL

log = logging.getLogger(__name__)

EDIT_MODEL_DIR = "edit_model"
ORIGIN_FILE = "origin.json"

CACHE_WRITE_ERRORS = Counter(
    "forgedit_registry_cache_write_errors_total",
    "Edit models registered but not kept in the replica's disk cache (the disk refused)",
)
CACHE_WRITE_ERRORS.inc(0)  # exported from start-up, so a rate() sees the first error

CACHE_DELETE_ERRORS = Counter(
    "forgedit_registry_cache_delete_errors_total",
    "Deleted edit models whose local copy the disk refused to remove (never served; removal "
    "is tried again at the next use of the ID)",
)
CACHE_DELETE_ERRORS.inc(0)

LOADS = Counter(
    "forgedit_registry_loads_total",
    "Edit models loaded for use, by where the copy came from: memory (already loaded), spool, "
    "cache (verified disk copy) or download; the hit rate of the replica's caches",
    ["source"],
)
for _source in ("memory", "spool", "cache", "download"):
    LOADS.labels(source=_source).inc(0)

CACHED_MODELS = Gauge(
    "forgedit_registry_cached_edit_models",
    "Edit models held in the replica's cache, by tier",
    ["tier"],
)


def cache_origin(tags: Mapping[str, str], version: Any = None) -> dict[str, str]:
    """What the registry vouched for, kept beside a cached copy (``origin.json``), from a
    version's tags. The version number and the principal (who may see it) let
    ``cached_info`` describe the copy while MLflow is down; neither is in the manifest."""
    return {
        "manifest_sha256": tags.get(TAG_MANIFEST, ""),
        "base_model_fingerprint": tags.get(TAG_BASE_FINGERPRINT, ""),
        "version": str(version or ""),
        "principal": tags.get(TAG_PRINCIPAL, ""),
    }


class DiskCache:
    """Verified edit-model copies on local disk, bounded by ``max_bytes``."""

    def __init__(self, root: Path, locks: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._models = root / "models"
        self._tmp = root / "tmp"
        self._trash = root / "trash"
        self._locks = locks
        for d in (self._models, self._tmp, self._trash):
            d.mkdir(parents=True, exist_ok=True)
        # Only dead processes' leftovers: other processes of the replica may share the cache.
        remove_orphans(self._tmp)
        remove_orphans(self._trash)
        self._update_metric()

    def lock(self, edit_model_id: str, *, blocking: bool = True) -> Any:
        """The per-ID lock that serialises download, install, use and eviction of one copy."""
        return file_lock(self._locks / f"cache-{edit_model_id}.lock", blocking=blocking)

    def path(self, edit_model_id: str) -> Path:
        return self._models / edit_model_id / EDIT_MODEL_DIR

    def origin(self, edit_model_id: str) -> dict[str, Any] | None:
        try:
            data = read_json(self._models / edit_model_id / ORIGIN_FILE)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @contextlib.contextmanager
    def pinned(self, edit_model_id: str) -> Iterator[Path | None]:
        """The cached copy as it is now, for reading without the ID's lock (which a loader may
        hold for seconds): a path through an open descriptor of its directory, which keeps
        naming this very copy while an install or an eviction renames it, so that its files
        are never read from two different copies. ``None`` if there is no copy."""
        try:
            fd = os.open(self._models / edit_model_id, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            yield None
            return
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def has(self, edit_model_id: str) -> bool:
        return self.path(edit_model_id).is_dir() and self.origin(edit_model_id) is not None

    def new_tmp(self) -> Path:
        return private_dir(self._tmp, "download")

    def install(self, edit_model_id: str, edit_model_dir: Path, origin: dict[str, Any]) -> Path:
        """Move a verified edit-model directory into the cache (caller holds the ID's lock)."""
        self.discard(edit_model_id)
        staging = private_dir(self._tmp, "install")
        os.replace(edit_model_dir, staging / EDIT_MODEL_DIR)
        write_json_atomic(staging / ORIGIN_FILE, origin)
        os.replace(staging, self._models / edit_model_id)
        self._update_metric()
        return self.path(edit_model_id)

    def touch(self, edit_model_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._models / edit_model_id)

    def discard(self, edit_model_id: str) -> None:
        """Remove the cached copy (caller holds the ID's lock, or the copy is known bad)."""
        remove_tree(self._models / edit_model_id, self._trash)
        self._update_metric()

    def evict(self, *, keep: str | None = None) -> list[str]:
        """Remove least recently used copies until the cache fits ``max_bytes``."""
        copies = []
        for child in self._models.iterdir():
            if is_edit_model_id(child.name):
                try:
                    copies.append((child.stat().st_mtime, child.name, tree_bytes(child)))
                except FileNotFoundError:
                    continue
        total = sum(size for _, _, size in copies)
        evicted = []
        for _, edit_model_id, size in sorted(copies):
            if total <= self.max_bytes:
                break
            if edit_model_id == keep:
                continue
            try:
                with self.lock(edit_model_id, blocking=False):
                    self.discard(edit_model_id)
            except LockBusy:
                continue  # in use right now; it will be older next time
            total -= size
            evicted.append(edit_model_id)
        if evicted:
            log.info(
                "edit-model cache evicted %d copies to stay under %d bytes",
                len(evicted),
                self.max_bytes,
            )
        return evicted

    def ids(self) -> list[str]:
        return [c.name for c in self._models.iterdir() if is_edit_model_id(c.name)]

    def _update_metric(self) -> None:
        CACHED_MODELS.labels(tier="disk").set(len(self.ids()))


class MemoryCache:
    """Loaded edit models, least recently used first out, at most ``max_models``."""

    def __init__(self, max_models: int) -> None:
        self.max_models = max_models
        self._items: OrderedDict[str, EditModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, edit_model_id: str) -> EditModel | None:
        with self._lock:
            model = self._items.get(edit_model_id)
            if model is not None:
                self._items.move_to_end(edit_model_id)
            return model

    def put(self, edit_model_id: str, model: EditModel) -> None:
        if self.max_models == 0:
            return
        with self._lock:
            self._items[edit_model_id] = model
            self._items.move_to_end(edit_model_id)
            while len(self._items) > self.max_models:
                self._items.popitem(last=False)
            CACHED_MODELS.labels(tier="memory").set(len(self._items))

    def discard(self, edit_model_id: str) -> None:
        with self._lock:
            self._items.pop(edit_model_id, None)
            CACHED_MODELS.labels(tier="memory").set(len(self._items))
