"""Mask / compositing helpers and the background fill (crop planning, classical and SD backends)."""

import numpy as np
import pytest
from PIL import Image

from pipeline.io.composite import (
    bbox,
    dilate,
    extend_edges,
    feather_alpha,
    inner_feather_alpha,
    parse_offset,
    paste,
    ring,
    shift_image,
    shift_mask,
)
from pipeline.ops.inpaint import CropBox, fill, plan_crop
from pipeline.settings import FillSettings




def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def noise_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# masks


def test_dilate_grows_by_radius_and_keeps_the_mask():
    m = np.zeros((41, 41), bool)
    m[20, 20] = True
    d = dilate(m, 5)
    assert d.dtype == bool and d[m].all()
    ys, xs = np.nonzero(d)
    assert xs.min() == 15 and xs.max() == 25 and ys.min() == 15 and ys.max() == 25
    assert not d[15, 15]  # elliptical, not square
    assert (dilate(m, 0) == m).all() and dilate(m, 0) is not m


def test_dilate_at_the_border_does_not_wrap():
    m = np.zeros((20, 20), bool)
    m[0, 0] = True
    d = dilate(m, 3)
    assert d[:4, :4].any() and not d[-3:, :].any() and not d[:, -3:].any()
    assert not dilate(np.zeros((5, 5), bool), 3).any()


def test_ring_is_outside_the_mask_only():
    m = disc(40, 40, 20, 20, 6)
    r = ring(m, 3)
    assert not (r & m).any()
    assert (r | m == dilate(m, 3)).all()


def test_feather_alpha_is_exactly_one_inside_and_ramps_outside():
    m = disc(50, 60, 30, 25, 8)
    a = feather_alpha(m, 4)
    assert a.dtype == np.float32 and a.shape == m.shape
    assert (a[m] == 1.0).all()
    assert (a[~dilate(m, 4)] == 0.0).all()
    band = dilate(m, 4) & ~m
    assert ((a[band] > 0) & (a[band] < 1)).all()
    # decreasing away from the mask along a row through the centre (mask ends at x = 38)
    row = a[25, 38:44]
    assert row[0] == 1.0 and all(row[i] > row[i + 1] for i in range(4)) and row[-1] == 0.0
    assert (feather_alpha(m, 0) == m.astype(np.float32)).all()


def test_extend_edges_copies_the_nearest_mask_pixel_into_the_band():
    img = np.zeros((20, 20, 3), np.uint8)
    m = np.zeros((20, 20), bool)
    m[8:12, 8:12] = True
    img[8:12, 8:12] = np.arange(16, dtype=np.uint8).reshape(4, 4)[..., None] * 10
    img[~m] = 255
    out = extend_edges(img, m, 3)
    assert (out[m] == img[m]).all()
    assert (out[10, 12:15] == img[10, 11]).all() and (out[7, 10] == img[8, 10]).all()
    assert (out[5, 10] == img[8, 10]).all() and (out[4, 10] == 255).all()  # 4 px away: untouched
    band = dilate(m, 3) & ~m
    assert (out[~band & ~m] == 255).all()
    assert (out[band] < 255).all()


def test_inner_feather_alpha_stays_inside_region_and_keeps_core():
    core = disc(50, 50, 25, 25, 6)
    region = dilate(core, 8)
    a = inner_feather_alpha(region, 4, core=core)
    assert (a[~region] == 0).all() and (a[core] == 1).all()
    edge = region & dilate(~region, 1)  # region pixels next to the outside
    assert (a[edge] < 1).all() and (a[edge] > 0).all()
    # the image edge is no edge: a region touching it is not faded there
    full = np.zeros((20, 20), bool)
    full[:, :10] = True
    b = inner_feather_alpha(full, 3)
    assert (b[:, 0] == 1).all() and (b[:, 9] < 1).all()


