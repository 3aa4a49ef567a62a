"""Enhance on the tiny models: pixels outside the dilated product mask stay bit-identical (PNG,
JPEG, alpha and EXIF-rotated inputs), crop planning, depth conditioning, the shared ControlNet
pipeline, determinism, per-class LoRAs (and that they never leak into other users of the UNet),
records, parameter checks before any model runs, settings, and the benchmark harness."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.io.composite import dilate, bbox
from pipeline.detect.detector import Detection
from edit_helpers import run_action
from pipeline.ops.edits import Edit, EditError
from pipeline.errors import ParamsError
from pipeline.ops.enhance import (
    build_prompt,
    controlnet_pipeline,
    enhance,
    enhance_detection,
    plan_work,
)
from pipeline.models.lora_weights import LoraError, load_spec
from pipeline.settings import EnhanceSettings, SettingsError, load_settings

from helpers.loras import make_diffusers_lora

REPO = Path(__file__).resolve().parents[1]
H, W = 72, 96




def product_mask(cx=40, cy=36, r=12, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def scene(seed=0, h=H, w=W, **kw):
    """Textured background with a patterned disc "product"; (PIL RGB, mask)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = product_mask(h=h, w=w, **kw)
    yy, xx = np.mgrid[:h, :w]
    img[m] = np.stack([(xx * 7) % 256, (yy * 11) % 256, (xx * yy) % 256], axis=-1)[m].astype(np.uint8)
    return Image.fromarray(img, "RGB"), m


def params(**kw):
    base = dict(steps=2, resolution=64, mask_dilation=6, mask_feather=3, seed=0)
    base.update(kw)
    return EnhanceSettings(**base)


def check_outside(edit, img, m, dilation):
    src, out = np.asarray(img), np.asarray(edit.image)
    assert isinstance(edit, Edit) and edit.image.mode == "RGB" and edit.image.size == img.size
    region = dilate(m, dilation)
    assert (edit.edit_mask == region).all()
    assert (out[~region] == src[~region]).all()
    # the product itself was regenerated
    assert (out[m] != src[m]).any(axis=-1).mean() > 0.5
    json.dumps(edit.record)


@pytest.fixture(scope="module")
def lora_registry(tiny_settings):
    # LoRA tests get their own registry (own UNet), so the session one never holds adapters.
    from pipeline.models.registry import ModelRegistry

    return ModelRegistry(tiny_settings)


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    d = tmp_path_factory.mktemp("enhance-loras")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "inpaint" / "unet")
    return {"bag": make_diffusers_lora(unet, d / "bag_style.safetensors", seed=11),
            "shoe": make_diffusers_lora(unet, d / "shoe_style.safetensors", seed=12)}


# ------------------------------------------------------------------------------------------------
# the pixel guarantee


@pytest.mark.parametrize("mode", ["crop", "whole"])
@pytest.mark.parametrize("controlnet", [True, False])
def test_outside_the_dilated_mask_is_bit_identical(registry, mode, controlnet):
    img, m = scene()
    p = params(mode=mode, controlnet=controlnet)
    edit = enhance(img, m, "handbag", p, registry)
    check_outside(edit, img, m, p.mask_dilation)
    rec = edit.record
    assert rec["mode"] == mode and rec["controlnet"] is controlnet
    assert rec["pipeline"] == ("StableDiffusionControlNetInpaintPipeline" if controlnet
                               else "StableDiffusionInpaintPipeline")
    assert ("depth" in rec["timings"]) is controlnet and ("depth" in rec["models"]) is controlnet
    if mode == "whole":
        assert rec["crop"] == {"box": [0, 0, W, H], "work_size": [W, H]}


def test_feather_and_dilation_bounds(registry):
    img, m = scene()
    src = np.asarray(img)
    hard = enhance(img, m, "handbag", params(mask_dilation=0, mask_feather=0), registry)
    assert (hard.edit_mask == m).all()
    assert (np.asarray(hard.image)[~m] == src[~m]).all()
    soft = enhance(img, m, "handbag", params(mask_dilation=6, mask_feather=3), registry)
    out = np.asarray(soft.image)
    # the product mask is wholly the generated result; so is it without a feather: same seed and
    # crop, so the two runs agree on the product's pixels
    same = enhance(img, m, "handbag", params(mask_dilation=6, mask_feather=0), registry)
    assert (out[m] == np.asarray(same.image)[m]).all()
    # the outermost ring of the region is blended, not replaced
    edge = dilate(m, 6) & ~dilate(m, 5)
    gen = np.asarray(same.image)[edge].astype(int)
    mix = out[edge].astype(int)
    lo, hi = np.minimum(gen, src[edge]), np.maximum(gen, src[edge])
    assert ((mix >= lo - 1) & (mix <= hi + 1)).all() and (mix != gen).any()


