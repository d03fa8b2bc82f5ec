"""In-place weight swaps: edit weights go in, the base comes back bit for bit."""

from __future__ import annotations

import pytest
import torch

from forgedit.errors import EditModelError
from forgedit.weights import ResidentWeights


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_edit_model_applies_delta_and_restores_bit_exactly() -> None:
    unet = make_model()
    before = state(unet)
    weights = ResidentWeights({"unet": unet})
    delta = {"unet.0.weight": torch.randn(8, 8) * 1e-3, "unet.1.bias": torch.randn(4) * 1e-3}
    with weights.edit_model(delta) as live:
        live.set_forgetting([], 0.0)
        assert torch.equal(unet[0].weight, before["0.weight"] + delta["unet.0.weight"])
        assert torch.equal(unet[1].bias, before["1.bias"] + delta["unet.1.bias"])
        assert torch.equal(unet[1].weight, before["1.weight"])  # untouched
        # Revert one tensor fully, then partially (d = 0.25), then bring it back.
        live.set_forgetting(["0.weight"], 0.0)
        assert torch.equal(unet[0].weight, before["0.weight"])
        live.set_forgetting(["0.weight"], 0.25)
        finetuned = before["0.weight"] + delta["unet.0.weight"]
        assert torch.equal(unet[0].weight, 0.25 * finetuned + 0.75 * before["0.weight"])
        live.set_forgetting([], 0.0)
        assert torch.equal(unet[0].weight, finetuned)
    after = state(unet)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restored_on_error() -> None:
    unet = make_model()
    before = state(unet)
    weights = ResidentWeights({"unet": unet})
    with pytest.raises(RuntimeError), weights.edit_model({"unet.0.bias": torch.ones(8)}) as live:
        live.set_forgetting([], 0.0)
        raise RuntimeError("sampling failed")
    assert all(torch.equal(before[k], v) for k, v in state(unet).items())


def test_training_snapshot_and_delta() -> None:
    unet = make_model()
    before = state(unet)
    weights = ResidentWeights({"unet": unet})
    weights.begin_training(["unet.0.weight"])
    with torch.no_grad():
        unet[0].weight.add_(0.5)
    delta = weights.trained_delta(["unet.0.weight"], torch.float32)
    torch.testing.assert_close(delta["unet.0.weight"], torch.full((8, 8), 0.5))
    weights.restore()
    assert torch.equal(unet[0].weight, before["0.weight"])


def test_unknown_or_misshapen_delta_is_refused() -> None:
    weights = ResidentWeights({"unet": make_model()})
    with (
        pytest.raises(EditModelError, match="lacks"),
        weights.edit_model({"unet.9.weight": torch.zeros(1)}),
    ):
        pass
    with (
        pytest.raises(EditModelError, match="shape"),
        weights.edit_model({"unet.0.weight": torch.zeros(3, 3)}),
    ):
        pass
