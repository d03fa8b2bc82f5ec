"""Forgetting strategies resolve to the exact name sets of FORGEDIT_SPEC.md §13."""

from __future__ import annotations

import pytest

from forgedit import forgetting
from forgedit.errors import StrategyResolutionError, UnknownStrategyError

# (tensors, parameters) per strategy on an SD 1.x-config UNet: spec §13, checked there against
# the original code.
SPEC_COUNTS = {
    "vanilla": {
        "donotforget": (0, 0),
        "encoderkv": (234, 242_731_200),
        "noencoder": (246, 249_612_480),
        "encoderattn": (186, 216_917_440),
        "encoderattn+encoder1": (130, 186_982_720),
        "decoderkv": (366, 500_473_920),
        "decoderattn": (294, 461_753_280),
        "decoderattn+decoder2": (208, 400_665_920),
    },
    "dreambooth": {
        "orig": (0, 0),
        "noencoder": (246, 249_612_480),
        "nodecoder": (384, 510_795_840),
        "encoderattn": (186, 216_917_440),
        "encoderattn+encoder1": (130, 186_982_720),
        "encoderkv": (12, 6_881_280),
        "decoderattn": (294, 461_753_280),
    },
}


@pytest.fixture(scope="module")
def counts() -> dict:
    return forgetting.strategy_counts()


@pytest.mark.parametrize(
    ("variant", "strategy"),
    [(v, s) for v, table in SPEC_COUNTS.items() for s in table],
)
def test_counts_match_spec_table(counts: dict, variant: str, strategy: str) -> None:
    tensors, parameters = SPEC_COUNTS[variant][strategy]
    assert counts[variant][strategy] == {"tensors": tensors, "parameters": parameters}


def test_trained_subset_is_518_tensors_587_6m_parameters() -> None:
    params = dict(forgetting.sd1_meta_unet().named_parameters())
    assert len(params) == 686
    trained = forgetting.trained_parameter_names(params, "forgedit")
    assert len(trained) == 518
    assert sum(params[n].numel() for n in trained) == 587_642_560
    assert not any(n.startswith(("down_blocks.0", "up_blocks.0", "mid_block")) for n in trained)


def test_attn_does_not_match_attentions() -> None:
    names = [n for n, _ in forgetting.sd1_meta_unet().named_parameters()]
    reverted = forgetting.resolve("encoderattn", "vanilla", names)
    # 'attentions.*.proj_in' lacks the substring 'attn', so encoderattn reverts it (spec §5).
    assert "down_blocks.1.attentions.0.proj_in.weight" in reverted
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" not in reverted


def test_dreambooth_encoderkv_is_the_inverse_of_vanilla() -> None:
    names = [n for n, _ in forgetting.sd1_meta_unet().named_parameters()]
    vanilla = forgetting.resolve("encoderkv", "vanilla", names)
    dreambooth = forgetting.resolve("encoderkv", "dreambooth", names)
    down = {n for n in names if n.startswith("down_blocks")}
    assert vanilla | dreambooth == down
    assert not vanilla & dreambooth


def test_block_index_is_matched_whole() -> None:
    assert forgetting._contains("down_blocks.1.resnets.0.conv1.weight", "down_blocks.1")
    assert not forgetting._contains("down_blocks.10.resnets.0.conv1.weight", "down_blocks.1")


def test_unknown_strategy_names_the_accepted_ones() -> None:
    with pytest.raises(UnknownStrategyError, match="accepted: donotforget, orig, encoderkv"):
        forgetting.resolve("encoderKV", "vanilla", ["down_blocks.1.x"])
    with pytest.raises(UnknownStrategyError, match="dreambooth"):
        forgetting.resolve("decoderkv", "dreambooth", ["up_blocks.1.x"])


def test_naming_drift_fails_loudly() -> None:
    # A UNet whose cross-attention was fused into to_qkv has no 'attn2.to_k' names.
    fused = [
        n.replace("to_k", "to_qkv").replace("to_v", "to_qkv")
        for n, _ in forgetting.sd1_meta_unet().named_parameters()
    ]
    with pytest.raises(StrategyResolutionError, match=r"attn2\.to_k"):
        forgetting.resolve("encoderkv", "vanilla", fused)
    with pytest.raises(StrategyResolutionError):
        forgetting.trained_parameter_names(["conv_in.weight"], "forgedit")


def test_variant_for_mode() -> None:
    assert forgetting.variant_for_mode("joint") == "vanilla"
    assert forgetting.variant_for_mode("two_stage") == "vanilla"
    assert forgetting.variant_for_mode("dreambooth") == "dreambooth"
