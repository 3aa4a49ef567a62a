"""LaMa fill backend (``fill: lama``) and fill orders: the tiny TorchScript module with LaMa's
contract, written with torch.jit.save in the real file layout and loaded by the registry with
torch.jit.load; padding to the network's multiple; the crop at the photo's scale; exact pixels
outside the hole; the re-check on every backend and the fallback chain; settings, CLI, records."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from pipeline.io.composite import dilate, shift_mask
from pipeline.ops.displace import displace
from pipeline.ops.inpaint import LAMA_MULTIPLE, fill, fill_in_order, lama_inpaint, plan_crop
from pipeline.models.registry import ModelLoadError, ModelRegistry
from pipeline.settings import (DisplaceSettings, FillSettings, RotateSettings, Settings, SettingsError, fill_order,
                               load_settings)

H, W = 75, 101  # deliberately not multiples of 8


def F(backend="sd", **kw):
    """A fill with no dilation, blend or retries unless given (the tests name what they use)."""
    return FillSettings(**{"backend": backend, "mask_dilation": 0, "blend": 0, "retries": 0, **kw})


def scene(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    m = np.zeros((H, W), bool)
    m[20:43, 30:57] = True
    img[m] = (200, 30, 30)
    return Image.fromarray(img, "RGB"), m


class Recorder(torch.nn.Module):
    """Wraps the loaded LaMa module and keeps the shapes and value sets it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, image, mask):
        self.calls.append({"image": tuple(image.shape), "mask": tuple(mask.shape), "dtype": (image.dtype, mask.dtype),
                           "image_range": (float(image.min()), float(image.max())),
                           "mask_values": sorted(set(mask.unique().tolist()))})
        return self.inner(image, mask)


