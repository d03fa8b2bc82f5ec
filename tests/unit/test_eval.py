"""forgedit.eval: the TEdBench-layout reader, the scorers (the toy CLIP; LPIPS with weights
written here in the lpips package's format: none ship), the best-output rule and the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from forgedit.errors import InvalidInputError, ModelDirectoryError
from forgedit.eval.dataset import read_dataset, write_shapes_dataset
from forgedit.eval.run import (
    EditOutput,
    EvalOptions,
    PairEdit,
    Scorers,
    evaluate,
    write_report,
)
from forgedit.eval.scorers import ClipScorer, Lpips, psnr, ssim, to_tensor
from forgedit.zoo.shapes import world

# ----------------------------------------------------------------------------------------------
# The dataset layout


def _dataset(root: Path, entries: object, images: tuple[str, ...] = ("a.png",)) -> Path:
    (root / "originals").mkdir(parents=True)
    for name in images:
        world.scene("heldout", 0).render().save(root / "originals" / name)
    (root / "input_list.json").write_text(json.dumps(entries))
    return root


def test_a_tedbench_folder_reads_into_pairs(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path / "d",
        [
            {"img_name": "a.png", "target_text": "A photo of a blue circle."},
            {"img_name": "a.png", "target_text": "x", "source_text": "A photo of a circle."},
        ],
    )
    pairs = read_dataset(root)
    assert [p.img_name for p in pairs] == ["a.png", "a.png"]
    assert pairs[1].source_text == "A photo of a circle." and pairs[0].source_text is None
    assert len({p.pair_id for p in pairs}) == 2


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "non-empty JSON list"),
        ([{"img_name": "a.png"}], "target_text"),
        ([{"img_name": "../a.png", "target_text": "t"}], "file name in originals"),
        ([{"img_name": "b.png", "target_text": "t"}], "originals/b.png does not exist"),
        ([{"img_name": "a.png", "target_text": "t", "source_text": 3}], "source_text"),
        ([{"img_name": "a.png", "target_text": ""}], "target_text"),
    ],
)
def test_a_malformed_folder_is_named(tmp_path: Path, entries: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        read_dataset(_dataset(tmp_path / "d", entries))


def test_a_folder_without_the_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"input_list\.json or originals"):
        read_dataset(tmp_path)
    with pytest.raises(InvalidInputError, match="not a directory"):
        read_dataset(tmp_path / "missing")


def test_the_held_out_split_writes_as_a_tedbench_folder(tmp_path: Path) -> None:
    pairs = write_shapes_dataset(tmp_path / "heldout", per_kind=2)
    assert len(pairs) == 6
    entries = json.loads((tmp_path / "heldout" / "input_list.json").read_text())
    assert [e["edit"] for e in entries] == ["colour"] * 2 + ["shape"] * 2 + ["background"] * 2
    case = world.edit_case("shape", 1)
    assert pairs[3].target_text == case.target_prompt and pairs[3].source_text == case.source_prompt
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        write_shapes_dataset(tmp_path / "heldout", per_kind=1)


# ----------------------------------------------------------------------------------------------
# Scorers


def test_the_toy_clip_scores_renders_by_their_captions(shapes_clip: ClipScorer) -> None:
    right = 0
    for scene in world.scenes("heldout", 20):
        embedding = shapes_clip.image_embedding(scene.render())
        scores = shapes_clip.rank(embedding, world.all_captions())
        right += world.all_captions()[max(range(54), key=scores.__getitem__)] == scene.caption
    assert right >= 16
    same = shapes_clip.image_embedding(world.scene("heldout", 1).render())
    assert shapes_clip.directional(same, same, "a", "b") == 0.0


def test_clip_loading_names_what_is_wrong(tmp_path: Path, shapes_model_dir: Path) -> None:
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        ClipScorer.load(tmp_path / "nope")
    with pytest.raises(ModelDirectoryError, match="not CLIP"):
        ClipScorer.load(shapes_model_dir / "blip")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelDirectoryError, match="pickle only"):
        ClipScorer.load(tmp_path / "c")


def _lpips_weights(path: Path) -> dict[str, torch.Tensor]:
    """Random weights with the exact names and shapes of lpips.LPIPS(net='alex')."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.randn(v.shape, generator=generator) * 0.05
        for k, v in Lpips().state_dict().items()
        if not k.startswith("scaling_layer.")
    }
    for k in tensors:
        if k.startswith("lin"):
            tensors[k] = tensors[k].abs()  # lpips' linear layers are non-negative
    from safetensors.torch import save_file

    save_file(tensors, path)
    return tensors


