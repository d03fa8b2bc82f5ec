"""The registry's only contact with MLflow: a thin, typed layer over ``MlflowClient`` that
turns MLflow's failures into registry errors.

Uses one ``MlflowClient`` with explicit tracking and registry URIs (no global MLflow state), so
several registries can live in one process. Filter strings are built only from validated
values (edit-model IDs, sha256 hex digests, checked base-model names); no client string is
interpolated raw. Artifacts stream between disk and MLflow file by file.

Error mapping: connection failures, timeouts, HTTP 5xx/408/429 and a locked SQLite database are
``RegistryUnavailableError`` (try again later); anything else MLflow refuses is
``RegistryError``. Messages name the operation, never the URI (it may carry credentials).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from registry.config import RegistryConfig
from registry.errors import RegistryError, RegistryUnavailableError
from registry.records import TAG_ID

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
}
_TRANSIENT_TEXT = (
    "failed with exception",
    "max retries exceeded",
    "connection refused",
    "connection aborted",
    "connection reset",
    "remote end closed",
    "timed out",
    "database is locked",
    "broken pipe",
)
_BATCH_METRICS = 1000  # MLflow's log_batch limits
_BATCH_PARAMS = 100
_BATCH_TAGS = 100
_USERINFO = re.compile(r"//[^/@\s]+@")
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s'\"/]+/)+[^\s'\"]*")


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed (MLflow down, slow, throttled or busy)."""
    try:
        import requests

        if isinstance(exc, requests.exceptions.HTTPError):
            status = exc.response.status_code if exc.response is not None else 500
            return status >= 500 or status in (408, 429)
        if isinstance(exc, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests ships with mlflow
        pass
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MlflowException) and exc.error_code in _TRANSIENT_CODES:
        return True
    # A server's 5xx answer (an MlflowException raised locally defaults to INTERNAL_ERROR too,
    # and is a bug, not an outage).
    if isinstance(exc, RestException) and exc.get_http_status_code() >= 500:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _TRANSIENT_TEXT)


def redact(text: str) -> str:
    """Strip ``user:password@`` from URLs and mask absolute file paths in ``text`` (MLflow's
    messages quote both), so that what we log names neither credentials nor machine paths."""
    return _ABSOLUTE_PATH.sub("<path>", _USERINFO.sub("//***@", text))


