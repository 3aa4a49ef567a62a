"""Training data: find images and captions, load them safely, crop to buckets, optional masks.

Layouts (the two LoRA users bring):

- **kohya**: images with same-stem caption files (``photo1.jpg`` + ``photo1.txt``). Images at the
  top level repeat ``repeats`` times per epoch; a sub-folder named ``N_name`` (``6_ppzocketv2``)
  holds images repeated N times. Other sub-folders are ignored (and reported).
- **metadata.jsonl** (diffusers ``imagefolder``): one JSON object per line with ``file_name``
  (relative to the dataset folder) and ``text`` (or ``caption``), optionally ``repeats``.

Every image goes through :func:`pipeline.io.imageio.load_image` (formats, pixel limit, EXIF
orientation). RGBA images are flattened on white, as product cut-outs are shot on white. Each
image is resized once to *cover* its bucket (the training square, or the aspect-ratio bucket
nearest its shape) and kept in memory as uint8; each step crops the bucket out of it (centre or
random) and optionally flips it.

Captions: the activation tag is prepended (``"ppzocketv2, a red handbag on a table"``) unless
the caption already starts with it. Problems are collected over the whole folder and raised once
as :class:`DatasetError`, so a user fixes every bad file in one go.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from pipeline.errors import BadInput
from pipeline.io.imageio import ImageLoadError, is_image_name, load_image

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lora.config import TrainConfig

METADATA = "metadata.jsonl"
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


class DatasetError(BadInput):
    """The dataset cannot be used. ``problems``: one human-readable line per bad file or rule."""

    def __init__(self, summary: str, problems: Sequence[str] = ()):
        self.summary = summary
        self.problems = list(problems)
        lines = [summary] + [f"  {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Scanning (no pixels decoded)


@dataclass
class Entry:
    """One image file found in the dataset. ``rel``: POSIX path relative to the dataset root.
    ``caption``: the caption as written (None when there is none); ``repeats`` >= 1."""

    path: Path
    rel: str
    repeats: int
    caption: str | None
    caption_source: str  # "txt" | "metadata" | "none"


@dataclass
class Scan:
    root: Path
    entries: list[Entry]
    layout: str  # "kohya" | "metadata"
    ignored: list[str] = field(default_factory=list)  # sub-folders without the N_ prefix, stray files


def _read_caption(path: Path) -> str:
    # Captions are often written by hand (one per line, trailing spaces); one line for the tokenizer.
    text = path.read_text(encoding="utf-8-sig")
    return " ".join(text.split())


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p) and not p.name.startswith("."))


def scan_dataset(root: Path, *, caption_extension: str = ".txt", repeats: int = 1) -> Scan:
    """Find images and their captions under ``root``. Raises :class:`DatasetError` when the folder
    is missing, holds no images, or ``metadata.jsonl`` is malformed (every bad line listed)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if (root / METADATA).is_file():
        scan = _scan_metadata(root, repeats)
    else:
        scan = _scan_kohya(root, caption_extension, repeats)
    if not scan.entries:
        hint = (f"put images (.jpg, .png, .webp, ...) with same-stem {caption_extension} captions in {root}, "
                "or in N_name sub-folders (N = repeats)")
        raise DatasetError(f"no images found in {root}", [hint] + [f"ignored: {i}" for i in scan.ignored])
    return scan


def _scan_kohya(root: Path, ext: str, repeats: int) -> Scan:
    groups: list[tuple[Path, int]] = [(root, repeats)]
    ignored = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _REPEAT_DIR.match(sub.name)
        if m and int(m.group(1)) > 0:
            groups.append((sub, int(m.group(1))))
        else:
            ignored.append(f"{sub.name}/ (not an N_name folder, so kohya would not train it either)")
    entries = []
    for folder, n in groups:
        for img in _images_in(folder):
            cap_file = img.with_suffix(ext)
            caption = _read_caption(cap_file) if cap_file.is_file() else None
            entries.append(Entry(img, img.relative_to(root).as_posix(), n, caption,
                                 "txt" if caption is not None else "none"))
    return Scan(root, entries, "kohya", ignored)


