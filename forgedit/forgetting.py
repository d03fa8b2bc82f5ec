"""Forgetting: which UNet parameters go back to their pretrained values at sampling time
(FORGEDIT_SPEC.md §5, §7, §13).

The paper's finding is that the UNet encoder (``down_blocks``) learns space and structure and
the decoder (``up_blocks``) learns appearance and identity. Reverting the encoder keeps
identity and frees the layout; reverting the decoder keeps the layout and frees appearance.

The original matches Python substrings on diffusers parameter names, once per image. Here
each strategy is a small rule (``include`` ∧ ∌``exclude`` ∧ [∋ any of ``require_any``])
resolved ONCE against the loaded UNet into an explicit name set. Resolution is strict: every
substring a rule mentions must occur among the UNet's parameter names, so drift in diffusers'
naming (``fuse_qkv_projections``, adapters) fails loudly instead of silently forgetting nothing.
Block names are matched on the whole index (``down_blocks.1`` never matches ``down_blocks.10``).

Two variants exist because the DreamBooth pipeline defines its strategies differently; most
notably its ``encoderkv`` is the *inverse* of vanilla's (spec §7, oddity 12).

The update, for every name in the resolved set R and forget degree d ∈ [0, 1]:

    θ ← d·θ_ft + (1 − d)·θ_pre        (d = 0: full revert, the original's only setting)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal

import torch

from forgedit.durable import JsonObject
from forgedit.errors import StrategyResolutionError, UnknownStrategyError

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

Variant = Literal["vanilla", "dreambooth"]
VARIANTS: tuple[Variant, ...] = ("vanilla", "dreambooth")
NO_FORGETTING = ("donotforget", "orig")  # the vanilla default / the DreamBooth shipped value


@dataclass(frozen=True)
class ForgetRule:
    """R = {n : include ∈ n ∧ no exclude ∈ n ∧ (require_any empty ∨ some require_any ∈ n)}."""

    include: str
    exclude: tuple[str, ...] = ()
    require_any: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return (
            _contains(name, self.include)
            and not any(_contains(name, s) for s in self.exclude)
            and (not self.require_any or any(_contains(name, s) for s in self.require_any))
        )

    @property
    def substrings(self) -> tuple[str, ...]:
        return (self.include, *self.exclude, *self.require_any)


_KV = ("attn2.to_k", "attn2.to_v")

VANILLA_STRATEGIES: dict[str, ForgetRule | None] = {
    "donotforget": None,
    "orig": None,
    "encoderkv": ForgetRule("down_blocks", exclude=_KV),
    "noencoder": ForgetRule("down_blocks"),
    "encoderattn": ForgetRule("down_blocks", exclude=("attn",)),
    "encoderattn+encoder1": ForgetRule("down_blocks", exclude=("attn", "down_blocks.1")),
    "decoderkv": ForgetRule("up_blocks", exclude=_KV),
    "decoderattn": ForgetRule("up_blocks", exclude=("attn",)),
    "decoderattn+decoder2": ForgetRule("up_blocks", exclude=("attn", "up_blocks.2")),
}

DREAMBOOTH_STRATEGIES: dict[str, ForgetRule | None] = {
    "orig": None,
    "donotforget": None,
    "noencoder": ForgetRule("down_blocks"),
    "nodecoder": ForgetRule("up_blocks"),
    "encoderattn": ForgetRule("down_blocks", exclude=("attn",)),
    "encoderattn+encoder1": ForgetRule("down_blocks", exclude=("attn", "down_blocks.1")),
    # Inverted on purpose: DreamBooth-Forgedit reverts ONLY the encoder's cross-attention K, V.
    "encoderkv": ForgetRule("down_blocks", require_any=_KV),
    "decoderattn": ForgetRule("up_blocks", exclude=("attn",)),
}

STRATEGIES: dict[Variant, dict[str, ForgetRule | None]] = {
    "vanilla": VANILLA_STRATEGIES,
    "dreambooth": DREAMBOOTH_STRATEGIES,
}


def variant_for_mode(mode: str) -> Variant:
    """Vanilla strategies for ``joint`` and ``two_stage``; DreamBooth's for ``dreambooth``."""
    return "dreambooth" if mode == "dreambooth" else "vanilla"


