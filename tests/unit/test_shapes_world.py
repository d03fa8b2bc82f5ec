"""The toy world's renderer, splits, edit cases, tokenizer and quality rules (no model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from forgedit.zoo.shapes import world
from forgedit.zoo.shapes.quality import edit_outcome, unchanged_mask


def test_a_scene_renders_its_exact_colours() -> None:
    scene = world.Scene("purple", "square", "gray", cx=0.5, cy=0.5, size=0.5, rotation=0.0)
    pixels = np.asarray(scene.render())
    assert pixels.shape == (world.NATIVE_SIZE, world.NATIVE_SIZE, 3)
    assert tuple(pixels[32, 32]) == world.COLOURS["purple"]
    assert tuple(pixels[1, 1]) == world.BACKGROUNDS["gray"]
    # A square of side 0.5 covers a quarter of the image (edges anti-aliased).
    inside = (np.abs(pixels.astype(int) - world.COLOURS["purple"]).sum(axis=2) == 0).mean()
    assert 0.2 < inside <= 0.25


def test_scenes_are_reproducible_and_the_splits_never_meet() -> None:
    assert world.scene("train", 7) == world.scene("train", 7)
    train = {world.scene("train", i) for i in range(200)}
    heldout = {world.scene("heldout", i) for i in range(200)}
    assert not train & heldout
    cases = {world.edit_case(k, i).source for k in world.EDIT_KINDS for i in range(20)}
    assert not cases & train


def test_random_scenes_cover_the_world_and_stay_inside() -> None:
    scenes = list(world.scenes("heldout", 300))
    assert {s.colour for s in scenes} == set(world.COLOURS)
    assert {s.shape for s in scenes} == set(world.SHAPES)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    for s in scenes:
        assert world.SIZE_RANGE[0] <= s.size <= world.SIZE_RANGE[1]
        border = np.asarray(s.render())[[0, -1]].reshape(-1, 3)
        assert np.abs(border.astype(int) - world.BACKGROUNDS[s.background]).max() <= 2


def test_bad_scenes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        world.Scene("pink", "circle", "white")
    with pytest.raises(ValueError, match="fully inside"):
        world.Scene("red", "circle", "white", cx=0.05, cy=0.5, size=0.5)
    with pytest.raises(ValueError, match="size"):
        world.Scene("red", "circle", "white", size=0.8)


def test_captions_and_blip_captions() -> None:
    scene = world.Scene("orange", "triangle", "black")
    assert scene.caption == "a photo of a orange triangle on a black background"
    assert scene.blip_caption == "a orange triangle on a black background"
    assert len(set(world.all_captions())) == 54


@pytest.mark.parametrize("kind", world.EDIT_KINDS)
def test_an_edit_case_changes_exactly_its_attribute(kind: str) -> None:
    for i in range(10):
        case = world.edit_case(kind, i)  # type: ignore[arg-type]
        changed = [
            f
            for f in ("colour", "shape", "background")
            if getattr(case.source, f) != getattr(case.target, f)
        ]
        assert changed == [kind]
        assert case.target_prompt.startswith("A photo of a ")


def test_the_unchanged_region_is_what_the_edit_must_not_touch() -> None:
    colour = dataclasses.replace(world.edit_case("colour", 0))
    mask = unchanged_mask(colour)
    src = np.asarray(colour.source.render())
    shape_pixels = (src == colour.source.render().getpixel((0, 0))).all(axis=2)
    assert mask.any() and not (mask & ~shape_pixels).any()  # the shape itself is excluded
    background = world.edit_case("background", 0)
    assert not unchanged_mask(background)[0, 0]  # the background changes


def test_edit_outcome_rewards_the_ideal_edit_and_not_the_input(shapes_clip: object) -> None:
    case = world.edit_case("colour", 3)
    ideal = edit_outcome(shapes_clip, case.target.render(), case)  # type: ignore[arg-type]
    unchanged = edit_outcome(shapes_clip, case.source.render(), case)  # type: ignore[arg-type]
    assert ideal.success and ideal.preservation_error == 0.0
    assert not unchanged.success and not unchanged.prefers_target


def test_the_toy_tokenizer_splits_captions_as_sds_tokenizer_does() -> None:
    """The shipped tokenizer is SD's BPE restricted to the world's words: same tokens."""
    from transformers import CLIPTokenizer

    from forgedit.zoo.shapes import default_model_dir
    from forgedit.zoo.tiny import clip_tokenizer

    toy = CLIPTokenizer.from_pretrained(default_model_dir() / "stable-diffusion" / "tokenizer")
    sd = clip_tokenizer()
    for text in [*world.all_captions(), "A photo of a blue circle on a white background."]:
        assert toy.tokenize(text) == sd.tokenize(text)
    assert len(toy) < 700
    # Words outside the world fall back to smaller pieces, never to an unknown token.
    ids = toy("a zebra")["input_ids"]
    assert toy.unk_token_id not in ids[1:-1] or toy.unk_token_id == toy.eos_token_id
    assert len(ids) > 4
