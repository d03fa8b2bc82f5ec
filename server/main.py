"""``forgedit-server``: build the server from settings, serve, drain on SIGTERM.

``create_server(settings, engine_factory=..., registry=...)`` is the factory tests use (with
``grpc_port=0``): it starts listening at once (liveness is SERVING), loads and warms up the
engines in the device workers, and the lifecycle flips readiness to SERVING when they are
ready (``server.lifecycle``: health follows every change of state as it happens).

Health (``grpc.health.v1``), on the gRPC port and on the probes' own ``FORGEDIT_HEALTH_PORT``
(its own server and threads, so it answers whatever application calls do)
    ``""`` (liveness): SERVING while the process serves at all.
    ``"forgedit.v1.Engines"`` (startup): SERVING once every served base model's engine is
    built or loaded at every declared resolution (``FORGEDIT_RESOLUTIONS``) and its canary
    passed (the startup probe's: its long window covers the first build).
    ``"forgedit.v1.ForgeditService"`` (readiness): NOT_SERVING until the engines are ready
    (as above), and again from the moment draining starts.
All three follow the one lifecycle (``server.lifecycle.HEALTH``).

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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from forgedit.zoo import builtin_base_model, builtin_named
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.auth import Authenticator, BearerTokenInterceptor
from server.estimator import Estimator
from server.interceptors import (
    CallLimiter,
    CallLimitInterceptor,
    DrainingInterceptor,
    MetricsInterceptor,
    Pool,
    RequestDecodingInterceptor,
)
from server.lifecycle import Lifecycle
from server.logs import configure_logging
from server.metrics import Metrics
from server.ports import EngineFactory, EngineLike, RegistryLike
from server.registry_client import RegistryCalls, RegistryClient
from server.runner import JobRunner
from server.scheduler import Scheduler, SchedulerConfig
from server.service import SERVICE_NAME, ForgeditServicer
from server.settings import HEALTH_CALLS, ServerSettings
from server.shares import ShareRule, quarter
from server.transport import server_credentials, server_options
from server.validation import Limits

log = logging.getLogger("server.main")

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
# The probes' own port: its reflection streams and health calls at once (by client address).
HEALTH_PORT_REFLECTION_STREAMS = 2
HEALTH_PORT_HEALTH_CALLS = 4


@dataclass(frozen=True)
class Serving:
    """What serves the requests: whether it does (lifecycle), the devices' work, and what
    it reports to and stores in."""

    lifecycle: Lifecycle
    scheduler: Scheduler
    registry: RegistryClient
    metrics: Metrics
    streams: CallLimiter
    owned_registry: RegistryLike | None  # made by create_server, so closed on stop


@dataclass(frozen=True)
class Listeners:
    """Where the server answers: the gRPC port, the probes' port, the metrics port."""

    grpc_server: grpc.Server
    port: int
    health_server: grpc.Server | None
    health_port: int | None
    metrics_port: int | None
    # The servers' thread pools: gRPC never shuts down the pool it is given, so ``stop`` does.
    thread_pools: tuple[futures.ThreadPoolExecutor, ...] = ()


