"""LoRA training on the tiny base model: dataset rules, the overfit check, exact resume, the
exports loading into diffusers pipelines (diffusers and kohya formats), masked loss."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora.config import TrainConfig, TrainConfigError
from lora.dataset import (
    DatasetError,
    full_caption,
    load_dataset,
    make_buckets,
    nearest_bucket,
    scan_dataset,
    shuffle_caption,
)

TAG = "ppzocketv2"




def product_photo(seed: int, size=(48, 40)) -> Image.Image:
    """A flat backdrop with a textured rectangle "product" in the middle (RGB uint8)."""
    rs = np.random.RandomState(seed)
    w, h = size
    a = np.empty((h, w, 3), np.uint8)
    a[:] = rs.randint(40, 220, 3)
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rs.randint(0, 255, (h - 2 * (h // 4), w - 2 * (w // 4), 3))
    return Image.fromarray(a)


def product_mask(size=(48, 40)) -> np.ndarray:
    w, h = size
    m = np.zeros((h, w), bool)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    return m


def write_dataset(root: Path, n: int = 2, captions=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        product_photo(i).save(root / f"p{i}.png")
        if captions:
            (root / f"p{i}.txt").write_text(f"a product photo, item {i}\n")
    return root


def config(tmp: Path, dataset: Path, **kw) -> TrainConfig:
    base = dict(dataset=dataset, output_dir=tmp, tag=TAG, resolution=32, rank=4, targets="attn",
                learning_rate=1e-2, batch_size=1, max_steps=4)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------
# Dataset (no models)


def test_kohya_layout_repeats_captions_and_tag(tmp_path):
    root = write_dataset(tmp_path / "ds")
    sub = tmp_path / "ds" / "6_ppzocketv2 bag"
    sub.mkdir()
    product_photo(7).save(sub / "x.jpg")
    (sub / "x.txt").write_text(f"{TAG}, red bag\n\n")  # already tagged: not tagged twice
    (tmp_path / "ds" / "notes").mkdir()
    scan = scan_dataset(root)
    assert [(e.rel, e.repeats) for e in scan.entries] == [("p0.png", 1), ("p1.png", 1), ("6_ppzocketv2 bag/x.jpg", 6)]
    assert any("notes/" in i for i in scan.ignored)
    ds = load_dataset(config(tmp_path / "o", root))
    assert ds.samples_per_epoch == 8
    caps = {it.rel: it.caption for it in ds.items}
    assert caps["p0.png"] == f"{TAG}, a product photo, item 0"
    assert caps["6_ppzocketv2 bag/x.jpg"] == f"{TAG}, red bag"
    # every image resized to cover the 32 px square; the epoch plan covers every repeat once
    assert all(min(it.pixels.shape[:2]) == 32 for it in ds.items)
    batches = ds.epoch_batches(0, 3, seed=0)
    assert sorted(i for b in batches for i in b) == [0, 1] + [2] * 6
    assert ds.epoch_batches(0, 3, seed=0) == batches != ds.epoch_batches(1, 3, seed=0)


def test_metadata_jsonl_layout(tmp_path):
    root = write_dataset(tmp_path / "ds", captions=False)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "p0.png", "text": "studio shot"}) + "\n"
                                         + json.dumps({"file_name": "p1.png", "caption": "on white", "repeats": 3})
                                         + "\n")
    ds = load_dataset(config(tmp_path / "o", root))
    assert [(it.caption, it.repeats) for it in ds.items] == [(f"{TAG}, studio shot", 1), (f"{TAG}, on white", 3)]
    (root / "metadata.jsonl").write_text('{"file_name": "../outside.png"}\nnot json\n')
    with pytest.raises(DatasetError) as e:
        scan_dataset(root)
    assert "outside the dataset" in str(e.value) and ":2: not JSON" in str(e.value)


def test_dataset_errors_list_every_bad_file(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        scan_dataset(write_dataset(tmp_path / "empty", n=0))
    root = write_dataset(tmp_path / "ds", captions=False)
    (root / "p0.txt").write_text("captioned\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "broken.txt").write_text("x")
    (root / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        load_dataset(config(tmp_path / "o", root))
    msg = str(e.value)
    assert "2 unreadable image(s)" in msg and "broken.jpg" in msg and "empty.png: empty file" in msg
    assert "without a caption" in msg and "no caption: p1.png" in msg and "--missing-caption tag" in msg
    # policy "tag": the uncaptioned image trains with the tag alone (unreadable ones still refused)
    (root / "broken.jpg").unlink()
    (root / "empty.png").unlink()
    ds = load_dataset(config(tmp_path / "o", root, missing_caption="tag"))
    assert sorted(it.caption for it in ds.items) == [TAG, f"{TAG}, captioned"]


def test_captions_and_buckets_helpers():
    import torch

    assert full_caption(TAG, None) == TAG
    assert full_caption(TAG, " , ") == TAG
    assert full_caption(TAG, f"{TAG}, bag") == f"{TAG}, bag"
    assert full_caption(TAG, "bag, studio") == f"{TAG}, bag, studio"
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert shuffle_caption(f"{TAG}, a, b, c, d", 1, g).startswith(f"{TAG}, ")
    bks = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in bks and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in bks)
    assert nearest_bucket((1600, 900), bks)[0] > nearest_bucket((1600, 900), bks)[1]
    assert nearest_bucket((900, 1600), bks)[0] < nearest_bucket((900, 1600), bks)[1]
    assert nearest_bucket((1000, 1000), bks) == (512, 512)


def test_aspect_buckets_group_batches(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i, size in enumerate([(96, 48), (100, 52), (48, 96), (64, 64)]):
        product_photo(i, size).save(root / f"b{i}.png")
    cfg = config(tmp_path / "o", root, resolution=32, buckets=True, bucket_step=8, min_bucket=16, max_bucket=64,
                 missing_caption="tag", batch_size=2)
    ds = load_dataset(cfg)
    buckets = {it.rel: it.bucket for it in ds.items}
    assert buckets["b0.png"] == buckets["b1.png"] and buckets["b0.png"][0] > buckets["b0.png"][1]
    assert buckets["b2.png"][0] < buckets["b2.png"][1] and buckets["b3.png"] == (32, 32)
    for batch in ds.epoch_batches(0, 2, seed=1):
        assert len({ds.items[i].bucket for i in batch}) == 1
        x = ds.collate(batch, None)["pixels"]
        assert x.shape[-2:] == (ds.items[batch[0]].bucket[1], ds.items[batch[0]].bucket[0])
        assert x.min() >= -1 and x.max() <= 1


def test_config_rejects_contradictions(tmp_path):
    with pytest.raises(TrainConfigError, match="cache_latents"):
        TrainConfig.build(dataset=tmp_path, output_dir=tmp_path, tag=TAG, cache_latents=True, crop="random")
    with pytest.raises(TrainConfigError, match="mask_dir or auto_mask"):
        TrainConfig.build(dataset=tmp_path, output_dir=tmp_path, tag=TAG, mask_dir=tmp_path, auto_mask="shoe")
    with pytest.raises(TrainConfigError) as e:
        TrainConfig.build(dataset=tmp_path, output_dir=tmp_path, tag="a, b", rank=0, resolution=30)
    fields = {f for f, _ in e.value.problems}
    assert {"tag", "rank"} <= fields


# ------------------------------------------------------------------------------------------------
# Loss


def test_masked_loss_counts_product_pixels_only_and_refuses_empty_masks():
    import torch

    from lora.train import MaskedLossError, diffusion_loss

    target = torch.zeros(2, 4, 8, 8)
    pred = torch.zeros(2, 4, 8, 8)
    pred[..., :4] = 3.0  # wrong on the left half only
    w = torch.zeros(2, 1, 8, 8)
    w[..., 4:] = 1.0  # product on the right half
    assert float(diffusion_loss(pred, target, w)) == 0.0
    assert float(diffusion_loss(pred, target)) == pytest.approx(4.5)
    bg = w + 0.5 * (1 - w)  # background weighted 0.5
    assert float(diffusion_loss(pred, target, bg)) == pytest.approx(0.5 * 9 * 32 / (32 + 0.5 * 32))
    w[1] = 0.0
    with pytest.raises(MaskedLossError, match="all-zero mask"):
        diffusion_loss(pred, target, w)


def test_all_zero_mask_file_is_a_clear_dataset_error(tmp_path):
    root = write_dataset(tmp_path / "ds")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(product_mask()).save(masks / "p0.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(masks / "p1.png")
    with pytest.raises(DatasetError) as e:
        load_dataset(config(tmp_path / "o", root, mask_dir=masks))
    assert "p1.png: mask is all zero (no product pixels)" in str(e.value)
    (masks / "p1.png").unlink()
    with pytest.raises(DatasetError, match="p1.png: no mask file"):
        load_dataset(config(tmp_path / "o", root, mask_dir=masks))


# ------------------------------------------------------------------------------------------------
# Training (tiny base model, CPU)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry):
    """30 steps on two images (batch 2), LoRA on every layer kind, alpha != rank, kohya export,
    checkpoints every 10 steps (keep 2), validation every 10 epochs."""
    from lora.train import Trainer

    tmp = tmp_path_factory.mktemp("lora")
    root = write_dataset(tmp / "ds")
    cfg = config(tmp / "out", root, targets="all", rank=4, alpha=2, batch_size=2, max_steps=30, save_every=10,
                 keep_checkpoints=2, export_kohya=True, validation_prompt="{tag}, handbag", validation_steps=1,
                 validation_images=1, validation_every=10)
    tr = Trainer(cfg, registry).prepare()
    probe0 = tr.probe_loss()
    result = tr.train()
    return tr, result, probe0


def test_overfit_two_images_loss_goes_down(trained):
    tr, result, probe0 = trained
    losses = result.losses
    assert len(losses) == 30 and result.steps == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, (first, last)
    # the same noise and timesteps before and after: the drop is learning, not luck
    assert tr.probe_loss() < 0.5 * probe0


def test_outputs_manifest_checkpoints_and_validation(trained):
    import torch

    tr, result, _ = trained
    out = tr.cfg.output_dir
    man = json.loads(result.manifest_file.read_text())
    assert man == result.manifest
    assert man["tag"] == TAG and man["rank"] == 4 and man["alpha"] == 2.0 and man["steps"] == 30
    assert man["base_model"]["source"].endswith("base") and Path(man["base_model"]["path"]).is_dir()
    assert man["dataset"]["images"] == 2 and man["dataset"]["sha256"] == tr.dataset.content_hash()
    from pipeline.models.registry import file_sha256

    assert man["files"]["diffusers"]["sha256"] == file_sha256(result.lora_file)
    assert man["files"]["kohya"]["sha256"] == file_sha256(result.kohya_file)
    # every 10 steps, keep the last 2: 20 and the final 30
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    ck = out / "checkpoints" / "step-000030"
    assert {p.name for p in ck.iterdir()} == {"adapter.safetensors", "lora.safetensors", "optimizer.pt",
                                              "rng.safetensors", "state.json"}
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert opt["optimizer"]["state"] and opt["lr_scheduler"]["last_epoch"] == 30
    assert json.loads((ck / "state.json").read_text())["step"] == 30
    assert [p.name for p in result.validation_images] == ["epoch-010-0.png", "epoch-020-0.png", "final-0.png"]
    log = [json.loads(x) for x in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))


def test_exports_reproduce_the_trained_unet_in_diffusers(trained, registry):
    """Both files, loaded by diffusers' load_lora_weights into a fresh base pipeline, give the
    trained UNet's output exactly (alpha != rank, conv and linear layers)."""
    import torch
    from diffusers import StableDiffusionPipeline

    tr, result, _ = trained
    tr.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    ids = tr.tokenizer([f"{TAG}, handbag"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = tr.text_encoder(ids)[0]
        want = tr.unet(x, t, emb).sample
    tr.unet.train()
    for f in (result.lora_file, result.kohya_file):
        pipe = StableDiffusionPipeline.from_pretrained(registry.locate("base"), safety_checker=None,
                                                       requires_safety_checker=False)
        with torch.no_grad():
            before = pipe.unet(x, t, emb).sample
        pipe.load_lora_weights(str(f), use_safetensors=True)
        with torch.no_grad():
            got = pipe.unet(x, t, emb).sample
        assert (before - want).abs().max() > 1e-2, f.name
        assert torch.allclose(got, want, atol=1e-5), (f.name, (got - want).abs().max())
    # training used its own copies: the registry's warm base UNet never got LoRA layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in registry.get("base").unet.modules())


def test_kohya_file_keys_and_metadata(trained):
    from safetensors import safe_open

    _, result, _ = trained
    with safe_open(str(result.kohya_file), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in keys} == {"lora_down", "lora_up",
                                                                                           "alpha"}
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert float(alpha) == 2.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ps_activation_tag"] == TAG and TAG in json.loads(meta["ss_tag_frequency"])["product-studio"]


def test_lora_loads_into_shared_inpaint_pipeline_and_changes_output(trained, registry):
    import torch

    from lora.apply import applied_loras, parse_lora

    _, result, _ = trained
    pipe = registry.get("inpaint")
    image = product_photo(3, (64, 64))
    mask = Image.fromarray((product_mask((64, 64)) * 255).astype(np.uint8))

    def run():
        return pipe(f"{TAG}, handbag", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    plain = run()
    for f in (result.lora_file, result.kohya_file):
        with applied_loras(pipe, [parse_lora(str(f))]) as records:
            styled = run()
        assert records[0]["tag"] == TAG
        assert np.abs(styled - plain).max() > 1e-3, f.name
        # the shared pipeline is back to what it was for the next user
        assert np.array_equal(run(), plain), f.name


def test_resume_continues_exactly(tmp_path, registry):
    """Stop at step 4 of 8, resume in a new trainer: same step, same optimizer state, and the same
    final weights as never stopping (random crops, flips and shuffled captions included)."""
    import torch

    from lora.train import Trainer, TrainError

    root = write_dataset(tmp_path / "ds")
    kw = dict(max_steps=8, crop="random", flip=True, shuffle_caption=True, dropout=0.1, lr_scheduler="cosine",
              lr_warmup_steps=2)
    a = Trainer(config(tmp_path / "out", root, **kw), registry).prepare()
    a.run_steps(until=4)
    a.save_checkpoint()
    saved_opt = {k: {n: v.clone() for n, v in s.items()} for k, s in a.optimizer.state_dict()["state"].items()}
    a.run_steps()
    want = {k: v.detach().clone() for k, v in a.trainable.items()}

    b = Trainer(config(tmp_path / "out", root, resume=True, **kw), registry).prepare()
    assert b.global_step == 4 and b.resumed_from == 4
    got_opt = b.optimizer.state_dict()["state"]
    assert got_opt.keys() == saved_opt.keys()
    for k in saved_opt:
        for n in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got_opt[k][n], saved_opt[k][n])
    assert b.lr_scheduler.last_epoch == 4
    result = b.train()
    assert result.steps == 8 and len(result.losses) == 4 and result.manifest["resumed_from"] == 4
    for k, v in want.items():
        assert torch.allclose(b.trainable[k], v, atol=1e-6), k

    with pytest.raises(TrainError, match="rank: checkpoint 4, now 8"):
        Trainer(config(tmp_path / "out", root, resume=True, **{**kw, "max_steps": 12}, rank=8), registry).prepare()
    with pytest.raises(TrainError, match="already holds a training run"):
        Trainer(config(tmp_path / "out", root, **kw), registry).prepare()
    with pytest.raises(TrainError, match="already reached"):
        Trainer(config(tmp_path / "out", root, resume=True, **kw), registry).prepare()


def test_masked_training_with_mask_dir_and_auto_mask(tmp_path, registry, tiny_settings, monkeypatch):
    from pipeline.detect.detector import DetectResult, Detection, Detector

    from lora.train import Trainer

    root = write_dataset(tmp_path / "ds")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        Image.fromarray(product_mask()).save(masks / f"p{i}.png")
    r = Trainer(config(tmp_path / "o1", root, mask_dir=masks, background_weight=0.1, max_steps=2,
                       cache_latents=True), registry).train()
    assert r.manifest["masked_loss"]["source"] == "mask_dir" and r.manifest["dataset"]["masked"]

    # --auto-mask: the detector's masks (stubbed: random tiny weights find nothing meaningful)
    def fake_detect(self, image, classes=None, **kw):
        w, h = image.size
        return DetectResult((w, h), [Detection("handbag", 0.9, (12, 10, 36, 30), product_mask((w, h)))])

    monkeypatch.setattr(Detector, "detect", fake_detect)
    r = Trainer(config(tmp_path / "o2", root, auto_mask="handbag", max_steps=2), registry, tiny_settings).train()
    assert r.manifest["masked_loss"] == {"source": "auto_mask", "class": "handbag", "mask_dir": None,
                                         "background_weight": 0.0}
    saved = np.asarray(Image.open(tmp_path / "o2" / "auto-masks" / "p0.png")) > 0
    assert np.array_equal(saved, product_mask())


def test_text_encoder_lora_round_trips_through_both_formats(tmp_path, registry):
    """With --train-text-encoder both files carry text-encoder layers that diffusers loads back
    to the trained text encoder exactly (the kohya file names them from `text_model.`)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from lora.train import Trainer

    root = write_dataset(tmp_path / "ds")
    tr = Trainer(config(tmp_path / "o", root, train_text_encoder=True, text_encoder_lr=1e-2, alpha=2, max_steps=2,
                        export_kohya=True, gradient_checkpointing=True), registry).prepare()
    r = tr.train()
    with safe_open(str(r.kohya_file), framework="pt") as f:
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in f.keys()
    with safe_open(str(r.lora_file), framework="pt") as f:
        te_keys = [k for k in f.keys() if k.startswith("text_encoder.")]
    # diffusers' naming (as other tools read it): from CLIPTextModel's `text_model.` level.
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys), te_keys[:3]
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in te_keys
    ids = tr.tokenizer([f"{TAG}, handbag"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    tr.text_encoder.eval()
    with torch.no_grad():
        want = tr.text_encoder(ids)[0]
    for f in (r.lora_file, r.kohya_file):
        pipe = StableDiffusionPipeline.from_pretrained(registry.locate("base"), safety_checker=None,
                                                       requires_safety_checker=False)
        with torch.no_grad():
            before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(f), use_safetensors=True)
        with torch.no_grad():
            got = pipe.text_encoder(ids)[0]
        assert (before - want).abs().max() > 1e-3 and torch.allclose(got, want, atol=1e-5), f.name
