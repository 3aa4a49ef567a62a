"""Tests for pipeline.io.imageio: the one safe image loader and the atomic writers.

Every image is generated here with Pillow/numpy into tmp_path; nothing is read from fixture folders.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline.io.imageio import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageLoadError,
    LoadedImage,
    atomic_write_bytes,
    atomic_write_text,
    is_image_name,
    load_image,
    save_image,
    to_rgb_array,
)

RED = (255, 0, 0)
WHITE = (255, 255, 255)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def gradient_rgb(w: int = 32, h: int = 24) -> Image.Image:
    ys, xs = np.mgrid[0:h, 0:w]
    arr = np.dstack([xs * 7 % 256, ys * 11 % 256, (xs + ys) * 5 % 256]).astype(np.uint8)
    return Image.fromarray(arr)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming width x height 8-bit grey, with a token IDAT.

    Tiny on disk and cheap to open; decoding it would need width*height bytes, which the loader
    must refuse before it tries.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def s15f16(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def cmyk_icc_profile() -> bytes:
    """A minimal but valid ICC v2 CMYK input profile (lut16 A2B0 to a Lab PCS).

    Neutral model: L* = 100 * (1-C)(1-M)(1-Y)(1-K), a* = b* = 0. Enough for LittleCMS to run a
    real CMYK -> sRGB transform, whose mid-grey differs visibly from Pillow's naive conversion.
    """
    clut = b""
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        lightness = 100.0 * (1 - c) * (1 - m) * (1 - y) * (1 - k)
        clut += struct.pack(">HHH", round(lightness / 100 * 0xFF00), 0x8000, 0x8000)
    identity = b"".join(s15f16(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    a2b0 = (
        b"mft2" + b"\0" * 4 + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2)
        + struct.pack(">HH", 0, 0xFFFF) * 4 + clut + struct.pack(">HH", 0, 0xFFFF) * 3
    )
    d50 = s15f16(0.9642) + s15f16(1.0) + s15f16(0.8249)
    tags = [(b"A2B0", a2b0), (b"wtpt", b"XYZ " + b"\0" * 4 + d50)]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body)) + b"\0" * 4 + struct.pack(">I", 0x02100000)
        + b"scnr" + b"CMYK" + b"Lab " + b"\0" * 12 + b"acsp" + b"\0" * 28 + d50 + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def srgb_icc_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def assert_load_error(source, fragment: str, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)
    assert fragment in info.value.reason, info.value.reason
    assert fragment in str(info.value)
    return info.value


def saved_icc(path: Path) -> bytes | None:
    with Image.open(path) as im:
        return im.info.get("icc_profile")


def saved_format(path: Path) -> str | None:
    with Image.open(path) as im:
        return im.format


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------
# constants and error type
# ------------------------------------------------------------------------------------------


def test_constants():
    assert DEFAULT_MAX_PIXELS == 64_000_000
    assert ALLOWED_FORMATS == frozenset({"JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF", "AVIF"})
    assert IMAGE_SUFFIXES == frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic",
                                        ".heif", ".avif"})


def test_error_str_attributes_and_pickle(tmp_path):
    path = write(tmp_path, "empty.png", b"")
    err = assert_load_error(path, "empty file (0 bytes)")
    from pipeline.errors import BadInput

    assert isinstance(err, BadInput) and not isinstance(err, ValueError)
    assert err.path == str(path)
    assert err.reason == "empty file (0 bytes)"
    assert str(err) == f"{path}: empty file (0 bytes)"
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.path, clone.reason, str(clone)) == (err.path, err.reason, str(err))


# ------------------------------------------------------------------------------------------
# bad inputs: each its own reason
# ------------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    assert_load_error(write(tmp_path, "zero.jpg", b""), "empty file (0 bytes)")


def test_zero_bytes_input():
    err = assert_load_error(b"", "empty file (0 bytes)")
    assert err.path is None
    assert str(err) == "<bytes>: empty file (0 bytes)"


def test_text_file_named_jpg(tmp_path):
    path = write(tmp_path, "notes.jpg", b"this is not a picture\n" * 20)
    assert_load_error(path, "not a recognised image")


def test_truncated_jpeg(tmp_path):
    data = encode(gradient_rgb(64, 48), "JPEG", quality=90)
    path = write(tmp_path, "half.jpg", data[: len(data) // 2])
    assert_load_error(path, "truncated or corrupt image data")


def test_truncated_png(tmp_path):
    data = encode(gradient_rgb(64, 48), "PNG")
    path = write(tmp_path, "half.png", data[: len(data) // 2])
    assert_load_error(path, "truncated or corrupt image data")


def test_gif_can_still_be_narrowed_out(tmp_path):
    path = write(tmp_path, "anim.gif", encode(Image.new("P", (4, 4)), "GIF"))
    assert_load_error(path, "format GIF not allowed (allowed: JPEG, PNG)", allowed_formats=["JPEG", "PNG"])


def test_ico_not_allowed(tmp_path):
    path = write(tmp_path, "favicon.ico", encode(Image.new("RGB", (16, 16)), "ICO"))
    assert_load_error(path, "format ICO not allowed")


def test_allowed_formats_parameter_narrows_list(tmp_path):
    path = write(tmp_path, "a.png", encode(Image.new("RGB", (4, 4)), "PNG"))
    assert_load_error(path, "format PNG not allowed (allowed: JPEG)", allowed_formats={"jpeg"})


def test_pixel_limit_parameter(tmp_path):
    path = write(tmp_path, "small.png", encode(Image.new("RGB", (20, 10)), "PNG"))
    assert_load_error(path, "image has 200 pixels, limit is 199 (decompression-bomb guard)", max_pixels=199)
    assert load_image(path, max_pixels=200).size == (20, 10)


def test_pixel_limit_uses_header_without_decoding():
    # 4000x4000 claimed, but the IDAT is a token: if the loader decoded first it would report
    # corrupt data instead of the pixel limit.
    data = png_header_only(4000, 4000)
    assert len(data) < 200
    assert_load_error(data, "image has 16,000,000 pixels, limit is 10,000,000", max_pixels=10_000_000)


def test_pixel_limit_default_refuses_huge_header_without_warning():
    max_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 100M pixels: over our default and over Pillow's warning threshold (89M).
        assert_load_error(
            png_header_only(10_000, 10_000),
            "image has 100,000,000 pixels, limit is 64,000,000 (decompression-bomb guard)",
        )
        # 2.5G pixels: Pillow itself refuses at open; that must become our error too.
        assert_load_error(
            png_header_only(50_000, 50_000),
            "image has 2,500,000,000 pixels, limit is 64,000,000 (decompression-bomb guard)",
        )
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == max_before


def test_raised_pixel_limit_overrides_pillow_warning():
    # Above Pillow's warning threshold but within the caller's limit: the size check passes, so
    # the (fake) pixel data gets decoded and fails as corrupt; no bomb warning escapes.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_load_error(
            png_header_only(10_000, 10_000), "truncated or corrupt image data", max_pixels=150_000_000
        )


def test_missing_path(tmp_path):
    assert_load_error(tmp_path / "nope.png", "file not found")


def test_directory(tmp_path):
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    assert_load_error(folder, "is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_load_error(fifo, "not a regular file")


def test_garbage_after_png_signature():
    assert_load_error(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64, "not a recognised image")


# ------------------------------------------------------------------------------------------
# successful loads: result shape, hashing, bytes input
# ------------------------------------------------------------------------------------------


def test_png_path_load_exact(tmp_path):
    src = gradient_rgb()
    data = encode(src, "PNG")
    path = write(tmp_path, "g.png", data)
    loaded = load_image(path)
    assert isinstance(loaded, LoadedImage)
    assert loaded.path == str(path)
    assert loaded.format == "PNG"
    assert loaded.original_mode == "RGB"
    assert loaded.image.mode == "RGB"
    assert loaded.size == (32, 24)
    assert not loaded.has_alpha
    assert not loaded.exif_transposed
    assert loaded.icc_profile is None
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    np.testing.assert_array_equal(pixels(loaded.image), pixels(src))
    with pytest.raises(AttributeError):
        loaded.format = "JPEG"  # frozen


def test_bytes_input_and_sha256():
    data = encode(gradient_rgb(), "PNG")
    loaded = load_image(data)
    assert loaded.path is None
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert load_image(bytearray(data), name="upload.png").path == "upload.png"
    assert load_image(memoryview(data)).sha256 == loaded.sha256


def test_each_allowed_format_loads(tmp_path):
    src = gradient_rgb(16, 8)
    cases = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("TIFF", ".tif"), ("BMP", ".bmp")]
    for fmt, suffix in cases:
        loaded = load_image(write(tmp_path, "x" + suffix, encode(src, fmt)))
        assert loaded.format == fmt
        assert loaded.image.mode == "RGB"
        assert loaded.size == (16, 8)


def test_multi_frame_tiff_takes_frame_zero():
    first, second = Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), (0, 0, 255))
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    loaded = load_image(data)
    assert loaded.image.getpixel((0, 0)) == RED


def test_mpo_counts_as_jpeg():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), WHITE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    loaded = load_image(data)
    assert loaded.format == "JPEG"
    r, g, b = loaded.image.getpixel((4, 4))
    assert r > 240 and g < 20 and b < 20


# ------------------------------------------------------------------------------------------
# mode normalisation
# ------------------------------------------------------------------------------------------


def test_cmyk_without_profile_plain_convert():
    im = Image.new("CMYK", (2, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 0))
    loaded = load_image(encode(im, "TIFF"))
    assert loaded.original_mode == "CMYK"
    assert loaded.image.mode == "RGB"
    assert loaded.icc_profile is None
    assert loaded.image.getpixel((0, 0)) == WHITE
    assert loaded.image.getpixel((1, 0)) == (0, 255, 255)


def test_cmyk_jpeg_without_profile():
    loaded = load_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=95))
    assert (loaded.original_mode, loaded.image.mode, loaded.icc_profile) == ("CMYK", "RGB", None)
    assert min(loaded.image.getpixel((4, 4))) > 245


def test_cmyk_with_profile_is_colour_managed_to_srgb():
    profile = cmyk_icc_profile()
    im = Image.new("CMYK", (3, 1))
    for x, k in enumerate((0, 255, 128)):
        im.putpixel((x, 0), (0, 0, 0, k))
    loaded = load_image(encode(im, "TIFF", icc_profile=profile))
    assert loaded.original_mode == "CMYK"
    assert loaded.image.mode == "RGB"
    # The CMYK profile must not travel with RGB pixels; sRGB describes them now.
    assert loaded.icc_profile is not None and loaded.icc_profile != profile
    assert loaded.icc_profile[16:20] == b"RGB "
    assert loaded.image.info["icc_profile"] == loaded.icc_profile
    assert loaded.image.getpixel((0, 0)) == WHITE
    assert loaded.image.getpixel((1, 0)) == (0, 0, 0)
    mid = loaded.image.getpixel((2, 0))
    # L* = 50 is sRGB ~118; the naive conversion would give 127.
    assert mid[0] == mid[1] == mid[2] and abs(mid[0] - 118) <= 2


def test_cmyk_with_broken_profile_falls_back():
    bogus = b"\0" * 16 + b"CMYK" + b"\0" * 200
    im = Image.new("CMYK", (2, 2), (0, 0, 0, 255))
    loaded = load_image(encode(im, "TIFF", icc_profile=bogus))
    assert loaded.image.mode == "RGB"
    assert loaded.icc_profile is None
    assert loaded.image.getpixel((0, 0)) == (0, 0, 0)


def test_i16_full_range_scaled_not_clipped():
    arr = np.array([[0, 65535, 32768, 257]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    loaded = load_image(encode(im, "PNG"))
    assert loaded.original_mode.startswith("I")
    assert loaded.image.mode == "RGB"
    np.testing.assert_array_equal(pixels(loaded.image)[0, :, 0], [0, 255, 128, 1])
    np.testing.assert_array_equal(pixels(loaded.image)[..., 0], pixels(loaded.image)[..., 2])


def test_i16_with_trns_becomes_rgba():
    im = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    loaded = load_image(encode(im, "PNG", transparency=65535))
    assert loaded.image.mode == "RGBA"
    assert loaded.image.getpixel((0, 0)) == (0, 0, 0, 255)
    assert loaded.image.getpixel((1, 0))[3] == 0


def test_int32_grey_tiff_scaled_as_16_bit():
    im = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.int32))
    assert im.mode == "I"
    loaded = load_image(encode(im, "TIFF"))
    assert loaded.original_mode == "I"
    np.testing.assert_array_equal(pixels(loaded.image)[0, :, 1], [0, 255, 128])


def test_float_grey_unit_range_and_byte_range():
    unit = Image.fromarray(np.array([[0.0, 1.0, 0.5, -0.2]], dtype=np.float32))
    loaded = load_image(encode(unit, "TIFF"))
    assert loaded.original_mode == "F"
    np.testing.assert_array_equal(pixels(loaded.image)[0, :, 0], [0, 255, 128, 0])
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    np.testing.assert_array_equal(pixels(load_image(encode(wide, "TIFF")).image)[0, :, 0], [0, 100, 255])


def test_palette_with_transparency_becomes_rgba():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    loaded = load_image(encode(im, "PNG", transparency=0))
    assert loaded.original_mode == "P"
    assert loaded.image.mode == "RGBA"
    assert loaded.has_alpha
    assert loaded.image.getpixel((0, 0))[3] == 0
    assert loaded.image.getpixel((1, 0)) == (0, 255, 0, 255)
    assert "transparency" not in loaded.image.info


def test_palette_without_transparency_becomes_rgb():
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    im.putpixel((1, 0), 1)
    loaded = load_image(encode(im, "PNG"))
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((0, 0)) == (10, 20, 30)
    assert loaded.image.getpixel((1, 0)) == (40, 50, 60)


def test_la_becomes_rgba():
    arr = np.array([[[10, 0], [200, 128]]], dtype=np.uint8)
    loaded = load_image(encode(Image.fromarray(arr), "PNG"))
    assert loaded.original_mode == "LA"
    assert loaded.image.mode == "RGBA"
    np.testing.assert_array_equal(pixels(loaded.image)[0], [[10, 10, 10, 0], [200, 200, 200, 128]])


def test_la_fully_opaque_becomes_rgb():
    arr = np.dstack([np.full((2, 2), 77, np.uint8), np.full((2, 2), 255, np.uint8)])
    loaded = load_image(encode(Image.fromarray(arr), "PNG"))
    assert (loaded.original_mode, loaded.image.mode) == ("LA", "RGB")


def test_l_becomes_rgb():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    loaded = load_image(encode(Image.fromarray(arr), "PNG"))
    assert (loaded.original_mode, loaded.image.mode) == ("L", "RGB")
    np.testing.assert_array_equal(pixels(loaded.image), np.dstack([arr, arr, arr]))


def test_l_with_trns_becomes_rgba():
    arr = np.array([[7, 8]], dtype=np.uint8)
    loaded = load_image(encode(Image.fromarray(arr), "PNG", transparency=7))
    assert loaded.image.mode == "RGBA"
    assert loaded.image.getpixel((0, 0))[3] == 0
    assert loaded.image.getpixel((1, 0)) == (8, 8, 8, 255)


def test_bilevel_becomes_rgb():
    im = Image.new("1", (3, 1), 0)
    im.putpixel((1, 0), 1)
    loaded = load_image(encode(im, "PNG"))
    assert (loaded.original_mode, loaded.image.mode) == ("1", "RGB")
    np.testing.assert_array_equal(pixels(loaded.image)[0, :, 0], [0, 255, 0])


def test_rgba_fully_opaque_becomes_rgb():
    src = gradient_rgb().convert("RGBA")
    loaded = load_image(encode(src, "PNG"))
    assert (loaded.original_mode, loaded.image.mode, loaded.has_alpha) == ("RGBA", "RGB", False)
    np.testing.assert_array_equal(pixels(loaded.image), pixels(src)[..., :3])


def test_rgba_with_real_alpha_is_kept_exactly():
    arr = np.asarray(gradient_rgb().convert("RGBA")).copy()
    arr[..., 3] = np.arange(arr.shape[1], dtype=np.uint8)[None, :] * 8
    loaded = load_image(encode(Image.fromarray(arr), "PNG"))
    assert loaded.image.mode == "RGBA" and loaded.has_alpha
    np.testing.assert_array_equal(pixels(loaded.image), arr)


def test_rgb_with_trns_colour_becomes_rgba():
    im = Image.new("RGB", (2, 1), (1, 2, 3))
    im.putpixel((1, 0), (9, 9, 9))
    loaded = load_image(encode(im, "PNG", transparency=(1, 2, 3)))
    assert loaded.image.mode == "RGBA"
    assert loaded.image.getpixel((0, 0))[3] == 0
    assert loaded.image.getpixel((1, 0)) == (9, 9, 9, 255)


def test_lab_tiff_becomes_rgb():
    lab = ImageCms.profileToProfile(
        Image.new("RGB", (2, 2), (200, 30, 40)),
        ImageCms.createProfile("sRGB"),
        ImageCms.createProfile("LAB"),
        outputMode="LAB",
    )
    loaded = load_image(encode(lab, "TIFF"))
    assert (loaded.original_mode, loaded.image.mode) == ("LAB", "RGB")
    r, g, b = loaded.image.getpixel((0, 0))
    assert abs(r - 200) <= 3 and abs(g - 30) <= 3 and abs(b - 40) <= 3


# ------------------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------------------

# Where the stored top-left corner ends up after applying each orientation (and whether w/h swap).
ORIENTATION_CORNER = {
    1: ("TL", False),
    2: ("TR", False),
    3: ("BR", False),
    4: ("BL", False),
    5: ("TL", True),
    6: ("TR", True),
    7: ("BR", True),
    8: ("BL", True),
}


def marked_image(w: int = 48, h: int = 24) -> Image.Image:
    """White w x h image with a red 12x12 block in the stored top-left corner."""
    im = Image.new("RGB", (w, h), WHITE)
    im.paste(RED, (0, 0, 12, 12))
    return im


def corner_pixel(im: Image.Image, corner: str) -> tuple[int, ...]:
    w, h = im.size
    x = 3 if corner[1] == "L" else w - 4
    y = 3 if corner[0] == "T" else h - 4
    return im.getpixel((x, y))


def is_red(px) -> bool:
    return px[0] > 200 and px[1] < 60 and px[2] < 60


def is_white(px) -> bool:
    return min(px[:3]) > 200


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_CORNER))
def test_exif_orientation_applied_jpeg(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_image(encode(marked_image(), "JPEG", quality=95, exif=exif.tobytes()))
    corner, swapped = ORIENTATION_CORNER[orientation]
    assert loaded.size == ((24, 48) if swapped else (48, 24))
    assert loaded.exif_transposed is (orientation != 1)
    assert is_red(corner_pixel(loaded.image, corner))
    for other in {"TL", "TR", "BL", "BR"} - {corner}:
        assert is_white(corner_pixel(loaded.image, other)), other
    if orientation != 1:
        assert 0x0112 not in loaded.image.getexif()


def test_exif_orientation_6_png_exact():
    src = gradient_rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(encode(src, "PNG", exif=exif.tobytes()))
    assert loaded.exif_transposed
    assert loaded.size == (20, 40)
    # Orientation 6 = rotate 90 degrees clockwise to display.
    np.testing.assert_array_equal(pixels(loaded.image), np.rot90(pixels(src), k=-1))
    assert 0x0112 not in loaded.image.getexif()


@pytest.mark.parametrize(
    "fmt, params",
    [
        ("TIFF", {"tiffinfo": {0x0112: 6}}),
        ("TIFF", {"tiffinfo": {0x0112: 6}, "compression": "tiff_lzw"}),
        ("WEBP", {"lossless": True}),
    ],
    ids=["TIFF", "TIFF-lzw", "WEBP"],
)
def test_exif_orientation_6_other_formats_exact(fmt, params):
    src = gradient_rgb(40, 20)
    if fmt == "WEBP":
        exif = Image.Exif()
        exif[0x0112] = 6
        params = {**params, "exif": exif.tobytes()}
    loaded = load_image(encode(src, fmt, **params))
    assert loaded.format == fmt
    assert loaded.exif_transposed
    np.testing.assert_array_equal(pixels(loaded.image), np.rot90(pixels(src), k=-1))
    assert 0x0112 not in loaded.image.getexif()


def test_flattened_jpeg_keeps_icc_from_info(tmp_path):
    profile = srgb_icc_profile()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgba.info["icc_profile"] = profile
    out = save_image(rgba, tmp_path / "flat.jpg")
    assert saved_icc(out) == profile


# ------------------------------------------------------------------------------------------
# ICC profiles
# ------------------------------------------------------------------------------------------


def test_icc_profile_kept_on_load_and_save(tmp_path):
    profile = srgb_icc_profile()
    loaded = load_image(write(tmp_path, "in.png", encode(gradient_rgb(), "PNG", icc_profile=profile)))
    assert loaded.icc_profile == profile
    for name in ("out.png", "out.jpg", "out.webp", "out.tif"):
        out = save_image(loaded.image, tmp_path / name, icc_profile=loaded.icc_profile)
        assert saved_icc(out) == profile, name


def test_icc_profile_from_image_info_when_not_given(tmp_path):
    profile = srgb_icc_profile()
    loaded = load_image(encode(gradient_rgb(), "JPEG", icc_profile=profile))
    assert loaded.icc_profile == profile
    out = save_image(loaded.image, tmp_path / "o.jpg")
    assert saved_icc(out) == profile
    stripped = save_image(loaded.image, tmp_path / "s.jpg", icc_profile=b"")
    assert not saved_icc(stripped)


# ------------------------------------------------------------------------------------------
# save_image
# ------------------------------------------------------------------------------------------


def test_save_png_roundtrip_exact(tmp_path):
    src = gradient_rgb()
    out = save_image(src, tmp_path / "sub" / "dir" / "round.png")
    assert out == tmp_path / "sub" / "dir" / "round.png"
    loaded = load_image(out)
    assert loaded.format == "PNG"
    np.testing.assert_array_equal(pixels(loaded.image), pixels(src))
    assert listing(out.parent) == ["round.png"]


def test_save_rgba_as_jpeg_composites_on_white(tmp_path):
    arr = np.zeros((16, 16, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere ...
    arr[:, :8, 3] = 255  # ... opaque on the left, fully transparent on the right
    out = save_image(arr, tmp_path / "flat.jpg", quality=95)
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert is_red(im.getpixel((2, 8)))
        assert is_white(im.getpixel((13, 8)))


def test_save_format_argument_overrides_suffix(tmp_path):
    out = save_image(gradient_rgb(), tmp_path / "blob.bin", format="jpg", quality=80)
    assert saved_format(out) == "JPEG"
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_image(gradient_rgb(), tmp_path / "blob.unknownext")


def test_save_jpeg_quality_changes_size(tmp_path):
    src = gradient_rgb(128, 128)
    small = save_image(src, tmp_path / "q10.jpg", quality=10).stat().st_size
    large = save_image(src, tmp_path / "q95.jpg", quality=95).stat().st_size
    assert small < large


@pytest.mark.parametrize(
    "arr, mode",
    [
        (np.arange(24, dtype=np.uint8).reshape(4, 6) * 10, "L"),
        (np.arange(72, dtype=np.uint8).reshape(4, 6, 3) * 3, "RGB"),
        (np.arange(96, dtype=np.uint8).reshape(4, 6, 4) * 2 + 1, "RGBA"),
        (np.eye(4, 6, dtype=bool), "L"),
    ],
    ids=["HxW", "HxWx3", "HxWx4", "bool"],
)
def test_save_numpy_shapes(tmp_path, arr, mode):
    out = save_image(arr, tmp_path / "a.png")
    with Image.open(out) as im:
        assert im.mode == mode
        expected = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
        np.testing.assert_array_equal(np.asarray(im), expected)


def test_save_rejects_bad_arrays(tmp_path):
    with pytest.raises(TypeError):
        save_image(np.zeros((4, 4), dtype=np.float32), tmp_path / "f.png")
    with pytest.raises(ValueError):
        save_image(np.zeros((4, 4, 2), dtype=np.uint8), tmp_path / "two.png")
    assert listing(tmp_path) == []


def test_atomic_save_leaves_no_temp_files(tmp_path):
    for i in range(3):
        save_image(gradient_rgb(), tmp_path / "same.png")
        save_image(gradient_rgb(), tmp_path / f"other{i}.jpg")
    assert listing(tmp_path) == ["other0.jpg", "other1.jpg", "other2.jpg", "same.png"]


def test_failed_save_invalid_format_keeps_previous_file(tmp_path):
    target = tmp_path / "keep.png"
    save_image(Image.new("RGB", (4, 4), RED), target)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="unknown or unwritable image format"):
        save_image(Image.new("RGB", (4, 4), WHITE), target, format="NOTAFORMAT")
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["keep.png"]


def test_failed_save_during_encode_keeps_previous_file(tmp_path):
    target = tmp_path / "keep.jpg"
    save_image(Image.new("RGB", (4, 4), RED), target)
    before = target.read_bytes()
    # Pillow cannot write float images as JPEG; the error comes from inside the encoder call,
    # after the temp file exists.
    with pytest.raises(OSError):
        save_image(Image.new("F", (4, 4)), target)
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["keep.jpg"]


def test_failed_save_midway_removes_partial_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    save_image(Image.new("RGB", (4, 4), RED), target)
    before = target.read_bytes()
    seen = []

    def exploding_save(self, fp, *args, **kwargs):
        fp.write(b"partial garbage")
        fp.flush()
        seen.extend(name for name in listing(tmp_path) if name != "keep.png")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", exploding_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_image(Image.new("RGB", (4, 4), WHITE), target)
    # The partial write went to a hidden temp file beside the target, never to the target.
    assert len(seen) == 1 and seen[0].startswith(".keep.png.tmp-")
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["keep.png"]


# ------------------------------------------------------------------------------------------
# atomic_write_bytes / atomic_write_text
# ------------------------------------------------------------------------------------------


def test_atomic_write_bytes_and_text(tmp_path):
    out = atomic_write_bytes(tmp_path / "new" / "blob.bin", b"\x00\x01data")
    assert out == tmp_path / "new" / "blob.bin"
    assert out.read_bytes() == b"\x00\x01data"
    text_path = atomic_write_text(tmp_path / "new" / "ledger.json", '{"name": "caf\u00e9"}\n')
    assert text_path.read_bytes() == '{"name": "caf\u00e9"}\n'.encode("utf-8")
    atomic_write_text(text_path, "second")
    assert text_path.read_text(encoding="utf-8") == "second"
    assert listing(tmp_path / "new") == ["blob.bin", "ledger.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = atomic_write_bytes(tmp_path / "fresh", b"x")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    private = tmp_path / "private"
    private.write_bytes(b"old")
    private.chmod(0o600)
    atomic_write_bytes(private, b"new")
    assert private.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------------------
# to_rgb_array / is_image_name / import cost
# ------------------------------------------------------------------------------------------


def test_to_rgb_array_rgb_and_rgba():
    src = np.asarray(gradient_rgb()).copy()
    out = to_rgb_array(Image.fromarray(src))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, src)
    rgba = np.dstack([src, np.zeros(src.shape[:2], np.uint8)])  # fully transparent: dropped, not composited
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(rgba)), src)


def test_to_rgb_array_other_modes():
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(to_rgb_array(grey16), [[[0, 0, 0], [255, 255, 255]]])
    np.testing.assert_array_equal(to_rgb_array(Image.new("L", (1, 1), 9)), [[[9, 9, 9]]])


def test_is_image_name():
    assert is_image_name("a.JPG")
    assert is_image_name(Path("dir/b.Tiff"))
    assert is_image_name("c.webp")
    assert is_image_name("d.gif") and is_image_name("IMG_0001.HEIC") and is_image_name("e.avif")
    assert not is_image_name("f.txt")
    assert not is_image_name("noext")
    assert not is_image_name(".e.png.tmp-abc123")


def test_import_is_light():
    module = Path(__file__).resolve().parents[1] / "pipeline" / "io" / "imageio.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('imageio_probe', {str(module)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "heavy = [m for m in ('torch', 'cv2', 'PIL.ImageCms', 'diffusers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
