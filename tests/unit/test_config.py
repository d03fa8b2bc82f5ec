"""Configs carry the original's numbers and refuse bad values with teaching messages."""

from __future__ import annotations

import math

import pytest

from forgedit.config import SweepConfig, TrainingConfig, gamma_grid
from forgedit.errors import InvalidInputError


def test_defaults_are_the_originals() -> None:
    joint = TrainingConfig.for_mode("joint")
    (stage,) = joint.stages
    assert (stage.updates, stage.batch_size, stage.unet_lr, stage.text_lr) == (40, 10, 6e-5, 1e-3)
    assert stage.early_stop is not None
    assert (stage.early_stop.threshold, stage.early_stop.min_samples) == (0.03, 350)
    assert joint.loss_scale == 65536.0 and joint.adam_eps == 1e-8
    two = TrainingConfig.for_mode("two_stage")
    assert [(s.updates, s.batch_size, s.unet_lr, s.text_lr) for s in two.stages] == [
        (400, 1, None, 1e-3),
        (1000, 1, 6e-5, None),
    ]
    db = TrainingConfig.for_mode("dreambooth")
    assert [
        (s.updates, s.batch_size, s.unet_lr, s.text_lr, s.unet_subset, s.early_stop)
        for s in db.stages
    ] == [(100, 4, 5e-6, 5e-6, "all", None)]
    assert TrainingConfig.for_mode("joint", precision="fast").loss_scale == 1.0


def test_round_trip_and_fingerprint() -> None:
    for mode in ("joint", "two_stage", "dreambooth"):
        config = TrainingConfig.for_mode(mode, seed=7, height=64, width=64)
        again = TrainingConfig.from_dict(config.to_dict())
        assert again == config
        assert again.fingerprint() == config.fingerprint()
    assert (
        TrainingConfig.for_mode("joint", seed=1).fingerprint()
        != TrainingConfig.for_mode("joint", seed=2).fingerprint()
    )


def test_gamma_grid_prints_clean_values() -> None:
    assert gamma_grid(5, 8) == (0.5, 0.6, 0.7)
    assert len(gamma_grid(0, 17)) == 17


def test_sweep_order_groups_strategies() -> None:
    sweep = SweepConfig(
        prompts=("a", "b"), forget=("encoderkv", "decoderkv"), seeds=(1, 2), gammas=(0.5, 0.6)
    )
    specs = list(sweep.images())
    assert len(specs) == sweep.num_images == 16
    assert [s.forget for s in specs[:8]] == ["encoderkv"] * 8
    assert [s.index for s in specs] == list(range(16))
    vp = SweepConfig(prompts=("a",), interpolation="vp", gammas=(1.0,), alphas=(0.8, 0.9))
    assert [(s.gamma, s.alpha) for s in vp.images()] == [(1.0, 0.8), (1.0, 0.9)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": ()}, "at least one target prompt"),
        ({"prompts": ("",)}, "non-empty"),
        ({"prompts": ("x" * 1001,)}, "at most 1000"),
        ({"prompts": ("bad\x00prompt",)}, "control characters"),
        ({"gammas": (math.nan,)}, "finite"),
        ({"gammas": (9.0,)}, r"\[-1.0, 3.0\]"),
        ({"gammas": tuple([0.5] * 10_000)}, "at most 4096"),
        ({"seeds": (-1,)}, "seeds must be an integer"),
        ({"seeds": (2**64,)}, "seeds must be an integer"),
        ({"steps": 0}, "steps must be 1..1000"),
        ({"steps": 10**9}, "steps must be 1..1000"),
        ({"guidance": math.nan}, "guidance must be a finite"),
        ({"forget_degree": 1.5}, r"forget degree must be in \[0, 1\]"),
        ({"interpolation": "lerp"}, "accepted: vs, vp"),
    ],
)
def test_bad_sweeps_are_refused(kwargs: dict, message: str) -> None:
    kwargs = {"prompts": ("A photo of a dog.",), **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        SweepConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 500}, "multiple of 8"),
        ({"width": 0}, "multiple of 8"),
        ({"mode": "lora"}, "accepted: joint, two_stage, dreambooth"),
        ({"precision": "half"}, "accepted: faithful, fast"),
        ({"seed": 2**63}, "seed must be"),
    ],
)
def test_bad_training_configs_are_refused(kwargs: dict, message: str) -> None:
    mode = kwargs.pop("mode", "joint")
    with pytest.raises(InvalidInputError, match=message):
        if mode not in ("joint", "two_stage", "dreambooth"):
            TrainingConfig(mode=mode)
        else:
            TrainingConfig.for_mode(mode, **kwargs)


def test_override_stages_is_per_stage_and_a_single_value_is_the_first_stages() -> None:
    from forgedit.config import override_stages

    two = TrainingConfig.for_mode("two_stage")
    assert [s.updates for s in override_stages(two, updates=[5]).stages] == [5, 1000]
    assert [s.updates for s in override_stages(two, updates=[None, 7]).stages] == [400, 7]
    changed = override_stages(two, updates=[5, 7], batch_sizes=[2, 3]).stages
    assert [(s.updates, s.batch_size) for s in changed] == [(5, 2), (7, 3)]
    with pytest.raises(InvalidInputError, match="joint training has 1") as e:
        override_stages(TrainingConfig.for_mode("joint"), batch_sizes=[2, 2])
    assert e.value.field == "batch_size"
    with pytest.raises(InvalidInputError, match="updates must be"):
        override_stages(two, updates=[None, 0])


def test_samples_count_updates_times_batch_across_stages() -> None:
    two = TrainingConfig.for_mode("two_stage")
    assert two.total_samples == 1400 and two.samples_in(500) == 500
    joint = TrainingConfig.for_mode("joint")
    assert joint.total_samples == 400 and joint.samples_in(36) == 360  # an early stop


def test_content_seed_depends_on_what_training_sees_and_nothing_else() -> None:
    from forgedit.config import MAX_SEED, content_seed

    config = TrainingConfig.for_mode("joint", seed=123)
    seed = content_seed("a" * 64, "b" * 64, "A photo of a dog", config)
    assert 0 <= seed <= MAX_SEED
    # The config's own seed is not an input (it is the output); everything else is.
    assert content_seed("a" * 64, "b" * 64, "A photo of a dog", config.__class__.for_mode()) == seed
    for other in (
        content_seed("c" * 64, "b" * 64, "A photo of a dog", config),
        content_seed("a" * 64, "c" * 64, "A photo of a dog", config),
        content_seed("a" * 64, "b" * 64, "A photo of a cat", config),
        content_seed("a" * 64, "b" * 64, "A photo of a dog", TrainingConfig.for_mode("dreambooth")),
        content_seed("a" * 64, "b" * 64, "A photo of a dog", config, salt="request-1"),
    ):
        assert other != seed
