"""One resident base model whose weights are swapped in place (ARCHITECTURE.md, "One resident
base UNet, weights swapped in place").

The original deep-copies the 3.4 GB UNet for every image and keeps a second, pristine UNet for
forgetting. Here a replica holds each base model once. ``ResidentWeights`` keeps a pristine
copy of only those tensors an edit model has ever touched (the trained subset), writes edit
weights straight into the live parameters, and restores them by *copying the saved values
back*, never by subtracting a delta (which would drift by rounding). Restoring is therefore
bit-exact, and the same mechanism protects the base model during training.

For a tensor the edit model trained, with forget degree d:

    kept:      θ ← θ_pre + Δ                         (= θ_ft)
    reverted:  θ ← d·θ_ft + (1 − d)·θ_pre            (the original's formula; d = 0 → θ_pre)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from forgedit.errors import EditModelError

# Delta keys are "<component>.<parameter name>", e.g. "unet.down_blocks.1.resnets.0.conv1.weight".
COMPONENTS = ("unet", "text_encoder")

# What one live tensor holds when it is not pristine: (which edit-model load, forget
# coefficient). Accelerated UNet backends keep their own copy of the weights and compare these
# states to decide which tensors to re-send (forgedit.backends.base.refit_plan).
WeightState = tuple[int, float]


class ResidentWeights:
    """Pristine copies of the base model's touched parameters, and in-place edits on top.

    Not thread-safe: one job at a time uses a base model (the scheduler guarantees it).
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self._params: dict[str, torch.nn.Parameter] = {
            f"{component}.{name}": p
            for component, module in modules.items()
            for name, p in module.named_parameters()
        }
        self._pristine: dict[str, torch.Tensor] = {}
        # What each live tensor currently holds: absent = pristine, else the forget degree
        # applied to the active edit model's Δ (1.0 = fully fine-tuned).
        self._coefficient: dict[str, float] = {}
        # Tensors being trained in place: anything may be in them until restore().
        self._training: set[str] = set()
        self._delta: Mapping[str, torch.Tensor] = {}
        # Counts edit-model loads and trainings, so that two edit models with the same
        # coefficient on a tensor still count as different contents.
        self._generation = 0

    def names(self, component: str) -> list[str]:
        prefix = component + "."
        return [k.removeprefix(prefix) for k in self._params if k.startswith(prefix)]

    def parameter(self, key: str) -> torch.nn.Parameter:
        return self._params[key]

    def base_value(self, key: str) -> torch.Tensor:
        """The pristine base value of ``key``, whatever the live tensor holds now (an edit
        model, a training step): what a compiled backend must bake in as the base."""
        pristine = self._pristine.get(key)
        return pristine if pristine is not None else self._params[key].detach()

    def snapshot(self, keys: Iterable[str]) -> None:
        """Save pristine copies of ``keys`` (once; later calls keep the first copy)."""
        for key in keys:
            if key not in self._pristine:
                self._pristine[key] = self._params[key].detach().clone()

    def begin_training(self, keys: Iterable[str]) -> None:
        """Snapshot ``keys`` before an optimiser writes into them; ``restore()`` undoes it."""
        self.restore()
        self._generation += 1
        keys = list(keys)
        self.snapshot(keys)
        self._training.update(keys)

    def state(self, component: str) -> dict[str, WeightState]:
        """What every non-pristine tensor of ``component`` holds, by parameter name (without
        the component prefix); a name that is absent holds its pristine base value. Refused
        while training, when the live tensors hold anything."""
        if self._training:
            raise RuntimeError("the weights are being trained; restore() before sampling")
        prefix = component + "."
        return {
            key.removeprefix(prefix): (self._generation, coefficient)
            for key, coefficient in self._coefficient.items()
            if key.startswith(prefix)
        }

    def restore(self) -> None:
        """Write the pristine values back into every tensor that differs from them."""
        with torch.no_grad():
            for key in self._coefficient.keys() | self._training:
                self._params[key].copy_(self._pristine[key])
        self._coefficient.clear()
        self._training.clear()
        self._delta = {}

    def trained_delta(self, keys: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Δ = θ_live − θ_pre for ``keys`` (after training), as CPU tensors of ``dtype``."""
        with torch.no_grad():
            return {
                key: (self._params[key].detach() - self._pristine[key]).to("cpu", dtype)
                for key in keys
            }

    @contextmanager
    def edit_model(self, delta: Mapping[str, torch.Tensor]) -> Iterator[EditModelWeights]:
        """Load an edit model's Δ into the live weights; restore the base on exit (also on
        error or cancellation)."""
        unknown = [k for k in delta if k not in self._params]
        if unknown:
            raise EditModelError(
                f"the edit model has {len(unknown)} tensors the base model lacks (e.g. "
                f"{unknown[0]!r}); it was made for a different architecture"
            )
        for key, d in delta.items():
            if d.shape != self._params[key].shape:
                raise EditModelError(
                    f"edit model tensor {key!r} has shape {tuple(d.shape)}, the base model's is "
                    f"{tuple(self._params[key].shape)}"
                )
        self.restore()
        self._generation += 1
        self.snapshot(delta)
        self._delta = delta
        try:
            # Forgetting reverts UNet tensors only; every other component of the edit model
            # (DreamBooth's fine-tuned text encoder) is written now, so that prompts encoded
            # inside the block see the fine-tuned encoder, as the original's pipeline does.
            for key in delta:
                if not key.startswith("unet."):
                    self._set(key, 1.0)
            yield EditModelWeights(self)
        finally:
            self.restore()

    def _set(self, key: str, coefficient: float) -> None:
        if self._coefficient.get(key, 0.0) == coefficient:
            return
        pristine = self._pristine[key]
        p = self._params[key]
        with torch.no_grad():
            if coefficient == 0.0:
                p.copy_(pristine)
            else:
                finetuned = pristine + self._delta[key].to(pristine.device, pristine.dtype)
                if coefficient == 1.0:
                    p.copy_(finetuned)
                else:
                    p.copy_(coefficient * finetuned + (1 - coefficient) * pristine)
        if coefficient == 0.0:
            self._coefficient.pop(key, None)
        else:
            self._coefficient[key] = coefficient


class EditModelWeights:
    """The live weights while an edit model is loaded; switch forgetting strategies cheaply
    (only tensors whose coefficient changes are rewritten)."""

    def __init__(self, owner: ResidentWeights) -> None:
        self._owner = owner

    def set_forgetting(self, reverted_unet_names: Iterable[str], degree: float) -> None:
        reverted = {f"unet.{n}" for n in reverted_unet_names}
        for key in self._owner._delta:
            self._owner._set(key, degree if key in reverted else 1.0)
