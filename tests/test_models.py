import threading
import time

import numpy as np
import pytest
import torch

from pipeline.models.registry import ModelLoadError, ModelRegistry, select_repo_files
from pipeline.settings import ROLES, load_settings


@pytest.mark.parametrize("role", ROLES)
def test_every_tiny_role_loads_through_the_registry(registry, role):
    info = registry.verify(role)
    assert info["parameters"] > 0
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_roles_are_loaded_once_and_kept_warm(tiny_settings):
    reg = ModelRegistry(tiny_settings)
    results = []
    threads = [threading.Thread(target=lambda: results.append(reg.get("clip"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert reg.get("clip") is results[0]


def test_tiny_models_run_forward(registry):
    """The loaded objects are usable as the edit operations will use them."""
    from segment_anything import SamPredictor

    clip = registry.get("clip")
    x = clip.processor(text=["a bag", "a shoe"], images=np.zeros((40, 60, 3), np.uint8), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert clip.model(**x).logits_per_image.shape == (1, 2)
    sam = registry.get("sam")
    pred = SamPredictor(sam.model)
    img = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    pred.set_image(img)
    masks, scores, _ = pred.predict(point_coords=np.array([[20, 20]]), point_labels=np.array([1]))
    assert masks.shape == (3, 48, 80)
    nv = registry.get("novel_view")
    assert nv.unet.config.in_channels == 8
    assert nv.cc_projection.config.in_channel == nv.image_encoder.config.projection_dim + 4
    assert nv.cc_projection.config.out_channel == nv.unet.config.cross_attention_dim
    assert registry.get("inpaint").unet.config.in_channels == 9


def test_tiny_layouts_match_real_checkpoints(tiny_dir):
    import json

    for role in ("base", "inpaint"):
        idx = json.loads((tiny_dir / role / "model_index.json").read_text())
        for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert comp in idx and (tiny_dir / role / comp).is_dir()
        assert (tiny_dir / role / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    idx = json.loads((tiny_dir / "novel_view" / "model_index.json").read_text())
    assert idx["_class_name"] == "Zero1to3StableDiffusionPipeline"
    for comp in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler", "cc_projection"):
        assert comp in idx and (tiny_dir / "novel_view" / comp / "").is_dir()
    assert (tiny_dir / "controlnet_depth" / "config.json").is_file()
    for role in ("clip", "depth", "upscaler", "captioner"):
        assert (tiny_dir / role / "config.json").is_file() and (tiny_dir / role / "model.safetensors").is_file()
    assert (tiny_dir / "sam" / "sam_tiny.safetensors").is_file()


def _settings_with(tmp_path, models_yaml: str):
    p = tmp_path / "s.yaml"
    p.write_text(f"runtime: {{device: cpu, offline: true}}\npaths: {{model_cache: {tmp_path / 'cache'}}}\nmodels:\n{models_yaml}")
    return load_settings(p)


def test_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    reg = ModelRegistry(_settings_with(tmp_path, "  clip: {repo: openai/clip-vit-base-patch32}\n"))
    with pytest.raises(ModelLoadError) as ei:
        reg.get("clip")
    msg = str(ei.value)
    assert "'clip'" in msg and "openai/clip-vit-base-patch32" in msg and "offline" in msg
    assert "models pull" in msg
    assert reg.status("clip").available is False


def test_missing_local_path_names_role(tmp_path):
    reg = ModelRegistry(_settings_with(tmp_path, f"  depth: {{path: {tmp_path / 'nothing'}}}\n"))
    with pytest.raises(ModelLoadError, match=r"model role 'depth'.*does not exist"):
        reg.get("depth")


def test_broken_local_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "clip"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    reg = ModelRegistry(_settings_with(tmp_path, f"  clip: {{path: {bad}}}\n"))
    with pytest.raises(ModelLoadError, match=r"model role 'clip'"):
        reg.get("clip")


def test_sam_pth_loads_with_weights_only_and_converts(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    state = load_file(str(tiny_dir / "sam" / "sam_tiny.safetensors"))
    pth = tmp_path / "sam_tiny.pth"
    torch.save(state, pth)
    reg = ModelRegistry(_settings_with(tmp_path, f"  sam: {{path: {pth}, model_type: auto}}\n"))
    assert reg.get("sam").model_type == "custom"
    assert reg.converted_sam_path(pth) is None
    reg.pull("sam")
    conv = reg.converted_sam_path(pth)
    assert conv is not None and conv.suffix == ".safetensors" and conv.parent == tmp_path / "cache" / "sam"
    reg2 = ModelRegistry(reg.settings)
    p1 = dict(reg.get("sam").model.named_parameters())
    for k, v in reg2.get("sam").model.named_parameters():
        assert torch.equal(v, p1[k])


def test_sam_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pth = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, pth)
    reg = ModelRegistry(_settings_with(tmp_path, f"  sam: {{path: {pth}}}\n"))
    with pytest.raises(ModelLoadError, match="'sam'"):
        reg.get("sam")


def test_sam_model_type_mismatch(tmp_path, tiny_dir):
    reg = ModelRegistry(_settings_with(tmp_path, f"  sam: {{path: {tiny_dir / 'sam'}, model_type: vit_h}}\n"))
    with pytest.raises(ModelLoadError, match="vit_h"):
        reg.get("sam")


def test_sam_arch_inference_matches_official_vit_b():
    from segment_anything import sam_model_registry

    from pipeline.models.sam_loader import infer_arch, standard_type

    with torch.device("meta"):
        sam = sam_model_registry["vit_b"]()
    arch = infer_arch(sam.state_dict())
    assert standard_type(arch) == "vit_b"
    assert (arch.img_size, arch.window_size, arch.num_heads, arch.global_attn_indexes) == (1024, 14, 12, (2, 5, 8, 11))


def test_select_repo_files_prefers_safetensors_and_skips_variants():
    files = [
        "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "README.md",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.msgpack",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/model.safetensors", "text_encoder/flax_model.msgpack",
    ]
    got = select_repo_files(files, "diffusers")
    assert got == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "text_encoder/model.safetensors",
    ])


def test_runtime_is_cpu_fp32_without_gpu(registry):
    rt = registry.runtime
    assert rt.device.type == "cpu" and rt.dtype == torch.float32 and rt.offload == "off"


def test_sam_encoder_runs_under_bf16_autocast_when_runtime_dtype_is_bfloat16(tiny_dir):
    """runtime.dtype bfloat16: SAM's weights stay float32, its image encoder runs under bf16
    autocast and hands float32 features on, so detection runs unchanged; float32 leaves SAM alone."""
    import numpy as np
    import torch

    from pipeline.detect.detector import Detector
    from pipeline.models.registry import ModelRegistry, sam_dtype
    from pipeline.settings import load_settings

    results = {}
    for dtype in ("float32", "bfloat16"):
        settings = load_settings(tiny_dir / "settings.yaml")
        settings.runtime.dtype = dtype
        reg = ModelRegistry(settings)
        sam = reg.get("sam")
        assert all(p.dtype == torch.float32 for p in sam.model.parameters())
        assert reg.verify("sam")["dtype"] == sam_dtype(sam)
        det = Detector(reg, settings.detect)
        rgb = np.zeros((96, 128, 3), np.uint8)
        rgb[20:70, 30:90] = (200, 40, 40)
        det.proposer.set_image(rgb)
        feats = det.proposer.predictor.features
        assert feats.dtype == torch.float32
        results[dtype] = (sam_dtype(sam), feats)
        res = det.detect(__import__("PIL.Image", fromlist=["Image"]).fromarray(rgb))
        assert res.proposals > 0 and res.detections
    assert results["float32"][0] == "float32"
    assert results["bfloat16"][0] == "float32 (encoder under bfloat16 autocast)"
    # Same embedding up to bf16 rounding: the encoder's math, not a different model.
    a, b = results["float32"][1], results["bfloat16"][1]
    assert torch.allclose(a, b, rtol=0.1, atol=0.1 * float(a.abs().max()))


def test_commercial_use_refuses_roles_marked_non_commercial(tiny_dir):
    from typer.testing import CliRunner

    from cli.app import app
    from pipeline.models.registry import ModelLoadError, ModelRegistry
    from pipeline.settings import load_settings

    settings = load_settings(tiny_dir / "settings.yaml")
    settings.models.inpaint.commercial = False
    assert ModelRegistry(settings).get("inpaint") is not None  # non-commercial work: allowed

    settings.commercial_use = True
    reg = ModelRegistry(settings)
    with pytest.raises(ModelLoadError, match=r"inpaint.*non-commercial.*commercial_use is true") as e:
        reg.get("inpaint")
    assert "models.inpaint" in e.value.hint and not reg.is_loaded("inpaint")
    assert reg.get("clip") is not None  # roles not marked stay usable

    import yaml

    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["commercial_use"] = True
    data["models"]["inpaint"]["commercial"] = False
    data["models"]["clip"]["commercial"] = True
    cfg = tiny_dir / "settings-commercial.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(app, ["models", "list", "--config", str(cfg)], terminal_width=250)
    assert r.exit_code == 0, r.output
    lines = {ln.split()[1]: ln for ln in r.output.splitlines() if ln.startswith("│ ") and len(ln.split()) > 2}
    assert "refused" in lines["inpaint"] and "cleared" in lines["clip"] and "not confirmed" in lines["sam"]


# ------------------------------------------------------------------------------------------------
# state built on the roles: derived objects, adapters, the per-role lock, unload


class _Held:
    """A stand-in object a weak reference can point at."""


def test_derived_objects_are_built_once_and_follow_their_roles(tiny_settings):
    import gc
    import weakref

    reg = ModelRegistry(tiny_settings)
    reg.put("depth", _Held())
    reg.put("upscaler", _Held())
    built = []

    def build():
        built.append(reg.get("depth"))
        time.sleep(0.05)  # a slow build: every thread below asks while it runs
        return _Held()

    got = []
    threads = [threading.Thread(target=lambda: got.append(reg.derived("d", build, roles=("depth",))))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(built) == 1 and len(got) == 6 and all(g is got[0] for g in got)
    other = reg.derived("u", _Held, roles=("upscaler",))
    first, model = weakref.ref(got[0]), weakref.ref(reg.get("depth"))
    got.clear()
    built.clear()

    reg.unload("depth")
    gc.collect()
    assert first() is None and model() is None  # the role and what was built on it are gone
    assert reg.derived("u", _Held, roles=("upscaler",)) is other  # built on another role: kept
    assert not reg.is_loaded("depth")
    # Replacing a role (put) drops what was built on the old object too.
    reg.put("upscaler", _Held())
    assert reg.derived("u", _Held, roles=("upscaler",)) is not other
    with pytest.raises(KeyError, match="unknown model role"):
        reg.derived("x", _Held, roles=("nope",))


def test_what_is_built_while_its_role_is_unloaded_is_not_kept(tiny_settings):
    reg = ModelRegistry(tiny_settings)
    reg.put("depth", _Held())

    def build_during_unload():
        obj = _Held()
        reg.unload("depth")  # as another thread might, while this one builds on the old object
        return obj

    stale = reg.derived("d", build_during_unload, roles=("depth",))
    fresh = reg.derived("d", _Held, roles=("depth",))
    assert fresh is not stale and reg.derived("d", _Held, roles=("depth",)) is fresh


def test_unload_waits_for_the_role_lock(tiny_settings):
    reg = ModelRegistry(tiny_settings)
    reg.put("depth", _Held())
    done = threading.Event()
    with reg.lock("depth"):
        with reg.lock("depth"):  # re-entrant: a holder may call code that takes it again
            t = threading.Thread(target=lambda: (reg.unload("depth"), done.set()))
            t.start()
            assert not done.wait(0.3) and reg.is_loaded("depth")  # never freed under a running caller
    assert done.wait(10) and not reg.is_loaded("depth")
    assert reg.lock("depth") is reg.lock("depth") and reg.lock("depth") is not reg.lock("inpaint")


def test_unload_frees_clip_while_a_detector_that_used_it_lives(tiny_settings):
    """A Detector asks the registry for its CLIP scorer and text embeddings each time, so the
    processor's long-lived detector never keeps an unloaded CLIP alive; scores stay the same after
    the reload."""
    import gc
    import weakref

    from PIL import Image

    from pipeline.detect.detector import Detector

    reg = ModelRegistry(tiny_settings)
    det = Detector(reg, tiny_settings.detect)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    classes = tiny_settings.detect.classes
    before = det.score_views(img, [(0, 0, 32, 32), (20, 10, 60, 44)], classes)
    assert det.bank is Detector(reg, tiny_settings.detect).bank  # one text bank per registry
    refs = [weakref.ref(reg.get("clip").model), weakref.ref(det.scorer), weakref.ref(det.bank)]
    reg.unload("clip")
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
    after = det.score_views(img, [(0, 0, 32, 32), (20, 10, 60, 44)], classes)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
