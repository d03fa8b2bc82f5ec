"""BLIP captioning (spec §2): deterministic, on the original image, pinned generation
arguments; the 'A photo of ' rule; and every way a BLIP directory can be wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from forgedit.caption import Captioner, source_prompt_for
from forgedit.errors import ModelDirectoryError


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return Captioner.load(tiny_model_dir / "blip")


@pytest.fixture
def blip_copy(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(tiny_model_dir / "blip", tmp_path / "blip")
    monkeypatch.chdir(tmp_path)
    return Path("blip")


def _image(seed: int, size: tuple[int, int] = (300, 200), mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _error(directory: str | os.PathLike[str]) -> str:
    with pytest.raises(ModelDirectoryError) as err:
        Captioner.load(directory)
    message = str(err.value)
    assert os.getcwd() not in message
    return message


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("A photo of a cat wearing a hat.", "A photo of a dog on a couch"),
        ("A goat hits a cat.", "a dog on a couch"),
        ("a photo of a sitting dog", "a dog on a couch"),  # case-sensitive
        ("A Photo of a cat", "a dog on a couch"),
        ("A photo ofa cat", "a dog on a couch"),  # the trailing space is part of it
        ("Children drawing of A photo of a bird", "A photo of a dog on a couch"),  # anywhere
    ],
)
def test_source_prompt_rule(target: str, expected: str) -> None:
    assert source_prompt_for("a dog on a couch", target) == expected


def test_caption_is_deterministic_across_loads(captioner: Captioner, tiny_model_dir: Path) -> None:
    images = [_image(seed) for seed in range(3)]
    first = [captioner.caption(image) for image in images]
    again = Captioner.load(tiny_model_dir / "blip")
    assert [again.caption(image) for image in images] == first
    vocab = set((tiny_model_dir / "blip" / "vocab.txt").read_text().split())
    for caption in first:
        assert caption and caption == caption.strip() and caption == caption.lower()
        assert set(caption.split()) <= vocab
        assert "[" not in caption  # special tokens are skipped
    assert len(set(first)) > 1  # the tiny captioner does look at the image


def test_caption_sees_the_original_image_with_pinned_generation(
    captioner: Captioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    processor, generate = captioner.processor, captioner.model.generate

    class SpyProcessor:
        def __call__(self, **kwargs: Any) -> Any:
            seen["image"] = kwargs["images"]
            return processor(**kwargs)

        def decode(self, *args: Any, **kwargs: Any) -> Any:
            return processor.decode(*args, **kwargs)

    def spy_generate(**kwargs: Any) -> Any:
        seen["pixels"] = tuple(kwargs["pixel_values"].shape)
        seen["generation"] = {k: v for k, v in kwargs.items() if k != "pixel_values"}
        out = generate(**kwargs)
        seen["tokens"] = out.shape[-1]
        return out

    monkeypatch.setattr(captioner, "processor", SpyProcessor())
    monkeypatch.setattr(captioner.model, "generate", spy_generate)
    image = _image(7, size=(517, 301))
    captioner.caption(image)
    assert seen["image"].size == (517, 301)  # not resized by us
    assert seen["pixels"] == (1, 3, 384, 384)  # BLIP's own 384×384 resize
    assert seen["generation"] == {"do_sample": False, "num_beams": 1, "max_length": 20}
    assert seen["tokens"] <= 20


def test_non_rgb_images_are_converted(captioner: Captioner) -> None:
    rgb = _image(3)
    assert captioner.caption(rgb.convert("RGBA")) == captioner.caption(rgb)
    assert captioner.caption(rgb.convert("L"))


def test_missing_files_are_listed(blip_copy: Path) -> None:
    (blip_copy / "model.safetensors").unlink()
    (blip_copy / "preprocessor_config.json").unlink()
    (blip_copy / "vocab.txt").unlink()
    message = _error(blip_copy)
    assert "incomplete" in message
    for item in ("blip/model.safetensors", "blip/preprocessor_config.json", "blip/vocab.txt"):
        assert item in message


def test_pickle_only_weights_are_refused(blip_copy: Path) -> None:
    (blip_copy / "model.safetensors").rename(blip_copy / "pytorch_model.bin")
    message = _error(blip_copy)
    assert "pickle" in message and "blip/pytorch_model.bin" in message


def test_wrong_kinds_are_named(blip_copy: Path, tiny_model_dir: Path) -> None:
    shutil.copytree(tiny_model_dir / "stable-diffusion", "sd")
    assert "is a diffusers pipeline (Stable Diffusion) directory" in _error("sd")

    config = json.loads((blip_copy / "config.json").read_text())
    config["architectures"] = ["BlipForQuestionAnswering"]
    (blip_copy / "config.json").write_text(json.dumps(config))
    assert "BlipForQuestionAnswering model, not the captioning head" in _error(blip_copy)

    config["model_type"] = "blip-2"
    (blip_copy / "config.json").write_text(json.dumps(config))
    assert "'blip' is a blip-2 model directory, not a BLIP captioner" in _error(blip_copy)

    assert "'nowhere' does not exist" in _error("nowhere")


def test_corrupt_weights_give_a_model_directory_error(blip_copy: Path) -> None:
    (blip_copy / "model.safetensors").write_bytes(b"not safetensors")
    assert "could not load the BLIP captioner from 'blip'" in _error(blip_copy)
