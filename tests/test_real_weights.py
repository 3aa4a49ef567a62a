"""Real checkpoints (the defaults in conf/settings.yaml). Skipped unless PRODUCT_STUDIO_REAL_WEIGHTS=1
and the weights are in the local HF cache (`product-studio models pull` first)."""

import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(os.environ.get("PRODUCT_STUDIO_REAL_WEIGHTS") != "1",
                       reason="set PRODUCT_STUDIO_REAL_WEIGHTS=1 (after `models pull`) to run"),
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_registry():
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import load_settings

    return ModelRegistry(load_settings(REPO / "conf" / "settings.yaml"))


@pytest.mark.parametrize("role", ["clip", "sam", "depth", "upscaler", "captioner"])
def test_real_role_loads(real_registry, role):
    assert real_registry.verify(role)["parameters"] > 1_000_000


def test_real_detection_skips_an_empty_backdrop_and_runs_on_a_product(real_registry):
    from pipeline.detect.detector import Detector
    from pipeline.io.samples import empty_wall, handbag

    det = Detector(real_registry, real_registry.settings.detect)
    wall = det.detect(empty_wall())
    assert wall.skipped and wall.best_scores
    img = handbag()
    res = det.detect(img, prefilter=False)
    assert res.proposals > 0
    assert all(d.mask.shape == (img.height, img.width) for d in res.detections)
