"""vs and vp against hand-computed values and against the original's scalar formulas."""

from __future__ import annotations

import torch

from forgedit.interpolation import vector_projection, vector_subtraction


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_vs_hand_computed() -> None:
    source = torch.tensor([[[1.0, 2.0]]])
    target = torch.tensor([[[3.0, -2.0]]])
    out = vector_subtraction(source, target, f64(0.0, 0.5, 1.0, 1.5))
    expected = torch.tensor([[[1.0, 2.0]], [[2.0, 0.0]], [[3.0, -2.0]], [[4.0, -4.0]]])
    torch.testing.assert_close(out, expected)


def test_vp_hand_computed() -> None:
    # e_opt = (2, 0): u = (1, 0). e_tgt = (3, 4): along u = (3, 0), orthogonal = (0, 4).
    source = torch.tensor([[[2.0, 0.0]]])
    target = torch.tensor([[[3.0, 4.0]]])
    out = vector_projection(source, target, f64(1.0, 0.5), f64(1.0, 0.8))
    expected = torch.tensor([[[2.0, 4.0]], [[1.6, 2.0]]])
    torch.testing.assert_close(out, expected)


def test_vp_is_per_token_and_orthogonal() -> None:
    torch.manual_seed(0)
    source, target = torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    out = vector_projection(source, target, f64(1.0), f64(0.0))
    # With α = 0 and β = 1 the result is orthogonal to e_opt, token by token.
    dots = (out * source).sum(-1)
    assert dots.abs().max() < 1e-4


def test_vp_zero_token_is_safe() -> None:
    source = torch.zeros(1, 3, 4)
    target = torch.ones(1, 3, 4)
    out = vector_projection(source, target, f64(1.0), f64(1.0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, target)


def test_bit_identical_to_the_original_scalar_formulas() -> None:
    torch.manual_seed(1)
    src, tgt = torch.randn(1, 77, 768) * 3, torch.randn(1, 77, 768) * 3
    for i in range(17):
        g = i * 0.1  # the original's float, 0.30000000000000004 included
        assert torch.equal(vector_subtraction(src, tgt, f64(g)), g * tgt + (1 - g) * src)
        for ta in (0.8, 0.9, 1.1):
            u = torch.nn.functional.normalize(src, dim=2).view(77, 768, 1)
            along = (torch.matmul(tgt.view(77, 1, 768), u) * u).view(1, 77, 768)
            expected = g * (tgt - along) + ta * src
            assert torch.equal(vector_projection(src, tgt, f64(g), f64(ta)), expected)


def test_batched_equals_one_at_a_time() -> None:
    torch.manual_seed(2)
    src, tgt = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    betas, alphas = f64(0.1, 1.0, 1.6), f64(0.8, 0.9, 1.1)
    batched = vector_projection(src, tgt, betas, alphas)
    for i in range(3):
        single = vector_projection(src, tgt, betas[i : i + 1], alphas[i : i + 1])
        assert torch.equal(batched[i : i + 1], single)
    vs = vector_subtraction(src, tgt, betas)
    for i in range(3):
        assert torch.equal(vs[i : i + 1], vector_subtraction(src, tgt, betas[i : i + 1]))
