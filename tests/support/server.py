"""Shared helpers for the server's service and fault tests (no tests here).

``running_server`` starts a real server on a free loopback port with the real tiny engine and
the real embedded MLflow registry (or injected fakes), with its own data directory and its
own process temp directory, so ``assert_nothing_left_behind`` can check that a scenario left
no temp files, no queued or running job (the device is free) and a ready server.

The fault tests import this module by path (``tests/faults`` is a separate directory).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.main import ForgeditServer, create_server
from server.ports import EngineFactory, RegistryLike
from server.service import SERVICE_NAME
from server.settings import ServerSettings
from server.transport import client_options

TOKEN = "test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)

# Tiny and quick: 64x64 (the tiny model's native size), 2 training updates of batch 1,
# 2 denoising steps, one seed, one gamma.
QUICK_TRAINING = {"updates": 2, "batch_size": 1, "seed": 7}
QUICK_SWEEP = {"steps": 2, "gammas": [0.6], "seeds": [3]}


@dataclass
class Harness:
    server: ForgeditServer
    port: int
    channel: grpc.Channel
    stub: pb_grpc.ForgeditServiceStub
    data_dir: Path
    temp_dir: Path
    registry: Any

    @property
    def scheduler(self) -> Any:
        return self.server.scheduler

    def health(self, service: str = SERVICE_NAME) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def edit_request(
    image: bytes, prompt: str = "A photo of a pear.", **overrides: Any
) -> pb.EditRequest:
    training = {**QUICK_TRAINING, **overrides.pop("training", {})}
    sweep = {**QUICK_SWEEP, **overrides.pop("sweep", {})}
    return pb.EditRequest(
        image=image,
        target_prompts=[prompt],
        training=pb.TrainingOptions(**training),
        sweep=pb.SweepOptions(**sweep),
        **overrides,
    )


SAMPLE_PHOTOS = Path(__file__).resolve().parents[2] / "samples" / "photos"


def sample_photo(name: str = "coffee.jpg") -> bytes:
    """The bytes of one of the repository's openly licensed sample photos (samples/photos)."""
    return (SAMPLE_PHOTOS / name).read_bytes()


@contextlib.contextmanager
def running_server(
    tmp: Path,
    tiny_model_dir: Path,
    *,
    engine_factory: EngineFactory | None = None,
    registry: RegistryLike | None = None,
    tokens: Sequence[str] = (TOKEN,),
    **settings: Any,
) -> Iterator[Harness]:
    """A started, ready server (see the module docstring); stopped on exit."""
    from registry import EditModelRegistry, RegistryConfig

    data_dir = tmp / "data"
    temp_dir = tmp / "process-tmp"
    temp_dir.mkdir(parents=True)
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(temp_dir)  # everything in this process that makes temp files
    own_registry = None
    if registry is None:
        own_registry = registry = EditModelRegistry(RegistryConfig(data_dir=data_dir / "registry"))
    values: dict[str, Any] = {
        "grpc_port": 0,
        "health_port": 0,
        "metrics_port": 0,
        "data_dir": data_dir,
        "base_models": {"tiny": tiny_model_dir / "stable-diffusion"},
        "blip_dir": tiny_model_dir / "blip",
        "auth_tokens": list(tokens),
        "heartbeat_interval_s": 1.0,
        "grace_period_s": 10.0,
        "log_format": "text",
        # The shipped default is "auto" (ONNX Runtime here), whose start-up export costs
        # seconds per server; tests of the accelerated path ask for it explicitly.
        "unet_backend": "torch",
    }
    values.update(settings)
    server, port = create_server(
        ServerSettings(**values), engine_factory=engine_factory, registry=registry
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options())
    try:
        if not server.wait_ready(120):
            raise RuntimeError(f"the server did not become ready: {server.lifecycle.startup_error}")
        yield Harness(
            server,
            port,
            channel,
            pb_grpc.ForgeditServiceStub(channel),
            data_dir,
            temp_dir,
            registry,
        )
    finally:
        channel.close()
        server.stop()
        if own_registry is not None:
            own_registry.close()
        tempfile.tempdir = saved_tempdir


def assert_nothing_left_behind(h: Harness, timeout: float = 30.0) -> None:
    """The device is free (nothing queued or running), no temp files anywhere we can see, no
    spooled edit model, and the server still answers SERVING."""
    assert h.scheduler.wait_idle(timeout), "a job is still queued or running"
    assert h.health() == health_pb2.HealthCheckResponse.SERVING
    leftovers = [p for p in h.temp_dir.rglob("*")]
    assert not leftovers, f"temp files left behind: {leftovers[:5]}"
    registry_dir = h.data_dir / "registry"
    for sub in ("spool/staging", "spool/trash", "spool/entries", "cache/tmp", "cache/trash"):
        d = registry_dir / sub
        if d.is_dir():
            assert not any(d.iterdir()), f"left behind in registry {sub}: {list(d.iterdir())}"
    stray = [p for p in h.data_dir.rglob("*") if p.name.endswith(".tmp")]
    assert not stray, f"temp files left behind: {stray[:5]}"


# --------------------------------------------------------------------------------------------
# Calls and statuses


