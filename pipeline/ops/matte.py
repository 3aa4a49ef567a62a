"""Cut the object out of a novel view rendered on white (Zero123 draws its objects on white).

Steps (all on the view, at its own resolution):

1. **Rough mask**: a pixel is foreground when its distance from white, ``max(255 - R, 255 - G,
   255 - B)``, exceeds ``threshold``. The per-channel maximum (not a mean) keeps saturated
   light colours (pale yellow has a small mean distance but a large blue one).
2. **Cleanup**: morphological opening (drops specks and the faint grey noise diffusion leaves in
   the white), closing (bridges thin gaps), then the largest connected component with its
   enclosed holes filled (white parts *inside* the object belong to it).
3. **SAM refinement** (when a registry is given): SAM with the rough mask's box as the prompt; of
   its candidates the one agreeing best with the rough mask (IoU) is kept, cleaned the same way,
   when that IoU reaches ``min_iou``. Otherwise the rough mask stays and the record says why
   (SAM can latch onto a part or a shadow; the colour mask is the safer default).
4. **Alpha** with a clean edge: 1 inside the mask eroded by ``edge`` px, 0 outside the mask
   dilated by ``edge`` px, and in the band between a smooth ramp (a box-filtered mask), so the
   edge is soft but never reaches farther than ``edge`` px. ``rgb`` is the view with the band's
   colours replaced by the nearest interior colours (:func:`pipeline.io.composite.extend_edges`):
   the anti-aliased edge pixels of the view are blends with white, and pasting them onto a
   darker backdrop would draw a white fringe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.io.composite import bbox, dilate, extend_edges
from pipeline.detect.detector import fill_holes
from pipeline.detect.fronts import HFSamProposer
from pipeline.models.registry import HFSamBundle

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry

__all__ = ["Matte", "matte", "rough_mask", "clean_mask"]


@dataclass
class Matte:
    """A matted view.

    ``alpha``: HxW float32 in [0, 1]; ``mask``: HxW bool (the hard object mask, alpha >= 0.5 on
    it); ``rgb``: HxWx3 uint8 RGB, the view with white-contaminated edge colours replaced;
    ``record``: what was done (threshold, areas, whether SAM was used and its IoU).
    """

    alpha: np.ndarray
    mask: np.ndarray
    rgb: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def _ellipse(px: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def rough_mask(rgb: np.ndarray, threshold: int) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW bool: distance from white (max over channels) > ``threshold``."""
    a = np.asarray(rgb)
    return (255 - a.min(axis=2).astype(np.int16)) > int(threshold)


def clean_mask(mask: np.ndarray, px: int) -> np.ndarray:
    """Open and close with an elliptical kernel of radius ``px`` (0: skip), keep the largest
    8-connected component, fill its enclosed holes. HxW bool -> HxW bool (may be empty)."""
    import cv2

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if px > 0:
        k = _ellipse(px)
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
        # Closing near the border must not invent pixels from outside the view.
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros(m.shape, bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return fill_holes(labels == biggest)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _sam_refine(rgb: np.ndarray, rough: np.ndarray, registry: "ModelRegistry", pad: int) -> tuple[np.ndarray, float]:
    """Best-agreeing SAM candidate for a box prompt around ``rough``; (mask, IoU with rough)."""
    import torch
    from segment_anything import SamPredictor

    H, W = rough.shape
    x0, y0, x1, y1 = bbox(rough, pad=pad)
    bundle = registry.get("sam")
    if isinstance(bundle, HFSamBundle):  # a transformers segmenter: its single box mask
        prop = HFSamProposer(bundle, registry.runtime.device)
        prop.set_image(np.ascontiguousarray(rgb))
        cand = prop.propose_boxes(np.array([[x0, y0, x1, y1]], np.float32))
        m = prop.full_mask(cand.logits[:1])
        return m, _iou(m, rough)
    predictor = SamPredictor(bundle.model)
    with torch.inference_mode():
        predictor.set_image(np.ascontiguousarray(rgb), image_format="RGB")
        # SAM's box convention: x0, y0, x1, y1 inclusive pixel coordinates.
        masks, _, _ = predictor.predict(box=np.array([x0, y0, x1 - 1, y1 - 1], dtype=np.float32),
                                        multimask_output=True)
    ious = [_iou(m.astype(bool), rough) for m in masks]
    best = int(np.argmax(ious))
    return masks[best].astype(bool), float(ious[best])


def _alpha(mask: np.ndarray, edge: int) -> np.ndarray:
    import cv2

    m = mask.astype(np.float32)
    if edge <= 0:
        return m
    k = 2 * edge + 1
    soft = cv2.blur(m, (k, k), borderType=cv2.BORDER_CONSTANT)
    inner = ~dilate(~mask, edge)  # the mask eroded by `edge` (image border counts as inside)
    outer = dilate(mask, edge)
    soft[inner] = 1.0
    soft[~outer] = 0.0
    # The hard mask must read as foreground wherever alpha is thresholded at 0.5.
    soft[mask] = np.maximum(soft[mask], 0.5)
    return np.clip(soft, 0.0, 1.0).astype(np.float32)


def matte(view: Image.Image, *, registry: "ModelRegistry | None" = None, threshold: int = 24, edge: int = 1,
          cleanup: int | None = None, min_iou: float = 0.6) -> Matte:
    """Matte the object in ``view`` (PIL, converted to RGB; the object on a white background).

    ``threshold``: distance from white (0..255, max over R, G, B) above which a pixel is
    foreground. ``edge``: alpha ramp half-width in px. ``cleanup``: morphology radius in px
    (default ~0.5 % of the view's long side, at least 1). ``registry``: when given, SAM (role
    ``sam``) refines the mask; its candidate is used when its IoU with the colour mask is at least
    ``min_iou``. Returns :class:`Matte` (empty mask when nothing differs from white).
    """
    rgb = np.asarray(view.convert("RGB"))
    H, W = rgb.shape[:2]
    px = max(1, round(0.005 * max(H, W))) if cleanup is None else int(cleanup)
    rough = clean_mask(rough_mask(rgb, threshold), px)
    rec: dict[str, Any] = {"threshold": int(threshold), "cleanup_px": px, "edge_px": int(edge),
                           "view_size": [W, H], "rough_pixels": int(rough.sum()), "refine": None}
    mask = rough
    if registry is not None and rough.any():
        cand, iou = _sam_refine(rgb, rough, registry, pad=max(2, px))
        cand = clean_mask(cand, 0)
        used = iou >= min_iou and cand.any()
        rec["refine"] = {"method": "sam", "iou_with_colour_mask": round(iou, 4), "min_iou": min_iou,
                         "used": bool(used)}
        if used:
            mask = cand
        else:
            rec["refine"]["reason"] = f"SAM's best candidate agreed with the colour mask by IoU {iou:.2f} < {min_iou}"
    alpha = _alpha(mask, edge)
    core = mask & ~dilate(~mask, edge) if edge > 0 else mask
    # Reach past the diagonal corners of the alpha band (it is `edge` px outside the mask).
    clean_rgb = extend_edges(rgb, core, 2 * edge + 2) if core.any() and edge > 0 else rgb.copy()
    rec.update(mask_pixels=int(mask.sum()), box=list(bbox(mask)) if mask.any() else None)
    return Matte(alpha=alpha, mask=mask, rgb=clean_rgb, record=rec)
