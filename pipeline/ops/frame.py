"""``frame``: crop and pad around the product to a frame of a given aspect (or size), the product's
box filling ``fill`` of the frame along its limiting side, padding in ``pad_color``.

The result has another size than the input, so the edit carries a
:class:`~pipeline.ops.geometry.Transform` (crop box, resize, placement, padding colour) and the QA
gate recomputes ``transform.apply(input)`` and compares pixel for pixel. At scale 1 the
product's pixels are copied bit for bit; when the product must grow (``min_long_side``, a fixed
``size``), ``upscale`` decides: ``resample`` (Lanczos inside the transform: still proven by
QA), ``upscaler`` (the learned ``upscaler`` role: the placed region is then new pixels and is
the edit's mask) or ``refuse``. The record says which, with the factor.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from PIL import Image

from pipeline.io.composite import bbox
from pipeline.ops.edits import Edit, EditContext, EditError, OpParams
from pipeline.ops.geometry import Transform
from pipeline.settings import FrameSettings, parse_colour
from pipeline.ops.upscale import upscale, upscale_factor


def frame_size(box_wh: tuple[int, int], in_size: tuple[int, int], s: FrameSettings) -> tuple[tuple[int, int], float]:
    """``((W, H), scale)``: the frame size and the product's scale so that its box (``box_wh``,
    input pixels) fills ``s.fill`` of the frame along its limiting side."""
    bw, bh = box_wh
    if s.size is not None:
        W, H = s.size
        return (W, H), s.fill / max(bw / W, bh / H)
    a = s.ratio(in_size)
    # At scale 1: the smallest frame of aspect a in which the box fills `fill` on one side.
    W = max(bw / s.fill, a * bh / s.fill)
    H = W / a
    scale = 1.0
    if max(W, H) < s.min_long_side:
        scale = s.min_long_side / max(W, H)
    if scale == 1.0:
        Wi, Hi = int(round(W)), int(round(H))
    elif W >= H:
        Wi = s.min_long_side
        Hi = int(round(Wi / a))
    else:
        Hi = s.min_long_side
        Wi = int(round(Hi * a))
    # The exact scale for the rounded frame (the box fills `fill` of the limiting side).
    return (Wi, Hi), s.fill / max(bw / Wi, bh / Hi)


def plan_transform(mask: np.ndarray, s: FrameSettings) -> Transform:
    """The transform that frames the product ``mask`` (HxW bool) as ``s`` asks."""
    H0, W0 = mask.shape
    box = bbox(mask)
    if box is None:
        raise EditError("frame: the product mask is empty")
    bx0, by0, bx1, by1 = box
    bw, bh = bx1 - bx0, by1 - by0
    (W, H), k = frame_size((bw, bh), (W0, H0), s)
    if abs(k - 1.0) < 1e-9:
        k = 1.0
    # Where the product box lands (integer top-left), by the anchor.
    pw, ph = bw * k, bh * k
    px0 = int(round((W - pw) / 2))
    py0 = {"center": int(round((H - ph) / 2)), "bottom": int(round(H - ph - (W - pw) / 2)),
           "top": int(round((W - pw) / 2))}[s.anchor]
    py0 = max(0, min(py0, int(H - math.ceil(ph))))

    def axis(b0: int, p0: int, n_in: int, n_out: int) -> tuple[int, int, int, int]:
        lo = b0 - p0 / k                  # input coordinate at output 0
        c0 = max(0, math.ceil(lo - 1e-9))
        c1 = min(n_in, math.floor(lo + n_out / k + 1e-9))
        at = int(round((c0 - lo) * k))
        size = min(int(round((c1 - c0) * k)), n_out - at)
        return c0, c1, at, size

    cx0, cx1, ax, sw = axis(bx0, px0, W0, W)
    cy0, cy1, ay, sh = axis(by0, py0, H0, H)
    return Transform((W0, H0), (cx0, cy0, cx1, cy1), (sw, sh), (ax, ay), (W, H), parse_colour(s.pad_color))


class FrameParams(OpParams):
    """``frame``: every field of the ``frame`` settings section may be overridden (``aspect``,
    ``size``, ``fill``, ``min_long_side``, ``anchor``, ``pad_color``, ``upscale``)."""

    section = "frame"
    settings: FrameSettings


def frame(image: Image.Image, mask: np.ndarray, label: str, s: FrameSettings, registry: Any = None) -> Edit:
    """Frame the product under ``mask`` (HxW bool) in ``image`` (PIL RGB). Returns an :class:`Edit`
    of the frame's size with its :class:`Transform`; ``edit_mask`` is empty (nothing but the
    transform happened) unless the learned upscaler drew the placed region."""
    t0 = time.perf_counter()
    m = np.asarray(mask, bool)
    tr = plan_transform(m, s)
    sx, sy = tr.scale
    k = max(sx, sy)
    rec: dict[str, Any] = {"op": "frame", "label": label, "transform": tr.to_record(), "fill": s.fill,
                           "aspect": s.aspect if s.size is None else None, "size": list(s.size) if s.size else None,
                           "anchor": s.anchor, "pad_color": s.pad_color, "upscaled": k > 1.0 + 1e-9,
                           "scale": round(k, 4)}
    if k > s.max_upscale + 1e-9 or (k > 1.0 + 1e-9 and s.upscale == "refuse"):
        why = "upscale: refuse" if s.upscale == "refuse" else f"max_upscale {s.max_upscale}"
        raise EditError(f"frame: the product would have to be scaled up x{k:.2f} to fill {s.fill:.0%} of a "
                        f"{tr.out_size[0]}x{tr.out_size[1]} frame ({why})")
    arr = np.asarray(image)
    edit_mask = np.zeros((tr.out_size[1], tr.out_size[0]), bool)
    if k > 1.0 + 1e-9 and s.upscale == "upscaler":
        x0, y0, x1, y1 = tr.crop
        region = Image.fromarray(np.ascontiguousarray(arr[y0:y1, x0:x1]))
        n = 0
        factor = upscale_factor(registry)
        while region.width < tr.size[0] and n < 4:
            region = upscale(region, registry)
            n += 1
        region = region.resize(tr.size, Image.Resampling.LANCZOS)
        out = tr.apply(arr)
        ax, ay = tr.at
        out[ay:ay + tr.size[1], ax:ax + tr.size[0]] = np.asarray(region)
        edit_mask = tr.placed()
        rec["upscaled_by"] = {"method": "upscaler", "passes": n, "factor": factor,
                              "model": registry.provenance("upscaler")}
    else:
        out = tr.apply(arr)
        if k > 1.0 + 1e-9:
            rec["upscaled_by"] = {"method": "resample", "filter": "lanczos"}
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    result = Image.fromarray(out, "RGB")
    return Edit(result, edit_mask, tr.mask(m), rec, transform=tr)


def run_frame(image: Image.Image, mask: np.ndarray, label: str, params: FrameParams, ctx: EditContext) -> Edit:
    return frame(image, mask, label, params.settings, ctx.registry)
