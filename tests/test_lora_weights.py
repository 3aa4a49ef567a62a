"""LoRA files: FILE[:WEIGHT] parsing, checks before any model runs, both on-disk layouts (peft /
diffusers and kohya / A1111) loading into the tiny inpaint pipeline, adapter switching without
reloading, exact no-op when disabled, clean failure for a LoRA made for another model."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.lora_weights import (
    LoraAdapters,
    LoraError,
    check_unique,
    load_spec,
    parse_lora,
    split_entry,
    split_spec,
)

from helpers.loras import make_diffusers_lora, make_kohya_lora




@pytest.fixture(scope="module")
def lora_files(tiny_dir, tmp_path_factory):
    """Two peft-made diffusers-format LoRAs and one kohya LoRA (UNet + text encoder) for the tiny set."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    d = tmp_path_factory.mktemp("loras")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "inpaint" / "unet")
    te = CLIPTextModel.from_pretrained(tiny_dir / "inpaint" / "text_encoder")
    return {
        "a": make_diffusers_lora(unet, d / "style_a.safetensors", seed=1),
        "b": make_diffusers_lora(unet, d / "style_b.safetensors", seed=2),
        "kohya": make_kohya_lora(unet, d / "kohya_style.safetensors", text_encoder=te, seed=3),
    }


@pytest.fixture(scope="module")
def pipe(tiny_settings):
    # Its own registry: adapters loaded here never touch the session registry's UNet.
    from pipeline.models.registry import ModelRegistry

    return ModelRegistry(tiny_settings).get("inpaint")


def generate(pipe):
    from pipeline.ops.inpaint import sd_inpaint

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = sd_inpaint(pipe, img, mask, seed=0, steps=2, guidance=7.0, prompt="a bag")
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------
# FILE[:WEIGHT]


@pytest.mark.parametrize("text, path, weight", [
    ("style.safetensors", "style.safetensors", 1.0),
    ("style.safetensors:0.8", "style.safetensors", 0.8),
    ("style.safetensors:-1", "style.safetensors", -1.0),
    ("style.safetensors:1e-1", "style.safetensors", 0.1),
    (" style.safetensors : .5 ", "style.safetensors", 0.5),
    (r"C:\loras\style.safetensors", r"C:\loras\style.safetensors", 1.0),
    (r"C:\loras\style.safetensors:0.7", r"C:\loras\style.safetensors", 0.7),
    ("a:b/style.safetensors:2", "a:b/style.safetensors", 2.0),
    ("style.safetensors:strong", "style.safetensors:strong", 1.0),
    ("style.safetensors:nan", "style.safetensors:nan", 1.0),
])
def test_split_spec(text, path, weight):
    assert split_spec(text) == (path, weight)


@pytest.mark.parametrize("text, match", [("", "names no file"), ("  ", "names no file"), (":0.5", "names no file"),
                                         ("x.safetensors:11", "outside"), ("x.safetensors:-1e3", "outside"),
                                         (3, "FILE:WEIGHT")])
def test_split_spec_refuses(text, match):
    with pytest.raises(LoraError, match=match):
        split_spec(text)


def test_mapping_entries_as_rules_files_write_them():
    assert split_entry({"path": "a.safetensors", "weight": 0.5}) == ("a.safetensors", 0.5)
    assert split_entry({"path": "a.safetensors"}) == ("a.safetensors", 1.0)
    assert split_entry("a.safetensors:2") == ("a.safetensors", 2.0)
    for bad, match in [({"file": "a"}, "holds 'path'"), ({"path": "a", "weight": "x"}, "must be a number"),
                       ({"path": "a", "weight": True}, "must be a number"), ({"path": "a", "weight": 50}, "outside"),
                       ({"path": "", "weight": 1}, "names no file")]:
        with pytest.raises(LoraError, match=match):
            split_entry(bad)


