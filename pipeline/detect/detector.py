"""Product detection with SAM + CLIP, and the cheap "no product" skip.

Flow for one image (RGB, any size, EXIF orientation already applied by :mod:`pipeline.io.imageio`):

1. **Prefilter** (optional): one CLIP batch over the whole image and a few overlapping tiles,
   scored against every class and the background prompts. If no class reaches
   ``prefilter_threshold`` in any view the image is skipped before SAM runs at all.
2. **Proposals**: ``guided`` computes SAM's image embedding once and decodes masks only for
   point prompts inside the views where CLIP saw a class (tens of prompts instead of SAM
   "everything"'s 32x32 = 1024); ``everything`` runs segment-anything's automatic mask generator.
   The text-grounded modes (``grounded``, ``clipseg``, ``sam3``) live in :mod:`pipeline.detect.fronts`;
   ``sam3`` returns labelled instances itself and skips step 3.
3. **Classification**: every proposal's box, padded with context, is cropped from the original
   image (background kept: a masked-out crop can still "look like" the class) and all crops go
   through CLIP in one batch. Softmax over classes *and* background prompts; a proposal is
   labelled only when its class clears the class threshold and beats the runner-up (another
   class or the background total) by ``margin``.
4. **Post-processing**: tiny masks dropped, same-class overlaps suppressed (IoU) or merged
   (containment), cross-class duplicates resolved by score, holes filled, top-k per class; final
   masks at full input resolution.

Nothing found is a result (``skipped=True`` with reason and best score per class), not an error.

Large photos (48 MP and up) cost about what a 1 MP photo does (``python -m bench large``): CLIP
views and crops are downscaled to ``VIEW_SCALE`` x CLIP's input side before padding, SAM's input
and large views are read from one box-reduced copy (:class:`ReducedCopy`), and the full-resolution
bool masks are upsampled in row bands, never as a full-resolution float map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
from PIL import Image

from pipeline.io.composite import bbox
from pipeline.settings import DetectSettings, ProductClass
from pipeline.detect.fronts import HFSamProposer, clipseg_points, grounded_boxes, sam3_instances
from pipeline.detect.proposals import Proposals
from pipeline.models.registry import HFSamBundle

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipeline.models.registry import ModelRegistry

# Prompt ensemble: each class name and synonym in each template, averaged per class.
TEMPLATES = ("a photo of a {}.", "a product photo of a {}.", "a close-up photo of the {}.", "{}")
BACKGROUND = "background"
# CLIP views and crops are downscaled to at most this many times CLIP's input side before padding
# and preprocessing (a 224 px CLIP sees 448 px views): a margin for its own resize, no more.
VIEW_SCALE = 2
# The input side assumed for a scorer that does not say (CLIP ViT-B/32's).
DEFAULT_INPUT_SIDE = 224
# Final masks: up to this many pixels SAM's logits are upsampled in one go (as segment-anything
# does); above it in bands of this many output rows, so a 48 MP photo never holds a full-size float.
_ONE_SHOT_PIXELS = 4_000_000
_UPSAMPLE_ROWS = 512


# ------------------------------------------------------------------------------------------------
# Records


@dataclass
class Detection:
    """One found instance. ``mask``: HxW bool at the input's full resolution (after EXIF orientation).
    ``box``: (x0, y0, x1, y1) integer pixels, x1/y1 exclusive. ``score``: class probability in [0, 1]."""

    label: str
    score: float
    box: tuple[int, int, int, int]
    mask: np.ndarray
    margin: float = 0.0
    source: str = "guided"

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def to_record(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 4), "margin": round(self.margin, 4),
                "box": list(self.box), "mask_area": self.area, "source": self.source}


@dataclass
class DetectResult:
    image_size: tuple[int, int]  # (width, height)
    detections: list[Detection] = field(default_factory=list)
    skipped: bool = False
    reason: str | None = None
    best_scores: dict[str, float] = field(default_factory=dict)
    prefilter: dict[str, Any] | None = None
    proposals: int = 0
    classified: int = 0  # proposals left after size filter and box NMS, each one CLIP crop
    proposal_mode: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    grounding: dict[str, Any] | None = None  # grounded: box count and best detector score
    heatmap: dict[str, float] | None = None  # clipseg: best heatmap value per class
    presence: dict[str, float] | None = None  # sam3: presence score per class

    def to_record(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "skipped": self.skipped,
            "reason": self.reason,
            "detections": [d.to_record() for d in self.detections],
            "best_scores": {k: round(v, 4) for k, v in self.best_scores.items()},
            "prefilter": self.prefilter,
            "proposals": self.proposals,
            "classified": self.classified,
            "proposal_mode": self.proposal_mode,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            **{k: v for k, v in (("grounding", self.grounding), ("heatmap", self.heatmap),
                                 ("presence", self.presence)) if v is not None},
        }


# ------------------------------------------------------------------------------------------------
# Decision logic (pure numpy; tested with fixed embeddings)


def softmax_probs(image_emb: np.ndarray, text_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """[N, D] and [K, D] L2-normalised float embeddings -> [N, K] softmax probabilities."""
    logits = logit_scale * image_emb @ text_emb.T
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def split_background(probs: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, C+B] -> ([N, C] class probabilities, [N] total background probability)."""
    return probs[:, :n_classes], probs[:, n_classes:].sum(axis=1)


