"""Catalog runs through the rules with tiny models: folders, CSV, dry run, conflicts, replay, report."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from pipeline.ops.actions import parse_action_text, split_action_text
from pipeline.run.catalog import CatalogError, read_catalog_csv
from pipeline.errors import ParamsError
from pipeline.io.outputs import OutputFolder
from pipeline.settings import Settings

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from pipeline.io.samples import write_samples

    d = tmp_path_factory.mktemp("catalog-in")
    write_samples(d / "photos")
    (d / "photos" / "sub").mkdir()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(d / "photos" / "sub" / "deep.png")
    (d / "photos" / ".DS_Store").write_bytes(b"junk")
    return d


def run(args, tiny_dir):
    return runner.invoke(app, ["run", *args, "--config", str(tiny_dir / "settings.yaml")], terminal_width=200)


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if "id" in a:
            self.ids.append(a["id"])

    def handle_data(self, data):
        self.text.append(data)


def test_folder_run_writes_outputs_manifest_and_report(tiny_dir, inputs, tmp_path):
    out = tmp_path / "out"
    r = run([str(inputs / "photos"), "--out", str(out)], tiny_dir)
    assert r.exit_code == 0, r.output
    assert "edited" in r.output and "time per stage" in r.output
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Path(x["input"]).name for x in lines) == ["empty-wall.jpg", "handbag.png", "shoe-phone.jpg"]
    for x in lines:
        rec = json.loads((out / x["record"]).read_text())
        assert rec["status"] == x["status"]
        assert rec["rules"]["sha256"] and rec["input"]["sha256"] == x["sha256"]
        if x["status"] == "edited":
            assert (out / rec["outputs"]["image"]).is_file()
            ops = [a["op"] for a in rec["actions"]]
            assert ops in (["enhance", "displace"], ["rotate"]) and rec["actions"][0]["rule_name"]
            img = np.asarray(Image.open(out / rec["outputs"]["image"]).convert("RGB"))
            assert list(img.shape[1::-1]) == rec["input"]["size"]
    # the contact sheet parses and every thumbnail it names exists
    p = Collect()
    p.feed((out / "report.html").read_text())
    assert p.imgs and all((out / src).is_file() for src in p.imgs)
    assert "summary" in p.ids


def test_recursive_and_csv_with_overrides(tiny_dir, inputs, tmp_path):
    out = tmp_path / "out"
    r = run([str(inputs / "photos"), "-R", "--out", str(out)], tiny_dir)
    assert r.exit_code == 0, r.output
    assert (out / "deep.json").is_file()
    csvp = tmp_path / "cat.csv"
    csvp.write_text("sku,path,class,action\n"
                    f"A1,{inputs / 'photos' / 'handbag.png'},handbag,displace x=5 y=0 fill=classical\n"
                    f"A2,{inputs / 'photos' / 'nope.jpg'},,\n"
                    f"A3,{inputs / 'photos' / 'handbag.png'},hat,\n")
    out2 = tmp_path / "out2"
    r = run([str(csvp), "--out", str(out2)], tiny_dir)
    assert r.exit_code == 4, r.output  # A2 missing, A3 unknown class
    a1 = json.loads((out2 / "A1.json").read_text())
    assert a1["actions"][0]["options"] == {"x": 5, "y": 0, "fill": "classical"}
    assert a1["actions"][0]["settings"]["fill"]["backend"] == "classical"
    assert a1["actions"][0]["rule_name"] == "given actions"
    assert a1["actions"][0]["record"]["offset"] == {"dx": 5, "dy": 0}
    assert "nope.jpg" in (out2 / "failed" / "A2.json").read_text()
    assert "unknown class hat" in json.loads((out2 / "failed" / "A3.json").read_text())["error"]


def test_dry_run_writes_plan_but_no_edited_images(tiny_dir, inputs, tmp_path):
    out = tmp_path / "out"
    r = run([str(inputs / "photos" / "handbag.png"), "--dry-run", "--out", str(out)], tiny_dir)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "handbag.json").read_text())
    assert rec["status"] == "planned" and rec["plan"][0]["op"] in ("enhance", "rotate")
    assert (out / "handbag.overlay.png").is_file() and list(out.glob("handbag.mask*.png"))
    assert not (out / "handbag.png").exists()


def test_conflict_policies(tiny_dir, inputs, tmp_path):
    out = tmp_path / "out"
    src = str(inputs / "photos" / "handbag.png")
    assert run([src, "--out", str(out)], tiny_dir).exit_code == 0
    first = (out / "handbag.png").read_bytes()
    assert run([src, "--out", str(out)], tiny_dir).exit_code == 0  # suffix (default)
    assert (out / "handbag-1.json").is_file()
    r = run([src, "--out", str(out), "--on-conflict", "skip"], tiny_dir)
    assert r.exit_code == 0 and "exists" in r.output and not (out / "handbag-2.json").exists()
    (out / "handbag.png").write_bytes(b"stale")
    assert run([src, "--out", str(out), "--on-conflict", "overwrite"], tiny_dir).exit_code == 0
    # records replay: same input, rules and seeds -> the same output, bit for bit
    assert (out / "handbag.png").read_bytes() == first
    assert (out / "handbag-1.png").read_bytes() == first
    assert run([src, "--out", str(out), "--on-conflict", "bogus"], tiny_dir).exit_code == 2


def test_no_match_skip_and_copy(tiny_dir, inputs, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\nno_match: skip\n")
    out = tmp_path / "o"
    src = str(inputs / "photos" / "handbag.png")
    r = run([src, "--rules", str(rules), "--out", str(out)], tiny_dir)
    assert r.exit_code == 0
    rec = json.loads((out / "skipped" / "handbag.json").read_text())
    assert rec["status"] == "skipped" and "no rule matched" in rec["detect"]["reason"]
    rules.write_text("rules: []\nno_match: copy\n")
    r = run([src, "--rules", str(rules), "--out", str(tmp_path / "c")], tiny_dir)
    rec = json.loads((tmp_path / "c" / "handbag.json").read_text())
    assert rec["status"] == "edited" and rec["copied"] and rec["edit_pixels"] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c" / "handbag.png").convert("RGB")),
                          np.asarray(Image.open(src).convert("RGB")))


def test_bad_rules_refused_before_running(tiny_dir, inputs, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - match: {class: hat}\n    actions: [{displace: {x: 1}}]\n")
    r = run([str(inputs / "photos"), "--rules", str(rules), "--out", str(tmp_path / "o")], tiny_dir)
    assert r.exit_code == 2 and "unknown class 'hat'" in r.output
    assert not (tmp_path / "o").exists()


def test_catalog_helpers(tmp_path):
    assert split_action_text("displace x=-10% y=0; enhance seed=3") == [("displace", {"x": "-10%", "y": 0}),
                                                                       ("enhance", {"seed": 3})]
    acts = parse_action_text("displace x=-10% y=0 fill=classical", Settings())
    assert acts[0].params.x == "-10%" and acts[0].params.settings.fill.backend == "classical"
    with pytest.raises(ParamsError, match="unknown action"):
        parse_action_text("warp", Settings())
    with pytest.raises(ParamsError, match="fill"):
        parse_action_text("displace x=1 fill=magic", Settings())
    (tmp_path / "c.csv").write_text("image\nx.jpg\n")
    assert read_catalog_csv(tmp_path / "c.csv", Settings())[0].path == tmp_path / "x.jpg"
    (tmp_path / "bad.csv").write_text("file\nx.jpg\n")
    with pytest.raises(CatalogError, match="'path'"):
        read_catalog_csv(tmp_path / "bad.csv", Settings())
    # a bad action names the row and the column
    (tmp_path / "act.csv").write_text("path,action\nx.jpg,displace x=far\n")
    with pytest.raises(CatalogError, match=r"act.csv:2: column 'action': displace: x: .*far"):
        read_catalog_csv(tmp_path / "act.csv", Settings())
    folder = OutputFolder(tmp_path)
    assert folder.claim("a.png") == "a" and folder.claim("a.jpg") == "a-1"
    assert folder.claim("a.mask.png") == "a_mask"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_dir, inputs, tmp_path):
    out = tmp_path / "out"
    assert run([str(inputs / "photos"), "--out", str(out)], tiny_dir).exit_code == 0
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1200,900", (out / "report.html").as_uri()],
                   check=True, timeout=60, capture_output=True)
    assert shot.stat().st_size > 10_000


def test_processor_warm_up_loads_detection_models_and_runs_one_detection(tiny_settings, tmp_path):
    from pipeline.models.registry import ModelLoadError, ModelRegistry
    from pipeline.run.process import Processor

    reg = ModelRegistry(tiny_settings)
    proc = Processor(tiny_settings, registry=reg)
    assert not reg.is_loaded("clip") and not reg.is_loaded("sam")
    secs = proc.warm_up()
    assert set(secs) == {"load", "detect"} and secs["detect"] > 0
    assert reg.is_loaded("clip") and reg.is_loaded("sam")
    assert not reg.is_loaded("inpaint")  # edit models still load when a rule first needs them

    # A model that is not there fails the warm-up (the daemon's start: exit 3), not image 1.
    broken = tiny_settings.model_copy(deep=True)
    broken.models.sam.path = tmp_path / "missing-sam.safetensors"
    with pytest.raises(ModelLoadError):
        Processor(broken).warm_up()