class MlflowBackend:
    """Experiment, runs, artifacts and model versions of one registry."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.client = MlflowClient(
            tracking_uri=config.resolved_tracking_uri,
            registry_uri=config.resolved_registry_uri,
        )
        self._experiment_id: str | None = None
        self._setup_lock = threading.Lock()
        self._purge_store: Any = None
        self._purge_registry_store: Any = None

    # -- error translation ---------------------------------------------------------------

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except RegistryError:
            raise
        except Exception as e:
            detail = redact(f"{type(e).__name__}: {e}")[:500]
            if is_transient(e):
                log.debug("MLflow unavailable while trying to %s: %s", what, detail)
                raise RegistryUnavailableError(
                    f"the MLflow registry is unavailable (could not {what}); try again later"
                ) from e
            log.warning("MLflow refused to %s: %s", what, detail)
            code = getattr(e, "error_code", type(e).__name__)
            raise RegistryError(f"the MLflow registry refused to {what} ({code})") from e

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        with self._calling(what):
            return fn()

    # -- set-up ------------------------------------------------------------------------------

    def experiment_id(self) -> str:
        """The experiment holding one run per edit model, and the registered model; created on
        first use (idempotently: another process may create them at the same moment)."""
        if self._experiment_id is not None:
            return self._experiment_id
        with self._setup_lock, self._calling("set up the experiment and registered model"):
            if self._experiment_id is not None:
                return self._experiment_id
            name = self.config.experiment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(
                        name, artifact_location=self.config.artifact_location
                    )
                except MlflowException as e:
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    created = self.client.get_experiment_by_name(name)
                    if created is None:
                        raise
                    exp_id = created.experiment_id
            else:
                exp_id = exp.experiment_id
            try:
                self.client.get_registered_model(self.config.registered_model)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                try:
                    self.client.create_registered_model(
                        self.config.registered_model,
                        description="Forgedit per-image edit models: one version per fine-tune.",
                    )
                except MlflowException as e2:
                    if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            self._experiment_id = exp_id
            return exp_id

    # -- versions ----------------------------------------------------------------------------

    def _filter(self, tags: Mapping[str, str]) -> str:
        clauses = [f"name = '{self.config.registered_model}'"]
        clauses += [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        return " and ".join(clauses)

    def find_versions(self, **tags: str) -> list[ModelVersion]:
        """Versions of our registered model carrying every given tag value, oldest first.

        Tag names are the ``TAG_*`` constants with the ``forgedit.`` prefix dropped and dots as
        underscores, e.g. ``find_versions(edit_model_id=...)``; values must be pre-validated.
        """
        self.experiment_id()
        wanted = {f"forgedit.{k}": v for k, v in tags.items()}
        versions = self._call(
            "search model versions",
            lambda: list(self.client.search_model_versions(self._filter(wanted), max_results=100)),
        )
        return sorted(versions, key=lambda v: int(v.version))

    def page_versions(
        self, tags: Mapping[str, str], page_size: int, page_token: str | None
    ) -> tuple[list[ModelVersion], str | None]:
        self.experiment_id()
        result = self._call(
            "list model versions",
            lambda: self.client.search_model_versions(
                self._filter({f"forgedit.{k}": v for k, v in tags.items()}),
                max_results=page_size,
                order_by=["version_number DESC"],
                page_token=page_token,
            ),
        )
        token = result.token
        if isinstance(token, bytes):
            token = token.decode("ascii")
        return list(result), token or None

    def create_version(
        self, run_id: str, source: str, tags: Mapping[str, str], description: str
    ) -> ModelVersion:
        return self._call(
            "create the model version",
            lambda: self.client.create_model_version(
                self.config.registered_model,
                source,
                run_id,
                tags=dict(tags),
                description=description,
            ),
        )

    def set_version_tags(self, version: ModelVersion, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags on one version of our registered model."""
        for key, value in tags.items():
            self._call(
                "set model version tag",
                lambda k=key, v=value: self.client.set_model_version_tag(  # type: ignore[misc]
                    self.config.registered_model, version.version, k, v
                ),
            )

    def get_version(self, version: int | str) -> ModelVersion | None:
        """The version by number, as MLflow has it now; ``None`` if it is gone."""
        with self._calling("read the model version"):
            try:
                return self.client.get_model_version(self.config.registered_model, str(version))
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise

    def delete_version_tags(self, version: ModelVersion) -> None:
        """Remove every tag of the version. MLflow's ``delete_model_version`` keeps a deleted
        version's tags in its database (they carry the caption and the image hash), so a
        deletion removes them first, one by one through the public API."""
        name, number = self.config.registered_model, str(version.version)
        with self._calling("delete the model version's tags"):
            for key in sorted(version.tags):
                self.client.delete_model_version_tag(name, number, key)

    def delete_version(self, version: ModelVersion) -> None:
        """Delete the version (MLflow keeps a row of its number with the source, run id and
        description redacted), then redact the one column MLflow 3.17.2 leaves behind, the
        storage location (the run's artifact path), when the registry can reach MLflow's
        database."""
        name, number = self.config.registered_model, str(version.version)
        self._call(
            "delete the model version", lambda: self.client.delete_model_version(name, number)
        )
        if self.config.purge_store_uri is None:
            return
        with self._calling("redact the deleted model version"):
            if self._purge_registry_store is None:
                from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

                self._purge_registry_store = SqlAlchemyStore(self.config.purge_store_uri)
            _redact_deleted_version(self._purge_registry_store, name, int(number))

    # -- runs ----------------------------------------------------------------------------------

    def find_runs(self, edit_model_id: str, *, deleted_too: bool = False) -> list[Any]:
        """Active runs tagged with ``edit_model_id`` (a previous, interrupted attempt); with
        ``deleted_too``, soft-deleted ones as well (a deletion purges those too)."""
        exp_id = self.experiment_id()
        view = ViewType.ALL if deleted_too else ViewType.ACTIVE_ONLY
        return self._call(
            "search runs",
            lambda: list(
                self.client.search_runs(
                    [exp_id],
                    f"tags.`{TAG_ID}` = '{edit_model_id}'",
                    run_view_type=view,
                    max_results=100,
                )
            ),
        )

    def get_run(self, run_id: str) -> Any:
        return self._call("read the run", lambda: self.client.get_run(run_id))

    def create_run(self, edit_model_id: str, tags: Mapping[str, str]) -> Any:
        exp_id = self.experiment_id()
        return self._call(
            "create the run",
            lambda: self.client.create_run(exp_id, tags=dict(tags), run_name=edit_model_id),
        )

    def log_run_data(
        self,
        run_id: str,
        params: Mapping[str, str],
        metrics: Sequence[tuple[str, float, int]],
        tags: Mapping[str, str],
    ) -> None:
        """Params, step metrics ``(key, value, step)`` and tags, in MLflow-sized batches."""
        now = int(time.time() * 1000)
        p = [Param(k, v) for k, v in params.items()]
        m = [Metric(k, v, now, step) for k, v, step in metrics]
        t = [RunTag(k, v) for k, v in tags.items()]
        with self._calling("log the run's params and metrics"):
            for i in range(0, len(p), _BATCH_PARAMS):
                self.client.log_batch(run_id, params=p[i : i + _BATCH_PARAMS])
            for i in range(0, len(m), _BATCH_METRICS):
                self.client.log_batch(run_id, metrics=m[i : i + _BATCH_METRICS])
            for i in range(0, len(t), _BATCH_TAGS):
                self.client.log_batch(run_id, tags=t[i : i + _BATCH_TAGS])

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("tag the run", lambda: self.client.set_tag(run_id, key, value))

    def finish_run(self, run_id: str) -> None:
        self._call("finish the run", lambda: self.client.set_terminated(run_id, "FINISHED"))

    def delete_run(self, run: Any) -> None:
        """Delete a run's artifacts (bytes, not only the record), then the run: permanently
        when the registry can reach MLflow's database (``purge_run``), else MLflow's soft
        delete (its record stays until ``mlflow gc``)."""
        with self._calling("delete the run's artifacts"):
            repo = get_artifact_repository(
                run.info.artifact_uri, tracking_uri=self.config.resolved_tracking_uri
            )
            with suppress(FileNotFoundError):
                repo.delete_artifacts()
        if run.info.lifecycle_stage != "deleted":
            self._call("delete the run", lambda: self.client.delete_run(run.info.run_id))
        store = self.purge_store()
        if store is not None:
            self._call("purge the run", lambda: _purge(store, run.info.run_id))

    def purge_store(self) -> Any:
        """MLflow's tracking store on its database (``RegistryConfig.purge_store_uri``), built
        once as ``mlflow gc`` builds it; ``None`` when the registry has no database URI."""
        uri = self.config.purge_store_uri
        if uri is None:
            return None
        if self._purge_store is None:
            with self._setup_lock, self._calling("open MLflow's database"):
                if self._purge_store is None:
                    from mlflow.tracking import _get_store

                    self._purge_store = _get_store(uri)
        return self._purge_store

    # -- artifacts -----------------------------------------------------------------------------

    def upload_dir(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self._call(
            "upload artifacts",
            lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path),
        )

    def upload_file(self, run_id: str, local_file: Path, artifact_path: str | None) -> None:
        self._call(
            "upload an artifact",
            lambda: self.client.log_artifact(run_id, str(local_file), artifact_path),
        )

    def artifact_sizes(self, run_id: str, artifact_path: str) -> dict[str, int]:
        """``{file name: bytes}`` of the files directly under ``artifact_path``."""
        infos = self._call(
            "list artifacts", lambda: self.client.list_artifacts(run_id, artifact_path)
        )
        return {i.path.rsplit("/", 1)[-1]: int(i.file_size or 0) for i in infos if not i.is_dir}

    def download_dir(self, run_id: str, artifact_path: str, destination: Path) -> Path:
        """Stream ``artifact_path`` of the run into ``destination``; return the local path."""
        local = self._call(
            "download the edit model",
            lambda: self.client.download_artifacts(run_id, artifact_path, str(destination)),
        )
        return Path(local)


def _purge(store: Any, run_id: str) -> None:
    """Permanently delete one run's record (params, metrics, tags, the run row): the store
    method ``mlflow gc --run-ids`` calls, for exactly this run. A run already purged is done."""
    try:
        store._hard_delete_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _redact_deleted_version(store: Any, name: str, version: int) -> None:
    """Redact the storage location of a deleted model version, as ``delete_model_version``
    redacts its source and run id (MLflow's own placeholder)."""
    from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersion

    with store.ManagedSessionMaker(read_only=False) as session:
        session.query(SqlModelVersion).filter(
            SqlModelVersion.name == name,
            SqlModelVersion.version == version,
            SqlModelVersion.current_stage == STAGE_DELETED_INTERNAL,
        ).update({"storage_location": "REDACTED-SOURCE-PATH"}, synchronize_session=False)
