"""Images in and out: safe decoding of untrusted input, the original's preprocessing, the
original's float → uint8 conversion, deterministic PNG (or WebP/JPEG) bytes, atomic files, a
contact sheet,
and what an image is called (its contact-sheet label and its file name).

Decoding is the one place where bytes from outside meet a C parser, so ``load_image`` checks,
in this order and before any pixel is decoded: that there are bytes at all, that there are not
too many, that they are an image of an accepted format (by content, not by file name), and
that the header does not claim more pixels than we accept (a decompression bomb). Only then
are the pixels decoded, and a truncated or corrupt stream is an error, never half an image.
Running out of memory is not the image's fault: a ``MemoryError`` goes through as itself
(the server answers RESOURCE_EXHAUSTED), never as "corrupt".
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from forgedit.config import ImageSpec, OutputConfig, check_resolution
from forgedit.durable import write_bytes_atomic
from forgedit.errors import InvalidImageError

MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 50 * MIB
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

# Pillow names some container variants separately; they are the same format to a user.
# MPO is a JPEG with extra frames (many phone cameras write it); frame 0 is the photo.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# A truncated stream must be an error, never a silently padded image. Nothing in this project
# sets this Pillow flag; load_image re-asserts it because it is process-wide state.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    """What ``load_image`` accepts.

    ``max_bytes``: size of the encoded file. ``max_pixels``: width × height as claimed by the
    header, checked before decoding. ``formats``: Pillow format names, detected from content.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or not self.formats:
            raise ValueError("image limits must be positive and list at least one format")
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow reads {sorted(Image.OPEN)}")

    @property
    def accepted(self) -> str:
        return ", ".join(self.formats)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded input image.

    ``image`` is RGB, upright (EXIF orientation applied), at its stored resolution: this is the
    "original" that BLIP captions and that ``preprocess`` resizes for training. ``width`` and
    ``height`` are its size (after the EXIF rotation). ``sha256`` is of the raw encoded bytes,
    so the same file always has the same identity. ``format`` is the detected format
    (e.g. "JPEG" for a JPEG named ``.png``).
    """

    image: Image.Image
    sha256: str
    format: str
    width: int
    height: int
    num_bytes: int


def load_image(
    source: str | os.PathLike[str] | bytes, *, limits: ImageLimits = ImageLimits()
) -> LoadedImage:
    """Read, check and decode one image from a file path or from its bytes.

    Raises ``InvalidImageError`` (one sentence naming the problem and what is accepted) when
    the file is missing or unreadable, empty, larger than ``limits.max_bytes``, not an image,
    of a format not in ``limits.formats``, claims more than ``limits.max_pixels`` pixels
    (refused from the header, before decoding), or is truncated or corrupt; ``MemoryError``
    when there is not enough memory to decode it. Multi-frame images
    (animated WEBP/PNG, MPO) give their first frame. Error messages echo a path exactly as the
    caller gave it and nothing else of the file system.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        name = "the image"
        if len(data) > limits.max_bytes:
            raise InvalidImageError(_too_many_bytes(name, len(data), limits))
    else:
        data, name = _read_file(source, limits)
    if not data:
        raise InvalidImageError(f"{name} is empty (0 bytes); expected a {limits.accepted} image")

    sha256 = hashlib.sha256(data).hexdigest()
    image = _open_checked(data, name, limits)
    fmt = _FORMAT_ALIASES.get(str(image.format), str(image.format))
    try:
        image.seek(0)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        image.load()
        upright = ImageOps.exif_transpose(image) or image
        rgb = upright.convert("RGB")
    except MemoryError:
        raise  # the machine's state, not the image's: the caller decides (see the docstring)
    except Exception as e:  # Pillow raises many kinds on malformed input; all mean "corrupt"
        raise InvalidImageError(
            f"{name} could not be decoded: it is truncated or corrupt ({_pil_reason(e)}); "
            f"expected a complete {limits.accepted} image"
        ) from None
    finally:
        image.close()
    return LoadedImage(rgb, sha256, fmt, rgb.width, rgb.height, len(data))


