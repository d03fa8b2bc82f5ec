"""``forgedit-server``: build the server from settings, serve, drain on SIGTERM.

``create_server(settings, engine_factory=..., registry=...)`` is the factory tests use (with
``grpc_port=0``): it starts listening at once (liveness is SERVING), loads and warms up the
engines in the device workers, and flips readiness to SERVING when they are ready.

Health (``grpc.health.v1``), on the gRPC port and on the probes' own ``FORGEDIT_HEALTH_PORT``
(its own server and threads, so it answers whatever application calls do)
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
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from server._proto import forgedit_pb2_grpc as pb_grpc
from server.auth import Authenticator, BearerTokenInterceptor
from server.estimator import Estimator
from server.interceptors import (
    DrainingInterceptor,
    MetricsInterceptor,
    RequestDecodingInterceptor,
    StreamLimiter,
    StreamLimitInterceptor,
)
from server.logs import configure_logging
from server.metrics import Metrics
from server.ports import EngineFactory, EngineLike, RegistryLike
from server.registry_client import RegistryCalls, RegistryClient
from server.runner import JobRunner
from server.scheduler import Scheduler, SchedulerConfig
from server.service import SERVICE_NAME, ForgeditServicer
from server.settings import ServerSettings
from server.transport import server_credentials, server_options
from server.validation import Limits

log = logging.getLogger("server.main")

TINY_MODEL_NAME = "tiny"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH_PORT_REFLECTION_STREAMS = 2


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
        *,
        health_server: grpc.Server | None = None,
        health_port: int | None = None,
        streams: StreamLimiter | None = None,
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
        self.health_server = health_server
        self.health_port = health_port
        self.streams = streams
        self.registry_client: RegistryClient | None = None  # set by create_server; closed on stop
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
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        self.scheduler.stop()
        self.metrics.close()
        if self.registry_client is not None:
            self.registry_client.close()
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
    metrics = Metrics()
    if engine_factory is None:
        engine_factory = default_engine_factory(settings, base_models, metrics)
    owns_registry = registry is None
    if registry is None:
        registry = default_registry(settings)
    registry.start()  # the spool flusher: registers spooled edit models when MLflow returns

    registry_client = RegistryClient(
        registry, RegistryCalls(settings.registry_threads, settings.registry_timeout_s)
    )
    prior = settings.time_prior(time_prior_key(base_models, settings))
    estimator = Estimator(prior.training_sample_s, prior.image_step_s)
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
            registry_client,
            metrics,
            estimator,
            Limits.from_settings(settings),
        ),
        estimator,
        metrics,
    )

    draining = DrainingInterceptor()
    authenticator = Authenticator(settings.auth_tokens)
    prefix = f"/{SERVICE_NAME}/"
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics, prefix), draining]
    if authenticator.enabled:
        interceptors.append(BearerTokenInterceptor(authenticator))
    streams = StreamLimiter(settings.max_streams, settings.max_streams_per_client)
    interceptors += [
        StreamLimitInterceptor(streams, authenticator, prefix),
        RequestDecodingInterceptor(prefix),
    ]
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_threads, thread_name_prefix="forgedit-rpc"
        ),
        interceptors=interceptors,
        options=server_options(
            settings.max_message_bytes,
            settings.max_connection_age_s,
            settings.max_connection_age_grace_s,
        ),
        maximum_concurrent_rpcs=settings.grpc_threads,
    )
    pb_grpc.add_ForgeditServiceServicer_to_server(
        ForgeditServicer(settings, scheduler, registry_client, authenticator), grpc_server
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), grpc_server)
    health_server, health_port = start_health_server(settings, health_servicer)

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
        "listening on port %d (%s), health on %s, metrics on %s",
        port,
        "TLS" if settings.tls else "plaintext",
        health_port or "the gRPC port only",
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
        health_server=health_server,
        health_port=health_port,
        streams=streams,
    )
    server.registry_client = registry_client
    return server, port


def start_health_server(
    settings: ServerSettings, servicer: health.HealthServicer
) -> tuple[grpc.Server | None, int | None]:
    """The probes' own server (``FORGEDIT_HEALTH_PORT``): the same health servicer, and
    reflection, on their own few threads with no concurrency limit, so they answer whatever
    application calls hold. A reflection stream holds a thread while open, so at most
    ``HEALTH_PORT_REFLECTION_STREAMS`` may be open at once, leaving threads for health checks
    (non-blocking, brief). No authentication. Plaintext even with TLS, as kubelet's gRPC probes
    do not speak TLS; reachable by no pod in deploy/k8s (NetworkPolicy)."""
    if settings.health_port is None:
        return None, None
    reflection_bound = StreamLimitInterceptor(
        StreamLimiter(
            HEALTH_PORT_REFLECTION_STREAMS,
            HEALTH_PORT_REFLECTION_STREAMS,
            total_setting="reflection streams on the health port",
            client_setting="reflection streams on the health port",
        ),
        Authenticator([]),
        "/grpc.reflection.",
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=HEALTH_PORT_REFLECTION_STREAMS + 2, thread_name_prefix="forgedit-health"
        ),
        interceptors=[reflection_bound],
        options=server_options(4 * 1024 * 1024),
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    if port == 0:
        raise RuntimeError(f"could not listen on health port {settings.health_port}")
    server.start()
    return server, port


def enable_reflection(service_names: tuple[str, ...], server: grpc.Server) -> None:
    """Serve reflection as ``grpc.reflection.v1`` and ``v1alpha``. grpcio-reflection 1.85 only
    ships ``v1alpha``; ``v1`` has the same messages (same fields and numbers, only the package
    differs), so the one servicer answers both with the ``v1alpha`` message classes."""
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )


def resolve_base_models(settings: ServerSettings) -> dict[str, Path]:
    """Name -> directory of every served base model; the tiny model when none is set."""
    if settings.base_models:
        from forgedit.zoo.shapes import resolve_base_model  # the name "shapes": the toy world

        return {name: resolve_base_model(path) for name, path in settings.base_models.items()}
    from forgedit.tiny import ensure_tiny_model

    root = ensure_tiny_model(settings.data_dir / "tiny-model")
    return {TINY_MODEL_NAME: root / "stable-diffusion"}


def model_size(base_model_dir: Path) -> str:
    """'sd1' for an SD-1.x-sized UNet (block widths up to 1280), 'tiny' for a smaller one;
    read from the UNet's config.json, without loading weights."""
    import json

    try:
        config = json.loads((base_model_dir / "unet" / "config.json").read_text())
        widest = max(int(c) for c in config["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return "sd1"  # unreadable here: the loader reports it; estimate as the real thing
    return "sd1" if widest >= 1280 else "tiny"


def time_prior_key(base_models: dict[str, Path], settings: ServerSettings) -> str:
    """The key of ``settings.time_priors`` for this replica: the default base model's size
    and the first device's kind, e.g. 'sd1-cuda' or 'tiny-cpu'."""
    first = next(iter(base_models.values()))
    device = "cuda" if settings.devices[0].startswith("cuda") else "cpu"
    return f"{model_size(first)}-{device}"


def default_engine_factory(
    settings: ServerSettings, base_models: dict[str, Path], metrics: Metrics | None = None
) -> EngineFactory:
    """The real engine: ``forgedit.engine.Engine`` on each base model, with BLIP if any, on
    the configured UNet backend (exports and plans cached under ``data_dir/engines``; the
    engine's warm-up builds them, so readiness waits). Backend fallbacks count in
    ``metrics``."""
    blip_dir = settings.blip_dir
    if blip_dir is None and not settings.base_models:
        blip_dir = base_models[TINY_MODEL_NAME].parent / "blip"

    def build(name: str, device: str) -> EngineLike:
        from forgedit.caption import Captioner
        from forgedit.engine import Engine
        from forgedit.models import load_base_model

        base = load_base_model(
            base_models[name], device=device, name=name, vae_directory=settings.vae_dirs.get(name)
        )
        from forgedit.zoo.shapes import blip_for

        blip = blip_dir if blip_dir is not None else blip_for(base_models[name])
        captioner = Captioner.load(blip, device=device) if blip is not None else None
        return Engine(
            base,
            captioner,
            precision=settings.precision,
            unet_backend=settings.unet_backend,
            cache_dir=settings.data_dir / "engines",
            max_batch=settings.max_batch,
            on_backend_fallback=(
                None if metrics is None else lambda f: metrics.count_fallback(f.backend, f.reason)
            ),
        )

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