def _lpips_by_hand(w: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> float:
    """LPIPS written out with torch.nn.functional, independently of the module's layout."""
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x[None] * 2 - 1) - shift) / scale
        out = []
        x = F.relu(F.conv2d(x, w["net.slice1.0.weight"], w["net.slice1.0.bias"], 4, 2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        x = F.relu(F.conv2d(x, w["net.slice2.3.weight"], w["net.slice2.3.bias"], 1, 2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for name in ("net.slice3.6", "net.slice4.8", "net.slice5.10"):
            x = F.relu(F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], 1, 1))
            out.append(x)
        return out

    total = 0.0
    for n, (fa, fb) in enumerate(zip(features(a), features(b), strict=True)):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += float(F.conv2d((na - nb) ** 2, w[f"lin{n}.model.1.weight"]).mean())
    return total


def test_lpips_loads_the_lpips_package_format_and_computes_its_formula(tmp_path: Path) -> None:
    weights = _lpips_weights(tmp_path / "lpips_alex.safetensors")
    lpips = Lpips.load(tmp_path / "lpips_alex.safetensors")
    a = to_tensor(world.scene("heldout", 0).render())
    b = to_tensor(world.scene("heldout", 1).render())
    assert lpips.distance(a, a) == 0.0
    assert lpips.distance(a, b) == pytest.approx(_lpips_by_hand(weights, a, b), rel=1e-5)
    assert lpips.distance(a, b) == pytest.approx(lpips.distance(b, a), rel=1e-6)


def test_lpips_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = _lpips_weights(tmp_path / "ok.safetensors")
    del weights["lin4.model.1.weight"]
    weights["net.slice1.0.bias"] = torch.zeros(3)
    weights["extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(ModelDirectoryError) as err:
        Lpips.load(tmp_path / "bad.safetensors")
    for part in ("missing lin4.model.1.weight", "unexpected extra", "net.slice1.0.bias (3,)"):
        assert part in str(err.value)
    (tmp_path / "alex.pth").write_bytes(b"\x80")
    with pytest.raises(ModelDirectoryError, match="pickle"):
        Lpips.load(tmp_path / "alex.pth")
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        Lpips.load(tmp_path / "none.safetensors")


def test_ssim_and_psnr() -> None:
    a = to_tensor(world.scene("heldout", 0).render())
    b = to_tensor(world.scene("heldout", 1).render())
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-4) and psnr(a, a) == float("inf")
    assert ssim(a, b) < 0.9 and 0 < psnr(a, b) < 30


# ----------------------------------------------------------------------------------------------
# The run and the report, with an editor that returns renders (no fine-tune)


class _RenderEditor:
    """Returns the unedited input and the ideal edit for each pair of the held-out set."""

    description = "renders"
    base_model = "shapes"

    def edit(self, pair, image, options):  # type: ignore[no-untyped-def]
        kind, index = pair.img_name.removesuffix(".png").split("-")
        case = world.edit_case(kind, int(index))
        outputs = [
            EditOutput(0, _params(0.5), case.source.render()),
            EditOutput(1, _params(0.6), case.target.render()),
        ]
        return PairEdit(case.source_prompt, "em_test", outputs, 0.0)


def _params(gamma: float) -> dict[str, object]:
    return {
        "forget": "donotforget",
        "interpolation": "vs",
        "gamma": gamma,
        "alpha": 0.0,
        "seed": 1,
        "guidance": 7.5,
        "steps": 50,
    }


def test_the_best_output_follows_the_text_and_the_report_has_every_score(
    tmp_path: Path, shapes_clip: ClipScorer
) -> None:
    pairs = write_shapes_dataset(tmp_path / "data", per_kind=1)
    report = evaluate(pairs, _RenderEditor(), Scorers(shapes_clip, clip_name="toy"), EvalOptions())
    assert [p.best for p in report.pairs] == [1, 1, 1]  # the ideal edit, not the input
    write_report(report, tmp_path / "out")
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["summary"]["pairs"] == 3 and scores["summary"]["outputs"] == 6
    assert scores["summary"]["best"]["lpips"] is None  # no LPIPS weights given
    assert scores["pairs"][0]["edit_model_id"] == "em_test"
    with open(tmp_path / "out" / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and sum(r["best"] == "True" for r in rows) == 3
    for row in rows:
        assert (tmp_path / "out" / row["file"]).is_file()
    assert len(list((tmp_path / "out" / "sheets").glob("*.png"))) == 3
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        write_report(report, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_eval_cli_refuses_bad_input_before_loading_models(tmp_path: Path) -> None:
    import io

    from forgedit.cli.main import main

    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        status = main(["eval", str(tmp_path / "none"), "--base-model", "shapes", "--out", "o"])
    assert status == 2 and "not a directory" in err.getvalue()
    write_shapes_dataset(tmp_path / "d", per_kind=1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["eval", str(tmp_path / "d"), "--base-model", "/x", "--out", "o"])
    assert status == 2 and "--clip DIR is needed" in err.getvalue()
