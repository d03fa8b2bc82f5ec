"""How an edit model's Δ = θ_ft − θ_pre is stored: the delta formats (ARCHITECTURE.md, "The
edit-model artifact"; docs/DIVERGENCES.md, "Compact edit models").

    fp32  every Δ tensor as is: θ_pre + Δ reproduces θ_ft exactly (faithful mode's default)
    fp16  every Δ tensor rounded to half precision (half the bytes)
    int8  every Δ tensor of two or more dimensions as int8 with one absmax scale per output
          channel (its first dimension), s_c = max|Δ_c| / 127 and q = round(Δ / s_c); 1-D
          tensors (biases, norms: a fraction of a percent of the bytes) as fp16, which is more
          accurate than a per-tensor int8 scale for them. A quarter of the fp32 bytes; fast
          mode's default.

The payload of ``delta.safetensors`` keeps each tensor under its key ("unet.<name>" or
"text_encoder.<name>"); an int8 tensor's scales sit next to it under ``<key>`` +
``SCALE_SUFFIX`` (fp32, one per output channel).

What the engine samples with is always the *decoded* Δ: int8 is dequantised once, on load, into
the resident weights' dtype (fp32), so ``ResidentWeights`` sees plain tensors whatever the
format. The scales are kept beside the decoded Δ, so that saving a decoded int8 Δ again
writes the same integers and scales (requantising with fresh scales could move a scale by an
ulp). A freshly trained Δ goes through ``encode`` then ``decode`` before anything samples it,
so the images of a job equal those of its saved and reloaded edit model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from forgedit.config import DELTA_FORMATS, DeltaFormat
from forgedit.errors import EditModelError

SCALE_SUFFIX = ".__int8_scale__"
INT8_MAX = 127
# The resident weights are fp32 in every precision mode (fast mode on a GPU autocasts the
# compute, not the stored parameters), so decoded deltas are fp32 too.
RESIDENT_DTYPE = torch.float32


def check_stored_format(value: object) -> DeltaFormat:
    """Return a stored artifact's format, or raise ``EditModelError`` for one this engine
    cannot read (a newer engine's, or a corrupted manifest)."""
    if value not in DELTA_FORMATS:
        raise EditModelError(
            f"edit model delta format {value!r} is not supported; this engine reads "
            f"{', '.join(DELTA_FORMATS)}"
        )
    return value  # type: ignore[return-value]


@dataclass
class DecodedDelta:
    """Δ as the engine uses it (``tensors``), and the int8 scales it was decoded with."""

    tensors: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(
    delta: Mapping[str, torch.Tensor],
    fmt: DeltaFormat,
    scales: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The safetensors payload of ``delta`` in format ``fmt`` (contiguous CPU tensors).

    ``scales`` (int8 only) are the scales ``delta`` was decoded with; tensors without one get
    a fresh absmax scale. Raises ``EditModelError`` when int8 meets a non-finite Δ.
    """
    payload: dict[str, torch.Tensor] = {}
    for key, tensor in delta.items():
        t = tensor.detach().to("cpu")
        if fmt == "fp32":
            payload[key] = t.to(torch.float32).contiguous()
        elif fmt == "fp16" or t.dim() < 2:
            payload[key] = t.to(torch.float16).contiguous()
        else:
            scale = (scales or {}).get(key)
            q, scale = quantize_int8(key, t.to(torch.float32), scale)
            payload[key] = q
            payload[key + SCALE_SUFFIX] = scale
    return payload


def decode(payload: Mapping[str, torch.Tensor], fmt: str) -> DecodedDelta:
    """Δ from a ``delta.safetensors`` payload of format ``fmt``: fp32 and fp16 tensors as
    stored (as before the int8 format existed), int8 dequantised into ``RESIDENT_DTYPE``.

    Raises ``EditModelError`` for an unknown format or a payload that does not match it.
    """
    check_stored_format(fmt)
    expected = {"fp32": {torch.float32}, "fp16": {torch.float16}}.get(fmt)
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, t in payload.items():
        if key.endswith(SCALE_SUFFIX):
            if fmt != "int8" or key.removesuffix(SCALE_SUFFIX) not in payload:
                raise EditModelError(f"edit model delta has a stray scale tensor {key!r}")
            continue
        if expected is not None and t.dtype not in expected:
            raise EditModelError(
                f"edit model delta tensor {key!r} is {_name(t.dtype)} in a {fmt} delta"
            )
        if fmt != "int8":
            tensors[key] = t
        elif t.dtype == torch.int8:
            scale = payload.get(key + SCALE_SUFFIX)
            tensors[key] = dequantize_int8(key, t, scale)
            scales[key] = scale  # type: ignore[assignment]  # checked by dequantize_int8
        elif t.dtype == torch.float16 and t.dim() < 2:
            tensors[key] = t.to(RESIDENT_DTYPE)
        else:
            raise EditModelError(
                f"edit model delta tensor {key!r} is {_name(t.dtype)} of shape "
                f"{tuple(t.shape)}; an int8 delta holds int8 tensors and 1-D fp16 ones"
            )
    return DecodedDelta(tensors, scales)


def quantize_int8(
    key: str, tensor: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): int8 ``q`` and fp32 per-output-channel scales ``s`` with ``tensor ≈ q · s``.

    ``s_c = max|tensor_c| / 127`` unless ``scale`` is given; an all-zero channel gets s = 0.
    """
    flat = tensor.reshape(tensor.shape[0], -1)
    if not torch.isfinite(flat).all():
        raise EditModelError(
            f"Δ tensor {key!r} has non-finite values and cannot be stored as int8; the "
            "fine-tune diverged (fp32 and fp16 store it as is)"
        )
    if scale is None:
        scale = flat.abs().amax(dim=1) / INT8_MAX
    scale = scale.to(torch.float32).contiguous()
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(flat / divisor[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(tensor.shape).contiguous(), scale


def dequantize_int8(key: str, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``q · s`` per output channel, in ``RESIDENT_DTYPE``; ``EditModelError`` when the scales
    are missing or do not fit."""
    if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0],):
        raise EditModelError(
            f"edit model delta tensor {key!r} is int8 but has no fp32 scale of shape "
            f"({q.shape[0]},) under {key + SCALE_SUFFIX!r}"
        )
    flat = q.reshape(q.shape[0], -1).to(RESIDENT_DTYPE)
    flat.mul_(scale[:, None].to(RESIDENT_DTYPE))  # in place: one fp32 copy, not two
    return flat.reshape(q.shape)


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor data (the file adds a small JSON header)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
