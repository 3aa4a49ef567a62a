"""Learned super-resolution with the registry's ``upscaler`` role (a transformers image-to-image
model such as Swin2SR, e.g. ``caidas/swin2SR-classical-sr-x4-64``).

The seed projects found EDSR-style upscalers leave artifacts on Zero123's 256 px views; a learned
transformer SR model is the alternative the design names. Swin2SR's processor pads the input
(symmetrically) to a multiple of its window size, sometimes by a whole extra window; the model's
output is cropped back to exactly ``scale x`` the input size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry

__all__ = ["upscale", "upscale_factor"]


def upscale_factor(registry: "ModelRegistry") -> int:
    """The upscaler's integer scale (``config.upscale`` for Swin2SR; 1 if the model does not say)."""
    cfg = registry.get("upscaler").model.config
    return int(getattr(cfg, "upscale", None) or getattr(cfg, "upscale_factor", None) or 1)


def upscale(image: Image.Image, registry: "ModelRegistry") -> Image.Image:
    """``image`` (PIL, converted to RGB) -> PIL ``"RGB"`` uint8 of exactly ``(W * s, H * s)``,
    ``s`` = :func:`upscale_factor`. Runs in the model's dtype on its device (float32: the
    registry keeps Swin2SR in fp32), under ``torch.no_grad``.
    """
    import torch

    bundle = registry.get("upscaler")
    model = bundle.model
    s = upscale_factor(registry)
    rgb = image.convert("RGB")
    w, h = rgb.size
    px = bundle.processor(rgb, return_tensors="pt").pixel_values
    p = next(model.parameters())
    with torch.no_grad():
        out = model(pixel_values=px.to(p.device, p.dtype))
    rec = getattr(out, "reconstruction", None)
    if rec is None:
        rec = out[0]
    if rec.shape[-2] < h * s or rec.shape[-1] < w * s:
        raise ValueError(f"upscaler returned {tuple(rec.shape[-2:])}, smaller than x{s} of {(h, w)}")
    # The processor padded at the bottom/right only; the top-left (h*s, w*s) is the image.
    arr = rec[0, :, : h * s, : w * s].float().clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), "RGB")
