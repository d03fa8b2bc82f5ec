"""The UNet on ONNX Runtime: one session per (base model, resolution, batch profile), weights
bound with IOBinding.

Each session runs the cached export (``onnx_export``) whose weights are graph inputs. Its
``IOBinding`` holds one bound array per weight: all of them once, when the session is made
and whenever the plan crosses to another edit model (bindings persist between runs, so they
are cleared first), and only the changed ones on a strategy switch. The bound arrays are the
backend's own copies, so later in-place writes to the torch parameters never leak into a
session unnoticed. Never ``SessionOptions.add_initializer``: for every weight the optimiser
folds it is silently ignored and the session runs the base model (ENVIRONMENT.md, "ONNX").

Memory: a session holds its own fp32 copy of the UNet weights (3.4 GB for SD 1.x) beside the
torch model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from forgedit.backends.base import (
    BackendUnavailableError,
    CompiledBackend,
    LoadedWeights,
    Shape,
)
from forgedit.backends.onnx_export import DATA_INPUTS, OUTPUT, OnnxExport, export_unet
from forgedit.weights import ResidentWeights

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from onnxruntime import OrtValue

log = logging.getLogger("forgedit.backends")


def import_onnxruntime() -> ModuleType:
    """``onnxruntime``, or ``BackendUnavailableError`` saying it is not installed."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)",
            "not_installed",
        ) from e
    return onnxruntime


def providers_for(device: torch.device, available: list[str]) -> list[str]:
    """The execution providers for ``device``: CPU on the CPU; CUDA (then CPU for the odd
    unsupported node) on a GPU, which needs ``onnxruntime-gpu``."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailableError(
            "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); running "
            "a CUDA device's UNet on the CPU provider would be slower than torch",
            "no_cuda",
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxRuntimeBackend(CompiledBackend):
    """ONNX Runtime sessions over the cached export, one per ``Shape``.

    ``threads``: intra-op threads per session (default: torch's, which tests and CI set to 1).
    ``cache_dir``: where exports live (the server's data directory, the CLI's cache)."""

    name = "onnxruntime"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        weights: ResidentWeights,
        *,
        fingerprint: str,
        cache_dir: Path,
        threads: int | None = None,
    ) -> None:
        super().__init__(unet, weights)
        self._ort = import_onnxruntime()
        self._providers = providers_for(self.device, self._ort.get_available_providers())
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir)
        self.threads = threads or torch.get_num_threads()
        self.export_seconds = 0.0

    def _compile(self, shape: Shape) -> _Session:
        export = export_unet(self.unet, self.fingerprint, shape, self.cache_dir)
        self.export_seconds += export.seconds
        return _Session(self._ort, export, self._providers, self)


class _Session:
    """One ``InferenceSession`` with its weight bindings and the state they hold."""

    def __init__(
        self, ort: ModuleType, export: OnnxExport, providers: list[str], backend: OnnxRuntimeBackend
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = backend.threads
        options.inter_op_num_threads = 1
        # Errors only: ORT warns once per weight that an initializer that is also an input
        # cannot be constant-folded, which is exactly the point of binding weights.
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(export.path), options, providers=providers)
        self._ort = ort
        self._device = backend.device
        self._name_map = export.name_map
        self._binding = self._session.io_binding()
        # name -> (array, OrtValue): the arrays must outlive their bindings.
        self._bound: dict[str, tuple[np.ndarray, OrtValue]] = {}
        self.loaded = LoadedWeights(backend.weights.state("unet"))
        params = {n: p.detach() for n, p in backend.unet.named_parameters()}
        self._apply(params, new_edit_model=True)

    @property
    def device(self) -> torch.device:
        return self._device

    def sync(self, weights: ResidentWeights) -> None:
        self.loaded.sync(weights, self._apply)

    def _apply(self, tensors: Mapping[str, torch.Tensor], *, new_edit_model: bool) -> None:
        """Take copies of ``tensors``; rebind all weights after clearing when the plan crosses
        to another edit model, else only these."""
        for name, tensor in tensors.items():
            array = np.ascontiguousarray(tensor.to("cpu", torch.float32).numpy()).copy()
            self._bound[self._name_map[name]] = (
                array,
                self._ort.OrtValue.ortvalue_from_numpy(array),
            )
        if new_edit_model:
            self._binding.clear_binding_inputs()
            names = list(self._bound)
        else:
            names = [self._name_map[n] for n in tensors]
        for onnx_name in names:
            self._binding.bind_ortvalue_input(onnx_name, self._bound[onnx_name][1])
        if len(self._bound) != len(self._name_map):
            raise RuntimeError(
                f"only {len(self._bound)} of {len(self._name_map)} UNet weights are bound"
            )

    def predict(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        inputs = {
            DATA_INPUTS[0]: np.ascontiguousarray(sample.detach().cpu().float().numpy()),
            DATA_INPUTS[1]: np.asarray(int(timestep), dtype=np.int64),
            DATA_INPUTS[2]: np.ascontiguousarray(
                encoder_hidden_states.detach().cpu().float().numpy()
            ),
        }
        for name, array in inputs.items():
            self._binding.bind_cpu_input(name, array)
        self._binding.bind_output(OUTPUT, "cpu")
        self._session.run_with_iobinding(self._binding)
        out = self._binding.copy_outputs_to_cpu()[0]
        return torch.from_numpy(out).to(self._device)
