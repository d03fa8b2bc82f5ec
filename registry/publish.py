"""Publishing a spooled edit model to MLflow, and the flusher that retries until MLflow answers.

The protocol (``Publisher.publish``), idempotent and crash-safe:

1. One MLflow run per edit model (reused if an interrupted attempt left one): training config
   as params, the loss curve as step metrics, timings, ``forgedit.*`` tags.
2. Artifacts uploaded file by file; their sizes checked against the spooled files.
3. The run finished; and only then the model version created (tagged like the run), so a
   reader never sees a version without its complete artifacts.
4. Reconcile: if two attempts raced (same ID, or same request id from two replicas), every
   version but the oldest deletes itself, so exactly one version remains.
5. The spool entry's edit model moves into the disk cache (a rename) and the entry is removed.

All of it happens under the ID's publish lock (``publish_lock``), which delete, the contact
sheet and a spool reader racing a publish take too.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.backend import MlflowBackend, redact
from registry.cache import CACHE_WRITE_ERRORS, DiskCache, cache_origin
from registry.config import RegistryConfig
from registry.errors import EditModelNotFoundError, RegistryError, RegistryUnavailableError
from registry.locks import LockBusy, file_lock
from registry.packaging import (
    EDIT_MODEL_ARTIFACT_PATH,
    EDIT_MODEL_FILES,
    INPUTS_ARTIFACT_PATH,
    MODEL_ARTIFACT_PATH,
    is_contact_sheet,
)
from registry.records import (
    TAG_BASE_NAME,
    TAG_ID,
    TAG_PROMPT,
    TAG_REQUEST_KEY,
    TAG_RUN_DATA,
    RegisteredEditModel,
    finite,
    metric_key,
    registered,
)
from registry.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlushResult:
    """The outcome of ``flush_spool``: IDs registered now, entries still waiting."""

    registered: list[str]
    remaining: int


def publish_lock(locks: Path, edit_model_id: str, *, blocking: bool = True) -> Any:
    """The lock that serialises publishing, deleting and attaching a contact sheet to one edit
    model, across the threads and processes of a replica (raises ``LockBusy`` when not
    ``blocking`` and held)."""
    return file_lock(locks / f"publish-{edit_model_id}.lock", blocking=blocking)


@contextmanager
def publish_lock_within(
    locks: Path, edit_model_id: str, timeout_s: float, stop: threading.Event
) -> Iterator[None]:
    """The edit model's publish lock, waited for at most ``timeout_s`` (less if ``stop`` is
    set); then ``RegistryUnavailableError`` (its holder is waiting for MLflow)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with publish_lock(locks, edit_model_id, blocking=False):
                yield
            return
        except LockBusy:
            if time.monotonic() >= deadline:
                raise RegistryUnavailableError(
                    f"edit model {edit_model_id} is being published to MLflow, which is "
                    "not answering; try again later"
                ) from None
            stop.wait(0.05)


