"""Large photos (issue 16, point 8): CLIP views and crops downscaled before padding, SAM's input
resized straight from the photo (or its reduced copy), final masks upsampled in bands. Checked
against the full-resolution reference paths on tiny models: identical where nothing is reduced,
the same detections at full resolution where it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.detect.detector as pd
from pipeline.detect.detector import Detector, ReducedCopy, fill_holes, square_crop
from pipeline.io.composite import bbox
from pipeline.settings import DetectSettings


def photo(w: int, h: int) -> Image.Image:
    """A smooth scene (gradient, a red box, a blue ellipse) drawn small and enlarged, like a photo."""
    from bench.detect import synthetic_image

    return Image.fromarray(synthetic_image(max(16, w // 4), max(16, h // 4))).resize((w, h), Image.BILINEAR)


def open_settings() -> DetectSettings:
    """One class, every gate open (as bench detect's product path): every proposal is labelled, so
    the detections depend on SAM and post-processing, not on random CLIP's class ranking."""
    return DetectSettings(classes=[{"name": "handbag", "threshold": 0.0}], background_prompts=[], margin=0.0,
                          prefilter=True, prefilter_threshold=0.0, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def reference_path(monkeypatch):
    """The code path before the change: CLIP views cropped and padded at full resolution, no
    reduced copy, SAM through segment-anything's own ``set_image`` and one-shot mask upsampling."""
    monkeypatch.setattr(Detector, "view_max_side", property(lambda self: 10 ** 9))  # never downscaled
    monkeypatch.setattr(ReducedCopy, "of", classmethod(lambda cls, image, side: cls(image, 1)))
    monkeypatch.setattr(pd, "_ONE_SHOT_PIXELS", 10 ** 12)
    monkeypatch.setattr(pd.SamProposer, "set_image",
                        lambda self, image, original_size=None: self.predictor.set_image(np.asarray(image), "RGB"))


def detections(registry, image):
    res = Detector(registry, open_settings()).detect(image, proposals="guided")
    assert not res.skipped and res.detections
    return res


# ------------------------------------------------------------------------------------------------
# Pieces


def test_fill_holes_in_box_equals_full_frame_fill():
    import cv2

    def full_frame(mask):  # the previous implementation
        m = np.ascontiguousarray(mask, dtype=np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out = np.zeros(m.shape, np.uint8)
        cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
        return out.astype(bool) | mask

    rng = np.random.default_rng(0)
    ring = np.zeros((60, 80), bool)
    ring[10:40, 20:50] = True
    ring[15:30, 25:40] = False  # a hole
    edge = np.zeros((60, 80), bool)
    edge[0:30, 50:80] = True  # touches the top and right borders
    edge[5:20, 60:75] = False
    for m in (ring, edge, rng.random((60, 80)) > 0.6, np.zeros((60, 80), bool), np.ones((60, 80), bool)):
        want = full_frame(m)
        assert np.array_equal(fill_holes(m), want)
        assert np.array_equal(m, m.copy())  # not in place unless asked
        own = m.copy()
        assert fill_holes(own, inplace=True) is own and np.array_equal(own, want)
        ys, xs = np.nonzero(m)
        assert bbox(m) == ((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None)


def test_square_crop_downscales_only_above_max_side():
    img = photo(900, 600)
    small = (100, 50, 300, 150)
    assert np.array_equal(np.asarray(square_crop(img, small, 448)), np.asarray(square_crop(img, small)))
    big = (0, 0, 900, 600)
    out = square_crop(img, big, 448)
    assert out.size == (448, 448)
    # The same view as the full-resolution crop, seen at CLIP's size.
    ref = square_crop(img, big).resize((224, 224), Image.BICUBIC)
    diff = np.abs(np.asarray(out.resize((224, 224), Image.BICUBIC), np.int16) - np.asarray(ref, np.int16))
    assert diff.mean() < 2.0
    # Read from a reduced copy: the same view again.
    red = ReducedCopy.of(img, 300)
    assert red.factor == 3 and red.image.size == (300, 200)
    via = square_crop(img, big, 64, red)
    ref64 = square_crop(img, big, 64)
    assert via.size == ref64.size == (64, 64)
    assert np.abs(np.asarray(via, np.int16) - np.asarray(ref64, np.int16)).mean() < 3.0
    assert ReducedCopy.of(img, 1000).factor == 1 and ReducedCopy.of(img, 1000).image is img


def test_sam_input_bit_identical_to_segment_anything_below_reduction(registry):
    det = Detector(registry, open_settings())
    p = det.proposer
    for w, h in ((260, 150), (1152, 864)):  # up to 6x the tiny encoder's 256 px: no box reduction
        rgb = np.asarray(photo(w, h))
        p.predictor.set_image(rgb, "RGB")
        ref = p.predictor.features.clone()
        p.set_image(Image.fromarray(rgb))
        assert torch.equal(p.predictor.features, ref)
        assert tuple(p.predictor.original_size) == (h, w)


@pytest.mark.parametrize("size,one_shot", [((1152, 864), True), ((2400, 1800), False)])
def test_full_mask_equals_segment_anything_postprocess(registry, size, one_shot):
    """The final masks against segment-anything's ``postprocess_masks`` (a full-resolution float map
    per candidate): identical on the one-shot path; on the banded path (above 4 MP) identical but
    where a logit is within float rounding of the threshold."""
    w, h = size
    det = Detector(registry, open_settings())
    p = det.proposer
    p.set_image(photo(w, h))
    props = p.propose(np.array([[0.3 * w, 0.5 * h], [0.7 * w, 0.55 * h], [0.5 * w, 0.2 * h]], np.float32), 0.0, 0.0)
    logits = props.logits[:3]
    assert (h * w <= pd._ONE_SHOT_PIXELS) == one_shot
    got = p.full_mask(logits)
    sam = p.sam
    with torch.inference_mode():
        ref_f = sam.postprocess_masks(logits, p.predictor.input_size, p.predictor.original_size)[:, 0]
    ref = (ref_f > sam.mask_threshold).any(dim=0).numpy()
    assert got.shape == (h, w) and got.dtype == bool and 0 < got.sum() < h * w
    if one_shot:
        assert np.array_equal(got, ref)
    else:
        near = ((ref_f - sam.mask_threshold).abs() < 1e-4).any(dim=0).numpy()
        assert not np.any((got != ref) & ~near)
        assert np.count_nonzero(got != ref) <= 1e-5 * h * w


# ------------------------------------------------------------------------------------------------
# Whole detections against the path before the change


def test_moderate_photo_detections_identical_to_before(registry, monkeypatch):
    """640x480: no reduced copy and SAM's input unchanged; only CLIP's views are downscaled, which
    with one class changes scores, never the boxes or masks."""
    img = photo(640, 480)
    new = detections(registry, img)
    with monkeypatch.context() as m:
        reference_path(m)
        old = detections(registry, img)
    assert [d.box for d in new.detections] == [d.box for d in old.detections]
    for a, b in zip(new.detections, old.detections):
        assert a.mask.shape == (480, 640) and np.array_equal(a.mask, b.mask)


def test_large_photo_detections_match_before_at_full_resolution(registry, monkeypatch):
    """3200x2400 (7.7 MP): reduced copy, downscaled views and banded masks against the full-size
    path: the same detections, masks at full resolution, overlapping the reference's almost
    entirely (SAM sees its input resized by a slightly different filter)."""
    w, h = 3200, 2400
    img = photo(w, h)
    new = detections(registry, img)
    with monkeypatch.context() as m:
        reference_path(m)
        old = detections(registry, img)
    assert len(new.detections) == len(old.detections)
    for a, b in zip(sorted(new.detections, key=lambda d: d.box), sorted(old.detections, key=lambda d: d.box)):
        assert a.mask.shape == (h, w) and a.mask.dtype == bool
        iou = np.count_nonzero(a.mask & b.mask) / np.count_nonzero(a.mask | b.mask)
        assert iou > 0.98, iou
        assert max(abs(u - v) for u, v in zip(a.box, b.box)) <= 0.01 * w
        assert a.box == bbox(a.mask)


def test_48mp_photo_is_accepted_by_default(tmp_path):
    from pipeline.io.imageio import load_image
    from pipeline.settings import Settings

    path = tmp_path / "big.jpg"
    Image.new("RGB", (8000, 6000), (120, 90, 60)).save(path, quality=80)
    loaded = load_image(path, max_pixels=Settings().limits.max_pixels)
    assert loaded.size == (8000, 6000) and loaded.image.mode == "RGB"
