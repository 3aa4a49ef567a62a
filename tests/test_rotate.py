"""Rotate: pixels outside the old and new product regions (and their rings) stay bit-identical,
the new product lands where the anchor rule says, limits and warnings, the licence rule,
segment-only without angles, pre-processing, upscale and matte, and the tiny models end to end."""

import json
import math

import cv2

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.io.composite import bbox, dilate
from pipeline.ops.edits import EditError
from pipeline.ops.matte import matte, rough_mask
from pipeline.models.registry import ModelRegistry
from edit_helpers import run_action
from pipeline.errors import ParamsError
from pipeline.ops.rotate import _seamless, place_box, prepare_input, rotate
from pipeline.settings import ModelSource, RotateSettings, SettingsError, load_settings

H, W = 90, 120
OBJ = (0, 0, 255)  # the stand-in view's object colour; nothing else in the scenes is this blue




def scene(cx=50, cy=45, rx=14, ry=20, seed=0):
    """Textured background (blue channel kept low) with a red ellipse "product"; (PIL RGB, mask)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    img[..., 2] //= 3
    yy, xx = np.mgrid[:H, :W]
    m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    img[m] = (200, 30, 30)
    return Image.fromarray(img, "RGB"), m


class StandIn:
    """Injected novel view: a blue rectangle of ``w`` x ``h`` at (x, y) on white, whatever the pose."""

    def __init__(self, w=20, h=40, x=10, y=8, size=64):
        self.box = (x, y, x + w, y + h)
        self.size = size
        self.calls = []

    def __call__(self, image, **kw):
        self.calls.append((image.copy(), kw))
        a = np.full((kw["size"], kw["size"], 3), 255, np.uint8)
        x0, y0, x1, y1 = self.box
        a[y0:y1, x0:x1] = OBJ
        return Image.fromarray(a, "RGB")


def params(fill="classical", **kw):
    base = dict(steps=2, view_size=64, upscale="off", matte_refine=False, feather=3, seed=0,
                fill=dict(backend=fill, mask_dilation=6, blend=2, resolution=64))
    base.update(kw)
    return RotateSettings(**base)


def blue_box(out):
    """Box of the pasted product: the pixels that are exactly the view's object colour (alpha 1;
    the feather ring outside it is a blend)."""
    return bbox((np.asarray(out) == OBJ).all(axis=2))


def expected_box(old_box, w, h, anchor="bottom-center", scale_by="height"):
    """The anchor rule, computed independently of rotate.place_box."""
    ox0, oy0, ox1, oy1 = old_box
    ow, oh = ox1 - ox0, oy1 - oy0
    s = min(ow / w, oh / h) if anchor == "keep-box" else (oh / h if scale_by == "height" else ow / w)
    nw, nh = round(w * s), round(h * s)
    cx = (ox0 + ox1) / 2
    x0 = cx - nw / 2
    if anchor == "center":
        y0 = (oy0 + oy1) / 2 - nh / 2
    else:
        y0 = oy1 - nh
    return (x0, y0, x0 + nw, y0 + nh)


def check_guarantees(edit, img, m, p):
    src = np.asarray(img)
    out = np.asarray(edit.image)
    assert edit.image.size == img.size and edit.image.mode == "RGB"
    assert np.array_equal(out[~edit.edit_mask], src[~edit.edit_mask])
    # Independent bound: the old region dilated by the hole dilation, and the new box grown by
    # the widest ring (feather or the matte's soft edge) plus a pixel of rounding.
    nb = edit.record["placement"]["new_box"]
    box = np.zeros((H, W), bool)
    box[max(0, nb[1]):max(0, nb[3]), max(0, nb[0]):max(0, nb[2])] = True
    ring = max(p.feather, 2 * p.matte_edge + 1) + 2
    allowed = dilate(m, p.fill.mask_dilation) | dilate(box, ring)
    assert not (edit.edit_mask & ~allowed).any()
    assert edit.record["edit_pixels"] == int(edit.edit_mask.sum())
    json.dumps(edit.record)


# ------------------------------------------------------------------------------------------------
# Guarantees and placement (stand-in view)


@pytest.mark.parametrize("anchor, scale_by", [("bottom-center", "height"), ("center", "height"),
                                              ("bottom-center", "width"), ("keep-box", "height")])
def test_placement_follows_the_anchor_rule_and_pixels_outside_stay_identical(anchor, scale_by):
    img, m = scene()
    view = StandIn(w=20, h=40)
    p = params(anchor=anchor, scale_by=scale_by)
    e = rotate(img, m, "handbag", 30.0, -10.0, p, None, view_fn=view)
    check_guarantees(e, img, m, p)
    want = expected_box(bbox(m), 20, 40, anchor, scale_by)
    got = blue_box(e.image)
    assert got is not None
    assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)
    rec = e.record
    assert rec["placement"]["anchor"] == anchor and not rec["placement"]["clipped"]
    assert all(abs(g - w) <= 1 for g, w in zip(rec["placement"]["new_box"], want))
    if anchor == "keep-box":
        ob = bbox(m)
        assert got[0] >= ob[0] - 1 and got[1] >= ob[1] - 1 and got[2] <= ob[2] + 1 and got[3] <= ob[3] + 1
    # The stand-in saw the pre-processed input and the pose / sampler settings.
    (inp, kw), = view.calls
    assert inp.size == (64, 64) and kw["polar"] == -10.0 and kw["azimuth"] == 30.0 and kw["steps"] == 2
    assert rec["pose"]["embedding"] == [round(math.radians(-10), 4), 0.5, round(math.cos(math.radians(30)), 4), 0.0]


def test_the_new_product_is_opaque_inside_and_old_product_is_gone():
    img, m = scene()
    p = params(feather=0)
    e = rotate(img, m, "handbag", 45.0, 0.0, p, None, view_fn=StandIn(w=16, h=40))
    out = np.asarray(e.image)
    gx0, gy0, gx1, gy1 = blue_box(e.image)
    # Inside (away from the resampled edge) the product is exactly the view's colour.
    assert (out[gy0 + 2 : gy1 - 2, gx0 + 2 : gx1 - 2] == OBJ).all()
    # Where the narrower new product does not cover the old one, the old red is filled away.
    red = (out[..., 0] > 180) & (out[..., 1] < 50) & (out[..., 2] < 50)
    assert not (red & m).any()
    check_guarantees(e, img, m, p)


def test_product_near_the_frame_is_clipped_and_guarantees_hold():
    img, m = scene(cx=108, cy=60, rx=10, ry=25)
    p = params(anchor="center", scale_by="height")
    e = rotate(img, m, "handbag", 20.0, 0.0, p, None, view_fn=StandIn(w=60, h=30))
    assert e.record["placement"]["clipped"] and e.record["placement"]["share_outside"] > 0
    check_guarantees(e, img, m, p)


def test_poisson_blend_runs_and_keeps_the_guarantees():
    img, m = scene()
    p = params(poisson=True)
    e = rotate(img, m, "handbag", -30.0, 5.0, p, None, view_fn=StandIn())
    assert e.record["composite"]["poisson"] is True
    check_guarantees(e, img, m, p)
    want = expected_box(bbox(m), 20, 40)
    got = e.record["placement"]["new_box"]
    assert all(abs(g - w) <= 1 for g, w in zip(got, want))


def test_seamless_clone_keeps_the_source_in_place():
    dst = np.full((50, 70, 3), 120, np.uint8)
    src = dst.copy()
    src[10:30, 5:25] = (250, 250, 250)  # touches nothing; the mask reaches the left frame edge
    mask = np.zeros((50, 70), bool)
    mask[6:34, 0:29] = True
    out = _seamless(src, dst, mask)
    bright = out.astype(int).sum(axis=2) > 3 * 200
    assert bbox(bright) == (5, 10, 25, 30)
    assert np.array_equal(out[~dilate(mask, 1)], dst[~dilate(mask, 1)])


def test_place_box_rule():
    assert place_box((10, 20, 30, 60), 10, 20, "bottom-center", "height") == ((10, 20, 30, 60), 2.0)
    (x0, y0, x1, y1), s = place_box((10, 20, 30, 60), 20, 20, "bottom-center", "height")
    assert (x0, y0, x1, y1) == (0, 20, 40, 60) and s == 2.0
    assert place_box((10, 20, 30, 60), 20, 20, "center", "width")[0] == (10, 30, 30, 50)
    assert place_box((10, 20, 30, 60), 20, 20, "keep-box", "height")[0] == (10, 40, 30, 60)
    with pytest.raises(ValueError, match="anchor"):
        place_box((0, 0, 2, 2), 1, 1, "top-left", "height")


# ------------------------------------------------------------------------------------------------
# Pre-processing, matte, upscale


def _zero123_reference_view(img: Image.Image, mask: np.ndarray) -> np.ndarray:
    """Zero123's reference preprocessing (cvlab-columbia/zero123, ldm/util.py load_and_preprocess),
    with our mask in place of its background remover: product on white, cropped to its box,
    shrunk to a 200 px long side (PIL thumbnail), pasted centred on a 256 px white square."""
    rgb = np.asarray(img).copy()
    rgb[~mask] = 255
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    crop = Image.fromarray(rgb[y:y + h, x:x + w])
    crop.thumbnail([200, 200], Image.Resampling.LANCZOS)
    out = Image.new("RGB", (256, 256), (255, 255, 255))
    out.paste(crop, ((256 - crop.width) // 2, (256 - crop.height) // 2))
    return np.asarray(out)


@pytest.mark.parametrize("box", [(40, 60, 440, 360), (100, 20, 250, 470), (10, 10, 310, 310)])
def test_default_framing_matches_zero123_reference(box):
    """rotate.crop_padding's default puts the product where Zero123's reference demo does: its
    long side at 200/256 (0.78) of the 256 px view, centred."""
    from pipeline.settings import RotateSettings

    x0, y0, x1, y1 = box
    img = Image.new("RGB", (480, 480), (30, 120, 200))
    mask = np.zeros((480, 480), bool)
    mask[y0:y1, x0:x1] = True
    arr = np.asarray(img).copy()
    arr[mask] = (200, 40, 40)
    img = Image.fromarray(arr)
    settings = RotateSettings()
    view, _ = prepare_input(img, mask, settings.view_size, settings.crop_padding)
    ours = bbox(rough_mask(np.asarray(view), 24))
    ref = bbox(rough_mask(_zero123_reference_view(img, mask), 24))
    assert max(ref[2] - ref[0], ref[3] - ref[1]) == 200
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1, (ours, ref)


def test_prepare_input_centres_the_product_on_white():
    img, m = scene()
    view, rec = prepare_input(img, m, 64, 0.2)
    a = np.asarray(view)
    assert view.size == (64, 64) and view.mode == "RGB"
    x0, y0, x1, y1 = bbox(m)
    assert rec["box"] == [x0, y0, x1, y1] and rec["square"] == math.ceil(max(x1 - x0, y1 - y0) * 1.4)
    fg = rough_mask(a, 24)
    fx0, fy0, fx1, fy1 = bbox(fg)
    assert abs((fx0 + fx1) / 2 - 32) <= 1.5 and abs((fy0 + fy1) / 2 - 32) <= 1.5
    # The long side fills 1 / 1.4 of the square; the corners are pure white background.
    assert abs((fy1 - fy0) - 64 / 1.4) <= 2
    assert (a[:3, :3] == 255).all() and (a[-3:, -3:] == 255).all()
    # The background of the photo never enters the model input.
    assert not ((a[..., 0] < 150) & fg).sum() > 0.05 * fg.sum()


def test_matte_of_a_white_background_view():
    a = np.full((80, 80, 3), 255, np.uint8)
    a[20:60, 30:50] = (10, 120, 200)
    a[35:45, 37:43] = 255          # a white detail inside the object belongs to it
    a[5, 5] = (0, 0, 0)            # a speck is dropped
    a[70:72, 10:12] = (240, 240, 240)  # faint grey noise is background
    mt = matte(Image.fromarray(a), edge=1, cleanup=1)
    assert mt.mask.dtype == bool and mt.alpha.dtype == np.float32
    assert bbox(mt.mask) == (30, 20, 50, 60) and mt.mask[40, 40] and not mt.mask[5, 5]
    assert mt.alpha.min() >= 0 and mt.alpha.max() <= 1
    assert (mt.alpha[mt.mask] >= 0.5).all() and (mt.alpha[~dilate(mt.mask, 1)] == 0).all()
    assert (mt.alpha[22:58, 32:48] == 1).all()
    # Edge colours are the object's own, not blends with white.
    assert (mt.rgb[19, 30:50] == (10, 120, 200)).all()
    assert matte(Image.new("RGB", (32, 32), "white")).mask.sum() == 0


def test_matte_with_sam_records_the_refinement(registry):
    a = np.full((64, 64, 3), 255, np.uint8)
    a[16:48, 20:44] = (30, 160, 60)
    mt = matte(Image.fromarray(a), registry=registry)
    ref = mt.record["refine"]
    assert ref["method"] == "sam" and 0.0 <= ref["iou_with_colour_mask"] <= 1.0
    assert mt.mask.any() and (ref["used"] or "reason" in ref)


def test_upscale_gives_exactly_scale_times_the_size(registry):
    from pipeline.ops.upscale import upscale, upscale_factor

    s = upscale_factor(registry)
    for size in [(17, 23), (32, 32), (40, 24)]:
        im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        out = upscale(im, registry)
        assert out.mode == "RGB" and out.size == (size[0] * s, size[1] * s)


# ------------------------------------------------------------------------------------------------
# Limits, warnings, licence


def test_out_of_range_angles_are_refused_with_the_range():
    img, m = scene()
    with pytest.raises(ValueError, match=r"azimuth 200 degrees is outside -180\.\.180"):
        rotate(img, m, "handbag", 200.0, 0.0, params(), None, view_fn=StandIn())
    with pytest.raises(ValueError, match=r"polar 100 degrees is outside -90\.\.90"):
        rotate(img, m, "handbag", 0.0, 100.0, params(), None, view_fn=StandIn())
    with pytest.raises(ValueError, match=r"outside -45\.\.45"):
        rotate(img, m, "handbag", 0.0, -50.0, params(max_polar=45), None, view_fn=StandIn())
    with pytest.raises(EditError, match="mask is empty"):
        rotate(img, np.zeros((H, W), bool), "handbag", 10.0, 0.0, params(), None, view_fn=StandIn())


@pytest.mark.parametrize("azimuth, warned", [(89.0, False), (90.0, True), (-135.0, True), (180.0, True)])
def test_large_azimuth_adds_a_warning(azimuth, warned):
    img, m = scene()
    e = rotate(img, m, "handbag", azimuth, 0.0, params(), None, view_fn=StandIn())
    ws = e.record["warnings"]
    assert isinstance(ws, list) and all(isinstance(w, str) for w in ws)
    assert any("azimuth" in w for w in ws) == warned


def test_a_view_without_object_is_refused():
    img, m = scene()
    blank = lambda image, **kw: Image.new("RGB", (kw["size"], kw["size"]), "white")  # noqa: E731
    with pytest.raises(EditError, match="no object"):
        rotate(img, m, "handbag", 10.0, 0.0, params(), None, view_fn=blank)


def _licenced_registry(tiny_settings, commercial_use, commercial):
    s = tiny_settings.model_copy(deep=True)
    s.commercial_use = commercial_use
    nv = s.models.novel_view
    s.models.novel_view = ModelSource(path=nv.path, licence="CC BY-NC 4.0 (test)", commercial=commercial)
    return ModelRegistry(s)


def test_commercial_use_refuses_a_non_commercial_model(tiny_settings):
    img, m = scene()
    reg = _licenced_registry(tiny_settings, True, False)
    with pytest.raises(EditError) as ei:
        rotate(img, m, "handbag", 10.0, 0.0, params(), reg)
    msg = str(ei.value)
    assert "novel_view" in msg and "non-commercial" in msg and "commercial_use" in msg and "CC BY-NC" in msg
    assert not reg.is_loaded("novel_view")  # refused before any work


def test_licence_is_recorded_and_unknown_licences_warn(tiny_settings):
    img, m = scene()
    # Not for commercial use: a non-commercial model runs, and the record names model and licence.
    e = rotate(img, m, "handbag", 10.0, 0.0, params(), _licenced_registry(tiny_settings, False, False))
    nv = e.record["models"]["novel_view"]
    assert nv["licence"] == "CC BY-NC 4.0 (test)" and nv["commercial"] is False and nv["source"]
    assert e.record["licence"] == {"commercial_use": False, "novel_view": "CC BY-NC 4.0 (test)"}
    assert not e.record["warnings"]
    # Commercial use with a licence nobody confirmed: runs, with a warning naming the role.
    e = rotate(img, m, "handbag", 10.0, 0.0, params(), _licenced_registry(tiny_settings, True, None))
    assert any("'novel_view'" in w and "not confirmed" in w for w in e.record["warnings"])
    e = rotate(img, m, "handbag", 10.0, 0.0, params(), _licenced_registry(tiny_settings, True, True))
    assert not e.record["warnings"]


def test_settings_file_carries_licence_flags(tiny_dir, tmp_path):
    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["commercial_use"] = True
    data["models"]["novel_view"]["commercial"] = False
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(data))
    s = load_settings(cfg)
    assert s.commercial_use is True and s.models.novel_view.commercial is False
    assert s.models.clip.commercial is None
    data["rotate"]["anchor"] = "top"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(SettingsError, match="rotate.anchor"):
        load_settings(cfg)


# ------------------------------------------------------------------------------------------------
# the rotate action: segment only, options


def test_no_angles_only_segments(tiny_settings):
    img, m = scene()
    e = run_action("rotate", img, m, "handbag", {"fill": "classical", "seed": 3}, tiny_settings, None)
    assert np.array_equal(np.asarray(e.image), np.asarray(img))
    assert e.edit_mask.shape == (H, W) and not e.edit_mask.any()
    rec = e.record
    assert rec["segment_only"] is True and rec["mask_pixels"] == int(m.sum())
    assert rec["mask_area"] == round(m.sum() / (H * W), 4) and rec["box"] == list(bbox(m))
    assert rec["warnings"] == []


def test_op_rotate_parses_options_and_overrides(tiny_settings, registry):
    img, m = scene()
    e = run_action("rotate", img, m, "handbag", {"azimuth": "-100", "fill": "classical", "seed": 5, "upscale": "off",
                                      "matte_refine": False}, tiny_settings, registry)
    rec = e.record
    assert rec["pose"]["azimuth"] == -100.0 and rec["pose"]["polar"] == 0.0
    assert rec["fill"]["used"] == "classical" and rec["novel_view"]["seed"] == 5
    assert any("azimuth" in w for w in rec["warnings"])
    with pytest.raises(ParamsError, match="azimuth: .*valid number"):
        run_action("rotate", img, m, "handbag", {"azimuth": "left"}, tiny_settings, registry)
    with pytest.raises(ParamsError, match="polar: rotate: polar 120 degrees is outside"):
        run_action("rotate", img, m, "handbag", {"polar": 120.0}, tiny_settings, registry)


# ------------------------------------------------------------------------------------------------
# Tiny models end to end


@pytest.mark.parametrize("fill", ["classical", "sd", "lama"])
def test_tiny_models_end_to_end(registry, fill):
    img, m = scene()
    p = params(fill=fill, upscale="always", matte_refine=True)
    e = rotate(img, m, "handbag", 0.0, 0.0, p, registry)  # azimuth 0 / polar 0 runs too
    check_guarantees(e, img, m, p)
    rec = e.record
    assert rec["upscale"]["used"] and rec["upscale"]["factor"] == 4 and rec["upscale"]["size"] == [256, 256]
    assert rec["matte"]["refine"]["method"] == "sam" and rec["novel_view"]["generator"] == "zero123"
    roles = {"novel_view", "upscaler", "sam"} | {"sd": {"inpaint"}, "lama": {"inpaint_fill"}}.get(fill, set())
    assert set(rec["models"]) == roles
    assert all(rec["models"][r]["licence"] for r in roles) and rec["models"]["novel_view"]["source"]
    assert rec["fill"]["used"] == fill and rec["pose"]["embedding"] == [0.0, 0.0, 1.0, 0.0]
    # Same seed, same bytes.
    again = rotate(img, m, "handbag", 0.0, 0.0, p, registry)
    assert np.array_equal(np.asarray(e.image), np.asarray(again.image))
    assert np.array_equal(e.edit_mask, again.edit_mask)


def test_run_op_rotate_writes_outputs_and_warnings(tiny_settings, registry, tmp_path):
    from edit_helpers import run_op

    img, m = scene()
    img.save(tmp_path / "p.png")
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    out = tmp_path / "out"
    o = run_op(tiny_settings, tmp_path / "p.png", "rotate", label="handbag", out_dir=out,
               options={"azimuth": 120.0, "polar": 10.0, "fill": "classical"}, mask_path=tmp_path / "m.png",
               registry=registry)
    assert o.status == "edited", o.record.get("error")
    res = np.asarray(Image.open(out / "p-rotate.png").convert("RGB"))
    edit = np.asarray(Image.open(out / "p-rotate.mask.png")) > 0
    assert np.array_equal(res[~edit], np.asarray(img)[~edit])
    rec = json.loads((out / "p-rotate.json").read_text())
    e = rec["actions"][0]["record"]
    assert any("azimuth" in w for w in e["warnings"]) and e["models"]["novel_view"]["licence"]
    assert rec["qa"]["passed"] and rec["products"][0]["pixels"] > 0
    # Segment only (no angles): unchanged image, empty edit mask.
    o = run_op(tiny_settings, tmp_path / "p.png", "rotate", label="handbag", out_dir=out / "seg",
               options={}, mask_path=tmp_path / "m.png", registry=registry)
    assert o.status == "edited" and o.edit["segment_only"]
    assert np.array_equal(np.asarray(Image.open(out / "seg" / "p-rotate.png").convert("RGB")), np.asarray(img))
    assert not (np.asarray(Image.open(out / "seg" / "p-rotate.mask.png")) > 0).any()
    # Out of range: refused when the options are read, naming the range.
    with pytest.raises(ParamsError, match="-180..180"):
        run_op(tiny_settings, tmp_path / "p.png", "rotate", label="handbag", out_dir=out / "bad",
               options={"azimuth": 270.0}, mask_path=tmp_path / "m.png", registry=registry)


def test_rotate_settings_validation():
    with pytest.raises(ValueError, match="steps=3 x strength=0.2"):
        RotateSettings(fill={"backend": "sd", "steps": 3, "strength": 0.2})
    RotateSettings(fill={"backend": "classical", "steps": 3, "strength": 0.2})
    for bad in (dict(max_polar=120), dict(radius=0.7), dict(view_size=100), dict(anchor="left"),
                dict(upscale="yes"), dict(eta=2.0)):
        with pytest.raises(ValueError):
            RotateSettings(**bad)


def test_cli_run_rotate_prints_warnings_and_segments_without_angles(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    img, m = scene()
    img.save(tmp_path / "p.png")
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    base = ["edit", "rotate", str(tmp_path / "p.png"), "--class", "handbag", "--mask", str(tmp_path / "m.png"),
            "--config", str(tiny_dir / "settings.yaml")]
    r = CliRunner().invoke(app, [*base, "--azimuth", "-120", "--polar", "15", "--fill", "classical", "--seed", "2",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "azimuth" in r.output
    rec = json.loads((tmp_path / "o" / "p-rotate.json").read_text())["actions"][0]["record"]
    assert rec["novel_view"]["seed"] == 2 and rec["pose"]["azimuth"] == -120.0
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "p-rotate.json").read_text())["actions"][0]["record"]["segment_only"] is True
    r = CliRunner().invoke(app, [*base, "--polar", "95", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--polar" in r.output and "-90..90" in r.output
