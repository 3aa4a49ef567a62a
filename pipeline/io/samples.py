"""Generated sample photos for the offline demo and tests (no files shipped, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw


def _backdrop(w: int, h: int, seed: int) -> Image.Image:
    """Studio-like backdrop: vertical gradient with mild noise. RGB uint8."""
    rng = np.random.default_rng(seed)
    g = np.linspace(235, 175, h, dtype=np.float32)[:, None, None] * np.ones((1, w, 3), np.float32)
    g += rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(g.clip(0, 255).astype(np.uint8))


def _draw_handbag(d: ImageDraw.ImageDraw, w: int, h: int, body: object, handle: object) -> None:
    cx, cy = w // 2, h // 2 + h // 10
    d.rounded_rectangle((cx - w // 5, cy - h // 6, cx + w // 5, cy + h // 5), radius=w // 30, fill=body)
    d.arc((cx - w // 9, cy - h // 3, cx + w // 9, cy - h // 12), 180, 360, fill=handle, width=max(3, w // 60))


def _draw_shoe(d: ImageDraw.ImageDraw, w: int, h: int, upper: object, sole: object) -> None:
    d.ellipse((w // 6, h // 2, 5 * w // 6, 5 * h // 6), fill=upper)
    d.polygon([(w // 6, 2 * h // 3), (w // 3, h // 4), (w // 2, h // 4), (w // 2, 2 * h // 3)], fill=upper)
    d.rectangle((w // 6, 3 * h // 4, 5 * w // 6, 5 * h // 6), fill=sole)


def _photo(draw: Callable[..., None], w: int, h: int, seed: int, *colours: object) -> Image.Image:
    img = _backdrop(w, h, seed)
    draw(ImageDraw.Draw(img), w, h, *colours)
    return img


def _mask(draw: Callable[..., None], w: int, h: int) -> Image.Image:
    """The product's exact mask (mode L, 255 = product), drawn with the photo's shapes."""
    m = Image.new("L", (w, h), 0)
    draw(ImageDraw.Draw(m), w, h, 255, 255)
    return m


def handbag(w: int = 640, h: int = 480) -> Image.Image:
    return _photo(_draw_handbag, w, h, 1, (120, 60, 30), (90, 45, 20))


def handbag_mask(w: int = 640, h: int = 480) -> Image.Image:
    """The handbag's exact mask (mode L, 255 = product), drawn with the same shapes."""
    return _mask(_draw_handbag, w, h)


def shoe(w: int = 720, h: int = 400) -> Image.Image:
    return _photo(_draw_shoe, w, h, 2, (30, 30, 160), (240, 240, 240))


def shoe_mask(w: int = 720, h: int = 400) -> Image.Image:
    """The shoe's exact mask (mode L, 255 = product)."""
    return _mask(_draw_shoe, w, h)


def write_shop_samples(folder: Path) -> tuple[list[tuple[Path, str]], Path]:
    """Sample photos with their known masks for the shop outputs (no model needed): writes
    ``folder/photos/{handbag,shoe}.png`` and ``folder/masks/`` (same names). Returns
    ``([(photo, class)], masks folder)``."""
    photos, masks = folder / "photos", folder / "masks"
    photos.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    out = []
    for name, img, mask in (("handbag", handbag(), handbag_mask()), ("shoe", shoe(), shoe_mask())):
        img.save(photos / f"{name}.png")
        mask.save(masks / f"{name}.png")
        out.append((photos / f"{name}.png", name))
    return out, masks


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