def _read_file(path: str | os.PathLike[str], limits: ImageLimits) -> tuple[bytes, str]:
    name = f"image file {os.fspath(path)!r}"
    try:
        if Path(path).is_dir():
            raise InvalidImageError(f"{name} is a directory; expected a {limits.accepted} file")
        size = os.stat(path).st_size
        if size > limits.max_bytes:
            raise InvalidImageError(_too_many_bytes(name, size, limits))
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)  # +1: the file may have grown since stat
    except FileNotFoundError:
        raise InvalidImageError(f"{name} does not exist") from None
    except PermissionError:
        raise InvalidImageError(f"{name} cannot be read (permission denied)") from None
    except OSError as e:
        raise InvalidImageError(
            f"{name} cannot be read ({e.strerror or type(e).__name__})"
        ) from None
    if len(data) > limits.max_bytes:
        raise InvalidImageError(_too_many_bytes(name, len(data), limits))
    return data, name


def _too_many_bytes(name: str, size: int, limits: ImageLimits) -> str:
    return f"{name} is {size / MIB:.1f} MiB; at most {limits.max_bytes / MIB:g} MiB is accepted"


def _open_checked(data: bytes, name: str, limits: ImageLimits) -> ImageFile.ImageFile:
    """Identify the format from content and check the header's size. No pixel is decoded."""
    # Parse with the accepted formats' plugins first: untrusted bytes meet as few parsers as
    # possible. Only to name a refused format do we let every plugin look at the header.
    # (MPO needs no plugin of its own: the JPEG plugin opens it.)
    #
    # No warnings.catch_warnings() here: it mutates process-wide filters and is not
    # thread-safe, and the server decodes in several threads. It is not needed either: our
    # pixel limit is checked from the header below, before any decoding, and Pillow's own
    # hard limit raises DecompressionBombError, caught here.
    plugins = list(limits.formats)
    try:
        try:
            image = Image.open(io.BytesIO(data), formats=plugins)
        except UnidentifiedImageError:
            other = _identify_any(data)
            if other:
                raise InvalidImageError(
                    f"{name} is a {other} image; accepted formats: {limits.accepted}"
                ) from None
            raise InvalidImageError(
                f"{name} is not an image Pillow can read; expected a {limits.accepted} image"
            ) from None
    except Image.DecompressionBombError as e:
        # Pillow's own guard fired while reading the header (it runs inside Image.open).
        raise InvalidImageError(
            f"{name} claims too many pixels to decode safely ({_pil_reason(e)}); at most "
            f"{limits.max_pixels:,} pixels (width × height) are accepted"
        ) from None
    except (InvalidImageError, MemoryError):
        raise
    except Exception as e:  # a header parser failing on garbage that looked like a format
        raise InvalidImageError(
            f"{name} has a corrupt header ({_pil_reason(e)}); expected a {limits.accepted} image"
        ) from None
    width, height = image.size
    bomb_limit = Image.MAX_IMAGE_PIXELS  # Pillow's warning threshold, when tighter than ours
    if bomb_limit is not None and bomb_limit < limits.max_pixels and width * height > bomb_limit:
        image.close()
        raise InvalidImageError(
            f"{name} claims too many pixels to decode safely ({width}x{height} = "
            f"{width * height:,} pixels, over Pillow's decompression-bomb limit of "
            f"{bomb_limit:,})"
        )
    if width * height > limits.max_pixels:
        image.close()
        raise InvalidImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels; at most "
            f"{limits.max_pixels:,} pixels (width × height) are accepted"
        )
    if width <= 0 or height <= 0:
        image.close()
        raise InvalidImageError(f"{name} has no pixels ({width}x{height})")
    return image