@pytest.mark.parametrize("kind", ["jpeg", "rgba_png", "exif_rotated_jpeg", "exif_rotated_png"])
def test_loaded_inputs_stay_exact_outside_through_run_op(registry, tiny_settings, tmp_path, kind):
    """End to end as `product-studio edit enhance --mask` does: the input goes through the one
    loader (EXIF orientation, RGBA), the output PNG is compared with that decoded input."""
    from pipeline.io.imageio import load_image
    from edit_helpers import run_op

    img, m = scene(seed=3)
    arr = np.asarray(img)
    path = tmp_path / ("in.png" if "png" in kind else "in.jpg")
    if kind == "jpeg":
        img.save(path, quality=85)
    elif kind == "rgba_png":
        alpha = np.full((H, W), 255, np.uint8)
        alpha[:, :20] = 90  # partly transparent: the loader keeps RGBA
        Image.fromarray(np.dstack([arr, alpha]), "RGBA").save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to view": stored sideways
        stored = img.transpose(Image.Transpose.ROTATE_90)
        stored.save(path, exif=exif.tobytes(), **({"quality": 90} if path.suffix == ".jpg" else {}))
    loaded = load_image(path)
    assert loaded.size == (W, H)
    assert loaded.exif_transposed is kind.startswith("exif")
    assert loaded.image.mode == ("RGBA" if kind == "rgba_png" else "RGB")
    Image.fromarray((m * 255).astype(np.uint8), "L").save(tmp_path / "mask.png")
    outcome = run_op(tiny_settings, path, "enhance", label="handbag", out_dir=tmp_path / "out",
                     options={"seed": 5}, mask_path=tmp_path / "mask.png", registry=registry)
    assert outcome.status == "edited", outcome.record.get("error")
    src = np.asarray(loaded.image.convert("RGB"))
    out = np.asarray(Image.open(outcome.image_path).convert("RGB"))
    edit_mask = np.asarray(Image.open(outcome.mask_path)) > 0
    assert (edit_mask == dilate(m, tiny_settings.enhance.mask_dilation)).all()
    assert (out[~edit_mask] == src[~edit_mask]).all()
    assert (out[m] != src[m]).any()
    assert outcome.edit["seed"] == 5 and outcome.record["qa"]["passed"]


def test_edit_card_form_converts_rgba(registry):
    img, m = scene()
    det = Detection(label="handbag", score=0.9, box=bbox(m), mask=m)
    rgba = img.convert("RGBA")
    edit = enhance_detection(rgba, det, params(), registry)
    check_outside(edit, img, m, 6)
    assert edit.record["label"] == "handbag"


# ------------------------------------------------------------------------------------------------
# crop planning and depth


def test_crop_plan_long_side_multiple_of_8_aspect_kept():
    big = np.zeros((1024, 1024), bool)
    big[300:700, 400:650] = True  # 250 x 400 product
    region = dilate(big, 8)
    p = EnhanceSettings()
    crop = plan_work(region, p, 512)  # resolution auto: SD 1.5's native 512, resolved by the registry
    cw, ch = crop.size
    assert max(crop.work_size) == 512 and all(v % 8 == 0 for v in crop.work_size)
    assert crop.work_h == 512 and abs(crop.work_w / crop.work_h - cw / ch) < 8 / 512
    x0, y0, x1, y1 = crop.box
    assert x0 <= 400 - 8 and y0 <= 300 - 8 and x1 >= 650 + 8 and y1 >= 700 + 8  # holds the region
    assert cw < 1024 and ch < 1024  # context margin, not the whole photo
    whole = plan_work(region, p.model_copy(update={"mode": "whole"}), None)
    assert whole.box == (0, 0, 1024, 1024) and whole.work_size == (1024, 1024)
    huge = np.zeros((3000, 4000), bool)
    huge[1000:2000, 1000:2000] = True
    w2 = plan_work(huge, p.model_copy(update={"mode": "whole"}), None)
    assert w2.box == (0, 0, 4000, 3000) and w2.work_size == (2048, 1536)


