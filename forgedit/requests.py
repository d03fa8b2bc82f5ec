"""Building an edit request from plain values: the one owner of every request rule that the
engine CLI (``forgedit.cli``) and the server (``server.validation``) share.

Both front ends parse their own syntax (flags, protobuf fields) and check their own limits,
then call these builders with plain Python values:

* ``build_training_config``: the variant's defaults, per-stage overrides, the delta format;
* ``build_sweep_config``: the variant's sweep defaults and its forgetting strategies;
* seeds: where the training seed comes from (``TrainSeedFrom``), random draws below one bound
  (``random_seed``), and the final training seed once the content is known
  (``training_with_seed``);
* ``check_device``/``default_device``: a device this machine has;
* what an image is called: ``sheet_label`` on a contact sheet (γ for vs, β for vp) and
  ``image_file_name`` on disk.

Errors are ``InvalidInputError`` whose ``field`` is the engine's field name; each front end
maps it to its own spelling (a flag, a request field path).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal, cast

from forgedit.config import SweepConfig, TrainingConfig, TrainingMode, content_seed, override_stages
from forgedit.errors import InvalidInputError

# Random seeds are drawn below this bound: large enough never to repeat by chance in practice,
# short enough to retype from a summary or a log.
RANDOM_SEED_BOUND = 2**32

# Where a fine-tune's seed comes from: the request ("given"), a function of the content the
# fine-tune sees ("content", the default: the same inputs reuse one edit model), or a fresh
# draw ("random").
TrainSeedFrom = Literal["given", "content", "random"]


def random_seed() -> int:
    """One fresh random seed in [0, ``RANDOM_SEED_BOUND``)."""
    return secrets.randbelow(RANDOM_SEED_BOUND)


def random_seeds(count: int) -> tuple[int, ...]:
    """``count`` fresh random seeds (the sampling seeds of a request that gives none)."""
    return tuple(random_seed() for _ in range(count))


def build_training_config(
    mode: str,
    *,
    height: int,
    width: int,
    seed: int = 0,
    vae_seed: int = 0,
    precision: str = "faithful",
    delta_format: str | None = None,
    updates: Sequence[int | None] = (),
    batch_sizes: Sequence[int | None] = (),
) -> TrainingConfig:
    """The variant's training config (``TrainingConfig.for_mode``) with the request's values.
    ``updates``/``batch_sizes`` override the schedule stage by stage (``override_stages``: a
    single value means the first stage); ``delta_format=None`` is the precision's default.
    The configs validate every value."""
    config = TrainingConfig.for_mode(
        cast(TrainingMode, mode),
        height=height,
        width=width,
        seed=seed,
        vae_seed=vae_seed,
        precision=precision,
        delta_format=delta_format,
    )
    return override_stages(config, updates=updates, batch_sizes=batch_sizes)


def stage_count(mode: str) -> int:
    """How many optimisation stages ``mode`` trains (two_stage: 2, the others: 1)."""
    return len(TrainingConfig.for_mode(cast(TrainingMode, mode)).stages)


def build_sweep_config(mode: str, **given: Any) -> SweepConfig:
    """A sweep over an edit model trained in ``mode``: the variant's defaults for whatever
    ``given`` leaves out (``SweepConfig.for_mode``). The given forgetting strategies are
    checked against the variant first (``UnknownStrategyError`` names the ones it defines)."""
    check_strategies(given.get("forget", ()), mode)  # the variant's defaults are its own
    return SweepConfig.for_mode(mode, **given)


def check_strategies(names: Sequence[str], mode: str) -> None:
    """Refuse a forgetting strategy the variant of ``mode`` does not define."""
    from forgedit.forgetting import check_strategy, variant_for_mode

    variant = variant_for_mode(mode)
    for name in names:
        check_strategy(name, variant)


def training_with_seed(
    config: TrainingConfig,
    seed_from: TrainSeedFrom,
    *,
    image_sha256: str,
    base_fingerprint: str,
    source_prompt: str,
    salt: str = "",
) -> TrainingConfig:
    """The training config with its final seed, once the base model and the source prompt
    are known. A "given" seed, or a "random" one without ``salt``, is already final. A
    "content" seed is ``content_seed`` of what the fine-tune sees, so the same image, base
    model, source prompt and config train the same edit model (and a stored one is reused);
    a "random" seed with a ``salt`` (a request id) is that function salted with it: random
    looking, yet a retry of the same request gets the same seed."""
    if seed_from == "given" or (seed_from == "random" and not salt):
        return config
    seed = content_seed(
        image_sha256,
        base_fingerprint,
        source_prompt,
        config,
        salt=salt if seed_from == "random" else "",
    )
    return dataclasses.replace(config, seed=seed)


def default_device() -> str:
    """CUDA when this machine has it, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(value: str) -> str:
    """``value`` in torch's spelling, if this machine has that device; otherwise one error
    naming what is accepted here and the kinds Forgedit runs on."""
    import torch

    try:
        kind: str | None = torch.device(value).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if kind not in available:
        raise InvalidInputError(
            f"device {value!r} is not available on this machine; accepted here: "
            f"{', '.join(available)} (Forgedit runs on cpu, cuda, cuda:N)",
            field="device",
        )
    return str(torch.device(value))


def sheet_label(spec: Any, with_prompt: bool = False) -> str:
    """A contact-sheet tile's label: strategy, the interpolation's coefficients and seed, e.g.
    ``encoderkv γ=0.6 seed=3`` (vs) or ``encoderkv β=1.1 α=0.9 seed=3`` (vp); with the
    prompt's slug in front when a sweep has several prompts."""
    coefficients = f"{spec.strength_symbol}={spec.gamma:g}"
    if spec.interpolation == "vp":
        coefficients += f" α={spec.alpha:g}"
    label = f"{spec.forget} {coefficients} seed={spec.seed}"
    return f"{slug(spec.prompt, 24)} {label}" if with_prompt else label


def image_file_name(
    index: int,
    forget: str,
    interpolation: str,
    gamma: float,
    alpha: float,
    seed: int,
    prompt_slug: str | None = None,
) -> str:
    """``{index:03d}[_{prompt}]_{forget}_{interp}_g{gamma}[_a{alpha}]_s{seed}.png``: safe on
    every file system, sortable, and every number printed as typed (0.6, not 0.6000000001).
    ``g`` is γ for vs and β for vp; α appears only for vp (vs ignores it)."""
    parts = [f"{index:03d}"]
    if prompt_slug:
        parts.append(prompt_slug)
    parts += [_safe(forget), interpolation, f"g{gamma:g}"]
    if interpolation == "vp":
        parts.append(f"a{alpha:g}")
    parts.append(f"s{seed}")
    return "_".join(parts) + ".png"


def slug(text: str, max_chars: int = 32) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_chars``: 'A photo of a dog.' →
    'a-photo-of-a-dog'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:max_chars].strip("-")
    return out or "prompt"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", name)
