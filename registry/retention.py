"""Expiry: a background sweep that deletes expired edit models, and finishes interrupted
deletions.

An edit model registered with a time-to-live carries ``forgedit.expires_at`` (Unix seconds) and
``forgedit.expiring=true`` on its version, run and spool entry. From that moment on every
replica refuses it like a deleted one (``registry.fetch``, ``EditModelRegistry.show`` and
``list_models``); this sweep then deletes it for real, through ``registry.deletion``.

Each round of the ``RetentionSweeper`` thread, every ``sweep_interval_s``:

1. finishes up to ``sweep_batch`` pending deletions (tombstones left by a crash or an outage);
2. deletes expired spool entries of this replica;
3. pages through the versions marked ``expiring`` (one page of ``sweep_batch`` per round, the
   page token kept between rounds, back to the first page after the last) and deletes those
   whose expiry has passed, at most ``sweep_batch`` per round.

Bounded: a round deletes at most ``sweep_batch`` models and reads one page. Restarts: all its
state is in MLflow's tags and the tombstones on disk, so a new process simply goes on.
Outages: a round that meets an unavailable MLflow ends, and the next one tries again; expired
models stay refused meanwhile. Never the wrong version: ``Deleter.delete(expired_only=True)``
re-reads the ID's versions under its lock and deletes nothing unless every one of them is
expired at that moment; versions are found by their edit-model ID, never by number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from registry.backend import MlflowBackend
from registry.config import RegistryConfig
from registry.deletion import Deleter
from registry.errors import EditModelNotFoundError, RegistryError, RegistryUnavailableError
from registry.records import TAG_ID, is_expired
from registry.spool import Spool

log = logging.getLogger(__name__)


class RetentionSweeper:
    """The sweep of the module docstring, in a daemon thread (``start``/``close``), or one
    round at a time (``sweep_once``)."""

    def __init__(
        self,
        config: RegistryConfig,
        backend: MlflowBackend,
        spool: Spool,
        deleter: Deleter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._backend = backend
        self._spool = spool
        self._deleter = deleter
        self._clock = clock
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="registry-retention", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def sweep_once(self) -> list[str]:
        """One round; returns the IDs it deleted (expired ones; finished deletions are
        logged). Raises ``RegistryUnavailableError`` when MLflow does not answer."""
        batch = self.config.sweep_batch
        # 1. Interrupted deletions first: they were decided before anything here.
        self._deleter.resume(batch)
        deleted: list[str] = []
        now = self._clock()
        # 2. This replica's expired spool entries.
        for entry in self._spool.entries():
            if len(deleted) >= batch:
                return deleted
            if is_expired(entry.tags, now):
                self._delete_expired(entry.edit_model_id, deleted)
        # 3. One page of the versions that carry an expiry.
        try:
            versions, self._token = self._backend.page_versions(
                {"expiring": "true"}, batch, self._token
            )
        except RegistryUnavailableError:
            raise
        except RegistryError:
            self._token = None  # a token MLflow no longer takes: start over next round
            raise
        for version in versions:
            if len(deleted) >= batch:
                break
            if is_expired(version.tags, now):
                self._delete_expired(version.tags[TAG_ID], deleted)
        return deleted

    def _delete_expired(self, edit_model_id: str, deleted: list[str]) -> None:
        try:
            if self._deleter.delete(edit_model_id, reason="expired", expired_only=True):
                deleted.append(edit_model_id)
        except EditModelNotFoundError:
            pass  # deleted meanwhile, e.g. by another replica's sweep

    def _loop(self) -> None:
        # A first round at once: a restarted process finishes what its predecessor left.
        while not self._stop.is_set():
            try:
                self.sweep_once()
            except RegistryUnavailableError as e:
                log.warning("retention sweep postponed: %s", e)
            except RegistryError as e:
                log.error("retention sweep failed: %s", e)
            except Exception:  # never let one bad round end the sweeps
                log.exception("retention sweep failed")
            self._stop.wait(self.config.sweep_interval_s)
