"""Monocular depth for ControlNet-depth conditioning (the registry's ``depth`` role).

The ``depth`` role is a transformers depth-estimation model (DPT, Depth Anything, ...) with its
image processor. :func:`depth_map` turns its prediction into what SD 1.5 ControlNet-depth
(``lllyasviel/control_v11f1p_sd15_depth``) was trained on: a MiDaS-style relative inverse-depth
image, min-max normalised to 0..255, **near = bright**, three equal channels.

Relative models (DPT/MiDaS, Depth Anything "relative") already predict inverse depth (larger =
nearer); metric models (ZoeDepth, GLPN, Depth Pro, Depth Anything "metric") predict distance, so it
is inverted (1/d) before normalising.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry

__all__ = ["depth_map", "is_metric", "normalise", "predict_depth"]

_METRIC_TYPES = {"zoedepth", "glpn", "depth_pro"}


def is_metric(model: Any) -> bool:
    """True when the model predicts distance (far = large) rather than inverse depth."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    return getattr(cfg, "depth_estimation_type", None) == "metric" or getattr(cfg, "model_type", "") in _METRIC_TYPES


def predict_depth(image: Image.Image, bundle: Any) -> np.ndarray:
    """The model's raw prediction resized to the image: HxW float32 (H, W = image height, width).

    ``image``: PIL (converted to RGB). ``bundle``: ``HFBundle(model, processor)`` as the registry's
    ``depth`` role returns it. Units and direction are the model's own (see :func:`is_metric`).
    """
    import torch

    model, proc = bundle.model, bundle.processor
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    W, H = rgb.size
    param = next(model.parameters())
    inputs = proc(images=rgb, return_tensors="pt")
    pixels = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        out = model(pixel_values=pixels)
        pred = None
        post = getattr(proc, "post_process_depth_estimation", None)
        if post is not None:
            try:
                # The processor knows its own padding/cropping (e.g. ZoeDepth pads), so undo via it.
                pred = post(out, target_sizes=[(H, W)])[0]["predicted_depth"]
            except (TypeError, ValueError, KeyError):
                pred = None
        if pred is None:
            d = out.predicted_depth.float()
            d = d[:, None] if d.ndim == 3 else d
            pred = torch.nn.functional.interpolate(d, size=(H, W), mode="bicubic", align_corners=False)[0, 0]
    arr = pred.float().cpu().numpy()
    if arr.shape != (H, W):  # some post-processors keep a channel axis
        arr = arr.reshape(arr.shape[-2:])
    return arr.astype(np.float32, copy=False)


def normalise(depth: np.ndarray, *, metric: bool = False) -> np.ndarray:
    """HxW float depth -> HxW uint8, near = 255, far = 0 (min-max over the image).

    ``metric``: the input is distance (inverted first). A flat or non-finite prediction gives
    all zeros rather than amplified noise or NaNs.
    """
    d = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if metric:
        d = 1.0 / np.maximum(d, 1e-6)
    lo, hi = float(d.min()), float(d.max())
    if not hi > lo:
        return np.zeros(d.shape, np.uint8)
    return np.clip(np.rint((d - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def depth_map(image: Image.Image, registry: "ModelRegistry") -> Image.Image:
    """ControlNet-depth conditioning image for ``image``: PIL ``"RGB"`` of the same size, three
    equal uint8 channels, 0..255, near = bright (min-max normalised inverse depth)."""
    bundle = registry.get("depth")
    d = normalise(predict_depth(image, bundle), metric=is_metric(bundle.model))
    return Image.fromarray(np.repeat(d[..., None], 3, axis=-1), "RGB")
