"""``forgedit-server``: build the server from settings, serve, drain on SIGTERM.

``create_server(settings, engine_factory=..., registry=...)`` is the factory tests use (with
``grpc_port=0``): it starts listening at once (liveness is SERVING), loads and warms up the
engines in the device workers, and flips readiness to SERVING when they are ready.

Health (``grpc.health.v1``)
    ``""`` (liveness): SERVING while the process serves at all.
    ``"forgedit.v1.ForgeditService"`` (readiness): NOT_SERVING until every base model is
    loaded and warmed up, and again from the moment draining starts.

Shutdown (SIGTERM or SIGINT): readiness NOT_SERVING; new calls UNAVAILABLE; queued jobs end
UNAVAILABLE; running jobs have ``grace_period_s`` to finish (their streams deliver every
event), then are cancelled; the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server._proto import forgedit_pb2_grpc as pb_grpc
from server.auth import BearerTokenInterceptor
from server.interceptors import DrainingInterceptor, MetricsInterceptor
from server.logs import configure_logging
from server.metrics import Metrics
from server.ports import EngineFactory, EngineLike, RegistryLike
from server.runner import JobRunner
from server.scheduler import Estimator, Scheduler, SchedulerConfig
from server.service import SERVICE_NAME, ForgeditServicer
from server.settings import ServerSettings
from server.store import EditModelStore, RegistryCalls
from server.transport import server_credentials, server_options
from server.validation import Limits

log = logging.getLogger("server.main")

TINY_MODEL_NAME = "tiny"


class ForgeditServer:
    """A running server: the gRPC server, its scheduler, health and metrics."""

    def __init__(
        self,
        settings: ServerSettings,
        grpc_server: grpc.Server,
        port: int,
        scheduler: Scheduler,
        health_servicer: health.HealthServicer,
        draining: DrainingInterceptor,
        metrics: Metrics,
        metrics_port: int | None,
        owned_registry: RegistryLike | None = None,
    ) -> None:
        self.settings = settings
        self.grpc_server = grpc_server
        self.port = port
        self.scheduler = scheduler
        self.health = health_servicer
        self.draining = draining
        self.metrics = metrics
        self.metrics_port = metrics_port
        self._owned_registry = owned_registry
        self.store: EditModelStore | None = None  # set by create_server; closed on stop
        self._stopped = threading.Event()
        self._watcher = threading.Thread(
            target=self._mark_ready, name="forgedit-ready", daemon=True
        )
        self._watcher.start()

    def _mark_ready(self) -> None:
        while not self._stopped.is_set():
            if self.scheduler.ready.wait(0.2):
                if not self.draining.draining:
                    self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
                    log.info("ready: serving %s", ", ".join(self.scheduler.config.base_models))
                return
            if self.scheduler.startup_error is not None:
                return

    def wait_ready(self, timeout: float) -> bool:
        """True once the engines are warmed up (readiness SERVING)."""
        return self.scheduler.ready.wait(timeout)

    def drain(self, grace_s: float | None = None) -> None:
        """Graceful shutdown (see the module docstring). Safe to call more than once."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        log.info("draining: readiness NOT_SERVING; running jobs have %.0f s", grace)
        self.draining.start_draining()
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.scheduler.drain(grace)
        self.stop(grace=5.0)

    def stop(self, grace: float = 0.0) -> None:
        """Stop at once: streams still open get at most ``grace`` seconds to finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.draining.start_draining()
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.scheduler.stop()
        self.metrics.close()
        if self.store is not None:
            self.store.close()
        if self._owned_registry is not None:
            self._owned_registry.close()
        log.info("stopped")


def create_server(
    settings: ServerSettings,
    *,
    engine_factory: EngineFactory | None = None,
    registry: RegistryLike | None = None,
) -> tuple[ForgeditServer, int]:
    """Build and start a server; returns it and its gRPC port (useful with ``grpc_port=0``).

    ``engine_factory(base_model_name, device)`` and ``registry`` default to the real engine on
    the configured base models and the MLflow registry of the settings.
    """
    base_models = resolve_base_models(settings)
    if engine_factory is None:
        engine_factory = default_engine_factory(settings, base_models)
    owns_registry = registry is None
    if registry is None:
        registry = default_registry(settings)
    registry.start()  # the spool flusher: registers spooled edit models when MLflow returns

    metrics = Metrics()
    store = EditModelStore(
        registry, RegistryCalls(settings.registry_threads, settings.registry_timeout_s)
    )
    estimator = Estimator(settings.seconds_per_update_prior, settings.seconds_per_image_step_prior)
    scheduler = Scheduler(
        SchedulerConfig(
            devices=tuple(settings.devices),
            base_models=tuple(base_models),
            queue_size=settings.queue_size,
            retention_s=settings.job_retention_s,
            max_retained=settings.max_retained_jobs,
            max_training_overtakes=settings.max_training_overtakes,
        ),
        engine_factory,
        JobRunner(
            store,
            metrics,
            estimator,
            max_batch=settings.max_batch,
            limits=Limits.from_settings(settings),
        ),
        estimator,
        metrics,
    )

    draining = DrainingInterceptor()
    interceptors: list[grpc.ServerInterceptor] = [
        MetricsInterceptor(metrics, f"/{SERVICE_NAME}/"),
        draining,
    ]
    if settings.auth_tokens:
        interceptors.append(
            BearerTokenInterceptor([t.get_secret_value() for t in settings.auth_tokens])
        )
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_threads, thread_name_prefix="forgedit-rpc"
        ),
        interceptors=interceptors,
        options=server_options(settings.max_message_bytes),
        maximum_concurrent_rpcs=settings.grpc_threads,
    )
    pb_grpc.add_ForgeditServiceServicer_to_server(
        ForgeditServicer(settings, scheduler, store), grpc_server
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )

    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls:
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        port = grpc_server.add_secure_port(
            address,
            server_credentials(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            ),
        )
    else:
        port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not listen on port {settings.grpc_port}")
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = metrics.serve(settings.metrics_host, settings.metrics_port)
    grpc_server.start()
    scheduler.start()
    log.info(
        "listening on port %d (%s), metrics on %s",
        port,
        "TLS" if settings.tls else "plaintext",
        metrics_port or "off",
    )
    server = ForgeditServer(
        settings,
        grpc_server,
        port,
        scheduler,
        health_servicer,
        draining,
        metrics,
        metrics_port,
        registry if owns_registry else None,
    )
    server.store = store
    return server, port


def resolve_base_models(settings: ServerSettings) -> dict[str, Path]:
    """Name -> directory of every served base model; the tiny model when none is set."""
    if settings.base_models:
        return dict(settings.base_models)
    from forgedit.tiny import ensure_tiny_model

    root = ensure_tiny_model(settings.data_dir / "tiny-model")
    return {TINY_MODEL_NAME: root / "stable-diffusion"}


def default_engine_factory(settings: ServerSettings, base_models: dict[str, Path]) -> EngineFactory:
    """The real engine: ``forgedit.engine.Engine`` on each base model, with BLIP if any."""
    blip_dir = settings.blip_dir
    if blip_dir is None and not settings.base_models:
        blip_dir = base_models[TINY_MODEL_NAME].parent / "blip"

    def build(name: str, device: str) -> EngineLike:
        from forgedit.caption import Captioner
        from forgedit.engine import Engine
        from forgedit.models import load_base_model

        base = load_base_model(base_models[name], device=device, name=name)
        captioner = Captioner.load(blip_dir, device=device) if blip_dir is not None else None
        return Engine(base, captioner, precision=settings.precision)

    return build


def default_registry(settings: ServerSettings) -> RegistryLike:
    """The MLflow edit-model registry of the settings (embedded SQLite by default)."""
    from registry import EditModelRegistry
    from registry.config import RegistryConfig

    config = RegistryConfig(
        data_dir=settings.data_dir / "registry", tracking_uri=settings.mlflow_tracking_uri
    )
    return EditModelRegistry(config)


def main() -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0. Configuration: environment only."""
    settings = ServerSettings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        server, _port = create_server(settings)
    except Exception:
        log.exception("the server could not start")
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        if server.scheduler.startup_error is not None:
            log.error("a device could not load its models; exiting")
            server.stop()
            return 1
    server.drain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
