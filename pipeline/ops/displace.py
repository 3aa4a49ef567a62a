"""Displace: move a detected product within the photo.

Steps for one product (image RGB, mask HxW bool at full resolution, offset (dx, dy) in pixels):

1. **Cut**: the product's own pixels (mask) from the untouched input, with alpha exactly 1 on
   them, plus a feathered ramp *outside* the mask made of the product's edge colours extended
   outwards, so the pasted product is bit-identical to the source inside its mask and none of its
   old surroundings come along.
2. **Fill the hole**: the mask dilated by ``fill.mask_dilation`` is filled with background by the
   configured backend (:func:`pipeline.ops.inpaint.fill`: ``lama`` on a crop at the photo's scale,
   ``sd`` inpainting on a crop, or ``classical`` OpenCV ``cv2.inpaint``).
3. **Check and fall back** (:func:`pipeline.ops.inpaint.fill_in_order`): a checker looks at the old
   region of every fill, whatever its backend. If it still looks like the product (SD can paint a
   new object into a hole), SD is retried with seeds ``seed+1, seed+2, ...`` up to ``fill.retries``
   times, then the next backend of the fill order is tried (``fill: sd`` is ``[sd, classical]``);
   the record says which backend filled and why the others were not used.
4. **Paste** the cut product at the new place, clipped at the frame (``out_of_frame: clip``) or
   refused with :class:`~pipeline.ops.edits.EditError` when more than ``max_outside_share`` of it
   would leave the frame (``out_of_frame: refuse``).
5. **Harmonise** (optional, ``harmonize_ring > 0``): inpaint a thin ring just outside the pasted
   product (never inside its mask) with the fill backend that was used, so edges blend.

Pixels outside the filled hole, the pasted product with its feather ring and the harmonised ring
are bit-identical to the input; ``Edit.edit_mask`` is exactly the union of those regions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from pydantic import field_validator

from pipeline.io.composite import dilate, extend_edges, feather_alpha, parse_offset, paste, shift_image, shift_mask, bbox
from pipeline.ops.edits import Edit, EditContext, EditError, Moved, OpParams, checked_product_mask
from pipeline.ops.inpaint import BACKEND_ROLES, fill, fill_in_order
from pipeline.settings import DisplaceSettings, ProductClass
from pipeline.detect.detector import Detector, decide, pad_box

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.detect.detector import Detection
    from pipeline.models.registry import ModelRegistry

# checker(filled image PIL RGB, old product mask HxW bool, label) -> score; a score at or above
# ``FillSettings.recheck_threshold`` means "the product (or a look-alike) is still there".
Checker = Callable[[Image.Image, np.ndarray, str], float]

__all__ = ["Checker", "ClipChecker", "DisplaceParams", "displace", "displace_detection", "run_displace"]


class ClipChecker:
    """Default checker: CLIP on the old region, scored the way detection scores a proposal.

    The old product mask's box, padded by ``detect.context_pad``, is cropped from the filled image
    and scored against every class and the background prompts (one CLIP batch). The score is the
    label's probability when that class is the best one and beats the runner-up (another class or
    the background total) by ``detect.margin``; otherwise 0.0. So with ``recheck_threshold`` equal
    to the class threshold, "still there" means "detection would find it again".
    ``last_detail`` keeps the raw figures of the latest call for the record.
    """

    def __init__(self, registry: "ModelRegistry", classes: Sequence[ProductClass] | None = None):
        self.registry = registry
        self.cfg = registry.settings.detect
        self.classes = list(classes if classes is not None else self.cfg.classes)
        self.detector = Detector(registry, self.cfg)
        self.last_detail: dict[str, Any] = {}

    def __call__(self, image: Image.Image, region_mask: np.ndarray, label: str) -> float:
        classes = self.classes
        if label not in [c.name for c in classes]:
            classes = [*classes, ProductClass(name=label)]
        names = [c.name for c in classes]
        W, H = image.size
        box = bbox(region_mask)
        if box is None:
            return 0.0
        view = pad_box(box, self.cfg.context_pad, W, H)
        cp, bg = self.detector.score_views(image, [view], classes)
        # Class thresholds are replaced by recheck_threshold (applied by the caller); the margin
        # rule stays, so a region that is mostly background never counts as the product.
        labels, _, margins = decide(cp, bg, [0.0] * len(classes), self.cfg.margin)
        idx = names.index(label)
        prob = float(cp[0, idx])
        self.last_detail = {"box": list(view), "prob": round(prob, 4), "background": round(float(bg[0]), 4),
                            "best": names[int(cp[0].argmax())], "margin": round(float(margins[0]), 4),
                            "labelled": bool(labels[0] == idx)}
        return prob if labels[0] == idx else 0.0


def _validate(image: Image.Image, mask: np.ndarray, dx: Any, dy: Any) -> np.ndarray:
    m = checked_product_mask(image, mask, "displace", "move")
    for name, v in (("dx", dx), ("dy", dy)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number of pixels, got {v!r} (see composite.parse_offset)")
    return m


def _round(v: float) -> float:
    return round(float(v), 4)


def displace(image: Image.Image, mask: np.ndarray, label: str, dx: int, dy: int, params: DisplaceSettings,
             registry: "ModelRegistry | None" = None, checker: Checker | None = None,
             classes: Sequence[ProductClass] | None = None) -> Edit:
    """Move the product under ``mask`` by (``dx``, ``dy``) pixels (+x right, +y down).

    ``image``: PIL ``"RGB"`` (uint8, R, G, B). ``mask``: HxW bool, the product at full
    resolution. ``label``: its class name (for the checker and the record). ``params``: the
    ``displace`` settings. ``registry``: needed for the ``lama`` and ``sd`` fills and the default
    CLIP checker.
    ``checker``: ``checker(filled_image, old_mask, label) -> float`` (score >=
    ``params.fill.recheck_threshold`` means still there); an injected checker is always used, else a
    :class:`ClipChecker` when a registry is given and ``params.fill.recheck`` is on, else no check.
    ``classes``: the product classes the CLIP checker scores against (default: ``detect.classes``).

    Returns an :class:`Edit`: the new image, the mask of every pixel that may differ, and the
    record. A zero offset returns the input unchanged (empty edit mask, ``noop`` in the record).
    Raises :class:`EditError` when the product would leave the frame beyond
    ``params.max_outside_share`` under ``out_of_frame: refuse`` (or the mask is empty), and
    ValueError for invalid arguments.
    """
    t_start = time.perf_counter()
    m = _validate(image, mask, dx, dy)
    dx, dy = int(dx), int(dy)
    W, H = image.size
    record: dict[str, Any] = {"op": "displace", "label": label, "offset": {"dx": dx, "dy": dy},
                              "image_size": [W, H], "mask_pixels": int(m.sum()), "noop": False}
    if dx == 0 and dy == 0:
        record.update(noop=True, reason="zero offset: nothing moved", edit_pixels=0,
                      timings={"total": _round(time.perf_counter() - t_start)})
        out = image.copy()
        return Edit(out, np.zeros((H, W), bool), m.copy(), record)

    fs = params.fill
    order = fs.order
    if isinstance(fs.backend, str) and order[0] in BACKEND_ROLES and registry is None:
        raise ValueError(f"displace with fill '{order[0]}' needs a model registry (role '{BACKEND_ROLES[order[0]]}')")

    # -- out-of-frame policy, decided before any expensive work ----------------------------------
    new_mask = shift_mask(m, dx, dy)
    outside = 1.0 - int(new_mask.sum()) / int(m.sum())
    record["out_of_frame"] = {"policy": params.out_of_frame, "share_outside": _round(outside),
                              "max_outside_share": params.max_outside_share, "clipped": outside > 0}
    if params.out_of_frame == "refuse" and outside > params.max_outside_share:
        raise EditError(
            f"displace: moving '{label}' by ({dx}, {dy}) px would put {outside:.0%} of it outside the "
            f"{W}x{H} frame; at most {params.max_outside_share:.0%} is allowed (displace.max_outside_share, "
            "out_of_frame: refuse). Use a smaller offset, raise the limit, or set out_of_frame: clip.")

    # -- the cut: exact product pixels, alpha exactly 1 on them ----------------------------------
    # The soft edge outside the mask is made of the product's own edge colours, not of its old
    # surroundings, so nothing of the old background travels along (no cut-out halo).
    src = np.asarray(image)
    alpha_new = shift_image(feather_alpha(m, params.feather), dx, dy, 0.0)
    if not new_mask.any():
        alpha_new[:] = 0.0  # wholly out of frame: no stray feather band without its product
    src_new = shift_image(extend_edges(src, m, params.feather), dx, dy, 0)

    # -- fill the hole, check, retry, fall back ---------------------------------------------------
    if checker is None and fs.recheck and registry is not None:
        checker = ClipChecker(registry, classes)
    checker_name = None if checker is None else ("clip" if isinstance(checker, ClipChecker) else "custom")
    got = fill_in_order(image, m, fs, label=label, checker=checker, seed=params.seed, registry=registry)
    filled, used = got.image, got.backend
    timings: dict[str, float] = {"fill": got.fill_seconds, "check": got.check_seconds}
    attempts = got.record["tries"]
    hole = dilate(m, fs.mask_dilation)
    record["fill"] = {**got.record, "checker": checker_name, "recheck_threshold": fs.recheck_threshold,
                      "dilation": fs.mask_dilation, "hole_pixels": int(hole.sum())}

    # -- paste the product at its new place --------------------------------------------------------
    t0 = time.perf_counter()
    out = paste(np.asarray(filled), src_new, alpha_new)
    paste_region = alpha_new > 0
    timings["paste"] = time.perf_counter() - t0
    record["paste"] = {"feather": params.feather, "feather_source": "product edge colours",
                       "pasted_pixels": int(new_mask.sum()), "blend_pixels": int((paste_region & ~new_mask).sum())}

    # -- optional harmonisation of a thin ring just outside the pasted product --------------------
    ring_mask = np.zeros((H, W), bool)
    if params.harmonize_ring > 0 and new_mask.any():
        t0 = time.perf_counter()
        ring_mask = dilate(new_mask, params.harmonize_ring) & ~new_mask
        seed = got.seed if used == "sd" else params.seed
        ring_fill = fs.model_copy(update={"mask_dilation": 0, "blend": 0})
        harmonised, hrec = fill(Image.fromarray(out, "RGB"), ring_mask, ring_fill, registry, seed=seed, backend=used)
        out = np.asarray(harmonised)
        timings["harmonize"] = time.perf_counter() - t0
        record["harmonize"] = {"ring": params.harmonize_ring, "backend": used, "fill": hrec}
    else:
        record["harmonize"] = None

    edit_mask = hole | paste_region | ring_mask
    result = Image.fromarray(np.ascontiguousarray(out, np.uint8), "RGB")
    if "icc_profile" in image.info:
        result.info["icc_profile"] = image.info["icc_profile"]

    models: dict[str, Any] = {}
    for backend, role in BACKEND_ROLES.items():
        if registry is not None and any(a["backend"] == backend for a in attempts):
            models[role] = registry.provenance(role)
    if checker_name == "clip":
        models["clip"] = registry.provenance("clip")
    timings["total"] = time.perf_counter() - t_start
    record.update(edit_pixels=int(edit_mask.sum()), models=models,
                  timings={k: _round(v) for k, v in timings.items()},
                  params=params.model_dump(mode="json"))
    allowed = 1.0 if params.out_of_frame == "clip" else params.max_outside_share
    return Edit(result, edit_mask, new_mask, record, moved=Moved(m, dx, dy, allowed))


def displace_detection(image: Image.Image, detection: "Detection", params: DisplaceSettings,
                       models: "ModelRegistry | None", *, dx: int, dy: int, checker: Checker | None = None,
                       classes: Sequence[ProductClass] | None = None) -> Edit:
    """The edit-card form ``(image, detection, params, models) -> Edit`` of :func:`displace`."""
    return displace(image.convert("RGB") if image.mode != "RGB" else image, detection.mask, detection.label,
                    dx, dy, params, registry=models, checker=checker, classes=classes)


class DisplaceParams(OpParams):
    """``displace``: move the product by (``x``, ``y``); every other field of the ``displace``
    settings section (``fill``, ``feather``, ``out_of_frame``, ...) may be overridden per action.

    ``x``/``y``: whole pixels (``162``, ``"-40"``) or a fraction of the image's width / height
    (``0.1``, ``"-10%"``), see :func:`pipeline.io.composite.parse_offset`; resolved per image."""

    section = "displace"
    x: int | float | str = 0
    y: int | float | str = 0
    settings: DisplaceSettings

    @field_validator("x", "y", mode="before")
    @classmethod
    def _offset(cls, v: object) -> object:
        parse_offset(v, 1000)  # syntax and range only: the real size is the image's
        return v


def run_displace(image: Image.Image, mask: np.ndarray, label: str, params: DisplaceParams, ctx: EditContext) -> Edit:
    """The operation-table entry for ``displace`` (rules, ``run --op displace``, catalog rows)."""
    dx = parse_offset(params.x, image.width)
    dy = parse_offset(params.y, image.height)
    return displace(image, mask, label, dx, dy, params.settings, registry=ctx.registry, classes=ctx.classes)
