"""Edits that compose: every ordered pair of operations on one product, two products in one image,
the QA gate, `rules check` refusals, masks given by the user, stems that cannot collide, and errors
by whose fault they are. Tiny models, fixed seeds, exact pixel checks."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from pipeline.ops.actions import OPERATIONS, Operation
from pipeline.io.composite import bbox, dilate, shift_mask
from pipeline.detect.detector import Detection, DetectResult
from pipeline.ops.displace import DisplaceParams
from pipeline.run.process import Processor
from pipeline.run.rules import rules_from_dict
from pipeline.settings import SettingsError

runner = CliRunner()
W, H = 160, 120
BOX = (50, 40, 70, 60)  # x0, y0, x1, y1: a 20x20 product, 400 pixels


def scene(boxes=(BOX,)) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured backdrop (so a changed pixel shows) with textured square products."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.dstack([120 + 40 * np.sin(xx / 7.0), 110 + 30 * np.cos(yy / 5.0), 100 + 20 * np.sin((xx + yy) / 9.0)])
    img = (img + rng.integers(-6, 7, img.shape)).clip(0, 255).astype(np.uint8)
    masks = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[y0:y1, x0:x1] = rng.integers(0, 90, (y1 - y0, x1 - x0, 3)) + 20 * i
        m = np.zeros((H, W), bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    return img, masks


def write_scene(tmp_path: Path, boxes=(BOX,)) -> tuple[np.ndarray, list[np.ndarray], Path, Path]:
    img, masks = scene(boxes)
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(tmp_path / "scene_mask.png")
    return img, masks, tmp_path / "scene.png", tmp_path / "scene_mask.png"


ACTIONS = {
    "displace": {"displace": {"x": 30, "y": 10, "fill": "classical", "out_of_frame": "refuse",
                              "max_outside_share": 0.0}},
    "enhance": {"enhance": {"seed": 3}},
    "rotate": {"rotate": {"azimuth": 30, "fill": "classical", "upscale": "off", "matte_refine": False}},
}


def run_rules(settings, registry, tmp_path, actions, *, mask, detector=None, classes=("box",)) -> dict:
    rules = rules_from_dict({"classes": [{"name": c} for c in classes],
                             "rules": [{"match": {"class": c}, "actions": a} for c, a in actions]}, settings)
    proc = Processor(settings, rules, registry=registry, detector=detector)
    return proc.process(tmp_path / "scene.png", tmp_path / "out", mask=mask, product_class=classes[0])


def out_image(tmp_path: Path) -> np.ndarray:
    return np.asarray(Image.open(tmp_path / "out" / "scene.png").convert("RGB"))


@pytest.mark.parametrize("first, second", list(itertools.product(ACTIONS, repeat=2)))
def test_every_ordered_pair_edits_the_product_where_it_is(tiny_settings, registry, tmp_path, first, second):
    src, (m,), _, mask_file = write_scene(tmp_path)
    rec = run_rules(tiny_settings, registry, tmp_path, [("box", [ACTIONS[first], ACTIONS[second]])], mask=mask_file)
    assert rec["status"] == "edited", rec.get("error")
    assert rec["qa"]["passed"] and [c["name"] for c in rec["qa"]["checks"]] == [
        "outside_edits_unchanged", "each_edit_within_its_mask", "moved_product_identical", "products_kept"]
    out = out_image(tmp_path)
    edit_mask = np.asarray(Image.open(tmp_path / "out" / "scene.mask.png")) > 0
    assert np.array_equal(out[~edit_mask], src[~edit_mask])  # everything else bit-identical
    a1, a2 = rec["actions"]
    # where the first edit left the product is where the second one worked
    after_first = {"displace": shift_mask(m, 30, 10), "enhance": m}.get(first)
    if first == "rotate":
        box1 = a1["record"]["placement"]["new_box"]
        assert a1["product"]["box"] is not None and a1["product"]["pixels"] == a1["record"]["placement"]["new_mask_pixels"]
    else:
        box1 = list(bbox(after_first))
        assert a1["product"]["box"] == box1 and a1["product"]["pixels"] == int(after_first.sum())
    r2 = a2["record"]
    if second == "rotate":
        # Zero123 got the product at its current place: the new view is placed on that box
        assert r2["placement"]["old_box"] == a1["product"]["box"]
    else:
        assert r2["mask_pixels"] == a1["product"]["pixels"]
    if second == "displace":
        assert r2["offset"] == {"dx": 30, "dy": 10}
    if first == "displace" and second == "displace":
        # displace twice moves by the sum, the product's own pixels exact
        x0, y0, x1, y1 = BOX
        assert np.array_equal(out[y0 + 20:y1 + 20, x0 + 60:x1 + 60], src[y0:y1, x0:x1])
        assert rec["products"][0]["box"] == [x0 + 60, y0 + 20, x1 + 60, y1 + 20]
    if first == "displace" and second == "enhance":
        # the moved product was enhanced, not the hole it left
        moved = shift_mask(m, 30, 10)
        assert (out[moved] != src[m]).any()
        assert r2["edit_pixels"] == int(dilate(moved, tiny_settings.enhance.mask_dilation).sum())
    if second == "displace":
        # the pasted product equals the product as the first edit left it, pixel for pixel
        moves = {c["name"]: c for c in rec["qa"]["checks"]}["moved_product_identical"]["moves"]
        assert moves[-1]["step"] == 1 and moves[-1]["differing"] == 0
        assert moves[-1]["pixels"] == a1["product"]["pixels"]


def test_displace_twice_through_the_cli_moves_by_the_sum(tiny_dir, tmp_path):
    src, (m,), scene_file, mask_file = write_scene(tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"classes": [{"name": "box"}], "rules": [
        {"match": {"class": "box"}, "actions": [{"displace": {"x": 30, "fill": "classical"}},
                                                {"displace": {"x": 30, "fill": "classical"}}]}]}))
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", str(scene_file), "--rules", str(rules), "--mask", str(mask_file), "--class", "box",
                            "--out", str(out), "--config", str(tiny_dir / "settings.yaml")], terminal_width=200)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "scene.json").read_text())
    assert rec["status"] == "edited" and rec["qa"]["passed"]
    res = np.asarray(Image.open(out / "scene.png").convert("RGB"))
    x0, y0, x1, y1 = BOX
    assert np.array_equal(res[y0:y1, x0 + 60:x1 + 60], src[y0:y1, x0:x1])  # moved by the sum, exact
    assert rec["products"][0] == {"label": "box", "pixels": 400, "box": [x0 + 60, y0, x1 + 60, y1]}
    edit = np.asarray(Image.open(out / "scene.mask.png")) > 0
    assert np.array_equal(res[~edit], src[~edit])
    # nothing of the product is left at its old place, and none of it was lost
    assert not (res[m] == src[m]).all(axis=-1).all()


class TwoProducts:
    """A detector that finds the given products (class a, class b) without any model."""

    def __init__(self, masks, labels=("a", "b")):
        self.masks, self.labels = masks, labels

    def detect(self, image, classes, **kw):
        dets = [Detection(label=lab, score=0.9 - 0.1 * i, box=bbox(m), mask=m.copy(), source="test")
                for i, (lab, m) in enumerate(zip(self.labels, self.masks))]
        return DetectResult(image_size=image.size, detections=dets, best_scores={lab: 0.9 for lab in self.labels})


def test_two_products_each_edit_their_own_pixels(tiny_settings, registry, tmp_path):
    boxes = ((20, 30, 40, 50), (100, 60, 124, 84))
    src, masks, *_ = write_scene(tmp_path, boxes)
    disp = {"displace": {"x": 10, "y": -5, "fill": "classical"}}
    rec = run_rules(tiny_settings, registry, tmp_path, [("a", [disp]), ("b", [ACTIONS["enhance"]])], mask=None,
                    detector=TwoProducts(masks), classes=("a", "b"))
    assert rec["status"] == "edited", rec.get("error")
    out = out_image(tmp_path)
    ax0, ay0, ax1, ay1 = boxes[0]
    assert np.array_equal(out[ay0 - 5:ay1 - 5, ax0 + 10:ax1 + 10], src[ay0:ay1, ax0:ax1])  # a moved, exact
    by = {a["label"]: a for a in rec["actions"]}
    assert by["b"]["record"]["mask_pixels"] == int(masks[1].sum())  # b enhanced where b is
    assert (out[masks[1]] != src[masks[1]]).any()
    assert [p["box"] for p in rec["products"]] == [[ax0 + 10, ay0 - 5, ax1 + 10, ay1 - 5], list(boxes[1])]
    assert rec["qa"]["passed"]


def test_a_product_painted_over_loses_those_pixels_and_a_lost_product_fails_qa(tiny_settings, registry, tmp_path):
    # a moves partly onto b: b's later enhance works on what is left of b
    boxes = ((20, 40, 50, 70), (60, 40, 90, 70))
    src, masks, *_ = write_scene(tmp_path, boxes)
    disp = {"displace": {"x": 25, "fill": "classical"}}
    rec = run_rules(tiny_settings, registry, tmp_path, [("a", [disp]), ("b", [ACTIONS["enhance"]])], mask=None,
                    detector=TwoProducts(masks), classes=("a", "b"))
    assert rec["status"] == "edited", rec.get("error")
    by = {a["label"]: a for a in rec["actions"]}
    covered = masks[1] & dilate(shift_mask(masks[0], 25, 0), tiny_settings.displace.feather)
    assert by["b"]["record"]["mask_pixels"] == int((masks[1] & ~covered).sum()) < int(masks[1].sum())
    # a moved wholly over b: b is gone, QA refuses, nothing but the failed record is written
    (tmp_path / "out").rename(tmp_path / "first")
    rec = run_rules(tiny_settings, registry, tmp_path, [("a", [{"displace": {"x": 40, "fill": "classical"}}])],
                    mask=None, detector=TwoProducts(masks), classes=("a", "b"))
    assert rec["status"] == "failed" and rec["stage"] == "qa"
    assert "product 1 (b) is gone" in rec["error"] and rec["qa"]["passed"] is False
    assert not (tmp_path / "out" / "scene.png").exists() and (tmp_path / "out" / "failed" / "scene.json").is_file()


def test_qa_refuses_an_edit_that_breaks_a_guarantee(tiny_settings, registry, tmp_path, monkeypatch):
    src, (m,), _, mask_file = write_scene(tmp_path)
    real = OPERATIONS["displace"]

    def leaky(image, mask, label, params, ctx):
        e = real.run(image, mask, label, params, ctx)
        arr = np.asarray(e.image).copy()
        arr[0, 0] = 255 - arr[0, 0]  # one stray pixel outside the edit mask
        e.image = Image.fromarray(arr)
        return e

    monkeypatch.setitem(OPERATIONS, "displace", Operation("displace", DisplaceParams, leaky, moves=True))
    rec = run_rules(tiny_settings, registry, tmp_path, [("box", [ACTIONS["displace"]])], mask=mask_file)
    assert rec["status"] == "failed" and rec["stage"] == "qa"
    assert "1 pixel(s) outside the edits differ" in rec["error"]
    failed = {c["name"]: c for c in rec["qa"]["checks"]}
    assert not failed["outside_edits_unchanged"]["passed"] and not failed["each_edit_within_its_mask"]["passed"]
    assert not (tmp_path / "out" / "scene.png").exists()


def test_rules_check_refuses_what_cannot_be_honoured(tiny_dir, tmp_path):
    from pipeline.run.rules import load_rules
    from pipeline.settings import load_settings

    s = load_settings(tiny_dir / "settings.yaml")
    p = tmp_path / "r.yaml"
    p.write_text("classes: [{name: box}]\nrules:\n  - match: {class: box}\n    actions:\n"
                 "      - displace: {x: 30}\n      - rotate: {azimuth: 20}\n")
    with pytest.raises(SettingsError) as ei:
        load_rules(p, s)
    (field, reason, line), = ei.value.problems
    assert field == "rules.0.actions.1.rotate" and line == 6 and "cut the product at the frame edge" in reason
    r = runner.invoke(app, ["rules", "check", str(p), "--config", str(tiny_dir / "settings.yaml")], terminal_width=200)
    assert r.exit_code == 2 and "rotate after a displace" in r.output
    # the same chain with the product kept whole in the frame is accepted
    p.write_text("classes: [{name: box}]\nrules:\n  - match: {class: box}\n    actions:\n"
                 "      - displace: {x: 30, out_of_frame: refuse, max_outside_share: 0}\n      - rotate: {azimuth: 20}\n")
    assert len(load_rules(p, s).actions[0]) == 2


def test_outputs_of_a_png_and_a_mask_png_never_collide(tiny_dir, tmp_path):
    src, (m,), *_ = write_scene(tmp_path)
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(src).save(inp / "a.png")
    Image.fromarray(src[:, ::-1].copy()).save(inp / "a.mask.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(m.astype(np.uint8) * 255).save(masks / "a.png")
    Image.fromarray(m[:, ::-1].astype(np.uint8) * 255).save(masks / "a.mask.png")
    rules = tmp_path / "rules.yaml"
    rules.write_text("classes: [{name: box}]\nrules:\n  - match: {class: box}\n"
                     "    actions: [{displace: {x: 10, fill: classical}}]\n")
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", str(inp), "--rules", str(rules), "--mask", str(masks), "--class", "box",
                            "--out", str(out), "--config", str(tiny_dir / "settings.yaml")], terminal_width=200)
    assert r.exit_code == 0, r.output
    a, am = json.loads((out / "a.json").read_text()), json.loads((out / "a_mask.json").read_text())
    assert a["input"]["name"] == "a.png" and am["input"]["name"] == "a.mask.png"
    assert a["outputs"]["edit_mask"] == "a.mask.png" and am["outputs"]["image"] == "a_mask.png"
    # each record's files are its own: a.mask.png is a.png's edit mask, not the other input's result
    assert Image.open(out / "a.mask.png").mode == "L" and Image.open(out / "a_mask.png").mode == "RGB"
    for rec, src_arr in ((a, src), (am, src[:, ::-1])):
        edit = np.asarray(Image.open(out / rec["outputs"]["edit_mask"])) > 0
        assert int(edit.sum()) == rec["edit_pixels"] > 0
        res = np.asarray(Image.open(out / rec["outputs"]["image"]).convert("RGB"))
        assert np.array_equal(res[~edit], src_arr[~edit])
    assert a["product_mask"]["file"].endswith("a.png") and am["product_mask"]["file"].endswith("a.mask.png")


def test_a_missing_mask_fails_that_input_only(tiny_dir, tmp_path):
    src, (m,), scene_file, mask_file = write_scene(tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(m.astype(np.uint8) * 255).save(masks / "scene.png")
    Image.fromarray(src).save(tmp_path / "other.png")
    rules = tmp_path / "rules.yaml"
    rules.write_text("classes: [{name: box}]\nrules:\n  - match: {class: box}\n    actions: [{displace: {x: 5, fill: classical}}]\n")
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", str(scene_file), str(tmp_path / "other.png"), "--rules", str(rules), "--mask",
                            str(masks), "--class", "box", "--out", str(out), "--config", str(tiny_dir / "settings.yaml")],
                      terminal_width=200)
    assert r.exit_code == 4, r.output
    assert json.loads((out / "scene.json").read_text())["status"] == "edited"
    rec = json.loads((out / "failed" / "other.json").read_text())
    assert rec["stage"] == "mask" and "no mask for other.png" in rec["error"]


def _bug(*a, **k):
    raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")


def test_internal_error_in_a_run_is_recorded_with_its_type_and_the_run_goes_on(tiny_dir, tmp_path, monkeypatch, caplog):
    src, (m,), scene_file, mask_file = write_scene(tmp_path)
    monkeypatch.setitem(OPERATIONS, "displace", Operation("displace", DisplaceParams, _bug, moves=True))
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR, logger="product_studio.run"):
        r = runner.invoke(app, ["edit", "displace", str(scene_file), "--x", "5", "--class", "box", "--mask",
                                str(mask_file), "--out", str(out), "--config", str(tiny_dir / "settings.yaml")],
                          terminal_width=200)
    assert r.exit_code == 4, r.output
    rec = json.loads((out / "failed" / "scene-displace.json").read_text())
    assert rec["error"].startswith("internal error: ValueError: operands could not be broadcast")
    assert rec["error_type"] == "ValueError" and rec["stage"] == "internal"
    assert "Traceback" in caplog.text and "_bug" in caplog.text


def test_internal_error_in_the_daemon_is_retried_then_failed_with_its_type(tiny_settings, registry, tmp_path,
                                                                          monkeypatch, caplog):
    from daemon.config import DaemonSettings
    from daemon.service import Daemon
    from helpers import time_limit, wait_for

    src, (m,), *_ = write_scene(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = tiny_settings.model_copy(deep=True)
    settings.paths.inbox, settings.paths.outbox = inbox, tmp_path / "outbox"
    settings.base_dir = tmp_path
    rules = tmp_path / "rules.yaml"
    rules.write_text("classes: [{name: box}]\nrules:\n  - match: {class: box}\n    actions: [{displace: {x: 5}}]\n")
    monkeypatch.setitem(OPERATIONS, "displace", Operation("displace", DisplaceParams, _bug, moves=True))

    class Proc(Processor):
        def warm_up(self):
            return {}

    def factory():
        from pipeline.run.rules import load_rules

        return Proc(settings, load_rules(rules, settings), registry=registry, detector=TwoProducts([m], ("box",)))

    ds = DaemonSettings(settle_seconds=0.2, rescan_seconds=1.0, retry_backoff_seconds=0.05, max_attempts=3,
                        rules_poll_seconds=0.2, status_interval_seconds=0.2, stop_grace_seconds=10.0)
    d = Daemon(settings, factory, ds, rules_path=rules)
    with time_limit(90), caplog.at_level(logging.WARNING):
        d.start()
        try:
            Image.fromarray(src).save(inbox / "photo.png")
            wait_for(lambda: (settings.paths.outbox / "failed" / "photo.json").exists(), 60, "failed record")
        finally:
            d.stop(10.0)
    rec = json.loads((settings.paths.outbox / "failed" / "photo.json").read_text())
    assert rec["error"].startswith("internal error after 3 attempts: ValueError: operands could not be broadcast")
    assert rec["error_type"] == "ValueError" and rec["attempts"] == 3
    assert "Traceback" in caplog.text and "_bug" in caplog.text