class ForgeditServer:
    """A running server (``create_server`` builds one): drain it, or stop it."""

    def __init__(self, settings: ServerSettings, serving: Serving, listeners: Listeners) -> None:
        self.settings = settings
        self.serving = serving
        self.listeners = listeners
        self._stopped = threading.Event()

    # What tests and tools look at.
    @property
    def port(self) -> int:
        return self.listeners.port

    @property
    def health_port(self) -> int | None:
        return self.listeners.health_port

    @property
    def metrics_port(self) -> int | None:
        return self.listeners.metrics_port

    @property
    def lifecycle(self) -> Lifecycle:
        return self.serving.lifecycle

    @property
    def scheduler(self) -> Scheduler:
        return self.serving.scheduler

    @property
    def streams(self) -> CallLimiter:
        """The gRPC port's pool of open streams."""
        return self.serving.streams

    def wait_ready(self, timeout: float) -> bool:
        """True once the engines are warmed up (readiness SERVING)."""
        return self.lifecycle.wait_ready(timeout)

    def drain(self, grace_s: float | None = None) -> None:
        """Graceful shutdown (see the module docstring). Safe to call more than once."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        log.info("draining: readiness NOT_SERVING; running jobs have %.0f s", grace)
        self.lifecycle.start_draining()
        self.scheduler.drain(grace)
        self.stop(grace=5.0)

    def stop(self, grace: float = 0.0) -> None:
        """Stop at once: streams still open get at most ``grace`` seconds to finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.lifecycle.stop()
        self.listeners.grpc_server.stop(grace).wait()
        if self.listeners.health_server is not None:
            self.listeners.health_server.stop(0).wait()
        for pool in self.listeners.thread_pools:
            pool.shutdown(wait=False)  # idle threads go; a handler still unwinding finishes
        self.scheduler.stop()
        self.serving.metrics.close()
        self.serving.registry.close()
        if self.serving.owned_registry is not None:
            self.serving.owned_registry.close()
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
    # 1. What it serves: the base models, their engines, the registry of edit models.
    base_models = resolve_base_models(settings)
    metrics = Metrics()
    if engine_factory is None:
        engine_factory = default_engine_factory(settings, base_models, metrics)
    owned_registry = default_registry(settings) if registry is None else None
    registry = registry or owned_registry
    assert registry is not None
    registry.start()  # the spool flusher and the retention sweep (expiry, unfinished deletions)
    registry_client = RegistryClient(
        registry, RegistryCalls(settings.registry_threads, settings.registry_timeout_s)
    )

    # 2. Whether it serves, and the health that says so (liveness now, readiness later).
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    lifecycle = Lifecycle(health_servicer)

    # 3. The devices' work: the scheduler, and what a worker does with a job.
    prior = settings.time_prior(time_prior_key(base_models, settings))
    estimator = Estimator(prior.training_sample_s, prior.image_step_s)
    runner = JobRunner(registry_client, metrics, estimator, Limits.from_settings(settings))
    scheduler = Scheduler(
        scheduler_config(settings, base_models),
        engine_factory,
        runner,
        estimator,
        metrics,
        lifecycle,
    )

    # 4. The front door and the gRPC server behind it: the service, health and reflection.
    authenticator = Authenticator(settings.auth_tokens)
    streams = CallLimiter(stream_share(settings), noun="open streams", subject="streams")
    rpc_threads = futures.ThreadPoolExecutor(
        max_workers=settings.grpc_threads, thread_name_prefix="forgedit-rpc"
    )
    grpc_server = grpc.server(
        rpc_threads,
        interceptors=front_door(lifecycle, metrics, authenticator, streams),
        options=server_options(
            settings.max_message_bytes,
            settings.max_connection_age_s,
            settings.max_connection_age_grace_s,
        ),
        maximum_concurrent_rpcs=settings.grpc_threads,
    )
    servicer = ForgeditServicer(settings, scheduler, registry_client, authenticator)
    pb_grpc.add_ForgeditServiceServicer_to_server(servicer, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), grpc_server)

    # 5. The ports: gRPC (TLS when configured), the probes' own, metrics.
    port = bind(grpc_server, settings)
    health_server, health_port, health_threads = start_health_server(settings, health_servicer)
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = metrics.serve(settings.metrics_host, settings.metrics_port)

    # 6. Start: answer calls, and load the engines (readiness follows the lifecycle).
    grpc_server.start()
    lifecycle.start()
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
        Serving(lifecycle, scheduler, registry_client, metrics, streams, owned_registry),
        Listeners(
            grpc_server,
            port,
            health_server,
            health_port,
            metrics_port,
            (rpc_threads,) if health_threads is None else (rpc_threads, health_threads),
        ),
    )
    return server, port


def scheduler_config(settings: ServerSettings, base_models: dict[str, Path]) -> SchedulerConfig:
    return SchedulerConfig(
        devices=tuple(settings.devices),
        base_models=tuple(base_models),
        queue_size=settings.queue_size,
        retention_s=settings.job_retention_s,
        max_retained=settings.max_retained_jobs,
        max_retained_bytes=settings.max_retained_job_bytes,
        max_training_overtakes=settings.max_training_overtakes,
        queue_kept_for_new=settings.queue_kept,
        other_resolutions=settings.other_resolutions,
    )


