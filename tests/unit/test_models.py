"""Loading an SD 1.x base model: the tiny model through the real code path, and every way a
directory can be wrong."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from forgedit.errors import ModelDirectoryError
from forgedit.models import BaseModel, base_model_fingerprint, load_base_model

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(tiny_model_dir / "stable-diffusion")


@pytest.fixture
def sd_copy(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny pipeline at the relative path ``sd`` (cwd = tmp_path)."""
    shutil.copytree(tiny_model_dir / "stable-diffusion", tmp_path / "sd")
    monkeypatch.chdir(tmp_path)
    return Path("sd")


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _error(directory: str | os.PathLike[str], **kwargs: object) -> str:
    with pytest.raises(ModelDirectoryError) as err:
        load_base_model(directory, **kwargs)  # type: ignore[arg-type]
    message = str(err.value)
    assert os.getcwd() not in message  # paths are shown as given, never resolved
    return message


def test_loads_the_tiny_model(base: BaseModel) -> None:
    assert base.name == "stable-diffusion"
    assert len(base.fingerprint) == 64
    assert base.device == torch.device("cpu")
    assert (base.native_height, base.native_width) == (64, 64)
    assert base.vae_scale_factor == 8
    assert base.scaling_factor == pytest.approx(0.18215)
    assert base.text_length == 77
    assert len(list(base.unet.named_parameters())) == 686
    for module in (base.unet, base.vae, base.text_encoder):
        assert not module.training
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert not any(p.requires_grad for p in module.parameters())


