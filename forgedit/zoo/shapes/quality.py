"""What counts as right in the toy world: one owner for the rules the benchmarks and the CI
quality tests apply.

- **Caption**: BLIP's greedy caption equals ``Scene.blip_caption`` exactly, so the engine's
  source-prompt rule turns it into the scene's caption.
- **Text-to-image**: an image generated from a caption is right when the toy CLIP's top-1
  among all 54 captions is that caption.
- **Edit success**: the toy CLIP scores the output higher for the target caption than for
  the source caption, *and* the part the edit should not touch stays close: over the pixels
  where the source and target renders agree (eroded by ``ERODE_PX``, so anti-aliased edges
  do not count), the mean absolute difference between the output and the input is at most
  ``PRESERVATION_THRESHOLD`` (on a 0–1 scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from forgedit.zoo.shapes import world

if TYPE_CHECKING:
    from PIL import Image

    from forgedit.eval.scorers import ClipScorer

PRESERVATION_THRESHOLD = 0.10
ERODE_PX = 2


def caption_correct(caption: str, scene: world.Scene) -> bool:
    return caption == scene.blip_caption


def top1_caption(clip: ClipScorer, image: Image.Image) -> str:
    """The toy CLIP's best caption for ``image`` among all of the world's captions."""
    captions = world.all_captions()
    scores = clip.rank(clip.image_embedding(image), captions)
    return captions[int(np.argmax(scores))]


def unchanged_mask(case: world.EditCase, size: int = world.NATIVE_SIZE) -> np.ndarray:
    """[H, W] bool: where the source and target renders are equal, eroded by ``ERODE_PX``."""
    source = np.asarray(case.source.render(size), dtype=np.int16)
    target = np.asarray(case.target.render(size), dtype=np.int16)
    same = np.abs(source - target).max(axis=2) == 0
    for _ in range(ERODE_PX):  # 3×3 erosion
        padded = np.pad(same, 1, constant_values=False)
        same = np.logical_and.reduce(
            [
                padded[1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            ]
        )
    return same


@dataclass(frozen=True)
class EditOutcome:
    target_score: float
    source_score: float
    preservation_error: float  # mean |output - input| over the unchanged region, 0-1 scale

    @property
    def prefers_target(self) -> bool:
        return self.target_score > self.source_score

    @property
    def preserved(self) -> bool:
        return self.preservation_error <= PRESERVATION_THRESHOLD

    @property
    def success(self) -> bool:
        return self.prefers_target and self.preserved

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_score": self.target_score,
            "source_score": self.source_score,
            "preservation_error": self.preservation_error,
            "prefers_target": self.prefers_target,
            "preserved": self.preserved,
            "success": self.success,
        }


def edit_outcome(clip: ClipScorer, output: Image.Image, case: world.EditCase) -> EditOutcome:
    """Score one edited image of ``case`` by the module's rule."""
    size = output.size[0]
    embedding = clip.image_embedding(output)
    mask = unchanged_mask(case, size)
    out = np.asarray(output.convert("RGB"), dtype=np.float32) / 255.0
    source = np.asarray(case.source.render(size), dtype=np.float32) / 255.0
    error = float(np.abs(out - source).mean(axis=2)[mask].mean()) if mask.any() else 0.0
    return EditOutcome(
        target_score=clip.score(embedding, case.target_prompt),
        source_score=clip.score(embedding, case.source_prompt),
        preservation_error=error,
    )