def decide(class_probs: np.ndarray, bg_prob: np.ndarray, thresholds: Sequence[float], margin: float):
    """Per row: (label index or -1, score, margin over the runner-up).

    The runner-up is the best *other* class or the background total, whichever is larger, so a
    crop that is mostly background, or ambiguous between two classes, is not labelled.
    """
    n, c = class_probs.shape
    labels = np.full(n, -1, dtype=int)
    scores = np.zeros(n)
    margins = np.zeros(n)
    if c == 0:
        return labels, scores, margins
    best = class_probs.argmax(axis=1)
    for i in range(n):
        b = best[i]
        p = class_probs[i, b]
        others = np.delete(class_probs[i], b)
        runner = max(float(others.max()) if others.size else 0.0, float(bg_prob[i]))
        scores[i], margins[i] = p, p - runner
        if p >= thresholds[b] and p - runner >= margin:
            labels[i] = b
    return labels, scores, margins


def mask_iou_matrix(masks: np.ndarray, max_pixels: int = 512 * 512) -> tuple[np.ndarray, np.ndarray]:
    """[M, H, W] bool -> (IoU [M, M], intersection over the smaller mask [M, M]).

    Above ``max_pixels`` per mask the overlap is measured on a regular subsample: the ratios
    barely move, while full-resolution float copies of many masks would cost gigabytes."""
    stride = max(1, int(np.ceil(np.sqrt(masks.shape[1] * masks.shape[2] / max_pixels)))) if masks.ndim == 3 else 1
    flat = masks[:, ::stride, ::stride].reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    union = area[:, None] + area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    small = np.minimum(area[:, None], area[None, :])
    contain = np.where(small > 0, inter / np.maximum(small, 1), 0.0)
    return iou, contain


def merge_same_class(masks: np.ndarray, scores: np.ndarray, iou_thresh: float = 0.6,
                     contain_thresh: float = 0.85) -> list[tuple[list[int], float]]:
    """Group same-class candidates: by score, a candidate overlapping a kept group by IoU above
    ``iou_thresh`` is suppressed (a duplicate); one mostly inside / around it (containment above
    ``contain_thresh``) is merged into it (fragments of one product). Returns
    ``[(member indices, group score)]`` in score order."""
    order = np.argsort(-scores, kind="stable")
    iou, contain = mask_iou_matrix(masks)
    groups: list[tuple[list[int], float]] = []
    for i in order:
        for members, _ in groups:
            head = members[0]
            if iou[i, head] >= iou_thresh:
                break  # duplicate of a better proposal
            if contain[i, head] >= contain_thresh:
                members.append(int(i))
                break
        else:
            groups.append(([int(i)], float(scores[i])))
    return groups


def box_nms(boxes: np.ndarray, quality: np.ndarray, keep: np.ndarray, iou: float) -> np.ndarray:
    """Indices of ``keep`` left after class-agnostic box NMS by SAM's predicted quality, as SAM's
    own automatic generator does (threshold 0.7): near-duplicate proposals (three multimask outputs
    of neighbouring prompts often coincide) would otherwise each cost a CLIP crop."""
    if len(keep) <= 1:
        return keep
    import torch
    from torchvision.ops import nms

    b = torch.as_tensor(boxes[keep], dtype=torch.float32)
    q = torch.as_tensor(quality[keep], dtype=torch.float32)
    return np.sort(keep[nms(b, q, iou).numpy()])


def fill_holes(mask: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """HxW bool -> the same with enclosed holes filled (outer contours drawn solid): a new array,
    or ``mask`` itself, filled in place, with ``inplace`` (a C-contiguous bool array).

    Works inside the mask's bounding box grown by one pixel (clipped to the image), so a product
    in a 48 MP photo costs uint8 copies of its box, not of the photo; contours cannot reach outside
    the box, and the one-pixel ring keeps OpenCV's border handling the same as on the full image."""
    import cv2

    if inplace:
        if mask.dtype != bool or not mask.flags.c_contiguous:
            raise ValueError("fill_holes(inplace=True) needs a C-contiguous bool array")
        out = mask
    else:
        out = np.array(mask, dtype=bool, order="C")
    box = bbox(out)
    if box is None:
        return out
    H, W = out.shape
    x0, y0, x1, y1 = max(0, box[0] - 1), max(0, box[1] - 1), min(W, box[2] + 1), min(H, box[3] + 1)
    # A uint8 view of the bool box, no copy (findContours leaves its input alone since OpenCV 3.2).
    contours, _ = cv2.findContours(out.view(np.uint8)[y0:y1, x0:x1], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    out[y0:y1, x0:x1] |= filled.view(bool)  # 0/1 bytes are valid bools
    return out


def pad_box(box: Sequence[float], pad: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow (x0, y0, x1, y1) by ``pad`` x its size on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * pad, (y1 - y0) * pad
    return (max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy))),
            min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy))))