def test_file_checks_name_the_file_and_reason(tmp_path, lora_files):
    with pytest.raises(LoraError, match="not found.*nope.safetensors"):
        load_spec(tmp_path / "nope.safetensors")
    with pytest.raises(LoraError, match="not a file"):
        load_spec(tmp_path)
    ckpt = tmp_path / "style.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoraError, match="only .safetensors"):
        load_spec(ckpt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not safetensors")
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        load_spec(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(LoraError, match="holds no LoRA weights"):
        load_spec(plain)
    with pytest.raises(LoraError, match="outside"):
        load_spec(lora_files["a"], weight=float("inf"))


def test_spec_hash_format_and_adapter_name(lora_files, tmp_path):
    a = load_spec(lora_files["a"], 0.5)
    assert a.sha256 == hashlib.sha256(lora_files["a"].read_bytes()).hexdigest()
    assert a.weight == 0.5 and a.path == lora_files["a"].resolve()
    assert (a.format, a.components) == ("diffusers", ("unet",))
    assert a.adapter_name == "lora_" + a.sha256[:16]
    k = load_spec(lora_files["kohya"])
    assert (k.format, k.components) == ("kohya", ("unet", "text_encoder"))
    # the same content elsewhere is the same adapter; given twice in one call it is refused
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(lora_files["a"].read_bytes())
    assert load_spec(copy).adapter_name == a.adapter_name
    with pytest.raises(LoraError, match="given twice"):
        check_unique([a, load_spec(copy, 0.3)])
    rec = a.to_record()
    assert rec["sha256"] == a.sha256 and rec["weight"] == 0.5 and rec["file"] == str(a.path)


def test_relative_paths_are_looked_up_in_each_base(lora_files, tmp_path, monkeypatch):
    base = lora_files["a"].parent
    spec = parse_lora("style_a.safetensors:0.25", bases=(None, base))
    assert spec.path == lora_files["a"].resolve() and spec.weight == 0.25
    assert parse_lora({"path": "style_a.safetensors", "weight": 0.25}, bases=(base,)) == spec
    assert parse_lora(spec) is spec
    monkeypatch.chdir(base)
    assert parse_lora("style_b.safetensors").path == lora_files["b"].resolve()
    with pytest.raises(LoraError) as ei:
        parse_lora("missing.safetensors:0.5", bases=(None, tmp_path))
    assert "missing.safetensors" in str(ei.value) and str(tmp_path) in str(ei.value)


# ------------------------------------------------------------------------------------------------
# loading into the tiny pipeline


def test_both_layouts_load_change_the_output_and_disable_exactly(pipe, lora_files):
    base = generate(pipe)
    adapters = LoraAdapters(pipe)
    a, k = load_spec(lora_files["a"]), load_spec(lora_files["kohya"])
    recs = adapters.activate([a])
    assert recs[0]["cached"] is False and recs[0]["adapter"] == a.adapter_name
    with_a = generate(pipe)
    adapters.activate([k])
    lists = pipe.get_list_adapters()
    assert a.adapter_name in lists["unet"] and k.adapter_name in lists["unet"]
    assert k.adapter_name in lists["text_encoder"]  # kohya lora_te_* keys went into the text encoder
    with_k = generate(pipe)
    assert not (with_a == base).all() and not (with_k == base).all() and not (with_a == with_k).all()
    adapters.deactivate()
    assert (generate(pipe) == base).all()  # disabled layers compute exactly the base layers
    adapters.activate([a])
    assert (generate(pipe) == with_a).all()  # switching back: the same adapter, not reloaded
    assert adapters.loads == 2
    adapters.activate([])  # nothing asked for: every LoRA layer off
    assert (generate(pipe) == base).all()
    adapters.activate([load_spec(lora_files["a"], 0.0)])
    assert (generate(pipe) == base).all()  # weight 0 is no LoRA at all
    adapters.activate([load_spec(lora_files["a"], 0.5), load_spec(lora_files["kohya"], 0.5)])
    both = generate(pipe)
    assert not (both == with_a).all() and not (both == with_k).all()
    adapters.deactivate()
    assert adapters.loads == 2


def test_least_recently_used_adapters_are_evicted(pipe, lora_files):
    adapters = LoraAdapters(pipe, max_loaded=1)
    a, b = load_spec(lora_files["a"]), load_spec(lora_files["b"])
    adapters.activate([a])
    adapters.activate([b])
    present = {n for names in pipe.get_list_adapters().values() for n in names}
    assert b.adapter_name in present and a.adapter_name not in present
    before = adapters.loads
    recs = adapters.activate([a])  # evicted, so read from the file again
    assert adapters.loads == before + 1 and recs[0]["cached"] is False
    assert adapters.loaded == [a.adapter_name]
    adapters.deactivate()


def test_two_managers_of_one_unet_stay_consistent(pipe, lora_files):
    """An adapter one manager deleted is loaded again by the other; one the other loaded is
    adopted, not loaded twice (the name is the content hash)."""
    one, two = LoraAdapters(pipe, max_loaded=1), LoraAdapters(pipe)
    a, b = load_spec(lora_files["a"]), load_spec(lora_files["b"])
    two.activate([a])
    ref = generate(pipe)
    recs = one.activate([a])
    assert recs[0]["cached"] is True and one.loads == 0  # adopted
    one.activate([b])  # evicts a from the model
    loads = two.loads
    two.activate([a])
    assert two.loads == loads + 1 and (generate(pipe) == ref).all()
    two.deactivate()


def test_a_lora_for_another_model_fails_cleanly(pipe, tmp_path, lora_files):
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    wrong_shape = tmp_path / "sdxl_like.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 99), f"{key}.lora_up.weight": torch.randn(64, 4)},
              str(wrong_shape))
    key9 = key.replace("blocks_1", "blocks_9")
    no_match = tmp_path / "other_layout.safetensors"
    save_file({f"{key9}.lora_down.weight": torch.randn(4, 64), f"{key9}.lora_up.weight": torch.randn(64, 4)},
              str(no_match))
    base = generate(pipe)
    adapters = LoraAdapters(pipe)
    for f in (wrong_shape, no_match):
        spec = load_spec(f)
        with pytest.raises(LoraError, match="could not be loaded|matched no layer") as ei:
            adapters.activate([spec])
        assert f.name in str(ei.value)
        present = {n for names in pipe.get_list_adapters().values() for n in names}
        assert spec.adapter_name not in present
    adapters.activate([load_spec(lora_files["a"])])  # still usable afterwards
    adapters.deactivate()
    assert (generate(pipe) == base).all()