@pytest.mark.parametrize("dx, dy", [(0, 0), (5, 0), (-7, 3), (2, -9), (30, 0), (0, -25), (100, 100)])
def test_shift_image_matches_a_padded_roll(dx, dy):
    a = noise_image(20, 30)
    out = shift_image(a, dx, dy, 0)
    P = 200
    big = np.zeros((20 + 2 * P, 30 + 2 * P, 3), np.uint8)
    big[P:P + 20, P:P + 30] = a
    expected = np.roll(big, (dy, dx), axis=(0, 1))[P:P + 20, P:P + 30]
    assert out.dtype == a.dtype and (out == expected).all()
    m = shift_mask(a[..., 0] > 128, dx, dy)
    assert m.dtype == bool and (m == (expected[..., 0] > 128)).all()


def test_paste_is_exact_where_alpha_is_zero_or_one():
    bg, src = noise_image(10, 12, 1), noise_image(10, 12, 2)
    alpha = np.zeros((10, 12), np.float32)
    alpha[2:5, 3:6] = 1.0
    alpha[6, :] = 0.5
    out = paste(bg, src, alpha)
    assert out.dtype == np.uint8
    assert (out[alpha == 1] == src[alpha == 1]).all()
    assert (out[alpha == 0] == bg[alpha == 0]).all()
    mixed = np.rint(src[6].astype(np.float32) * 0.5 + bg[6].astype(np.float32) * 0.5)
    assert (out[6] == mixed).all()
    with pytest.raises(ValueError):
        paste(bg, src[:5], alpha)


@pytest.mark.parametrize("value, size, expected", [
    ("162", 500, 162), ("-40", 500, -40), ("+5", 500, 5), (12, 500, 12), ("0", 500, 0),
    ("0.1", 500, 50), ("-0.25", 400, -100), (".5", 101, 51), (-0.5, 101, -51), ("1.0", 300, 300),
    ("10%", 640, 64), ("-10%", 640, -64), ("12.5%", 80, 10), ("100%", 80, 80), (" -3 ", 10, -3),
])
def test_parse_offset(value, size, expected):
    assert parse_offset(value, size) == expected


@pytest.mark.parametrize("value", ["", "abc", "1.5", "-2.0", "150%", "1e3", "10px", True, None, float("nan")])
def test_parse_offset_refuses_with_reason(value):
    with pytest.raises(ValueError, match="offset"):
        parse_offset(value, 100)


def test_bbox():
    m = np.zeros((10, 10), bool)
    assert bbox(m) is None
    m[2:4, 5:9] = True
    assert bbox(m) == (5, 2, 9, 4)
    assert bbox(m, pad=3) == (2, 0, 10, 7)


# ------------------------------------------------------------------------------------------------
# crop planning


@pytest.mark.parametrize("box, size, res", [
    ((100, 100, 200, 150), (1000, 800), 512),
    ((0, 0, 40, 400), (500, 500), 512),
    ((10, 10, 20, 13), (64, 48), 64),
    ((950, 10, 1000, 30), (1000, 60), 256),
    ((0, 0, 300, 50), (300, 50), 64),
])
def test_plan_crop_contains_box_keeps_aspect_and_snaps_to_8(box, size, res):
    c = plan_crop(box, size, margin=0.25, resolution=res)
    assert isinstance(c, CropBox)
    assert c.x0 <= box[0] and c.y0 <= box[1] and c.x1 >= box[2] and c.y1 >= box[3]
    assert 0 <= c.x0 < c.x1 <= size[0] and 0 <= c.y0 < c.y1 <= size[1]
    assert c.work_w % 8 == 0 and c.work_h % 8 == 0 and max(c.work_w, c.work_h) == res
    cw, ch = c.size
    if min(cw, ch) < min(size):  # room to widen: the aspect matches to within a pixel
        assert abs(cw / ch - c.work_w / c.work_h) <= 1.0 / min(cw, ch) + 1e-9


def test_plan_crop_adds_margin():
    c = plan_crop((100, 100, 200, 200), (1000, 1000), margin=0.5, resolution=512)
    assert c.box == (50, 50, 250, 250) and c.work_size == (512, 512)
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_crop((0, 0, 10, 10), (100, 100), margin=0, resolution=100)