def _scan_metadata(root: Path, repeats: int) -> Scan:
    entries, problems, seen = [], [], set()
    for i, line in enumerate((root / METADATA).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{METADATA}:{i}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(f"{METADATA}:{i}: needs a \"file_name\" string")
            continue
        rel = row["file_name"]
        path = (root / rel)
        try:
            path.resolve().relative_to(root.resolve())
        except ValueError:
            problems.append(f"{METADATA}:{i}: {rel} lies outside the dataset folder")
            continue
        if rel in seen:
            problems.append(f"{METADATA}:{i}: {rel} listed twice")
            continue
        seen.add(rel)
        text = row.get("text", row.get("caption"))
        if text is not None and not isinstance(text, str):
            problems.append(f"{METADATA}:{i}: \"text\" must be a string")
            continue
        n = row.get("repeats", repeats)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"{METADATA}:{i}: \"repeats\" must be a positive integer")
            continue
        caption = " ".join(text.split()) if text is not None else None
        entries.append(Entry(path, Path(rel).as_posix(), n, caption, "metadata" if caption is not None else "none"))
    if problems:
        raise DatasetError(f"{root / METADATA} has {len(problems)} bad line(s)", problems)
    return Scan(root, entries, "metadata")


# ------------------------------------------------------------------------------------------------
# Captions


def full_caption(tag: str, caption: str | None) -> str:
    """``"TAG, caption"``; the tag alone for no/empty caption; unchanged if it already leads with TAG."""
    caption = (caption or "").strip().strip(",").strip()
    if not caption:
        return tag
    first = caption.split(",", 1)[0].strip()
    if first == tag or caption == tag:
        return caption
    return f"{tag}, {caption}"


def shuffle_caption(caption: str, keep: int, gen: "torch.Generator") -> str:
    """kohya ``shuffle_caption``: comma-separated parts after the first ``keep`` are permuted."""
    import torch

    parts = [p.strip() for p in caption.split(",") if p.strip()]
    head, tail = parts[:keep], parts[keep:]
    if len(tail) > 1:
        tail = [tail[i] for i in torch.randperm(len(tail), generator=gen).tolist()]
    return ", ".join(head + tail)


