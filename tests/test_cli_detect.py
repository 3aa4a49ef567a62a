import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def _settings_variant(tiny_dir: Path, tmp_path: Path, **detect) -> Path:
    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["detect"].update(detect)
    p = tmp_path / "settings.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_detect_writes_json_masks_overlay_and_reports_failures(tiny_dir, tmp_path):
    from pipeline.io.samples import write_samples

    inputs = write_samples(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    r = runner.invoke(app, ["detect", str(tmp_path / "in"), "--out", str(out),
                            "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 4, r.output  # one input failed; the others were processed
    assert "broken.jpg" in r.output and "failed" in r.output
    fail = json.loads((out / "failed" / "broken.json").read_text())
    assert fail["status"] == "failed" and "broken.jpg" in fail["error"]
    for p in inputs:
        stem = p.stem
        rec = json.loads((out / f"{stem}.json").read_text())
        assert rec["status"] == "detected"
        assert rec["input"]["sha256"] and rec["models"][0]["role"] == "clip"
        w, h = rec["input"]["size"]
        assert (out / f"{stem}.overlay.png").is_file()
        assert Image.open(out / f"{stem}.overlay.png").size == (w, h)
        for d in rec["detect"]["detections"]:
            m = np.asarray(Image.open(out / d["mask_file"]))
            assert m.shape == (h, w) and int((m > 0).sum()) == d["mask_area"]
            assert {"label", "score", "box", "mask_area"} <= d.keys()
    # the EXIF-rotated phone photo is reported upright
    assert json.loads((out / "shoe-phone.json").read_text())["input"]["size"] == [720, 400]
    assert not list(out.glob(".*tmp*"))


def test_detect_skip_records_reason_and_best_scores(tiny_dir, tmp_path):
    cfg = _settings_variant(tiny_dir, tmp_path, prefilter_threshold=1.0)
    img = tmp_path / "wall.png"
    Image.new("RGB", (64, 48), (200, 200, 200)).save(img)
    r = runner.invoke(app, ["detect", str(img), "--out", str(tmp_path / "o"), "--config", str(cfg),
                            "--classes", "handbag,mug"])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output
    rec = json.loads((tmp_path / "o" / "skipped" / "wall.json").read_text())
    assert rec["status"] == "skipped"
    assert "prefilter" in rec["detect"]["reason"]
    assert set(rec["detect"]["best_scores"]) == {"handbag", "mug"}
    assert rec["detect"]["prefilter"]["decision"] == "skip"
    assert rec["outputs"]["masks"] == []


def test_detect_everything_mode_and_bad_option(tiny_dir, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(img)
    cfg = str(tiny_dir / "settings.yaml")
    r = runner.invoke(app, ["detect", str(img), "--out", str(tmp_path / "o"), "--config", cfg,
                            "--proposals", "everything", "--no-prefilter"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / "x.json").read_text())
    assert rec["detect"]["proposal_mode"] == "everything" and rec["detect"]["prefilter"] is None
    r = runner.invoke(app, ["detect", str(img), "--config", cfg, "--proposals", "sometimes"])
    assert r.exit_code == 2


def test_detect_no_inputs(tiny_dir, tmp_path):
    r = runner.invoke(app, ["detect", str(tmp_path), "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0 and "nothing to do" in r.output


def test_demo_runs_offline(tmp_path):
    r = runner.invoke(app, ["demo", "--dir", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "noise, not quality" in r.output
    out = tmp_path / "demo" / "outbox"
    assert sorted(p.name for p in out.glob("*.json")) == ["empty-wall.json", "handbag-shop.json", "handbag.json",
                                                          "shoe-phone.json", "shoe-shop.json"]
    # The shop outputs (known masks, no model): on white, amazon-main framing, check passed.
    import json

    for name in ("handbag", "shoe"):
        rec = json.loads((out / f"{name}-shop.json").read_text())
        assert rec["profiles"][0]["name"] == "amazon-main" and rec["profiles"][0]["check"]["passed"]
        assert (out / f"{name}-shop.amazon-main.jpg").is_file()
    assert "known masks" in (out / "report.html").read_text()
    assert (tmp_path / "demo" / "models" / "settings.yaml").is_file()
