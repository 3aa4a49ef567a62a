"""Stable Diffusion families (SD 1.x, SD 2.x, SDXL) on tiny random sets in the real layouts:
the registry loads each family's pipeline, enhance / displace / rotate run on it with the
background bit-identical, and a ControlNet or LoRA of another family is refused when it loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def fam_dir(tmp_path_factory):
    """One tiny set with every family (`make-tiny --family all`): settings.yaml (SD 1.5),
    settings-sd2.yaml, settings-sdxl.yaml."""
    from pipeline.models.tiny import make_tiny_set

    d = tmp_path_factory.mktemp("families")
    make_tiny_set(d, family="all")
    return d


def _cfg(fam_dir, family: str) -> str:
    return str(fam_dir / ("settings.yaml" if family == "sd15" else f"settings-{family}.yaml"))


def _scene(tmp_path):
    img = np.full((96, 128, 3), (180, 180, 180), np.uint8)
    img[30:66, 20:56] = (150, 40, 40)
    mask = np.zeros((96, 128), np.uint8)
    mask[30:66, 20:56] = 255
    Image.fromarray(img).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    return img


def _mixed_settings(fam_dir, tmp_path, family: str, **roles: str):
    """The ``family`` settings with some roles pointed at other folders of the set."""
    data = yaml.safe_load(open(_cfg(fam_dir, family)))
    data["root"] = str(fam_dir)
    for role, path in roles.items():
        data["models"][role]["path"] = path
    out = tmp_path / "mixed.yaml"
    out.write_text(yaml.safe_dump(data))
    return str(out)


def test_make_tiny_sdxl_writes_the_real_layout(tmp_path):
    r = runner.invoke(app, ["models", "make-tiny", str(tmp_path / "x"), "--family", "sdxl", "--role", "inpaint"])
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "x" / "inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"][1] == "CLIPTokenizer"
    unet = json.loads((tmp_path / "x" / "inpaint" / "unet" / "config.json").read_text())
    te2 = json.loads((tmp_path / "x" / "inpaint" / "text_encoder_2" / "config.json").read_text())
    te1 = json.loads((tmp_path / "x" / "inpaint" / "text_encoder" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["in_channels"] == 9
    # 6 size/crop time ids x addition_time_embed_dim + text_encoder_2's pooled projection
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert "sdxl" in (tmp_path / "x" / "settings.yaml").read_text()
    r = runner.invoke(app, ["models", "make-tiny", str(tmp_path / "y"), "--family", "sd3"])
    assert r.exit_code == 2 and "sd3" in r.output


@pytest.mark.parametrize("family, cls", [("sd2", "StableDiffusionInpaintPipeline"),
                                         ("sdxl", "StableDiffusionXLInpaintPipeline")])
def test_registry_loads_the_family_pipeline_with_every_text_encoder(fam_dir, family, cls):
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import load_settings

    reg = ModelRegistry(load_settings(_cfg(fam_dir, family)))
    pipe = reg.get("inpaint")
    assert type(pipe).__name__ == cls and reg.family("inpaint").name == family
    if family == "sdxl":
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert pipe.tokenizer_2 is not None
        assert type(reg.get("base")).__name__ == "StableDiffusionXLPipeline"
    assert reg.verify("controlnet_depth")["class"] == "ControlNetModel"
    v = reg.verify("inpaint")
    assert v["class"] == cls and v["family"] == family
    # the tiny families' toy native sizes (UNet sample_size x the VAE's downscale): SDXL's is twice
    # SD's, as for the real models; the tiny settings leave every size at auto, so nothing to note
    assert v["native_resolution"] == NATIVE[family] and "note" not in v


NATIVE = {"sd15": 64, "sd2": 64, "sdxl": 128}  # the tiny sets' native work sizes


def test_native_resolution_is_read_from_the_checkpoint_configs():
    from pipeline.models.families import FAMILIES, native_resolution

    vae = {"block_out_channels": [128, 256, 512, 512]}  # the SD VAE: downscale 8
    assert native_resolution({"sample_size": 64}, vae, FAMILIES["sd15"]) == 512  # SD 1.5, SD 2 inpainting
    assert native_resolution({"sample_size": 96}, vae, FAMILIES["sd2"]) == 768  # SD 2.x 768-v
    assert native_resolution({"sample_size": 128}, vae, FAMILIES["sdxl"]) == 1024  # SDXL (inpainting 0.1)
    assert native_resolution({}, vae, FAMILIES["sdxl"]) == 1024  # no sample_size: the family's usual size


@pytest.mark.parametrize("preset", ["sd2", "sdxl"])
def test_presets_leave_the_work_sizes_to_the_checkpoint(preset):
    from pathlib import Path

    from pipeline.settings import load_settings

    s = load_settings(Path(__file__).resolve().parents[1] / "conf" / "presets" / f"{preset}.yaml")
    assert (s.enhance.resolution, s.displace.fill.resolution, s.rotate.fill.resolution,
            s.background.resolution) == ("auto",) * 4


def test_verify_notes_only_explicit_sizes_that_differ_from_the_native_one(fam_dir, tmp_path):
    data = yaml.safe_load(open(_cfg(fam_dir, "sdxl")))
    data["root"] = str(fam_dir)
    data["enhance"]["resolution"] = 64  # differs from the tiny SDXL's 128
    data["displace"]["fill"]["resolution"] = 128  # the native size: nothing to say
    data["background"] = {"resolution": "auto"}
    cfg = tmp_path / "sizes.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["config", "check", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["models", "verify", "--config", str(cfg), "--role", "inpaint"], terminal_width=300)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "SDXL checkpoint works natively at 128 px; set explicitly: enhance.resolution 64" in out
    assert "displace.fill.resolution" not in out and "rotate.fill.resolution" not in out
    data["enhance"]["resolution"] = "huge"
    cfg.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["config", "check", "--config", str(cfg)])
    assert r.exit_code == 2 and "enhance.resolution" in r.output and "auto" in r.output, r.output


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_enhance_and_sd_displace_on_family_keep_background_exact(fam_dir, tmp_path, family):
    src = _scene(tmp_path)
    cfg = _cfg(fam_dir, family)
    r = runner.invoke(app, ["edit", "enhance", str(tmp_path / "p.png"), "--class", "handbag",
                            "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "e"), "--config", cfg])
    assert r.exit_code == 0, r.output
    res = np.asarray(Image.open(tmp_path / "e" / "p-enhance.png").convert("RGB"))
    edit = np.asarray(Image.open(tmp_path / "e" / "p-enhance.mask.png")) > 0
    assert edit.any() and np.array_equal(res[~edit], src[~edit])
    assert not np.array_equal(res[edit], src[edit])
    rec = json.loads((tmp_path / "e" / "p-enhance.json").read_text())["actions"][0]["record"]
    want = "StableDiffusionXLControlNetInpaintPipeline" if family == "sdxl" else "StableDiffusionControlNetInpaintPipeline"
    assert rec["pipeline"] == want and rec["family"] == family and rec["controlnet"] is True
    # the settings set no size: the crop works at the checkpoint's native one
    assert rec["params"]["resolution"] == "auto" and rec["resolution"] == NATIVE[family]
    assert max(rec["crop"]["work_size"]) == NATIVE[family]

    r = runner.invoke(app, ["edit", "displace", str(tmp_path / "p.png"), "--class", "handbag", "--x", "40",
                            "--mask", str(tmp_path / "m.png"), "--fill", "sd", "--param", "fill.recheck=false",
                            "--out", str(tmp_path / "d"), "--config", cfg])
    assert r.exit_code == 0, r.output
    res = np.asarray(Image.open(tmp_path / "d" / "p-displace.png").convert("RGB"))
    edit = np.asarray(Image.open(tmp_path / "d" / "p-displace.mask.png")) > 0
    assert np.array_equal(res[~edit], src[~edit])
    assert np.array_equal(res[30:66, 60:96], src[30:66, 20:56])  # the product, moved, exact
    fill = json.loads((tmp_path / "d" / "p-displace.json").read_text())["actions"][0]["record"]["fill"]
    assert fill["used"] == "sd" and fill["tries"][0]["fill"]["backend"] == "sd"
    assert fill["tries"][0]["fill"]["resolution"] == NATIVE[family]
    assert max(fill["tries"][0]["fill"]["crop"]["work_size"]) == NATIVE[family]


def test_sdxl_settings_without_sizes_work_at_its_native_size_and_an_explicit_one_wins(fam_dir, tmp_path):
    """A settings file that only points the diffusion roles at SDXL checkpoints (no resolution
    anywhere): enhance and background generate work at the SDXL model's native size; a size set
    in the file or by the action wins."""
    src = _scene(tmp_path)
    data = yaml.safe_load(open(_cfg(fam_dir, "sdxl")))
    data["root"] = str(fam_dir)
    for section in (data["enhance"], data["displace"]["fill"], data.get("rotate", {}).get("fill", {}),
                    data.get("background", {})):
        assert "resolution" not in section
    cfg = tmp_path / "plain.yaml"
    cfg.write_text(yaml.safe_dump(data))

    def enhance_rec(out: str, *extra: str) -> dict:
        r = runner.invoke(app, ["edit", "enhance", str(tmp_path / "p.png"), "--class", "handbag", "--mask",
                                str(tmp_path / "m.png"), "--out", str(tmp_path / out), "--config", str(cfg), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / out / "p-enhance.json").read_text())["actions"][0]["record"]

    rec = enhance_rec("auto", "--param", "controlnet=false")
    assert rec["family"] == "sdxl" and rec["resolution"] == 128 and max(rec["crop"]["work_size"]) == 128
    rec = enhance_rec("param", "--param", "controlnet=false", "--param", "resolution=64")
    assert rec["resolution"] == 64 and max(rec["crop"]["work_size"]) == 64
    data["enhance"]["resolution"] = 96
    cfg.write_text(yaml.safe_dump(data))
    rec = enhance_rec("file", "--param", "controlnet=false")
    assert rec["resolution"] == 96 and rec["params"]["resolution"] == 96

    from edit_helpers import run_action
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import load_settings

    settings = load_settings(cfg)
    reg = ModelRegistry(settings)
    img = Image.fromarray(src)
    mask = np.zeros(src.shape[:2], bool)
    mask[30:66, 20:56] = True
    # a 128x96 photo, capped at the native 128 px: works at its own size
    edit = run_action("background", img, mask, "handbag", {"mode": "generate", "steps": 2, "controlnet": False},
                      settings, reg)
    gen = edit.record["generate"]
    assert gen["resolution"] == 128 and gen["crop"]["work_size"] == [128, 96]
    assert np.array_equal(np.asarray(edit.image)[mask], src[mask])
    edit = run_action("background", img, mask, "handbag", {"mode": "generate", "steps": 2, "controlnet": False,
                                                           "resolution": 64}, settings, reg)
    assert edit.record["generate"]["resolution"] == 64 and edit.record["generate"]["crop"]["work_size"] == [64, 48]


def test_rotate_with_sdxl_fill(fam_dir, tmp_path):
    src = _scene(tmp_path)
    r = runner.invoke(app, ["edit", "rotate", str(tmp_path / "p.png"), "--class", "handbag",
                            "--mask", str(tmp_path / "m.png"), "--azimuth", "30", "--polar", "0", "--fill", "sd",
                            "--param", "fill.recheck=false", "--out", str(tmp_path / "r"),
                            "--config", _cfg(fam_dir, "sdxl")])
    assert r.exit_code == 0, r.output
    res = np.asarray(Image.open(tmp_path / "r" / "p-rotate.png").convert("RGB"))
    edit = np.asarray(Image.open(tmp_path / "r" / "p-rotate.mask.png")) > 0
    assert np.array_equal(res[~edit], src[~edit])
    rec = json.loads((tmp_path / "r" / "p-rotate.json").read_text())["actions"][0]["record"]
    assert rec["fill"]["used"] == "sd" and rec["fill"]["tries"][0]["fill"]["backend"] == "sd"
    assert rec["fill"]["tries"][0]["fill"]["resolution"] == NATIVE["sdxl"]
    assert rec["models"]["inpaint"]["source"].endswith("sdxl/inpaint")


def test_sd15_controlnet_and_lora_with_sdxl_inpaint_fail_verify_naming_both(fam_dir, tmp_path):
    cfg = _mixed_settings(fam_dir, tmp_path, "sdxl", controlnet_depth="controlnet_depth",
                          lcm_lora="lcm_lora/pytorch_lora_weights.safetensors")
    r = runner.invoke(app, ["models", "verify", "--config", cfg, "--role", "controlnet_depth", "--role", "lcm_lora"])
    assert r.exit_code == 3, r.output
    out = " ".join(r.output.split())
    assert "controlnet cross_attention_dim 32 (sd15) vs inpaint 64 (sdxl)" in out
    assert "made for SD 1.x" in out and "is SDXL" in out
    assert "LoRA cross_attention_dim 32 vs inpaint" in out
    # the family's own ControlNet passes
    r = runner.invoke(app, ["models", "verify", "--config", _cfg(fam_dir, "sdxl"), "--role", "controlnet_depth"])
    assert r.exit_code == 0, r.output


def test_sd15_lora_into_sdxl_refused_at_load(fam_dir, tmp_path):
    from pipeline.models.lora_weights import LoraError, load_spec
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import load_settings

    reg = ModelRegistry(load_settings(_cfg(fam_dir, "sdxl")))
    sd15_lora = load_spec(fam_dir / "tcd_lora" / "pytorch_lora_weights.safetensors")
    adapters = reg.adapters("inpaint")
    with pytest.raises(LoraError, match=r"cross_attention_dim 32 vs the SDXL pipeline .* 64"):
        adapters.activate([sd15_lora])
    assert adapters.loads == 0 and adapters.loaded == []
    # an SDXL LoRA of the same kind loads
    adapters.activate([load_spec(fam_dir / "sdxl" / "tcd_lora" / "pytorch_lora_weights.safetensors")])
    assert adapters.loads == 1
    adapters.deactivate()


def test_train_lora_on_sdxl_base_exports_kohya_sdxl_keys_that_reload(fam_dir, tmp_path):
    """train-lora on the tiny SDXL base (both text encoders, size/crop time ids), 2 steps: the
    kohya file uses sgm UNet names and lora_te1_/lora_te2_, and both files reproduce the trained
    UNet and text encoders in a fresh SDXL pipeline; the kohya file loads into the SDXL inpaint
    pipeline through the product's adapters."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    from lora.config import TrainConfig
    from lora.train import Trainer
    from pipeline.models.lora_weights import load_spec
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import load_settings

    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(2):
        a = np.random.RandomState(i).randint(0, 255, (40, 48, 3)).astype(np.uint8)
        Image.fromarray(a).save(ds / f"p{i}.png")
        (ds / f"p{i}.txt").write_text(f"a product photo, item {i}\n")
    reg = ModelRegistry(load_settings(_cfg(fam_dir, "sdxl")))
    cfg = TrainConfig(dataset=ds, output_dir=tmp_path / "o", tag="zzstyle", resolution=32, rank=4, alpha=2,
                      learning_rate=1e-2, text_encoder_lr=1e-2, batch_size=2, max_steps=2, train_text_encoder=True,
                      export_kohya=True, validation_prompt="{tag}, handbag", validation_images=1,
                      validation_steps=1)
    tr = Trainer(cfg, reg).prepare()
    assert tr.family.name == "sdxl" and tr.text_encoder_2 is not None
    batch = tr.dataset.collate([0, 1], None)
    assert batch["time_ids"].shape == (2, 6) and batch["time_ids"][0, 4:].tolist() == [32.0, 32.0]
    r = tr.train()
    assert len(r.losses) == 2 and all(np.isfinite(r.losses))
    assert r.manifest["base_model"]["family"] == "sdxl"
    # validation renders with the SDXL text-to-image pipeline at the training size
    assert r.validation_images and Image.open(r.validation_images[-1]).size == (32, 32)
    with safe_open(str(r.kohya_file), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys

    # both files reproduce the trained UNet (with SDXL's added conditioning) and text encoders
    for m in tr._trained_modules():
        m.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    tids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    with torch.no_grad():
        emb, pooled = tr._encode_sdxl(["zzstyle, handbag"])
        want = tr.unet(x, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
    for f in (r.lora_file, r.kohya_file):
        pipe = StableDiffusionXLPipeline.from_pretrained(reg.locate("base"))
        with torch.no_grad():
            before = pipe.unet(x, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
        assert (before - want).abs().max() > 1e-4  # training changed the UNet
        pipe.load_lora_weights(str(f), use_safetensors=True)
        tr2 = Trainer.__new__(Trainer)
        tr2.cfg, tr2.device = cfg, torch.device("cpu")
        tr2.tokenizer, tr2.text_encoder, tr2.tokenizer_2, tr2.text_encoder_2 = (
            pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
        with torch.no_grad():
            e2, p2 = tr2._encode_sdxl(["zzstyle, handbag"])
            got = pipe.unet(x, t, e2, added_cond_kwargs={"text_embeds": p2, "time_ids": tids}).sample
        assert torch.allclose(e2, emb, atol=1e-5) and torch.allclose(p2, pooled, atol=1e-5), f.name
        assert torch.allclose(got, want, atol=1e-4), (f.name, (got - want).abs().max())

    # the exported kohya file loads into the SDXL inpaint pipeline (enhance's path)
    adapters = reg.adapters("inpaint")
    adapters.activate([load_spec(r.kohya_file)])
    assert adapters.loads == 1
    pipe = reg.get("inpaint")
    lora_layers = [n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(lora_layers) == len({k.split(".")[0] for k in keys if k.startswith("lora_unet_")})
    adapters.deactivate()
