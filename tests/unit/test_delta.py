"""Delta formats: int8 with per-output-channel scales, fp16, fp32; what the artifact stores,
what it refuses, and that old artifacts keep loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgedit import delta
from forgedit.artifact import DELTA_FILE, MANIFEST_FILE, EditModel, load_edit_model, read_manifest
from forgedit.config import TrainingConfig
from forgedit.errors import EditModelError, InvalidInputError

CONV = "unet.down_blocks.1.resnets.0.conv1.weight"
BIAS = "unet.down_blocks.1.resnets.0.conv1.bias"


def raw_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(64, 32, 3, 3, generator=g) * 1e-4
    conv[5] *= 100.0  # one loud channel must not coarsen the others
    conv[7] = 0.0  # an untouched channel
    return {CONV: conv, BIAS: torch.randn(64, generator=g) * 1e-5}


def model_with(fmt: str, tensors: dict[str, torch.Tensor]) -> EditModel:
    decoded = delta.decode(delta.encode(tensors, fmt), fmt)  # type: ignore[arg-type]
    return EditModel(
        delta=decoded.tensors,
        delta_scales=decoded.scales,
        source_embedding=torch.randn(1, 77, 8),
        base_model_name="tiny",
        base_model_fingerprint="ab" * 32,
        source_prompt="A photo of a dog",
        training=TrainingConfig.for_mode("joint", height=64, width=64, delta_format=fmt),  # type: ignore[arg-type]
    )


def test_int8_is_per_output_channel_and_within_half_a_step() -> None:
    raw = raw_delta()
    payload = delta.encode(raw, "int8")
    assert payload[CONV].dtype == torch.int8
    scale = payload[CONV + delta.SCALE_SUFFIX]
    assert scale.dtype == torch.float32 and scale.shape == (64,)
    assert scale[7] == 0 and torch.all(payload[CONV][7] == 0)
    torch.testing.assert_close(scale, raw[CONV].reshape(64, -1).abs().amax(1) / 127)
    decoded = delta.decode(payload, "int8").tensors
    assert decoded[CONV].dtype == torch.float32
    error = (decoded[CONV] - raw[CONV]).reshape(64, -1).abs().amax(1)
    assert torch.all(error <= scale * 0.5 * (1 + 1e-5))
    # The quiet channels keep their own fine scale despite the loud one.
    assert float(error[0]) < float(raw[CONV][5].abs().max()) / 127 / 50
    # 1-D tensors are kept as fp16.
    assert payload[BIAS].dtype == torch.float16
    assert torch.equal(decoded[BIAS], raw[BIAS].half().float())


def test_encoding_a_decoded_int8_delta_again_writes_the_same_bytes() -> None:
    first = delta.encode(raw_delta(), "int8")
    decoded = delta.decode(first, "int8")
    again = delta.encode(decoded.tensors, "int8", decoded.scales)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_int8_refuses_a_diverged_fine_tune() -> None:
    raw = raw_delta()
    raw[CONV][3, 0, 0, 0] = float("nan")
    with pytest.raises(EditModelError, match=r"non-finite.*fp32 and fp16"):
        delta.encode(raw, "int8")


@pytest.mark.parametrize(
    ("payload", "fmt", "message"),
    [
        ({CONV: torch.zeros(4, 4)}, "int4", "delta format 'int4' is not supported.*fp32, fp16"),
        ({CONV: torch.zeros(4, 4, dtype=torch.int8)}, "int8", "no fp32 scale of shape"),
        (
            {
                CONV: torch.zeros(4, 4, dtype=torch.int8),
                CONV + delta.SCALE_SUFFIX: torch.zeros(3),
            },
            "int8",
            "no fp32 scale of shape \\(4,\\)",
        ),
        ({"x" + delta.SCALE_SUFFIX: torch.zeros(3)}, "int8", "stray scale"),
        ({CONV: torch.zeros(4, 4, dtype=torch.float16)}, "fp32", "float16 in a fp32 delta"),
        ({CONV: torch.zeros(4, 4)}, "int8", "an int8 delta holds int8 tensors"),
    ],
)
def test_a_payload_that_does_not_match_its_format_is_refused(
    payload: dict[str, torch.Tensor], fmt: str, message: str
) -> None:
    with pytest.raises(EditModelError, match=message):
        delta.decode(payload, fmt)


def test_unknown_format_in_a_request_is_refused_naming_the_accepted() -> None:
    with pytest.raises(
        InvalidInputError, match="unknown delta format 'int4'; accepted: fp32, fp16, int8"
    ):
        TrainingConfig.for_mode("joint", delta_format="int4")  # type: ignore[arg-type]


def test_defaults_follow_the_precision_mode() -> None:
    assert TrainingConfig.for_mode("joint").delta_format == "fp32"
    assert TrainingConfig.for_mode("joint", precision="fast").delta_format == "int8"
    explicit = TrainingConfig.for_mode("joint", precision="fast", delta_format="fp16")
    assert explicit.delta_format == "fp16"
    assert TrainingConfig.from_dict(explicit.to_dict()) == explicit


def test_fingerprints_of_configs_from_before_the_field_are_unchanged() -> None:
    """A faithful fp32 config (and a fast fp16 one) fingerprints as it did before
    ``delta_format`` existed, so registered edit models keep deduping; int8 differs."""
    for precision, legacy in (("faithful", "fp32"), ("fast", "fp16")):
        config = TrainingConfig.for_mode("joint", precision=precision, delta_format=legacy)  # type: ignore[arg-type]
        old = {k: v for k, v in config.to_dict().items() if k != "delta_format"}
        assert TrainingConfig.from_dict(old) == config
        blob = json.dumps(old, sort_keys=True, separators=(",", ":"))  # the formula before
        assert config.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()
    fast = TrainingConfig.for_mode("joint", precision="fast")
    assert fast.fingerprint() != dataclasses.replace(fast, delta_format="fp16").fingerprint()


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
def test_every_format_round_trips_through_the_artifact(tmp_path: Path, fmt: str) -> None:
    model = model_with(fmt, raw_delta())
    model.save(tmp_path / "em")
    manifest = read_manifest(tmp_path / "em")
    assert manifest["delta"]["format"] == manifest["training"]["delta_format"] == fmt
    loaded = load_edit_model(tmp_path / "em")
    assert loaded.delta_format == fmt
    assert all(torch.equal(loaded.delta[k], v) for k, v in model.delta.items())
    again = tmp_path / "again"
    loaded.save(again)
    assert (again / DELTA_FILE).read_bytes() == (tmp_path / "em" / DELTA_FILE).read_bytes()


def test_int8_artifact_is_about_a_quarter_of_fp32(tmp_path: Path) -> None:
    sizes = {}
    for fmt in ("fp32", "fp16", "int8"):
        model_with(fmt, raw_delta()).save(tmp_path / fmt)
        sizes[fmt] = (tmp_path / fmt / DELTA_FILE).stat().st_size
    assert sizes["int8"] < 0.3 * sizes["fp32"]
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    stored = load_file(tmp_path / "int8" / DELTA_FILE)
    assert {str(t.dtype) for t in stored.values()} == {
        "torch.int8",
        "torch.float16",
        "torch.float32",
    }


def rewrite_training(directory: Path, change: dict[str, object], drop: str | None = None) -> None:
    """Edit the manifest's training config as an older (or foreign) engine would have written
    it. The payload hashes stay valid: only manifest.json changes."""
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["training"].update(change)
    if drop is not None:
        del manifest["training"][drop]
        del manifest["delta"]["format"]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("precision", "fmt"), [("faithful", "fp32"), ("fast", "fp16")])
def test_artifacts_from_before_the_format_field_keep_loading(
    tmp_path: Path, precision: str, fmt: str
) -> None:
    model = model_with(fmt, raw_delta())
    model.training = dataclasses.replace(model.training, precision=precision)  # type: ignore[arg-type]
    model.save(tmp_path / "em")
    rewrite_training(tmp_path / "em", {}, drop="delta_format")
    loaded = load_edit_model(tmp_path / "em")
    assert loaded.delta_format == fmt
    assert all(torch.equal(loaded.delta[k], v) for k, v in model.delta.items())


def test_an_unknown_stored_format_is_refused_clearly(tmp_path: Path) -> None:
    model_with("int8", raw_delta()).save(tmp_path / "em")
    rewrite_training(tmp_path / "em", {"delta_format": "int4"})
    with pytest.raises(EditModelError, match="delta format 'int4' is not supported"):
        read_manifest(tmp_path / "em")
    with pytest.raises(EditModelError, match="delta format 'int4' is not supported"):
        load_edit_model(tmp_path / "em")


def test_a_payload_that_lies_about_its_format_is_refused(tmp_path: Path) -> None:
    """An int8 payload under a manifest claiming fp32 (hashes intact) is refused on load."""
    model_with("int8", raw_delta()).save(tmp_path / "em")
    rewrite_training(tmp_path / "em", {"delta_format": "fp32"})
    with pytest.raises(EditModelError, match=r"stray scale|int8 in a fp32 delta"):
        load_edit_model(tmp_path / "em")