def test_diffusers_components_load_without_a_second_copy(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With accelerate installed, diffusers loads weights straight into empty modules
    (``low_cpu_mem_usage``); without it a real SD checkpoint is materialised twice."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available

    assert is_accelerate_available()
    seen: dict[str, object] = {}
    for cls in (UNet2DConditionModel, AutoencoderKL):
        original = cls.from_pretrained.__func__  # type: ignore[attr-defined]

        def spy(klass: type, *args: object, _original: Any = original, **kwargs: object) -> Any:
            seen[klass.__name__] = kwargs.get("low_cpu_mem_usage")
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_base_model(tiny_model_dir / "stable-diffusion")
    assert seen == {"UNet2DConditionModel": True, "AutoencoderKL": True}


def test_forward_pass_shapes(base: BaseModel) -> None:
    ids = base.tokenizer(
        ["a photo of a cat"], padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (1, 77)  # model_max_length is the encoder's 77
    with torch.no_grad():
        embedding = base.text_encoder(ids).last_hidden_state
        assert embedding.shape == (1, 77, base.unet.config["cross_attention_dim"])
        x = torch.rand(2, 3, 64, 96) * 2 - 1
        posterior = base.vae.encode(x).latent_dist
        z0 = base.scaling_factor * posterior.sample(torch.Generator().manual_seed(0))
        assert z0.shape == (2, 4, 8, 12)
        eps = base.unet(z0, torch.tensor([999, 10]), embedding.expand(2, -1, -1)).sample
        assert eps.shape == z0.shape
        assert torch.isfinite(eps).all()
        image = base.vae.decode(1 / base.scaling_factor * z0).sample
        assert image.shape == x.shape


def test_name_can_be_given(sd_copy: Path) -> None:
    assert load_base_model(sd_copy, name="tiny-sd").name == "tiny-sd"
    assert load_base_model("sd/").name == "sd"


def test_fingerprint_is_stable_and_follows_weight_bytes(sd_copy: Path, base: BaseModel) -> None:
    assert base_model_fingerprint(sd_copy) == base.fingerprint  # same bytes, other place
    assert base_model_fingerprint(sd_copy) == base.fingerprint
    _edit_json(sd_copy / "unet" / "config.json", lambda c: c.update(sample_size=16))
    assert base_model_fingerprint(sd_copy) == base.fingerprint  # weights only
    weights = sd_copy / TEXT_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one float
    weights.write_bytes(bytes(data))
    changed = base_model_fingerprint(sd_copy)
    assert changed != base.fingerprint
    assert load_base_model(sd_copy).fingerprint == changed


def test_fp16_variant_is_loaded_as_fp32(sd_copy: Path, base: BaseModel) -> None:
    from safetensors.torch import load_file, save_file

    for weights in (UNET_WEIGHTS, TEXT_WEIGHTS):
        path = sd_copy / weights
        tensors = load_file(path)
        save_file({k: v.half() for k, v in tensors.items()}, path.with_suffix(".fp16.safetensors"))
        path.unlink()
    model = load_base_model(sd_copy)
    for module in (model.unet, model.text_encoder):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    name, reference = next(iter(base.unet.named_parameters()))
    loaded = dict(model.unet.named_parameters())[name]
    assert torch.equal(loaded, reference.half().float())
    assert model.fingerprint != base.fingerprint


def test_missing_files_are_all_listed_in_one_error(sd_copy: Path) -> None:
    (sd_copy / UNET_WEIGHTS).unlink()
    (sd_copy / "vae" / "config.json").unlink()
    (sd_copy / "tokenizer" / "merges.txt").unlink()
    message = _error(sd_copy)
    assert "incomplete" in message
    assert "sd/unet/diffusion_pytorch_model.safetensors" in message
    assert "sd/vae/config.json" in message
    assert "sd/tokenizer/vocab.json and merges.txt" in message
    assert "sd/text_encoder" not in message  # only what is missing


def test_empty_directory_lists_every_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("empty").mkdir()
    message = _error("empty")
    for item in ("empty/unet/config.json", UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS, "tokenizer"):
        assert item in message


def test_pickle_only_weights_are_refused(sd_copy: Path) -> None:
    (sd_copy / UNET_WEIGHTS).rename(sd_copy / "unet" / "diffusion_pytorch_model.bin")
    message = _error(sd_copy)
    assert "pickle" in message
    assert "sd/unet/diffusion_pytorch_model.bin" in message
    assert "convert them to safetensors" in message


def test_missing_vae_names_vae_directory(sd_copy: Path, tiny_model_dir: Path) -> None:
    shutil.rmtree(sd_copy / "vae")
    message = _error(sd_copy)
    assert "sd/vae/config.json" in message
    assert "noVAE" in message and "vae_directory" in message
    # A VAE folder, or a pipeline that has one, completes it.
    shutil.copytree(tiny_model_dir / "stable-diffusion" / "vae", "vae-ft")
    assert load_base_model(sd_copy, vae_directory="vae-ft").vae.config["latent_channels"] == 4
    assert load_base_model(sd_copy, vae_directory=tiny_model_dir / "stable-diffusion")
    message = _error(sd_copy, vae_directory="nowhere")
    assert "vae_directory 'nowhere' does not exist" in message


def test_sharded_weights_with_a_missing_shard(sd_copy: Path) -> None:
    unet = sd_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(
        unet / "diffusion_pytorch_model-00001-of-00002.safetensors"
    )
    index = {
        "metadata": {},
        "weight_map": {
            "conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "conv_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
        },
    }
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    message = _error(sd_copy)
    assert "sd/unet/diffusion_pytorch_model-00002-of-00002.safetensors" in message


def test_blip_directory_is_named(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_model_dir)
    message = _error("blip")
    assert "'blip' is a BLIP captioning model directory" in message
    assert "Stable Diffusion 1.x" in message


def test_a_single_component_directory_is_named(sd_copy: Path) -> None:
    message = _error(sd_copy / "unet")
    assert "single UNet2DConditionModel component directory" in message


def test_sd2_is_named(sd_copy: Path) -> None:
    _edit_json(
        sd_copy / "unet" / "config.json",
        lambda c: c.update(cross_attention_dim=1024, use_linear_projection=True),
    )
    _edit_json(sd_copy / "text_encoder" / "config.json", lambda c: c.update(hidden_size=1024))
    assert "Stable Diffusion 2.x" in _error(sd_copy)


def test_v_prediction_is_named(sd_copy: Path) -> None:
    _edit_json(
        sd_copy / "scheduler" / "scheduler_config.json",
        lambda c: c.update(prediction_type="v_prediction"),
    )
    assert "v-prediction" in _error(sd_copy)


def test_sdxl_is_named(sd_copy: Path) -> None:
    _edit_json(
        sd_copy / "model_index.json", lambda c: c.update(_class_name="StableDiffusionXLPipeline")
    )
    assert "StableDiffusionXLPipeline directory (Stable Diffusion XL)" in _error(sd_copy)


def test_other_block_layout_is_named(sd_copy: Path) -> None:
    def three_levels(c: dict) -> None:
        c["down_block_types"] = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        c["up_block_types"] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

    _edit_json(sd_copy / "unet" / "config.json", three_levels)
    message = _error(sd_copy)
    assert "a UNet with blocks down=['DownBlock2D'" in message
    assert "CrossAttnDownBlock2D x3 + DownBlock2D" in message  # what is accepted


def test_inpainting_unet_and_width_mismatch_are_named(sd_copy: Path) -> None:
    _edit_json(sd_copy / "unet" / "config.json", lambda c: c.update(in_channels=9))
    _edit_json(sd_copy / "text_encoder" / "config.json", lambda c: c.update(hidden_size=48))
    message = _error(sd_copy)
    assert "9 input / 4 output channels, not 4 (an inpainting model)" in message
    assert "text encoder is 48 wide but whose UNet cross-attention expects 32" in message


def test_not_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("model.safetensors").write_bytes(b"")
    assert "single-file checkpoints are not accepted" in _error("model.safetensors")
    assert "'missing' does not exist" in _error("missing")


def test_corrupt_weights_give_a_model_directory_error(sd_copy: Path) -> None:
    (sd_copy / VAE_WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    message = _error(sd_copy)
    assert "could not load sd/vae" in message
