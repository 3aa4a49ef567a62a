"""Shop outputs: background, frame (a size change the QA gate proves), output formats, profiles,
the compliance check and the `check` command, and the report in headless Chromium."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw
from typer.testing import CliRunner

from cli.app import app
from pipeline.ops.actions import parse_action
from pipeline.ops.edits import Edit
from pipeline.ops.frame import frame, plan_transform
from pipeline.run.qa import Step, check
from pipeline.io.samples import _backdrop
from pipeline.settings import FrameSettings, Settings
from tests.edit_helpers import run_action, run_op

runner = CliRunner()


def _scene(tmp_path, size=(640, 480), box=(250, 180, 390, 360)):
    """A product photo on a grey gradient (JPEG) and its exact mask (PNG)."""
    img = _backdrop(*size, 5)
    ImageDraw.Draw(img).rectangle(box, fill=(150, 90, 40))
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    img.save(tmp_path / "scene.jpg", quality=92)
    m.save(tmp_path / "scene_mask.png")
    return tmp_path / "scene.jpg", tmp_path / "scene_mask.png"


def _arr(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------------
# frame and the QA gate through a size change


def test_frame_at_scale_one_copies_the_product_exactly_and_pads_with_the_colour():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), np.uint8))
    mask = np.zeros((100, 200), bool)
    mask[20:60, 50:90] = True  # 40x40 box; fill 0.5 -> an 80x80 frame at scale 1
    s = FrameSettings(aspect="1:1", fill=0.5, pad_color="#00FF00")
    edit = frame(img, mask, "box", s)
    tr = edit.transform
    assert edit.image.size == (80, 80) and tr.scale == (1.0, 1.0) and not tr.resampled
    out = np.asarray(edit.image)
    src = np.asarray(img)
    ys, xs = np.nonzero(edit.product_mask)
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (20, 20, 59, 59)  # centred
    assert np.array_equal(out[20:60, 20:60], src[20:60, 50:90])  # the product, bit for bit
    placed = tr.placed()
    assert np.array_equal(out[placed], np.asarray(tr.apply(src))[placed])
    assert not edit.edit_mask.any()
    # the frame reaches past the input's top (y0 = 20 - 20 = 0) exactly; nothing padded there
    rep = check(src, out, [Step("frame", "box", 0, src, edit)], [edit.product_mask], ["box"])
    assert rep.passed, rep.failures()


def test_frame_pads_beyond_the_input_in_the_pad_colour():
    img = Image.fromarray(np.full((50, 50, 3), 7, np.uint8))
    mask = np.zeros((50, 50), bool)
    mask[0:10, 0:10] = True  # at the corner: the frame reaches outside the input
    edit = frame(img, mask, "box", FrameSettings(aspect="1:1", fill=0.25, pad_color="#FF0000"))
    out = np.asarray(edit.image)
    assert out.shape == (40, 40, 3)
    assert (out[:15, :15] == (255, 0, 0)).all() and (out[15:25, 15:25] == 7).all()


def test_qa_refuses_a_frame_that_did_more_than_its_transform():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 60, 3), np.uint8))
    mask = np.zeros((60, 60), bool)
    mask[20:40, 20:40] = True
    edit = frame(img, mask, "box", FrameSettings(aspect="1:1", fill=0.5, min_long_side=100))
    assert edit.transform.resampled and edit.image.size == (100, 100)
    src = np.asarray(img)
    ok = check(src, np.asarray(edit.image), [Step("frame", "box", 0, src, edit)], [edit.product_mask], ["box"])
    assert ok.passed, ok.failures()
    bad = np.asarray(edit.image).copy()
    bad[5, 5] ^= 1  # one padding pixel off
    forged = Edit(Image.fromarray(bad), edit.edit_mask, edit.product_mask, {}, transform=edit.transform)
    rep = check(src, bad, [Step("frame", "box", 0, src, forged)], [edit.product_mask], ["box"])
    assert not rep.passed
    geo = next(c for c in rep.checks if c["name"] == "geometry")
    assert not geo["passed"] and "1 pixel(s)" in geo["reason"]


def test_frame_upscale_refused_by_policy():
    img = Image.new("RGB", (100, 100), (9, 9, 9))
    mask = np.zeros((100, 100), bool)
    mask[40:60, 40:60] = True
    from pipeline.ops.edits import EditError

    with pytest.raises(EditError, match="scaled up x"):
        frame(img, mask, "box", FrameSettings(min_long_side=1600, upscale="refuse"))
    tr = plan_transform(mask, FrameSettings(min_long_side=1600, fill=0.85))
    ys, xs = np.nonzero(tr.mask(mask))
    assert tr.out_size == (1600, 1600) and abs(tr.scale[0] - 68.0) < 0.01  # 20 px -> 1360 px = 85% of 1600
    assert abs((xs.max() + 1 - xs.min()) - 1360) <= 1 and abs((ys.max() + 1 - ys.min()) - 1360) <= 1


# ------------------------------------------------------------------------------------------------
# background


def test_background_white_keeps_product_pixels_and_composes_after_enhance(tiny_settings, registry, tmp_path):
    scene, mask_path = _scene(tmp_path, size=(160, 120), box=(50, 30, 100, 90))
    out = run_op(tiny_settings, scene, "background", label="box", out_dir=tmp_path / "o", mask_path=mask_path,
                 registry=registry)
    assert out.status == "edited", out.record.get("error")
    src = np.asarray(Image.open(scene).convert("RGB"))
    res = _arr(out.image_path)
    m = np.asarray(Image.open(mask_path)) > 0
    assert np.array_equal(res[m], src[m])
    far = ~np.asarray(Image.fromarray(m).filter(__import__("PIL.ImageFilter").ImageFilter.MaxFilter(5)))
    assert (res[far] == 255).all()
    # enhance, then put on white: a chain through the one runner
    s = tiny_settings.model_copy(deep=True)
    s.enhance.steps, s.enhance.strength = 2, 1.0
    from pipeline.run.process import Processor
    from pipeline.run.rules import rules_from_dict

    proc = Processor(s, rules_from_dict({"classes": [{"name": "box"}], "rules": []}, s), registry=registry)
    acts = [parse_action("enhance", {"seed": 1}, s), parse_action("background", {"shadow": "contact"}, s)]
    rec = proc.process(scene, tmp_path / "chain", stem="c", actions=acts, mask=mask_path, product_class="box")
    assert rec["status"] == "edited" and rec["qa"]["passed"], rec.get("error")
    assert [a["op"] for a in rec["actions"]] == ["enhance", "background"]
    shadow = rec["actions"][1]["record"]["shadow"]
    assert shadow["kind"] == "contact" and shadow["opacity"] == 0.35
    res = _arr(tmp_path / "chain" / "c.png")
    assert res[95, 75].max() < 255  # the contact shadow under the base


def test_background_generate_keeps_product_pixels_bit_identical(tiny_settings, registry, tmp_path):
    scene, mask_path = _scene(tmp_path, size=(128, 96), box=(40, 30, 90, 80))
    out = run_op(tiny_settings, scene, "background", label="box", out_dir=tmp_path / "o", mask_path=mask_path,
                 registry=registry, options={"mode": "generate", "steps": 2, "seed": 3, "prompt": "{label} on marble"})
    assert out.status == "edited", out.record.get("error")
    src = np.asarray(Image.open(scene).convert("RGB"))
    res = _arr(out.image_path)  # PNG
    m = np.asarray(Image.open(mask_path)) > 0
    assert np.array_equal(res[m], src[m])
    assert (res[~m] != src[~m]).any(axis=-1).mean() > 0.5  # a new scene around it
    gen = out.edit["generate"]
    assert gen["prompt"] == "box on marble" and gen["seed"] == 3 and gen["controlnet"] is True


def test_background_transparent_writes_rgba_png(tiny_settings, tmp_path):
    img = Image.fromarray(np.full((40, 40, 3), 90, np.uint8))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    edit = run_action("background", img, mask, "box", {"mode": "transparent", "edge": 0}, tiny_settings, None)
    assert edit.alpha is not None and (edit.alpha[mask] == 255).all() and (edit.alpha[~mask] == 0).all()


# ------------------------------------------------------------------------------------------------
# profiles, formats, compliance, CLI


def test_run_background_amazon_main_profile_then_check(tmp_path):
    """The issue's 'done means': JPEG on pure white, product fills 85% (within 1%), long side
    >= 1600, record says passed; `check` on the input photo fails with the figures."""
    scene, mask_path = _scene(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["edit", "background", str(scene), "--mask", str(mask_path), "--class", "box",
                            "--profile", "amazon-main", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "scene-background.json").read_text())
    (prof,) = rec["profiles"]
    assert prof["file"] == "scene-background.amazon-main.jpg" and rec["outputs"]["profiles"] == [prof["file"]]
    assert prof["output"]["format"] == "JPEG" and prof["output"]["lossy"] is True and prof["qa"]["passed"]
    assert prof["check"]["passed"] and rec["checks_passed"] is True
    f = out / prof["file"]
    im = Image.open(f)
    assert im.format == "JPEG" and max(im.size) >= 1600
    res = np.asarray(im.convert("RGB"))
    # the product's box in the output, from the record; pure white outside it (beyond JPEG's 8 px block)
    x0, y0, x1, y1 = prof["product"]["box"]
    assert abs(max((x1 - x0) / im.width, (y1 - y0) / im.height) - 0.85) <= 0.01
    outside = np.ones(res.shape[:2], bool)
    outside[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8] = False
    assert (res[outside] == 255).all()
    man = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert man[-1]["checks"]["amazon-main"]["passed"] is True
    assert "amazon-main" in (out / "report.html").read_text()
    # the input photo fails, with the figures
    r = runner.invoke(app, ["check", str(scene), "--profile", "amazon-main", "--mask", str(mask_path)])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "long side 640 px" in r.output and "fills 37.7%" in r.output
    r = runner.invoke(app, ["check", str(f), "--profile", "amazon-main", "--mask", str(out / "m")])
    assert r.exit_code == 4  # no mask there: cannot check


def test_check_passes_a_compliant_image_and_measures_borders(tmp_path):
    from pipeline.ops.compliance import measure
    from pipeline.ops.profiles import get_profile

    img = np.full((1700, 1700, 3), 255, np.uint8)
    img[100:1545, 300:1400] = (30, 60, 90)
    m = np.zeros((1700, 1700), bool)
    m[100:1545, 300:1400] = True
    Image.fromarray(img).save(tmp_path / "ok.png")
    Image.fromarray(m).save(tmp_path / "ok_mask.png")
    c = measure(tmp_path / "ok.png", m, get_profile("amazon-main", Settings()).check)
    assert c["passed"], c["failures"]
    assert c["figures"]["fill"] == 0.85 and c["figures"]["background_share"] == 1.0
    img[:, :6] = (0, 0, 0)  # a black border on the left
    Image.fromarray(img).save(tmp_path / "border.png")
    c = measure(tmp_path / "border.png", m, get_profile("amazon-main", Settings()).check)
    assert not c["passed"] and c["figures"]["borders"]["left"] == 6
    r = runner.invoke(app, ["check", str(tmp_path / "ok.png"), "--profile", "amazon-main", "--mask",
                            str(tmp_path / "ok_mask.png")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fmt,lossy", [("png", False), ("webp", True), ("avif", True), ("tiff", False)])
def test_output_formats_and_srgb_conversion(tmp_path, fmt, lossy):
    from pipeline.io.outputs import encode_image
    from pipeline.settings import OutputSettings

    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 48, 3), np.uint8))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    adobe_like = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rec = encode_image(img, None, tmp_path, f"x.{fmt}", OutputSettings(format=fmt, srgb=True), adobe_like)
    assert rec["lossy"] is lossy and rec["format"] == fmt.upper() and rec["icc"] == "sRGB"
    back = Image.open(tmp_path / f"x.{fmt}")
    assert back.format == fmt.upper() and back.size == (48, 32)
    if not lossy:
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    rec = encode_image(img, None, tmp_path, f"y.{fmt}", OutputSettings(format=fmt, metadata="strip"), adobe_like)
    assert rec["icc"] == "none" and not Image.open(tmp_path / f"y.{fmt}").info.get("icc_profile")
    assert icc  # a non-RGB profile is never embedded (only RGB ones describe these pixels)


def test_rules_can_emit_several_profiles(tiny_settings, tmp_path):
    from pipeline.run.process import Processor
    from pipeline.run.rules import rules_from_dict
    from pipeline.settings import SettingsError

    scene, mask_path = _scene(tmp_path, size=(640, 480), box=(200, 60, 400, 420))
    rules = {"classes": [{"name": "box"}],
             "rules": [{"match": {"class": "box"}, "actions": [{"background": {"mode": "blur"}}],
                        "profiles": ["amazon-main", "shopify"]}]}
    proc = Processor(tiny_settings, rules_from_dict(rules, tiny_settings), registry=object(), detector=object())
    rec = proc.process(scene, tmp_path / "o", mask=mask_path, product_class="box")
    assert rec["status"] == "edited", rec.get("error")
    assert rec["outputs"]["profiles"] == ["scene.amazon-main.jpg", "scene.shopify.webp"]
    shop = Image.open(tmp_path / "o" / "scene.shopify.webp")
    assert shop.size == (2048, 2048) and shop.format == "WEBP"
    assert all(p["check"]["passed"] for p in rec["profiles"]), [p["check"]["failures"] for p in rec["profiles"]]
    with pytest.raises(SettingsError, match="unknown profile 'ebay'"):
        rules_from_dict({"classes": [{"name": "box"}], "rules": [{"match": {"class": "box"}, "profiles": ["ebay"]}]},
                        tiny_settings)


# ------------------------------------------------------------------------------------------------
# the report in a real browser


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (.ci/run installs it)")
def test_report_in_headless_chromium_shows_profiles_and_failures(tmp_path):
    scene, mask_path = _scene(tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(mask_path, masks / "scene.png")
    shutil.copy(mask_path, masks / "scene2.png")
    shutil.copy(scene, tmp_path / "scene2.jpg")
    cfg = tmp_path / "s.yaml"
    cfg.write_text("profiles:\n  strict:\n    frame: {aspect: '1:1', fill: 0.5}\n"
                   "    check: {min_long_side: 5000}\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["edit", "background", str(scene), str(tmp_path / "scene2.jpg"), "--mask",
                            str(masks), "--class", "box", "--profile", "amazon-main", "--profile", "strict",
                            "--out", str(out), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "check failed" in r.output and "long side 362 px (at least 5000)" in r.output
    report = out / "report.html"
    probe = out / "probe.html"
    # What a person sees: every image loaded, a row per input, failed checks drawn in red.
    probe.write_text(report.read_text().replace("</body>", """<script>