class _FakeDepthModel(torch.nn.Module):
    """Predicts a left-to-right ramp at 16x16, whatever the input."""

    def __init__(self, model_type="dpt", metric=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"model_type": model_type,
                                       "depth_estimation_type": "metric" if metric else "relative"})()

    def forward(self, pixel_values):
        ramp = torch.linspace(1.0, 5.0, 16).repeat(16, 1)[None]
        return type("Out", (), {"predicted_depth": ramp + self.w})()


class _FakeProcessor:
    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.zeros(1, 3, 16, 16)}


class _FakeRegistry:
    def __init__(self, model):
        from pipeline.models.registry import HFBundle

        self.bundle = HFBundle(model, _FakeProcessor())

    def get(self, role):
        assert role == "depth"
        return self.bundle


@pytest.mark.parametrize("metric", [False, True])
def test_depth_map_is_normalised_near_bright(metric):
    from pipeline.ops.depth import depth_map

    crop = Image.new("RGB", (40, 24), (100, 100, 100))
    d = depth_map(crop, _FakeRegistry(_FakeDepthModel(metric=metric)))
    a = np.asarray(d)
    assert d.mode == "RGB" and d.size == (40, 24) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    assert a.min() == 0 and a.max() == 255
    row = a[12, :, 0].astype(int)
    # relative models predict inverse depth (large = near): bright on the right; metric models
    # predict distance (large = far): inverted, bright on the left
    assert bool(row[-1] > row[0]) == (not metric)


def test_depth_map_of_the_tiny_model(registry):
    from pipeline.ops.depth import depth_map, normalise

    img, _ = scene()
    d = depth_map(img, registry)
    assert d.mode == "RGB" and d.size == img.size
    assert not normalise(np.full((4, 4), 3.0)).any()  # flat: no amplified noise
    assert not normalise(np.full((4, 4), np.nan)).any()


# ------------------------------------------------------------------------------------------------
# pipelines: shared components, built once; determinism


def test_controlnet_pipeline_shares_the_inpaint_components(registry):
    inpaint = registry.get("inpaint")
    cn = controlnet_pipeline(registry)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(cn, name) is getattr(inpaint, name), name
    assert cn.controlnet is registry.get("controlnet_depth")
    assert controlnet_pipeline(registry) is cn  # built once per registry
    assert type(next(iter(cn.unet.attn_processors.values()))).__name__ == "AttnProcessor2_0"  # SDPA


def test_no_second_base_load(tiny_settings, monkeypatch):
    import diffusers

    from pipeline.models.registry import ModelRegistry

    reg = ModelRegistry(tiny_settings)
    img, m = scene()
    enhance(img, m, "handbag", params(), reg)
    calls = []
    for cls in (diffusers.DiffusionPipeline, diffusers.StableDiffusionInpaintPipeline,
                diffusers.StableDiffusionControlNetInpaintPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: calls.append(c)))
    enhance(img, m, "handbag", params(controlnet=False), reg)
    enhance(img, m, "shoe", params(seed=3), reg)
    assert calls == []


def test_same_seed_same_output_other_seed_differs(registry):
    img, m = scene()
    a = enhance(img, m, "handbag", params(seed=7), registry)
    b = enhance(img, m, "handbag", params(seed=7), registry)
    c = enhance(img, m, "handbag", params(seed=7), registry, seed=8)
    assert (np.asarray(a.image) == np.asarray(b.image)).all()
    assert not (np.asarray(a.image) == np.asarray(c.image)).all()
    assert a.record["seed"] == 7 and c.record["seed"] == 8
    e = enhance(img, m, "handbag", params(seed=7), registry, prompt="a red {label}")
    assert not (np.asarray(a.image) == np.asarray(e.image)).all() and e.record["prompt"] == "a red handbag"


