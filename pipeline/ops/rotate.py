"""Rotate: show a detected product from another viewpoint, in place.

Steps for one product (image RGB, mask HxW bool at full resolution, a relative camera change):

1. **Limits and licence**: azimuth in [-180, 180], |polar| <= ``max_polar`` (at most 90), |radius|
   <= 0.5, else ValueError naming the range. |azimuth| >= ``warn_azimuth`` (90) adds a warning to
   ``record["warnings"]`` (Zero123 distorts large turns). With ``commercial_use: true`` a model the
   settings mark ``commercial: false`` is refused (:class:`~pipeline.ops.edits.EditError`) before any
   work; a model whose licence is not known adds a warning.
2. **Pre-process** (:func:`prepare_input`): the product's pixels (mask) cropped with padding onto a
   white square, centred, resized to the model's input size.
3. **Novel view** (:class:`~pipeline.models.novel_view.NovelViewPipeline`): Zero123 with the pose
   embedding and conditioning of the reference; DDIM, classifier-free guidance, seeded.
4. **Upscale** the view with the ``upscaler`` role (``auto``: only when the product would be
   enlarged onto the photo), then **matte** it (:func:`pipeline.matte.matte`: foreground against
   the white background, refined with SAM on the view, clean alpha edge, decontaminated colours).
5. **Remove the old product** with the shared fill (:func:`pipeline.ops.inpaint.fill_in_order`: ``lama``,
   ``sd`` or ``classical``, or a fallback order with an optional CLIP re-check, ``fill.recheck``) over
   the mask dilated by ``fill.mask_dilation``.
6. **Composite** at the old box (:func:`place_box`): anchored bottom-centre (or centre, or fitted
   inside the old box), scaled to the old product's height (or width); alpha 1 on the new
   product, a feathered ramp of its own edge colours outside it; optionally Poisson-blended
   (``cv2.seamlessClone``) first. Clipped at the frame (the record gives the share outside).

Pixels outside the filled hole and the pasted product with its feather ring are bit-identical to
the input; ``Edit.edit_mask`` is exactly their union. With neither angle given,
:func:`op_rotate` only segments: the input unchanged, an empty edit mask, the mask area recorded.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
from PIL import Image
from pydantic import ValidationError, ValidationInfo, field_validator

from pipeline.io.composite import bbox, dilate, extend_edges, feather_alpha, paste
from pipeline.ops.edits import Edit, EditContext, EditError, OpParams, checked_product_mask
from pipeline.ops.inpaint import BACKEND_ROLES, fill_in_order
from pipeline.models.pose import check_pose
from pipeline.settings import RotateSettings, error_reason
from pipeline.ops.matte import clean_mask, matte, rough_mask
from pipeline.ops.displace import ClipChecker
from pipeline.ops.upscale import upscale, upscale_factor

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import Settings

# view_fn(input view PIL RGB, polar=, azimuth=, radius=, steps=, guidance=, eta=, seed=, size=) -> PIL RGB
# (NovelViewPipeline's call signature; tests inject a stand-in with a known object).
ViewFn = Callable[..., Image.Image]

__all__ = ["RotateParams", "ViewFn", "check_licences", "place_box", "prepare_input", "rotate", "run_rotate", "segment_only"]


def _round(v: float) -> float:
    return round(float(v), 4)


# ------------------------------------------------------------------------------------------------
# Licence


def check_licences(settings: "Settings", roles: Iterable[str],
                   what: str = "rotate") -> tuple[dict[str, Any], list[str]]:
    """Refuse non-commercial models when the settings say the outputs are for commercial use.

    Returns ``({role: {"source", "licence", "commercial"}}, warnings)``. Raises
    :class:`EditError` naming the role, source and licence when ``settings.commercial_use`` is true
    and a role's source has ``commercial: false``; a role with ``commercial`` unset then adds a
    warning (its licence was not confirmed).
    """
    info: dict[str, Any] = {}
    warnings: list[str] = []
    refused = []
    for role in dict.fromkeys(roles):
        src = settings.models.source(role)
        info[role] = {"source": src.describe(), "licence": src.licence, "commercial": src.commercial}
        if not settings.commercial_use:
            continue
        if src.commercial is False:
            refused.append(f"'{role}' ({src.describe()}; licence: {src.licence or 'not stated'})")
        elif src.commercial is None:
            warnings.append(f"commercial_use is on but the licence of model role '{role}' ({src.describe()}) is not "
                            f"confirmed for commercial use (models.{role}.commercial is unset)")
    if refused:
        where = str(settings.source_file) if settings.source_file else "the settings"
        raise EditError(f"{what} refused: commercial_use is true in {where}, and model role(s) "
                        f"{', '.join(refused)} are marked non-commercial (commercial: false). Use a model whose "
                        "licence allows commercial use, or set commercial_use: false for non-commercial work.")
    return info, warnings


# ------------------------------------------------------------------------------------------------
# Geometry and pre-processing


def prepare_input(image: Image.Image, mask: np.ndarray, size: int,
                  padding: float) -> tuple[Image.Image, dict[str, Any]]:
    """The model input: the product's own pixels on white, centred in a square, resized.

    ``image``: PIL RGB; ``mask``: HxW bool (non-empty). The square's side is the mask box's long
    side x (1 + 2 x ``padding``) (rounded up); the box's centre is the square's centre. Returns
    (PIL ``"RGB"`` ``size`` x ``size``, record with the box and square side).
    """
    rgb = np.asarray(image)
    x0, y0, x1, y1 = bbox(mask)
    bw, bh = x1 - x0, y1 - y0
    side = max(bw, bh, int(math.ceil(max(bw, bh) * (1.0 + 2.0 * padding))))
    canvas = np.full((side, side, 3), 255, np.uint8)
    ox, oy = (side - bw) // 2, (side - bh) // 2
    m = mask[y0:y1, x0:x1]
    canvas[oy : oy + bh, ox : ox + bw][m] = rgb[y0:y1, x0:x1][m]
    view = Image.fromarray(canvas, "RGB")
    if side != size:
        view = view.resize((size, size), Image.Resampling.LANCZOS)
    return view, {"box": [x0, y0, x1, y1], "square": side, "padding": padding, "size": size}


def place_box(old_box: tuple[int, int, int, int], obj_w: int, obj_h: int, anchor: str,
              scale_by: str) -> tuple[tuple[int, int, int, int], float]:
    """Where the new product goes: ``((x0, y0, x1, y1), scale)`` in image pixels (x1/y1 exclusive;
    the box may reach outside the frame; the caller clips).

    ``old_box``: the old product's box. ``obj_w`` x ``obj_h``: the new product's box size in the
    view. ``scale`` = old height / obj_h (``scale_by="height"``) or old width / obj_w
    (``"width"``); ``anchor="keep-box"`` uses the largest scale that fits inside the old box.
    ``bottom-center`` and ``keep-box`` keep the old bottom edge and horizontal centre;
    ``center`` keeps the old centre. Sizes round to whole pixels (at least 1).
    """
    ox0, oy0, ox1, oy1 = old_box
    ow, oh = ox1 - ox0, oy1 - oy0
    if anchor == "keep-box":
        s = min(ow / obj_w, oh / obj_h)
    elif scale_by == "height":
        s = oh / obj_h
    elif scale_by == "width":
        s = ow / obj_w
    else:
        raise ValueError(f"unknown scale_by {scale_by!r} (height or width)")
    nw, nh = max(1, int(round(obj_w * s))), max(1, int(round(obj_h * s)))
    x0 = int(math.floor((ox0 + ox1) / 2.0 - nw / 2.0 + 0.5))
    if anchor in ("bottom-center", "keep-box"):
        y1 = oy1
        y0 = y1 - nh
    elif anchor == "center":
        y0 = int(math.floor((oy0 + oy1) / 2.0 - nh / 2.0 + 0.5))
    else:
        raise ValueError(f"unknown anchor {anchor!r} (bottom-center, center or keep-box)")
    return (x0, y0, x0 + nw, y0 + nh), float(s)


def _resize(arr: np.ndarray, size: tuple[int, int], shrink: bool, smooth: bool) -> np.ndarray:
    import cv2

    # Area averaging when shrinking (no aliasing); Lanczos for colour when enlarging, linear for
    # alpha (Lanczos rings, and a ringing alpha draws halos).
    interp = cv2.INTER_AREA if shrink else (cv2.INTER_LINEAR if smooth else cv2.INTER_LANCZOS4)
    return cv2.resize(np.ascontiguousarray(arr), size, interpolation=interp)


def _render(rgb: np.ndarray, alpha: np.ndarray, obj_box: tuple[int, int, int, int],
            new_box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scale the view so ``obj_box`` lands on ``new_box``; (HxWx3 uint8 colour, HxW float32 alpha)
    on a canvas of ``shape`` (H, W), zero outside the rendered patch, clipped at the frame."""
    H, W = shape
    vh, vw = alpha.shape
    bx0, by0, bx1, by1 = obj_box
    nx0, ny0, nx1, ny1 = new_box
    sx, sy = (nx1 - nx0) / (bx1 - bx0), (ny1 - ny0) / (by1 - by0)
    # A margin of view pixels around the box carries the matte's soft edge along.
    pad = 3 + int(math.ceil(1.0 / min(sx, sy)))
    rx0, ry0, rx1, ry1 = max(0, bx0 - pad), max(0, by0 - pad), min(vw, bx1 + pad), min(vh, by1 + pad)
    ow = max(1, int(round((rx1 - rx0) * sx)))
    oh = max(1, int(round((ry1 - ry0) * sy)))
    shrink = sx < 1.0 and sy < 1.0
    p_rgb = _resize(rgb[ry0:ry1, rx0:rx1], (ow, oh), shrink, smooth=False)
    p_a = np.clip(_resize(alpha[ry0:ry1, rx0:rx1], (ow, oh), shrink, smooth=True), 0.0, 1.0)
    px0 = nx0 - int(round((bx0 - rx0) * sx))
    py0 = ny0 - int(round((by0 - ry0) * sy))
    out_rgb = np.zeros((H, W, 3), np.uint8)
    out_a = np.zeros((H, W), np.float32)
    cx0, cy0, cx1, cy1 = max(0, px0), max(0, py0), min(W, px0 + ow), min(H, py0 + oh)
    if cx1 > cx0 and cy1 > cy0:
        out_rgb[cy0:cy1, cx0:cx1] = p_rgb[cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0]
        out_a[cy0:cy1, cx0:cx1] = p_a[cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0]
    return out_rgb, out_a


