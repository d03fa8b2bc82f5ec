"""Moving the optimised source embedding toward the target prompt (FORGEDIT_SPEC.md §4).

Both functions take a batch: ``source`` (e_opt) and ``target`` (e_tgt = E(prompt)) are
[B, N, C] (or broadcastable [1, N, C]); ``gamma`` and ``alpha`` are per-sample [B] tensors, so
a whole γ/α/seed grid is computed in one call. The arithmetic follows the original's op order
so that a batch of one reproduces it bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vector_subtraction(
    source: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """vs: ``e = γ·e_tgt + (1 − γ)·e_opt``. γ > 1 extrapolates past the target."""
    # The original multiplies by Python floats: (1 − γ) is formed in double precision and only
    # then rounded to the tensor's dtype. Doing the subtraction in fp32 would round differently.
    g = gamma.to(torch.float64).view(-1, 1, 1)
    return g.to(source.dtype) * target + (1 - g).to(source.dtype) * source


def vector_projection(
    source: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """vp, per token j (all 77, BOS and padding included, as the original):

        u_j = e_opt_j / max(‖e_opt_j‖, 1e-12)
        ⊥_j = e_tgt_j − (e_tgt_j · u_j) u_j        the part of the target orthogonal to e_opt_j
        e   = β·⊥ + α·e_opt

    β (the original's ``alpha`` argument) scales the editing direction; α (its ``textalpha``)
    scales the unnormalised source embedding, i.e. how much identity is kept.
    """
    batch = max(source.shape[0], target.shape[0], beta.shape[0])
    source = source.expand(batch, *source.shape[1:])
    target = target.expand(batch, *target.shape[1:])
    _, n, c = source.shape
    unit = F.normalize(source, dim=2)
    # The original computes the dot products as a batched [n,1,c] @ [n,c,1] matmul; an
    # element-wise sum rounds differently (≈1e-6).
    unit_col = unit.reshape(batch * n, c, 1)
    dots = torch.matmul(target.reshape(batch * n, 1, c), unit_col)
    along = (dots * unit_col).reshape(batch, n, c)
    orthogonal = target - along
    b = beta.to(torch.float64).view(-1, 1, 1).to(source.dtype)
    a = alpha.to(torch.float64).view(-1, 1, 1).to(source.dtype)
    return b * orthogonal + a * source
