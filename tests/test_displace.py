"""Displace: the two pixel guarantees for both fill backends, the out-of-frame policy, zero and
fractional offsets, the check-and-retry loop with an injected checker, SD determinism, records."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.io.composite import dilate, parse_offset, shift_image, shift_mask, bbox
from pipeline.detect.detector import Detection
from pipeline.ops.displace import ClipChecker, displace, displace_detection
from pipeline.ops.edits import Edit, EditError
from pipeline.settings import DisplaceSettings, SettingsError, load_settings, FillSettings

REPO = Path(__file__).resolve().parents[1]
H, W = 72, 96
BG = (90, 140, 60)




def product_mask(cx=30, cy=36, r=12):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def scene(flat=False, seed=0, **kw):
    """Textured (or flat) background with a patterned disc "product"; (PIL RGB, mask)."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), BG, np.uint8) if flat else rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    m = product_mask(**kw)
    yy, xx = np.mgrid[:H, :W]
    img[m] = np.stack([(xx * 7) % 256, (yy * 11) % 256, (xx * yy) % 256], axis=-1)[m].astype(np.uint8)
    return Image.fromarray(img, "RGB"), m


FILL_KEYS = set(FillSettings.model_fields)


def params(fill="classical", **kw):
    """Displace settings for the tests; fill fields (``recheck``, ``retries``, ...) go into ``fill``."""
    f = dict(backend=fill, steps=2, resolution=64, mask_dilation=6, blend=2, recheck=False)
    f.update({k: kw.pop(k) for k in list(kw) if k in FILL_KEYS})
    return DisplaceSettings(**{"feather": 3, "seed": 0, "fill": f, **kw})


