"""The edit-model artifact: safetensors + JSON, hashed, atomic, refusing mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgedit.artifact import (
    DELTA_FILE,
    MANIFEST_FILE,
    EditModel,
    load_edit_model,
    verify_files,
)
from forgedit.config import TrainingConfig
from forgedit.errors import BaseModelMismatchError, EditModelError


def make_edit_model() -> EditModel:
    torch.manual_seed(0)
    return EditModel(
        delta={"unet.down_blocks.1.w": torch.randn(4, 4), "unet.up_blocks.1.b": torch.randn(3)},
        source_embedding=torch.randn(1, 77, 8),
        base_model_name="tiny",
        base_model_fingerprint="ab" * 32,
        source_prompt="A photo of a dog",
        training=TrainingConfig.for_mode("joint", height=64, width=64, seed=3),
        loss_curve=[0.5, 0.4],
        image_sha256="cd" * 32,
    )


def test_round_trip(tmp_path: Path) -> None:
    model = make_edit_model()
    model.save(tmp_path / "em")
    assert sorted(p.name for p in (tmp_path / "em").iterdir()) == [
        "delta.safetensors",
        "embedding.safetensors",
        "manifest.json",
    ]
    loaded = load_edit_model(tmp_path / "em", expected_base_fingerprint="ab" * 32)
    assert loaded.training == model.training
    assert loaded.source_prompt == model.source_prompt
    assert loaded.loss_curve == model.loss_curve
    for k, v in model.delta.items():
        assert torch.equal(loaded.delta[k], v)
    assert torch.equal(loaded.source_embedding, model.source_embedding)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_refuses_other_base_model(tmp_path: Path) -> None:
    make_edit_model().save(tmp_path / "em")
    with pytest.raises(BaseModelMismatchError, match="base model 'tiny'"):
        load_edit_model(tmp_path / "em", expected_base_fingerprint="ef" * 32)


def test_detects_a_flipped_byte(tmp_path: Path) -> None:
    make_edit_model().save(tmp_path / "em")
    path = tmp_path / "em" / DELTA_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EditModelError, match="does not match its sha256"):
        verify_files(tmp_path / "em")


def test_detects_truncation_and_missing_files(tmp_path: Path) -> None:
    make_edit_model().save(tmp_path / "em")
    path = tmp_path / "em" / DELTA_FILE
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(EditModelError, match="bytes"):
        load_edit_model(tmp_path / "em")
    path.unlink()
    with pytest.raises(EditModelError, match="missing"):
        load_edit_model(tmp_path / "em")


def test_refuses_non_artifacts(tmp_path: Path) -> None:
    with pytest.raises(EditModelError, match=r"manifest\.json is missing"):
        load_edit_model(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(EditModelError, match="not valid JSON"):
        load_edit_model(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(
        json.dumps({"format": "forgedit.edit-model", "format_version": 99})
    )
    with pytest.raises(EditModelError, match="version 99"):
        load_edit_model(tmp_path)


def test_save_refuses_a_non_empty_target(tmp_path: Path) -> None:
    (tmp_path / "em").mkdir()
    (tmp_path / "em" / "keep.txt").write_text("x")
    with pytest.raises(EditModelError, match="already exists"):
        make_edit_model().save(tmp_path / "em")
    assert (tmp_path / "em" / "keep.txt").read_text() == "x"
