"""Building a request from typed options (``forgedit.requests``): the rules the engine CLI and
the server share, so the same options mean the same edit on both, and every error names the
option by its request field path."""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import pytest
import torch

from forgedit.config import (
    DEFAULT_QUALITY,
    OutputConfig,
    PreviewConfig,
    SweepConfig,
    TrainingConfig,
    content_seed,
)
from forgedit.errors import InvalidInputError, UnknownStrategyError
from forgedit.images import sheet_label
from forgedit.options import (
    EditOptions,
    OutputOptions,
    PreviewOptions,
    SampleOptions,
    SweepOptions,
    TrainingOptions,
)
from forgedit.requests import (
    RANDOM_SEED_BOUND,
    Bounds,
    build_edit,
    build_output,
    build_preview,
    build_sweep,
    build_training,
    check_device,
    default_device,
    random_seeds,
    stage_names,
    training_with_seed,
)

NATIVE = {"native_height": 64, "native_width": 64}


def test_training_config_takes_the_variants_defaults_and_per_stage_overrides() -> None:
    config, seed_from = build_training(
        TrainingOptions(mode="two_stage", seed=3, updates=5, stage2_batch_size=2), **NATIVE
    )
    assert [(s.updates, s.batch_size) for s in config.stages] == [(5, 1), (1000, 2)]
    assert config.seed == 3 and seed_from == "given" and config.delta_format == "fp32"
    assert (config.height, config.width) == (64, 64)  # the native size
    fast, _ = build_training(TrainingOptions(), precision="fast", **NATIVE)
    assert fast.delta_format == "int8"
    assert stage_names("two_stage") == ("embedding", "unet")
    assert stage_names("dreambooth") == ("dreambooth",)
    with pytest.raises(InvalidInputError) as e:
        build_training(TrainingOptions(updates=1, stage2_updates=2), **NATIVE)
    assert e.value.field == "training.stage2_updates"
    assert "joint training has 1 stage" in str(e.value)


def test_training_errors_name_the_request_field() -> None:
    for options, field in (
        (TrainingOptions(width=100), "training.width"),
        (TrainingOptions(height=100), "training.height"),
        (TrainingOptions(updates=0), "training.updates"),
        (TrainingOptions(mode="two_stage", stage2_updates=0), "training.stage2_updates"),
        (TrainingOptions(batch_size=65), "training.batch_size"),
        (TrainingOptions(seed=2**64 - 1), "training.seed"),
        (TrainingOptions(vae_seed=-1), "training.vae_seed"),
        (TrainingOptions(seed=1, fresh_seed=True), "training.fresh_seed"),
    ):
        with pytest.raises(InvalidInputError) as e:
            build_training(options, **NATIVE)
        assert e.value.field == field, (options, e.value)


def test_sweep_config_takes_the_variants_defaults_and_refuses_its_unknown_strategies() -> None:
    sweep = build_sweep(SweepOptions(seeds=(0,)), ("a dog",), "two_stage")
    assert sweep == SweepConfig.for_mode("two_stage", prompts=("a dog",))
    assert sweep.forget == ("encoderattn",)
    assert build_sweep(
        SweepOptions(forget_strategies=("nodecoder",)), ("a",), "dreambooth"
    ).forget == ("nodecoder",)
    with pytest.raises(UnknownStrategyError, match="nodecoder") as e:
        build_sweep(SweepOptions(forget_strategies=("nodecoder",)), ("a",), "joint")
    assert e.value.field == "sweep.forget_strategies"


def test_sweep_errors_name_the_request_field() -> None:
    for options, prompts, field in (
        (SweepOptions(), (), "target_prompts"),
        (SweepOptions(), ("a\x00b",), "target_prompts"),
        (SweepOptions(gammas=(9.0,)), ("a",), "sweep.gammas"),
        (SweepOptions(interpolation="vp", alphas=(-1.0,)), ("a",), "sweep.alphas"),
        (SweepOptions(forget_degree=1.5), ("a",), "sweep.forget_degree"),
        (SweepOptions(seeds=(-1,)), ("a",), "sweep.seeds"),
        (SweepOptions(seed_count=0), ("a",), "sweep.seed_count"),
        (SweepOptions(steps=0), ("a",), "sweep.steps"),
        (SweepOptions(guidance=float("nan")), ("a",), "sweep.guidance"),
        (SweepOptions(gammas=(0.5,) * 4097), ("a",), "sweep"),
    ):
        with pytest.raises(InvalidInputError) as e:
            build_sweep(options, prompts, "joint")
        assert e.value.field == field, (options, e.value)


