"""`background.matte: vitmatte`: the optional `matting` role (tiny random ViTMatte in the real
layout) decides the soft edge in a band outside the product mask; the product's pixels stay
bit-identical and the record names the model. `ramp` stays the default and unchanged."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from pipeline.ops.background import trimap, vitmatte_alpha
from pipeline.io.composite import dilate, extend_edges, feather_alpha, paste
from pipeline.settings import BackgroundSettings
from tests.edit_helpers import run_action
from tests.test_shop import _arr, _scene

runner = CliRunner()


def test_tiny_matting_is_the_real_layout(tiny_dir, registry):
    d = tiny_dir / "matting"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((d / "config.json").read_text())["model_type"] == "vitmatte"
    bundle = registry.get("matting")
    assert type(bundle.model).__name__ == "VitMatteForImageMatting"
    assert type(bundle.processor).__name__.startswith("VitMatteImageProcessor")


def test_trimap_bands():
    m = np.zeros((30, 40), bool)
    m[10:20, 10:30] = True
    tri = trimap(m, 3)
    assert set(np.unique(tri)) == {0, 128, 255}
    assert (tri[dilate(m, 3) & ~m] == 128).all() and (tri[~dilate(m, 3)] == 0).all()
    assert (tri[14:16, 14:26] == 255).all() and (tri[10, 10:30] == 128).all()  # the mask's rim is unknown
    edge = np.zeros((10, 10), bool)
    edge[:, :5] = True  # touching the border: the border erodes too
    assert (trimap(edge, 2)[:, 0] == 128).all()


def test_vitmatte_alpha_is_one_on_the_mask_and_zero_beyond_the_band(registry):
    rgb = np.random.default_rng(1).integers(0, 255, (90, 120, 3), np.uint8)
    m = np.zeros((90, 120), bool)
    m[20:70, 30:90] = True
    alpha, rec = vitmatte_alpha(rgb, m, 5, 64, registry)
    assert alpha.dtype == np.float32 and (alpha[m] == 1.0).all() and (alpha[~dilate(m, 5)] == 0.0).all()
    band = dilate(m, 5) & ~m
    assert ((alpha[band] >= 0) & (alpha[band] <= 1)).all() and alpha[band].max() > 0
    assert rec["kind"] == "vitmatte" and rec["band"] == 5 and max(rec["work_size"]) <= 64
    assert rec["model"]["role"] == "matting" and rec["band_pixels"] == int(band.sum())


def test_ramp_is_the_default_and_unchanged(tiny_settings):
    assert BackgroundSettings().matte == "ramp"
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 60, 3), np.uint8))
    mask = np.zeros((50, 60), bool)
    mask[10:40, 15:45] = True
    edit = run_action("background", img, mask, "box", {"edge": 3}, tiny_settings, None)
    bg = np.full((50, 60, 3), 255, np.uint8)
    want = paste(bg, extend_edges(np.asarray(img), mask, 3), feather_alpha(mask, 3))
    assert np.array_equal(np.asarray(edit.image), want)
    assert edit.record["matte"] == {"kind": "ramp", "edge": 3}


def test_run_background_with_vitmatte_end_to_end(tiny_dir, tmp_path):
    scene, mask_path = _scene(tmp_path, size=(200, 150), box=(60, 40, 140, 120))
    out = tmp_path / "out"
    r = runner.invoke(app, ["edit", "background", str(scene), "--mask", str(mask_path), "--class", "box",
                            "--param", "matte=vitmatte", "--param", "matte_band=6", "--out", str(out),
                            "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "scene-background.json").read_text())
    assert rec["status"] == "edited" and rec["qa"]["passed"], rec.get("error")
    (act,) = rec["actions"]
    matte = act["record"]["matte"]
    assert matte["kind"] == "vitmatte" and matte["band"] == 6
    assert matte["model"]["role"] == "matting" and matte["model"]["source"].endswith("matting")
    assert matte["model"]["licence"]
    src, res = _arr(scene), _arr(out / "scene-background.png")
    m = np.asarray(Image.open(mask_path)) > 0
    assert np.array_equal(res[m], src[m])  # the product's own pixels, bit for bit
    assert (res[~dilate(m, 6)] == 255).all()  # pure white beyond the band
    band = dilate(m, 6) & ~m
    assert (res[band] != 255).any()  # the matte drew a soft edge there


def test_vitmatte_without_the_model_is_a_model_error_naming_the_role(tiny_settings, tmp_path):
    from pipeline.models.registry import ModelLoadError, ModelRegistry

    s = tiny_settings.model_copy(deep=True)
    s.models.matting = s.models.matting.model_copy(update={"path": tmp_path / "no-such-matting"})
    img = Image.fromarray(np.full((40, 40, 3), 90, np.uint8))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    with pytest.raises(ModelLoadError) as e:
        run_action("background", img, mask, "box", {"matte": "vitmatte"}, s, ModelRegistry(s))
    assert e.value.role == "matting" and "no-such-matting" in str(e.value)