def check_strategy(name: str, variant: Variant, field: str = "forget") -> None:
    """Raise ``UnknownStrategyError`` naming the accepted strategies of ``variant`` (its
    ``field``: what the caller calls the strategy list).

    The original silently forgets nothing for an unknown name; a typo there costs a whole
    sweep, so we refuse it instead (a deliberate divergence)."""
    if name not in STRATEGIES[variant]:
        raise UnknownStrategyError(
            f"unknown forgetting strategy {name!r} for {variant} Forgedit; accepted: "
            f"{', '.join(STRATEGIES[variant])}",
            field=field,
        )


def resolve(name: str, variant: Variant, parameter_names: Iterable[str]) -> frozenset[str]:
    """The exact set of UNet parameter names strategy ``name`` reverts.

    Raises ``UnknownStrategyError`` for an unknown name and ``StrategyResolutionError`` when a
    substring the rule relies on matches no parameter, or the rule matches nothing at all.
    """
    check_strategy(name, variant)
    rule = STRATEGIES[variant][name]
    if rule is None:
        return frozenset()
    names = tuple(parameter_names)
    for s in rule.substrings:
        if not any(_contains(n, s) for n in names):
            raise StrategyResolutionError(
                f"forgetting strategy {name!r} relies on parameter names containing {s!r}, but "
                "the UNet has none; its naming differs from diffusers' SD 1.x layout (fused QKV "
                "projections or adapters?)"
            )
    matched = frozenset(n for n in names if rule.matches(n))
    if not matched:
        raise StrategyResolutionError(f"forgetting strategy {name!r} matches no UNet parameter")
    return matched


def trained_parameter_names(parameter_names: Iterable[str], subset: str) -> list[str]:
    """The UNet parameters a fine-tune trains, in ``named_parameters`` order.

    ``forgedit``: (∋down_blocks ∧ ∌down_blocks.0) ∨ (∋up_blocks ∧ ∌up_blocks.0), i.e.
    down_blocks.1-3 and up_blocks.1-3 (spec §3.1). ``all``: every parameter (DreamBooth).
    """
    names = list(parameter_names)
    if subset == "all":
        return names
    if subset != "forgedit":
        raise ValueError(f"unknown UNet subset {subset!r}; accepted: forgedit, all")
    trained = [
        n
        for n in names
        if (_contains(n, "down_blocks") and not _contains(n, "down_blocks.0"))
        or (_contains(n, "up_blocks") and not _contains(n, "up_blocks.0"))
    ]
    if not trained:
        raise StrategyResolutionError(
            "the UNet has no down_blocks.1-3 / up_blocks.1-3 parameters: not an SD 1.x layout"
        )
    return trained


def strategy_counts(unet: torch.nn.Module | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """Tensors and parameters each strategy reverts, per variant.

    On ``unet`` if given, else on an SD 1.x-config UNet built on the meta device (no weights,
    no download), which reproduces the counts of spec §13."""
    params = dict((unet or sd1_meta_unet()).named_parameters())
    out: dict[str, dict[str, dict[str, int]]] = {}
    for variant, rules in STRATEGIES.items():
        out[variant] = {}
        for name in rules:
            r = resolve(name, variant, params)
            out[variant][name] = {
                "tensors": len(r),
                "parameters": sum(params[n].numel() for n in r),
            }
    return out


# SD 1.x's UNet config (CompVis/stable-diffusion-v1-4 unet/config.json, the fields that shape
# the parameters).
SD1_UNET_CONFIG: JsonObject = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


@cache
def sd1_meta_unet() -> UNet2DConditionModel:
    """An SD 1.x-config ``UNet2DConditionModel`` on the meta device: names and shapes only."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD1_UNET_CONFIG)


def _contains(name: str, pattern: str) -> bool:
    """Substring match, except that a pattern ending in a block index must match the whole
    index: ``down_blocks.1`` matches ``down_blocks.1.resnets`` but not ``down_blocks.10``."""
    if not pattern[-1].isdigit():
        return pattern in name
    start = name.find(pattern)
    while start != -1:
        end = start + len(pattern)
        if end == len(name) or not name[end].isdigit():
            return True
        start = name.find(pattern, start + 1)
    return False
