"""Few-step samplers (pipeline.models.samplers) on the tiny models: each sampler runs enhance and the SD
fill with its own scheduler, steps and guidance; its acceleration LoRA (a registry role, from
`models make-tiny` in the published file layout) and the class's style LoRA are both active
(removing either changes the output); nothing leaks into the next edit; records name it all."""


import numpy as np
import pytest
from PIL import Image

from pipeline.ops.enhance import enhance
from pipeline.ops.inpaint import fill
from pipeline.models.lora_weights import load_spec
from pipeline.models.registry import ModelRegistry
from pipeline.models.samplers import ACCEL_ROLES, SAMPLERS, plan_sampler
from pipeline.settings import EnhanceSettings, load_settings, FillSettings

from helpers.loras import make_diffusers_lora

H, W = 64, 80
FEW = [s for s in SAMPLERS if s != "default"]
SCHEDULERS = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "hyper": "DDIMScheduler"}


def scene(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:H, :W]
    m = (xx - 40) ** 2 + (yy - 32) ** 2 <= 144
    return Image.fromarray(img, "RGB"), m


@pytest.fixture(scope="module")
def style(registry, tmp_path_factory):
    unet = registry.get("inpaint").unet
    return load_spec(make_diffusers_lora(unet, tmp_path_factory.mktemp("st") / "style.safetensors", seed=5), 0.8)


def params(sampler, **kw):
    return EnhanceSettings(sampler=sampler, steps=2, resolution=64, controlnet=False, strength=1.0, **kw)


def run(registry, sampler, loras=(), **kw):
    img, m = scene()
    return enhance(img, m, "bag", params(sampler, **kw), registry, loras=loras, seed=3)


def test_tiny_set_has_acceleration_loras_in_published_layout(tiny_dir):
    assert (tiny_dir / "lcm_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tiny_dir / "tcd_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tiny_dir / "hyper_lora" / "Hyper-SD15-8steps-lora.safetensors").is_file()


