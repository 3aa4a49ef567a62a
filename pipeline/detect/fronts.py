"""Detection front-ends beyond SAM's own prompts: the transformers SAM-family segmenter and the
text-grounded proposal modes (``detect.proposals``: ``grounded``, ``clipseg``, ``sam3``).

Room: detect (with :mod:`pipeline.detect.detector`, which owns the decision logic and post-processing).

- :class:`HFSamProposer`: a transformers SAM-family model (``SamModel``, ``SamHQModel``, ``Sam2Model``,
  ``EdgeTamModel``) behind the same contract as :class:`pipeline.detect.detector.SamProposer`: the image
  embedding once per image (``set_image``), then point or box prompts decoded in batches, low-res
  logits kept for the exact full-resolution mask later (``full_mask``).
- :func:`grounded_boxes`: a zero-shot object detector (OWLv2, Grounding DINO, MM-Grounding-DINO via
  ``AutoModelForZeroShotObjectDetection``) gives boxes for the class prompts; SAM decodes one mask
  per box and CLIP re-scores every crop (in :class:`pipeline.detect.detector.Detector`).
- :func:`clipseg_points`: CLIPSeg heatmaps per class prompt -> local peaks -> SAM point prompts.
- :func:`sam3_instances`: SAM 3 (``Sam3Model``) instance masks per class prompt; the image's vision
  features are computed once and reused for every class; the presence score decides the skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from pipeline.detect.proposals import Proposals
from pipeline.io.composite import bbox
from pipeline.models.registry import HFSamBundle

if TYPE_CHECKING:  # pragma: no cover
    import torch


class HFSamProposer:
    """Image embedding once per image; point or box prompts decoded in batches (transformers SAM,
    SAM 2.1 or EdgeTAM). Coordinates in and masks out are in the original photo's pixels.

    SAM resizes the long side to its input and pads (masks are cropped back before upsampling, as
    ``SamImageProcessor.post_process_masks`` does); SAM 2 / EdgeTAM squash the photo to a square
    (masks upsample straight to the photo's size, as ``Sam2Processor.post_process_masks`` does)."""

    def __init__(self, bundle: HFSamBundle, device: "torch.device"):
        self.bundle = bundle
        self.model, self.processor, self.family = bundle.model, bundle.processor, bundle.family
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.mask_threshold = 0.0
        self.original_size: tuple[int, int] = (0, 0)
        self._emb: Any = None
        self._inter: Any = None  # SAM-HQ: the encoder's intermediate embeddings, used by its HQ decoder
        self._input_hw: tuple[int, int] | None = None  # resized image inside the padded input (SAM)
        self._pad_hw: tuple[int, int] = (0, 0)

    @property
    def input_side(self) -> int:
        """The encoder's square input side (1024 for every official SAM / SAM 2 / EdgeTAM)."""
        ip = self.processor.image_processor
        size = getattr(ip, "pad_size", None) or getattr(ip, "size", None) or {}
        get = size.get if hasattr(size, "get") else (lambda k: getattr(size, k, None))
        return int(get("height") or get("longest_edge") or 1024)

    def set_image(self, image: "Image.Image | np.ndarray", original_size: tuple[int, int] | None = None) -> None:
        """PIL RGB image or HxWx3 uint8 RGB array -> the image embedding (the expensive part), once.
        ``original_size`` (H, W): the photo's size when ``image`` is a reduced copy of it."""
        import torch

        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        self.original_size = original_size or (pil.size[1], pil.size[0])
        batch = self.processor(images=pil, return_tensors="pt")
        pix = batch["pixel_values"].to(self.device, self.dtype)
        self._pad_hw = (int(pix.shape[-2]), int(pix.shape[-1]))
        r = batch.get("reshaped_input_sizes")
        self._input_hw = (int(r[0][0]), int(r[0][1])) if r is not None else None
        with torch.inference_mode():
            emb = self.model.get_image_embeddings(pixel_values=pix)
        # SamHQModel returns (image embedding, intermediate embeddings); the others the embedding
        self._emb, self._inter = emb if isinstance(emb, tuple) else (emb, None)

    def _scale_xy(self) -> tuple[float, float]:
        H, W = self.original_size
        h, w = self._input_hw or self._pad_hw
        return w / W, h / H

    def _decode(self, **prompts: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        if self._inter is not None:
            prompts["intermediate_embeddings"] = self._inter
        out = self.model(image_embeddings=self._emb, **prompts)
        return out.pred_masks[0], out.iou_scores[0]  # [P, M, h, w], [P, M]

    def _upsample(self, low: "torch.Tensor", out_hw: tuple[int, int]) -> "torch.Tensor":
        """[K, 1, h, w] low-res logits -> [K, 1, *out_hw] (``out_hw`` in the photo's aspect)."""
        import torch.nn.functional as F

        if self._input_hw is None:  # squashed input: the whole low-res map is the photo
            return F.interpolate(low.float(), out_hw, mode="bilinear", align_corners=False)
        x = F.interpolate(low.float(), self._pad_hw, mode="bilinear", align_corners=False)
        x = x[..., : self._input_hw[0], : self._input_hw[1]]
        return F.interpolate(x, out_hw, mode="bilinear", align_corners=False)

    def _proposals(self, logits: list, quality: list, work_long_side: int):
        import torch

        H, W = self.original_size
        scale = min(1.0, work_long_side / max(H, W))
        work_hw = (max(1, round(H * scale)), max(1, round(W * scale)))
        if not logits or sum(len(k) for k in logits) == 0:
            return Proposals(np.zeros((0, *work_hw), bool), np.zeros((0, 4)), np.zeros(0), None, scale)
        low = torch.cat(logits)[:, None]
        work = (self._upsample(low, work_hw)[:, 0] > self.mask_threshold).cpu().numpy()
        boxes = []
        for m in work:
            b = bbox(m)
            boxes.append([v / scale for v in b] if b else [0, 0, 0, 0])
        return Proposals(work, np.array(boxes, dtype=np.float64), torch.cat(quality).float().cpu().numpy(), low, scale)

    def propose(self, points: np.ndarray, pred_iou_thresh: float, stability_thresh: float,
                work_long_side: int = 512, batch: int = 64):
        """Single-point prompts (``[P, 2]`` x, y in original pixels) -> up to 3 candidates each,
        filtered by predicted IoU and stability as segment-anything's generator does."""
        import torch
        from segment_anything.utils.amg import calculate_stability_score

        sx, sy = self._scale_xy()
        keep_logits, keep_q = [], []
        with torch.inference_mode():
            for s in range(0, len(points), batch):
                pts = torch.as_tensor(points[s : s + batch], dtype=torch.float32) * torch.tensor([sx, sy])
                coords = pts.to(self.device)[None, :, None, :]  # [1, P, 1, 2]
                labels = torch.ones(coords.shape[:3], dtype=torch.long, device=self.device)
                low, iou = self._decode(input_points=coords, input_labels=labels, multimask_output=True)
                low, iou = low.flatten(0, 1).float(), iou.flatten().float()
                stab = calculate_stability_score(low, self.mask_threshold, 1.0)
                ok = (iou >= pred_iou_thresh) & (stab >= stability_thresh)
                keep_logits.append(low[ok])
                keep_q.append(iou[ok])
        return self._proposals(keep_logits, keep_q, work_long_side)

    def propose_boxes(self, boxes: np.ndarray, work_long_side: int = 512, batch: int = 64):
        """Box prompts (``[B, 4]`` x0, y0, x1, y1 in original pixels) -> one mask each (single-mask
        output, as SAM is meant to be used with a box)."""
        import torch

        sx, sy = self._scale_xy()
        keep_logits, keep_q = [], []
        with torch.inference_mode():
            for s in range(0, len(boxes), batch):
                b = torch.as_tensor(boxes[s : s + batch], dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
                low, iou = self._decode(input_boxes=b.to(self.device)[None], multimask_output=False)
                keep_logits.append(low[:, 0].float())
                keep_q.append(iou[:, 0].float())
        return self._proposals(keep_logits, keep_q, work_long_side)

    def full_mask(self, logits: "torch.Tensor") -> np.ndarray:
        """Selected candidates' low-res logits [K, 1, h, w] -> their union, [H, W] bool at the photo's
        resolution (one candidate at a time: one float map of the photo's size at most)."""
        import torch

        H, W = self.original_size
        out = np.zeros((H, W), bool)
        with torch.inference_mode():
            for k in range(len(logits)):
                out |= (self._upsample(logits[k : k + 1], (H, W))[0, 0] > self.mask_threshold).cpu().numpy()
        return out


# ------------------------------------------------------------------------------------------------
# Text-grounded proposals


def _family(model: Any) -> str:
    return str(getattr(model.config, "model_type", ""))


def grounded_boxes(bundle: Any, image: Image.Image, prompts: Sequence[str], threshold: float,
                   device: "torch.device", max_boxes: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot detector boxes for ``prompts`` on an RGB ``image`` -> ([N, 4] float x0, y0, x1, y1
    in the image's pixels, clipped to it; [N] detector scores in [0, 1]), N <= ``max_boxes``: the
    best after class-agnostic box NMS (IoU 0.5; the detector answers once per prompt, often with
    the same box). The detector's own labels are not used: CLIP re-scores every box's crop against
    all classes and the background."""
    import torch

    model, proc = bundle.model, bundle.processor
    W, H = image.size
    family = _family(model)
    if family in ("grounding-dino", "mm-grounding-dino"):
        # Grounding DINO reads one caption of lower-case phrases each ending in a dot.
        text: Any = " ".join(p.lower().strip().rstrip(".") + "." for p in prompts)
    else:  # OWLv2 / OWL-ViT: one query per prompt
        text = [list(prompts)]
    batch = proc(text=text, images=image, return_tensors="pt").to(device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    with torch.inference_mode():
        out = model(**batch)
    if family in ("grounding-dino", "mm-grounding-dino"):
        res = proc.post_process_grounded_object_detection(out, batch["input_ids"], threshold=threshold,
                                                          text_threshold=threshold, target_sizes=[(H, W)])[0]
    else:
        # OWLv2 pads the photo to a square before resizing: boxes are relative to the padded square.
        side = max(H, W) if family == "owlv2" else None
        res = proc.post_process_grounded_object_detection(out, threshold=threshold,
                                                          target_sizes=[(side, side) if side else (H, W)])[0]
    boxes = res["boxes"].float().cpu().numpy().reshape(-1, 4)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, W)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, H)
    scores = res["scores"].float().cpu().numpy().reshape(-1)
    ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    boxes, scores = boxes[ok], scores[ok]
    if len(boxes) > 1:
        from torchvision.ops import nms

        keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), 0.5).numpy()[:max_boxes]
        boxes, scores = boxes[keep], scores[keep]
    return boxes, scores


def heatmap_peaks(heat: np.ndarray, threshold: float, k: int, min_dist: int = 2) -> list[tuple[int, int, float]]:
    """Local maxima of one ``[h, w]`` float heatmap in [0, 1] above ``threshold``: up to ``k``
    (row, col, value), best first, at least ``min_dist`` cells apart (3x3 neighbourhood maxima)."""
    h, w = heat.shape
    padded = np.pad(heat, 1, mode="constant", constant_values=-np.inf)
    neigh = np.stack([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]).max(axis=0)
    rows, cols = np.nonzero((heat >= neigh) & (heat > threshold))
    order = np.argsort(-heat[rows, cols], kind="stable")
    peaks: list[tuple[int, int, float]] = []
    for i in order:
        r, c = int(rows[i]), int(cols[i])
        if all(max(abs(r - pr), abs(c - pc)) >= min_dist for pr, pc, _ in peaks):
            peaks.append((r, c, float(heat[r, c])))
            if len(peaks) >= k:
                break
    return peaks


def clipseg_points(bundle: Any, image: Image.Image, prompts: Sequence[str], threshold: float, k: int,
                   device: "torch.device") -> tuple[np.ndarray, np.ndarray]:
    """CLIPSeg heatmaps (sigmoid of its logits) for each prompt, one batch -> ([P, 2] float x, y peak
    points in the image's pixels, [C, h, w] heatmaps). Up to ``k`` peaks per prompt above
    ``threshold``; CLIPSeg resizes (squashes) the photo to its square input, so a heatmap cell maps
    back by the photo's own x and y scale."""
    import torch

    model, proc = bundle.model, bundle.processor
    W, H = image.size
    batch = proc(text=list(prompts), images=[image] * len(prompts), padding=True, return_tensors="pt").to(device)
    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    with torch.inference_mode():
        logits = model(**batch).logits
    heat = logits.float().sigmoid().reshape(len(prompts), *logits.shape[-2:]).cpu().numpy()
    hh, hw = heat.shape[1:]
    pts = []
    for c in range(len(prompts)):
        for r, col, _ in heatmap_peaks(heat[c], threshold, k):
            pts.append(((col + 0.5) * W / hw, (r + 0.5) * H / hh))
    return np.array(pts, np.float32).reshape(-1, 2), heat


@dataclass
class Sam3Class:
    """SAM 3's answer for one class prompt: instance masks ``[N, H, W]`` bool at the photo's size,
    boxes ``[N, 4]``, instance scores ``[N]`` (detection x presence) and the presence score."""

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    presence: float


def sam3_instances(bundle: Any, image: Image.Image, prompts: Sequence[str], threshold: float,
                   device: "torch.device", top_k: int = 10) -> list[Sam3Class]:
    """SAM 3 per class prompt on one RGB image: the vision features once, then the DETR decoder and
    mask head once per prompt. Instances scoring below ``threshold`` are dropped, and of the rest
    only the ``top_k`` best are upsampled to the photo's size (SAM 3 has 200 queries)."""
    import torch

    model, proc = bundle.model, bundle.processor
    W, H = image.size
    pix = proc(images=image, return_tensors="pt")["pixel_values"].to(device, next(model.parameters()).dtype)
    out: list[Sam3Class] = []
    with torch.inference_mode():
        vision = model.get_vision_features(pixel_values=pix)
        for p in prompts:
            text = proc(text=p, return_tensors="pt").to(device)
            o = model(vision_embeds=vision, input_ids=text["input_ids"], attention_mask=text.get("attention_mask"))
            presence = float(o.presence_logits.float().sigmoid().reshape(-1)[0]) if o.presence_logits is not None else 1.0
            # the instance scores as the image processor computes them (detection x presence)
            scores = o.pred_logits.float().sigmoid().reshape(-1) * presence
            kth = float(scores.topk(min(top_k, len(scores))).values[-1]) if len(scores) else 0.0
            r = proc.post_process_instance_segmentation(o, threshold=max(threshold, kth - 1e-6), mask_threshold=0.5,
                                                        target_sizes=[(H, W)])[0]
            masks = r["masks"].bool().cpu().numpy().reshape(-1, H, W)
            out.append(Sam3Class(masks, r["boxes"].float().cpu().numpy().reshape(-1, 4),
                                 r["scores"].float().cpu().numpy().reshape(-1), presence))
    return out
