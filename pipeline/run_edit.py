"""One edit operation on one image, by hand: the core of `product-studio run IMAGE --op ...`.

Finds the product (detection, or a user-supplied mask), runs the edit, and writes the result
image (PNG, so pixels outside the edit stay bit-identical to the input), its edit mask and the
JSON record (last). Every outcome (edited, skipped, failed) gets a record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import PIPELINE_VERSION
from pipeline.imageio import ImageLoadError, atomic_write_text, load_image, save_image
from pipeline.outputs import input_record, now_iso, safe_stem
from pipeline.settings import ProductClass, Settings

# Each op is a handler ``(image, mask, label, options, settings, registry) -> Edit`` in its own
# module, imported only when used: ``image`` PIL RGB (EXIF applied), ``mask`` HxW bool product
# mask, ``options`` the op's CLI/rule parameters (strings or numbers as given; the handler parses
# and validates them and raises ValueError / EditError with a clear message).
OP_HANDLERS: dict[str, str] = {
    "displace": "pipeline.displace:op_displace",
    "enhance": "pipeline.enhance:op_enhance",
    "rotate": "pipeline.rotate:op_rotate",
}
OPS = tuple(OP_HANDLERS)


def op_handler(op: str):
    """The handler for ``op``; ValueError naming the known ops, or saying the op is not built."""
    import importlib

    if op not in OP_HANDLERS:
        raise ValueError(f"unknown operation {op!r} (known: {', '.join(OPS)})")
    mod, fn = OP_HANDLERS[op].split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError):
        raise ValueError(f"operation {op!r} is not available in this version") from None



@dataclass
class EditOutcome:
    status: str  # edited | skipped | failed
    record: dict[str, Any]
    image_path: Path | None = None


def load_mask(path: Path, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A user mask file (white = product; any format the loader takes) -> HxW bool.

    Raises ValueError when it is empty or not the image's size (after EXIF orientation)."""
    m = load_image(path, max_pixels=max_pixels)
    if m.size != size:
        raise ValueError(f"mask {path} is {m.size[0]}x{m.size[1]} but the image is {size[0]}x{size[1]}")
    arr = np.asarray(m.image.convert("L")) > 127
    if not arr.any():
        raise ValueError(f"mask {path} has no white (product) pixels")
    return arr


def _write_record(out_dir: Path, name: str, record: dict[str, Any]) -> None:
    atomic_write_text(out_dir / name, json.dumps(record, indent=2, default=str) + "\n")


def run_op(settings: Settings, image_path: Path, op: str, *, label: str, out_dir: Path,
           options: dict[str, Any] | None = None, mask_path: Path | None = None, registry: Any = None,
           detector: Any = None) -> EditOutcome:
    """Run ``op`` on the best-scoring ``label`` instance (or the ``mask_path`` region).

    Bad input, a bad mask or parameter, and refusals (:class:`~pipeline.edits.EditError`) give a
    ``failed`` outcome with the reason; no product found gives ``skipped`` with the best scores.
    Outputs: ``NAME.OP.png``, ``NAME.OP.mask.png`` and ``NAME.OP.json`` (last).
    """
    from pipeline.edits import EditError

    handler = op_handler(op)
    options = dict(options or {})
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_stem(image_path.name)
    rec_name = f"{stem}.{op}.json"
    base: dict[str, Any] = {"op": op, "options": options, "pipeline_version": PIPELINE_VERSION, "created": now_iso(),
                            "settings_file": str(settings.source_file) if settings.source_file else None}
    try:
        loaded = load_image(image_path, max_pixels=settings.limits.max_pixels)
    except ImageLoadError as e:
        rec = {**base, "status": "failed", "input": {"path": str(image_path)}, "error": str(e)}
        _write_record(out_dir, rec_name, rec)
        return EditOutcome("failed", rec)
    base["input"] = input_record(loaded)
    image = loaded.image.convert("RGB")
    try:
        if mask_path is not None:
            mask = load_mask(mask_path, image.size, settings.limits.max_pixels)
            base["product"] = {"source": "mask file", "mask_file": str(mask_path), "label": label}
        else:
            # Scored against every configured class, so a neighbour that looks more like another
            # class is not taken for this one.
            classes = list(settings.detect.classes)
            if label not in [c.name for c in classes]:
                classes.append(ProductClass(name=label))
            res = detector.detect(image, classes)
            base["detect"] = res.to_record()
            mine = [d for d in res.detections if d.label == label]
            if not mine:
                reason = res.reason if res.skipped else f"no {label!r} found (found: {', '.join(sorted({d.label for d in res.detections}))})"
                rec = {**base, "status": "skipped", "reason": reason}
                _write_record(out_dir, rec_name, rec)
                return EditOutcome("skipped", rec)
            best = max(mine, key=lambda d: d.score)
            mask = best.mask
            base["product"] = {**best.to_record(), "proposals": best.source, "source": "detection"}
        edit = handler(image, mask, label, options, settings, registry)
    except (EditError, ValueError) as e:
        rec = {**base, "status": "failed", "error": str(e)}
        _write_record(out_dir, rec_name, rec)
        return EditOutcome("failed", rec)
    out_img = out_dir / f"{stem}.{op}.png"
    out_mask = out_dir / f"{stem}.{op}.mask.png"
    save_image(edit.image, out_img, icc_profile=loaded.icc_profile)
    save_image(edit.edit_mask, out_mask)
    rec = {**base, "status": "edited", "edit": edit.record,
           "outputs": {"image": out_img.name, "edit_mask": out_mask.name},
           "timings": {"total": round(time.perf_counter() - t0, 4)}}
    _write_record(out_dir, rec_name, rec)
    return EditOutcome("edited", rec, out_img)
