"""Detection front-ends (detect.proposals grounded | clipseg | sam3) and the transformers SAM-family
segmenter, end to end on the tiny sets (loaded through the registry like real weights)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from pipeline.detect.detector import Detector
from pipeline.detect.fronts import HFSamProposer, heatmap_peaks
from pipeline.models.registry import HFSamBundle
from pipeline.models.registry import ModelRegistry
from pipeline.settings import DetectSettings, ProductClass

from tests.test_detect import ColourScorer

runner = CliRunner()
GREY = (128, 128, 128)


def _variant(tiny_dir: Path, tmp_path: Path, sam: str | None = None, grounding: str | None = None,
             **detect) -> Path:
    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["detect"].update(detect)
    if sam is not None:
        data["models"]["sam"] = {"path": sam, "licence": "tiny random weights (tests/demo only)"}
    if grounding is not None:
        data["models"]["grounding"] = {"path": grounding, "licence": "tiny random weights (tests/demo only)"}
    p = tmp_path / "settings.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _photo(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "bag.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (120, 180, 3), dtype=np.uint8)).save(p)
    return p


@pytest.mark.parametrize("mode,sam,role", [
    ("grounded", None, "grounding"),
    ("clipseg", None, "clipseg"),
    ("sam3", None, "sam3"),
    ("guided", "sam_hf", "sam"),
    ("guided", "sam_hq_hf", "sam"),
    ("grounded", "sam2_hf", "grounding"),
    pytest.param("guided", "edgetam_hf", "sam", marks=pytest.mark.skipif(
        importlib.util.find_spec("timm") is None, reason="EdgeTAM needs timm (the edgetam extra)")),
])
def test_cli_detect_each_front_end_writes_masks_and_records(tiny_dir, tmp_path, mode, sam, role):
    cfg = _variant(tiny_dir, tmp_path, sam=sam)
    img = _photo(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["detect", str(img), "--out", str(out), "--config", str(cfg), "--proposals", mode])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "bag.json").read_text())
    assert rec["status"] == "detected" and rec["detect"]["proposal_mode"] == mode
    assert role in [m["role"] for m in rec["models"]]
    assert rec["detect"]["detections"]
    for d in rec["detect"]["detections"]:
        m = np.asarray(Image.open(out / d["mask_file"]))
        assert m.shape == (120, 180) and int((m > 0).sum()) == d["mask_area"] > 0
        assert d["source"] == mode
    if mode == "sam3":
        assert set(rec["detect"]["presence"]) == {"handbag", "shoe"}
        assert [m["role"] for m in rec["models"]] == ["clip", "sam3"]  # no SAM, no CLIP re-scoring
    if mode == "grounded":
        assert rec["detect"]["grounding"]["boxes"] > 0


def test_cli_detect_grounded_with_grounding_dino(tiny_dir, tmp_path):
    cfg = _variant(tiny_dir, tmp_path, grounding="grounding_dino")
    out = tmp_path / "out"
    r = runner.invoke(app, ["detect", str(_photo(tmp_path)), "--out", str(out), "--config", str(cfg),
                            "--proposals", "grounded"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "bag.json").read_text())
    assert rec["status"] == "detected" and rec["detect"]["grounding"]["boxes"] > 0
    assert rec["detect"]["detections"] and all((out / d["mask_file"]).is_file() for d in rec["detect"]["detections"])
    assert rec["detect"]["grounding"]["boxes"] <= 16  # detect.max_boxes after box NMS


def test_cli_rejects_unknown_proposals(tiny_dir, tmp_path):
    r = runner.invoke(app, ["detect", str(_photo(tmp_path)), "--out", str(tmp_path / "o"),
                            "--config", str(tiny_dir / "settings.yaml"), "--proposals", "owl"])
    assert r.exit_code != 0 and "grounded" in r.output


def test_grounded_box_on_an_absent_product_is_still_skipped(tiny_settings, tiny_dir):
    """The tiny detector returns boxes on anything (threshold 0); CLIP (fixed colour embeddings)
    sees only background in every box's crop, so the image is skipped."""
    registry = ModelRegistry(tiny_settings)
    cfg = DetectSettings(classes=[ProductClass(name="handbag", prompts=["purse"], threshold=0.5),
                                  ProductClass(name="shoe", prompts=["sneaker"], threshold=0.5)],
                         background_prompts=["a wall", "a floor"], prefilter=False, box_threshold=0.0,
                         min_mask_area=0.0, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    det = Detector(registry, cfg, scorer=ColourScorer())
    res = det.detect(Image.new("RGB", (160, 120), GREY), proposals="grounded")
    assert res.grounding["boxes"] > 0 and res.proposals == res.grounding["boxes"]
    assert res.skipped and res.detections == [] and "none of" in res.reason
    assert det.scorer.image_batches == [res.classified]  # every box's crop in one CLIP batch

    # the same boxes on a red product are labelled: the skip is CLIP's, not the detector's
    red = Image.new("RGB", (160, 120), (200, 30, 30))
    hit = det.detect(red, proposals="grounded")
    assert not hit.skipped and {d.label for d in hit.detections} == {"handbag"}


def test_sam3_presence_decides_the_skip(tiny_settings):
    registry = ModelRegistry(tiny_settings)
    img = Image.fromarray(np.random.default_rng(4).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    low = Detector(registry, tiny_settings.detect.model_copy(update={"presence_threshold": 0.0}))
    res = low.detect(img, proposals="sam3")
    assert not res.skipped and res.detections
    presence = max(res.presence.values())
    high = Detector(registry, tiny_settings.detect.model_copy(update={"presence_threshold": presence + 1e-3}))
    skipped = high.detect(img, proposals="sam3")
    assert skipped.skipped and "presence" in skipped.reason and skipped.detections == []
    assert skipped.presence == res.presence


def test_sam3_vision_features_once_for_all_classes(tiny_settings, monkeypatch):
    registry = ModelRegistry(tiny_settings)
    model = registry.get("sam3").model
    calls = {"vision": 0, "decode": 0}
    vision, forward = model.get_vision_features, model.forward
    monkeypatch.setattr(model, "get_vision_features", lambda **k: calls.__setitem__("vision", calls["vision"] + 1) or vision(**k))
    monkeypatch.setattr(model, "forward", lambda **k: calls.__setitem__("decode", calls["decode"] + 1) or forward(**k))
    Detector(registry, tiny_settings.detect).detect(Image.new("RGB", (64, 48), (90, 20, 20)), proposals="sam3")
    assert calls == {"vision": 1, "decode": 2}  # two classes


@pytest.mark.parametrize("family", ["sam_hf", "sam_hq_hf", "sam2_hf", pytest.param("edgetam_hf", marks=pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="EdgeTAM needs timm (the edgetam extra)"))])
def test_transformers_segmenter_contract(tiny_settings, tiny_dir, family):
    """The sam role from a transformers repo: chosen by config.json, embedding once per image,
    prompts decoded in batches, masks at the photo's resolution. EdgeTAM's repo is a video
    checkpoint (as facebook/EdgeTAM's): its image model loads from it."""
    s = tiny_settings.model_copy(deep=True)
    s.models.sam = s.models.sam.model_copy(update={"path": tiny_dir / family, "model_type": None})
    registry = ModelRegistry(s)
    bundle = registry.get("sam")
    assert isinstance(bundle, HFSamBundle)
    assert bundle.family == {"sam_hf": "sam", "sam_hq_hf": "sam_hq", "sam2_hf": "sam2",
                             "edgetam_hf": "edgetam"}[family]
    assert registry.verify("sam")["class"] == {"sam_hf": "SamModel", "sam_hq_hf": "SamHQModel", "sam2_hf": "Sam2Model",
                                               "edgetam_hf": "EdgeTamModel"}[family]
    det = Detector(registry, s.detect)
    assert isinstance(det.proposer, HFSamProposer)
    calls = []
    enc = bundle.model.get_image_embeddings
    bundle.model.get_image_embeddings = lambda **k: calls.append(1) or enc(**k)
    try:
        res = det.detect(Image.fromarray(np.random.default_rng(5).integers(0, 255, (70, 130, 3), dtype=np.uint8)))
    finally:
        del bundle.model.get_image_embeddings
    assert len(calls) == 1 and res.proposals > 0
    assert res.detections and all(d.mask.shape == (70, 130) for d in res.detections)
    # a batch of prompts larger than the decode batch: same candidates as one by one
    prop = det.proposer
    pts = np.array([[10, 10], [60, 30], [120, 60]], np.float32)
    together = prop.propose(pts, 0.0, 0.0, batch=64)
    apart = prop.propose(pts, 0.0, 0.0, batch=1)
    assert np.array_equal(together.masks, apart.masks)


def test_heatmap_peaks_known_exactly():
    heat = np.zeros((8, 8), np.float32)
    heat[1, 1], heat[1, 2], heat[5, 6], heat[6, 1] = 0.9, 0.8, 0.7, 0.3
    assert heatmap_peaks(heat, 0.5, 5) == [(1, 1, pytest.approx(0.9)), (5, 6, pytest.approx(0.7))]
    assert heatmap_peaks(heat, 0.2, 1) == [(1, 1, pytest.approx(0.9))]
    assert heatmap_peaks(heat, 0.95, 5) == [] and heatmap_peaks(heat, 0.9, 5) == []
