"""Where the registry keeps things and how it talks to MLflow.

One frozen ``RegistryConfig``, built once by the caller (the server builds it from its settings
object) and passed down; this package reads no environment variables itself, except that MLflow
reads its own (see below).

Back ends
---------
Embedded (``tracking_uri=None``, the default): MLflow on a local SQLite file
``DATA/mlflow.db`` with artifacts under ``DATA/mlartifacts``. No server process; every process
that opens the same data directory sees the same edit models.

A tracking server (``tracking_uri="http://mlflow:5000"`` or ``https://…``): MLflow's own
environment variables carry credentials and are never logged or copied by the registry:
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic auth) or
``MLFLOW_TRACKING_TOKEN`` (bearer), ``MLFLOW_TRACKING_INSECURE_TLS`` /
``MLFLOW_TRACKING_SERVER_CERT_PATH`` for TLS. With ``mlflow server --artifacts-destination
s3://bucket/path`` the server proxies artifacts (clients need no S3 credentials); with
``--default-artifact-root s3://…`` and ``--no-serve-artifacts`` clients write to S3 directly
and need ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` and, for MinIO,
``MLFLOW_S3_ENDPOINT_URL``. A production server uses
``--backend-store-uri postgresql://…`` (the registry does not care which).

Timeouts and retries
--------------------
MLflow's HTTP client takes them only from process-wide environment variables, read on every
request: ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (seconds per request, MLflow's default 120),
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7, i.e. minutes of backoff against a dead server),
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (default 2) and ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``.
``apply_mlflow_defaults`` sets the values below *only where the operator has not set them*, so
an explicit environment always wins. Retries are kept low on purpose: when MLflow is down the
registry spools locally and its flusher retries with its own backoff, so waiting inside one
request buys nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REGISTERED_MODEL = "forgedit-edit-models"
DEFAULT_EXPERIMENT = "forgedit-edit-models"
# Names end up inside MLflow filter strings: keep them to a quote-free alphabet.
_MLFLOW_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._ -]{0,127}\Z")


@dataclass(frozen=True)
class RegistryConfig:
    """Settings of one ``EditModelRegistry``.

    ``data_dir``: local state (embedded store, disk cache, spool, locks). Must be private to
        the replica (the spool) but may be shared by processes of one replica.
    ``tracking_uri``: ``None`` for the embedded SQLite store under ``data_dir``, else an MLflow
        tracking server URI. ``registry_uri`` defaults to ``tracking_uri``.
    ``artifact_root``: artifact location of the experiment, if the registry creates it
        (default: see ``artifact_location``).
    ``registered_model``: the MLflow registered model that holds one version per edit model.
    ``cache_max_bytes`` / ``memory_cache_models``: bounds of the disk and in-memory LRU caches.
    ``http_timeout_s`` / ``http_max_retries`` / ``http_backoff_factor``: see the module docs.
    ``flush_initial_backoff_s`` / ``flush_max_backoff_s``: the spool flusher's retry schedule.
    ``fetch_attempts``: downloads tried before a corrupted edit model is reported.
    ``confirm_cached``: on a cache hit, ask MLflow (one search) whether the ID still exists, so
        a model deleted through another replica stops being served; if MLflow does not answer
        within ``confirm_timeout_s``, the cached copy is served anyway.
    ``backend_store_uri``: MLflow's own database (``postgresql://…``, ``sqlite:///…``), the
        ``--backend-store-uri`` of ``mlflow server``; needed with a tracking server for a
        deletion to purge the runs' records (``purge_store_uri``). Carries credentials: never
        logged.
    ``sweep_interval_s`` / ``sweep_batch``: how often the retention thread looks for expired
        edit models and unfinished deletions, and how many it deletes per round.
    ``lookup_timeout_s``: how long ``find_existing`` and ``register``'s dedupe/idempotency
        lookup wait for MLflow before treating it as unavailable (reuse nothing; spool).
    """

    data_dir: Path
    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_root: str | None = None
    registered_model: str = DEFAULT_REGISTERED_MODEL
    experiment: str = DEFAULT_EXPERIMENT
    cache_max_bytes: int = 20 * 1024**3
    memory_cache_models: int = 2
    http_timeout_s: int = 60
    http_max_retries: int = 1
    http_backoff_factor: int = 1
    flush_initial_backoff_s: float = 1.0
    flush_max_backoff_s: float = 60.0
    fetch_attempts: int = 2
    confirm_cached: bool = True
    confirm_timeout_s: float = 2.0
    lookup_timeout_s: float = 10.0
    backend_store_uri: str | None = field(default=None, repr=False)
    sweep_interval_s: float = 60.0
    sweep_batch: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for label, name in (
            ("registered model", self.registered_model),
            ("experiment", self.experiment),
        ):
            if not _MLFLOW_NAME.match(name):
                raise ValueError(
                    f"{label} name must be 1-128 letters, digits, '.', '_', '-' or spaces"
                )
        if self.cache_max_bytes < 0 or self.memory_cache_models < 0:
            raise ValueError("cache bounds must be >= 0")
        if self.confirm_timeout_s <= 0 or self.lookup_timeout_s <= 0:
            raise ValueError("confirm_timeout_s and lookup_timeout_s must be > 0")
        if self.sweep_interval_s <= 0 or self.sweep_batch < 1:
            raise ValueError("sweep_interval_s must be > 0 and sweep_batch >= 1")
        if self.fetch_attempts < 1:
            raise ValueError("fetch_attempts must be >= 1")
        if self.http_timeout_s < 1 or self.http_max_retries < 0 or self.http_backoff_factor < 0:
            raise ValueError("HTTP timeout must be >= 1 s and retries/backoff >= 0")

    @property
    def embedded(self) -> bool:
        return self.tracking_uri is None

    @property
    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri is not None:
            return self.tracking_uri
        return f"sqlite:///{self.data_dir.resolve() / 'mlflow.db'}"

    @property
    def purge_store_uri(self) -> str | None:
        """The database a deletion purges runs from: ``backend_store_uri``, else the tracking
        URI itself when it names a database (embedded, ``sqlite:``, ``postgresql:``, …);
        ``None`` for a tracking server without ``backend_store_uri``."""
        if self.backend_store_uri:
            return self.backend_store_uri
        uri = self.resolved_tracking_uri
        return None if uri.startswith(("http://", "https://", "databricks")) else uri

    @property
    def resolved_registry_uri(self) -> str:
        return self.registry_uri or self.resolved_tracking_uri

    @property
    def artifact_location(self) -> str | None:
        """Artifact root of the experiment we create (used only when creating it).

        ``artifact_root`` if given; for the embedded store ``DATA/mlartifacts``; for an
        explicit ``sqlite:///PATH`` store, ``mlartifacts`` beside the database file (so that
        several local processes can share one embedded store); ``None`` for a tracking server,
        which chooses its own (``--artifacts-destination`` / ``--default-artifact-root``).
        """
        if self.artifact_root is not None:
            return self.artifact_root
        if self.tracking_uri is None:
            return (self.data_dir.resolve() / "mlartifacts").as_uri()
        if self.tracking_uri.startswith("sqlite:///"):
            # sqlite:///rel/path is relative to the working directory, sqlite:////abs absolute.
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.resolve().parent / "mlartifacts").as_uri()
        return None

    def apply_mlflow_defaults(self) -> None:
        """Set MLflow's HTTP timeout/retry variables where the environment leaves them unset,
        and turn off MLflow's usage telemetry unless the operator asked for it."""
        defaults = {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.http_timeout_s),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.http_max_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(self.http_backoff_factor),
            # A progress bar per artifact is noise in a server log.
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            # MLflow prints "View run … at: URL" on stdout for every finished run.
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
            # A service must not phone home; there is no internet here anyway.
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        for name, value in defaults.items():
            os.environ.setdefault(name, value)