def stream_share(settings: ServerSettings) -> ShareRule:
    """The fair share of the gRPC port's open streams (``server.shares``)."""
    return ShareRule(
        capacity=settings.max_streams,
        per_client=settings.max_streams_per_client,
        kept_for_new=settings.streams_kept,
        capacity_setting="FORGEDIT_MAX_STREAMS",
        per_client_setting="FORGEDIT_MAX_STREAMS_PER_CLIENT",
        kept_setting="FORGEDIT_STREAMS_KEPT_FOR_NEW_CLIENTS",
    )


def health_calls(capacity: int, where: str) -> CallLimiter:
    """A pool of health calls (``Check`` while it runs, ``Watch`` while it is open), counted
    by client address as they need no token: ``capacity`` in all, a quarter of it (at least
    one) per address and the last quarter kept for addresses with none. Fixed, not
    settings: a probe needs one call at a time."""
    what = f"health calls on {where} at once"
    rule = ShareRule(
        capacity=capacity,
        per_client=max(1, quarter(capacity)),
        kept_for_new=quarter(capacity),
        capacity_setting=f"{capacity} {what}, fixed",
        per_client_setting=f"a quarter of the {what}",
        kept_setting=f"a quarter of the {what}",
    )
    return CallLimiter(rule, noun="health calls", subject="health-calls")


def front_door(
    lifecycle: Lifecycle,
    metrics: Metrics,
    authenticator: Authenticator,
    streams: CallLimiter,
) -> list[grpc.ServerInterceptor]:
    """The interceptors, outermost first (``server.interceptors`` says what each does). Every
    call that can hold the port for long is counted: health calls (no token) in their own
    small pool by address, every other stream (Edit, Sample, WatchJob, reflection) in
    ``streams``; together they leave the unary calls of authenticated clients their threads
    (``ServerSettings``' check of FORGEDIT_GRPC_THREADS)."""
    prefix = f"/{SERVICE_NAME}/"
    interceptors: list[grpc.ServerInterceptor] = [
        MetricsInterceptor(metrics, prefix),
        DrainingInterceptor(lifecycle),
    ]
    if authenticator.enabled:
        interceptors.append(BearerTokenInterceptor(authenticator))
    pools = [
        Pool(
            HEALTH_PREFIX, health_calls(HEALTH_CALLS, "the gRPC port"), by_address=True, unary=True
        ),
        Pool("", streams),
    ]
    interceptors += [
        CallLimitInterceptor(pools, authenticator),
        RequestDecodingInterceptor(prefix),
    ]
    return interceptors


def bind(grpc_server: grpc.Server, settings: ServerSettings) -> int:
    """Listen on ``FORGEDIT_HOST:FORGEDIT_GRPC_PORT`` (TLS when a certificate is set); the
    port bound (port 0: a free one)."""
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls:
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        credentials = server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
        port = grpc_server.add_secure_port(address, credentials)
    else:
        port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not listen on port {settings.grpc_port}")
    return port