def test_auto_resolution_is_the_inpaint_models_native_size_and_bit_identical_to_it(registry, tiny_settings):
    # The tiny SD 1.5 inpaint model's native size: UNet sample_size 32 x the tiny VAE's downscale 2.
    assert registry.native_resolution("inpaint") == 64
    assert tiny_settings.enhance.resolution == "auto"  # the tiny settings rely on it
    img, m = scene()
    auto = enhance(img, m, "handbag", params(resolution="auto"), registry)
    fixed = enhance(img, m, "handbag", params(resolution=64), registry)
    assert np.array_equal(np.asarray(auto.image), np.asarray(fixed.image))
    assert auto.record["resolution"] == fixed.record["resolution"] == 64
    assert auto.record["params"]["resolution"] == "auto" and auto.record["crop"] == fixed.record["crop"]
    # an explicit size wins over the native one
    big = enhance(img, m, "handbag", params(resolution=96), registry)
    assert big.record["resolution"] == 96 and max(big.record["crop"]["work_size"]) == 96


def test_depth_conditions_the_controlnet(tiny_settings, monkeypatch):
    """The depth map reaches the ControlNet, scaled by controlnet_scale. A freshly made ControlNet
    has zero convolutions after its condition embedding and on its outputs (no effect at all), so
    this one gets random ones."""
    import pipeline.ops.depth
    import pipeline.ops.enhance  # enhance looks depth_map up in its own namespace
    from pipeline.models.registry import ModelRegistry

    reg = ModelRegistry(tiny_settings)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cn = reg.get("controlnet_depth")
        for mod in [cn.controlnet_cond_embedding.conv_out, *cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            for prm in mod.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.2)
    img, m = scene()
    seen = []
    real = pipeline.ops.depth.depth_map

    def spy(crop, registry):
        d = real(crop, registry)
        seen.append((crop.size, d.size, d.mode))
        return d

    monkeypatch.setattr(pipeline.ops.enhance, "depth_map", spy)
    a = np.asarray(enhance(img, m, "handbag", params(), reg).image)
    assert seen == [((64, 64), (64, 64), "RGB")]  # the work crop's depth, at the work size
    b = np.asarray(enhance(img, m, "handbag", params(controlnet_scale=2.0), reg).image)
    off = np.asarray(enhance(img, m, "handbag", params(controlnet_scale=0.0), reg).image)
    plain = np.asarray(enhance(img, m, "handbag", params(controlnet=False), reg).image)
    monkeypatch.setattr(pipeline.ops.enhance, "depth_map", lambda crop, registry: Image.new("RGB", crop.size, (255,) * 3))
    flat = np.asarray(enhance(img, m, "handbag", params(), reg).image)
    assert not (a == b).all() and not (a == flat).all() and not (a == off).all()
    assert np.abs(off.astype(int) - plain.astype(int)).max() <= 1  # scale 0: just the inpainting model


# ------------------------------------------------------------------------------------------------
# LoRA per class


def test_lora_changes_the_output_and_two_classes_get_their_own(registry, lora_registry, loras, tiny_settings):
    img, m = scene()
    settings = tiny_settings.model_copy(deep=True)
    settings.enhance = params(classes={
        "handbag": {"tag": "ppbag", "loras": [f"{loras['bag']}:0.9"]},
        "shoe": {"tag": "ppshoe", "loras": [str(loras["shoe"])]},
    })
    reg = lora_registry

    def run(label, **opts):
        return run_action("enhance", img, m, label, opts, settings, reg)

    shoe1 = run("shoe")  # only the shoe LoRA is in the model yet
    bag1 = run("handbag")
    shoe2 = run("shoe")  # the bag LoRA is loaded too now, and must play no part
    bag2 = run("handbag")
    assert (np.asarray(shoe1.image) == np.asarray(shoe2.image)).all()
    assert (np.asarray(bag1.image) == np.asarray(bag2.image)).all()
    assert reg.adapters("inpaint").loads == 2  # switching classes never re-reads a file
    assert [r["cached"] for r in (shoe1.record["loras"][0], shoe2.record["loras"][0])] == [False, True]
    bag_rec = bag1.record["loras"]
    assert len(bag_rec) == 1 and bag_rec[0]["sha256"] == load_spec(loras["bag"]).sha256
    assert bag_rec[0]["weight"] == 0.9 and bag_rec[0]["file"] == str(loras["bag"].resolve())
    assert shoe1.record["loras"][0]["sha256"] == load_spec(loras["shoe"]).sha256
    assert bag1.record["prompt"].startswith("ppbag, handbag, ") and shoe1.record["tag"] == "ppshoe"
    # the same prompt without the LoRA: a different image, equal to a registry never given a LoRA
    plain = run("handbag", loras=[])
    fresh = run_action("enhance", img, m, "handbag", {"loras": []}, settings, registry)
    assert (np.asarray(plain.image) == np.asarray(fresh.image)).all()
    assert not (np.asarray(plain.image) == np.asarray(bag1.image)).all()
    assert plain.record["loras"] == [] and plain.record["prompt"] == bag1.record["prompt"]
    for e in (bag1, shoe1, plain):
        check_outside(e, img, m, 6)
    # the CLI's --lora replaces the class's LoRAs (here: the shoe LoRA on a handbag)
    swapped = run("handbag", loras=[f"{loras['shoe']}:1"])
    assert swapped.record["loras"][0]["sha256"] == shoe1.record["loras"][0]["sha256"]
    assert not (np.asarray(swapped.image) == np.asarray(bag1.image)).all()
    # rules files give {path, weight} mappings; the same LoRA and weight is the same image
    mapped = run("handbag", loras=[{"path": str(loras["bag"]), "weight": 0.9}])
    assert (np.asarray(mapped.image) == np.asarray(bag1.image)).all()
    assert reg.adapters("inpaint").loads == 2


