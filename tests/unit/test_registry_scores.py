"""`forgedit eval --registry`: an edit model's registered version is tagged with its scores."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.registry import random_edit_model

from registry import EditModelRegistry, RegistryConfig
from registry.errors import EditModelNotFoundError


def test_scores_are_tagged_on_the_registered_version(tmp_path: Path) -> None:
    with EditModelRegistry(RegistryConfig(data_dir=tmp_path / "a")) as registry:
        result = registry.register(random_edit_model(7), request_id="req-scores")
        version = registry.record_scores(
            result.edit_model_id,
            {"clip_score": 0.3125, "lpips": None, "psnr": float("inf"), "ssim": 0.5},
            source="forgedit eval heldout 000-colour-000",
        )
        assert version == result.version
        uri = registry.config.resolved_tracking_uri
        tags = (
            MlflowClient(uri, uri)
            .get_model_version(registry.config.registered_model, str(version))
            .tags
        )
        assert tags["forgedit.eval.clip_score"] == "0.3125"
        assert tags["forgedit.eval.ssim"] == "0.5"
        assert tags["forgedit.eval.source"] == "forgedit eval heldout 000-colour-000"
        assert "forgedit.eval.lpips" not in tags and "forgedit.eval.psnr" not in tags
        with pytest.raises(EditModelNotFoundError):
            registry.record_scores("em_" + "a" * 26, {"clip_score": 0.1})