addEventListener('load', () => setTimeout(() => {
  const imgs = [...document.images];
  const fails = [...document.querySelectorAll('.check.fail')];
  const r = {images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
             rows: document.querySelectorAll('tr.input-row').length,
             fails: fails.length, visible_fails: fails.filter(f => f.offsetHeight > 0 &&
               getComputedStyle(f).color === 'rgb(165, 14, 14)').length,
             text: document.body.innerText};
  document.title = 'RESULT' + JSON.stringify(r);
}, 200));
</script></body>"""))
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", f"--user-data-dir={tmp_path / 'prof'}",
                           "--virtual-time-budget=5000", "--allow-file-access-from-files", "--dump-dom",
                           probe.as_uri()], check=True, timeout=120, capture_output=True, text=True)
    title = proc.stdout.split("<title>RESULT", 1)[1].split("</title>", 1)[0]
    import html

    r = json.loads(html.unescape(title))
    assert r["rows"] == 2
    assert r["images"] >= 2 * (3 + 2) and r["loaded"] == r["images"]
    assert r["fails"] == 2 and r["visible_fails"] == 2  # 'strict' fails for both, drawn in red
    assert "2 profile check(s) failed" in r["text"]
    assert "amazon-main" in r["text"] and "long side" in r["text"]


# ------------------------------------------------------------------------------------------------
# more: transparency, chains through a size change, the upscaler, sRGB from another RGB profile


def test_transparent_background_writes_an_rgba_png_through_the_runner(tmp_path):
    scene, mask_path = _scene(tmp_path, size=(160, 120), box=(50, 30, 100, 90))
    out = tmp_path / "o"
    r = runner.invoke(app, ["edit", "background", str(scene), "--mask", str(mask_path), "--class", "box",
                            "--param", "mode=transparent", "--param", "edge=0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    im = Image.open(out / "scene-background.png")
    assert im.mode == "RGBA"
    a = np.asarray(im)
    m = np.asarray(Image.open(mask_path)) > 0
    assert (a[..., 3][m] == 255).all() and (a[..., 3][~m] == 0).all()
    assert np.array_equal(a[..., :3][m], np.asarray(Image.open(scene).convert("RGB"))[m])
    rec = json.loads((out / "scene-background.json").read_text())
    assert rec["output"]["alpha"] == "kept" and rec["output"]["lossy"] is False


def test_frame_then_displace_chain_passes_qa_through_the_size_change(tiny_settings, tmp_path):
    from pipeline.run.process import Processor
    from pipeline.run.rules import rules_from_dict

    scene, mask_path = _scene(tmp_path, size=(200, 150), box=(60, 40, 100, 100))
    s = tiny_settings
    proc = Processor(s, rules_from_dict({"classes": [{"name": "box"}], "rules": []}, s), registry=object(),
                     detector=object())
    acts = [parse_action("frame", {"aspect": "1:1", "fill": 0.5}, s),
            parse_action("displace", {"x": 10, "y": 0, "fill": {"backend": "classical", "recheck": False}}, s)]
    rec = proc.process(scene, tmp_path / "o", stem="c", actions=acts, mask=mask_path, product_class="box")
    assert rec["status"] == "edited", rec.get("error")
    assert rec["qa"]["passed"] and {c["name"] for c in rec["qa"]["checks"]} >= {"geometry", "moved_product_identical"}
    res = _arr(tmp_path / "o" / "c.png")
    assert res.shape == (122, 122, 3)  # the 41 x 61 px product at 50% of the height -> 122 x 122
    src = np.asarray(Image.open(scene).convert("RGB"))
    # framed at scale 1 (product box at x 40..81, y 30..91), then moved 10 px right: bit-identical
    assert np.array_equal(res[30:91, 50:91], src[40:101, 60:101])
    assert rec["products"][0]["box"] == [50, 30, 91, 91]


def test_frame_with_the_upscaler_role_records_it_and_marks_the_region_edited(tiny_settings, registry, tmp_path):
    img = Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 40, 3), np.uint8))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    s = FrameSettings(aspect="1:1", fill=0.5, min_long_side=100, upscale="upscaler")
    edit = frame(img, mask, "box", s, registry)
    assert edit.image.size == (100, 100) and edit.record["upscaled_by"]["method"] == "upscaler"
    assert edit.record["upscaled_by"]["passes"] >= 1 and edit.edit_mask.sum() == edit.transform.placed().sum()
    src = np.asarray(img)
    rep = check(src, np.asarray(edit.image), [Step("frame", "box", 0, src, edit)], [edit.product_mask], ["box"])
    assert rep.passed, rep.failures()


def _rgb_icc(desc: str) -> bytes:
    """A minimal ICC v2 RGB display profile: Adobe-RGB-like primaries (D50-adapted), gamma 2.2."""
    import struct

    def s15(v):
        return struct.pack(">i", int(round(v * 65536)))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    d = desc.encode("ascii") + b"\0"
    tags = [(b"desc", b"desc" + b"\0" * 4 + struct.pack(">I", len(d)) + d + b"\0" * 4 + b"\0" * 4 + b"\0" * 3 + b"\0" * 67),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)), (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)),
            (b"bXYZ", xyz(0.1492, 0.0632, 0.7446)),
            (b"rTRC", b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(2.2 * 256)) + b"\0\0")]
    tags += [(b"gTRC", tags[-1][1]), (b"bTRC", tags[-1][1]), (b"cprt", b"text" + b"\0" * 4 + b"none\0\0\0\0")]
    table, data = b"", b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
    header += b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 8 + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


def test_srgb_conversion_from_another_rgb_profile(tmp_path):
    from pipeline.io.imageio import colour_space
    from pipeline.io.outputs import encode_image
    from pipeline.settings import OutputSettings

    icc = _rgb_icc("Wide RGB test")
    assert colour_space(icc) == "Wide RGB test"
    img = Image.fromarray(np.array([[[100, 150, 50], [128, 128, 128]]], np.uint8))
    rec = encode_image(img, None, tmp_path, "a.png", OutputSettings(format="png", srgb=True), icc)
    assert rec["colour"] == "converted from 'Wide RGB test' to sRGB" and rec["icc"] == "sRGB"
    back = Image.open(tmp_path / "a.png")
    assert colour_space(back.info.get("icc_profile")) == "sRGB"
    px = np.asarray(back.convert("RGB"))
    assert not np.array_equal(px, np.asarray(img))  # the wide green is more saturated in sRGB terms
    assert px[0, 0, 1] > 150 and px[0, 0, 0] < 100
    rec = encode_image(img, None, tmp_path, "b.png", OutputSettings(format="png", srgb=False), icc)
    assert rec["colour"] == "as the input" and np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(img))


def test_check_detects_the_product_when_no_mask_is_given(tiny_dir, tmp_path):
    scene, _ = _scene(tmp_path)
    r = runner.invoke(app, ["check", str(scene), "--profile", "amazon-main", "--profile", "google-shopping",
                            "--config", str(tiny_dir / "settings.yaml")])
    # The tiny random detector finds something (noise); the photo fails amazon-main on size either way.
    assert r.exit_code == 1, r.output
    assert "amazon-main" in r.output and "long side 640 px (at least 1600)" in r.output
    r = runner.invoke(app, ["check", str(scene), "--profile", "ebay"])
    assert r.exit_code == 2 and "unknown profile 'ebay'" in r.output


def test_background_blur_image_and_drop_shadow_keep_the_product(tiny_settings, tmp_path):
    rng = np.random.default_rng(5)
    src = rng.integers(0, 255, (60, 80, 3), np.uint8)
    img = Image.fromarray(src)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:50] = True
    Image.fromarray(np.full((30, 30, 3), (10, 200, 30), np.uint8)).save(tmp_path / "backdrop.png")
    s = tiny_settings.model_copy(deep=True)
    s.base_dir = tmp_path
    blur = run_action("background", img, mask, "box", {"mode": "blur", "blur_radius": 5}, s, None)
    backdrop = run_action("background", img, mask, "box", {"mode": "image", "image": "backdrop.png", "edge": 0}, s, None)
    drop = run_action("background", img, mask, "box", {"shadow": "drop", "shadow_blur": 0, "edge": 0}, s, None)
    for e in (blur, backdrop, drop):
        out = np.asarray(e.image)
        assert np.array_equal(out[mask], src[mask]) and np.array_equal(e.edit_mask, ~mask)
    b = np.asarray(blur.image)
    assert b[~mask].std() < src[~mask].std() / 3  # blurred
    assert (np.asarray(backdrop.image)[~mask] == (10, 200, 30)).all()
    d = np.asarray(drop.image)
    off = drop.record["shadow"]["offset_px"]
    # product rows 20..39, cols 30..49; its silhouette 1 px down-right: row 40 and column 50 are shadow
    assert off == [1, 1] and (d[40, 35] < 255).all() and (d[35, 50] < 255).all()
    assert (d[19, 35] == 255).all() and (d[35, 29] == 255).all() and (d[41, 35] == 255).all()