def test_unload_frees_the_inpaint_role_with_its_controlnet_pipeline_and_adapters(tiny_settings, loras):
    """The registry owns what is built on a role: after unload("inpaint") and a garbage collection
    nothing refers to the pipeline, its UNet (holding the LoRA layers), the ControlNet pipeline built
    from its components or the adapters; the next enhance loads and builds them anew, same output."""
    import gc
    import weakref

    from pipeline.models.registry import ModelRegistry

    reg = ModelRegistry(tiny_settings)
    img, m = scene()
    spec = load_spec(loras["bag"])
    before = enhance(img, m, "handbag", params(), reg, loras=[spec])
    refs = {"pipeline": weakref.ref(reg.get("inpaint")), "unet": weakref.ref(reg.get("inpaint").unet),
            "controlnet pipeline": weakref.ref(controlnet_pipeline(reg)),
            "adapters": weakref.ref(reg.adapters("inpaint"))}
    controlnet = reg.get("controlnet_depth")
    assert reg.adapters("inpaint").loaded == [spec.adapter_name]
    reg.unload("inpaint")
    gc.collect()
    assert {k: r() is None for k, r in refs.items()} == {k: True for k in refs}
    assert reg.get("controlnet_depth") is controlnet  # another role: kept
    after = enhance(img, m, "handbag", params(), reg, loras=[spec])
    assert (np.asarray(after.image) == np.asarray(before.image)).all()
    assert controlnet_pipeline(reg).unet is reg.get("inpaint").unet
    assert after.record["loras"][0]["cached"] is False and reg.adapters("inpaint").loads == 1


def test_loaded_loras_never_reach_other_users_of_the_unet(registry, lora_registry, loras):
    """displace/rotate fill with the same inpaint pipeline: after an enhance with a LoRA it must
    compute exactly what a pipeline that never saw a LoRA computes."""
    from pipeline.ops.inpaint import fill
    from pipeline.settings import FillSettings

    img, m = scene()
    enhance(img, m, "handbag", params(), lora_registry, loras=[load_spec(loras["bag"])])
    fs = FillSettings(backend="sd", steps=2, resolution=64, mask_dilation=4)
    a, _ = fill(img, m, fs, lora_registry, seed=1)
    b, _ = fill(img, m, fs, registry, seed=1)
    assert (np.asarray(a) == np.asarray(b)).all()


# ------------------------------------------------------------------------------------------------
# records, prompts, parameters


