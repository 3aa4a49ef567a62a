"""Writing results: mask PNGs, overlay PNG and the JSON record (written last), all atomically."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline import PIPELINE_VERSION
from pipeline.imageio import LoadedImage, atomic_write_text, save_image

# Distinct, colour-blind-friendly-ish RGB colours for masks (Okabe-Ito palette).
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]


def safe_stem(name: str) -> str:
    stem = Path(name).stem or "image"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)[:100]


def draw_overlay(image: Image.Image, detections: Sequence[Any], banner: str | None = None) -> Image.Image:
    """RGB copy of ``image`` with each mask tinted (45 %), outlined, and labelled ``label score``.

    ``detections``: objects with ``mask`` (HxW bool), ``box``, ``label``, ``score``."""
    import cv2

    base = np.asarray(image.convert("RGB")).copy()
    out = base.astype(np.float32)
    for i, d in enumerate(detections):
        colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
        out[d.mask] = out[d.mask] * 0.55 + colour * 0.45
    out = np.ascontiguousarray(out.clip(0, 255).astype(np.uint8))
    scale = max(out.shape[:2]) / 800
    thick = max(1, int(round(2 * scale)))
    for i, d in enumerate(detections):
        colour = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        contours, _ = cv2.findContours(np.ascontiguousarray(d.mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thick)
        x0, y0 = d.box[0], d.box[1]
        text = f"{d.label} {d.score:.2f}"
        fs = 0.5 * max(scale, 0.6)
        (tw, th), bl = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)
        ty = max(th + bl, y0)
        cv2.rectangle(out, (x0, ty - th - bl), (x0 + tw + 4, ty), colour, cv2.FILLED)
        cv2.putText(out, text, (x0 + 2, ty - bl), cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0), thick, cv2.LINE_AA)
    if banner:
        fs = 0.5 * max(scale, 0.6)
        (tw, th), bl = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)
        cv2.rectangle(out, (0, 0), (min(out.shape[1], tw + 8), th + bl + 8), (0, 0, 0), cv2.FILLED)
        cv2.putText(out, banner, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), thick, cv2.LINE_AA)
    return Image.fromarray(out)


def input_record(loaded: LoadedImage) -> dict[str, Any]:
    return {
        "name": Path(loaded.path).name if loaded.path else None,
        "path": loaded.path,
        "sha256": loaded.sha256,
        "format": loaded.format,
        "mode": loaded.original_mode,
        "size": list(loaded.size),
        "exif_transposed": loaded.exif_transposed,
        "frames": loaded.frames,  # GIF and HEIF may hold several; the first is processed
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_detect_outputs(out_dir: Path, stem: str, loaded: LoadedImage, result: Any,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``stem.maskN.label.png`` per detection, ``stem.overlay.png``, then ``stem.json`` (last).

    Returns the record. Masks are 8-bit greyscale PNGs (255 = product) at the input's size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_files = []
    for i, d in enumerate(result.detections):
        name = f"{stem}.mask{i}.{safe_stem(d.label)}.png"
        save_image(d.mask, out_dir / name)
        mask_files.append(name)
    banner = f"skipped: {result.reason}" if result.skipped else None
    overlay = f"{stem}.overlay.png"
    save_image(draw_overlay(loaded.image, result.detections, banner), out_dir / overlay)
    det = result.to_record()
    for d, f in zip(det["detections"], mask_files):
        d["mask_file"] = f
    record = {
        "status": "skipped" if result.skipped else "detected",
        "input": input_record(loaded),
        "detect": det,
        "outputs": {"overlay": overlay, "masks": mask_files},
        "pipeline_version": PIPELINE_VERSION,
        "created": now_iso(),
        **(extra or {}),
    }
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


def write_failure(out_dir: Path, stem: str, source: str, error: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``stem.json`` record for an input that could not be processed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": "failed", "input": {"path": source}, "error": error,
              "pipeline_version": PIPELINE_VERSION, "created": now_iso(), **(extra or {})}
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(record, indent=2, default=str) + "\n")
    return record
