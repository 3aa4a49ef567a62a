"""Generated sample photos for the offline demo and tests (no files shipped, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _backdrop(w: int, h: int, seed: int) -> Image.Image:
    """Studio-like backdrop: vertical gradient with mild noise. RGB uint8."""
    rng = np.random.default_rng(seed)
    g = np.linspace(235, 175, h, dtype=np.float32)[:, None, None] * np.ones((1, w, 3), np.float32)
    g += rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(g.clip(0, 255).astype(np.uint8))


def handbag(w: int = 640, h: int = 480) -> Image.Image:
    img = _backdrop(w, h, 1)
    d = ImageDraw.Draw(img)
    cx, cy = w // 2, h // 2 + h // 10
    d.rounded_rectangle((cx - w // 5, cy - h // 6, cx + w // 5, cy + h // 5), radius=w // 30, fill=(120, 60, 30))
    d.arc((cx - w // 9, cy - h // 3, cx + w // 9, cy - h // 12), 180, 360, fill=(90, 45, 20), width=max(3, w // 60))
    return img


def shoe(w: int = 720, h: int = 400) -> Image.Image:
    img = _backdrop(w, h, 2)
    d = ImageDraw.Draw(img)
    d.ellipse((w // 6, h // 2, 5 * w // 6, 5 * h // 6), fill=(30, 30, 160))
    d.polygon([(w // 6, 2 * h // 3), (w // 3, h // 4), (w // 2, h // 4), (w // 2, 2 * h // 3)], fill=(30, 30, 160))
    d.rectangle((w // 6, 3 * h // 4, 5 * w // 6, 5 * h // 6), fill=(240, 240, 240))
    return img


def empty_wall(w: int = 500, h: int = 500) -> Image.Image:
    return _backdrop(w, h, 3)


def write_samples(folder: Path) -> list[Path]:
    """Write three sample inputs: a PNG, a JPEG stored sideways with EXIF orientation 6, and an
    empty backdrop. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    p = folder / "handbag.png"
    handbag().save(p)
    paths.append(p)
    # Stored rotated with an EXIF orientation tag, as phones save photos.
    p = folder / "shoe-phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    shoe().transpose(Image.Transpose.ROTATE_90).save(p, quality=92, exif=exif)
    paths.append(p)
    p = folder / "empty-wall.jpg"
    empty_wall().save(p, quality=92)
    paths.append(p)
    return paths
