import json

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def _scene(tmp_path):
    img = np.full((120, 160, 3), (180, 180, 180), np.uint8)
    img[40:80, 20:60] = (150, 40, 40)
    mask = np.zeros((120, 160), np.uint8)
    mask[40:80, 20:60] = 255
    Image.fromarray(img).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    return img, mask > 0


def test_run_displace_with_mask_keeps_pixels_outside_edit_and_product_exact(tiny_dir, tmp_path):
    src, m = _scene(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "handbag",
                            "--x", "70", "--y", "-10%", "--mask", str(tmp_path / "m.png"), "--fill", "classical",
                            "--out", str(out), "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0, r.output
    res = np.asarray(Image.open(out / "p-displace.png").convert("RGB"))
    edit = np.asarray(Image.open(out / "p-displace.mask.png")) > 0
    assert np.array_equal(res[~edit], src[~edit])
    dy = -12
    assert np.array_equal(res[40 + dy : 80 + dy, 90:130], src[40:80, 20:60])  # the product, moved, exact
    rec = json.loads((out / "p-displace.json").read_text())
    assert rec["status"] == "edited" and rec["actions"][0]["record"]["offset"] == {"dx": 70, "dy": -12}
    assert rec["detect"]["proposal_mode"] == "mask file" and rec["input"]["sha256"]
    assert rec["qa"]["passed"] and rec["record_version"] == 2
    assert rec["products"][0]["box"] == [90, 40 + dy, 130, 80 + dy]


def test_run_displace_detects_when_no_mask(tiny_dir, tmp_path):
    _scene(tmp_path)
    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "handbag", "--x", "5",
                            "--fill", "classical", "--out", str(tmp_path / "o"), "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / "p-displace.json").read_text())
    assert rec["status"] == "edited" and rec["detect"]["detections"] and rec["actions"][0]["label"] == "handbag"


def test_run_displace_skips_without_product(tiny_dir, tmp_path):
    _scene(tmp_path)
    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["detect"]["prefilter_threshold"] = 1.0
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "shoe", "--x", "5",
                            "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / "skipped" / "p-displace.json").read_text())
    assert rec["status"] == "skipped" and "prefilter" in rec["detect"]["reason"] and "shoe" in rec["detect"]["best_scores"]
    assert not (tmp_path / "o" / "p-displace.png").exists()


def test_run_refusals_and_bad_arguments(tiny_dir, tmp_path):
    _scene(tmp_path)
    cfg = str(tiny_dir / "settings.yaml")
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "bag", "--x", "5",
                            "--mask", str(tmp_path / "small.png"), "--out", str(tmp_path / "o"), "--config", cfg])
    assert r.exit_code == 4 and "10x10" in r.output
    assert json.loads((tmp_path / "o" / "failed" / "p-displace.json").read_text())["status"] == "failed"
    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "bag", "--x", "2.5",
                            "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "o"), "--config", cfg])
    assert r.exit_code == 2 and "--x" in r.output
    r = runner.invoke(app, ["edit", "teleport", str(tmp_path / "p.png"), "--class", "bag", "--config", cfg])
    assert r.exit_code == 2 and "teleport" in r.output and "displace" in r.output  # Typer lists the ops


def test_run_rejects_options_of_other_ops(tiny_dir, tmp_path):
    _scene(tmp_path)
    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "bag", "--azimuth", "30",
                            "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 2 and "--azimuth" in r.output
