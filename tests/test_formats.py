"""Every format a shop sends: GIF (first frame + frame count), HEIC/HEIF (pillow-heif), AVIF, and the
cut-off check intake uses for stalled uploads (pipeline.io.imageio.looks_incomplete)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.io.imageio import ImageLoadError, load_image, looks_incomplete
from pipeline.io.outputs import input_record


def _frames(n: int, size=(32, 24)) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def gif_bytes(n: int = 3) -> tuple[bytes, list[Image.Image]]:
    # Few colours so GIF's palette keeps every pixel exact.
    frames = [f.quantize(colors=16, dither=Image.Dither.NONE) for f in _frames(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue(), frames


def test_gif_first_frame_and_frame_count(tmp_path):
    data, frames = gif_bytes(3)
    p = tmp_path / "animated.gif"
    p.write_bytes(data)
    loaded = load_image(p)
    assert loaded.format == "GIF" and loaded.frames == 3 and loaded.original_mode == "P"
    assert loaded.image.mode == "RGB"
    assert np.array_equal(np.asarray(loaded.image), np.asarray(frames[0].convert("RGB")))
    rec = input_record(loaded)
    assert rec["frames"] == 3 and rec["format"] == "GIF"
    # A still image reports one frame.
    buf = io.BytesIO()
    frames[0].convert("RGB").save(buf, format="PNG")
    assert load_image(buf.getvalue()).frames == 1


def test_heic_round_trip_and_registration(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    # A smooth gradient: HEIC is lossy, so noise would not survive; this does, closely.
    yy, xx = np.mgrid[0:48, 0:64]
    src = Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8))
    heif = pillow_heif.from_pillow(src)
    buf = io.BytesIO()
    heif.save(buf, format="HEIF", quality=95)
    p = tmp_path / "IMG_0001.HEIC"
    p.write_bytes(buf.getvalue())
    loaded = load_image(p)
    assert loaded.format == "HEIF" and loaded.size == (64, 48) and loaded.frames == 1
    diff = np.abs(np.asarray(loaded.image, np.int16) - np.asarray(src, np.int16))
    assert diff.mean() < 8


def test_avif_round_trip(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    src = _frames(1, (64, 48))[0]
    p = tmp_path / "a.avif"
    src.save(p, format="AVIF", quality=100)
    loaded = load_image(p)
    assert loaded.format == "AVIF" and loaded.size == (64, 48) and loaded.frames == 1


@pytest.mark.parametrize("name,data", [
    ("cut.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40),
    ("cut.avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 40),
    ("cut.gif", b"GIF89a\x10\x00"),
    ("text.heic", b"not an image at all"),
])
def test_unreadable_image_suffixes_fail_clearly(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(ImageLoadError) as info:
        load_image(p)
    assert str(info.value).startswith(f"{p}: ") and info.value.reason


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    im = _frames(1, (40, 30))[0]
    if fmt == "GIF":
        im = im.quantize(colors=16)
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_looks_incomplete(tmp_path, fmt):
    data = _encoded(fmt)
    p = tmp_path / f"x.{fmt.lower()}"
    p.write_bytes(data)
    assert not looks_incomplete(p)
    p.write_bytes(data[: len(data) // 2])
    assert looks_incomplete(p)
    if fmt == "JPEG":
        p.write_bytes(data + b"\x00" * 100)  # padding after the end marker is complete
        assert not looks_incomplete(p)


def test_looks_incomplete_tiff_heif_avif(tmp_path):
    from PIL import features

    im = _frames(1, (64, 48))[0]
    blobs = {}
    for fmt, kw in (("TIFF", {}), ("TIFF", {"compression": "tiff_deflate"})):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        blobs[f"{fmt}-{kw.get('compression', 'raw')}.tif"] = buf.getvalue()
    try:
        import pillow_heif

        buf = io.BytesIO()
        pillow_heif.from_pillow(im).save(buf, format="HEIF", quality=90)
        blobs["x.heic"] = buf.getvalue()
    except ImportError:
        pass
    if features.check("avif"):
        buf = io.BytesIO()
        im.save(buf, format="AVIF", quality=90)
        blobs["x.avif"] = buf.getvalue()
    for name, data in blobs.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert not looks_incomplete(p), name
        assert load_image(p).size == (64, 48)
        p.write_bytes(data[: len(data) * 2 // 3])
        assert looks_incomplete(p), name


def test_looks_incomplete_leaves_the_rest_to_the_loader(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"plain text, not an image")
    assert not looks_incomplete(p)
    assert not looks_incomplete(tmp_path / "missing.png")
    assert not looks_incomplete(Path(tmp_path))
