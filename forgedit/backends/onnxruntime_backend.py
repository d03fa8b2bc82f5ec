"""The UNet on ONNX Runtime: one session per (base model, resolution, batch profile), weights
bound with IOBinding.

Each session loads the cached export (``onnx_export``) from its file, the weights from the
external-data file beside it: its weights are graph inputs whose defaults are the base. Its
``IOBinding`` holds a bound array for each weight that differs from the base (an edit model's
trained tensors, as the forgetting strategy leaves them): all of them when the plan crosses to
another edit model (bindings persist between runs, so they are cleared first), only the changed
ones on a strategy switch. The bound arrays are the backend's own copies, so later in-place
writes to the torch parameters never leak into a session unnoticed. Never
``SessionOptions.add_initializer``: for every weight the optimiser folds it is silently ignored
and the session runs the base model (ENVIRONMENT.md, "ONNX").

Memory: a session holds its own fp32 copy of the UNet weights (3.4 GB for SD 1.x) beside the
torch model, plus copies of the edited tensors; ``CompiledGraphs`` bounds how many sessions
stay resident and counts their bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from forgedit.backends.base import (
    DEFAULT_MAX_GRAPHS,
    BackendUnavailableError,
    CompiledBackend,
    LoadedWeights,
    Shape,
)
from forgedit.backends.onnx_export import DATA_INPUTS, OUTPUT, OnnxExport, backend_export
from forgedit.weights import ResidentWeights, WeightState

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
    """ONNX Runtime sessions over the cached export, one per ``Shape`` (at most ``max_graphs``
    resident).

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
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        super().__init__(unet, weights, max_graphs)
        self._ort = import_onnxruntime()
        self._providers = providers_for(self.device, self._ort.get_available_providers())
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir)
        self.threads = threads or torch.get_num_threads()
        self.export_seconds = 0.0
        self.session_seconds = 0.0
        self.last_export: OnnxExport | None = None

    def _compile(self, shape: Shape) -> _Session:
        export = backend_export(self.unet, self.fingerprint, shape, self.cache_dir, self.weights)
        self.export_seconds += export.seconds
        self.last_export = export
        started = time.perf_counter()
        try:
            session = _Session(self._ort, export, self._providers, self)
        except BackendUnavailableError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailableError(
                f"ONNX Runtime could not load the UNet graph: {e}", "build_failed"
            ) from e
        self.session_seconds += time.perf_counter() - started
        return session


class _Session:
    """One ``InferenceSession`` with the weight bindings that differ from its base defaults.

    The session's own initializers are the base weights (from ``unet.weights``); a weight
    input left unbound runs on them. Only tensors whose live state is not pristine are bound,
    from the backend's own copies: all of them after clearing when the plan crosses to another
    edit model, else only the changed ones (a tensor back to its base value is simply no
    longer bound, which takes a clear-and-rebind, since bindings persist)."""

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
        self._base_bytes = export.weights_bytes
        self._binding = self._session.io_binding()
        # onnx name -> (array, OrtValue) for the bound (non-base) weights: the arrays must
        # outlive their bindings.
        self._bound: dict[str, tuple[np.ndarray, OrtValue]] = {}
        self.loaded = LoadedWeights({})  # the defaults: the base
        self.sync(backend.weights)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def resident_bytes(self) -> int:
        """The session's base weights plus the bound copies."""
        return self._base_bytes + sum(array.nbytes for array, _ in self._bound.values())

    def sync(self, weights: ResidentWeights) -> None:
        live = weights.state("unet")
        self.loaded.sync(
            weights,
            lambda tensors, new_edit_model: self._apply(tensors, live, new_edit_model),
        )

    def _apply(
        self,
        tensors: Mapping[str, torch.Tensor],
        live: Mapping[str, WeightState],
        new_edit_model: bool,
    ) -> None:
        """Copy the changed tensors that differ from the base and bind them; drop those back
        at their base value (a clear and a rebind of the rest)."""
        dropped = [n for n in tensors if n not in live and self._name_map[n] in self._bound]
        for name in dropped:
            del self._bound[self._name_map[name]]
        changed = [n for n in tensors if n in live]
        for name in changed:
            array = np.ascontiguousarray(tensors[name].to("cpu", torch.float32).numpy()).copy()
            self._bound[self._name_map[name]] = (
                array,
                self._ort.OrtValue.ortvalue_from_numpy(array),
            )
        if new_edit_model or dropped:
            self._binding.clear_binding_inputs()
            names = list(self._bound)
        else:
            names = [self._name_map[n] for n in changed]
        for onnx_name in names:
            self._binding.bind_ortvalue_input(onnx_name, self._bound[onnx_name][1])
        expected = {self._name_map[n] for n in live}
        if set(self._bound) != expected:
            raise BackendUnavailableError(
                f"ONNX Runtime holds {len(self._bound)} edited UNet weights, the live model "
                f"{len(expected)}",
                "refit_failed",
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
        try:
            for name, array in inputs.items():
                self._binding.bind_cpu_input(name, array)
            self._binding.bind_output(OUTPUT, "cpu")
            self._session.run_with_iobinding(self._binding)
            out = self._binding.copy_outputs_to_cpu()[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailableError(
                f"ONNX Runtime failed to run the UNet: {e}", "run_failed"
            ) from e
        return torch.from_numpy(out).to(self._device)

    def close(self) -> None:
        self._bound.clear()
        del self._binding, self._session
