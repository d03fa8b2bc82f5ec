"""The tiny model is SD 1.x-shaped in the real on-disk formats, and deterministic."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest

from forgedit.errors import ModelDirectoryError
from forgedit.zoo import tiny
from forgedit.zoo.tiny import (
    default_tiny_model_dir,
    ensure_tiny_model,
    make_tiny_model,
    sd1_unet_config,
)

SD = "stable-diffusion"


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_unet_has_sd1_parameter_names_in_order(tiny_model_dir: Path) -> None:
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        sd14 = UNet2DConditionModel(**sd1_unet_config())
    tiny_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / SD / "unet")
    sd14_names = [name for name, _ in sd14.named_parameters()]
    tiny_names = [name for name, _ in tiny_unet.named_parameters()]
    assert len(sd14_names) == 686
    assert sum(p.numel() for p in sd14.parameters()) == 859_520_964  # SD 1.x's UNet
    assert tiny_names == sd14_names
    assert sum(p.numel() for p in tiny_unet.parameters()) < 4_000_000
    assert tiny_unet.config["sample_size"] == 8
    assert tuple(tiny_unet.config["down_block_types"]) == tiny.SD1_DOWN_BLOCKS
    assert tuple(tiny_unet.config["up_block_types"]) == tiny.SD1_UP_BLOCKS


def test_tokenizer_is_sds_clip_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    folder = tiny_model_dir / SD / "tokenizer"
    # The layout of real SD 1.x snapshots, not transformers 5's tokenizer.json.
    assert {p.name for p in folder.iterdir()} == {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(tokenizer) == 49408
    ids = tokenizer(
        "a photo of a cat", padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70  # SD 1.x pads with <|endoftext|>
    assert tokenizer.model_max_length == 77
    # Case-folding and truncation as in SD.
    assert tokenizer("A PHOTO of a Cat").input_ids == ids[:7]
    long = tokenizer("cat " * 200, padding="max_length", max_length=77, truncation=True)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == 49407


def test_pipeline_layout_loads_with_diffusers(tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    root = tiny_model_dir / SD
    assert not list(root.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
    assert pipe.vae.config.latent_channels == 4
    assert len(pipe.vae.config.block_out_channels) == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert scheduler["steps_offset"] == 1
    assert scheduler["beta_schedule"] == "scaled_linear"


def test_blip_layout_and_token_ids(tiny_model_dir: Path) -> None:
    root = tiny_model_dir / "blip"
    assert {p.name for p in root.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.txt",
    }
    vocab = (root / "vocab.txt").read_text().splitlines()
    assert len(vocab) == len(set(vocab)) > 300
    ids = {token: i for i, token in enumerate(vocab)}
    text = json.loads((root / "config.json").read_text())["text_config"]
    assert text["vocab_size"] == len(vocab)
    assert text["bos_token_id"] == ids["[DEC]"]
    assert text["sep_token_id"] == ids["[SEP]"]
    assert text["pad_token_id"] == ids["[PAD]"] == 0
    pre = json.loads((root / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 384, "width": 384}
    assert pre["resample"] == 3  # bicubic
    assert pre["rescale_factor"] == pytest.approx(1 / 255)
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]


def test_make_is_deterministic_and_atomic(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    target = tmp_path / "again"
    target.mkdir()  # an empty directory is an accepted target
    state = torch.random.get_rng_state()
    assert make_tiny_model(target) == target
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    first, second = _files(tiny_model_dir), _files(target)
    assert first.keys() == second.keys()
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 4
    for name in first:
        assert first[name] == second[name], name
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary siblings left


def test_make_refuses_a_non_empty_target(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ModelDirectoryError, match="not an empty directory"):
        make_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_missing_open_clip_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tiny.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelDirectoryError) as err:
        make_tiny_model(tmp_path / "model")
    assert "pip install --no-deps open-clip-torch==3.3.0" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_default_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FORGEDIT_HOME", str(tmp_path / "home"))
    assert default_tiny_model_dir() == tmp_path / "home" / "tiny-model"
    monkeypatch.delenv("FORGEDIT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_tiny_model_dir() == tmp_path / "data" / "forgedit" / "tiny-model"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_tiny_model_dir() == tmp_path / "user" / ".local/share/forgedit/tiny-model"


def test_ensure_creates_once_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FORGEDIT_HOME", str(tmp_path))
    path = ensure_tiny_model()
    assert path == tmp_path / "tiny-model"
    assert (path / SD / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    stamp = (path / "tiny-model.json").stat()

    def must_not_build(root: Path) -> None:
        raise AssertionError("an existing tiny model was rebuilt")

    monkeypatch.setattr(tiny, "_write_tiny_model", must_not_build)
    assert ensure_tiny_model() == path
    assert ensure_tiny_model(tmp_path / "tiny-model") == path
    assert (path / "tiny-model.json").stat().st_mtime_ns == stamp.st_mtime_ns


def test_ensure_loser_of_a_race_keeps_the_winners_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    target = tmp_path / "tiny"
    build = tiny._write_tiny_model

    def build_while_another_process_wins(root: Path) -> None:
        build(root)
        shutil.copytree(tiny_model_dir, target)  # the other process renamed first
        (target / "winner").write_text("")

    monkeypatch.setattr(tiny, "_write_tiny_model", build_while_another_process_wins)
    assert ensure_tiny_model(target) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # the loser's copy is gone


def test_ensure_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelDirectoryError, match="does not hold a version-1 tiny model"):
        ensure_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_one_resolver_of_built_in_names(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``forgedit.zoo.builtin_base_model``: the CLI, the server and the pyfunc resolve a
    built-in name here, and an unknown name is refused naming the built-ins."""
    from forgedit.zoo import DEFAULT_BUILTIN, builtin_base_model, builtin_names

    assert DEFAULT_BUILTIN == "tiny" and builtin_names()[0] == "tiny"
    shutil.copytree(tiny_model_dir, tmp_path / "home" / "tiny-model")  # as if made before
    tiny = builtin_base_model("tiny", home=tmp_path / "home")
    assert tiny.name == "tiny"
    assert tiny.stable_diffusion == tmp_path / "home" / "tiny-model" / SD
    assert tiny.blip is not None and (tiny.blip / "config.json").is_file()
    with pytest.raises(
        ModelDirectoryError, match="'sd99' is not a built-in base model; built in: tiny"
    ):
        builtin_base_model("sd99")


def test_random_presets_have_the_sizes_they_claim() -> None:
    """Built on the meta device (no memory): ``sd1`` is SD 1.x's architecture exactly (its
    UNet, CLIP ViT-L/14's text tower and VAE parameter counts), ``medium`` a UNet just over
    protobuf's 2 GB in fp32, ``tiny`` the test model."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgedit.zoo.tiny import PRESETS

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    counts = {}
    with torch.device("meta"):
        for name, preset in PRESETS.items():
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
                **preset.vae,
            )
            text = CLIPTextModel(
                CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **preset.text_encoder)
            )
            counts[name] = (count(UNet2DConditionModel(**preset.unet)), count(text), count(vae))
    assert counts["sd1"] == (859_520_964, 123_060_480, 83_653_863)
    assert 2**31 < 4 * counts["medium"][0] < 4 * counts["sd1"][0]
    assert counts["tiny"][0] == 3_257_876