def test_plan_uses_samplers_section(tiny_settings):
    p = plan_sampler("default", 30, 7.0, tiny_settings.samplers)
    assert (p.steps, p.guidance, p.role, p.scheduler) == (30, 7.0, None, None)
    p = plan_sampler("tcd", 30, 7.0, tiny_settings.samplers)
    assert (p.steps, p.guidance, p.eta, p.role, p.scheduler) == (2, 0.0, 0.3, "tcd_lora", "TCDScheduler")
    from pipeline.settings import SamplersSettings

    shipped = SamplersSettings()
    assert (shipped.lcm.steps, shipped.lcm.guidance) == (4, 1.0)
    assert (shipped.hyper.steps, shipped.hyper.guidance) == (8, 0.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        plan_sampler("euler", 4, 1.0, shipped)


@pytest.mark.parametrize("sampler", FEW)
def test_each_sampler_stacks_acceleration_and_style_lora(registry, style, sampler):
    pipe = registry.get("inpaint")
    sched_before = pipe.scheduler
    both = run(registry, sampler, loras=[style])
    rec = both.record["sampler"]
    assert rec["sampler"] == sampler and rec["scheduler"] == SCHEDULERS[sampler]
    assert rec["acceleration"]["role"] == ACCEL_ROLES[sampler]
    assert rec["acceleration"]["provenance"]["source"]
    assert len(rec["acceleration"]["sha256"]) == 64
    assert rec["acceleration"]["weight"] == 1.0
    assert set(rec["active_adapters"]) == {rec["acceleration"]["adapter"], style.adapter_name}
    assert both.record["loras"][0]["sha256"] == style.sha256
    assert both.record["steps"] == 2
    # removing either LoRA changes the result: both were active
    no_style = run(registry, sampler)
    assert np.asarray(no_style.image).tobytes() != np.asarray(both.image).tobytes()
    plain = run(registry, "default", loras=[style])
    assert np.asarray(plain.image).tobytes() != np.asarray(both.image).tobytes()
    # nothing leaks: the scheduler is back and a default run is as before
    assert pipe.scheduler is sched_before
    again = run(registry, "default", loras=[style])
    assert np.asarray(again.image).tobytes() == np.asarray(plain.image).tobytes()
    # deterministic with the sampler too
    assert np.asarray(run(registry, sampler, loras=[style]).image).tobytes() == np.asarray(both.image).tobytes()


def test_acceleration_weight_is_its_own(tiny_dir):
    import yaml

    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["samplers"]["lcm"]["lora_weight"] = 0.5
    p = tiny_dir / "settings_w.yaml"
    p.write_text(yaml.safe_dump(data))
    reg = ModelRegistry(load_settings(p))
    e = run(reg, "lcm")
    assert e.record["sampler"]["acceleration"]["weight"] == 0.5


@pytest.mark.parametrize("sampler", FEW)
def test_sd_fill_with_sampler(registry, sampler):
    img, m = scene(1)
    fs = FillSettings(backend="sd", steps=3, guidance=2.0, resolution=64, sampler=sampler, mask_dilation=0, blend=0)
    out, rec = fill(img, m, fs, registry)
    assert rec["sampler"]["sampler"] == sampler and rec["sampler"]["scheduler"] == SCHEDULERS[sampler]
    assert rec["steps"] == 2 and rec["sampler"]["acceleration"]["role"] == ACCEL_ROLES[sampler]
    base, brec = fill(img, m, fs.model_copy(update={"steps": 2, "sampler": "default"}), registry)
    assert brec["sampler"]["sampler"] == "default" and brec["sampler"]["acceleration"] is None
    assert np.asarray(out).tobytes() != np.asarray(base).tobytes()
    # outside the hole (no dilation) nothing changed
    assert (np.asarray(out)[~m] == np.asarray(img)[~m]).all()


def test_sampler_in_rules_and_settings(tiny_settings):
    from pipeline.settings import DisplaceSettings, RotateSettings

    assert EnhanceSettings().sampler == "default"
    assert DisplaceSettings(fill={"sampler": "lcm"}).fill.sampler == "lcm"
    assert RotateSettings(fill={"sampler": "hyper"}).fill.sampler == "hyper"
    with pytest.raises(Exception):
        EnhanceSettings(sampler="euler")


def _cli_scene(tmp_path):
    img = np.full((96, 128, 3), (180, 180, 180), np.uint8)
    img[30:70, 20:60] = (150, 40, 40)
    mask = np.zeros((96, 128), np.uint8)
    mask[30:70, 20:60] = 255
    Image.fromarray(img).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")


@pytest.mark.parametrize("op,extra,path", [
    ("enhance", [], ("sampler",)),
    ("displace", ["--x", "30", "--fill", "sd"], ("fill", "tries", 0, "fill", "sampler")),
    # --sampler reaches rotate's fill (fill.sampler), not its novel view; --param reaches a fill field
    ("rotate", ["--azimuth", "20", "--fill", "sd", "--param", "fill.steps=3", "--param", "upscale=off"],
     ("fill", "tries", 0, "fill", "sampler")),
])
def test_cli_run_op_sampler(tiny_dir, tmp_path, op, extra, path):
    import json

    from typer.testing import CliRunner

    from cli.app import app

    _cli_scene(tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["edit", op, str(tmp_path / "p.png"), "--class", "handbag", "--sampler", "lcm",
                                 "--mask", str(tmp_path / "m.png"), *extra, "--out", str(out),
                                 "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / f"p-{op}.json").read_text())["actions"][0]["record"]
    for k in path:
        rec = rec[k]
    assert rec["sampler"] == "lcm" and rec["scheduler"] == "LCMScheduler"
    assert rec["acceleration"]["role"] == "lcm_lora"


def test_cli_run_bad_sampler_names_flag(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    _cli_scene(tmp_path)
    for op in ("enhance", "displace"):
        r = CliRunner().invoke(app, ["edit", op, str(tmp_path / "p.png"), "--class", "handbag",
                                     "--sampler", "euler", "--mask", str(tmp_path / "m.png"),
                                     "--config", str(tiny_dir / "settings.yaml")])
        assert r.exit_code == 2 and "--sampler" in r.output, r.output


@pytest.mark.parametrize("sampler", FEW)
def test_generate_with_sampler_stacks_loras_and_restores_scheduler(registry, tiny_settings, tmp_path, sampler):
    from lora.generate import generate_images

    pipe = registry.get("base")
    before = pipe.scheduler
    style_file = make_diffusers_lora(pipe.unet, tmp_path / "gstyle.safetensors", seed=9)
    style_spec = load_spec(style_file, 0.7)
    kw = dict(n=1, seed=2, width=64, height=64)
    fast = generate_images(registry, tiny_settings, "handbag", out_dir=tmp_path / "f", loras=[style_spec],
                           sampler=sampler, **kw)[0]
    rec = fast.record
    assert rec["sampler"]["sampler"] == sampler and rec["sampler"]["scheduler"] == SCHEDULERS[sampler]
    assert rec["sampler"]["acceleration"]["role"] == ACCEL_ROLES[sampler] and rec["steps"] == 2
    assert rec["loras"][0]["sha256"] == style_spec.sha256
    assert pipe.scheduler is before
    no_style = generate_images(registry, tiny_settings, "handbag", out_dir=tmp_path / "n", sampler=sampler, **kw)[0]
    plain = generate_images(registry, tiny_settings, "handbag", out_dir=tmp_path / "p", loras=[style_spec],
                            steps=2, **kw)[0]
    assert plain.record["sampler"]["acceleration"] is None
    img = lambda g: np.asarray(Image.open(g.image_path))  # noqa: E731
    a, b, c = img(fast), img(no_style), img(plain)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