# ------------------------------------------------------------------------------------------------
# Buckets


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """kohya-style buckets: ``(width, height)`` pairs, sides multiples of ``step`` within
    ``[min_side, max_side]``, area at most ``resolution**2``; always includes the square."""
    area = resolution * resolution
    out = {(resolution, resolution)}
    w = max(step, (min_side + step - 1) // step * step)
    while w <= max_side:
        h = min(max_side, (area // w) // step * step)
        if h >= min_side:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to ``size`` = (width, height)."""
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """Smallest (width, height) with the image's aspect that covers ``bucket`` on both sides."""
    w, h = size
    s = max(bucket[0] / w, bucket[1] / h)
    return max(bucket[0], round(w * s)), max(bucket[1], round(h * s))


# ------------------------------------------------------------------------------------------------
# Loaded dataset


@dataclass
class Item:
    """One training image, resized to cover its bucket.

    ``pixels``: HxWx3 uint8 RGB (H >= bucket height, W >= bucket width, at least one equal).
    ``mask``: HxW float32 in [0, 1] (1 = product) at the same size, or None. ``bucket``: (w, h).
    ``caption``: the full caption (activation tag first). ``sha256``: of the file's bytes.
    """

    rel: str
    pixels: np.ndarray
    caption: str
    repeats: int
    bucket: tuple[int, int]
    sha256: str
    mask: np.ndarray | None = None
    mask_sha256: str | None = None

    def crop_box(self, mode: str, gen: "torch.Generator | None") -> tuple[int, int]:
        """Top-left (x, y) of the bucket-sized window: centred, or uniformly random."""
        import torch

        H, W = self.pixels.shape[:2]
        bw, bh = self.bucket
        if mode == "center" or gen is None:
            return (W - bw) // 2, (H - bh) // 2
        x = int(torch.randint(0, W - bw + 1, (1,), generator=gen)) if W > bw else 0
        y = int(torch.randint(0, H - bh + 1, (1,), generator=gen)) if H > bh else 0
        return x, y


def flatten_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":
        bg = Image.new("RGB", image.size, (255, 255, 255))
        bg.paste(image, mask=image.getchannel("A"))
        return bg
    return image.convert("RGB")


def find_mask_file(mask_dir: Path, rel: str) -> Path | None:
    """Mask for dataset image ``rel``: ``MASK_DIR/<rel folder>/STEM.*`` or ``MASK_DIR/STEM.*``
    (any image suffix; ``.png`` first)."""
    relp = Path(rel)
    for folder in (mask_dir / relp.parent, mask_dir):
        if not folder.is_dir():
            continue
        cands = sorted((p for p in folder.glob(f"{relp.stem}.*") if is_image_name(p)),
                       key=lambda p: (p.suffix.lower() != ".png", p.name))
        if cands:
            return cands[0]
    return None


def load_mask_file(path: Path, size: tuple[int, int], max_pixels: int) -> tuple[np.ndarray, str]:
    """A mask image (white = product, through the safe loader) as HxW bool at ``size`` (w, h).

    A mask of another size with the same aspect ratio (within 1 %) is resized (nearest); a
    different aspect ratio is an error (it was drawn for another picture). Returns (mask, sha256)."""
    m = load_image(path, max_pixels=max_pixels)
    img = m.image
    if img.mode == "RGBA" and img.getchannel("A").getextrema()[0] < 255:
        # A cut-out saved as a mask: the opaque part is the product.
        arr = np.asarray(img.getchannel("A")) > 127
    else:
        arr = np.asarray(img.convert("L")) > 127
    if img.size != size:
        if abs(img.size[0] / img.size[1] - size[0] / size[1]) > 0.01 * size[0] / size[1]:
            raise ValueError(f"mask is {img.size[0]}x{img.size[1]} but the image is {size[0]}x{size[1]}")
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST))
    return arr, m.sha256


class TrainDataset:
    """The loaded dataset: items, their buckets, the epoch plan and per-step examples."""

    def __init__(self, items: list[Item], scan: Scan, crop: str = "center", flip: bool = False,
                 shuffle: bool = False, keep_tokens: int = 1, caption_dropout: float = 0.0):
        self.items = items
        self.scan = scan
        self.crop = crop
        self.flip = flip
        self.shuffle = shuffle
        self.keep_tokens = keep_tokens
        self.caption_dropout = caption_dropout
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(items):
            self.buckets.setdefault(it.bucket, []).append(i)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def samples_per_epoch(self) -> int:
        return sum(it.repeats for it in self.items)

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(sum(self.items[i].repeats for i in idx) / batch_size) for idx in self.buckets.values())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The batches of ``epoch`` (0-based) as lists of item indices, each batch from one bucket.

        Depends only on (seed, epoch), so a resumed run can skip to the batch it stopped at."""
        import torch

        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        batches = []
        for bucket in sorted(self.buckets):
            pool = [i for i in self.buckets[bucket] for _ in range(self.items[i].repeats)]
            order = torch.randperm(len(pool), generator=g).tolist()
            pool = [pool[j] for j in order]
            batches.extend(pool[k:k + batch_size] for k in range(0, len(pool), batch_size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[j] for j in order]

    def example(self, index: int, gen: "torch.Generator | None") -> dict[str, Any]:
        """One training example; ``gen`` (CPU) drives every random choice (crop, flip, caption).

        Returns ``pixels`` float32 [3, h, w] in [-1, 1], ``mask`` float32 [1, h, w] in [0, 1] or
        None, ``caption`` str, ``index``, ``time_ids`` (original H, W, crop top, left, h, w). (h, w)
        is the item's bucket."""
        import torch

        it = self.items[index]
        bw, bh = it.bucket
        x, y = it.crop_box(self.crop, gen)
        if it.mask is not None and self.crop == "random" and gen is not None:
            # A random window that misses the product would teach nothing (and weigh nothing);
            # retry a few times, then fall back to the centre, which load-time checks keep non-empty.
            for _ in range(8):
                if it.mask[y:y + bh, x:x + bw].any():
                    break
                x, y = it.crop_box(self.crop, gen)
            else:
                x, y = it.crop_box("center", None)
        # np.array copies: arrays from PIL are read-only, which torch.from_numpy warns about.
        px = torch.from_numpy(np.array(it.pixels[y:y + bh, x:x + bw])).permute(2, 0, 1).float()
        px = px / 127.5 - 1.0
        mask = None
        if it.mask is not None:
            mask = torch.from_numpy(np.array(it.mask[y:y + bh, x:x + bw]))[None].float()
        if self.flip and gen is not None and float(torch.rand((), generator=gen)) < 0.5:
            px = px.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
            x = it.pixels.shape[1] - x - bw  # the window's left edge in the flipped image
        caption = it.caption
        if self.shuffle and gen is not None:
            caption = shuffle_caption(caption, self.keep_tokens, gen)
        if self.caption_dropout > 0 and gen is not None and float(torch.rand((), generator=gen)) < self.caption_dropout:
            caption = ""
        H, W = it.pixels.shape[:2]
        # SDXL's size conditioning: (original h, w) of the image the window came from, the
        # window's (top, left) in it and the (h, w) trained at.
        return {"pixels": px, "mask": mask, "caption": caption, "index": index,
                "time_ids": (H, W, y, x, bh, bw)}

    def collate(self, indices: Iterable[int], gen: "torch.Generator | None") -> dict[str, Any]:
        """A batch: ``pixels`` [B, 3, h, w], ``mask`` [B, 1, h, w] or None, ``captions`` list[str],
        ``time_ids`` float32 [B, 6] (original h, w, crop top, left, target h, w: SDXL's size conditioning)."""
        import torch

        ex = [self.example(i, gen) for i in indices]
        masks = [e["mask"] for e in ex]
        return {
            "pixels": torch.stack([e["pixels"] for e in ex]),
            "mask": torch.stack(masks) if all(m is not None for m in masks) else None,
            "captions": [e["caption"] for e in ex],
            "indices": [e["index"] for e in ex],
            "time_ids": torch.tensor([e["time_ids"] for e in ex], dtype=torch.float32),
        }

    def content_hash(self) -> str:
        """SHA-256 over (path, image bytes hash, caption, repeats, mask hash) of every item:
        the identity of what was trained on, for the manifest and for `--resume` checks."""
        h = hashlib.sha256()
        for it in sorted(self.items, key=lambda i: i.rel):
            h.update(json.dumps([it.rel, it.sha256, it.caption, it.repeats, it.mask_sha256]).encode())
            h.update(b"\n")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.scan.root),
            "layout": self.scan.layout,
            "images": len(self.items),
            "samples_per_epoch": self.samples_per_epoch,
            "buckets": {f"{w}x{h}": len(ix) for (w, h), ix in sorted(self.buckets.items())},
            "masked": any(it.mask is not None for it in self.items),
            "sha256": self.content_hash(),
        }


