"""``background``: put the product on a new background.

The product is its mask (detection or a mask file). Every pixel of the mask keeps the input's
exact bytes; every other pixel is the new background, with an ``edge`` px soft band just outside
the mask in which the product's own edge colours (:func:`pipeline.io.composite.extend_edges`) fade
into the background (:func:`pipeline.io.composite.feather_alpha`), so no old surroundings come along.
``Edit.edit_mask`` is therefore everything but the product.

Backgrounds: ``color`` (flat), ``transparent`` (the colour under an alpha channel: 0 outside the
product, the edge ramp, 255 on it), ``blur`` (the original background blurred with the product
left out of the average, so it leaves no dark halo), ``image`` (a backdrop file scaled to cover
the frame), ``generate`` (SD inpainting, with ControlNet depth and LoRAs, of everything but the
product: :func:`pipeline.enhance.enhance` on the complement of the mask; the product's pixels are
not in its region, so they stay bit-identical).

The soft edge (``matte``): ``ramp`` (default) is the linear fall-off above; ``vitmatte`` runs the
optional ``matting`` role (transformers' ViTMatte) on a trimap built from the mask
(:func:`trimap`) over a bounded crop around the product and takes its alpha in the band of
``matte_band`` px just *outside* the mask only: inside the mask alpha stays exactly 1, so the
product's pixels keep their bytes and the QA gate's guarantee holds. The band's colours are still
the product's extended edge colours, so the matte decides how much product each band pixel shows,
never which old background comes along.

Shadows are drawn on the background before the product is pasted, from the mask alone:
``contact`` a soft ellipse under the product box's base, ``drop`` the silhouette offset and
blurred; their parameters go into the record.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from PIL import Image

from pipeline.io.composite import bbox, dilate, extend_edges, feather_alpha, paste, shift_mask
from pipeline.ops.edits import Edit, EditContext, EditError, OpParams
from pipeline.settings import BackgroundSettings, EnhanceSettings, parse_colour
from pipeline.ops.enhance import enhance
from pipeline.models.lora_weights import LoraError, parse_lora
from pipeline.io.imageio import ImageLoadError, load_image


class BackgroundParams(OpParams):
    """``background``: every field of the ``background`` settings section may be overridden
    (``mode``, ``color``, ``shadow``, ``image``, ``prompt``, ``seed`` ...)."""

    section = "background"
    settings: BackgroundSettings


def _gauss(arr: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(arr, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)


def blurred_background(rgb: np.ndarray, product: np.ndarray, sigma: float) -> np.ndarray:
    """HxWx3 uint8: ``rgb`` blurred with the product (dilated 2 px) left out of every average."""
    keep = (~dilate(product, 2)).astype(np.float32)
    if not keep.any():
        keep = np.ones_like(keep)
    num = _gauss(rgb.astype(np.float32) * keep[..., None], sigma)
    den = _gauss(keep, sigma)[..., None]
    mean = (rgb.astype(np.float32) * keep[..., None]).sum((0, 1)) / max(float(keep.sum()), 1.0)
    out = np.where(den > 1e-3, num / np.maximum(den, 1e-6), mean)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def cover(backdrop: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``backdrop`` scaled to cover ``size`` (W, H) and centre-cropped: HxWx3 uint8 RGB."""
    W, H = size
    b = backdrop.convert("RGB")
    k = max(W / b.width, H / b.height)
    bw, bh = max(W, int(round(b.width * k))), max(H, int(round(b.height * k)))
    b = b.resize((bw, bh), Image.Resampling.LANCZOS)
    x0, y0 = (bw - W) // 2, (bh - H) // 2
    return np.asarray(b)[y0:y0 + H, x0:x0 + W].copy()


def shadow_map(product: np.ndarray, s: BackgroundSettings) -> tuple[np.ndarray | None, dict[str, Any]]:
    """HxW float32 in [0, 1] (1 = full shadow) from the product mask, or None for ``shadow: none``;
    and the parameters for the record."""
    import cv2

    if s.shadow == "none":
        return None, {"kind": "none"}
    H, W = product.shape
    x0, y0, x1, y1 = bbox(product)
    bw, bh = x1 - x0, y1 - y0
    rec: dict[str, Any] = {"kind": s.shadow, "opacity": s.shadow_opacity, "blur": s.shadow_blur}
    if s.shadow == "contact":
        m = np.zeros((H, W), np.float32)
        axes = (max(1, int(round(bw * 0.55))), max(1, int(round(bh * s.contact_height / 2))))
        centre = (int(round((x0 + x1) / 2)), int(y1 - 1))
        cv2.ellipse(m, centre, axes, 0, 0, 360, 1.0, -1)
        rec.update(centre=list(centre), axes=list(axes), contact_height=s.contact_height)
    else:
        dx, dy = int(round(s.shadow_offset[0] * bw)), int(round(s.shadow_offset[1] * bh))
        m = shift_mask(product, dx, dy).astype(np.float32)
        rec.update(offset_px=[dx, dy], offset=list(s.shadow_offset))
    if s.shadow_blur > 0:
        m = _gauss(m, s.shadow_blur)
    return np.clip(m, 0.0, 1.0), rec


