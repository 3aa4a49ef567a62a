"""The one output writer: stems, result files and the JSON record (written last), all atomic.

Every path that writes results (rules runs, ``run --op``, ``detect``, the daemon, the Ray
coordinator) names its outputs with :func:`stem_for` and claims a stem through
:class:`OutputFolder`, so no input's outputs can overwrite another's, whatever the names; every
record goes through :func:`write_record` (validated as :class:`Record`, with ``record_version``).

Stems hold letters, digits, ``-`` and ``_`` only, never a dot: an output is ``STEM.KIND.png``,
so the part before the first dot names its input, and ``a.mask.png`` given as an input
(stem ``a_mask``) can never collide with ``a.png``'s mask (``a.mask.png``).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pydantic import BaseModel, ConfigDict

from pipeline import PIPELINE_VERSION
from pipeline.io.imageio import LoadedImage, _srgb_profile_bytes, atomic_write_text, colour_space, save_image

RECORD_VERSION = 2
SUBFOLDERS = {"skipped": "skipped", "failed": "failed"}  # other statuses write at the top level

# Distinct, colour-blind-friendly-ish RGB colours for masks (Okabe-Ito palette).
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]


def stem_for(name: str) -> str:
    """The output stem for an input name (a file name, or a path relative to a watched folder):
    folders joined with ``-``, the suffix dropped, every character but letters, digits, ``-``
    and ``_`` replaced by ``_``; at most 100 characters; never empty."""
    parts = Path(str(name)).parts
    raw = "-".join([*parts[:-1], Path(parts[-1]).stem]) if parts else "image"
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in raw).strip("_")
    return stem[:100] or "image"


class Record(BaseModel):
    """Every record's common fields; the rest depends on the status (detections, actions, QA,
    outputs, error ...) and is kept as given. ``status``: edited | skipped | failed | planned |
    detected."""

    model_config = ConfigDict(extra="allow")
    record_version: int = RECORD_VERSION
    status: str
    input: dict[str, Any]
    pipeline_version: str = PIPELINE_VERSION
    created: str = ""
    error: str | None = None


def record_folder(out_dir: Path, status: str) -> Path:
    """Where a record of ``status`` goes under the output folder ``out_dir``."""
    sub = SUBFOLDERS.get(status)
    return out_dir / sub if sub else out_dir


def write_record(out_dir: Path, stem: str, record: dict[str, Any]) -> dict[str, Any]:
    """Validate ``record`` as a :class:`Record` and write ``STEM.json`` into the folder its status
    belongs to under ``out_dir`` (atomic; call it last). Returns the record as written."""
    rec = Record.model_validate({"created": now_iso(), **record}).model_dump(mode="json", exclude_none=False)
    folder = record_folder(out_dir, rec["status"])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{stem}.json", json.dumps(rec, indent=2, default=str) + "\n")
    return rec


def output_exists(out_dir: Path, stem: str) -> bool:
    """Has any earlier run written a record with this stem (any status)?"""
    return any((d / f"{stem}.json").exists() for d in {record_folder(out_dir, s) for s in ("edited", *SUBFOLDERS)})


class OutputFolder:
    """Hands out stems in one output folder, collision-free within a run and against outputs
    already there. ``policy`` for a stem whose outputs exist: ``suffix`` (``STEM-1``,
    ``STEM-2``, ...), ``skip`` (None), ``overwrite`` (the stem), ``replace-own`` (the stem when
    the existing record is of the same input file, else a suffix). A stem already handed out in
    this run always gets a suffix."""

    POLICIES = ("suffix", "skip", "overwrite", "replace-own")

    def __init__(self, out_dir: Path, policy: str = "suffix"):
        if policy not in self.POLICIES:
            raise ValueError(f"conflict policy must be one of {', '.join(self.POLICIES)}, not {policy!r}")
        self.out_dir = out_dir
        self.policy = policy
        self.taken: set[str] = set()

    def _own(self, stem: str, source: str | None) -> bool:
        if source is None:
            return False
        for status in ("edited", *SUBFOLDERS):
            p = record_folder(self.out_dir, status) / f"{stem}.json"
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            return str((rec.get("input") or {}).get("path")) == str(source)
        return False

    def claim(self, name: str, tag: str = "", source: str | None = None) -> str | None:
        """A stem for the input ``name`` (``tag`` appended with ``-``, e.g. the op of ``run --op``);
        ``source``: the input's path as records name it (for ``replace-own``)."""
        stem = stem_for(name) + (f"-{stem_for(tag)}" if tag else "")
        chosen: str | None
        if stem in self.taken:
            policy = "suffix"
        elif not output_exists(self.out_dir, stem):
            policy = "free"
        elif self.policy == "replace-own":
            policy = "overwrite" if self._own(stem, source) else "suffix"
        else:
            policy = self.policy
        if policy in ("free", "overwrite"):
            chosen = stem
        elif policy == "skip":
            chosen = None
        else:
            i = 1
            while output_exists(self.out_dir, f"{stem}-{i}") or f"{stem}-{i}" in self.taken:
                i += 1
            chosen = f"{stem}-{i}"
        if chosen is not None:
            self.taken.add(chosen)
        return chosen


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