class Publisher:
    """Moves spool entries into MLflow (see the module docstring)."""

    def __init__(
        self,
        config: RegistryConfig,
        backend: MlflowBackend,
        spool: Spool,
        disk: DiskCache,
        locks: Path,
    ) -> None:
        self.config = config
        self._backend = backend
        self._spool = spool
        self._disk = disk
        self._locks = locks

    def publish(self, entry: SpoolEntry) -> RegisteredEditModel:
        """Register one spool entry in MLflow (idempotent, crash-safe); remove it on success.
        Raises ``RegistryUnavailableError`` (the entry stays spooled) and
        ``EditModelNotFoundError`` (deleted meanwhile)."""
        edit_model_id = entry.edit_model_id
        with publish_lock(self._locks, edit_model_id):
            if self._spool.get(edit_model_id) is None:  # published meanwhile by another process
                versions = self._backend.find_versions(edit_model_id=edit_model_id)
                if not versions:
                    raise EditModelNotFoundError(edit_model_id)  # deleted meanwhile
                return registered(versions[0])
            tags = entry.tags
            # 1.-3. A version with complete artifacts (an earlier attempt's, if it got there).
            versions = self._backend.find_versions(edit_model_id=edit_model_id)
            version = versions[0] if versions else self._upload_and_create_version(entry)
            # 4. Exactly one version per edit model and request.
            winner = self._reconcile(version, tags.get(TAG_REQUEST_KEY) or None)
            # 5. From the spool into the cache.
            if winner.tags.get(TAG_ID) == edit_model_id:
                self._adopt_into_cache(entry, cache_origin(tags, winner.version))
            self._spool.remove(edit_model_id)
        log.info(
            "registered edit model %s as version %s of %r",
            winner.tags.get(TAG_ID),
            winner.version,
            self.config.registered_model,
        )
        return registered(winner)

    def flush(self) -> FlushResult:
        """Try to publish every spooled edit model now, oldest first. Stops at the first
        "MLflow unavailable"; other failures are logged and the entry is kept for later."""
        done = []
        for entry in self._spool.entries():
            try:
                result = self.publish(entry)
            except RegistryUnavailableError:
                break
            except RegistryError as e:
                log.error("could not register spooled edit model %s: %s", entry.edit_model_id, e)
                continue
            done.append(result.edit_model_id)
        count, nbytes = self._spool.update_metrics()
        if done:
            log.info(
                "registered %d spooled edit model(s); %d still waiting (%d bytes)",
                len(done),
                count,
                nbytes,
            )
        return FlushResult(done, count)

    # -- internals -------------------------------------------------------------------------------

    def _upload_and_create_version(self, entry: SpoolEntry) -> Any:
        """Steps 1-3: the run, its data and artifacts, then the version."""
        tags = entry.tags
        runs = self._backend.find_runs(entry.edit_model_id)
        if runs:  # an earlier attempt died part-way: finish that run instead of leaving it
            run = runs[0]
        else:
            run = self._backend.create_run(
                entry.edit_model_id, {**entry.meta.get("user_tags", {}), **tags}
            )
        run_id = run.info.run_id
        if run.data.tags.get(TAG_RUN_DATA) != "true":
            self._log_run_data(run_id, entry.meta)
        self._upload_artifacts(run_id, entry)
        self._backend.finish_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        description = (
            f"Forgedit edit model {entry.edit_model_id} on base model "
            f"{tags.get(TAG_BASE_NAME, '')!r}: {tags.get(TAG_PROMPT, '')!r}"
        )
        return self._backend.create_version(run_id, source, tags, description)

    def _log_run_data(self, run_id: str, meta: dict[str, Any]) -> None:
        """Params, the loss curve and the timings, once per run (a retried upload must not log
        the curve twice: ``TAG_RUN_DATA`` marks it done)."""
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

    def _upload_artifacts(self, run_id: str, entry: SpoolEntry) -> None:
        """Upload the pyfunc model and the extras; raise ``RegistryUnavailableError`` unless
        MLflow then holds every byte of the edit model we meant to store."""
        self._backend.upload_dir(run_id, entry.model_dir, MODEL_ARTIFACT_PATH)
        for extra in sorted(entry.extras_dir.iterdir()):
            where = None if is_contact_sheet(extra.name) else INPUTS_ARTIFACT_PATH
            self._backend.upload_file(run_id, extra, where)
        expected = {name: (entry.edit_model_dir / name).stat().st_size for name in EDIT_MODEL_FILES}
        stored = self._backend.artifact_sizes(run_id, EDIT_MODEL_ARTIFACT_PATH)
        if any(stored.get(name) != size for name, size in expected.items()):
            raise RegistryUnavailableError(
                f"the upload of edit model {entry.edit_model_id} is incomplete; it stays "
                "spooled and will be uploaded again"
            )

    def _reconcile(self, mine: Any, rkey: str | None) -> Any:
        """Step 4: exactly one version per edit model / request: the oldest wins, losers delete
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
        """Step 5: the registering replica keeps its copy: move it from the spool into the
        cache.

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
                    shutil.rmtree(tmp, ignore_errors=True)
                self._disk.evict(keep=edit_model_id)
        except OSError as e:
            CACHE_WRITE_ERRORS.inc()
            log.warning(
                "edit model %s is registered but could not be kept in the local cache (%s); "
                "it will be downloaded when next used",
                edit_model_id,
                redact(f"{type(e).__name__}: {e.strerror or e}"),
            )


class SpoolFlusher:
    """A background thread that flushes the spool as soon as MLflow answers, with exponential
    backoff between failed rounds."""

    def __init__(self, config: RegistryConfig, publisher: Publisher, spool: Spool) -> None:
        self.config = config
        self._publisher = publisher
        self._spool = spool
        self.stop_event = threading.Event()  # set by close(); also ends waits for a lock
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.stop_event.clear()
        self._thread = threading.Thread(
            target=self._loop, name="registry-spool-flusher", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread. Spooled entries stay on disk for the next start."""
        self.stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """A new entry was spooled: flush now rather than at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        backoff = self.config.flush_initial_backoff_s
        while not self.stop_event.is_set():
            if self._spool.entries():
                try:
                    remaining = self._publisher.flush().remaining
                except Exception:  # never let one bad entry kill the flusher
                    log.exception("the spool flusher failed; retrying later")
                    remaining = 1
                if remaining:
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, self.config.flush_max_backoff_s)
                    continue
            backoff = self.config.flush_initial_backoff_s
            # Wake on a new spooled entry, or poll now and then (another process may spool).
            self._wake.wait(self.config.flush_max_backoff_s)
            self._wake.clear()