def _seamless(src: np.ndarray, dst: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """cv2.seamlessClone of ``src`` into ``dst`` (HxWx3 uint8, aligned) under ``mask`` (HxW bool),
    computed on a padded crop so a mask touching the frame is fine. Returns the full HxWx3 image."""
    import cv2

    x0, y0, x1, y1 = bbox(mask, pad=2)
    p = 4
    s = cv2.copyMakeBorder(np.ascontiguousarray(src[y0:y1, x0:x1]), p, p, p, p, cv2.BORDER_REFLECT)
    d = cv2.copyMakeBorder(np.ascontiguousarray(dst[y0:y1, x0:x1]), p, p, p, p, cv2.BORDER_REFLECT)
    m = np.zeros(s.shape[:2], np.uint8)
    m[p:-p, p:-p] = mask[y0:y1, x0:x1].astype(np.uint8) * 255
    # seamlessClone puts the mask's bounding rect (x, y, w, h) at (cx - w // 2, cy - h // 2) in
    # the destination; this centre maps the source region onto the same pixels.
    bx, by, bw, bh = cv2.boundingRect(m)
    out = cv2.seamlessClone(s, d, m, (bx + bw // 2, by + bh // 2), cv2.NORMAL_CLONE)
    full = dst.copy()
    full[y0:y1, x0:x1] = out[p:-p, p:-p]
    return full


# ------------------------------------------------------------------------------------------------
# The edit


def segment_only(image: Image.Image, mask: np.ndarray, label: str) -> Edit:
    """No angles: the input unchanged, an empty edit mask, and the product's mask area recorded."""
    W, H = image.size
    m = np.asarray(mask).astype(bool, copy=False)
    if m.shape != (H, W):
        raise ValueError(f"product mask shape {m.shape} does not match the image ({H}, {W})")
    box = bbox(m)
    area = int(m.sum())
    record = {"op": "rotate", "label": label, "segment_only": True, "noop": True,
              "reason": "no --azimuth or --polar given: segmented only, nothing rotated",
              "image_size": [W, H], "mask_pixels": area, "mask_area": _round(area / float(W * H)),
              "box": list(box) if box else None, "edit_pixels": 0, "warnings": []}
    return Edit(image.copy(), np.zeros((H, W), bool), m.copy(), record)


def rotate(image: Image.Image, mask: np.ndarray, label: str, azimuth: float, polar: float, params: RotateSettings,
           registry: "ModelRegistry | None", *, seed: int | None = None, fill: str | None = None,
           view_fn: ViewFn | None = None) -> Edit:
    """Show the product under ``mask`` after a relative camera change of ``azimuth`` / ``polar``
    degrees (Zero123's conventions: azimuth + = camera moves right, polar + = camera moves down).

    ``image``: PIL ``"RGB"`` (uint8, R, G, B). ``mask``: HxW bool, the product at full
    resolution. ``label``: its class (for the record). ``params``: the ``rotate`` settings.
    ``registry``: the model registry (novel_view, upscaler, sam, inpaint roles; also the settings
    whose licence rules apply); may be None only with an injected ``view_fn``, ``fill
    "classical"``, and no upscaling or SAM refinement wanted. ``seed``: overrides ``params.seed``
    (novel view and SD fill). ``fill``: overrides ``params.fill.backend``. ``view_fn``: a stand-in for the
    novel-view model (tests).

    Returns an :class:`Edit`. Raises ValueError for out-of-range angles or bad arguments and
    :class:`EditError` for refusals (licence, empty mask, a view with no object).
    """
    from pipeline.models.novel_view import pose_embedding

    t_start = time.perf_counter()
    m = checked_product_mask(image, mask, "rotate", "rotate")
    check_pose(polar, azimuth, params.radius, max_polar=params.max_polar)
    azimuth, polar = float(azimuth), float(polar)
    seed = params.seed if seed is None else int(seed)
    fs = params.fill
    if fill is not None:
        try:
            fs = params.fill.model_validate({**params.fill.model_dump(), "backend": fill})
        except ValidationError as e:
            raise ValueError(f"rotate: {error_reason(e.errors()[0])}") from None
    spec, order = fs.backend, fs.order
    backend = order[0]
    W, H = image.size
    warnings: list[str] = []
    if abs(azimuth) >= params.warn_azimuth:
        warnings.append(f"large azimuth ({azimuth:g} degrees): Zero123 views {params.warn_azimuth:g} degrees or more "
                        "away from the photo are often distorted; check the result")

    # -- licence: everything this edit may load, before any work ----------------------------------
    use_sam = params.matte_refine and registry is not None
    roles = [r for r, wanted in (("novel_view", view_fn is None), ("upscaler", params.upscale != "off"),
                                 ("sam", use_sam)) if wanted]
    roles += [BACKEND_ROLES[b] for b in order if b in BACKEND_ROLES]
    if fs.recheck:
        roles.append("clip")
    if registry is None and (view_fn is None or (isinstance(spec, str) and backend in BACKEND_ROLES)):
        raise ValueError("rotate needs a model registry (roles: novel_view"
                         + (f", {BACKEND_ROLES[backend]} for fill '{backend}'" if backend in BACKEND_ROLES else "")
                         + ")")
    licences: dict[str, Any] = {}
    if registry is not None:
        licences, lic_warn = check_licences(registry.settings, roles)
        warnings.extend(lic_warn)

    timings: dict[str, float] = {}
    record: dict[str, Any] = {"op": "rotate", "label": label, "segment_only": False, "noop": False,
                              "image_size": [W, H], "mask_pixels": int(m.sum())}
    pose = pose_embedding(polar, azimuth, params.radius)[0, 0].tolist()
    record["pose"] = {"azimuth": azimuth, "polar": polar, "radius": params.radius,
                      "embedding": [_round(v) for v in pose],
                      "convention": "relative camera change (Zero123): azimuth + = camera right, polar + = camera "
                                    "down, radius + = farther; embedding [polar rad, sin az, cos az, radius]"}

    # -- pre-process and the novel view -------------------------------------------------------------
    t0 = time.perf_counter()
    view_in, prep = prepare_input(image, m, params.view_size, params.crop_padding)
    if view_fn is None:
        from pipeline.models.novel_view import NovelViewPipeline

        view_fn = NovelViewPipeline.from_components(registry.get("novel_view"))
        generator = "zero123"
    else:
        generator = "injected"
    view = view_fn(view_in, polar=polar, azimuth=azimuth, radius=params.radius, steps=params.steps,
                   guidance=params.guidance, eta=params.eta, seed=seed, size=params.view_size).convert("RGB")
    timings["novel_view"] = time.perf_counter() - t0
    record["novel_view"] = {"generator": generator, "steps": params.steps, "guidance": params.guidance,
                            "eta": params.eta, "seed": seed, "view_size": params.view_size, "input": prep,
                            "scheduler": "DDIM"}

    # -- upscale (decided on the object's size in the raw view), then matte ------------------------
    t0 = time.perf_counter()
    rough = clean_mask(rough_mask(np.asarray(view), params.matte_threshold), 1)
    if not rough.any():
        raise EditError("rotate: the novel view shows no object (every pixel is near white); try another seed or "
                        "smaller angles")
    rb = bbox(rough)
    _, s_view = place_box(bbox(m), rb[2] - rb[0], rb[3] - rb[1], params.anchor, params.scale_by)
    up_rec: dict[str, Any] = {"mode": params.upscale, "used": False}
    if params.upscale == "always" or (params.upscale == "auto" and s_view > 1.0):
        if registry is None:
            up_rec["reason"] = "no model registry"
        else:
            view = upscale(view, registry)
            up_rec.update(used=True, factor=upscale_factor(registry), size=list(view.size))
    else:
        up_rec["reason"] = "off" if params.upscale == "off" else f"not needed (product scaled by {s_view:.3f} <= 1)"
    timings["upscale"] = time.perf_counter() - t0
    record["upscale"] = up_rec

    t0 = time.perf_counter()
    mt = matte(view, registry=registry if use_sam else None, threshold=params.matte_threshold, edge=params.matte_edge)
    timings["matte"] = time.perf_counter() - t0
    record["matte"] = mt.record
    if not mt.mask.any():
        raise EditError("rotate: the matte of the novel view is empty (no object against the white background)")

    # -- placement ---------------------------------------------------------------------------------
    old_box = bbox(m)
    obj_box = bbox(mt.mask)
    new_box, scale = place_box(old_box, obj_box[2] - obj_box[0], obj_box[3] - obj_box[1], params.anchor,
                               params.scale_by)
    rgb_c, alpha_c = _render(mt.rgb, mt.alpha, obj_box, new_box, (H, W))
    new_mask = alpha_c >= 0.5
    nx0, ny0, nx1, ny1 = new_box
    full_area = (nx1 - nx0) * (ny1 - ny0)
    inside = max(0, min(W, nx1) - max(0, nx0)) * max(0, min(H, ny1) - max(0, ny0))
    record["placement"] = {"anchor": params.anchor, "scale_by": params.scale_by, "old_box": list(old_box),
                           "new_box": list(new_box), "scale": _round(scale), "view_box": list(obj_box),
                           "share_outside": _round(1.0 - inside / full_area), "clipped": inside < full_area,
                           "new_mask_pixels": int(new_mask.sum())}
    if not new_mask.any():
        raise EditError(f"rotate: the new view of '{label}' would land wholly outside the {W}x{H} frame")

    # -- remove the old product ----------------------------------------------------------------------
    checker = None
    if fs.recheck and registry is not None:
        checker = ClipChecker(registry)
    got = fill_in_order(image, m, fs, label=label, checker=checker, seed=seed, registry=registry)
    filled = got.image
    timings["fill"] = got.fill_seconds
    timings["check"] = got.check_seconds
    hole = dilate(m, fs.mask_dilation)
    record["fill"] = {**got.record, "checker": "clip" if checker is not None else None,
                      "dilation": fs.mask_dilation, "hole_pixels": int(hole.sum()),
                      "detail": got.record["tries"][-1]["fill"]}
    if got.record.get("warning"):
        warnings.append(got.record["warning"])

    # -- composite -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    # Alpha 1 on the new product; outside it the larger of the matte's soft edge and the feather
    # ramp, coloured with the product's own edge colours (no white fringe, no old surroundings).
    ramp_px = max(params.feather, 2 * params.matte_edge + 1)
    alpha = np.maximum(feather_alpha(new_mask, params.feather), alpha_c * dilate(new_mask, ramp_px))
    src = extend_edges(rgb_c, new_mask, ramp_px)
    bg = np.asarray(filled)
    if params.poisson:
        src = _seamless(src, bg, dilate(new_mask, ramp_px))
    out = paste(bg, src, alpha)
    paste_region = alpha > 0
    timings["composite"] = time.perf_counter() - t0
    record["composite"] = {"feather": params.feather, "poisson": params.poisson,
                           "blend_pixels": int((paste_region & ~new_mask).sum())}

    edit_mask = hole | paste_region
    result = Image.fromarray(np.ascontiguousarray(out, np.uint8), "RGB")
    if "icc_profile" in image.info:
        result.info["icc_profile"] = image.info["icc_profile"]

    models: dict[str, Any] = {}
    if registry is not None:
        tried = {t["backend"] for t in got.record["tries"]}
        used_roles = [r for r, used in (("novel_view", generator == "zero123"), ("upscaler", up_rec["used"]),
                                        ("sam", use_sam), ("inpaint", "sd" in tried),
                                        ("inpaint_fill", "lama" in tried), ("clip", checker is not None)) if used]
        for role in used_roles:
            models[role] = {**registry.provenance(role), "commercial": licences.get(role, {}).get("commercial")}
    record["licence"] = {"commercial_use": bool(registry.settings.commercial_use) if registry else None,
                         "novel_view": models.get("novel_view", {}).get("licence")}
    timings["total"] = time.perf_counter() - t_start
    record.update(edit_pixels=int(edit_mask.sum()), warnings=warnings, models=models,
                  timings={k: _round(v) for k, v in timings.items()}, params=params.model_dump(mode="json"))
    return Edit(result, edit_mask, new_mask, record)


class RotateParams(OpParams):
    """``rotate``: a new pose, ``azimuth`` / ``polar`` degrees of relative camera change (a missing
    one is 0; neither: the product is only segmented, nothing changes). Every field of the
    ``rotate`` settings section (``fill``, ``seed``, ``anchor``, ...) may be overridden."""

    section = "rotate"
    settings: RotateSettings  # first: the angle checks read its limits
    azimuth: float | None = None
    polar: float | None = None

    @field_validator("azimuth", "polar", mode="before")
    @classmethod
    def _degrees(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number of degrees, got {v!r}")
        return v.strip().rstrip("°") if isinstance(v, str) else v

    @field_validator("azimuth", "polar", mode="after")
    @classmethod
    def _in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        s = info.data.get("settings")
        if v is not None and s is not None:
            if info.field_name == "azimuth":
                check_pose(0.0, v, s.radius, max_polar=s.max_polar)
            else:
                check_pose(v, 0.0, s.radius, max_polar=s.max_polar)
        return v


def run_rotate(image: Image.Image, mask: np.ndarray, label: str, params: RotateParams, ctx: EditContext) -> Edit:
    """The operation-table entry for ``rotate`` (rules, ``run --op rotate``, catalog rows)."""
    if params.azimuth is None and params.polar is None:
        return segment_only(image, mask, label)
    return rotate(image, mask, label, params.azimuth or 0.0, params.polar or 0.0, params.settings, ctx.registry)