class Scripted:
    """Injected checker: a fixed score per backend (looked up from the fill record order)."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0

    def __call__(self, image, region_mask, label):
        self.calls += 1
        return self.scores.pop(0)


def registry_with(tiny_settings, **models):
    s = tiny_settings.model_copy(deep=True)
    for role, src in models.items():
        setattr(s.models, role, src)
    return ModelRegistry(s)


# ------------------------------------------------------------------------------------------------
# the model file and its loading


def test_tiny_lama_is_torchscript_in_the_real_layout(tiny_dir, registry):
    f = tiny_dir / "inpaint_fill" / "big-lama.pt"
    assert f.is_file()
    import zipfile

    assert zipfile.is_zipfile(f)  # torch.jit.save's archive, as the published big-lama.pt
    model = registry.get("inpaint_fill")
    assert isinstance(model, torch.jit.ScriptModule)
    info = registry.verify("inpaint_fill")
    assert info["dtype"] == "float32" and info["parameters"] > 0
    # LaMa's contract: image [0, 1] Bx3xHxW, mask {0, 1} Bx1xHxW -> Bx3xHxW in [0, 1], known pixels kept
    x = torch.rand(2, 3, 32, 48)
    k = (torch.rand(2, 1, 32, 48) > 0.5).float()
    with torch.no_grad():
        y = model(x, k)
    assert y.shape == (2, 3, 32, 48) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert torch.equal(y[k.expand_as(y) == 0], x[k.expand_as(x) == 0])
    with pytest.raises(Exception):  # it downsamples three times: sides must be multiples of 8
        model(torch.rand(1, 3, 30, 42), torch.zeros(1, 1, 30, 42))


def test_sha256_is_checked_before_loading(tiny_settings):
    src = tiny_settings.models.inpaint_fill
    assert src.sha256 and len(src.sha256) == 64
    bad = src.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="SHA-256") as ei:
        registry_with(tiny_settings, inpaint_fill=bad).get("inpaint_fill")
    assert ei.value.role == "inpaint_fill" and src.sha256 in str(ei.value)


def test_sha256_must_be_64_hex_digits(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("models:\n  inpaint_fill:\n    path: x.pt\n    sha256: abc\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    assert "models.inpaint_fill.sha256" in [f for f, _, _ in ei.value.problems]


def test_default_source_records_the_canonical_file():
    src = Settings().models.inpaint_fill
    assert src.filename == "big-lama.pt" and src.licence == "Apache-2.0"
    assert src.sha256 == "344c77bbcb158f17dd143070d1e789f38a66c04202311ae3a258ef66667a9ea9"


# ------------------------------------------------------------------------------------------------
# one LaMa pass: padding, crop, exact pixels


def test_lama_inpaint_pads_to_the_multiple_and_crops_back(registry):
    rec = Recorder(registry.get("inpaint_fill"))
    img, m = scene()
    mask = Image.fromarray((m * 255).astype(np.uint8), "L")
    out = lama_inpaint(rec, img, mask)
    assert out.size == img.size and out.mode == "RGB"
    call = rec.calls[0]
    assert call["image"] == (1, 3, 80, 104) and call["mask"] == (1, 1, 80, 104)
    assert call["dtype"] == (torch.float32, torch.float32)
    assert 0.0 <= call["image_range"][0] and call["image_range"][1] <= 1.0 and call["mask_values"] == [0.0, 1.0]
    # the tiny module passes known pixels through: the uint8 round trip is exact there
    assert (np.asarray(out)[~m] == np.asarray(img)[~m]).all()
    assert not (np.asarray(out)[m] == np.asarray(img)[m]).all()


def test_plan_crop_native_keeps_the_photo_scale():
    c = plan_crop((30, 20, 57, 43), (W, H), margin=0.5, resolution=1024, native=True)
    assert c.work_size == c.size and c.box == (16, 8, 71, 55)
    # a crop longer than the resolution is scaled down exactly as the SD planner does
    big = plan_crop((30, 20, 57, 43), (W, H), margin=0.5, resolution=32, native=True)
    assert big == plan_crop((30, 20, 57, 43), (W, H), margin=0.5, resolution=32)
    assert max(big.work_size) == 32 and all(v % LAMA_MULTIPLE == 0 for v in big.work_size)


@pytest.mark.parametrize("lama_resolution, scaled", [(1024, False), (32, True)])
def test_lama_fill_changes_nothing_outside_the_dilated_hole(registry, lama_resolution, scaled):
    img, m = scene()
    # below the settings' floor of 64 px (model_copy does not validate): this small scene's crop must scale
    fs = F("lama", mask_dilation=5, blend=2).model_copy(update={"lama_resolution": lama_resolution})
    out, rec = fill(img, m, fs, registry)
    hole = dilate(m, 5)
    src, res = np.asarray(img), np.asarray(out)
    assert (res[~hole] == src[~hole]).all()
    assert (res[m] != src[m]).any(axis=-1).mean() > 0.9  # the red block is replaced
    assert rec["backend"] == "lama" and (rec["scale"] == 1.0) != scaled
    if not scaled:
        assert rec["crop"]["work_size"] == [rec["crop"]["box"][2] - rec["crop"]["box"][0],
                                            rec["crop"]["box"][3] - rec["crop"]["box"][1]]
        assert all(v % LAMA_MULTIPLE == 0 for v in rec["padded_size"])
    else:
        assert max(rec["crop"]["work_size"]) == 32
    json.dumps(rec)


def test_lama_fill_is_deterministic(registry):
    img, m = scene()
    a, _ = fill(img, m, F("lama", mask_dilation=4), registry)
    b, _ = fill(img, m, F("lama", mask_dilation=4), registry, seed=99)  # no randomness: the seed is unused
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# fill orders, the re-check on every backend


def test_fill_order_forms():
    assert fill_order("lama") == ["lama", "classical"] and fill_order("classical") == ["classical"]
    assert fill_order(["lama", "sd"]) == ["lama", "sd"]
    assert DisplaceSettings(fill=["lama", "sd", "classical"]).fill.backend == ["lama", "sd", "classical"]
    for bad, msg in [("magic", "unknown fill backend"), ([], "empty"), (["lama", "lama"], "repeats"),
                     (["lama", "x"], "'x'"), (3, "FillSettings")]:
        with pytest.raises(ValueError, match=msg):
            DisplaceSettings(fill=bad)
    with pytest.raises(ValueError, match="steps=3 x strength=0.2"):
        RotateSettings(fill={"backend": ["lama", "sd"], "steps": 3, "strength": 0.2})
    RotateSettings(fill={"backend": ["lama", "classical"], "steps": 3, "strength": 0.2})


def test_settings_file_takes_a_list_and_names_the_field(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("displace:\n  fill: [lama, sd, classical]\nrotate:\n  fill: lama\n")
    s = load_settings(p)
    assert s.displace.fill.backend == ["lama", "sd", "classical"] and s.rotate.fill.backend == "lama"
    assert s.rotate.fill.recheck is False and s.displace.fill.recheck is True  # each section's own defaults
    p.write_text("displace:\n  seed: 3\n  fill: [lama, paint]\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    (field, reason, line), = ei.value.problems
    assert field == "displace.fill" and "'paint'" in reason and line == 3  # named as written


def test_first_passing_backend_wins_and_the_rest_are_not_needed(registry):
    img, m = scene()
    chk = Scripted([0.1])
    got = fill_in_order(img, m, F(["lama", "sd", "classical"], recheck_threshold=0.5, mask_dilation=4, steps=2,
                                  resolution=64), label="box", checker=chk, registry=registry)
    r = got.record
    assert got.backend == r["used"] == "lama" and chk.calls == 1 and not r["fallback"]
    assert r["skipped"] == {"sd": "not needed: lama passed the check", "classical": "not needed: lama passed the check"}
    alone, _ = fill(img, m, F("lama", mask_dilation=4), registry)
    assert np.array_equal(np.asarray(got.image), np.asarray(alone))


def test_the_check_applies_to_every_backend_down_the_order(registry):
    img, m = scene()
    chk = Scripted([0.9, 0.8, 0.7, 0.2])  # lama fails, sd fails twice (retries=1), classical passes
    got = fill_in_order(img, m, F(["lama", "sd", "classical"], recheck_threshold=0.5, retries=1, mask_dilation=4,
                                  steps=2, resolution=64), label="box", checker=chk, seed=5, registry=registry)
    r = got.record
    assert chk.calls == 4 and [t["backend"] for t in r["tries"]] == ["lama", "sd", "sd", "classical"]
    assert r["used"] == "classical" and r["fallback"] and r["seeds"] == [5, 6] and r["scores"] == [0.9, 0.8, 0.7, 0.2]
    assert "still looked like 'box' after 1 attempt(s)" in r["skipped"]["lama"]
    assert "after 2 attempt(s)" in r["skipped"]["sd"] and "used the classical fill" in r["fallback_reason"]
    assert not r["still_there"] and "warning" not in r
    alone, _ = fill(img, m, F("classical", mask_dilation=4))
    assert np.array_equal(np.asarray(got.image), np.asarray(alone))


def test_nothing_passes_keeps_the_last_with_a_warning(registry):
    img, m = scene()
    got = fill_in_order(img, m, F(["lama", "classical"], mask_dilation=4), label="box", checker=lambda *_: 1.0,
                        registry=registry)
    r = got.record
    assert r["used"] == "classical" and r["still_there"] and "box" in r["warning"] and r["attempts"] == 2
    assert "lama" in r["skipped"] and "classical" not in r["skipped"]


def test_unavailable_model_is_skipped_in_a_list_and_an_error_alone(tiny_settings, tmp_path):
    from pipeline.settings import ModelSource

    reg = registry_with(tiny_settings, inpaint_fill=ModelSource(path=tmp_path / "missing.pt"))
    img, m = scene()
    got = fill_in_order(img, m, F(["lama", "classical"], mask_dilation=4), label="box", registry=reg)
    assert got.backend == "classical" and got.record["fallback"]
    assert got.record["skipped"]["lama"].startswith("model unavailable: local path does not exist")
    with pytest.raises(ModelLoadError, match="inpaint_fill"):
        fill_in_order(img, m, F("lama", mask_dilation=4), label="box", registry=reg)
    with pytest.raises(ModelLoadError):
        fill_in_order(img, m, F(["lama"], mask_dilation=4), label="box", registry=reg)
    # without any registry: skipped in a list, a ValueError alone
    got = fill_in_order(img, m, F(["lama", "sd", "classical"], mask_dilation=4), label="box")
    assert got.backend == "classical" and set(got.record["skipped"]) == {"lama", "sd"}
    assert "needs a model registry" in got.record["skipped"]["lama"]
    with pytest.raises(ValueError, match="registry"):
        fill_in_order(img, m, F("lama", mask_dilation=4), label="box")


# ------------------------------------------------------------------------------------------------
# the edits


def test_displace_with_lama_keeps_every_pixel_outside_old_and_new_regions(registry):
    img, m = scene()
    p = DisplaceSettings(fill=F("lama", recheck=False, mask_dilation=5, blend=2), feather=3, harmonize_ring=2)
    e = displace(img, m, "box", 30, 8, p, registry=registry)
    src, out = np.asarray(img), np.asarray(e.image)
    allowed = dilate(m, 5) | dilate(shift_mask(m, 30, 8), 3)
    assert (out[~allowed] == src[~allowed]).all() and (out[~e.edit_mask] == src[~e.edit_mask]).all()
    new = shift_mask(m, 30, 8)
    assert (out[new] == (200, 30, 30)).all()  # the moved product, exact
    f = e.record["fill"]
    assert f["used"] == "lama" and f["order"] == ["lama", "classical"] and e.record["harmonize"]["backend"] == "lama"
    assert f["checker"] is None and f["scores"] == [] and f["skipped"] == {"classical": "not needed: lama filled (no re-check)"}
    assert e.record["models"]["inpaint_fill"]["role"] == "inpaint_fill"
    json.dumps(e.record)


def test_rotate_with_a_lama_order_and_recheck(registry):
    from pipeline.ops.rotate import rotate

    img, m = scene()
    view = Image.new("RGB", (64, 64), "white")
    view.paste((30, 60, 200), (20, 16, 44, 48))
    p = RotateSettings(fill=F(["lama", "classical"], recheck=True, mask_dilation=5, blend=2), upscale="off",
                       matte_refine=False, steps=2, view_size=64)
    e = rotate(img, m, "box", 20.0, 0.0, p, registry, view_fn=lambda *a, **k: view)
    f = e.record["fill"]
    assert f["checker"] == "clip" and f["tries"][0]["backend"] == "lama" and "score" in f["tries"][0]
    assert f["used"] in ("lama", "classical") and "clip" in e.record["models"]
    src, out = np.asarray(img), np.asarray(e.image)
    assert (out[~e.edit_mask] == src[~e.edit_mask]).all()


# ------------------------------------------------------------------------------------------------
# the CLI: the "done" command on the tiny set


def test_run_displace_fill_lama_on_the_tiny_set(tiny_dir, tmp_path):
    rng = np.random.default_rng(3)
    src = np.clip(rng.normal(170, 20, (240, 320, 3)), 0, 255).astype(np.uint8)
    src[100:160, 60:120] = (40, 90, 160)
    Image.fromarray(src).save(tmp_path / "scene.jpg", quality=92)
    mask = np.zeros((240, 320), np.uint8)
    mask[100:160, 60:120] = 255
    Image.fromarray(mask).save(tmp_path / "scene_mask.png")
    src = np.asarray(Image.open(tmp_path / "scene.jpg").convert("RGB"))  # what the tool reads back
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["edit", "displace", str(tmp_path / "scene.jpg"), "--x", "120", "--y", "-20",
                                 "--mask", str(tmp_path / "scene_mask.png"), "--class", "box", "--fill", "lama",
                                 "--out", str(out), "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0, r.output
    res = np.asarray(Image.open(out / "scene-displace.png").convert("RGB"))
    s = load_settings(tiny_dir / "settings.yaml").displace
    m = mask > 0
    allowed = dilate(m, s.fill.mask_dilation) | dilate(shift_mask(m, 120, -20), max(s.feather, s.harmonize_ring))
    assert np.array_equal(res[~allowed], src[~allowed])
    rec = json.loads((out / "scene-displace.json").read_text())
    f = rec["actions"][0]["record"]["fill"]
    assert f["requested"] == "lama" and f["tries"][0]["backend"] == "lama" and f["used"] in f["order"]
    assert f["checker"] == "clip" and all(t.get("score") is not None for t in f["tries"])


def test_run_fill_option_takes_an_order_and_refuses_unknown_backends(tiny_dir, tmp_path):
    img = np.full((64, 80, 3), 150, np.uint8)
    img[20:40, 20:40] = (10, 200, 10)
    Image.fromarray(img).save(tmp_path / "p.png")
    Image.fromarray(((np.indices((64, 80))[0] // 20 == 1) & (np.indices((64, 80))[1] // 20 == 1)).astype(np.uint8)
                    * 255).save(tmp_path / "m.png")
    cfg = str(tiny_dir / "settings.yaml")
    base = ["edit", "displace", str(tmp_path / "p.png"), "--x", "20", "--class", "box",
            "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "o"), "--config", cfg]
    r = CliRunner().invoke(app, [*base, "--fill", "lama,sd,classical"])
    assert r.exit_code == 0, r.output
    f = json.loads((tmp_path / "o" / "p-displace.json").read_text())["actions"][0]["record"]["fill"]
    assert f["requested"] == ["lama", "sd", "classical"] and set(f["skipped"]) | {f["used"]} == set(f["order"])
    r = CliRunner().invoke(app, [*base, "--fill", "lama,paint"])
    assert r.exit_code == 2 and "paint" in r.output


def test_rules_take_a_fill_order(tmp_path):
    from pipeline.run.rules import load_rules

    def rules(fill):
        p = tmp_path / "rules.yaml"
        p.write_text(yaml.safe_dump({"version": 1, "rules": [
            {"name": "move", "match": {"class": "handbag"},
             "actions": [{"displace": {"x": 10, "y": 0, "fill": fill}}]}]}))
        return p

    rs = load_rules(rules(["lama", "classical"]), Settings())
    (action,), _ = rs.plan([type("D", (), {"label": "handbag", "score": 0.9, "mask": np.ones((4, 4), bool)})()],
                           (4, 4))
    assert action.action.params.settings.fill.backend == ["lama", "classical"]
    with pytest.raises(SettingsError) as ei:
        load_rules(rules(["lama", "paint"]), Settings())
    assert any("fill" in f and "'paint'" in r for f, r, _ in ei.value.problems)


def test_make_tiny_writes_the_lama_file(tmp_path):
    r = CliRunner().invoke(app, ["models", "make-tiny", str(tmp_path / "t"), "--role", "inpaint_fill"])
    assert r.exit_code == 0, r.output
    s = load_settings(tmp_path / "t" / "settings.yaml")
    assert s.resolve_path(s.models.inpaint_fill.path) == (tmp_path / "t" / "inpaint_fill" / "big-lama.pt").resolve()
    reg = ModelRegistry(s)
    assert isinstance(reg.get("inpaint_fill"), torch.jit.ScriptModule)
    shutil.rmtree(tmp_path / "t")


# ------------------------------------------------------------------------------------------------
# the bench, smoke-run on the tiny set


def test_fill_bench_times_every_backend_and_extrapolates_sd(tiny_dir):
    from bench.fill import hole_mask, run_fill

    r = run_fill(tiny_dir=tiny_dir, repeats=1, size=(96, 72), device="cpu", sd_steps=(1, 2))
    assert set(r["cases"]) == {"lama", "sd@1", "sd@2", "classical", "sd (extrapolated)"}
    assert all(len(r["cases"][c]["runs_s"]) == 1 for c in ("lama", "sd@1", "sd@2", "classical"))
    ex = r["cases"]["sd (extrapolated)"]
    assert ex["extrapolated"] and ex["steps"] == DisplaceSettings().fill.steps
    assert ex["median_s"] == pytest.approx(ex["fixed_s"] + ex["steps"] * ex["per_step_s"])
    assert r["ratios"]["sd/lama"]["value"] == pytest.approx(ex["median_s"] / r["cases"]["lama"]["median_s"])
    assert "extrapolated" in r["context"]["sd_cost_how"] and r["cases"]["lama"]["scale"] == 1.0
    m = hole_mask(1024, 768)
    ys, xs = np.nonzero(m)
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (307, 345)  # a product-sized hole
    json.dumps(r)