def square_crop(image: Image.Image, box: Sequence[int], max_side: int | None = None,
                reduced: "ReducedCopy | None" = None) -> Image.Image:
    """Crop ``box`` and pad it to a square with the crop's mean colour, so CLIP's centre crop keeps
    all of it (CLIP preprocessing would otherwise cut the ends off elongated products).

    With ``max_side``, a crop whose long side exceeds it is first downscaled to that long side
    (bicubic, straight from the source region, without copying the full-resolution crop): CLIP
    sees a few hundred pixels anyway, while padding and preprocessing a 48 MP view at full size
    cost about 1.4 GB and seconds. Crops within ``max_side`` are exactly as without it. With
    ``reduced`` (a box-reduced copy of ``image``), a crop that stays above ``max_side`` in the copy
    is read from the copy instead."""
    box = tuple(int(v) for v in box)
    w, h = box[2] - box[0], box[3] - box[1]
    if max_side is not None and max(w, h) > max_side:
        s = max_side / max(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        src, src_box = image, box
        if reduced is not None and reduced.factor > 1 and max(w, h) / reduced.factor >= max_side:
            src, src_box = reduced.image, tuple(v / reduced.factor for v in box)
        # reducing_gap: a box reduce first, then bicubic over the last factor of 3 or less
        # (indistinguishable from a full bicubic, several times faster at 48 MP).
        crop = src.resize(size, Image.BICUBIC, box=src_box, reducing_gap=3.0)
    else:
        crop = image.crop(box)
    w, h = crop.size
    side = max(w, h, 1)
    fill = tuple(int(v) for v in np.asarray(crop).reshape(-1, 3).mean(axis=0)) if w * h else (127, 127, 127)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(crop, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass
class ReducedCopy:
    """``image`` box-reduced by an integer ``factor`` (1: the photo itself). Every downscaled view
    of a large photo (SAM's input, CLIP's views and large crops) reads this copy, so the
    full-resolution pixels are read once, by the reduction."""

    image: Image.Image
    factor: int = 1

    @classmethod
    def of(cls, image: Image.Image, min_long_side: int) -> "ReducedCopy":
        """The largest integer reduction that keeps the long side at ``min_long_side`` or more."""
        factor = max(1, max(image.size) // max(1, min_long_side))
        return cls(image.reduce(factor) if factor > 1 else image, factor)


def prefilter_views(width: int, height: int, tile: float = 0.6) -> list[tuple[int, int, int, int]]:
    """Whole image, four overlapping corner tiles (``tile`` of each side) and a centre tile."""
    tw, th = int(round(width * tile)), int(round(height * tile))
    views = [(0, 0, width, height)]
    for x0 in (0, width - tw):
        for y0 in (0, height - th):
            views.append((x0, y0, x0 + tw, y0 + th))
    cx, cy = (width - tw) // 2, (height - th) // 2
    views.append((cx, cy, cx + tw, cy + th))
    return views


def grid_points(box: Sequence[int], n: int = 3) -> np.ndarray:
    """n x n point prompts evenly inside ``box`` (centres of an n x n split). [n*n, 2] float (x, y)."""
    x0, y0, x1, y1 = box
    fr = (np.arange(n) + 0.5) / n
    xs, ys = x0 + fr * (x1 - x0), y0 + fr * (y1 - y0)
    return np.array([(x, y) for y in ys for x in xs], dtype=np.float32)


def dedupe_points(points: np.ndarray, min_dist: float) -> np.ndarray:
    kept: list[np.ndarray] = []
    for p in points:
        if all(np.hypot(*(p - q)) >= min_dist for q in kept):
            kept.append(p)
    return np.array(kept, dtype=np.float32).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------
# CLIP scoring


class Scorer(Protocol):
    logit_scale: float

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


class ClipScorer:
    """transformers CLIP behind a small interface: L2-normalised float32 numpy embeddings."""

    def __init__(self, bundle: Any, device: "torch.device"):
        self.model, self.processor, self.device = bundle.model, bundle.processor, device
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.dtype = next(self.model.parameters()).dtype
        self.input_side = _processor_side(self.processor) or int(self.model.config.vision_config.image_size)

    @staticmethod
    def _features(out: Any) -> "torch.Tensor":
        # transformers 5 may return a model output with pooler_output instead of a tensor
        return out if not hasattr(out, "pooler_output") else out.pooler_output

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            f = self._features(self.model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()}))
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        batch = self.processor(images=images, return_tensors="pt")
        pix = batch["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            f = self._features(self.model.get_image_features(pixel_values=pix))
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy()


def _processor_side(processor: Any) -> int | None:
    """The side (pixels) CLIP's image processor resizes / centre-crops to, or None if it does not say."""
    ip = getattr(processor, "image_processor", processor)
    sides = []
    for attr in ("size", "crop_size"):
        val = getattr(ip, attr, None)
        if isinstance(val, int):
            sides.append(val)
        elif val is not None:
            get = val.get if hasattr(val, "get") else (lambda k, v=val: getattr(v, k, None))
            sides.extend(int(v) for v in (get("shortest_edge"), get("height"), get("width")) if v)
    return max(sides) if sides else None


class TextBank:
    """Class and background text embeddings, cached per (classes, background prompts)."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self._cache: dict[tuple, np.ndarray] = {}

    def get(self, classes: Sequence[ProductClass], background: Sequence[str]) -> np.ndarray:
        """[C + B, D]: one averaged (re-normalised) ensemble per class, then one row per background prompt."""
        key = (tuple((c.name, tuple(c.prompts)) for c in classes), tuple(background))
        if key not in self._cache:
            rows = []
            for c in classes:
                names = [c.name, *c.prompts]
                emb = self.scorer.encode_texts([t.format(n) for n in names for t in TEMPLATES]).mean(axis=0)
                rows.append(emb / max(np.linalg.norm(emb), 1e-12))
            if background:
                rows.extend(self.scorer.encode_texts([f"a photo of {b}." for b in background]))
            self._cache[key] = np.stack(rows).astype(np.float32)
        return self._cache[key]


# ------------------------------------------------------------------------------------------------
# SAM proposals


class SamProposer:
    """SAM image embedding once per image; masks decoded for batched point prompts."""

    def __init__(self, sam_bundle: Any, device: "torch.device"):
        from segment_anything import SamPredictor

        self.sam = sam_bundle.model
        self.predictor = SamPredictor(self.sam)
        self.device = device

    def set_image(self, image: "Image.Image | np.ndarray", original_size: tuple[int, int] | None = None) -> None:
        """PIL RGB image or HxWx3 uint8 RGB array. Computes the image embedding (the expensive
        part), once. ``original_size`` (H, W): the photo's size when ``image`` is a reduced copy of
        it (coordinates and masks stay in the photo's pixels).

        Same as segment-anything's ``SamPredictor.set_image`` (bilinear resize of the long side to
        the encoder's input), but resized straight from the PIL image, without its two
        full-resolution copies (array -> PIL); from a factor of 6 down, PIL first box-reduces
        (``reducing_gap``). For the photo itself below that factor the input is bit-identical to
        segment-anything's."""
        import torch

        p = self.predictor
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        H, W = original_size or (pil.size[1], pil.size[0])
        h, w = p.transform.get_preprocess_shape(H, W, p.transform.target_length)
        small = np.array(pil.resize((w, h), Image.BILINEAR, reducing_gap=3.0))  # writable, for torch
        x = torch.as_tensor(small, device=self.device).permute(2, 0, 1).contiguous()[None, :, :, :]
        p.set_torch_image(x, (H, W))

    def _upsample(self, low_res: "torch.Tensor", out_hw: tuple[int, int]) -> "torch.Tensor":
        import torch.nn.functional as F

        p = self.predictor
        size = self.sam.image_encoder.img_size
        x = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        x = x[..., : p.input_size[0], : p.input_size[1]]
        return F.interpolate(x, out_hw, mode="bilinear", align_corners=False)

    def propose(self, points: np.ndarray, pred_iou_thresh: float, stability_thresh: float,
                work_long_side: int = 512, batch: int = 64) -> Proposals:
        """Single-point prompts (``[P, 2]`` x, y in original pixels) -> up to 3 candidates each."""
        import torch
        from segment_anything.utils.amg import calculate_stability_score

        p = self.predictor
        keep_logits, keep_q = [], []
        with torch.inference_mode():
            for s in range(0, len(points), batch):
                pts = p.transform.apply_coords(points[s : s + batch], p.original_size)
                coords = torch.as_tensor(pts, dtype=torch.float32, device=self.device)[:, None, :]
                labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
                low, iou = self._decode(points=(coords, labels), boxes=None, multimask=True)
                low, iou = low.flatten(0, 1), iou.flatten()
                stab = calculate_stability_score(low, self.sam.mask_threshold, 1.0)
                ok = (iou >= pred_iou_thresh) & (stab >= stability_thresh)
                keep_logits.append(low[ok])
                keep_q.append(iou[ok])
            return self._proposals(keep_logits, keep_q, work_long_side)

    def propose_boxes(self, boxes: np.ndarray, work_long_side: int = 512, batch: int = 64) -> Proposals:
        """Box prompts (``[B, 4]`` x0, y0, x1, y1 in original pixels) -> one mask each (single-mask
        output, as segment-anything's predictor does for a box)."""
        import torch

        p = self.predictor
        keep_logits, keep_q = [], []
        with torch.inference_mode():
            for s in range(0, len(boxes), batch):
                b = p.transform.apply_boxes(np.asarray(boxes[s : s + batch], np.float32), p.original_size)
                bt = torch.as_tensor(b, dtype=torch.float32, device=self.device)
                low, iou = self._decode(points=None, boxes=bt, multimask=False)
                keep_logits.append(low[:, 0])
                keep_q.append(iou[:, 0])
            return self._proposals(keep_logits, keep_q, work_long_side)

    def _decode(self, points: Any, boxes: Any, multimask: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
        """One batch of prompts through SAM's prompt encoder and mask decoder against the image
        embedding: ``(low-res logits [B, M, 256, 256], predicted IoU [B, M])``."""
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        return self.sam.mask_decoder(
            image_embeddings=self.predictor.features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )

    def _proposals(self, keep_logits: list, keep_q: list, work_long_side: int) -> Proposals:
        """The kept candidates' low-res logits ``[K, 256, 256]`` (per batch) -> :class:`Proposals`:
        masks at the working resolution (long side ``work_long_side`` at most), boxes in original
        pixels, the logits kept for the exact full-resolution mask later."""
        import torch

        H, W = self.predictor.original_size
        scale = min(1.0, work_long_side / max(H, W))
        work_hw = (max(1, round(H * scale)), max(1, round(W * scale)))
        if sum(len(k) for k in keep_logits) == 0:
            return Proposals(np.zeros((0, *work_hw), bool), np.zeros((0, 4)), np.zeros(0), None, scale)
        logits = torch.cat(keep_logits)[:, None]
        work = (self._upsample(logits, work_hw)[:, 0] > self.sam.mask_threshold).cpu().numpy()
        boxes = []
        for m in work:
            b = bbox(m)
            boxes.append([v / scale for v in b] if b else [0, 0, 0, 0])
        return Proposals(work, np.array(boxes, dtype=np.float64), torch.cat(keep_q).cpu().numpy(), logits, scale)

    def full_mask(self, logits: "torch.Tensor") -> np.ndarray:
        """Selected candidates' low-res logits [K, 1, 256, 256] -> their union, [H, W] bool at full
        resolution.

        The same bilinear upsampling as segment-anything's ``postprocess_masks`` (to the encoder's
        input, cropped to the image's part, then to the original size), but the last step is done
        as two separable passes, a band of output rows at a time: a 48 MP photo never holds a
        full-resolution float map (192 MB per candidate), only the bool result. Pixels may differ
        from the one-shot upsampling only where the logit is within float rounding of the
        threshold."""
        import torch
        import torch.nn.functional as F

        p = self.predictor
        H, W = (int(v) for v in p.original_size)
        size = self.sam.image_encoder.img_size
        thr = self.sam.mask_threshold
        out = np.zeros((H, W), bool)
        with torch.inference_mode():
            x = F.interpolate(logits.float(), (size, size), mode="bilinear", align_corners=False)
            x = x[:, 0, : p.input_size[0], : p.input_size[1]]  # [K, h, w]
            if H * W <= _ONE_SHOT_PIXELS:  # the one-shot upsampling, exactly as segment-anything
                full = F.interpolate(x[:, None], (H, W), mode="bilinear", align_corners=False)[:, 0]
                return (full > thr).any(dim=0).cpu().numpy()
            x0, x1, lx = _linear_taps(x.shape[2], W, x.device)
            y0, y1, ly = _linear_taps(x.shape[1], H, x.device)
            # columns first, at the low-res height: [K, h, W] floats (a few MB)
            cols = x.index_select(2, x0).lerp_(x.index_select(2, x1), lx).cpu()
            y0, y1, ly = y0.cpu(), y1.cpu(), ly.cpu()
            dst = torch.from_numpy(out)  # written in place, band by band
            for r in range(0, H, _UPSAMPLE_ROWS):
                sl = slice(r, min(H, r + _UPSAMPLE_ROWS))
                band = cols.index_select(1, y0[sl]).lerp_(cols.index_select(1, y1[sl]), ly[sl, None])
                # union of the candidates: the largest logit over the threshold
                torch.gt(band[0] if len(band) == 1 else band.amax(dim=0), thr, out=dst[sl])
        return out


def _linear_taps(n_in: int, n_out: int, device: Any) -> tuple[Any, Any, Any]:
    """Bilinear (``align_corners=False``) source taps along one axis, as PyTorch computes them:
    for each of ``n_out`` output positions the two input indices and the second one's weight."""
    import torch

    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, (src - i0).float()


def everything_proposals(sam_bundle: Any, rgb: np.ndarray, cfg: DetectSettings) -> Proposals:
    """segment-anything's automatic mask generator (SAM "everything"), full-resolution masks."""
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(sam_bundle.model, points_per_side=cfg.points_per_side,
                                    pred_iou_thresh=cfg.pred_iou_thresh, stability_score_thresh=cfg.stability_score_thresh)
    anns = gen.generate(rgb)
    H, W = rgb.shape[:2]
    if not anns:
        return Proposals(np.zeros((0, H, W), bool), np.zeros((0, 4)), np.zeros(0))
    masks = np.stack([a["segmentation"] for a in anns])
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], float)
    return Proposals(masks, boxes, np.array([a["predicted_iou"] for a in anns]))


# ------------------------------------------------------------------------------------------------
# The detector


class Detector:
    """Detects configured product classes. Holds warm models via the registry; reuse it per process.

    ``scorer`` can be injected (tests use fixed embeddings); by default CLIP from the registry, whose
    scorer and class text embeddings the registry keeps (:meth:`ModelRegistry.derived`): shared by
    every detector on it (displace's checker too) and dropped with ``unload("clip")``.
    """

    def __init__(self, registry: "ModelRegistry | None", cfg: DetectSettings, scorer: Scorer | None = None):
        self.registry = registry
        self.cfg = cfg
        self._scorer = scorer
        self._bank: TextBank | None = None
        self._proposer: SamProposer | None = None

    @property
    def scorer(self) -> Scorer:
        if self._scorer is not None:
            return self._scorer
        reg = self.registry
        return reg.derived("detect.clip_scorer", lambda: ClipScorer(reg.get("clip"), reg.runtime.device),
                           roles=("clip",))

    @property
    def bank(self) -> TextBank:
        if self._scorer is None:
            return self.registry.derived("detect.text_bank", lambda: TextBank(self.scorer), roles=("clip",))
        if self._bank is None:
            self._bank = TextBank(self._scorer)
        return self._bank

    @property
    def proposer(self) -> SamProposer:
        if self._proposer is None:
            bundle = self.registry.get("sam")
            cls = HFSamProposer if isinstance(bundle, HFSamBundle) else SamProposer
            self._proposer = cls(bundle, self.registry.runtime.device)
        return self._proposer

    def model_roles(self, proposals: str | None = None, prefilter: bool | None = None) -> tuple[str, ...]:
        """The registry roles a detection in ``proposals`` mode (default: the settings') uses: for
        loading at start and for records' model provenance."""
        mode = proposals or self.cfg.proposals
        if mode == "sam3":
            return ("clip", "sam3") if (self.cfg.prefilter if prefilter is None else prefilter) else ("sam3",)
        extra = {"grounded": ("grounding",), "clipseg": ("clipseg",)}.get(mode, ())
        return ("clip", *extra, "sam")

    # -- scoring ---------------------------------------------------------------------------------
    @property
    def view_max_side(self) -> int:
        """Long side CLIP views and crops are downscaled to before padding: ``VIEW_SCALE`` x the
        scorer's input side."""
        return VIEW_SCALE * int(getattr(self.scorer, "input_side", None) or DEFAULT_INPUT_SIDE)

    def score_views(self, image: Image.Image, boxes: Sequence[Sequence[int]], classes: Sequence[ProductClass],
                    reduced: ReducedCopy | None = None):
        """All crops in one CLIP batch -> ([N, C] class probs, [N] background prob). Each crop is
        downscaled to :attr:`view_max_side` first, from ``reduced`` where that is large enough
        (see :func:`square_crop`)."""
        text = self.bank.get(classes, self.cfg.background_prompts)
        side = self.view_max_side
        emb = self.scorer.encode_images([square_crop(image, b, side, reduced) for b in boxes])
        probs = softmax_probs(emb, text, self.scorer.logit_scale)
        return split_background(probs, len(classes))

    # -- main entry --------------------------------------------------------------------------------
    def detect(self, image: Image.Image, classes: Sequence[ProductClass] | None = None, *,
               proposals: str | None = None, prefilter: bool | None = None) -> DetectResult:
        """``image``: PIL RGB or RGBA (alpha ignored), EXIF already applied. Never raises for "nothing found"."""
        classes = list(classes if classes is not None else self.cfg.classes)
        mode = proposals or self.cfg.proposals
        use_prefilter = self.cfg.prefilter if prefilter is None else prefilter
        # convert() copies even an RGB image: 192 MB at 48 MP
        rgb_img = image if image.mode == "RGB" else image.convert("RGB")
        W, H = rgb_img.size
        res = DetectResult(image_size=(W, H), proposal_mode=mode)
        if not classes:
            res.skipped, res.reason = True, "no product classes configured"
            return res
        names = [c.name for c in classes]
        thresholds = [c.threshold for c in classes]
        t0 = time.perf_counter()
        # Large photos: one box-reduced copy that SAM's input and CLIP's views are read from, at
        # least twice as large as either needs (SAM's encoder input; a prefilter tile, 0.6 of the
        # photo, at CLIP's view size). A photo below that is used as it is.
        # SAM's side without loading SAM (a photo the prefilter skips never needs it): 1024 for
        # every official SAM.
        sam_side = int(getattr(getattr(getattr(self._proposer, "sam", None), "image_encoder", None), "img_size", 1024))
        reduced = ReducedCopy.of(rgb_img, 2 * max(sam_side, int(np.ceil(self.view_max_side / 0.6))))

        # 1. prefilter: one CLIP batch over the whole image and tiles
        views = prefilter_views(W, H)
        positive_views: list[tuple[int, int, int, int]] = [views[0]]
        if use_prefilter or mode == "guided":
            cp, bg = self.score_views(rgb_img, views, classes, reduced)
            res.timings["prefilter"] = time.perf_counter() - t0
            view_best = cp.max(axis=0)
            res.best_scores = {n: float(v) for n, v in zip(names, view_best)}
            hit = cp.max(axis=1) >= self.cfg.prefilter_threshold
            positive_views = [v for v, h in zip(views, hit) if h]
            res.prefilter = {"enabled": use_prefilter, "views": len(views), "threshold": self.cfg.prefilter_threshold,
                             "scores": {n: round(float(v), 4) for n, v in zip(names, view_best)},
                             "positive_views": len(positive_views)}
            if use_prefilter and not positive_views:
                res.skipped = True
                res.reason = (f"no product: prefilter found no class at or above {self.cfg.prefilter_threshold} "
                              f"in {len(views)} views (best: {_fmt_scores(res.best_scores)})")
                res.prefilter["decision"] = "skip"
                res.timings["total"] = time.perf_counter() - t0
                return res
            res.prefilter["decision"] = "pass"
            if not positive_views:  # prefilter disabled: guided prompts cover the whole image
                positive_views = [views[0]]

        # 2. proposals
        t1 = time.perf_counter()
        if mode == "sam3":
            return self._detect_sam3(rgb_img, classes, res, t0)
        if mode == "everything" and not isinstance(self.proposer, SamProposer):
            # a transformers segmenter: the same regular grid of single-point prompts
            self._set_image(reduced, rgb_img)
            res.timings["sam_embedding"] = time.perf_counter() - t1
            props = self.proposer.propose(grid_points((0, 0, W, H), self.cfg.points_per_side),
                                          self.cfg.pred_iou_thresh, self.cfg.stability_score_thresh)
        elif mode == "everything":
            props = everything_proposals(self.registry.get("sam"), np.asarray(rgb_img), self.cfg)
        elif mode == "grounded":
            g = self.registry.get("grounding")
            prompts = [p for c in classes for p in (c.name, *c.prompts)]
            boxes, box_scores = grounded_boxes(g, self._view(rgb_img, reduced), prompts, self.cfg.box_threshold,
                                               self.registry.runtime.device, self.cfg.max_boxes)
            boxes = boxes * (W / self._view(rgb_img, reduced).size[0])
            res.timings["grounding"] = time.perf_counter() - t1
            res.grounding = {"boxes": len(boxes), "best_box_score": round(float(box_scores.max()), 4) if len(boxes) else 0.0}
            if not len(boxes):
                res.proposals, res.skipped = 0, True
                res.reason = f"no product: the detector found no box at or above {self.cfg.box_threshold}"
                res.timings["total"] = time.perf_counter() - t0
                return res
            t_e = time.perf_counter()
            self._set_image(reduced, rgb_img)
            res.timings["sam_embedding"] = time.perf_counter() - t_e
            props = self.proposer.propose_boxes(boxes)
        elif mode == "clipseg":
            cs = self.registry.get("clipseg")
            view = self._view(rgb_img, reduced)
            prompts = [c.name for c in classes]
            pts, heat = clipseg_points(cs, view, prompts, self.cfg.heatmap_threshold, self.cfg.heatmap_peaks,
                                       self.registry.runtime.device)
            pts = pts * (W / view.size[0])
            res.timings["clipseg"] = time.perf_counter() - t1
            res.heatmap = {n: round(float(h.max()), 4) for n, h in zip(prompts, heat)}
            if not len(pts):
                res.proposals, res.skipped = 0, True
                res.reason = (f"no product: no CLIPSeg heatmap above {self.cfg.heatmap_threshold} "
                              f"(best: {_fmt_scores(res.heatmap)})")
                res.timings["total"] = time.perf_counter() - t0
                return res
            t_e = time.perf_counter()
            self._set_image(reduced, rgb_img)
            res.timings["sam_embedding"] = time.perf_counter() - t_e
            props = self.proposer.propose(pts, self.cfg.pred_iou_thresh, self.cfg.stability_score_thresh)
        else:
            self._set_image(reduced, rgb_img)
            res.timings["sam_embedding"] = time.perf_counter() - t1
            pts = np.concatenate([grid_points(v, 3) for v in positive_views])
            pts = dedupe_points(pts, 0.04 * max(W, H))
            props = self.proposer.propose(pts, self.cfg.pred_iou_thresh, self.cfg.stability_score_thresh)
        res.proposals = len(props.masks)
        res.timings["proposals"] = time.perf_counter() - t1

        # 3. drop tiny, classify all crops in one batch
        t2 = time.perf_counter()
        area = props.masks.reshape(len(props.masks), -1).mean(axis=1) if len(props.masks) else np.zeros(0)
        keep = np.nonzero((area >= self.cfg.min_mask_area) & (area > 0))[0]
        keep = box_nms(props.boxes, props.quality, keep, 0.7)
        res.classified = len(keep)
        detections: list[Detection] = []
        if len(keep):
            boxes = [pad_box(props.boxes[i], self.cfg.context_pad, W, H) for i in keep]
            cp, bg = self.score_views(rgb_img, boxes, classes, reduced)
            labels, scores, margins = decide(cp, bg, thresholds, self.cfg.margin)
            for j, n in enumerate(names):
                res.best_scores[n] = max(res.best_scores.get(n, 0.0), float(cp[:, j].max()))
            res.timings["classify"] = time.perf_counter() - t2
            t3 = time.perf_counter()
            detections = self._postprocess(props, keep, labels, scores, margins, names, (H, W), mode)
            res.timings["masks"] = time.perf_counter() - t3
        res.timings["total"] = time.perf_counter() - t0
        res.detections = detections
        if not detections:
            res.skipped = True
            res.reason = (f"no product: none of {len(keep)} proposals passed class threshold and margin "
                          f"{self.cfg.margin} (best: {_fmt_scores(res.best_scores)})")
        return res

    def _set_image(self, reduced: ReducedCopy, rgb_img: Image.Image) -> None:
        """The segmenter's image embedding, from the box-reduced copy of a large photo."""
        if reduced.factor > 1:
            self.proposer.set_image(reduced.image, (rgb_img.size[1], rgb_img.size[0]))
        else:
            self.proposer.set_image(rgb_img)

    @staticmethod
    def _view(rgb_img: Image.Image, reduced: ReducedCopy) -> Image.Image:
        """What a text-grounded front-end sees: the box-reduced copy of a large photo (its models
        take 768-1008 px inputs), the photo itself otherwise. Same aspect as the photo."""
        return reduced.image if reduced.factor > 1 else rgb_img

    def _detect_sam3(self, rgb_img: Image.Image, classes: Sequence[ProductClass], res: DetectResult,
                     t0: float) -> DetectResult:
        """SAM 3: instance masks per class prompt (vision features once); the presence score
        decides the skip; instances go through the same merging, per-class limit and hole filling."""
        t1 = time.perf_counter()
        W, H = rgb_img.size
        names = [c.name for c in classes]
        per_class = sam3_instances(self.registry.get("sam3"), rgb_img, names, self.cfg.sam3_threshold,
                                   self.registry.runtime.device, top_k=2 * self.cfg.max_per_class)
        res.timings["sam3"] = time.perf_counter() - t1
        res.presence = {n: round(r.presence, 4) for n, r in zip(names, per_class)}
        for n, r in zip(names, per_class):
            res.best_scores[n] = max(res.best_scores.get(n, 0.0), r.presence)
        present = [i for i, r in enumerate(per_class) if r.presence >= self.cfg.presence_threshold]
        masks, boxes, scores, labels = [], [], [], []
        for i in present:
            r = per_class[i]
            for m, b, sc in zip(r.masks, r.boxes, r.scores):
                masks.append(m), boxes.append(b), scores.append(sc), labels.append(i)
        res.proposals = res.classified = len(masks)
        if not present or not masks:
            res.skipped = True
            res.reason = (f"no product: SAM 3 presence below {self.cfg.presence_threshold} for every class "
                          f"(presence: {_fmt_scores(res.presence)})" if not present else
                          f"no product: SAM 3 found no instance at or above {self.cfg.sam3_threshold}")
            res.timings["total"] = time.perf_counter() - t0
            return res
        props = Proposals(np.stack(masks), np.array(boxes, float), np.array(scores, float))
        area = props.masks.reshape(len(masks), -1).mean(axis=1)
        keep = np.nonzero((area >= self.cfg.min_mask_area) & (area > 0))[0]
        lab = np.full(len(masks), -1)
        lab[keep] = np.array(labels)[keep]
        t3 = time.perf_counter()
        res.detections = self._postprocess(props, np.arange(len(masks)), lab, props.quality,
                                           np.zeros(len(masks)), names, (H, W), "sam3")
        res.timings["masks"] = time.perf_counter() - t3
        res.timings["total"] = time.perf_counter() - t0
        if not res.detections:
            res.skipped = True
            res.reason = f"no product: none of {len(masks)} SAM 3 instances is large enough ({self.cfg.min_mask_area})"
        return res

    def _postprocess(self, props: Proposals, keep: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                     margins: np.ndarray, names: list[str], hw: tuple[int, int], mode: str) -> list[Detection]:
        cand = []  # (label, member indices into props, score, margin)
        for c, name in enumerate(names):
            idx = np.nonzero(labels == c)[0]
            if not len(idx):
                continue
            groups = merge_same_class(props.masks[keep[idx]], scores[idx])
            for members, sc in groups:
                cand.append((name, [int(keep[idx[m]]) for m in members], sc, float(margins[idx[members[0]]])))
        if not cand:
            return []
        # Cross-class duplicates: one region, one label (the higher score).
        cand.sort(key=lambda t: -t[2])
        heads = np.stack([props.masks[c[1][0]] for c in cand])
        iou, _ = mask_iou_matrix(heads)
        chosen: list[int] = []
        per_class: dict[str, int] = {}
        for i, (name, members, sc, mg) in enumerate(cand):
            if any(iou[i, j] >= 0.6 for j in chosen):
                continue
            if per_class.get(name, 0) >= self.cfg.max_per_class:
                continue
            per_class[name] = per_class.get(name, 0) + 1
            chosen.append(i)
        out = []
        for i in chosen:
            name, members, sc, mg = cand[i]
            if props.logits is not None:
                full = self.proposer.full_mask(props.logits[members])
            else:
                full = props.masks[members].any(axis=0)
            full = fill_holes(np.ascontiguousarray(full, dtype=bool), inplace=True)  # ours: filled in place
            box = bbox(full)
            if box is None:
                continue
            out.append(Detection(label=name, score=sc, box=box, mask=full, margin=mg, source=mode))
        return out


def _fmt_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1])) or "none"
