"""A size change, represented so the QA gate can prove it: :class:`Transform`.

An edit that crops, pads or scales (``frame``) returns an image of another size. It carries a
:class:`Transform` that says exactly how every input pixel maps to the output: the input box
``crop`` (x0, y0, x1, y1; integer pixels, inside the input) is resized to ``size`` (w, h) with
Pillow's Lanczos filter (skipped when the size is unchanged: then the pixels are copied bit for
bit) and placed with its top-left corner at ``at`` (x, y) on a canvas of ``out_size`` filled with
``fill`` (RGB). :meth:`Transform.apply` is that operation, deterministic, and the only one that
does it, so the QA gate recomputes the expected output from the image before the edit and
compares pixel for pixel: nothing but the transform may have happened outside the edit's mask.

Masks follow the transform two ways: :meth:`Transform.mask` (where a region *is* afterwards:
resampled coverage >= 0.5; exact at scale 1) and :meth:`Transform.reach` (every output pixel a
region's pixels can influence through the resampling filter: conservative, for "what may have
changed").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pipeline.io.composite import dilate

# Pillow's Lanczos kernel reaches 3 source pixels either side (scaled by 1/scale when shrinking).
_LANCZOS_SUPPORT = 3.0


@dataclass(frozen=True)
class Transform:
    """Crop ``crop`` of an ``in_size`` image, resize to ``size``, paste at ``at`` on an
    ``out_size`` canvas of colour ``fill``. Sizes are (width, height) in pixels."""

    in_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    at: tuple[int, int]
    out_size: tuple[int, int]
    fill: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.crop
        W, H = self.in_size
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise ValueError(f"crop {self.crop} is not inside the {W}x{H} input")
        ax, ay = self.at
        w, h = self.size
        if not (0 <= ax and 0 <= ay and ax + w <= self.out_size[0] and ay + h <= self.out_size[1] and w > 0 and h > 0):
            raise ValueError(f"placed region {self.size} at {self.at} does not fit the {self.out_size} output")

    @property
    def scale(self) -> tuple[float, float]:
        """Output pixels per input pixel, (x, y)."""
        x0, y0, x1, y1 = self.crop
        return self.size[0] / (x1 - x0), self.size[1] / (y1 - y0)

    @property
    def resampled(self) -> bool:
        x0, y0, x1, y1 = self.crop
        return self.size != (x1 - x0, y1 - y0)

    def placed(self) -> np.ndarray:
        """HxW bool (output size): the pixels that come from the input (not padding)."""
        out = np.zeros((self.out_size[1], self.out_size[0]), bool)
        ax, ay = self.at
        out[ay:ay + self.size[1], ax:ax + self.size[0]] = True
        return out

    def apply(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB (or HxW uint8) in input size -> the same kind in output size.
        Padding takes ``fill`` (its first value for a single channel)."""
        arr = np.asarray(image)
        if arr.shape[:2] != (self.in_size[1], self.in_size[0]):
            raise ValueError(f"transform for {self.in_size} applied to an image of {arr.shape[1::-1]}")
        x0, y0, x1, y1 = self.crop
        region = arr[y0:y1, x0:x1]
        if self.resampled:
            pil = Image.fromarray(np.ascontiguousarray(region))
            region = np.asarray(pil.resize(self.size, Image.Resampling.LANCZOS))
        shape = (self.out_size[1], self.out_size[0], *arr.shape[2:])
        fill = self.fill if arr.ndim == 3 else self.fill[0]
        out = np.empty(shape, np.uint8)
        out[...] = fill
        ax, ay = self.at
        out[ay:ay + self.size[1], ax:ax + self.size[0]] = region
        return out

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Where the region ``mask`` (HxW bool, input size) is in the output: output-size bool.
        At scale 1 an exact copy; resampled, coverage >= 0.5 (bilinear)."""
        x0, y0, x1, y1 = self.crop
        sub = np.asarray(mask, bool)[y0:y1, x0:x1]
        if self.resampled:
            f = Image.fromarray(sub.astype(np.float32)).resize(self.size, Image.Resampling.BILINEAR)
            sub = np.asarray(f) >= 0.5
        out = np.zeros((self.out_size[1], self.out_size[0]), bool)
        ax, ay = self.at
        out[ay:ay + self.size[1], ax:ax + self.size[0]] = sub
        return out

    def reach(self, mask: np.ndarray) -> np.ndarray:
        """Every output pixel the pixels of ``mask`` (input size) can influence through the
        resampling (conservative): output-size bool."""
        m = np.asarray(mask, bool)
        if not self.resampled:
            return self.mask(m)
        sx, sy = self.scale
        r = int(math.ceil(_LANCZOS_SUPPORT * max(1.0, 1.0 / min(sx, sy)))) + 1
        grown = dilate(m, r) if m.any() else m
        x0, y0, x1, y1 = self.crop
        f = Image.fromarray(grown[y0:y1, x0:x1].astype(np.float32)).resize(self.size, Image.Resampling.BILINEAR)
        out = np.zeros((self.out_size[1], self.out_size[0]), bool)
        ax, ay = self.at
        out[ay:ay + self.size[1], ax:ax + self.size[0]] = np.asarray(f) > 0.0
        return out

    def to_record(self) -> dict[str, Any]:
        sx, sy = self.scale
        return {"in_size": list(self.in_size), "crop": list(self.crop), "size": list(self.size), "at": list(self.at),
                "out_size": list(self.out_size), "fill": list(self.fill), "scale": [round(sx, 4), round(sy, 4)],
                "resampled": self.resampled}
