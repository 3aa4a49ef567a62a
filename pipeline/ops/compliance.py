"""Compliance check: measure an image file against a profile's rules (:class:`CheckSettings`).

Measured on the file as written (decoded again), so what is checked is what the marketplace gets
(a JPEG's compression included). Figures: size, long side, format, colour space, file size;
with the product's mask (HxW bool at the file's size): the share of exactly-``background``
pixels outside the product and its ``edge_band`` (the anti-aliased edge is not counted), and the
product fill (its box over the frame along the limiting side, ``max(box_w / W, box_h / H)``);
borders: uniform lines at an edge in a colour that is not the background. Each rule that fails
adds a line saying figure vs rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.imageio import colour_space, load_image
from pipeline.io.composite import bbox, dilate
from pipeline.settings import CheckSettings, parse_colour


def border_lines(rgb: np.ndarray, background: tuple[int, int, int] | None, tol: int = 2) -> dict[str, int]:
    """Per side (top, bottom, left, right): how many outermost lines are one uniform colour (every
    channel within ``tol``) that is not ``background`` and differs from the first line inside
    them (mean difference > 24). Up to 10% of the side is looked at."""
    H, W = rgb.shape[:2]
    a = rgb.astype(np.int16)
    out: dict[str, int] = {}
    sides = {"top": lambda i: a[i], "bottom": lambda i: a[H - 1 - i], "left": lambda i: a[:, i],
             "right": lambda i: a[:, W - 1 - i]}
    for name, line in sides.items():
        n_max = max(1, (H if name in ("top", "bottom") else W) // 10)
        n = 0
        while n < n_max:
            ln = line(n)
            if int((ln.max(0) - ln.min(0)).max()) > tol:
                break
            colour = ln.mean(0)
            if background is not None and np.abs(colour - np.array(background)).max() <= tol:
                break
            n += 1
        if n:
            inner = line(n).mean(0)
            if np.abs(line(n - 1).mean(0) - inner).mean() <= 24:
                n = 0
        out[name] = n
    return out


def measure(path: Path, mask: np.ndarray | None, rules: CheckSettings) -> dict[str, Any]:
    """Check the image file ``path`` against ``rules``; ``mask``: the product (HxW bool at the
    image's size), or None (background and fill are then not measured and fail if required).
    Returns ``{passed, failures: [...], figures: {...}}``."""
    loaded = load_image(path)
    rgb = np.asarray(loaded.image.convert("RGB"))
    H, W = rgb.shape[:2]
    fig: dict[str, Any] = {"size": [W, H], "long_side": max(W, H), "short_side": min(W, H),
                           "format": loaded.format, "mode": loaded.original_mode,
                           "colour_space": colour_space(loaded.icc_profile), "bytes": Path(path).stat().st_size}
    fails: list[str] = []
    bg = parse_colour(rules.background) if rules.background else None
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != (H, W):
            raise ValueError(f"mask {m.shape[::-1]} does not match the image {W}x{H}")
        box = bbox(m)
        if box is not None:
            bw, bh = box[2] - box[0], box[3] - box[1]
            fig["product_box"] = list(box)
            fig["fill"] = round(max(bw / W, bh / H), 4)
            fig["fill_area"] = round(float(m.sum()) / (W * H), 4)
        if bg is not None:
            outside = ~dilate(m, rules.edge_band) if rules.edge_band else ~m
            n = int(outside.sum())
            exact = int((rgb[outside] == np.array(bg, np.uint8)).all(-1).sum())
            fig["background_share"] = round(exact / n, 4) if n else 1.0
            fig["background_pixels"] = n
    if bg is not None:
        share = fig.get("background_share")
        if share is None:
            fails.append("background: no product mask to measure it with")
        elif share < rules.min_background_share:
            fails.append(f"background: {share:.1%} of the pixels outside the product are exactly {rules.background} "
                         f"(at least {rules.min_background_share:.0%} required)")
    if rules.min_fill is not None or rules.max_fill is not None:
        f = fig.get("fill")
        if f is None:
            fails.append("fill: no product mask to measure it with")
        else:
            if rules.min_fill is not None and f < rules.min_fill - 0.005:
                fails.append(f"fill: the product fills {f:.1%} of the frame (at least {rules.min_fill:.0%})")
            if rules.max_fill is not None and f > rules.max_fill + 0.005:
                fails.append(f"fill: the product fills {f:.1%} of the frame (at most {rules.max_fill:.0%})")
    L, S = max(W, H), min(W, H)
    if rules.min_long_side is not None and L < rules.min_long_side:
        fails.append(f"size: long side {L} px (at least {rules.min_long_side})")
    if rules.max_long_side is not None and L > rules.max_long_side:
        fails.append(f"size: long side {L} px (at most {rules.max_long_side})")
    if rules.min_short_side is not None and S < rules.min_short_side:
        fails.append(f"size: short side {S} px (at least {rules.min_short_side})")
    if rules.square and W != H:
        fails.append(f"size: {W}x{H} is not square")
    if rules.formats is not None and loaded.format.upper() not in {f.upper() for f in rules.formats}:
        fails.append(f"format: {loaded.format} (allowed: {', '.join(rules.formats)})")
    if rules.srgb and fig["colour_space"] not in ("sRGB", "untagged"):
        fails.append(f"colour space: {fig['colour_space']} (sRGB required)")
    if rules.max_bytes is not None and fig["bytes"] > rules.max_bytes:
        fails.append(f"file size: {fig['bytes']} bytes (at most {rules.max_bytes})")
    if rules.no_borders:
        b = border_lines(rgb, bg)
        fig["borders"] = b
        if any(b.values()):
            fails.append("borders: " + ", ".join(f"{k} {v} px" for k, v in b.items() if v))
    return {"passed": not fails, "failures": fails, "figures": fig}


def summary(check: dict[str, Any]) -> str:
    """One line for tables and the report: the key figures, then the failures."""
    f = check.get("figures") or {}
    parts = [f"{f['size'][0]}x{f['size'][1]}" if "size" in f else "", f.get("format", "")]
    if "fill" in f:
        parts.append(f"fill {f['fill']:.1%}")
    if "background_share" in f:
        parts.append(f"background {f['background_share']:.1%}")
    if f.get("colour_space"):
        parts.append(f["colour_space"])
    head = ", ".join(p for p in parts if p)
    return f"{'pass' if check.get('passed') else 'FAIL'}: {head}" + ("; " + "; ".join(check["failures"])
                                                                    if check.get("failures") else "")