def test_alphas_belong_to_vp_only_one_rule_for_every_front_end() -> None:
    """vs has no α: alphas with vs are refused, never silently ignored (docs/DIVERGENCES.md)."""
    for interpolation in (None, "vs"):
        with pytest.raises(InvalidInputError, match="applies only to") as e:
            build_sweep(SweepOptions(interpolation=interpolation, alphas=(0.9,)), ("a",), "joint")
        assert e.value.field == "sweep.alphas"
    vp = build_sweep(SweepOptions(interpolation="vp", alphas=(0.9,)), ("a",), "joint")
    assert vp.alphas == (0.9,) and vp.num_images == 3  # the variant's three gammas


def test_unset_sampling_seeds_are_seed_count_fresh_draws() -> None:
    sweep = build_sweep(SweepOptions(seed_count=3), ("a",), "joint")
    assert len(sweep.seeds) == 3 and all(0 <= s < RANDOM_SEED_BOUND for s in sweep.seeds)
    assert build_sweep(SweepOptions(seeds=(4, 5)), ("a",), "joint").seeds == (4, 5)


def test_an_edit_is_its_training_then_a_sweep_of_the_trained_variant() -> None:
    edit = build_edit(
        EditOptions(("a dog",), "a photo", TrainingOptions(mode="two_stage", fresh_seed=True)),
        **NATIVE,
    )
    assert edit.training.mode == "two_stage" and edit.sweep.forget == ("encoderattn",)
    assert edit.train_seed_from == "random" and edit.source_prompt == "a photo"
    with pytest.raises(InvalidInputError) as e:
        build_edit(EditOptions(("a dog",), " "), **NATIVE)
    assert e.value.field == "source_prompt"


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
    # (The labels live with the contact sheet, in forgedit.images.)
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


def test_a_request_option_is_one_name_from_the_proto_to_the_cli_and_the_sdk() -> None:
    """Adding a training or sweep option is: the proto field, the same-named field of
    ``forgedit.options``, its rule in ``forgedit.requests``, the CLI flag (``FLAGS``) and the
    SDK option. This fails naming whichever is missing."""
    from forgedit_client import options as sdk

    from forgedit.cli.parser import FLAGS, UNFLAGGED
    from server._proto import forgedit_pb2 as pb

    groups = (
        (pb.TrainingOptions, TrainingOptions, sdk.TrainingOptions, "training"),
        (pb.SweepOptions, SweepOptions, sdk.SweepOptions, "sweep"),
        (pb.OutputOptions, OutputOptions, sdk.OutputOptions, "output"),
        (pb.PreviewOptions, PreviewOptions, sdk.PreviewOptions, "preview"),
    )
    for message, engine, client, prefix in groups:
        proto = [f.name for f in message.DESCRIPTOR.fields]
        assert [f.name for f in dataclasses.fields(engine)] == proto
        for name in proto:
            path = f"{prefix}.{name}"
            assert (path in FLAGS) != (path in UNFLAGGED), f"{path}: a CLI flag, or UNFLAGGED"
            sdk_name = sdk._ALIASES.get(name, name)  # the SDK spells forget_strategies forget
            assert sdk_name in {f.name for f in dataclasses.fields(client)}, f"SDK: {path}"
    grouped = {f"{prefix}.{f.name}" for _, engine, _, prefix in groups for f in fields(engine)}
    assert set(FLAGS) - grouped == {"target_prompts", "source_prompt"}
    # Every group is a field of both requests' options, named as the request names it.
    for request, options in ((pb.EditRequest, EditOptions), (pb.SampleRequest, SampleOptions)):
        names = {f.name for f in fields(options)}
        for _, _, _, prefix in groups[1:]:
            assert prefix in request.DESCRIPTOR.fields_by_name and prefix in names, prefix
    # And every flat SDK keyword lands in its group.
    assert set(sdk._OUTPUT_KEYWORDS.values()) == {f.name for f in fields(sdk.OutputOptions)}
    assert set(sdk._PREVIEW_KEYWORDS.values()) == {f.name for f in fields(sdk.PreviewOptions)}


