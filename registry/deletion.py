"""Deleting an edit model so that nothing of it remains, and finishing what a crash or an
MLflow outage interrupted.

What "deleted" means (README, "Deletion"): once ``Deleter.delete`` returns, MLflow's database
holds no record of the edit model (its runs are purged: params, metrics, tags, among them the
caption and the image hash; its model versions' tags are removed, and a deleted version keeps
only its number and MLflow's redacted placeholders), its artifact store holds none of its
bytes, and this replica holds no copy (spool, disk cache, memory).

The protocol, under the ID's publish lock, idempotent and resumable:

1. A *tombstone* (``DATA/deletions/<id>.json``, written atomically) records the decision
   before anything is removed. From then on this replica refuses the ID, and the retention
   thread (``registry.retention``) finishes the deletion after a crash or an outage.
2. The spool entry, if any, is removed.
3. Every model version with the ID: its tags removed, then the version deleted. Other replicas
   stop serving the ID at their next use of it (``confirm_cached``).
4. This replica's cached copies are dropped.
5. Every run with the ID, soft-deleted ones included: artifact bytes deleted, the run deleted,
   then purged from the database with the store method ``mlflow gc --run-ids`` uses
   (``MlflowBackend.delete_run``); this needs the database URI (``RegistryConfig``).
6. The tombstone is removed.

When MLflow does not answer before step 1 (it could not even say whether the ID exists),
nothing changes and ``RegistryUnavailableError`` is raised: the model is still served. When it
stops answering after step 1, ``RegistryUnavailableError`` is raised too, but the deletion is
committed: the ID is refused here and the retention thread completes it when MLflow is back; a
retried delete completes it at once if MLflow answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgedit.durable import write_json_atomic
from registry.backend import MlflowBackend
from registry.errors import EditModelNotFoundError, RegistryError, RegistryUnavailableError
from registry.fetch import EditModelFetcher
from registry.fsutil import read_json
from registry.publish import publish_lock
from registry.records import is_expired
from registry.spool import Spool

log = logging.getLogger(__name__)


class Tombstones:
    """Deletions decided and not yet finished, one small JSON file per ID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, edit_model_id: str) -> Path:
        return self.root / f"{edit_model_id}.json"

    def add(self, edit_model_id: str, reason: str) -> None:
        if not self.has(edit_model_id):
            write_json_atomic(
                self._path(edit_model_id),
                {"edit_model_id": edit_model_id, "reason": reason, "since": time.time()},
            )

    def has(self, edit_model_id: str) -> bool:
        return self._path(edit_model_id).is_file()

    def remove(self, edit_model_id: str) -> None:
        self._path(edit_model_id).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """IDs of unfinished deletions, oldest first."""
        found = []
        for path in self.root.glob("*.json"):
            try:
                found.append((float(read_json(path)["since"]), path.stem))
            except (OSError, ValueError, KeyError, TypeError):
                found.append((0.0, path.stem))  # unreadable: still a deletion to finish
        return [i for _, i in sorted(found)]


class Deleter:
    """The deletion protocol of the module docstring."""

    def __init__(
        self,
        backend: MlflowBackend,
        spool: Spool,
        fetcher: EditModelFetcher,
        tombstones: Tombstones,
        locks: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._spool = spool
        self._fetcher = fetcher
        self.tombstones = tombstones
        self._locks = locks
        self._clock = clock

    def delete(
        self, edit_model_id: str, *, reason: str = "deleted", expired_only: bool = False
    ) -> bool:
        """Delete a validated ID everywhere (the module docstring). With ``expired_only`` (the
        sweep), delete only if every spool entry and version found carries an expiry that has
        passed, as read right now under the lock, so that the sweep never deletes an edit
        model that is not expired; returns whether it deleted.

        Raises ``EditModelNotFoundError`` (nothing has the ID and no deletion was pending) and
        ``RegistryUnavailableError`` (see the module docstring for what it means then)."""
        with publish_lock(self._locks, edit_model_id):
            now = self._clock()
            pending = self.tombstones.has(edit_model_id)
            entry = self._spool.get(edit_model_id)
            if (
                expired_only
                and not pending
                and entry is not None
                and not is_expired(entry.tags, now)
            ):
                return False
            if entry is not None:
                # 1.-2. A spooled model: decided here, whatever MLflow says later (an
                # interrupted publish may have left a run there: step 5 purges it).
                self.tombstones.add(edit_model_id, reason)
                self._spool.remove(edit_model_id)
                self._fetcher.forget_deleted(edit_model_id)
                pending = True
            try:
                versions = self._backend.find_versions(edit_model_id=edit_model_id)
                runs = {
                    r.info.run_id: r
                    for r in self._backend.find_runs(edit_model_id, deleted_too=True)
                }
            except RegistryUnavailableError as e:
                if pending:
                    raise _pending(edit_model_id) from e
                raise  # nothing decided: the model is still there and still served
            if (
                expired_only
                and not pending
                and not (versions and all(is_expired(v.tags, now) for v in versions))
            ):
                return False
            if not (pending or versions):
                if (
                    runs
                    and all(r.info.lifecycle_stage == "deleted" for r in runs.values())
                    and self._backend.config.purge_store_uri is not None
                ):
                    pending = True  # soft-deleted before purging existed: purge them now
                else:
                    raise EditModelNotFoundError(edit_model_id)
            # 1. Decided.
            self.tombstones.add(edit_model_id, reason)
            try:
                self._remove_everywhere(edit_model_id, versions, runs)
            except RegistryUnavailableError as e:
                raise _pending(edit_model_id) from e
            self.tombstones.remove(edit_model_id)
        log.info(
            "%s edit model %s (%d version(s), %d run(s) purged)",
            reason,
            edit_model_id,
            len(versions),
            len(runs),
        )
        return True

    def resume(self, limit: int) -> int:
        """Finish up to ``limit`` pending deletions (after a crash or an outage); returns how
        many finished. Stops at the first that MLflow cannot take now."""
        done = 0
        for edit_model_id in self.tombstones.pending()[:limit]:
            try:
                self.delete(edit_model_id, reason="finished deleting")
            except EditModelNotFoundError:
                self.tombstones.remove(edit_model_id)
            except RegistryUnavailableError:
                break
            except RegistryError as e:
                log.error("could not finish deleting edit model %s: %s", edit_model_id, e)
                continue
            done += 1
        return done

    def _remove_everywhere(
        self, edit_model_id: str, versions: list[Any], runs: dict[str, Any]
    ) -> None:
        # 3. Versions first: once they are gone no replica serves the ID.
        for version in versions:
            self._backend.delete_version_tags(version)
            self._backend.delete_version(version)
            if version.run_id and version.run_id not in runs:
                runs[version.run_id] = self._backend.get_run(version.run_id)
        # 4. This replica's copies.
        self._fetcher.forget_deleted(edit_model_id)
        # 5. The runs: bytes, record, purge.
        for run in runs.values():
            self._backend.delete_run(run)


def _pending(edit_model_id: str) -> RegistryUnavailableError:
    return RegistryUnavailableError(
        f"edit model {edit_model_id} is being deleted: this replica no longer serves it, and "
        "the deletion completes in the background when the MLflow registry answers again; "
        "retry the delete to confirm"
    )
