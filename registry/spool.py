"""The local spool: edit models waiting to be registered in MLflow, durable across restarts.

Every registration goes through the spool (write-ahead): the complete entry is written first,
then published to MLflow, then removed. So an edit model is never lost, whether MLflow is down,
times out, or this process dies halfway through an upload; and its ID is usable on this replica
from the moment ``register`` returns (``fetch`` serves spooled entries).

Layout under ``ROOT`` (= ``DATA/spool``)::

    entries/<edit-model-id>/entry.json     metadata: tags, params, metrics, request id, time
    entries/<edit-model-id>/model/         the MLflow pyfunc model directory; its
                                           artifacts/edit_model/ is the edit-model artifact
    entries/<edit-model-id>/extras/        the input image and the contact sheet
    staging/                               entries being written (discarded at start-up)
    trash/                                 entries being removed

An entry becomes visible only by an atomic rename of a fully written and fsynced directory
from ``staging/`` to ``entries/``, and disappears by an atomic rename into ``trash/``, so a
reader never sees a partial entry.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from forgedit.durable import fsync_dir, fsync_tree, write_json_atomic
from registry.fsutil import private_dir, read_json, remove_orphans, remove_tree, tree_bytes
from registry.ids import is_edit_model_id
from registry.records import TAG_DEDUPE, TAG_PRINCIPAL, TAG_REQUEST_KEY

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
MODEL_DIR = "model"
EDIT_MODEL_SUBDIR = "artifacts/edit_model"
EXTRAS_DIR = "extras"

# One set of series per process (the server exposes the default Prometheus registry). With
# several registries in one process (tests) the last one to change its spool sets the value.
SPOOLED_MODELS = Gauge(
    "forgedit_registry_spooled_edit_models",
    "Edit models waiting in the local spool for MLflow to accept them",
)
SPOOLED_BYTES = Gauge(
    "forgedit_registry_spooled_bytes",
    "Bytes of edit models waiting in the local spool",
)


@dataclass(frozen=True)
class SpoolEntry:
    """A spooled edit model. ``meta`` is entry.json: ``tags``, ``params``, ``metrics``
    (``loss`` list, ``timings`` dict), ``request_id``, ``spooled_at``."""

    edit_model_id: str
    path: Path
    meta: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def edit_model_dir(self) -> Path:
        return self.path / MODEL_DIR / EDIT_MODEL_SUBDIR

    @property
    def extras_dir(self) -> Path:
        return self.path / EXTRAS_DIR

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.meta.get("tags", {}))


class Spool:
    """Durable, crash-safe storage of edit models not yet registered. Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._entries = root / "entries"
        self._staging = root / "staging"
        self._trash = root / "trash"
        for d in (self._entries, self._staging, self._trash):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Leftovers of a crash: a half-written staging dir was never an entry; finish removals.
        # (Only dead processes' leftovers: other processes of the replica may share the dir.)
        remove_orphans(self._staging)
        remove_orphans(self._trash)
        self.update_metrics()

    def new_staging(self) -> Path:
        """An empty private directory to build an entry in (then ``commit`` it)."""
        return private_dir(self._staging, "entry")

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, edit_model_id: str, meta: dict[str, Any]) -> SpoolEntry:
        """Write ``entry.json``, fsync everything and publish the entry atomically."""
        write_json_atomic(staging / ENTRY_FILE, meta)
        fsync_tree(staging)
        target = self._entries / edit_model_id
        staging.rename(target)  # IDs are fresh: the target never exists
        fsync_dir(self._entries)
        self.update_metrics()
        return SpoolEntry(edit_model_id, target, meta)

    def get(self, edit_model_id: str) -> SpoolEntry | None:
        path = self._entries / edit_model_id
        try:
            meta = read_json(path / ENTRY_FILE)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            log.error(
                "spool entry %s has unreadable metadata; leaving it for inspection", edit_model_id
            )
            return None
        return SpoolEntry(edit_model_id, path, meta)

    def entries(self) -> list[SpoolEntry]:
        """All entries, oldest first."""
        found = []
        for child in self._entries.iterdir():
            if is_edit_model_id(child.name) and (entry := self.get(child.name)) is not None:
                found.append(entry)
        return sorted(found, key=lambda e: float(e.meta.get("spooled_at", 0.0)))

    def find(
        self,
        *,
        request_key: str | None = None,
        dedupe_key: str | None = None,
        principal: str | None = None,
    ) -> SpoolEntry | None:
        """The first entry of ``request_key`` or ``dedupe_key``; with ``principal``, of that
        principal only (``TAG_PRINCIPAL``)."""
        for entry in self.entries():
            tags = entry.tags
            if principal is not None and tags.get(TAG_PRINCIPAL, "") != principal:
                continue
            if request_key and tags.get(TAG_REQUEST_KEY) == request_key:
                return entry
            if dedupe_key and tags.get(TAG_DEDUPE) == dedupe_key:
                return entry
        return None

    def remove(self, edit_model_id: str) -> None:
        with self._lock:
            remove_tree(self._entries / edit_model_id, self._trash)
        self.update_metrics()

    def take_edit_model(self, entry: SpoolEntry, destination: Path) -> bool:
        """Move the entry's edit-model directory to ``destination`` (same file system: a
        rename, no copy) before the entry is removed. Returns False if it could not."""
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            entry.edit_model_dir.rename(destination)
            return True
        except OSError:
            return False

    def size(self) -> tuple[int, int]:
        """(entries, bytes)."""
        entries = [c for c in self._entries.iterdir() if is_edit_model_id(c.name)]
        return len(entries), sum(tree_bytes(c) for c in entries)

    def update_metrics(self) -> tuple[int, int]:
        count, nbytes = self.size()
        SPOOLED_MODELS.set(count)
        SPOOLED_BYTES.set(nbytes)
        return count, nbytes
