"""Mask and compositing helpers shared by the edits (displace, enhance, rotate).

Conventions used throughout:

* images are ``HxWx3`` ``uint8`` numpy arrays in RGB order (values 0..255) unless a function says
  it takes a PIL image; every helper also accepts ``HxW`` single-channel arrays where it makes sense;
* masks are ``HxW`` ``bool`` arrays at the image's full resolution;
* alpha is an ``HxW`` ``float32`` array in ``[0, 1]``;
* offsets are integer pixels, ``+x`` to the right and ``+y`` downwards.

Exactness matters more than elegance here: QA relies on pixels with alpha exactly 0 being the
background's bytes and pixels with alpha exactly 1 being the source's bytes, so no helper ever
blurs or resamples across those.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

__all__ = [
    "bbox",
    "dilate",
    "extend_edges",
    "feather_alpha",
    "inner_feather_alpha",
    "parse_offset",
    "paste",
    "ring",
    "shift_image",
    "shift_mask",
]


def _bool_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D (HxW), got shape {m.shape}")
    return m if m.dtype == bool else m.astype(bool)


def bbox(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels grown by ``pad`` on each side and clipped to the mask;
    x1/y1 exclusive. None for an empty mask.

    From row and column projections: ``np.nonzero`` would allocate 16 bytes per true pixel
    (150 MB for a product filling a fifth of a 48 MP photo)."""
    m = _bool_mask(mask)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if not len(rows):
        return None
    h, w = m.shape
    return (max(0, int(cols[0]) - pad), max(0, int(rows[0]) - pad),
            min(w, int(cols[-1]) + 1 + pad), min(h, int(rows[-1]) + 1 + pad))


