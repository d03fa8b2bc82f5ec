"""The numerical canary: one UNet step on fixed inputs through a candidate backend and through
eager torch, compared against a documented tolerance.

Refittable TensorRT engines are known to drop fusions and, in some versions, bias terms after a
refit (TensorRT 11.3's release notes: a GEMM bias dropped with ``BuilderFlag.REFIT``); nothing in
their API says so. The canary runs after every build or load of a compiled UNet (base weights)
and, for TensorRT, after the first refit of every edit-model load (each ``Engine.sample`` loads
its edit model afresh, so that is once per job: two UNet calls on two rows, small next to a
sweep; later strategy switches of the same load are not re-checked). ONNX Runtime binds the
exact fp32 tensors (1e-6 from torch, ENVIRONMENT.md), so it is checked once per build only.

Outside the tolerance the backend is refused with ``BackendUnavailableError(reason=
"canary_failed")``: at warm-up the replica falls back to the next backend; during a job, that
job finishes on torch (``forgedit.engine``). Either way it is logged and counted.

Tolerance (``CANARY_TOLERANCE``), as the largest |ε_candidate − ε_torch| relative to the
largest |ε_torch|: 1e-4 for fp32 backends (ONNX Runtime measures ~1e-6), 1e-2 for TensorRT's
fp16 kernels (well above fp16 rounding through a UNet, far below a missing bias or a stale
weight, which move ε by tens of percent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from forgedit.backends.base import (
    BackendUnavailableError,
    NoisePredictor,
    Shape,
    UNetBackend,
    example_inputs,
)

log = logging.getLogger("forgedit.backends")

CANARY_TOLERANCE = {"torch": 1e-4, "onnxruntime": 1e-4, "tensorrt": 1e-2}


@dataclass(frozen=True)
class CanaryResult:
    relative_error: float
    tolerance: float
    max_abs_error: float = 0.0

    @property
    def passed(self) -> bool:
        # NaN compares false, so a NaN output fails.
        return self.relative_error <= self.tolerance


def compare(
    candidate: NoisePredictor,
    reference: NoisePredictor,
    inputs: tuple[torch.Tensor, ...],
    tolerance: float,
) -> CanaryResult:
    """One step through both; the relative error of the candidate's ε."""
    sample, timestep, text = inputs
    with torch.no_grad():
        expected = reference.predict(sample, timestep, text).float().cpu()
        got = candidate.predict(sample, timestep, text).float().cpu()
    scale = float(expected.abs().max()) or 1.0
    error = float((got - expected).abs().max())
    return CanaryResult(error / scale, tolerance, error)


class CanariedBackend(UNetBackend):
    """Wraps a backend so that it is only used after its canary passed: for each build of a
    shape once on the base weights it was prepared with, then (``per_edit_model``) after the
    first sync of each edit-model load.

    ``reference`` is the torch backend on the same live parameters (which always hold exactly
    the weights the candidate was just synced to). ``results`` keeps the last result per shape
    (the warm-up's readiness report reads it)."""

    def __init__(
        self,
        inner: UNetBackend,
        reference: UNetBackend,
        tolerance: float | None = None,
        *,
        per_edit_model: bool = True,
    ) -> None:
        super().__init__(inner.unet, inner.weights)
        self.inner = inner
        self.reference = reference
        self.name = inner.name
        self.tolerance = CANARY_TOLERANCE[inner.name] if tolerance is None else tolerance
        self.per_edit_model = per_edit_model
        # shape -> (build checked, edit-model loads checked on it; 0 = the base)
        self._passed: dict[Shape, tuple[int, set[int]]] = {}
        self.results: dict[Shape, CanaryResult] = {}

    def prepare(self, shape: Shape) -> None:
        self.inner.prepare(shape)
        self.predictor(shape)

    def predictor(self, shape: Shape) -> NoisePredictor:
        candidate = self.inner.predictor(shape)
        build = self.inner.build_id(shape)
        loads = {g for g, _ in self.weights.state("unet").values()} or {0}
        checked_build, checked = self._passed.get(shape, (-1, set()))
        if checked_build != build:
            checked = set()
        if not checked or (self.per_edit_model and not loads <= checked):
            result = compare(
                candidate,
                self.reference.predictor(shape),
                example_inputs(self.unet, shape, rows=min(2, shape.max_rows)),
                self.tolerance,
            )
            self.results[shape] = result
            if not result.passed:
                raise BackendUnavailableError(
                    f"{self.name} failed its canary on {shape.describe()}: relative error "
                    f"{result.relative_error:.2e} > tolerance {result.tolerance:.0e} against "
                    "torch",
                    "canary_failed",
                )
            log.info(
                "%s canary passed on %s (relative error %.2e)",
                self.name,
                shape.describe(),
                result.relative_error,
            )
            checked = checked | loads
        self._passed[shape] = (build, checked)
        return candidate

    def last_plan(self, shape: Shape) -> tuple[str, ...]:
        return self.inner.last_plan(shape)

    def build_id(self, shape: Shape) -> int:
        return self.inner.build_id(shape)

    def discard(self, shape: Shape) -> None:
        self.inner.discard(shape)
        self._passed.pop(shape, None)

    @property
    def resident_bytes(self) -> int:
        return self.inner.resident_bytes

    def close(self) -> None:
        self.inner.close()