def test_record_is_complete(registry, lora_registry, loras):
    img, m = scene()
    p = params(guidance=5.5, strength=0.9, controlnet_scale=0.7, tag="pptag")
    edit = enhance(img, m, "shoe", p, lora_registry, loras=[load_spec(loras["shoe"], 0.6)], seed=4)
    rec = json.loads(json.dumps(edit.record))
    assert rec["op"] == "enhance" and rec["label"] == "shoe" and rec["image_size"] == [W, H]
    assert rec["prompt"] == "pptag, shoe, studio photography, product photography, ultra realistic"
    assert rec["negative_prompt"] == p.negative_prompt and rec["tag"] == "pptag"
    assert (rec["seed"], rec["steps"], rec["guidance"], rec["strength"], rec["controlnet_scale"]) == \
        (4, 2, 5.5, 0.9, 0.7)
    lr = rec["loras"][0]
    assert lr["weight"] == 0.6 and len(lr["sha256"]) == 64 and lr["format"] == "diffusers"
    for role in ("inpaint", "controlnet_depth", "depth"):
        assert rec["models"][role]["role"] == role and rec["models"][role]["source"]
    assert set(rec["timings"]) >= {"depth", "lora", "generate", "paste", "total"}
    assert rec["runtime"]["device"] == "cpu" and rec["runtime"]["dtype"] == "float32"
    assert rec["runtime"]["attention"] == ["AttnProcessor2_0"]
    assert rec["crop"]["work_size"] == [64, 64] and rec["edit_pixels"] == int(edit.edit_mask.sum())
    assert rec["params"]["mask_dilation"] == 6


@pytest.mark.parametrize("template, label, tag, expected", [
    ("{tag}, {label}, studio photography", "handbag", "", "handbag, studio photography"),
    ("{tag}, {label}, studio photography", "handbag", "ppzocketv2", "ppzocketv2, handbag, studio photography"),
    ("a photo of a {label} {tag}", "shoe", "", "a photo of a shoe"),
    ("{label}, {tag}", "chair", " ", "chair"),
])
def test_build_prompt(template, label, tag, expected):
    assert build_prompt(template, label, tag) == expected


class _NoModels:
    """A registry that fails the test if any model is asked for."""

    settings = None

    def get(self, role):
        raise AssertionError(f"model role {role!r} was asked for")

    def __getattr__(self, name):
        raise AssertionError(f"registry.{name} was used")