def _ellipse(px: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """HxW bool -> HxW bool grown by ``px`` pixels (elliptical kernel of diameter ``2*px+1``).

    ``px <= 0`` returns a copy. Pixels beyond the image border never count as set.
    """
    import cv2

    m = _bool_mask(mask)
    out = m.copy()
    if px <= 0:
        return out
    box = bbox(m, pad=px)
    if box is None:
        return out
    # Work on the bounding box only: a 41x41 kernel over a 24 MP photo costs seconds.
    x0, y0, x1, y1 = box
    sub = np.ascontiguousarray(m[y0:y1, x0:x1], dtype=np.uint8)
    grown = cv2.dilate(sub, _ellipse(px), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    out[y0:y1, x0:x1] = grown.astype(bool)
    return out


def ring(mask: np.ndarray, px: int) -> np.ndarray:
    """HxW bool: the band of width ``px`` just outside ``mask`` (``dilate(mask, px) & ~mask``)."""
    m = _bool_mask(mask)
    return dilate(m, px) & ~m


def feather_alpha(mask: np.ndarray, px: int) -> np.ndarray:
    """Alpha for pasting an object cut out with ``mask``: HxW float32 in [0, 1].

    Exactly 1.0 on every mask pixel (so the object's own pixels are pasted unchanged) and a linear
    ramp *outside* it, ``1 - d / (px + 1)`` for a pixel at Euclidean distance ``d`` from the mask,
    limited to ``dilate(mask, px)``, 0 everywhere else. ``px <= 0`` gives the hard mask as float.
    """
    import cv2

    m = _bool_mask(mask)
    alpha = m.astype(np.float32)
    if px <= 0:
        return alpha
    box = bbox(m, pad=px + 1)
    if box is None:
        return alpha
    x0, y0, x1, y1 = box
    sub = m[y0:y1, x0:x1]
    # Distance from each outside pixel to the nearest mask pixel (exact Euclidean).
    d = cv2.distanceTransform(np.ascontiguousarray(~sub, dtype=np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ramp = np.clip(1.0 - d / (px + 1), 0.0, 1.0).astype(np.float32)
    # The ramp must stay inside the dilated band so edit masks built with dilate() cover it.
    ramp[~dilate(sub, px)] = 0.0
    ramp[sub] = 1.0
    alpha[y0:y1, x0:x1] = ramp
    return alpha


def extend_edges(arr: np.ndarray, mask: np.ndarray, px: int) -> np.ndarray:
    """Copy of ``arr`` (HxW or HxWxC) where every pixel within ``px`` outside ``mask`` takes the
    value of its nearest mask pixel; mask pixels and everything farther away are unchanged.

    Feeding this (instead of the raw image) to :func:`paste` with :func:`feather_alpha` softens a
    cut-out's edge with the object's own edge colours, so none of its old surroundings travel with
    it (the "cut-out halo").
    """
    import cv2

    a = np.asarray(arr)
    m = _bool_mask(mask)
    out = a.copy()
    box = bbox(m, pad=px)
    if px <= 0 or box is None:
        return out
    x0, y0, x1, y1 = box
    sub = m[y0:y1, x0:x1]
    _, labels = cv2.distanceTransformWithLabels(np.ascontiguousarray(~sub, dtype=np.uint8), cv2.DIST_L2,
                                                cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL)
    # Each mask pixel has its own label; map labels back to that pixel's coordinates.
    zy, zx = np.nonzero(sub)
    lut_y = np.zeros(int(labels.max()) + 1, np.intp)
    lut_x = np.zeros_like(lut_y)
    lut_y[labels[zy, zx]], lut_x[labels[zy, zx]] = zy, zx
    band = dilate(sub, px) & ~sub
    by, bx = np.nonzero(band)
    src = a[y0:y1, x0:x1]
    out[y0:y1, x0:x1][by, bx] = src[lut_y[labels[by, bx]], lut_x[labels[by, bx]]]
    return out


def inner_feather_alpha(region: np.ndarray, px: int, core: np.ndarray | None = None) -> np.ndarray:
    """Alpha for pasting generated pixels back *inside* ``region`` only: HxW float32 in [0, 1].

    0 outside ``region`` (so those pixels stay the background's exactly), ramping up over ``px``
    pixels inward from the region's edge, 1 deeper inside, and forced to 1 on ``core`` (a sub-mask
    that must be fully replaced, e.g. the object being removed). ``px <= 0`` gives the hard region.
    """
    import cv2

    r = _bool_mask(region)
    alpha = r.astype(np.float32)
    if px > 0:
        box = bbox(r, pad=1)
        if box is not None:
            x0, y0, x1, y1 = box
            sub = r[y0:y1, x0:x1]
            # Distance from each region pixel to the nearest pixel outside it (1 at the edge).
            # Pad with "outside" only where the crop stops short of the image border, so the
            # image edge itself does not count as an edge to blend towards.
            H, W = r.shape
            padded = np.pad(sub, 1, mode="edge")
            if y0 > 0:
                padded[0, :] = False
            if y1 < H:
                padded[-1, :] = False
            if x0 > 0:
                padded[:, 0] = False
            if x1 < W:
                padded[:, -1] = False
            d = cv2.distanceTransform(np.ascontiguousarray(padded, dtype=np.uint8), cv2.DIST_L2,
                                      cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
            ramp = np.clip(d / (px + 1), 0.0, 1.0).astype(np.float32)
            ramp[~sub] = 0.0
            alpha[y0:y1, x0:x1] = ramp
    if core is not None:
        alpha[_bool_mask(core) & r] = 1.0
    return alpha


def _shift_slices(n: int, d: int) -> tuple[slice, slice] | None:
    """(source slice, destination slice) along one axis of length ``n`` for an offset ``d``."""
    if abs(d) >= n:
        return None
    if d >= 0:
        return slice(0, n - d), slice(d, n)
    return slice(-d, n), slice(0, n + d)


def shift_image(arr: np.ndarray, dx: int, dy: int, fill: float | int | bool = 0) -> np.ndarray:
    """Translate an ``HxW`` or ``HxWxC`` array by integer (dx, dy), same shape and dtype.

    Content moved past the border is dropped (clipped); uncovered pixels get ``fill``.
    """
    a = np.asarray(arr)
    out = np.full_like(a, fill)
    h, w = a.shape[:2]
    sy, sx = _shift_slices(h, int(dy)), _shift_slices(w, int(dx))
    if sy is None or sx is None:
        return out
    out[sy[1], sx[1]] = a[sy[0], sx[0]]
    return out


def shift_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """HxW bool translated by integer (dx, dy); the part moved out of frame is dropped."""
    return shift_image(_bool_mask(mask), dx, dy, False)


def paste(background: np.ndarray, source: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite ``source`` over ``background``: uint8, same shape as ``background``.

    ``background``/``source``: ``HxWx3`` (or ``HxW``) uint8 arrays of one shape (PIL images are
    accepted and converted); ``alpha``: HxW float in [0, 1]. Where ``alpha == 1`` the result holds
    the source's exact bytes, where ``alpha == 0`` the background's exact bytes; in between
    ``round(a * source + (1 - a) * background)``.
    """
    bg = np.asarray(background)
    src = np.asarray(source)
    a = np.asarray(alpha, dtype=np.float32)
    if bg.shape != src.shape or bg.shape[:2] != a.shape:
        raise ValueError(f"paste: shapes differ (background {bg.shape}, source {src.shape}, alpha {a.shape})")
    if bg.dtype != np.uint8 or src.dtype != np.uint8:
        raise ValueError("paste: background and source must be uint8")
    out = bg.copy()
    full = a >= 1.0
    out[full] = src[full]
    part = (a > 0.0) & ~full
    if part.any():
        ap = a[part]
        if bg.ndim == 3:
            ap = ap[:, None]
        mixed = src[part].astype(np.float32) * ap + bg[part].astype(np.float32) * (1.0 - ap)
        out[part] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


_INT_RE = re.compile(r"[+-]?\d+")
_FRAC_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)")


def parse_offset(value: str | int | float, size: int) -> int:
    """An offset along one axis, in whole pixels.

    ``value`` is an integer number of pixels (``162``, ``"-40"``, ``"+5"``), or a fraction of
    ``size`` (the image's width for x, height for y): a decimal number in [-1, 1] (``0.1``,
    ``"-0.25"``) or a percentage in [-100 %, 100 %] (``"-10%"``). A fraction is rounded to the
    nearest pixel (halves away from zero). Raises ValueError with the reason otherwise.
    """
    if isinstance(value, bool):
        raise ValueError(f"offset {value!r} is not a number")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        frac = float(value)
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if _INT_RE.fullmatch(text):
            return int(text)
        if text.endswith("%") and _FRAC_RE.fullmatch(text[:-1]):
            frac = float(text[:-1]) / 100.0
            if abs(frac) > 1.0:
                raise ValueError(f"offset {value!r}: a percentage must lie within -100% .. 100%")
        elif _FRAC_RE.fullmatch(text):
            frac = float(text)
        else:
            raise ValueError(f"offset {value!r} is not a number of pixels (e.g. 162, -40), a fraction "
                             "(e.g. 0.1, -0.25) or a percentage (e.g. -10%)")
    else:
        raise ValueError(f"offset {value!r} is not a number")
    if not math.isfinite(frac) or abs(frac) > 1.0:
        raise ValueError(f"offset {value!r}: a decimal offset is a fraction of the image size and must lie "
                         "within -1 .. 1 (write whole pixels without a decimal point, e.g. 162)")
    px = math.floor(abs(frac) * size + 0.5)
    return int(math.copysign(px, frac)) if px else 0


def mask_area_share_outside(mask: np.ndarray, dx: int, dy: int) -> float:
    """Share (0..1) of ``mask``'s pixels that a shift by (dx, dy) moves out of the frame."""
    m = _bool_mask(mask)
    total = int(m.sum())
    if total == 0:
        return 0.0
    return 1.0 - int(shift_mask(m, dx, dy).sum()) / total


def union(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Logical OR of HxW bool masks of one shape."""
    out = _bool_mask(masks[0]).copy()
    for m in masks[1:]:
        out |= _bool_mask(m)
    return out
