"""The toy world: one coloured shape on a plain background, rendered exactly from a few numbers.

Everything a held-out case needs is here, so anyone can render the same images:

- a shape, ``circle``, ``square`` or ``triangle`` (equilateral), filled with one of six colours,
  on one of three plain backgrounds (the RGB values below);
- its size is 30–60 % of the image side (a circle's diameter, a square's or a triangle's side);
  squares and triangles are rotated by any angle; the centre is anywhere that keeps the whole
  shape inside the image;
- its caption is ``a photo of a {colour} {shape} on a {background} background``.

Images are drawn at 4× the size and averaged down (anti-aliased edges), with PIL only, so a
``Scene`` gives the same pixels on any machine. Random scenes come from
``numpy.random.default_rng([split id, index])``: the ``train`` and ``heldout`` splits draw from
seed sequences that never meet, so held-out images are never seen in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_RANGE = (0.30, 0.60)  # of the image side
NATIVE_SIZE = 64  # px: the toy pipeline's native resolution (8×8 latents)
CAPTION_PREFIX = "a photo of "
_SUPERSAMPLE = 4
_MARGIN_PX = 1.0  # the shape keeps this far from the border

Split = Literal["train", "heldout"]
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
EditKind = Literal["colour", "shape", "background"]
EDIT_KINDS: tuple[EditKind, ...] = ("colour", "shape", "background")


@dataclass(frozen=True)
class Scene:
    """One image of the world. ``cx``, ``cy`` and ``size`` are fractions of the side;
    ``rotation`` is in degrees (ignored for circles)."""

    colour: str
    shape: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    size: float = 0.45
    rotation: float = 0.0

    def __post_init__(self) -> None:
        for value, accepted, what in (
            (self.colour, tuple(COLOURS), "colour"),
            (self.shape, SHAPES, "shape"),
            (self.background, tuple(BACKGROUNDS), "background"),
        ):
            if value not in accepted:
                raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
        if not SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]:
            raise ValueError(f"size must be in {SIZE_RANGE} of the side, got {self.size}")
        lo_x, hi_x, lo_y, hi_y = _centre_ranges(self.shape, self.size, self.rotation, 1.0)
        if not (lo_x - 1e-9 <= self.cx <= hi_x + 1e-9 and lo_y - 1e-9 <= self.cy <= hi_y + 1e-9):
            raise ValueError("the shape must lie fully inside the image; move its centre")

    @property
    def caption(self) -> str:
        """``a photo of a {colour} {shape} on a {background} background``."""
        return caption(self.colour, self.shape, self.background)

    @property
    def blip_caption(self) -> str:
        """What the toy BLIP says: the caption without ``a photo of `` (as real BLIP captions
        read, "a cat sitting on a couch"). The engine's rule (``forgedit.caption``) puts
        ``A photo of `` back when the target prompt has it, giving ``caption`` exactly."""
        return self.caption.removeprefix(CAPTION_PREFIX)

    def render(self, size: int = NATIVE_SIZE) -> Image.Image:
        """The scene as a ``size``×``size`` RGB image."""
        big = size * _SUPERSAMPLE
        image = Image.new("RGB", (big, big), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        fill = COLOURS[self.colour]
        cx, cy = self.cx * big, self.cy * big
        if self.shape == "circle":
            r = self.size * big / 2
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            points = _vertices(self.shape, self.size * big, self.rotation)
            draw.polygon([(cx + x, cy + y) for x, y in points], fill=fill)
        return image.resize((size, size), Image.Resampling.BOX)

    def with_attribute(self, kind: EditKind, value: str) -> Scene:
        """The same scene with its colour, shape or background replaced (the geometry kept;
        a new shape is re-centred if it would leave the image)."""
        if kind == "colour":
            return replace(self, colour=value)
        if kind == "background":
            return replace(self, background=value)
        lo_x, hi_x, lo_y, hi_y = _centre_ranges(value, self.size, self.rotation, 1.0)
        return replace(
            self,
            shape=value,
            cx=min(max(self.cx, lo_x), hi_x),
            cy=min(max(self.cy, lo_y), hi_y),
        )


def caption(colour: str, shape: str, background: str) -> str:
    return f"{CAPTION_PREFIX}a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """Every caption of the world (6 × 3 × 3 = 54), in a fixed order."""
    return [caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene with every attribute drawn uniformly (geometry as the module doc says)."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    background = str(rng.choice(list(BACKGROUNDS)))
    size = float(rng.uniform(*SIZE_RANGE))
    period = {"circle": 0.0, "square": 90.0, "triangle": 120.0}[shape]
    rotation = float(rng.uniform(0.0, period)) if period else 0.0
    lo_x, hi_x, lo_y, hi_y = _centre_ranges(shape, size, rotation, 1.0)
    return Scene(
        colour=colour,
        shape=shape,
        background=background,
        cx=float(rng.uniform(lo_x, hi_x)),
        cy=float(rng.uniform(lo_y, hi_y)),
        size=size,
        rotation=rotation,
    )


def split_rng(split: Split, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split`` (seed sequence ``[split id, index]``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return np.random.default_rng([SPLITS[split], index])


def scene(split: Split, index: int) -> Scene:
    """Image ``index`` of ``split``: the same scene for the same pair, on any machine."""
    return random_scene(split_rng(split, index))


def scenes(split: Split, count: int, start: int = 0) -> Iterator[Scene]:
    for index in range(start, start + count):
        yield scene(split, index)


@dataclass(frozen=True)
class EditCase:
    """A held-out edit: the source scene, what changes, and the scene the edit should give."""

    index: int
    kind: EditKind
    source: Scene
    target: Scene

    @property
    def source_prompt(self) -> str:
        return _prompt_case(self.source.caption)

    @property
    def target_prompt(self) -> str:
        return _prompt_case(self.target.caption)


def edit_case(kind: EditKind, index: int) -> EditCase:
    """Held-out edit ``index`` of ``kind``: a held-out scene (its own seed sequence,
    ``[1, 1000 + kind number, index]``, never a training one) and a different value of the
    attribute, drawn uniformly."""
    rng = np.random.default_rng([SPLITS["heldout"], 1000 + EDIT_KINDS.index(kind), index])
    source = random_scene(rng)
    current = {"colour": source.colour, "shape": source.shape, "background": source.background}
    choices = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}
    value = str(rng.choice([v for v in choices[kind] if v != current[kind]]))
    return EditCase(index, kind, source, source.with_attribute(kind, value))


def _prompt_case(text: str) -> str:
    """Captions as prompts start with "A photo of " (the engine's caption rule keys on it)."""
    return text[0].upper() + text[1:]


def _vertices(shape: str, size: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices around the origin of a square (side ``size``) or an equilateral triangle
    (side ``size``, centred on its centroid), rotated by ``rotation`` degrees."""
    if shape == "square":
        radius, start, count = size / math.sqrt(2), 45.0, 4
    elif shape == "triangle":
        radius, start, count = size / math.sqrt(3), -90.0, 3
    else:
        raise ValueError(f"{shape!r} has no vertices")
    step = 360.0 / count
    return [
        (
            radius * math.cos(math.radians(start + rotation + k * step)),
            radius * math.sin(math.radians(start + rotation + k * step)),
        )
        for k in range(count)
    ]


def _centre_ranges(
    shape: str, size: float, rotation: float, side: float
) -> tuple[float, float, float, float]:
    """(min x, max x, min y, max y) of a centre that keeps the shape inside the image."""
    margin = _MARGIN_PX / NATIVE_SIZE * side
    if shape == "circle":
        r = size * side / 2
        return r + margin, side - r - margin, r + margin, side - r - margin
    points = _vertices(shape, size * side, rotation)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (
        margin - min(xs),
        side - margin - max(xs),
        margin - min(ys),
        side - margin - max(ys),
    )
