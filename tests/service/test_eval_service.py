"""``forgedit eval --target``: a TEdBench-layout folder edited through a real server (its
registry keeps the edit model), scored by the toy CLIP, and the edit model's version tagged
with the best output's scores (``--registry``). The tiny model serves, for speed: the path,
not the quality, is under test (quality: tests/unit/test_shapes_quality.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from support.server import TOKEN, running_server

from forgedit.cli.main import main
from forgedit.eval.dataset import write_shapes_dataset

pytestmark = pytest.mark.slow  # one fine-tune of the tiny model through the server (~20 s)


def test_eval_through_a_server_scores_and_tags_the_edit_model(
    tmp_path: Path,
    tiny_model_dir: Path,
    shapes_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset = tmp_path / "heldout"
    write_shapes_dataset(dataset, 1)
    listing = json.loads((dataset / "input_list.json").read_text())
    (dataset / "input_list.json").write_text(json.dumps(listing[:1]))  # one colour edit

    with running_server(tmp_path / "server", tiny_model_dir) as h:
        uri = h.registry.config.resolved_tracking_uri
        argv = ["eval", str(dataset), "--base-model", "tiny", "--target", f"127.0.0.1:{h.port}"]
        argv += ["--clip", str(shapes_model_dir / "clip"), "--registry", uri]
        argv += ["--gammas", "0.7", "--forget", "donotforget", "--seeds", "1"]
        argv += ["--out", str(tmp_path / "out"), "--json"]

        # Without the server's token the server refuses, and the command says so.
        monkeypatch.delenv("FORGEDIT_TOKEN", raising=False)
        assert main(argv) != 0
        refused = capsys.readouterr().err
        assert "error: pair 0 (colour-000.png) through 127.0.0.1:" in refused, refused
        assert "UNAUTHENTICATED" in refused, refused
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

        monkeypatch.setenv("FORGEDIT_TOKEN", TOKEN)
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["pairs"] == 1 and summary["outputs"] == 1

        report = json.loads((tmp_path / "out" / "scores.json").read_text())
        (pair,) = report["pairs"]
        model_id = pair["edit_model_id"]
        assert model_id and model_id.startswith("em_")
        assert (tmp_path / "out" / pair["best"]).is_file()

        # The edit model the server registered carries the best output's scores.
        info = h.registry.show(model_id)
        tags = (
            MlflowClient(uri, uri)
            .get_model_version(h.registry.config.registered_model, str(info.version))
            .tags
        )
        assert float(tags["forgedit.eval.clip_score"]) == pytest.approx(
            pair["best_scores"]["clip_score"], abs=1e-6
        )
        assert "forgedit.eval.ssim" in tags
