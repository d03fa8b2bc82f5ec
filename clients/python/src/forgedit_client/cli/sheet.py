"""The labelled contact sheet: the input photo, then every result, in a grid.

Each tile is a thumbnail with a caption under it (``input``, ``encoderkv γ=0.6 seed=1``, …).
Pillow's bundled font lacks Greek letters on some builds; captions then spell them out
(``gamma=0.6``) instead of drawing empty boxes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

TILE = 256  # longest side of a thumbnail, pixels
CAPTION_LINES = 2
FONT_SIZE = 13
PAD = 8
_GREEK = {"γ": "gamma", "β": "beta", "α": "alpha"}
_PRIVATE_USE = "\ue000"  # never in a font: renders as the font's "missing glyph" box


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: bitmap font, no size
        return ImageFont.load_default()


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` with Greek letters spelled out when ``font`` has no glyph for them."""
    missing = bytes(font.getmask(_PRIVATE_USE))
    for letter, name in _GREEK.items():
        if letter in text and bytes(font.getmask(letter)) == missing:
            text = text.replace(letter, name)
    return text


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > CAPTION_LINES:
        lines = [*lines[: CAPTION_LINES - 1], lines[CAPTION_LINES - 1] + " …"]
    return lines


def _fit(image: Image.Image) -> Image.Image:
    """Scale to a ``TILE``-pixel longest side, up or down: small results (a 64×64 test model)
    stay legible next to a large input. Upscaling uses nearest neighbour so pixels stay
    honest instead of being smoothed into detail that is not there."""
    scale = TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(size, method)


def contact_sheet(tiles: Sequence[tuple[bytes, str]], *, columns: int | None = None) -> bytes:
    """A PNG grid of ``(encoded image bytes, caption)`` tiles, in the given order.

    Images of any format Pillow reads are scaled to ``TILE`` pixels (longest side);
    ``columns`` defaults to a near-square grid (at most 8 wide). Raises ``ValueError`` for no
    tiles and ``PIL.UnidentifiedImageError`` for bytes that are not an image.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one image")
    font = _font()
    columns = columns or min(8, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / columns)
    line_height = FONT_SIZE + 4
    cell_w = TILE + 2 * PAD
    cell_h = TILE + 2 * PAD + CAPTION_LINES * line_height
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (data, caption) in enumerate(tiles):
        with Image.open(io.BytesIO(data)) as img:
            thumb = _fit(img.convert("RGB"))
        x0 = (i % columns) * cell_w + PAD
        y0 = (i // columns) * cell_h + PAD
        sheet.paste(thumb, (x0 + (TILE - thumb.width) // 2, y0 + (TILE - thumb.height) // 2))
        for j, line in enumerate(_wrap(_drawable(caption, font), font, TILE)):
            draw.text((x0, y0 + TILE + 2 + j * line_height), line, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
