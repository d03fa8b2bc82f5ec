"""Helpers for the registry's tests and benchmark: random edit models of real shapes, and a real
``mlflow server`` process on a loopback port.

Not used by the service. Edit models built here are genuine artifacts (``forgedit.artifact``
format) whose tensors are random: the registry only stores bytes, so no training is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from forgedit.artifact import EditModel
from forgedit.config import DeltaFormat, Stage, TrainingConfig
from forgedit.delta import decode, encode

# The UNet blocks Forgedit fine-tunes (ARCHITECTURE.md): down_blocks.1-3 and up_blocks.1-3.
TRAINED_PREFIXES = tuple(f"{side}_blocks.{i}." for side in ("down", "up") for i in (1, 2, 3))


def small_config(seed: int = 0) -> TrainingConfig:
    return TrainingConfig.for_mode(
        "joint",
        height=64,
        width=64,
        seed=seed,
        stages=(Stage("joint", updates=3, batch_size=2, unet_lr=6e-5, text_lr=1e-3),),
    )


def random_edit_model(
    seed: int = 0,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float16,
    image_bytes: bytes | None = None,
    base_model_name: str = "tiny-sd",
    base_model_fingerprint: str = "b" * 64,
    config: TrainingConfig | None = None,
    delta_format: DeltaFormat | None = None,
) -> EditModel:
    """An ``EditModel`` with random tensors (deterministic in ``seed``), stored in
    ``delta_format`` (default: fp16 for ``dtype`` fp16, else fp32). Its ``delta`` is already
    decoded from that format, as the engine's are, so a saved and reloaded copy equals it."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {
        "unet.down_blocks.1.attentions.0.proj_in.weight": (32, 32),
        "unet.up_blocks.1.resnets.0.conv1.weight": (16, 32, 3, 3),
    }
    fmt = delta_format or ("fp16" if dtype == torch.float16 else "fp32")
    raw = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    delta = decode(encode(raw, fmt), fmt)
    config = dataclasses.replace(config or small_config(seed), delta_format=fmt)
    image = image_bytes if image_bytes is not None else f"image-{seed}".encode()
    return EditModel(
        delta=delta.tensors,
        delta_scales=delta.scales,
        source_embedding=torch.randn(1, 77, 32, generator=g),
        base_model_name=base_model_name,
        base_model_fingerprint=base_model_fingerprint,
        source_prompt=f"A photo of thing number {seed}",
        training=config,
        loss_curve=[1.0 / (i + 1) for i in range(3)],
        timings={"caption": 0.1, "training": 1.5},
        image_sha256=hashlib.sha256(image).hexdigest(),
    )


def sd1_trained_subset_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``down_blocks.1-3`` and ``up_blocks.1-3`` of an SD-1.x UNet, read
    from a UNet built on the meta device (no memory allocated)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    return {
        f"unet.{name}": tuple(p.shape)
        for name, p in unet.named_parameters()
        if name.startswith(TRAINED_PREFIXES)
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, proxied local artifacts) on 127.0.0.1.

    ``start()`` waits for ``GET /health``; ``kill()`` sends SIGKILL to the whole process group
    (the server and its workers); ``stop()`` sends SIGTERM then SIGKILL. Restarting reuses the
    same port and stores.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.backend_uri = f"sqlite:///{root / 'server.db'}"
        self.artifacts_dir = root / "server-artifacts"
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(mlflow_cli),
                    "server",
                    "--backend-store-uri",
                    self.backend_uri,
                    "--artifacts-destination",
                    str(self.artifacts_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: kill() reaches the workers
            )
        self.pgid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.log_path.name}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, grace=10.0)

    def _signal(self, sig: int, grace: float = 0.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # leader of its own session/group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            self.proc.wait(timeout=grace or 10.0)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10.0)
        # Workers may outlive the leader by a moment: make sure the whole group is gone.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self.proc = None

    def group_alive(self) -> bool:
        """Whether any process of the last server's group is still alive."""
        return self.pgid is not None and _group_alive(self.pgid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DownSwitch:
    """Wraps a registry's ``MlflowClient``: while ``down``, every call fails as the ``requests``
    library fails when the server is gone (connection refused)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                import requests

                raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")
            return attr(*args, **kwargs)

        return call


def switchable(reg: Any) -> DownSwitch:
    """Put a ``DownSwitch`` between the registry ``reg`` and MLflow; ``restore`` removes it."""
    switch = DownSwitch(reg._backend.client)
    reg._backend.client = switch
    return switch


def restore(reg: Any) -> None:
    client = reg._backend.client
    if isinstance(client, DownSwitch):
        reg._backend.client = client.client