def start_health_server(
    settings: ServerSettings, servicer: health.HealthServicer
) -> tuple[grpc.Server | None, int | None, futures.ThreadPoolExecutor | None]:
    """The probes' own server (``FORGEDIT_HEALTH_PORT``): the same health servicer, and
    reflection, on their own few threads, so they answer whatever application calls hold.
    Every call is counted, before its request is read, by client address: at most
    ``HEALTH_PORT_REFLECTION_STREAMS`` reflection streams (each holds a thread while open) and
    ``HEALTH_PORT_HEALTH_CALLS`` health calls at once, and two threads are left beyond both. No
    authentication. Plaintext even with TLS, as kubelet's gRPC probes do not speak TLS;
    reachable by no pod in deploy/k8s (NetworkPolicy)."""
    if settings.health_port is None:
        return None, None, None
    reflection = ShareRule(
        capacity=HEALTH_PORT_REFLECTION_STREAMS,
        per_client=HEALTH_PORT_REFLECTION_STREAMS,
        kept_for_new=0,
        capacity_setting="reflection streams on the health port, fixed",
        per_client_setting="reflection streams on the health port, fixed",
        kept_setting="reflection streams on the health port, fixed",
    )
    pools = [
        Pool(
            HEALTH_PREFIX,
            health_calls(HEALTH_PORT_HEALTH_CALLS, "the health port"),
            by_address=True,
            unary=True,
        ),
        Pool(
            "",
            CallLimiter(reflection, noun="reflection streams", subject="reflection-streams"),
            by_address=True,
        ),
    ]
    threads = futures.ThreadPoolExecutor(
        max_workers=HEALTH_PORT_REFLECTION_STREAMS + HEALTH_PORT_HEALTH_CALLS + 2,
        thread_name_prefix="forgedit-health",
    )
    server = grpc.server(
        threads,
        interceptors=[CallLimitInterceptor(pools, Authenticator([]))],
        options=server_options(4 * 1024 * 1024),
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    if port == 0:
        raise RuntimeError(f"could not listen on health port {settings.health_port}")
    server.start()
    return server, port, threads


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
    """Name -> directory of every served base model; a built-in's name (``forgedit.zoo``) as a
    value stands for its directory, and the default built-in is served when none is set."""
    if settings.base_models:
        return {
            name: builtin.stable_diffusion
            if (builtin := builtin_named(path, home=settings.data_dir)) is not None
            else path
            for name, path in settings.base_models.items()
        }
    builtin = builtin_base_model(home=settings.data_dir)
    return {builtin.name: builtin.stable_diffusion}


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
    the configured UNet backend (exports and plans cached under ``data_dir/engines``), at the
    declared resolutions (``FORGEDIT_RESOLUTIONS``; the engine's warm-up builds each, so
    readiness waits, and holds exactly those compiled UNets). Backend fallbacks, degradation
    and compiled memory are reported in ``metrics``."""
    sizes = settings.declared_sizes()

    def blip_for(name: str) -> Path | None:
        """FORGEDIT_BLIP_DIR, else the captioner a built-in brings (None for a directory)."""
        if settings.blip_dir is not None:
            return settings.blip_dir
        value = settings.base_models[name] if settings.base_models else None
        builtin = builtin_named(value, home=settings.data_dir)  # None: the default built-in
        return builtin.blip if builtin is not None else None

    def build(name: str, device: str) -> EngineLike:
        from forgedit.backends.select import Fallback
        from forgedit.caption import Captioner
        from forgedit.engine import Engine
        from forgedit.models import load_base_model

        base = load_base_model(
            base_models[name], device=device, name=name, vae_directory=settings.vae_dirs.get(name)
        )
        blip_dir = blip_for(name)
        captioner = Captioner.load(blip_dir, device=device) if blip_dir is not None else None

        def on_fallback(fallback: Fallback) -> None:
            if metrics is not None:
                metrics.count_fallback(fallback.backend, fallback.reason)
                if fallback.scope == "replica":
                    metrics.set_backend_degraded(name, True)

        engine = Engine(
            base,
            captioner,
            precision=settings.precision,
            unet_backend=settings.unet_backend,
            cache_dir=settings.data_dir / "engines",
            max_batch=settings.max_batch,
            on_backend_fallback=on_fallback,
            resolutions=sizes,
            max_compiled_graphs=len(sizes) if sizes else 1,  # one per declared size
        )
        if metrics is not None:
            metrics.set_backend_degraded(name, engine.backend_degraded)
            metrics.track_compiled_bytes(name, lambda: engine.compiled_bytes)
        return engine

    return build


def default_registry(settings: ServerSettings) -> RegistryLike:
    """The MLflow edit-model registry of the settings (embedded SQLite by default)."""
    from registry import EditModelRegistry
    from registry.config import RegistryConfig

    store = settings.mlflow_backend_store_uri
    config = RegistryConfig(
        data_dir=settings.data_dir / "registry",
        tracking_uri=settings.mlflow_tracking_uri,
        backend_store_uri=store.get_secret_value() if store is not None else None,
        sweep_interval_s=settings.retention_sweep_interval_s,
    )
    if config.purge_store_uri is None:
        log.warning(
            "FORGEDIT_MLFLOW_BACKEND_STORE_URI is unset with an MLflow tracking server: "
            "deleted edit models' runs are only soft-deleted in MLflow's database until an "
            "`mlflow gc` (README, 'Deletion')"
        )
    return EditModelRegistry(config)


def main() -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0; exit 1 at once when a device cannot
    load its models. Configuration: environment only."""
    settings = ServerSettings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        server, _port = create_server(settings)
    except Exception:
        log.exception("the server could not start")
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.lifecycle.on_failure(lambda _error: stop.set())
    stop.wait()  # a signal's handler runs (and sets it) while this waits
    if server.lifecycle.startup_error is not None:
        log.error("a device could not load its models; exiting")
        server.stop()
        return 1
    server.drain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