def test_output_is_png_unless_asked_and_quality_belongs_to_the_lossy_formats() -> None:
    assert build_output(OutputOptions()) == OutputConfig("png", None)
    webp = build_output(OutputOptions(format="webp"))
    assert webp.lossy_quality == DEFAULT_QUALITY and webp.suffix == ".webp"
    assert build_output(OutputOptions(format="jpeg", quality=1)).suffix == ".jpg"
    for options, needles in (
        (OutputOptions(quality=80), ("webp and jpeg", "png is lossless")),
        (OutputOptions(format="png", quality=80), ("webp and jpeg",)),
        (OutputOptions(format="jpeg", quality=0), ("1..100", "got 0")),
        (OutputOptions(format="webp", quality=101), ("1..100", "got 101")),
        (OutputOptions(format="gif"), ("accepted: png, webp, jpeg",)),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInputError) as e:
            build_output(options)
        assert e.value.field == ("output.format" if options.format == "gif" else "output.quality")
        assert all(n in str(e.value) for n in needles), str(e.value)
    with pytest.raises(InvalidInputError):  # the config checks itself too
        OutputConfig("png", 80)


def test_previews_default_to_the_training_free_one_for_an_edit_only() -> None:
    sweep = build_sweep(SweepOptions(seeds=(1, 2), steps=10), ("a",), "joint")  # 6 images
    assert build_preview(PreviewOptions(), sweep, has_training=True) == PreviewConfig(True)
    assert build_preview(PreviewOptions(), sweep, has_training=False) == PreviewConfig(False)
    off = build_preview(PreviewOptions(training_free=False), sweep, has_training=True)
    assert not off.training_free and off.x0_every is None
    with pytest.raises(InvalidInputError, match="fine-tunes nothing") as e:
        build_preview(PreviewOptions(training_free=True), sweep, has_training=False)
    assert e.value.field == "preview.training_free"
    x0 = build_preview(PreviewOptions(x0_every=4), sweep, has_training=False)
    assert x0.x0_steps(10) == (4, 8) and x0.x0_count(sweep) == 12
    for every in (0, 11, -1):
        with pytest.raises(InvalidInputError, match=r"must be 1\.\.10") as e:
            build_preview(PreviewOptions(x0_every=every), sweep, has_training=True)
        assert e.value.field == "preview.x0_every"
    edit = build_edit(EditOptions(("a",), preview=PreviewOptions(x0_every=25)), **NATIVE)
    assert edit.preview == PreviewConfig(True, 25) and edit.output.format == "png"


@pytest.mark.parametrize("limit", [6, 7, 13, 29, 60, 299])
def test_too_many_x0_previews_are_refused_naming_the_smallest_every_that_fits(limit: int) -> None:
    sweep = build_sweep(SweepOptions(seeds=(1, 2), steps=50), ("a",), "joint")  # 6 images
    bounds = Bounds(max_x0_previews=limit, x0_previews_setting="FORGEDIT_PREVIEW_MAX_X0")
    fits = [k for k in range(1, 51) if PreviewConfig(x0_every=k).x0_count(sweep) <= limit]
    with pytest.raises(InvalidInputError) as e:
        build_preview(PreviewOptions(x0_every=1), sweep, bounds, has_training=True)
    assert e.value.field == "preview.x0_every"
    assert f"asks for 300 x0 previews; at most {limit} are sent per job" in str(e.value)
    assert "FORGEDIT_PREVIEW_MAX_X0" in str(e.value)
    assert f"at least {min(fits)}" in str(e.value)
    build_preview(PreviewOptions(x0_every=min(fits)), sweep, bounds, has_training=True)
    tight = Bounds(max_x0_previews=5)  # fewer than one per image
    with pytest.raises(InvalidInputError, match=r"leave preview\.x0_every unset"):
        build_preview(PreviewOptions(x0_every=50), sweep, tight, has_training=True)