def load_dataset(cfg: "TrainConfig", mask_fn: Callable[[str, Image.Image], np.ndarray | None] | None = None
                 ) -> TrainDataset:
    """Scan, caption, load, resize and (optionally) attach masks for every image of ``cfg.dataset``.

    Masks come from ``cfg.mask_dir``, or from ``mask_fn(rel, image)`` (``--auto-mask``: ``image``
    PIL RGB after EXIF orientation; returns HxW bool at that size, or None when nothing was found).
    Raises :class:`DatasetError` listing every unreadable image, missing caption (policy
    ``error``), and missing or empty mask."""
    scan = scan_dataset(cfg.dataset, caption_extension=cfg.caption_extension, repeats=cfg.repeats)
    uncaptioned = [e.rel for e in scan.entries if e.caption is None] if cfg.missing_caption == "error" else []
    bucket_list = (make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket, cfg.max_bucket)
                   if cfg.buckets else [(cfg.resolution, cfg.resolution)])
    items, bad, mask_problems = [], [], []
    mask_hashes: dict[str, str] = {}
    for e in scan.entries:
        try:
            loaded = load_image(e.path, max_pixels=cfg.max_pixels)
        except ImageLoadError as err:
            bad.append(f"{e.rel}: {err.reason}")
            continue
        image = flatten_on_white(loaded.image)
        size = image.size
        mask = None
        if cfg.mask_dir is not None:
            mf = find_mask_file(cfg.mask_dir, e.rel)
            if mf is None:
                mask_problems.append(f"{e.rel}: no mask file {Path(e.rel).stem}.png in {cfg.mask_dir}")
                continue
            try:
                mask, mask_hashes[e.rel] = load_mask_file(mf, size, cfg.max_pixels)
            except ImageLoadError as err:
                mask_problems.append(f"{e.rel}: mask {mf.name}: {err.reason}")
                continue
            except ValueError as err:
                mask_problems.append(f"{e.rel}: mask {mf.name}: {err}")
                continue
        elif mask_fn is not None:
            mask = mask_fn(e.rel, image)
            if mask is None:
                mask_problems.append(f"{e.rel}: no product found for the automatic mask")
                continue
            mask = np.asarray(mask, dtype=bool)
            mask_hashes[e.rel] = hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
        bucket = nearest_bucket(size, bucket_list)
        cw, ch = cover_size(size, bucket)
        pixels = np.asarray(image.resize((cw, ch), Image.LANCZOS, reducing_gap=3.0) if (cw, ch) != size else image)
        mask_arr = None
        if mask is not None:
            if not mask.any():
                mask_problems.append(f"{e.rel}: mask is all zero (no product pixels); a masked loss would "
                                     "have nothing to learn from")
                continue
            # Bilinear on 0/1 keeps soft edges: boundary pixels count partly.
            mask_arr = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((cw, ch), Image.BILINEAR),
                                  dtype=np.float32).clip(0.0, 1.0)
            bw, bh = bucket
            x0, y0 = (cw - bw) // 2, (ch - bh) // 2
            if not (mask_arr[y0:y0 + bh, x0:x0 + bw] > 0).any():
                mask_problems.append(f"{e.rel}: the product lies outside the {bw}x{bh} training crop")
                continue
        items.append(Item(e.rel, pixels, full_caption(cfg.tag, e.caption), e.repeats, bucket, loaded.sha256,
                          mask_arr, mask_hashes.get(e.rel)))
    unreadable = {b.split(": ", 1)[0] for b in bad}
    uncaptioned = [r for r in uncaptioned if r not in unreadable]
    if bad or uncaptioned or mask_problems:
        # One error listing every bad file, so a user fixes the whole folder in one go.
        parts, problems = [], []
        if bad:
            parts.append(f"{len(bad)} unreadable image(s) (fix or remove them)")
            problems += [f"unreadable: {b}" for b in bad]
        if uncaptioned:
            where = f"{cfg.caption_extension} file" + (" or metadata text" if scan.layout == "metadata" else "")
            parts.append(f"{len(uncaptioned)} image(s) without a caption ({where}); write them with "
                         "`product-studio caption DATASET`, or train them with the tag alone "
                         "(--missing-caption tag)")
            problems += [f"no caption: {r}" for r in uncaptioned]
        if mask_problems:
            parts.append(f"{len(mask_problems)} mask problem(s)")
            problems += [f"mask: {m}" for m in mask_problems]
        raise DatasetError(f"dataset {cfg.dataset}: " + "; ".join(parts), problems)
    return TrainDataset(items, scan, crop=cfg.crop, flip=cfg.flip, shuffle=cfg.shuffle_caption,
                        keep_tokens=cfg.keep_tokens, caption_dropout=cfg.caption_dropout)