def _identify_any(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as other:
            return str(other.format)
    except MemoryError:
        raise
    except Exception:
        return None


def _pil_reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text[:200]


# --------------------------------------------------------------------------------------------
# Tensors


def preprocess(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """The training image of spec §1: squash-resize to ``width``×``height`` with PIL BICUBIC
    (no crop, aspect not kept), float32 / 255, HWC → NCHW, then ``2x − 1``.

    Returns a float32 tensor [1, 3, height, width] in [-1, 1]. Raises ``InvalidInputError``
    if a side is not a multiple of 8 in range.

    Deliberate divergence: the original pipeline additionally floors both sides to a multiple
    of 32 and resizes again with LANCZOS. At multiples of 32 (512, 768, the tiny 64) that is a
    no-op and we match bit for bit; for sizes that are multiples of 8 but not of 32 the
    original trains at a smaller size than it samples (spec §9.13), whereas we train at
    exactly the requested size.
    """
    check_resolution(height, width)
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.uint8).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy())
    return 2.0 * tensor - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoded images [N, 3, H, W] in [0, 1] → N RGB PIL images, as diffusers' numpy_to_pil:
    NHWC float numpy, ``(x * 255).round().astype(uint8)``.

    Values are clamped to [0, 1] first: the identity on the decoder's clamped output, and it
    keeps an out-of-range input from wrapping around in uint8.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {list(images.shape)}")
    array = images.detach().to("cpu", torch.float32).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    array = (array * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


# --------------------------------------------------------------------------------------------
# Files


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels: no metadata, no timestamp, fixed compression.

    RGB, RGBA and L are written as they are; other modes are converted to RGB.
    """
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    # A fresh image carries no .info (ICC profile, EXIF, text) that Pillow would copy over.
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def encode_image(image: Image.Image, output: OutputConfig = OutputConfig()) -> bytes:
    """``image`` encoded as ``output`` asks: ``encode_png``, or lossy WebP / baseline JPEG at
    its quality (4:2:0, no metadata). Same pixels and settings, same bytes."""
    if output.format == "png":
        return encode_png(image)
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())
    buffer = io.BytesIO()
    if output.format == "webp":
        clean.save(buffer, format="WEBP", quality=output.lossy_quality, method=4)
    else:
        clean.save(buffer, format="JPEG", quality=output.lossy_quality, optimize=False)
    return buffer.getvalue()


def write_png_atomic(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``encode_png(image)`` to ``path`` atomically (temporary file in the same
    directory, fsync, rename): a reader sees the old file, no file, or the whole new one."""
    return write_bytes_atomic(encode_png(image), path)


# --------------------------------------------------------------------------------------------
# Contact sheet

# At most this many results go on one sheet: beyond it a sheet stops being readable at a glance.
CONTACT_SHEET_MAX_IMAGES = 64
MIN_TILE = 160  # small tiles (a tiny model's 64x64) are upscaled to at least this, NEAREST
_PAD = 8
_FONT_SIZES = (14, 12, 11, 10, 9)
# Pillow's built-in font has no Greek glyphs; DejaVu Sans (in most Linux images) does.
_GREEK = {"γ": "gamma", "β": "beta", "α": "alpha"}


def contact_sheet(
    original: Image.Image,
    results: Sequence[tuple[Image.Image, str]],
    *,
    columns: int | None = None,
) -> Image.Image:
    """The input beside every result in one grid, each tile labelled underneath.

    The first tile is ``original`` labelled "input"; then ``results`` in order, each a
    (image, label) pair such as "encoderkv γ=0.6 seed=1" (``sheet_label``), the first
    ``CONTACT_SHEET_MAX_IMAGES`` of them. Tiles share one cell size: the
    largest result's size, enlarged by a whole factor with NEAREST (crisp pixels) up to at
    least ``MIN_TILE`` px; the input is fitted into the cell keeping its aspect. Labels wrap
    at spaces, and shrink or break inside words when a word is too wide. ``columns`` defaults
    to a near-square grid. Returns an RGB image.
    """
    results = results[:CONTACT_SHEET_MAX_IMAGES]
    tiles = [(original, "input"), *results]
    cell_w, cell_h = _cell_size([im for im, _ in results] or [original])
    ncols = columns or math.ceil(math.sqrt(len(tiles)))
    if ncols < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    ncols = min(ncols, len(tiles))
    nrows = math.ceil(len(tiles) / ncols)

    font, lines = _fit_labels([label for _, label in tiles], cell_w)
    line_h = _line_height(font)
    label_h = max(len(ls) for ls in lines) * line_h + _PAD // 2

    sheet_w = ncols * cell_w + (ncols + 1) * _PAD
    sheet_h = nrows * (cell_h + label_h) + (nrows + 1) * _PAD
    sheet = Image.new("RGB", (sheet_w, sheet_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((image, _), label_lines) in enumerate(zip(tiles, lines, strict=True)):
        row, col = divmod(i, ncols)
        x = _PAD + col * (cell_w + _PAD)
        y = _PAD + row * (cell_h + label_h + _PAD)
        tile = _fit_tile(image.convert("RGB"), cell_w, cell_h)
        sheet.paste(tile, (x + (cell_w - tile.width) // 2, y + (cell_h - tile.height) // 2))
        for j, text in enumerate(label_lines):
            tw = draw.textlength(text, font=font)
            draw.text(
                (x + (cell_w - tw) / 2, y + cell_h + 2 + j * line_h), text, fill="black", font=font
            )
    return sheet


def _cell_size(images: Sequence[Image.Image]) -> tuple[int, int]:
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    factor = max(1, math.ceil(MIN_TILE / min(w, h)))
    return w * factor, h * factor


def _fit_tile(image: Image.Image, cell_w: int, cell_h: int) -> Image.Image:
    scale = min(cell_w / image.width, cell_h / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    if scale >= 1 and float(scale).is_integer():
        return image.resize(size, Image.Resampling.NEAREST)  # whole-pixel blocks for tiny tiles
    return image.resize(size, Image.Resampling.LANCZOS)


@lru_cache(maxsize=8)
def _font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """(font, has_greek). DejaVu Sans if installed, else Pillow's built-in default font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        return ImageFont.load_default(size=size), False


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    bottom = font.getbbox("Ag|γ")[3]
    return int(bottom) + 3


def _fit_labels(
    labels: Sequence[str], width: int
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, list[list[str]]]:
    """Pick the largest font size at which every word fits the cell; wrap at spaces."""
    usable = width - 4
    for size in _FONT_SIZES:
        font, greek = _font(size)
        texts = [label if greek else _ascii_greek(label) for label in labels]
        if all(font.getlength(w) <= usable for t in texts for w in t.split()):
            return font, [_wrap(t, font, usable) for t in texts]
    # Still too wide at the smallest size: break inside words.
    return font, [_wrap(t, font, usable, break_words=True) for t in texts]


def _ascii_greek(text: str) -> str:
    for letter, name in _GREEK.items():
        text = text.replace(letter, name)
    return text


def _wrap(
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: float,
    *,
    break_words: bool = False,
) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        pieces = _break(word, font, width) if break_words else [word]
        for piece in pieces:
            candidate = f"{current} {piece}" if current else piece
            if current and font.getlength(candidate) > width:
                lines.append(current)
                current = piece
            else:
                current = candidate
    if current or not lines:
        lines.append(current)
    return lines


def _break(
    word: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float
) -> list[str]:
    pieces, current = [], ""
    for ch in word:
        if current and font.getlength(current + ch) > width:
            pieces.append(current)
            current = ch
        else:
            current += ch
    return [*pieces, current] if current else pieces


# --------------------------------------------------------------------------------------------
# What an image is called


def sheet_label(spec: ImageSpec, with_prompt: bool = False) -> str:
    """A contact-sheet tile's label: strategy, the interpolation's coefficients and seed, e.g.
    ``encoderkv γ=0.6 seed=3`` (vs) or ``encoderkv β=1.1 α=0.9 seed=3`` (vp); with the
    prompt's slug in front when a sweep has several prompts."""
    coefficients = f"{spec.strength_symbol}={spec.gamma:g}"
    if spec.interpolation == "vp":
        coefficients += f" α={spec.alpha:g}"
    label = f"{spec.forget} {coefficients} seed={spec.seed}"
    return f"{slug(spec.prompt, 24)} {label}" if with_prompt else label


def image_file_name(
    index: int,
    forget: str,
    interpolation: str,
    gamma: float,
    alpha: float,
    seed: int,
    prompt_slug: str | None = None,
    suffix: str = ".png",
) -> str:
    """``{index:03d}[_{prompt}]_{forget}_{interp}_g{gamma}[_a{alpha}]_s{seed}{suffix}``: safe
    on every file system, sortable, and every number printed as typed (0.6, not
    0.6000000001). ``g`` is γ for vs and β for vp; α appears only for vp (vs ignores it).
    ``suffix``: the encoding's (``OutputConfig.suffix``)."""
    parts = [f"{index:03d}"]
    if prompt_slug:
        parts.append(prompt_slug)
    parts += [_safe(forget), interpolation, f"g{gamma:g}"]
    if interpolation == "vp":
        parts.append(f"a{alpha:g}")
    parts.append(f"s{seed}")
    return "_".join(parts) + suffix


def slug(text: str, max_chars: int = 32) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_chars``: 'A photo of a dog.' →
    'a-photo-of-a-dog'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:max_chars].strip("-")
    return out or "prompt"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", name)
