"""Choosing the sampling backend, and falling back with a reason.

``auto`` tries TensorRT on CUDA (where it imports and its canary passes), then ONNX Runtime
(where it is installed, with the CUDA provider on a GPU), then torch. An explicit choice starts
the same chain at that backend, so a replica asked for TensorRT whose canary fails still
serves, on the next backend. Every fallback is logged with its reason and reported to
``on_fallback`` (the server counts them by reason). torch never falls back: it is the
reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from forgedit.backends.base import BackendUnavailableError, UNetBackend
from forgedit.backends.names import BACKEND_CHOICES
from forgedit.errors import InvalidInputError
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger("forgedit.backends")


@dataclass(frozen=True)
class Fallback:
    """One backend that could not serve: which, a bounded ``reason`` code, and why."""

    backend: str
    reason: str
    message: str


FallbackCallback = Callable[[Fallback], None]


@dataclass(frozen=True)
class BackendConfig:
    """What building any backend of one engine needs. ``cache_dir`` holds ONNX exports and
    TensorRT plans (the server's data directory, the CLI's cache)."""

    requested: str = "torch"
    cache_dir: Path | None = None
    fingerprint: str = ""
    autocast_dtype: torch.dtype | None = None
    compile: bool = False
    threads: int | None = None


def check_backend_name(value: str) -> str:
    """The backend name, or one clear error naming the accepted ones."""
    if value not in BACKEND_CHOICES:
        raise InvalidInputError(
            f"unknown UNet backend {value!r}; accepted: {', '.join(BACKEND_CHOICES)}",
            field="unet_backend",
        )
    return value


def chain_for(requested: str, device: torch.device) -> list[str]:
    """The backends to try in order."""
    check_backend_name(requested)
    full = ["tensorrt", "onnxruntime", "torch"]
    if requested == "auto":
        return full if device.type == "cuda" else ["onnxruntime", "torch"]
    return full[full.index(requested) :]


def build_backend(
    name: str, unet: UNet2DConditionModel, weights: ResidentWeights, config: BackendConfig
) -> UNetBackend:
    """One backend by name; ``BackendUnavailableError`` if it cannot run here. Accelerated
    backends need ``config.cache_dir``. TensorRT comes wrapped in its canary."""
    from forgedit.backends.torch_backend import TorchBackend

    if name == "torch":
        return TorchBackend(
            unet, weights, compile=config.compile, autocast_dtype=config.autocast_dtype
        )
    if config.cache_dir is None:
        raise ValueError(f"the {name} backend needs a cache directory for its exports")
    if name == "onnxruntime":
        from forgedit.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            unet,
            weights,
            fingerprint=config.fingerprint,
            cache_dir=config.cache_dir / "onnx",
            threads=config.threads,
        )
    if name == "tensorrt":
        from forgedit.backends.canary import CanariedBackend
        from forgedit.backends.tensorrt_backend import TensorRTBackend

        inner = TensorRTBackend(
            unet, weights, fingerprint=config.fingerprint, cache_dir=config.cache_dir
        )
        return CanariedBackend(inner, TorchBackend(unet, weights))
    raise ValueError(f"unknown backend {name!r}")


class BackendChain:
    """The current backend of one engine and the ones left to fall back to."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        weights: ResidentWeights,
        config: BackendConfig,
        *,
        on_fallback: FallbackCallback | None = None,
        build: Callable[[str], UNetBackend] | None = None,
    ) -> None:
        self._unet = unet
        self._weights = weights
        self._config = config
        self._build = build or (lambda name: build_backend(name, unet, weights, config))
        self.on_fallback = on_fallback
        self.fallbacks: list[Fallback] = []
        self._remaining = chain_for(config.requested, torch.device(next(unet.parameters()).device))
        self.current = self._next()
        log.info("UNet backend: %s (requested %s)", self.current.name, config.requested)

    def fall_back(self, error: BackendUnavailableError) -> UNetBackend:
        """Drop the current backend for ``error`` and move to the next one."""
        self._record(self.current.name, error)
        self.current.close()
        self.current = self._next()
        log.warning("UNet backend is now %s", self.current.name)
        return self.current

    def _next(self) -> UNetBackend:
        while self._remaining:
            name = self._remaining.pop(0)
            try:
                return self._build(name)
            except BackendUnavailableError as e:
                if not self._remaining:
                    raise
                self._record(name, e)
        raise RuntimeError("no UNet backend left")  # torch is last and never unavailable

    def _record(self, name: str, error: BackendUnavailableError) -> None:
        fallback = Fallback(name, error.reason, str(error))
        self.fallbacks.append(fallback)
        log.warning("UNet backend %s unavailable (%s): %s", name, error.reason, error)
        if self.on_fallback is not None:
            self.on_fallback(fallback)