@pytest.mark.parametrize("options, match", [
    ({"loras": ["missing_style.safetensors"]}, "LoRA file not found: missing_style.safetensors"),
    ({"loras": ["style.safetensors:0.5", "other.safetensors"]}, "not found"),
    ({"loras": "x.safetensors:50"}, "outside"),
    ({"steps": 0}, "steps"),
    ({"steps": -3}, "steps"),
    ({"strength": 1.5}, "strength"),
    ({"strength": 0}, "strength"),
    ({"strength": -0.1}, "strength"),
    ({"steps": 1, "strength": 0.5}, "no denoising step"),
    ({"guidance": -1}, "guidance"),
    ({"resolution": 500}, "multiple of 8"),
    ({"mode": "tiles"}, "mode"),
    ({"prompt_template": "{tag}, {colour} {label}"}, "unknown placeholder"),
    ({"stepz": 3}, "unknown parameter"),
    ({"seed": "abc"}, "seed"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_parameters_fail_before_any_model(tiny_settings, options, match):
    img, m = scene()
    with pytest.raises(ParamsError, match=match):
        run_action("enhance", img, m, "handbag", options, tiny_settings, _NoModels())


def test_bad_arguments_fail_before_any_model(tiny_settings, tmp_path):
    img, m = scene()
    none = _NoModels()
    with pytest.raises(EditError, match="empty"):
        enhance(img, np.zeros((H, W), bool), "handbag", params(), none)
    with pytest.raises(ValueError, match="shape"):
        enhance(img, m[:10], "handbag", params(), none)
    with pytest.raises(ValueError, match="RGB"):
        enhance(img.convert("RGBA"), m, "handbag", params(), none)
    with pytest.raises(ValueError, match="registry"):
        enhance(img, m, "handbag", params(), None)
    with pytest.raises(LoraError, match="LoraSpec"):
        enhance(img, m, "handbag", params(), none, loras=["style.safetensors"])
    ckpt = tmp_path / "style.ckpt"
    ckpt.write_bytes(b"not a safetensors file")
    with pytest.raises(ParamsError, match="only .safetensors"):
        run_action("enhance", img, m, "handbag", {"loras": [str(ckpt)]}, tiny_settings, none)
    # a class configured with a LoRA that is missing is refused the same way
    settings = tiny_settings.model_copy(deep=True)
    settings.enhance = params(classes={"handbag": {"loras": ["loras/gone.safetensors:0.5"]}})
    with pytest.raises(LoraError, match="gone.safetensors"):
        run_action("enhance", img, m, "handbag", {}, settings, none)


def test_settings_options_override_per_edit(registry, tiny_settings):
    img, m = scene()
    edit = run_action("enhance", img, m, "handbag", {"mode": "whole", "controlnet": False, "tag": "ppx", "seed": "3",
                                          "prompt": None}, tiny_settings, registry)
    rec = edit.record
    assert rec["mode"] == "whole" and rec["controlnet"] is False and rec["seed"] == 3
    assert rec["prompt"].startswith("ppx, handbag")


# ------------------------------------------------------------------------------------------------
# settings


def test_shipped_settings_document_the_enhance_defaults():
    assert load_settings(REPO / "conf" / "settings.yaml").enhance == EnhanceSettings()


@pytest.mark.parametrize("text, field, reason", [
    ("enhance:\n  strength: 0\n", "enhance.strength", "greater than 0"),
    ("enhance:\n  strength: 1.2\n", "enhance.strength", "less than or equal to 1"),
    ("enhance:\n  steps: 0\n", "enhance.steps", "greater than or equal to 1"),
    ("enhance:\n  steps: 1\n  strength: 0.5\n", "enhance", "no denoising step"),
    ("enhance:\n  mode: tiles\n", "enhance.mode", "crop"),
    ("enhance:\n  prompt_template: '{colour} {label}'\n", "enhance.prompt_template", "unknown placeholder"),
    ("enhance:\n  classes:\n    bag:\n      loras: ['x.safetensors:99']\n", "enhance.classes.bag.loras", "outside"),
    ("enhance:\n  classes:\n    bag:\n      lora: ['x.safetensors']\n", "enhance.classes.bag.lora", "unknown field"),
    ("enhance:\n  whole_max_side: 1001\n", "enhance.whole_max_side", "multiple of 8"),
])
def test_bad_enhance_settings_are_refused_with_field_and_reason(tmp_path, text, field, reason):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    problems = {f: r for f, r, _ in ei.value.problems}
    assert field in problems, ei.value.problems
    assert reason in problems[field]


def test_class_loras_resolve_against_the_settings_root(tmp_path, loras):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "bag.safetensors").write_bytes(loras["bag"].read_bytes())
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"root": ".", "enhance": {"classes": {"handbag": {
        "tag": "ppbag", "loras": ["loras/bag.safetensors:0.7", {"path": str(loras["shoe"]), "weight": -0.5}]}}}}))
    s = load_settings(p)
    from pipeline.ops.enhance import class_loras

    spec, shoe = class_loras(s.enhance, "handbag", s.base_dir)
    assert spec.path == (tmp_path / "loras" / "bag.safetensors").resolve() and spec.weight == 0.7
    assert shoe.path == loras["shoe"].resolve() and shoe.weight == -0.5
    assert class_loras(s.enhance, "shoe", s.base_dir) == []


# ------------------------------------------------------------------------------------------------
# the benchmark harness (tiny smoke run; never asserts wall times)


def test_bench_smoke(tiny_dir):
    from rich.console import Console

    from bench.enhance import CASES, render, run_enhance

    res = run_enhance(tiny_dir=tiny_dir, repeats=1, size=(96, 80), device="cpu")
    assert set(res["cases"]) == set(CASES)
    crop, whole = res["cases"]["crop"], res["cases"]["whole"]
    assert whole["work_size"] == [96, 80] and max(crop["work_size"]) == 64
    assert crop["median_s"] > 0 and whole["median_s"] > 0 and crop["measures"]
    r = res["ratios"]["whole/crop"]
    assert r["value"] > 0 and math.isfinite(r["value"]) and r["goal"] == 3.0
    json.dumps(res)
    out = io.StringIO()
    render(res, Console(file=out, width=200))
    assert "whole/crop" in out.getvalue()


def test_bench_quick_runs_each_case_once_without_warmup(tiny_dir):
    from bench.enhance import run_enhance

    res = run_enhance(tiny_dir=tiny_dir, repeats=3, size=(96, 80), device="cpu", warmup=False)
    for c in res["cases"].values():
        assert len(c["runs_s"]) == 1 and c["min_s"] == c["median_s"] == c["max_s"]
        assert c["peak_rss_mib"] > 0 and c["memory_scope"]
    assert "without a warm-up" in res["context"]["notes"][0]