@dataclass
class Outcome:
    """How a call ended: the events seen, the status code and the rich status."""

    events: list[pb.Event]
    code: grpc.StatusCode
    details: str
    status: status_pb2.Status | None

    def kinds(self) -> list[str]:
        return [e.WhichOneof("kind") or "" for e in self.events]

    def of(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]

    def detail(self, message_type: Any) -> Any:
        """The first status detail of ``message_type`` (e.g. ``BadRequest``), or None."""
        if self.status is None:
            return None
        for packed in self.status.details:
            if packed.Is(message_type.DESCRIPTOR):
                value = message_type()
                packed.Unpack(value)
                return value
        return None

    def field_violations(self) -> list[str]:
        bad = self.detail(error_details_pb2.BadRequest)
        return [v.field for v in bad.field_violations] if bad else []


def refused(outcome: Outcome, field: str, *needles: str) -> None:
    """INVALID_ARGUMENT before any event, one field violation on ``field`` saying ``needles``."""
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert outcome.events == []
    bad = outcome.detail(error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == [field], bad
    for needle in needles:
        assert needle in outcome.details, (needle, outcome.details)


def stream(
    call: Callable[..., Any],
    request: Any,
    *,
    metadata: Any = AUTH,
    timeout: float | None = 120.0,
    on_event: Callable[[pb.Event, Any], None] | None = None,
) -> Outcome:
    """Run a server-streaming call to its end and describe how it ended."""
    events: list[pb.Event] = []
    responses = call(request, metadata=metadata, timeout=timeout)
    try:
        for response in responses:
            events.append(response.event)
            if on_event is not None:
                on_event(response.event, responses)
    except grpc.RpcError as e:
        return Outcome(events, e.code(), e.details() or "", rpc_status.from_call(e))
    return Outcome(events, grpc.StatusCode.OK, "", None)


def unary(
    call: Callable[..., Any], request: Any, *, metadata: Any = AUTH, timeout: float = 30.0
) -> tuple[Any, Outcome]:
    try:
        return call(request, metadata=metadata, timeout=timeout), Outcome(
            [], grpc.StatusCode.OK, "", None
        )
    except grpc.RpcError as e:
        return None, Outcome([], e.code(), e.details() or "", rpc_status.from_call(e))


# --------------------------------------------------------------------------------------------
# Hostile images


def png_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width``x``height`` pixels (a
    decompression bomb shape), with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def encoded(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def psd_bytes(width: int = 4, height: int = 4) -> bytes:
    """A minimal 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers: empty
    pixels = struct.pack(">H", 0) + b"\x80" * (3 * width * height)  # raw, planar
    return header + sections + pixels


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# Threads of bounded pools that stay (idle) once started, by design: gRPC's RPC threads,
# the registry-call pool and MLflow's artifact upload pool. They are bounded by their size,
# not expected to go away, so they are counted apart.
POOL_THREAD_PREFIXES = ("forgedit-rpc", "registry-call", "MlflowLocalArtifactRepository")


@dataclass(frozen=True)
class Resources:
    """What a scenario could leak in this process: threads (outside the bounded pools) and
    open file descriptors."""

    threads: int
    pooled: int
    fds: int

    @classmethod
    def now(cls) -> Resources:
        import threading

        names = [t.name for t in threading.enumerate()]
        pooled = sum(n.startswith(POOL_THREAD_PREFIXES) for n in names)
        return cls(len(names) - pooled, pooled, len(os.listdir("/proc/self/fd")))


def assert_resources_back(
    before: Resources, *, max_pooled: int = 80, extra_fds: int = 16, timeout: float = 30.0
) -> None:
    """Threads settle back to ``before`` (pool threads at most ``max_pooled``) and fds to
    ``before`` plus ``extra_fds`` (pooled HTTP connections to MLflow, gRPC's own)."""
    import threading

    def settled() -> bool:
        now = Resources.now()
        return (
            now.threads <= before.threads
            and now.pooled <= max_pooled
            and now.fds <= before.fds + extra_fds
        )

    ok = wait_for(settled, timeout=timeout, interval=0.2)
    names = sorted(t.name for t in threading.enumerate())
    assert ok, f"resources did not settle: before {before}, now {Resources.now()}; {names}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGEDIT_")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
    )
    env.update(extra)
    return env


def server_process_env(data_dir: Path, tiny_model_dir: Path, port: int, **extra: str) -> dict:
    """The environment of a real ``python -m server.main`` process on the tiny model: its data
    directory, the gRPC port, no metrics port, an ephemeral health port, the tests' token;
    ``extra`` adds or overrides ``FORGEDIT_*`` settings."""
    return subprocess_env(
        FORGEDIT_BASE_MODELS=json.dumps({"tiny": str(tiny_model_dir / "stable-diffusion")}),
        FORGEDIT_BLIP_DIR=str(tiny_model_dir / "blip"),
        FORGEDIT_DATA_DIR=str(data_dir),
        FORGEDIT_GRPC_PORT=str(port),
        FORGEDIT_METRICS_PORT="none",
        FORGEDIT_HEALTH_PORT="0",
        FORGEDIT_AUTH_TOKENS=json.dumps([TOKEN]),
        **extra,
    )