def write_detect_outputs(out_root: Path, stem: str, loaded: LoadedImage, result: Any,
                         extra: dict[str, Any] | None = None, *, status: str | None = None) -> dict[str, Any]:
    """Write ``STEM.maskN.LABEL.png`` per detection and ``STEM.overlay.png``, then ``STEM.json``
    (last), in the folder the record's status belongs to under the output root ``out_root``
    (``skipped/`` for skipped images). ``status``: default ``skipped`` when the detection skipped
    the image, else ``detected``. Returns the record. Masks are 8-bit greyscale PNGs (255 =
    product) at the input's size."""
    status = status or (extra or {}).get("status") or ("skipped" if result.skipped else "detected")
    out_dir = record_folder(out_root, status)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_files = []
    for i, d in enumerate(result.detections):
        name = f"{stem}.mask{i}.{stem_for(d.label)}.png"
        save_image(d.mask, out_dir / name)
        mask_files.append(name)
    banner = f"skipped: {result.reason}" if status == "skipped" else None
    overlay = f"{stem}.overlay.png"
    save_image(draw_overlay(loaded.image, result.detections, banner), out_dir / overlay)
    det = result.to_record()
    for d, f in zip(det["detections"], mask_files):
        d["mask_file"] = f
    record = {
        "input": input_record(loaded),
        "detect": det,
        "outputs": {"overlay": overlay, "masks": mask_files},
        **(extra or {}),
        "status": status,
    }
    return write_record(out_root, stem, record)


def write_failure(out_dir: Path, stem: str, source: str, error: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``out_dir/failed/STEM.json`` for an input that could not be processed (``out_dir``: the
    output folder, not its ``failed/``)."""
    return write_record(out_dir, stem, {"status": "failed", "input": {"path": source}, "error": error,
                                        **(extra or {})})


# --------------------------------------------------------------------------------------------
# Encoding result images (settings / profile ``output``)

LOSSY = {"jpeg": True, "webp": True, "avif": True, "png": False, "tiff": False}
PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "avif": "AVIF", "tiff": "TIFF"}


def to_srgb(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, str]:
    """``image`` (RGB or RGBA) converted from the colour space ``icc`` describes to sRGB
    (relative colorimetric, LittleCMS via Pillow's ImageCms). Returns ``(image, what was done)``;
    an untagged image is taken as sRGB already and returned as it is."""
    space = colour_space(icc)
    if space in ("sRGB", "untagged"):
        return image, "already sRGB" if space == "sRGB" else "untagged: taken as sRGB"
    import io

    from PIL import ImageCms

    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    dst = ImageCms.ImageCmsProfile(io.BytesIO(_srgb_profile_bytes()))
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    out = ImageCms.profileToProfile(image.convert("RGB"), src, dst, outputMode="RGB")
    if alpha is not None:
        out.putalpha(alpha)
    return out, f"converted from {space!r} to sRGB"


def encode_image(image: Image.Image, alpha: np.ndarray | None, out_dir: Path, name: str, output: Any,
                 icc: bytes | None) -> dict[str, Any]:
    """Write ``image`` (PIL RGB; ``alpha`` HxW uint8 or None) as ``out_dir/name`` in
    ``output.format`` (an :class:`~pipeline.settings.OutputSettings`). Returns the record:
    file, format, lossy, quality, colour (what was done to reach sRGB), icc (embedded or not),
    metadata policy, alpha (kept, or flattened on white for JPEG)."""
    fmt = output.format
    rec: dict[str, Any] = {"file": name, "format": PIL_FORMAT[fmt], "lossy": LOSSY[fmt] and not output.lossless,
                           "metadata": output.metadata}
    if rec["lossy"]:
        rec["quality"] = output.quality
    im = image.copy()
    im.info.pop("icc_profile", None)
    if alpha is not None:
        if fmt == "jpeg":
            rec["alpha"] = "flattened on white (JPEG has no alpha)"
        else:
            rec["alpha"] = "kept"
        im.putalpha(Image.fromarray(alpha, "L"))
    if output.srgb:
        im, rec["colour"] = to_srgb(im, icc)
        out_icc = _srgb_profile_bytes()
    else:
        rec["colour"] = "as the input"
        out_icc = icc
    if output.metadata == "strip":
        out_icc = None
    rec["icc"] = "sRGB" if out_icc and output.srgb else ("input's" if out_icc else "none")
    opts: dict[str, object] = {}
    if fmt in ("webp", "avif") and output.lossless:
        opts["lossless"] = True
    if fmt == "jpeg":
        # 4:4:4: chroma subsampling would bleed the product's colour 8-16 px into a white background.
        opts.update(optimize=True, subsampling=0)
        rec["subsampling"] = "4:4:4"
    save_image(im, out_dir / name, format=PIL_FORMAT[fmt], icc_profile=out_icc or b"", quality=output.quality,
               options=opts)
    rec["bytes"] = (out_dir / name).stat().st_size
    return rec
