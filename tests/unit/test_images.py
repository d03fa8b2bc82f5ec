"""forgedit.images: untrusted-image checks, the original's preprocessing and output
conversion, deterministic PNGs and the contact sheet."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from forgedit.config import OutputConfig
from forgedit.errors import InvalidImageError, InvalidInputError
from forgedit.images import (
    MIN_TILE,
    ImageLimits,
    contact_sheet,
    encode_image,
    encode_png,
    load_image,
    preprocess,
    to_pil,
    write_png_atomic,
)


def _noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims width×height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


# --- error cases -----------------------------------------------------------------------------


def test_missing_file_echoes_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidImageError, match=r"'photos/missing\.png' does not exist") as e:
        load_image("photos/missing.png")
    assert str(tmp_path) not in str(e.value)
    assert e.value.field == "image"


def test_directory_is_refused(tmp_path: Path):
    with pytest.raises(InvalidImageError, match="is a directory"):
        load_image(tmp_path)


def test_empty_file_and_empty_bytes(tmp_path: Path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"is empty \(0 bytes\).*PNG, JPEG, WEBP"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InvalidImageError, match="is empty"):
        load_image(b"")


def test_too_many_bytes_is_refused_before_reading(tmp_path: Path):
    data = _encoded(_noise(64, 64), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(InvalidImageError, match=r"MiB; at most .* MiB is accepted"):
        load_image(path, limits=limits)
    with pytest.raises(InvalidImageError, match="at most"):
        load_image(data, limits=limits)
    assert load_image(data, limits=ImageLimits(max_bytes=len(data))).width == 64


def test_default_byte_limit_is_50_mib():
    assert ImageLimits().max_bytes == 50 * 1024 * 1024
    assert ImageLimits().max_pixels == 40_000_000
    assert ImageLimits().formats == ("PNG", "JPEG", "WEBP")


def test_garbage_bytes_are_not_an_image(tmp_path: Path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"this is certainly not a JPEG " * 20)
    with pytest.raises(InvalidImageError, match=r"not an image .*expected a PNG, JPEG, WEBP"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
def test_formats_outside_the_allowed_list_are_named(tmp_path: Path, fmt: str):
    path = tmp_path / "photo.png"  # the name lies; the content decides
    path.write_bytes(_encoded(_noise(), fmt))
    with pytest.raises(InvalidImageError, match=rf"is a {fmt} image; accepted formats: PNG, JPEG"):
        load_image(path)
    # ... and the same bytes are fine when the format is allowed.
    loaded = load_image(path, limits=ImageLimits(formats=(fmt,)))
    assert loaded.format == fmt


def test_truncated_jpeg_is_an_error_not_half_an_image(tmp_path: Path):
    data = _encoded(_noise(128, 128), "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match=r"truncated or corrupt .*image file is truncated"):
        load_image(path)


def test_truncation_is_refused_even_if_someone_set_the_pillow_flag(
    monkeypatch: pytest.MonkeyPatch,
):
    data = _encoded(_noise(128, 128), "JPEG", quality=95)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_running_out_of_memory_while_decoding_is_not_called_corrupt(
    monkeypatch: pytest.MonkeyPatch,
):
    """Issue 21.4: a decoder that cannot allocate the pixels raises MemoryError, which must
    reach the caller as what it is (the server answers RESOURCE_EXHAUSTED), never as an
    InvalidImageError blaming the image."""
    data = _encoded(_noise(128, 128), "PNG")

    def no_memory(self: ImageFile.ImageFile) -> None:
        raise MemoryError  # what Pillow raises when the image buffer cannot be allocated

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", no_memory)
    with pytest.raises(MemoryError):
        load_image(data)
    monkeypatch.undo()
    assert load_image(data).width == 128  # the same bytes decode with memory to spare

    def no_memory_for_the_header(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(Image, "open", no_memory_for_the_header)
    with pytest.raises(MemoryError):
        load_image(data)


def test_truncated_png_is_an_error():
    data = _encoded(_noise(128, 128), "PNG")
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(data[: len(data) * 2 // 3])


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_decompression_bomb_header_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch):
    _no_decoding(monkeypatch)
    # 20000x20000 = 400 M pixels: beyond even Pillow's own limit, which fires in Image.open.
    with pytest.raises(InvalidImageError, match=r"too many pixels.*at most 40,000,000 pixels"):
        load_image(_png_header_only(20000, 20000))


def test_header_over_our_pixel_limit_is_refused_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
):
    _no_decoding(monkeypatch)
    # 7000x7000 = 49 M: under Pillow's limit, over ours.
    with pytest.raises(InvalidImageError, match=r"7000x7000 = 49,000,000 pixels; at most 40,000"):
        load_image(_png_header_only(7000, 7000))
    with pytest.raises(InvalidImageError, match=r"64x64 = 4,096 pixels; at most 4,000"):
        load_image(_encoded(_noise(64, 64), "PNG"), limits=ImageLimits(max_pixels=4000))


def test_pillows_bomb_warning_is_an_error_when_our_limit_is_higher(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warn > 1000, error > 2000
    with pytest.raises(InvalidImageError, match="too many pixels"):
        load_image(_encoded(_noise(40, 40), "PNG"), limits=ImageLimits(max_pixels=10**9))


# --- what loads ------------------------------------------------------------------------------


def test_loaded_image_fields():
    data = _encoded(_noise(64, 48), "PNG")
    loaded = load_image(data)
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == (64, 48) == loaded.image.size
    assert loaded.format == "PNG"
    assert loaded.num_bytes == len(data)
    import hashlib

    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert np.array_equal(np.asarray(loaded.image), np.asarray(_noise(64, 48)))


def test_exif_orientation_is_applied(tmp_path: Path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif)
    loaded = load_image(path)
    assert loaded.image.size == (20, 40)  # portrait once upright
    top = np.asarray(loaded.image)[5, 10]
    bottom = np.asarray(loaded.image)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_png_drops_alpha_as_pillow_convert(photos_dir: Path):
    path = photos_dir / "astronaut_alpha.png"
    loaded = load_image(path)
    with Image.open(path) as raw:
        assert raw.mode == "RGBA"
        expected = raw.convert("RGB")
    assert loaded.format == "PNG"
    assert loaded.image.mode == "RGB"
    assert np.array_equal(np.asarray(loaded.image), np.asarray(expected))


def test_jpeg_named_png_is_fine(photos_dir: Path):
    loaded = load_image(photos_dir / "rocket_jpeg_named.png")
    assert loaded.format == "JPEG"
    assert loaded.image.size == (320, 214)


def test_multi_frame_takes_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])
    loaded = load_image(data)
    assert loaded.image.getpixel((8, 8)) == (255, 0, 0)
    webp = _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert load_image(webp).image.getpixel((8, 8)) == (255, 0, 0)


# --- tensors ---------------------------------------------------------------------------------


def test_preprocess_matches_the_original_formula():
    image = _noise(100, 60)
    x = preprocess(image, 64, 48)  # height 64, width 48: a squash, no crop
    assert x.shape == (1, 3, 64, 48) and x.dtype == torch.float32
    resized = np.array(image.resize((48, 64), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    expected = 2.0 * torch.from_numpy(resized[None].transpose(0, 3, 1, 2)) - 1.0
    assert torch.equal(x, expected)
    assert x.min() >= -1 and x.max() <= 1


def test_preprocess_values_of_a_flat_colour():
    x = preprocess(Image.new("RGB", (10, 10), (255, 0, 128)), 16, 16)
    assert torch.all(x[0, 0] == 1.0) and torch.all(x[0, 1] == -1.0)
    assert torch.allclose(x[0, 2], torch.tensor(2 * 128 / 255 - 1), atol=1e-6)


def test_preprocess_refuses_sizes_not_multiple_of_8():
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        preprocess(_noise(), 60, 64)


def test_to_pil_rounds_like_diffusers():
    values = torch.tensor([0.0, 1.0, 0.5, 0.2, 1 / 255 * 0.49, 1 / 255 * 0.51])
    images = values.view(1, 1, 1, 6).expand(2, 3, 1, 6).clone()
    out = to_pil(images)
    assert len(out) == 2 and out[0].mode == "RGB" and out[0].size == (6, 1)
    reference = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    assert np.array_equal(np.asarray(out[1]), reference[1])
    assert list(np.asarray(out[0])[0, :, 0]) == [0, 255, 128, 51, 0, 1]


def test_to_pil_shape_is_checked():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_pil(torch.zeros(3, 8, 8))


# --- files -----------------------------------------------------------------------------------


def test_encode_png_depends_only_on_pixels():
    image = _noise(32, 32)
    tagged = image.copy()
    tagged.info["icc_profile"] = b"not really a profile"
    tagged.info["comment"] = "hello"
    assert encode_png(image) == encode_png(tagged)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), np.asarray(image))


def test_write_png_atomic(tmp_path: Path):
    target = tmp_path / "out.png"
    write_png_atomic(_noise(), target)
    assert target.read_bytes() == encode_png(_noise())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file left
    with pytest.raises(FileNotFoundError):
        write_png_atomic(_noise(), tmp_path / "missing-dir" / "x.png")


# --- contact sheet ---------------------------------------------------------------------------


def test_contact_sheet_upscales_tiny_tiles_and_keeps_the_input_first():
    original = Image.new("RGB", (300, 200), (255, 0, 0))
    results = [
        (Image.new("RGB", (64, 64), (0, 0, 255)), f"encoderkv γ=0.{i} seed=1") for i in range(5)
    ]
    sheet = contact_sheet(original, results)
    cell = 64 * 3  # the smallest whole factor reaching MIN_TILE
    assert cell >= MIN_TILE
    # 6 tiles → 3 columns × 2 rows
    assert sheet.width == 3 * cell + 4 * 8
    assert sheet.height > 2 * cell
    assert sheet.getpixel((8 + cell // 2, 8 + cell // 2)) == (255, 0, 0)  # the input tile
    assert sheet.getpixel((8 + cell + 8 + cell // 2, 8 + cell // 2)) == (0, 0, 255)
    narrow = contact_sheet(original, results, columns=1)
    assert narrow.width == cell + 16
    assert narrow.height > 6 * cell


def test_contact_sheet_wraps_long_labels_without_widening():
    results = [(Image.new("RGB", (64, 64)), "decoderattn+decoder2 vp β=1.3 α=1.1 seed=12345678")]
    short = contact_sheet(Image.new("RGB", (64, 64)), [(results[0][0], "x")])
    long = contact_sheet(Image.new("RGB", (64, 64)), results)
    assert long.width == short.width
    assert long.height > short.height  # more label lines
    unbreakable = contact_sheet(Image.new("RGB", (64, 64)), [(results[0][0], "x" * 200)])
    assert unbreakable.width == short.width


def test_images_encode_as_png_webp_or_jpeg_with_the_same_pixels_and_stable_bytes() -> None:
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    image = Image.fromarray(gradient)
    image.info["comment"] = b"not to be copied"
    png = encode_image(image)
    assert png == encode_png(image) and png[:8] == b"\x89PNG\r\n\x1a\n"
    for fmt, pil in (("webp", "WEBP"), ("jpeg", "JPEG")):
        low = encode_image(image, OutputConfig(fmt, 10))  # type: ignore[arg-type]
        high = encode_image(image, OutputConfig(fmt, 95))  # type: ignore[arg-type]
        assert high == encode_image(image, OutputConfig(fmt, 95))  # type: ignore[arg-type]
        assert len(low) < len(high)
        with Image.open(io.BytesIO(high)) as decoded:
            assert decoded.format == pil and decoded.size == (64, 48)
            assert "comment" not in decoded.info and "exif" not in decoded.info
            error = np.abs(np.asarray(decoded, np.int16) - gradient.astype(np.int16))
            assert error.mean() < 3  # a smooth image survives quality 95
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    with Image.open(io.BytesIO(encode_image(rgba, OutputConfig("jpeg")))) as jpeg:
        assert jpeg.mode == "RGB"  # JPEG has no alpha: the colour is kept, alpha dropped
