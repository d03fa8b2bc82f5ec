"""Sampling UNet backends: one interface (``base.UNetBackend``), three implementations
(``torch_backend``, ``onnxruntime_backend``, ``tensorrt_backend``), one weight-swap mechanism
(``base.LoadedWeights``), the shared ONNX export (``onnx_export``), the numerical canary
(``canary``) and the choice between them (``select``).

Importing this package imports nothing heavy (the names only); submodules import torch, and
onnxruntime or TensorRT lazily, when that backend is built."""

from forgedit.backends.names import (
    ACCELERATED_BACKENDS,
    BACKEND_CHOICES,
    BACKEND_NAMES,
    FALLBACK_REASONS,
)

__all__ = ["ACCELERATED_BACKENDS", "BACKEND_CHOICES", "BACKEND_NAMES", "FALLBACK_REASONS"]
