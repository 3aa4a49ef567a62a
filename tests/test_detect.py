"""Detection: decision logic with fixed embeddings (labels known exactly), and the real code path
end to end on tiny models."""


import numpy as np
import pytest
from PIL import Image

from pipeline.detect.detector import (
    Detector,
    Proposals,
    decide,
    fill_holes,
    merge_same_class,
    pad_box,
    prefilter_views,
    softmax_probs,
    split_background,
)
from pipeline.io.composite import bbox
from pipeline.settings import DetectSettings, ProductClass

GREY = (128, 128, 128)
RED = (200, 30, 30)
BLUE = (30, 30, 200)


# ------------------------------------------------------------------------------------------------
# Fixed embeddings injected at the encoder boundary


class ColourScorer:
    """Texts about bags -> e0, shoes -> e1, anything else (background prompts) -> e2.
    Images -> by colour: red excess on e0, blue excess on e1, a constant grey part on e2."""

    logit_scale = 10.0

    def __init__(self):
        self.text_calls = 0
        self.image_batches = []

    def encode_texts(self, texts):
        self.text_calls += 1
        out = []
        for t in texts:
            v = np.zeros(3, np.float32)
            v[0 if ("bag" in t or "purse" in t) else 1 if ("shoe" in t or "sneaker" in t) else 2] = 1
            out.append(v)
        return np.stack(out)

    def encode_images(self, images):
        self.image_batches.append(len(images))
        out = []
        for im in images:
            r, g, b = np.asarray(im, np.float32).reshape(-1, 3).mean(axis=0)
            v = np.array([3 * max(0, r - (g + b) / 2), 3 * max(0, b - (r + g) / 2), 60.0], np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


class FixedProposer:
    """Stands in for SAM: returns the given full-resolution masks, records calls."""

    def __init__(self, masks):
        self.masks = np.stack(masks)
        self.set_image_calls = 0
        self.propose_calls = 0

    def set_image(self, rgb):
        self.set_image_calls += 1

    def propose(self, points, *a, **k):
        self.propose_calls += 1
        boxes = np.array([bbox(m) or (0, 0, 0, 0) for m in self.masks], float)
        return Proposals(self.masks.copy(), boxes, np.ones(len(self.masks)))


CLASSES = [ProductClass(name="handbag", prompts=["purse"], threshold=0.5),
           ProductClass(name="shoe", prompts=["sneaker"], threshold=0.5)]


def scene():
    """320x240 grey image, a red square (bag) and a blue ellipse (shoe); their exact masks."""
    img = np.full((240, 320, 3), GREY, np.uint8)
    yy, xx = np.mgrid[:240, :320]
    square = (xx >= 30) & (xx < 110) & (yy >= 60) & (yy < 140)
    ellipse = ((xx - 230) / 50.0) ** 2 + ((yy - 170) / 30.0) ** 2 <= 1
    img[square] = RED
    img[ellipse] = BLUE
    return Image.fromarray(img), square, ellipse


def detector(proposer, **cfg):
    det = Detector(None, DetectSettings(classes=CLASSES, background_prompts=["a wall", "a floor"], **cfg),
                   scorer=ColourScorer())
    det._proposer = proposer
    return det


def test_labels_merging_and_suppression_known_exactly():
    img, square, ellipse = scene()
    fragment = square.copy()
    fragment[:, 70:] = False  # left half of the bag: merged into it
    eroded = np.zeros_like(square)
    eroded[62:138, 32:108] = True  # near-duplicate of the bag: suppressed
    background = ~(square | ellipse)
    speck = np.zeros_like(square)
    speck[5:7, 5:7] = True  # 4 px: dropped as tiny
    prop = FixedProposer([fragment, square, eroded, ellipse, background, speck])
    det = detector(prop, min_mask_area=0.001)
    res = det.detect(img)
    assert not res.skipped
    labels = sorted((d.label, d.box) for d in res.detections)
    assert labels == [("handbag", (30, 60, 110, 140)), ("shoe", (180, 140, 281, 201))]
    by = {d.label: d for d in res.detections}
    assert np.array_equal(by["handbag"].mask, square)  # union of square + fragment, eroded suppressed
    assert np.array_equal(by["shoe"].mask, ellipse)
    assert by["handbag"].score > 0.9 and by["handbag"].margin > 0.5
    # every crop went through CLIP in one batch: 6 prefilter views, then the proposals left after
    # the size filter (speck) and box NMS (the eroded near-duplicate)
    assert det.scorer.image_batches == [6, 4]
    assert res.proposals == 6 and res.classified == 4
    assert prop.set_image_calls == 1


def test_background_only_region_is_not_labelled_and_skip_reports_best_scores():
    img, square, ellipse = scene()
    background = ~(square | ellipse)
    prop = FixedProposer([background])
    res = detector(prop, prefilter=False).detect(img)
    assert res.skipped and res.detections == []
    assert "none of 1 proposals" in res.reason
    assert set(res.best_scores) == {"handbag", "shoe"}


def test_prefilter_skips_before_sam_and_records_it():
    grey = Image.new("RGB", (300, 200), GREY)
    prop = FixedProposer([np.ones((200, 300), bool)])
    det = detector(prop, prefilter_threshold=0.3)
    res = det.detect(grey)
    assert res.skipped and "prefilter" in res.reason
    assert prop.set_image_calls == 0 and prop.propose_calls == 0
    assert res.prefilter["decision"] == "skip" and res.prefilter["views"] == 6
    assert all(v < 0.3 for v in res.best_scores.values())
    rec = res.to_record()
    assert rec["skipped"] and rec["prefilter"]["scores"].keys() == {"handbag", "shoe"}


def test_prefilter_passes_when_a_tile_sees_a_class():
    img, square, ellipse = scene()
    prop = FixedProposer([square])
    res = detector(prop, prefilter_threshold=0.3).detect(img)
    assert res.prefilter["decision"] == "pass" and not res.skipped
    assert [d.label for d in res.detections] == ["handbag"]


def test_text_embeddings_cached_per_class_set():
    img, square, ellipse = scene()
    det = detector(FixedProposer([square]))
    det.detect(img)
    det.detect(img)
    assert det.scorer.text_calls == 3  # 2 class ensembles + 1 background batch, once
    det.detect(img, [CLASSES[0]])
    assert det.scorer.text_calls == 5


def test_class_subset_only_reports_those_classes():
    img, square, ellipse = scene()
    res = detector(FixedProposer([square, ellipse])).detect(img, [CLASSES[1]])
    assert [d.label for d in res.detections] == ["shoe"]


def test_max_per_class_keeps_top_k():
    img = np.full((200, 400, 3), GREY, np.uint8)
    masks = []
    for i, x in enumerate((20, 140, 260)):
        img[50:130, x : x + 80 - 10 * i] = RED
        m = np.zeros((200, 400), bool)
        m[50:130, x : x + 80 - 10 * i] = True
        masks.append(m)
    res = detector(FixedProposer(masks), max_per_class=2).detect(Image.fromarray(img))
    assert len(res.detections) == 2


# ------------------------------------------------------------------------------------------------
# Pure helpers


def test_decide_threshold_margin_and_background():
    cp = np.array([[0.8, 0.1], [0.45, 0.40], [0.3, 0.1], [0.55, 0.03]])
    bg = np.array([0.1, 0.15, 0.6, 0.42])
    labels, scores, margins = decide(cp, bg, [0.5, 0.5], margin=0.1)
    # row 0 clear; row 1 below threshold; row 2 background wins; row 3 margin 0.13 over background: kept at 0.1
    assert labels.tolist() == [0, -1, -1, 0]
    assert margins[2] == pytest.approx(0.3 - 0.6)
    labels, _, _ = decide(cp, bg, [0.5, 0.5], margin=0.15)
    assert labels.tolist() == [0, -1, -1, -1]


def test_softmax_over_classes_and_background():
    img = np.array([[1, 0, 0], [0, 0, 1]], np.float32)
    txt = np.eye(3, dtype=np.float32)
    p = softmax_probs(img, txt, 10.0)
    assert np.allclose(p.sum(axis=1), 1)
    cp, bg = split_background(p, 1)
    assert cp.shape == (2, 1) and bg[1] > 0.99 and cp[0, 0] > 0.99


def test_merge_same_class():
    a = np.zeros((10, 10), bool); a[0:6, 0:6] = True
    dup = np.zeros_like(a); dup[0:6, 0:5] = True  # IoU 0.83: suppressed
    part = np.zeros_like(a); part[0:3, 0:3] = True  # inside a: merged (IoU 0.25)
    other = np.zeros_like(a); other[7:10, 7:10] = True
    groups = merge_same_class(np.stack([a, dup, part, other]), np.array([0.9, 0.8, 0.7, 0.6]))
    assert groups == [([0, 2], 0.9), ([3], 0.6)]


def test_fill_holes_and_boxes():
    m = np.zeros((20, 20), bool)
    m[2:12, 3:15] = True
    m[5:8, 6:9] = False
    filled = fill_holes(m)
    assert filled[6, 7] and filled.sum() == 120
    assert bbox(filled) == (3, 2, 15, 12)
    assert pad_box((10, 10, 20, 20), 0.5, 25, 100) == (5, 5, 25, 25)
    assert prefilter_views(100, 50)[0] == (0, 0, 100, 50) and len(prefilter_views(100, 50)) == 6


# ------------------------------------------------------------------------------------------------
# Real code path on tiny models


@pytest.mark.parametrize("mode", ["guided", "everything"])
def test_tiny_end_to_end_masks_match_input_size(registry, tiny_settings, mode):
    det = Detector(registry, tiny_settings.detect)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (150, 260, 3), dtype=np.uint8))
    res = det.detect(img, proposals=mode)
    assert res.proposals > 0 and res.detections
    for d in res.detections:
        assert d.mask.shape == (150, 260) and d.mask.dtype == bool
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 260 and 0 <= y0 < y1 <= 150
        assert d.label in {"handbag", "shoe"} and 0 <= d.score <= 1
    assert set(res.timings) >= {"prefilter", "proposals", "classify", "total"}


def test_tiny_exif_rotated_input_masks_follow_orientation(registry, tiny_settings, tmp_path):
    from pipeline.io.imageio import load_image

    p = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120x200, shown 200x120
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (200, 120, 3), dtype=np.uint8)).save(p, exif=exif)
    loaded = load_image(p)
    assert loaded.size == (200, 120)
    res = Detector(registry, tiny_settings.detect).detect(loaded.image)
    assert res.detections and all(d.mask.shape == (120, 200) for d in res.detections)


def test_tiny_sam_embedding_computed_once_per_image(registry, tiny_settings, monkeypatch):
    det = Detector(registry, tiny_settings.detect)
    calls = []
    enc = det.proposer.sam.image_encoder
    orig = enc.forward
    monkeypatch.setattr(enc, "forward", lambda x: calls.append(1) or orig(x))
    det.detect(Image.new("RGB", (90, 70), (10, 200, 10)))
    assert len(calls) == 1
