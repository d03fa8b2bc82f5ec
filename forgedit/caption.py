"""BLIP captioning and the source-prompt rule (FORGEDIT_SPEC.md §2).

Forgedit initialises the trainable source embedding from a caption of the input image: BLIP
(``Salesforce/blip-image-captioning-base``) run unconditionally on the *original, un-resized*
image, decoded greedily. The caption is then turned into the source prompt by one rule:
``'A photo of ' + caption`` when the target prompt contains ``'A photo of '``, else the caption.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from forgedit.errors import ModelDirectoryError
from forgedit.models import (
    CONVERT_HINT,
    WeightFiles,
    display_path,
    find_safetensors,
    quiet_loading,
    read_json,
    scrub_paths,
)

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

PHOTO_PREFIX = "A photo of "
# The original calls generate() with no arguments; under transformers 4.38 that meant greedy
# decoding and at most 20 tokens including BOS. transformers 5 would allow 21 (spec §15.5).
GENERATION = {"do_sample": False, "num_beams": 1, "max_length": 20}
ACCEPTED = (
    "accepted: a BLIP captioning model in the Salesforce/blip-image-captioning-base layout "
    "(config.json for BlipForConditionalGeneration, model.safetensors, "
    "preprocessor_config.json, tokenizer_config.json and vocab.txt or tokenizer.json)"
)


def source_prompt_for(caption: str, target_prompt: str) -> str:
    """The source prompt for a caption: ``'A photo of ' + caption`` if ``target_prompt``
    contains the exact, case-sensitive substring ``'A photo of '``, else ``caption``."""
    return PHOTO_PREFIX + caption if PHOTO_PREFIX in target_prompt else caption


class Captioner:
    """A BLIP image captioner (processor + ``BlipForConditionalGeneration``), fp32, eval mode.

    Build it with ``Captioner.load``. ``caption`` is deterministic: the same image gives the
    same caption on the same machine. Not thread-safe (one caption at a time).
    """

    def __init__(
        self,
        processor: BlipProcessor,
        model: BlipForConditionalGeneration,
        device: torch.device,
    ) -> None:
        self.processor = processor
        self.model = model
        self.device = device

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> Captioner:
        """Load a BLIP captioner from a local directory, offline, fp32.

        Raises ``ModelDirectoryError`` (one per call) if the directory is missing or incomplete
        (every missing file listed), holds weights only in a pickle format, is another kind of
        model (a Stable Diffusion pipeline, BLIP-2, BLIP for question answering, ...), or a
        file cannot be read.
        """
        root, shown = Path(directory), os.fspath(directory)
        weights = check_blip_directory(root, shown)
        from transformers import BlipForConditionalGeneration, BlipProcessor

        dev = torch.device(device)
        try:
            with quiet_loading():
                processor = BlipProcessor.from_pretrained(root, local_files_only=True)
                model = BlipForConditionalGeneration.from_pretrained(
                    root,
                    local_files_only=True,
                    use_safetensors=True,
                    variant=weights.variant,
                    dtype=torch.float32,
                )
        except Exception as err:  # corrupt or truncated files surface as many exception types
            detail = scrub_paths(str(err), [(root, shown)])
            raise ModelDirectoryError(
                f"could not load the BLIP captioner from {shown!r}: {type(err).__name__}: {detail}"
            ) from err
        module: torch.nn.Module = model  # (transformers types ``to`` as if unbound)
        module.to(dev)
        model.eval()
        model.requires_grad_(False)
        return cls(processor, model, dev)

    def caption(self, image: Image.Image) -> str:
        """Caption ``image`` as the original does: unconditional, on the un-resized RGB image
        (the processor resizes to 384×384 itself), greedy, at most 20 tokens, lower case."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        inputs = self.processor(images=rgb, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                do_sample=GENERATION["do_sample"],
                num_beams=GENERATION["num_beams"],
                max_length=GENERATION["max_length"],
            )
        return str(self.processor.decode(out[0], skip_special_tokens=True)).strip()


def check_blip_directory(root: Path, shown: str) -> WeightFiles:
    """Check a BLIP directory without reading weights; raise one ``ModelDirectoryError``."""
    if not root.is_dir():
        state = "does not exist" if not root.exists() else "is not a directory"
        raise ModelDirectoryError(f"BLIP directory {shown!r} {state}; {ACCEPTED}")
    if (root / "model_index.json").is_file() or (root / "unet").is_dir():
        raise ModelDirectoryError(
            f"{shown!r} is a diffusers pipeline (Stable Diffusion) directory, not a BLIP "
            f"captioner (pass it as the base model); {ACCEPTED}"
        )
    config_path = root / "config.json"
    if config_path.is_file():
        config = read_json(config_path, display_path(shown, "config.json"))
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "blip":
            raise ModelDirectoryError(
                f"{shown!r} is a {model_type or config.get('_class_name') or 'unknown'} model "
                f"directory, not a BLIP captioner; {ACCEPTED}"
            )
        if architectures and "BlipForConditionalGeneration" not in architectures:
            raise ModelDirectoryError(
                f"{shown!r} is a {', '.join(map(str, architectures))} model, not the "
                f"captioning head BlipForConditionalGeneration; {ACCEPTED}"
            )

    missing: list[str] = []
    pickled: list[str] = []
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if not (root / name).is_file():
            missing.append(display_path(shown, name))
    if not any((root / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        missing.append(f"{display_path(shown, 'vocab.txt')} (or tokenizer.json)")
    weights = find_safetensors(root, "model", shown, missing, pickled)
    if missing or pickled:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if pickled:
            parts.append(f"weights only in a pickle format ({', '.join(pickled)}): {CONVERT_HINT}")
        raise ModelDirectoryError(
            f"BLIP directory {shown!r} is incomplete: {'; '.join(parts)}. "
            f"{ACCEPTED[0].upper()}{ACCEPTED[1:]}"
        )
    assert weights is not None
    return weights
