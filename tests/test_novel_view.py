"""Novel view (Zero123): the pose embedding against hand-computed values, the conditioning as the
reference defines it (CLIP embedding + pose -> cc_projection; input-view latents concatenated
to 8 channels; zeros for the unconditional half), seeded DDIM, the layout's save/load round
trip, and a layout with a missing part refused with its name."""

import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.models.registry import ModelLoadError, ModelRegistry
from pipeline.models.novel_view import NovelViewPipeline, check_pose, pose_embedding
from pipeline.settings import load_settings




@pytest.fixture(scope="module")
def pipe(registry):
    return NovelViewPipeline.from_components(registry.get("novel_view"))


def product_view(size=64):
    """A red box centred on white, as rotate's pre-processing makes them."""
    a = np.full((size, size, 3), 255, np.uint8)
    a[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = (200, 30, 30)
    return Image.fromarray(a, "RGB")


# ------------------------------------------------------------------------------------------------
# Pose


@pytest.mark.parametrize("polar, azimuth, radius, expected", [
    (0.0, 0.0, 0.0, [0.0, 0.0, 1.0, 0.0]),
    (30.0, 90.0, 0.0, [math.pi / 6, 1.0, math.cos(math.pi / 2), 0.0]),
    (-45.0, -30.0, 0.2, [-math.pi / 4, -0.5, math.sqrt(3) / 2, 0.2]),
    (90.0, 180.0, -0.5, [math.pi / 2, math.sin(math.pi), -1.0, -0.5]),
    (-90.0, -180.0, 0.0, [-math.pi / 2, math.sin(-math.pi), -1.0, 0.0]),
    (10.0, 45.0, 0.0, [math.pi / 18, math.sqrt(0.5), math.sqrt(0.5), 0.0]),
])
def test_pose_embedding_equals_hand_computed_values(polar, azimuth, radius, expected):
    t = pose_embedding(polar, azimuth, radius)
    assert t.shape == (1, 1, 4) and t.dtype == torch.float32
    want = torch.tensor([[expected]], dtype=torch.float64).to(torch.float32)
    assert torch.allclose(t, want, rtol=0, atol=1e-7), (t, want)
    t64 = pose_embedding(polar, azimuth, radius, dtype=torch.float64)
    assert torch.allclose(t64, torch.tensor([[expected]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_pose_embedding_matches_the_reference_formula_and_batches():
    # The reference (zero123 gradio_new.sample_model; diffusers pipeline_zero1to3._encode_pose):
    # T = [radians(x), sin(radians(y)), cos(radians(y)), z] for x = polar, y = azimuth, z = radius.
    polars, azs, rs = [5.0, -20.0, 60.0], [170.0, -95.0, 0.0], [0.0, 0.1, -0.3]
    t = pose_embedding(polars, azs, rs)
    assert t.shape == (3, 1, 4)
    for i, (x, y, z) in enumerate(zip(polars, azs, rs)):
        ref = torch.tensor([math.radians(x), math.sin(math.radians(y)), math.cos(math.radians(y)), z])
        assert torch.allclose(t[i, 0], ref, atol=1e-7)
    assert torch.equal(pose_embedding([1.0, 2.0], 30.0)[:, 0, 1], torch.full((2,), 0.5, dtype=torch.float32))
    # Azimuth is periodic: -90 and 270 give the same embedding (training takes it modulo 360).
    assert torch.allclose(pose_embedding(0, -90), pose_embedding(0, 270), atol=1e-7)
    with pytest.raises(ValueError, match="azimuth has 2 values"):
        pose_embedding([1.0, 2.0, 3.0], [1.0, 2.0])


def test_check_pose_limits_and_messages():
    for ok in [(0, 0), (90, 180), (-90, -180), (45.5, -179.9)]:
        check_pose(*ok)
    with pytest.raises(ValueError, match=r"azimuth 181 degrees is outside -180\.\.180"):
        check_pose(0, 181)
    with pytest.raises(ValueError, match=r"polar -95 degrees is outside -90\.\.90.*camera"):
        check_pose(-95, 0)
    with pytest.raises(ValueError, match=r"polar 40 degrees is outside -30\.\.30.*max_polar"):
        check_pose(40, 0, max_polar=30)
    with pytest.raises(ValueError, match=r"radius 0\.6"):
        check_pose(0, 0, 0.6)
    with pytest.raises(ValueError, match="finite"):
        check_pose(float("nan"), 0)


# ------------------------------------------------------------------------------------------------
# Conditioning and sampling


def test_conditioning_is_clip_embedding_plus_pose_through_cc_projection(pipe):
    x = NovelViewPipeline.image_to_tensor(product_view(), 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    pose = pose_embedding(20.0, 60.0, 0.0)
    cond, lat = pipe.conditioning(x, pose, guidance=3.0)
    cross = pipe.unet.config.cross_attention_dim
    assert cond.shape == (2, 1, cross) and lat.shape == (2, 4, 32, 32)
    # Unconditional half: zeros for both the projected embedding and the image latents.
    assert torch.count_nonzero(cond[0]) == 0 and torch.count_nonzero(lat[0]) == 0
    with torch.no_grad():
        emb = pipe.image_encoder(pixel_values=pipe._clip_input(x)).image_embeds[:, None, :]
        want = pipe.cc_projection(torch.cat([emb, pose], dim=-1))
        # The reference concatenates the *unscaled* latent mode (no VAE scaling factor).
        want_lat = pipe.vae.encode(x).latent_dist.mode()
    assert emb.shape[-1] + 4 == pipe.cc_projection.config.in_channel
    assert torch.allclose(cond[1:], want, atol=1e-6)
    assert torch.allclose(lat[1:], want_lat, atol=1e-6)
    # No guidance (scale 1): one conditional batch item.
    cond1, lat1 = pipe.conditioning(x, pose, guidance=1.0)
    assert cond1.shape == (1, 1, cross) and torch.allclose(cond1, want, atol=1e-6)
    # The pose reaches the conditioning.
    other, _ = pipe.conditioning(x, pose_embedding(20.0, -60.0, 0.0), guidance=1.0)
    assert not torch.allclose(other, cond1)


def test_clip_input_follows_the_reference_preprocessing(pipe):
    # [-1, 1] -> bicubic to the encoder size -> [0, 1] -> CLIP mean/std: a white image gives
    # (1 - mean) / std per channel.
    white = torch.ones(1, 3, 64, 64)
    px = pipe._clip_input(white)
    n = pipe.image_encoder.config.image_size
    assert px.shape == (1, 3, n, n)
    mean, std = np.array(pipe.feature_extractor.image_mean), np.array(pipe.feature_extractor.image_std)
    assert np.allclose(px[0, :, 0, 0].numpy(), (1 - mean) / std, atol=1e-5)


def test_unet_gets_8_channels_with_zero_image_latents_for_the_unconditional_half(pipe):
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda mod, args, kw: seen.append((args, kw)), with_kwargs=True)
    try:
        img = pipe(product_view(), polar=10.0, azimuth=30.0, steps=2, guidance=3.0, seed=1, size=64)
    finally:
        h.remove()
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (64, 64)
    assert len(seen) == 2  # one UNet call per DDIM step, both halves batched
    (sample, t), kw = seen[0]
    assert sample.shape == (2, 8, 32, 32)
    assert torch.count_nonzero(sample[0, 4:]) == 0 and torch.count_nonzero(sample[1, 4:]) > 0
    assert torch.equal(sample[0, :4], sample[1, :4])  # the same noisy latents in both halves
    ehs = kw["encoder_hidden_states"]
    assert ehs.shape == (2, 1, pipe.unet.config.cross_attention_dim) and torch.count_nonzero(ehs[0]) == 0


def test_sampling_is_seeded_and_runs_at_zero_angles(pipe):
    v = product_view()
    a = np.asarray(pipe(v, polar=0.0, azimuth=0.0, steps=2, guidance=3.0, seed=7, size=64))
    b = np.asarray(pipe(v, polar=0.0, azimuth=0.0, steps=2, guidance=3.0, seed=7, size=64))
    c = np.asarray(pipe(v, polar=0.0, azimuth=0.0, steps=2, guidance=3.0, seed=8, size=64))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d = np.asarray(pipe(v, polar=0.0, azimuth=90.0, steps=2, guidance=3.0, seed=7, size=64))
    assert not np.array_equal(a, d)
    # eta 0 (deterministic DDIM) and no guidance run too; a non-square input is resized.
    e = pipe(v.resize((80, 48)), polar=-30.0, azimuth=-150.0, radius=0.1, steps=1, guidance=1.0, eta=0.0, seed=0)
    assert e.size == (pipe.default_size, pipe.default_size)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(v, polar=0.0, azimuth=0.0, steps=1, size=60)


# ------------------------------------------------------------------------------------------------
# Layout round trip and missing parts


def test_layout_round_trips_through_save_and_load(pipe, tiny_dir, tmp_path):
    out = pipe.save_pretrained(tmp_path / "nv")
    for comp in ("vae", "image_encoder", "unet", "scheduler", "feature_extractor", "cc_projection"):
        assert (out / comp).is_dir(), comp
    idx = yaml.safe_load((out / "model_index.json").read_text())
    assert idx["_class_name"] == "Zero1to3StableDiffusionPipeline" and idx["cc_projection"][1] == "CCProjection"

    again = NovelViewPipeline.from_pretrained(out)
    for name in ("vae", "image_encoder", "unet", "cc_projection"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
    v = product_view()
    kw = dict(polar=15.0, azimuth=40.0, steps=2, guidance=3.0, seed=3, size=64)
    assert np.array_equal(np.asarray(pipe(v, **kw)), np.asarray(again(v, **kw)))

    # ...and through the registry, from a settings file pointing at the saved folder.
    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["models"]["novel_view"] = {"path": str(out), "licence": "tiny"}
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(data))
    reg = ModelRegistry(load_settings(cfg))
    loaded = NovelViewPipeline.from_components(reg.get("novel_view"))
    assert np.array_equal(np.asarray(pipe(v, **kw)), np.asarray(loaded(v, **kw)))


@pytest.mark.parametrize("missing", ["cc_projection", "unet"])
def test_layout_with_a_missing_part_is_refused_naming_it(tiny_dir, tmp_path, missing):
    broken = tmp_path / "nv"
    shutil.copytree(tiny_dir / "novel_view", broken)
    shutil.rmtree(broken / missing)
    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["models"]["novel_view"] = {"path": str(broken), "licence": "tiny"}
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(data))
    reg = ModelRegistry(load_settings(cfg))
    with pytest.raises(ModelLoadError, match=rf"model role 'novel_view'.*missing {missing}/"):
        reg.get("novel_view")
    with pytest.raises(ValueError, match=rf"missing {missing}/"):
        NovelViewPipeline.from_pretrained(broken)


def test_a_unet_without_8_input_channels_is_refused(registry):
    from diffusers import UNet2DConditionModel

    c = registry.get("novel_view")
    unet4 = UNet2DConditionModel.from_config({**c.unet.config, "in_channels": 4})
    with pytest.raises(ValueError, match="8"):
        NovelViewPipeline(c.vae, c.image_encoder, unet4, c.scheduler, c.feature_extractor, c.cc_projection)