# ------------------------------------------------------------------------------------------------
# fill


def test_classical_fill_of_flat_background_is_flat():
    img = np.full((60, 80, 3), (90, 140, 60), np.uint8)
    m = disc(60, 80, 40, 30, 10)
    img[m] = (250, 20, 200)
    out, rec = fill(Image.fromarray(img), m, F("classical", mask_dilation=5, blend=2))
    arr = np.asarray(out).astype(int)
    assert (arr == np.array([90, 140, 60])).all()  # Navier-Stokes: exactly flat
    assert rec["backend"] == "classical" and rec["method"] == "ns"
    assert rec["filled_pixels"] == int(dilate(m, 5).sum())


def test_telea_drifts_on_flat_backgrounds_which_is_why_ns_is_the_default():
    img = np.full((120, 120, 3), 200, np.uint8)
    m = disc(120, 120, 60, 60, 25)
    img[m] = 30
    telea, _ = fill(Image.fromarray(img), m, F("classical", mask_dilation=10, classical_method="telea"))
    ns, _ = fill(Image.fromarray(img), m, F("classical", mask_dilation=10, classical_method="ns"))
    assert (np.asarray(ns) == 200).all()
    assert np.abs(np.asarray(telea).astype(int) - 200).max() > 2


def test_classical_fill_changes_nothing_outside_the_dilated_mask():
    img = noise_image(50, 70, 3)
    m = disc(50, 70, 10, 45, 7)  # touches the bottom border
    out, _ = fill(Image.fromarray(img), m, F("classical", mask_dilation=4, classical_radius=3))
    arr = np.asarray(out)
    outside = ~dilate(m, 4)
    assert (arr[outside] == img[outside]).all()
    assert not (arr[m] == img[m]).all()


def test_fill_refuses_bad_arguments():
    img = Image.fromarray(noise_image(20, 20))
    m = np.zeros((20, 20), bool)
    m[5:8, 5:8] = True
    with pytest.raises(ValueError, match="backend"):
        fill(img, m, F("classical"), backend="magic")
    with pytest.raises(ValueError, match="fill_in_order"):
        fill(img, m, F(["lama", "classical"]))  # one backend per call; an order is fill_in_order's
    with pytest.raises(ValueError, match="registry"):
        fill(img, m, F("sd"))
    with pytest.raises(ValueError, match="RGB"):
        fill(img.convert("RGBA"), m, F("classical"))
    with pytest.raises(ValueError, match="shape"):
        fill(img, m[:10], F("classical"))
    out, rec = fill(img, np.zeros((20, 20), bool), F("sd"))  # nothing to fill: no model needed
    assert (np.asarray(out) == np.asarray(img)).all() and rec["filled_pixels"] == 0


def F(backend, **kw):
    """A one-backend fill, no dilation or blend unless given."""
    return FillSettings(**{"backend": backend, "mask_dilation": 0, "blend": 0, **kw})


SD = F("sd", steps=2, guidance=2.0, resolution=64, crop_margin=0.5, mask_dilation=6, blend=3)


def test_sd_fill_pastes_only_inside_the_dilated_mask_and_is_deterministic(registry):
    img = noise_image(72, 100, 4)
    m = disc(72, 100, 70, 30, 9)
    a, rec = fill(Image.fromarray(img), m, SD, registry, seed=3)
    b, _ = fill(Image.fromarray(img), m, SD, registry, seed=3)
    c, _ = fill(Image.fromarray(img), m, SD, registry, seed=4)
    A = np.asarray(a)
    outside = ~dilate(m, 6)
    assert (A[outside] == img[outside]).all()
    assert (A == np.asarray(b)).all()
    assert not (A == np.asarray(c)).all()
    assert rec["seed"] == 3 and rec["crop"]["work_size"][0] % 8 == 0 and max(rec["crop"]["work_size"]) == 64
    x0, y0, x1, y1 = rec["crop"]["box"]
    hb = bbox(dilate(m, 6))
    assert x0 <= hb[0] and y0 <= hb[1] and x1 >= hb[2] and y1 >= hb[3]
