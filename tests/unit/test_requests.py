"""Building a request from plain values (``forgedit.requests``): the rules the engine CLI and
the server share, so the same values mean the same edit on both."""

from __future__ import annotations

import pytest
import torch

from forgedit.config import SweepConfig, TrainingConfig, content_seed
from forgedit.errors import InvalidInputError, UnknownStrategyError
from forgedit.requests import (
    RANDOM_SEED_BOUND,
    build_sweep_config,
    build_training_config,
    check_device,
    default_device,
    random_seeds,
    sheet_label,
    stage_count,
    training_with_seed,
)


def test_training_config_takes_the_variants_defaults_and_per_stage_overrides() -> None:
    config = build_training_config(
        "two_stage", height=64, width=64, seed=3, updates=[5, None], batch_sizes=[None, 2]
    )
    assert [(s.updates, s.batch_size) for s in config.stages] == [(5, 1), (1000, 2)]
    assert config.seed == 3 and config.delta_format == "fp32"
    assert build_training_config("joint", height=64, width=64, precision="fast").delta_format == (
        "int8"
    )
    assert stage_count("two_stage") == 2 and stage_count("dreambooth") == 1
    with pytest.raises(InvalidInputError) as e:
        build_training_config("joint", height=64, width=64, updates=[1, 2])
    assert e.value.field == "updates"


def test_sweep_config_takes_the_variants_defaults_and_refuses_its_unknown_strategies() -> None:
    sweep = build_sweep_config("two_stage", prompts=("a dog",))
    assert sweep == SweepConfig.for_mode("two_stage", prompts=("a dog",))
    assert sweep.forget == ("encoderattn",)
    assert build_sweep_config("dreambooth", prompts=("a",), forget=("nodecoder",)).forget == (
        "nodecoder",
    )
    with pytest.raises(UnknownStrategyError, match="nodecoder"):
        build_sweep_config("joint", prompts=("a",), forget=("nodecoder",))


def test_training_seed_comes_from_the_request_the_content_or_a_salted_draw() -> None:
    config = TrainingConfig.for_mode("joint", height=64, width=64, seed=7)
    seen = {"image_sha256": "a" * 64, "base_fingerprint": "f" * 64, "source_prompt": "a dog"}
    assert training_with_seed(config, "given", **seen).seed == 7
    assert training_with_seed(config, "random", **seen).seed == 7  # drawn already, no salt
    expected = content_seed("a" * 64, "f" * 64, "a dog", config)
    assert training_with_seed(config, "content", **seen, salt="r-1").seed == expected
    salted = training_with_seed(config, "random", **seen, salt="r-1").seed
    assert salted == content_seed("a" * 64, "f" * 64, "a dog", config, salt="r-1") != expected


def test_random_seeds_are_drawn_below_one_bound() -> None:
    seeds = random_seeds(64)
    assert len(seeds) == 64 and all(0 <= s < RANDOM_SEED_BOUND for s in seeds)
    assert len(set(seeds)) > 1


def test_contact_sheet_labels_say_gamma_for_vs_and_beta_for_vp() -> None:
    vs = next(SweepConfig(prompts=("a",), gammas=(0.6,), seeds=(1,)).images())
    vp = next(
        SweepConfig(
            prompts=("a dog",), interpolation="vp", gammas=(1.2,), alphas=(0.9,), seeds=(3,)
        ).images()
    )
    assert (vs.strength_symbol, vp.strength_symbol) == ("γ", "β")
    assert sheet_label(vs) == "donotforget γ=0.6 seed=1"
    assert sheet_label(vp) == "donotforget β=1.2 α=0.9 seed=3"
    assert sheet_label(vp, with_prompt=True) == "a-dog donotforget β=1.2 α=0.9 seed=3"


def test_one_device_check_names_what_is_accepted_here() -> None:
    assert check_device("cpu") == "cpu"
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "tpu:banana", *(() if torch.cuda.is_available() else ("cuda",))):
        with pytest.raises(InvalidInputError, match="accepted here: cpu") as e:
            check_device(bad)
        assert e.value.field == "device" and "cuda, cuda:N" in str(e.value)