def trimap(mask: np.ndarray, band: int) -> np.ndarray:
    """HxW uint8 trimap of the product ``mask`` (HxW bool) as ViTMatte reads it: 255 = foreground
    (the mask eroded by ``band`` px), 128 = unknown (``dilate(mask, band) & ~erode(mask, band)``),
    0 = background (the rest)."""
    m = np.asarray(mask, bool)
    # erode(m, b) == ~dilate(~m, b); outside the image counts as background, so the border erodes too.
    padded = np.pad(~m, 1, constant_values=True)
    fg = ~dilate(padded, band)[1:-1, 1:-1]
    tri = np.zeros(m.shape, np.uint8)
    tri[dilate(m, band)] = 128
    tri[fg] = 255
    return tri


def vitmatte_alpha(rgb: np.ndarray, m: np.ndarray, band: int, max_side: int,
                   registry: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """HxW float32 alpha in [0, 1]: exactly 1 on ``m``, the ``matting`` role's prediction in
    ``dilate(m, band) & ~m``, 0 elsewhere; and the record's ``matte`` entry.

    ``rgb``: HxWx3 uint8 RGB; ``m``: HxW bool. The model sees the box of ``dilate(m, band)`` grown by
    ``band`` px, scaled (area) so its long side is at most ``max_side``; its alpha is scaled back
    (bilinear) to the crop."""
    import cv2
    import torch

    if registry is None:
        raise ValueError("background matte vitmatte needs a model registry (role matting)")
    H, W = m.shape
    tri = trimap(m, band)
    x0, y0, x1, y1 = bbox(tri > 0, pad=band)
    cw, ch = x1 - x0, y1 - y0
    k = min(1.0, max_side / max(cw, ch))
    ww, wh = max(1, int(round(cw * k))), max(1, int(round(ch * k)))
    crop, tcrop = rgb[y0:y1, x0:x1].copy(), tri[y0:y1, x0:x1].copy()  # writable: torch.from_numpy warns otherwise
    if (ww, wh) != (cw, ch):
        crop = cv2.resize(crop, (ww, wh), interpolation=cv2.INTER_AREA)
        # Nearest keeps the trimap's three values.
        tcrop = cv2.resize(tcrop, (ww, wh), interpolation=cv2.INTER_NEAREST)
    bundle = registry.get("matting")
    dev = next(bundle.model.parameters()).device
    with registry.lock("matting"):
        inputs = bundle.processor(images=crop, trimaps=tcrop, return_tensors="pt")
        with torch.inference_mode():
            pred = bundle.model(pixel_values=inputs["pixel_values"].to(dev, torch.float32)).alphas
    a = pred[0, 0, :wh, :ww].float().clamp(0, 1).cpu().numpy()  # the processor pads to a multiple of 32
    if (ww, wh) != (cw, ch):
        a = cv2.resize(a, (cw, ch), interpolation=cv2.INTER_LINEAR)
    alpha = np.zeros((H, W), np.float32)
    alpha[y0:y1, x0:x1] = np.clip(a, 0.0, 1.0)
    alpha[~dilate(m, band)] = 0.0
    alpha[m] = 1.0  # the product's own pixels are never matted: their bytes are the input's
    band_px = dilate(m, band) & ~m
    rec = {"kind": "vitmatte", "band": band, "crop": [int(x0), int(y0), int(x1), int(y1)], "work_size": [ww, wh],
           "band_pixels": int(band_px.sum()),
           "band_alpha_mean": round(float(alpha[band_px].mean()), 4) if band_px.any() else None,
           "model": registry.provenance("matting")}
    return alpha, rec


def background(image: Image.Image, mask: np.ndarray, label: str, s: BackgroundSettings, *, registry: Any = None,
               settings: Any = None) -> Edit:
    """``image``: PIL RGB; ``mask``: HxW bool, the product. Returns an :class:`Edit` whose product
    pixels are the input's and whose ``edit_mask`` is ``~mask`` (``alpha`` set for transparent)."""
    t0 = time.perf_counter()
    m = np.asarray(mask, bool)
    if m.shape != (image.height, image.width):
        raise ValueError(f"product mask shape {m.shape} does not match the image ({image.height}, {image.width})")
    if not m.any():
        raise EditError("background: the product mask is empty")
    rgb = np.asarray(image)
    H, W = m.shape
    rec: dict[str, Any] = {"op": "background", "label": label, "mode": s.mode, "edge": s.edge}
    colour = parse_colour(s.color)
    if s.mode in ("color", "transparent"):
        bg = np.empty_like(rgb)
        bg[...] = colour
        rec["color"] = list(colour)
    elif s.mode == "blur":
        bg = blurred_background(rgb, m, s.blur_radius)
        rec["blur_radius"] = s.blur_radius
    elif s.mode == "image":
        if s.image is None:
            raise EditError("background: mode image needs `image: PATH`")
        path = settings.resolve_path(s.image) if settings is not None else s.image
        try:
            bg = cover(load_image(path).image, (W, H))
        except ImageLoadError as e:
            raise EditError(f"background image: {e}") from None
        rec["image"] = str(path)
    else:
        bg, gen_rec = _generate(image, m, label, s, registry, settings)
        rec["generate"] = gen_rec
    shadow, shadow_rec = shadow_map(m, s)
    rec["shadow"] = shadow_rec
    if shadow is not None and s.mode != "transparent":
        dark = 1.0 - s.shadow_opacity * shadow
        bg = np.clip(np.rint(bg.astype(np.float32) * dark[..., None]), 0, 255).astype(np.uint8)
    if s.matte == "vitmatte":
        alpha, rec["matte"] = vitmatte_alpha(rgb, m, s.matte_band, s.matte_resolution, registry)
        reach = s.matte_band
    else:
        alpha, rec["matte"], reach = feather_alpha(m, s.edge), {"kind": "ramp", "edge": s.edge}, s.edge
    out = paste(bg, extend_edges(rgb, m, reach), alpha)
    a8 = None
    if s.mode == "transparent":
        a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
        if shadow is not None:
            # A shadow on a transparent background: black, as opaque as the shadow is dark.
            sh8 = np.clip(np.rint(shadow * s.shadow_opacity * 255.0), 0, 255).astype(np.uint8)
            only = (alpha <= 0.0) & (sh8 > 0)
            out[only] = 0
            a8[only] = sh8[only]
        rec["transparent_pixels"] = int((a8 == 0).sum())
    rec["product_pixels"] = int(m.sum())
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    result = Image.fromarray(out, "RGB")
    if "icc_profile" in image.info:
        result.info["icc_profile"] = image.info["icc_profile"]
    return Edit(result, ~m, m.copy(), rec, alpha=a8)


def _generate(image: Image.Image, m: np.ndarray, label: str, s: BackgroundSettings, registry: Any,
              settings: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """A new scene around the product: enhance's SD inpainting (ControlNet depth, LoRAs) over
    ``~m`` with no dilation and no feather, so nothing of the product is regenerated."""
    if registry is None:
        raise ValueError("background generate needs a model registry (roles inpaint, controlnet_depth, depth)")
    base = settings.enhance if settings is not None else EnhanceSettings()
    # auto: the inpaint model's native size (SD 1.5 512, SDXL 1024), read from its files.
    resolution = registry.work_resolution(s.resolution)
    params = base.model_copy(update=dict(sampler=s.sampler, steps=s.steps, guidance=s.guidance, strength=1.0, controlnet=s.controlnet,
                                         mode="whole", whole_max_side=resolution, mask_dilation=0, mask_feather=0,
                                         negative_prompt=s.negative_prompt, seed=s.seed, classes={}))
    bases = (None, getattr(settings, "base_dir", None))
    try:
        loras = [parse_lora(x, bases=bases) for x in s.loras]
    except LoraError as e:
        raise EditError(f"background generate: {e}") from None
    edit = enhance(image, ~m, label, params, registry, loras=loras, prompt=s.prompt, seed=s.seed)
    gen = np.asarray(edit.image).copy()
    rec = {k: edit.record[k] for k in ("prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "controlnet",
                                       "pipeline", "crop", "loras", "models", "runtime", "timings")}
    rec["resolution"] = resolution
    return gen, rec


def run_background(image: Image.Image, mask: np.ndarray, label: str, params: BackgroundParams,
                   ctx: EditContext) -> Edit:
    return background(image, mask, label, params.settings, registry=ctx.registry, settings=ctx.settings)