class Scripted:
    """Injected checker: 'still there' (score 1.0) for the first ``n`` calls, then cleared (0.0)."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def __call__(self, image, region_mask, label):
        assert image.mode == "RGB" and region_mask.shape == (H, W) and label == "handbag"
        self.calls.append(image.copy())
        return 1.0 if len(self.calls) <= self.n else 0.0


def allowed_region(m, dx, dy, p):
    """Independent bound of what may change: old region dilated by mask_dilation, the new region
    dilated by max(feather, harmonize_ring), computed on a padded canvas (no clipping)."""
    P = abs(dx) + abs(dy) + 64
    big = np.zeros((H + 2 * P, W + 2 * P), bool)
    big[P:P + H, P:P + W] = m
    moved = np.roll(big, (dy, dx), axis=(0, 1))
    new = dilate(moved, max(p.feather, p.harmonize_ring))[P:P + H, P:P + W]
    return dilate(m, p.fill.mask_dilation) | new


def check_guarantees(edit, img, m, dx, dy, p):
    src = np.asarray(img)
    out = np.asarray(edit.image)
    assert isinstance(edit, Edit) and edit.image.mode == "RGB" and edit.image.size == img.size
    # 1. the pasted product equals the source product inside its un-feathered mask
    new_mask = shift_mask(m, dx, dy)
    assert (out[new_mask] == shift_image(src, dx, dy)[new_mask]).all()
    # 2. outside old + new regions and their rings, bit-identical to the input
    assert (out[~edit.edit_mask] == src[~edit.edit_mask]).all()
    allowed = allowed_region(m, dx, dy, p)
    assert not (edit.edit_mask & ~allowed).any()
    assert (out[~allowed] == src[~allowed]).all()
    json.dumps(edit.record)  # records are written as JSON


# ------------------------------------------------------------------------------------------------
# the guarantees, both backends


@pytest.mark.parametrize("ring", [0, 3])
@pytest.mark.parametrize("dx, dy", [(40, -5), (-20, 25), (8, 3)])
def test_classical_keeps_product_pixels_and_everything_outside(dx, dy, ring):
    img, m = scene()
    p = params(harmonize_ring=ring)
    edit = displace(img, m, "handbag", dx, dy, p)
    check_guarantees(edit, img, m, dx, dy, p)
    rec = edit.record
    assert rec["fill"]["used"] == "classical" and rec["fill"]["checker"] is None
    assert rec["offset"] == {"dx": dx, "dy": dy} and not rec["noop"]
    assert (rec["harmonize"] is None) == (ring == 0)
    # the old place no longer holds the product where the new one does not cover it
    src, out = np.asarray(img), np.asarray(edit.image)
    gone = m & ~dilate(shift_mask(m, dx, dy), p.feather + ring)
    assert gone.any() and (out[gone] != src[gone]).any(axis=-1).mean() > 0.9


@pytest.mark.parametrize("ring", [0, 3])
def test_sd_keeps_product_pixels_and_everything_outside(registry, ring):
    img, m = scene()
    p = params(fill="sd", harmonize_ring=ring)
    chk = Scripted(0)
    edit = displace(img, m, "handbag", 40, -5, p, registry=registry, checker=chk)
    check_guarantees(edit, img, m, 40, -5, p)
    rec = edit.record
    assert rec["fill"]["used"] == "sd" and rec["fill"]["seeds"] == [0] and rec["fill"]["attempts"] == 1
    assert rec["fill"]["checker"] == "custom" and rec["fill"]["scores"] == [0.0]
    assert rec["models"]["inpaint"]["role"] == "inpaint" and "clip" not in rec["models"]
    if ring:
        assert rec["harmonize"]["backend"] == "sd" and rec["harmonize"]["fill"]["seed"] == 0


def test_the_sd_fill_takes_the_inpaint_lock_enhance_takes(registry):
    """enhance switches LoRA adapters on the inpaint UNet under registry.lock("inpaint"); the SD
    fill shares that UNet, so it waits for the lock (a classical fill never does)."""
    import threading

    img, m = scene()
    registry.get("inpaint")  # loaded up front: the wait below is the lock's, not a load's
    results: dict[str, Edit] = {}
    started = {k: threading.Event() for k in ("sd", "classical")}

    def run(fill):
        started[fill].set()
        results[fill] = displace(img, m, "handbag", 40, -5, params(fill=fill), registry=registry)

    threads = {k: threading.Thread(target=run, args=(k,)) for k in started}
    with registry.lock("inpaint"):
        for t in threads.values():
            t.start()
        threads["classical"].join(timeout=60)
        assert "classical" in results
        assert started["sd"].wait(10)
        threads["sd"].join(timeout=1.0)
        assert threads["sd"].is_alive() and "sd" not in results  # held up by the lock
    threads["sd"].join(timeout=120)
    assert results["sd"].record["fill"]["used"] == "sd"
    alone = displace(img, m, "handbag", 40, -5, params(fill="sd"), registry=registry)
    assert (np.asarray(alone.image) == np.asarray(results["sd"].image)).all()


def test_flat_background_classical_fill_is_flat():
    img, m = scene(flat=True)
    p = params(harmonize_ring=0)
    edit = displace(img, m, "handbag", 45, 0, p)
    out = np.asarray(edit.image).astype(int)
    new_region = dilate(shift_mask(m, 45, 0), p.feather)
    hole = dilate(m, p.fill.mask_dilation) & ~new_region
    assert hole.sum() > 500
    assert np.abs(out[hole] - np.array(BG)).max() <= 1
    check_guarantees(edit, img, m, 45, 0, p)


def test_feather_brings_no_old_surroundings_along():
    """A solid blue product on a red patch, moved onto flat green-grey: its soft edge mixes blue
    and the new background only (no red halo), and its own pixels stay exact."""
    img, m = scene(flat=True)
    arr = np.asarray(img).copy()
    arr[dilate(m, 3) & ~m] = (255, 0, 0)  # old surroundings, inside the hole (dilation 6, blend 2)
    arr[m] = (20, 20, 220)
    img = Image.fromarray(arr, "RGB")
    edit = displace(img, m, "handbag", 45, 0, params(feather=3))
    out = np.asarray(edit.image).astype(int)
    new_mask = shift_mask(m, 45, 0)
    band = dilate(new_mask, 3) & ~new_mask
    lo = np.minimum(BG, (20, 20, 220))
    hi = np.maximum(BG, (20, 20, 220))
    assert ((out[band] >= lo) & (out[band] <= hi)).all()
    assert (out[band] != np.array(BG)).any(axis=-1).all()  # it is a soft edge, not a hard cut
    assert (out[new_mask] == (20, 20, 220)).all()
    assert edit.record["paste"]["blend_pixels"] == int(band.sum())
    # and the hole, red patch included, is filled with the flat background
    hole = dilate(m, 6) & ~dilate(new_mask, 3)
    assert np.abs(out[hole] - np.array(BG)).max() <= 1


# ------------------------------------------------------------------------------------------------
# out of frame, zero and fractional offsets


def test_partly_out_of_frame_is_clipped():
    img, m = scene(cx=80)  # r = 12: a shift of +20 puts most of the disc past the right border
    p = params(out_of_frame="clip", max_outside_share=0.1)
    edit = displace(img, m, "handbag", 20, 0, p)
    share = 1 - shift_mask(m, 20, 0).sum() / m.sum()
    oof = edit.record["out_of_frame"]
    assert oof["clipped"] and oof["share_outside"] == pytest.approx(share, abs=1e-4) and share > 0.5
    assert edit.record["paste"]["pasted_pixels"] == int(shift_mask(m, 20, 0).sum())
    check_guarantees(edit, img, m, 20, 0, p)


def test_refuse_beyond_the_allowed_share_with_a_clear_message():
    img, m = scene(cx=80)
    with pytest.raises(EditError) as ei:
        displace(img, m, "handbag", 20, 0, params(out_of_frame="refuse", max_outside_share=0.25))
    msg = str(ei.value)
    assert "handbag" in msg and "outside" in msg and "25%" in msg and "max_outside_share" in msg
    # under the limit it goes ahead (clipped)
    edit = displace(img, m, "handbag", 5, 0, params(out_of_frame="refuse", max_outside_share=0.25))
    assert 0 < edit.record["out_of_frame"]["share_outside"] <= 0.25


def test_wholly_out_of_frame():
    img, m = scene()
    p = params(out_of_frame="clip")
    edit = displace(img, m, "handbag", -W, 0, p)  # clip: the product is removed
    assert edit.record["out_of_frame"]["share_outside"] == 1.0
    assert edit.record["paste"]["pasted_pixels"] == 0 and edit.record["paste"]["blend_pixels"] == 0
    assert (edit.edit_mask == dilate(m, p.fill.mask_dilation)).all()
    check_guarantees(edit, img, m, -W, 0, p)
    with pytest.raises(EditError, match="100%"):
        displace(img, m, "handbag", 0, H + 5, params(out_of_frame="refuse", max_outside_share=0.99))


def test_zero_offset_is_a_no_op():
    img, m = scene()
    # sd backend and no registry: a no-op must not need (or load) any model
    edit = displace(img, m, "handbag", 0, 0, params(fill="sd", recheck=True))
    assert (np.asarray(edit.image) == np.asarray(img)).all()
    assert edit.edit_mask.shape == (H, W) and not edit.edit_mask.any()
    assert edit.record["noop"] is True and "zero offset" in edit.record["reason"]
    json.dumps(edit.record)


def test_fractional_offsets_equal_their_pixel_counterparts():
    img, m = scene()
    dx, dy = parse_offset("25%", W), parse_offset("-0.1", H)
    assert (dx, dy) == (24, -7)
    a = displace(img, m, "handbag", dx, dy, params())
    b = displace(img, m, "handbag", 24, -7, params())
    assert (np.asarray(a.image) == np.asarray(b.image)).all() and (a.edit_mask == b.edit_mask).all()


# ------------------------------------------------------------------------------------------------
# check and retry


def test_retry_until_the_checker_clears(registry):
    img, m = scene()
    chk = Scripted(2)
    edit = displace(img, m, "handbag", 40, 0, params(fill="sd", retries=3, seed=7), registry=registry, checker=chk)
    f = edit.record["fill"]
    assert f["seeds"] == [7, 8, 9] and f["attempts"] == 3 and len(chk.calls) == 3
    assert f["scores"] == [1.0, 1.0, 0.0] and f["used"] == "sd" and not f["fallback"] and not f["still_there"]
    assert edit.record["models"]["inpaint"]["role"] == "inpaint"
    # each retry really is a different fill (another seed)
    assert not (np.asarray(chk.calls[0]) == np.asarray(chk.calls[1])).all()
    # the kept fill is the seed-9 one: the same as a run starting at seed 9 that clears at once
    direct = displace(img, m, "handbag", 40, 0, params(fill="sd", retries=0, seed=9), registry=registry,
                      checker=Scripted(0))
    assert (np.asarray(edit.image) == np.asarray(direct.image)).all()


def test_never_clears_falls_back_to_classical(registry):
    img, m = scene()
    retries = 2
    chk = Scripted(retries + 1)  # "still there" for every SD attempt, clear for the classical one
    p = params(fill="sd", retries=retries, seed=3, harmonize_ring=2)
    edit = displace(img, m, "handbag", 40, 0, p, registry=registry, checker=chk)
    f = edit.record["fill"]
    assert f["seeds"] == [3, 4, 5] and f["attempts"] == retries + 2 and len(chk.calls) == retries + 2
    assert f["used"] == "classical" and f["fallback"] is True and "classical" in f["fallback_reason"]
    assert [t["backend"] for t in f["tries"]] == ["sd", "sd", "sd", "classical"]
    assert f["scores"] == [1.0, 1.0, 1.0, 0.0] and not f["still_there"]
    assert edit.record["harmonize"]["backend"] == "classical"
    check_guarantees(edit, img, m, 40, 0, p)
    # the result is exactly what the classical backend gives
    classical = displace(img, m, "handbag", 40, 0, params(fill="classical", harmonize_ring=2))
    assert (np.asarray(edit.image) == np.asarray(classical.image)).all()


def test_still_there_after_the_fallback_is_a_warning_not_a_failure(registry):
    img, m = scene()
    edit = displace(img, m, "handbag", 40, 0, params(fill="sd", retries=0), registry=registry,
                    checker=lambda *_: 0.9)
    f = edit.record["fill"]
    assert f["attempts"] == 2 and f["fallback"] and f["still_there"] and "handbag" in f["warning"]


def test_recheck_threshold_decides(registry):
    img, m = scene()
    p = params(fill="sd", recheck_threshold=0.7)
    low = displace(img, m, "handbag", 40, 0, p, registry=registry, checker=lambda *_: 0.69)
    assert low.record["fill"]["attempts"] == 1
    high = displace(img, m, "handbag", 40, 0, p, registry=registry, checker=lambda *_: 0.7)
    assert high.record["fill"]["fallback"]


def test_sd_same_seed_same_output(registry):
    img, m = scene()
    p = params(fill="sd", seed=11)
    a = displace(img, m, "handbag", 30, 5, p, registry=registry, checker=Scripted(0))
    b = displace(img, m, "handbag", 30, 5, p, registry=registry, checker=Scripted(0))
    c = displace(img, m, "handbag", 30, 5, params(fill="sd", seed=12), registry=registry, checker=Scripted(0))
    assert (np.asarray(a.image) == np.asarray(b.image)).all()
    assert not (np.asarray(a.image) == np.asarray(c.image)).all()
    assert a.record["fill"]["seeds"] == [11]


def test_default_clip_checker_on_tiny_models(registry):
    img, m = scene()
    edit = displace(img, m, "handbag", 40, 0, params(fill="sd", recheck=True, retries=1), registry=registry)
    f = edit.record["fill"]
    assert f["checker"] == "clip" and 1 <= f["attempts"] <= 3
    d = f["tries"][0]["detail"]
    assert set(d) >= {"box", "prob", "margin", "labelled", "best"}
    # the checked view is the old product box padded like detection pads a proposal
    x0, y0, x1, y1 = bbox(m)
    assert d["box"][0] <= x0 and d["box"][1] <= y0 and d["box"][2] >= x1 and d["box"][3] >= y1
    assert edit.record["models"]["clip"]["role"] == "clip"
    assert isinstance(ClipChecker(registry)(img, m, "handbag"), float)


# ------------------------------------------------------------------------------------------------
# arguments, records, settings


def test_record_is_complete():
    img, m = scene()
    edit = displace(img, m, "handbag", 40, -5, params(harmonize_ring=2))
    rec = json.loads(json.dumps(edit.record))
    assert rec["op"] == "displace" and rec["label"] == "handbag" and rec["image_size"] == [W, H]
    assert set(rec["timings"]) >= {"fill", "check", "paste", "harmonize", "total"}
    assert rec["fill"]["hole_pixels"] == int(dilate(m, 6).sum())
    assert rec["edit_pixels"] == int(edit.edit_mask.sum())
    assert rec["params"]["fill"]["mask_dilation"] == 6 and rec["models"] == {}


def test_bad_arguments():
    img, m = scene()
    with pytest.raises(EditError, match="empty"):
        displace(img, np.zeros((H, W), bool), "handbag", 5, 0, params())
    with pytest.raises(ValueError, match="shape"):
        displace(img, m[:10], "handbag", 5, 0, params())
    with pytest.raises(ValueError, match="RGB"):
        displace(img.convert("RGBA"), m, "handbag", 5, 0, params())
    with pytest.raises(ValueError, match="whole number"):
        displace(img, m, "handbag", 0.5, 0, params())
    with pytest.raises(ValueError, match="registry"):
        displace(img, m, "handbag", 5, 0, params(fill="sd"))


def test_edit_card_form_takes_a_detection():
    img, m = scene()
    det = Detection(label="handbag", score=0.9, box=bbox(m), mask=m)
    edit = displace_detection(img.convert("RGBA"), det, params(), None, dx=10, dy=0)
    assert edit.record["label"] == "handbag"
    check_guarantees(edit, img, m, 10, 0, params())


def test_shipped_settings_document_the_displace_defaults(tmp_path):
    assert load_settings(REPO / "conf" / "settings.yaml").displace == DisplaceSettings()
    for text, field, line in [("displace:\n  out_of_frame: wrap\n", "displace.out_of_frame", 2),
                              ("displace:\n  fill:\n    resolution: 500\n", "displace.fill.resolution", 3),
                              ("displace:\n  fill: {recheck_threshold: 2}\n", "displace.fill.recheck_threshold", 2),
                              ("displace:\n  seed: 1\n  fill:\n    backend: sd\n    classical_method: magic\n",
                               "displace.fill.classical_method", 5),
                              # the old flat keys are named as written
                              ("displace:\n  resolution: 500\n", "displace.resolution", 2),
                              ("displace:\n  fill: lama\n  recheck_threshold: 2\n", "displace.recheck_threshold", 3)]:
        p = tmp_path / "s.yaml"
        p.write_text(text)
        with pytest.raises(SettingsError) as ei:
            load_settings(p)
        assert (field, line) in [(f, n) for f, _, n in ei.value.problems]
        assert f"{p}:{line}: {field}: " in str(ei.value)
