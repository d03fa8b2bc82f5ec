"""Prometheus metrics (ARCHITECTURE.md, "Observability"), served on their own HTTP port.

Each server instance has its own ``CollectorRegistry``, so several servers in one process (the
tests) do not share series. Labels are bounded sets only: ``method`` (the RPC's name),
``backend`` (torch, onnxruntime, tensorrt), ``reason`` of a backend fallback (bounded codes),
``code`` (a gRPC status name), ``reason`` (a cancellation reason or status name),
``kind`` of a preview (training_free, x0) and ``base_model`` (the configured base models).
Never a job, request or edit-model ID.

Histograms (seconds): ``forgedit_queue_wait_seconds{method}``, ``forgedit_captioning_seconds``,
``forgedit_training_seconds{base_model}``, ``forgedit_registration_seconds``,
``forgedit_sampling_image_seconds{method,backend}`` (per image, by the UNet backend that
sampled it), ``forgedit_time_to_first_image_seconds{method}`` (from accepting a job to its
first final image), ``forgedit_time_to_first_preview_seconds{method,kind}`` (to its first
preview of each kind),
``forgedit_rpc_duration_seconds{method,code}`` (end-to-end, every RPC).
Gauges: ``forgedit_queue_depth``, ``forgedit_running_jobs``, ``forgedit_unet_backend_degraded{
base_model}`` (1 while a base model samples on a fallback backend),
``forgedit_unet_compiled_bytes{base_model}`` (memory the compiled UNets of a base model hold
beside the torch model, all devices; read at each scrape), ``forgedit_retained_jobs`` and
``forgedit_retained_job_bytes`` (finished jobs kept for replay, and the bytes of their events,
bounded by FORGEDIT_MAX_RETAINED_JOB_BYTES); cached edit models come from the registry's own
``forgedit_registry_cached_edit_models{tier}``.
Counters: ``forgedit_cancellations_total{reason}``, ``forgedit_job_failures_total{method,
reason}``, ``forgedit_images_total{method}``, ``forgedit_unet_backend_fallbacks_total{backend,
reason}`` (a UNet backend that could not serve: not installed, no CUDA, build failed, canary
failed), ``forgedit_previews_total{method,kind}`` (previews sent) and
``forgedit_previews_dropped_total{method}`` (previews past a job's byte budget). The failure,
image, preview, fallback and time-to-first series exist at 0 from start-up (every bounded label
combination), so alerts over their ``rate()`` or quantiles see a replica's first event.

The endpoint also serves the process-wide default registry (the registry package's spool and
cache gauges, and prometheus_client's process and Python collectors).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from forgedit.backends.names import ACCELERATED_BACKENDS, BACKEND_NAMES, FALLBACK_REASONS
from forgedit.preview import PREVIEW_KINDS

# The label values of the job counters (bounded sets, exported at 0 from start-up):
# job methods, and failure reasons = lower-case status names (server.errors.MappedError.reason).
JOB_METHODS = ("Edit", "Sample")
FAILURE_REASONS = tuple(
    code.name.lower() for code in grpc.StatusCode if code is not grpc.StatusCode.OK
)
# The previews each job method can send: only an Edit has a training-free one.
PREVIEWS_OF = {"Edit": PREVIEW_KINDS, "Sample": ("x0",)}

# From a 64x64 test image (tens of ms) to a 1000-update fine-tune on a slow GPU (minutes).
_LONG = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
_SHORT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The server's metrics, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_wait = Histogram(
            "forgedit_queue_wait_seconds",
            "Time a job waited in the queue before it started.",
            ["method"],
            buckets=_LONG,
            registry=r,
        )
        self.captioning = Histogram(
            "forgedit_captioning_seconds",
            "Time to caption the source image with BLIP.",
            buckets=_SHORT,
            registry=r,
        )
        self.training = Histogram(
            "forgedit_training_seconds",
            "Time to fine-tune one edit model.",
            ["base_model"],
            buckets=_LONG,
            registry=r,
        )
        self.registration = Histogram(
            "forgedit_registration_seconds",
            "Time to store an edit model in the registry.",
            buckets=_SHORT,
            registry=r,
        )
        self.sampling_image = Histogram(
            "forgedit_sampling_image_seconds",
            "Sampling time per finished image (a batch's time divided by its images), by the "
            "UNet backend that sampled it.",
            ["method", "backend"],
            buckets=_SHORT,
            registry=r,
        )
        self.backend_fallbacks = Counter(
            "forgedit_unet_backend_fallbacks",
            "UNet backends that could not serve and were replaced by the next one, by reason.",
            ["backend", "reason"],
            registry=r,
        )
        self.backend_degraded = Gauge(
            "forgedit_unet_backend_degraded",
            "1 while this replica samples the base model on a fallback UNet backend (not the "
            "first its configured chain tried), else 0.",
            ["base_model"],
            registry=r,
        )
        self.compiled_bytes = Gauge(
            "forgedit_unet_compiled_bytes",
            "Bytes the compiled UNets (ONNX Runtime sessions, TensorRT engines) of a base model "
            "hold beside its torch model, summed over devices; 0 on torch.",
            ["base_model"],
            registry=r,
        )
        self._compiled: dict[str, list[Callable[[], int]]] = {}
        self.time_to_first_image = Histogram(
            "forgedit_time_to_first_image_seconds",
            "From accepting a job to its first image.",
            ["method"],
            buckets=_LONG,
            registry=r,
        )
        self.time_to_first_preview = Histogram(
            "forgedit_time_to_first_preview_seconds",
            "From accepting a job to its first preview of a kind (training_free, x0).",
            ["method", "kind"],
            buckets=_LONG,
            registry=r,
        )
        self.previews = Counter(
            "forgedit_previews", "Previews sent, by kind.", ["method", "kind"], registry=r
        )
        self.previews_dropped = Counter(
            "forgedit_previews_dropped",
            "Previews not sent because the job's preview byte budget was spent.",
            ["method"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "forgedit_rpc_duration_seconds",
            "End-to-end duration of an RPC, by final status code.",
            ["method", "code"],
            buckets=_LONG,
            registry=r,
        )
        self.queue_depth = Gauge("forgedit_queue_depth", "Jobs waiting for a device.", registry=r)
        self.running_jobs = Gauge("forgedit_running_jobs", "Jobs running on a device.", registry=r)
        self.retained_jobs = Gauge(
            "forgedit_retained_jobs",
            "Finished jobs kept for re-attaching and GetJob.",
            registry=r,
        )
        self.retained_job_bytes = Gauge(
            "forgedit_retained_job_bytes",
            "Bytes of the events (mostly images) that finished jobs keep for replay.",
            registry=r,
        )
        self.cancellations = Counter(
            "forgedit_cancellations", "Jobs cancelled, by reason.", ["reason"], registry=r
        )
        self.failures = Counter(
            "forgedit_job_failures",
            "Jobs that failed, by method and status.",
            ["method", "reason"],
            registry=r,
        )
        self.images = Counter("forgedit_images", "Images produced.", ["method"], registry=r)
        self._initialise_series()
        r.register(_DefaultRegistry())
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _initialise_series(self) -> None:
        """Export every (bounded) labelled counter and histogram series at 0 from the start.
        A series that first appears at its first event has no earlier sample, so ``rate()``
        and ``increase()`` over it stay empty and an alert on them never fires for a
        replica's first failure (or its first slow preview)."""
        for method in JOB_METHODS:
            self.images.labels(method=method)
            self.time_to_first_image.labels(method=method)
            self.previews_dropped.labels(method=method)
            for kind in PREVIEWS_OF[method]:
                self.time_to_first_preview.labels(method=method, kind=kind)
                self.previews.labels(method=method, kind=kind)
            for reason in FAILURE_REASONS:
                self.failures.labels(method=method, reason=reason)
            for backend in BACKEND_NAMES:
                self.sampling_image.labels(method=method, backend=backend)
        for backend in ACCELERATED_BACKENDS:
            for reason in FALLBACK_REASONS:
                self.backend_fallbacks.labels(backend=backend, reason=reason)

    def count_fallback(self, backend: str, reason: str) -> None:
        """One UNet backend fallback (called by the engine, from its worker thread)."""
        self.backend_fallbacks.labels(backend=backend, reason=reason).inc()

    def set_backend_degraded(self, base_model: str, degraded: bool) -> None:
        """Whether ``base_model``'s engine serves on a fallback backend (the state the
        ForgeditUNetBackendFallback alert reads: a counter's rate would forget it)."""
        self.backend_degraded.labels(base_model=base_model).set(1 if degraded else 0)

    def track_compiled_bytes(self, base_model: str, resident_bytes: Callable[[], int]) -> None:
        """Count ``resident_bytes()`` (one engine's ``compiled_bytes``) in ``base_model``'s
        gauge, read at every scrape (the engines' caches change in their worker threads)."""
        engines = self._compiled.setdefault(base_model, [])
        engines.append(resident_bytes)
        self.compiled_bytes.labels(base_model=base_model).set_function(
            lambda: float(sum(read() for read in engines))
        )

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 = any free port); returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _DefaultRegistry(Collector):
    """Forwards the process-wide default registry into a server's own registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()

    def describe(self) -> list[Metric]:
        return []  # unknown up front; also keeps auto_describe from collecting at register
