"""The shipped toy-world model: its manifest, its size and formats, and the name ``shapes`` in
the engine CLI, the server and the pyfunc (loads only; no fine-tune)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from forgedit.errors import ModelDirectoryError
from forgedit.zoo import builtin_named, is_builtin_name
from forgedit.zoo.shapes import shapes_model, verify_manifest, world

MAX_FILE_BYTES = 5 * 1024 * 1024  # the repository's large-file hook
MAX_TOTAL_BYTES = 20 * 1000 * 1000


def test_the_shipped_files_match_the_manifest_and_fit_the_budget(shapes_model_dir: Path) -> None:
    manifest = verify_manifest(shapes_model_dir)
    sizes = {name: (shapes_model_dir / name).stat().st_size for name in manifest["files"]}
    assert max(sizes.values()) < MAX_FILE_BYTES, max(sizes.items(), key=lambda kv: kv[1])
    assert (
        sum(sizes.values()) + (shapes_model_dir / "manifest.json").stat().st_size <= MAX_TOTAL_BYTES
    )
    for stage, record in manifest["training_code_commit"].items():
        assert len(record["commit"]) == 40 and record["dirty"] is False, stage
    assert set(manifest["run_times_s"]) >= {"clip", "blip", "vae", "latents", "unet"}
    weights = [name for name in manifest["files"] if name.endswith(".safetensors")]
    assert all(".fp16." in name or "fp16-" in name for name in weights), weights
    for name in weights:
        with safe_open(shapes_model_dir / name, "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
        assert dtypes == {"F16"}, (name, dtypes)


@pytest.mark.parametrize("damage", ["changed", "missing", "extra"])
def test_a_damaged_copy_is_refused_naming_the_file(
    shapes_model_dir: Path, tmp_path: Path, damage: str
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(shapes_model_dir, copy)
    target = copy / "clip" / "config.json"
    if damage == "changed":
        target.write_text(target.read_text().replace("clip", "clap", 1))
    elif damage == "missing":
        target.unlink()
    else:
        (copy / "clip" / "notes.txt").write_text("x")
    with pytest.raises(ModelDirectoryError, match=damage if damage != "extra" else "not in"):
        shapes_model(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ModelDirectoryError, match=r"no manifest\.json"):
        shapes_model(copy)


def test_the_pipeline_loads_as_an_sd1_base_model(shapes_model_dir: Path) -> None:
    from forgedit.models import load_base_model

    base = load_base_model(shapes_model_dir / "stable-diffusion")
    assert (base.native_height, base.vae_scale_factor, base.text_length) == (64, 8, 77)
    assert sum(1 for _ in base.unet.named_parameters()) == 686
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size


def test_blip_captions_held_out_scenes_as_the_engine_runs_it(shapes_model_dir: Path) -> None:
    from forgedit.caption import Captioner, source_prompt_for

    captioner = Captioner.load(shapes_model_dir / "blip")
    scenes = list(world.scenes("heldout", 12))
    right = [captioner.caption(s.render()) == s.blip_caption for s in scenes]
    assert sum(right) >= 9, right  # BENCHMARKS.md: the rate over 300 held-out scenes
    scene = scenes[right.index(True)]
    caption = captioner.caption(scene.render())
    assert source_prompt_for(caption, "A photo of a x").lower() == scene.caption


def test_the_name_shapes_resolves_everywhere(shapes_model_dir: Path) -> None:
    sd = shapes_model_dir / "stable-diffusion"
    assert is_builtin_name("shapes") and not is_builtin_name("./shapes")
    builtin = builtin_named("shapes")
    assert builtin is not None and builtin.name == "shapes"
    assert builtin.stable_diffusion == sd and builtin.blip == shapes_model_dir / "blip"
    assert builtin_named("/models/sd14") is None and builtin_named(Path("shapes")) == builtin


def test_the_engine_cli_takes_base_model_shapes(shapes_model_dir: Path, tmp_path: Path) -> None:
    from forgedit.cli.arguments import check_edit_args
    from forgedit.cli.parser import build_parser

    image = tmp_path / "in.png"
    world.Scene("red", "circle", "white").render().save(image)
    args: argparse.Namespace = build_parser().parse_args(
        [
            "edit",
            str(image),
            "--prompt",
            "A photo of a blue circle on a white background",
            "--base-model",
            "shapes",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    command = check_edit_args(args)
    assert command.base_model is None and command.builtin == "shapes"
    from forgedit.cli.edit import _load_engine

    engine, label = _load_engine(command)
    assert label == "shapes" and engine.can_caption  # the toy world's own BLIP


def test_a_base_model_that_is_neither_a_directory_nor_a_built_in_is_named(
    tmp_path: Path,
) -> None:
    from forgedit.cli.arguments import check_edit_args
    from forgedit.cli.parser import build_parser

    image = tmp_path / "in.png"
    world.Scene("red", "circle", "white").render().save(image)
    args = build_parser().parse_args(
        ["edit", str(image), "--prompt", "A photo of a cat", "--base-model", "shape"]
    )
    with pytest.raises(
        ModelDirectoryError,
        match=r"'shape' does not exist; give a diffusers SD "
        r"1.x directory or a built-in's name \(tiny, shapes\)",
    ):
        check_edit_args(args)


def test_the_server_serves_shapes_by_name(
    shapes_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.main import model_size, resolve_base_models
    from server.settings import ServerSettings

    monkeypatch.setenv("FORGEDIT_BASE_MODELS", json.dumps({"shapes": "shapes"}))
    resolved = resolve_base_models(ServerSettings())
    assert resolved == {"shapes": shapes_model_dir / "stable-diffusion"}
    assert model_size(resolved["shapes"]) == "tiny"


def test_the_pyfunc_finds_shapes_by_fingerprint(shapes_model_dir: Path) -> None:
    from forgedit.models import base_model_fingerprint
    from registry.pyfunc_model import _builtin_base_model_for

    fingerprint = base_model_fingerprint(shapes_model_dir / "stable-diffusion")
    manifest = {"base_model": {"name": "shapes", "fingerprint": fingerprint}}
    assert _builtin_base_model_for(manifest) == str(shapes_model_dir / "stable-diffusion")
    with pytest.raises(ModelDirectoryError, match=r"built-in base models \(tiny, shapes\)"):
        _builtin_base_model_for({"base_model": {"name": "x", "fingerprint": "0" * 64}})
