"""`caption`, `train-lora` and `generate` through the CLI on the tiny model set."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli import lora_cmd
from cli.app import app

lora_cmd.register(app)  # idempotent: harmless, cli/main.py registers the commands itself
runner = CliRunner()
TAG = "ppzocketv2"




def photo(seed: int, size=(48, 40)) -> Image.Image:
    rs = np.random.RandomState(seed)
    w, h = size
    a = np.empty((h, w, 3), np.uint8)
    a[:] = rs.randint(40, 220, 3)
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rs.randint(0, 255, (h - 2 * (h // 4), w - 2 * (w // 4), 3))
    return Image.fromarray(a)


def dataset(root: Path, n: int = 2, captions: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(i).save(root / f"p{i}.png")
        if captions:
            (root / f"p{i}.txt").write_text(f"a product photo, item {i}\n")
    return root


def cfg(tiny_dir) -> list[str]:
    return ["--config", str(tiny_dir / "settings.yaml")]


TRAIN_FAST = ["--resolution", "32", "--rank", "4", "--lr", "1e-2", "--targets", "attn"]


def test_commands_registered_once():
    import typer

    lora_cmd.register(app)
    names = [c.name for c in app.registered_commands]
    assert names.count("caption") == 1 and names.count("generate") == 1
    group = typer.main.get_command(app)  # train-lora joins the group there, built on first use
    assert sorted(n for n in group.list_commands(None) if n in lora_cmd.COMMANDS) == sorted(lora_cmd.COMMANDS)
    r = runner.invoke(app, ["train-lora", "--help"], terminal_width=200)
    assert r.exit_code == 0 and "--auto-mask" in r.output and "--resume" in r.output


def test_caption_writes_skips_and_reports(tmp_path, tiny_dir):
    root = dataset(tmp_path / "ds", n=2, captions=False)
    sub = root / "3_bags"
    sub.mkdir()
    photo(5).save(sub / "s.jpg")
    (root / "p1.txt").write_text("hand written\n")
    r = runner.invoke(app, ["caption", str(root), *cfg(tiny_dir)], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "2 written, 1 skipped" in r.output
    assert (root / "p0.txt").read_text().strip() and (sub / "s.txt").is_file()
    assert (root / "p1.txt").read_text() == "hand written\n"
    assert TAG not in (root / "p0.txt").read_text()
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = runner.invoke(app, ["caption", str(root), "--overwrite", *cfg(tiny_dir)], terminal_width=200)
    assert r.exit_code == 4, r.output
    assert "3 written, 0 skipped" in r.output and "bad.png" in r.output
    assert (root / "p1.txt").read_text() != "hand written\n"
    r = runner.invoke(app, ["caption", str(tmp_path / "nothing"), *cfg(tiny_dir)])
    assert r.exit_code == 4 and "not found" in r.output


@pytest.fixture(scope="module")
def cli_lora(tmp_path_factory, tiny_dir):
    """A LoRA trained through the CLI (4 steps, kohya export, checkpoints every 2 steps)."""
    tmp = tmp_path_factory.mktemp("cli-lora")
    root = dataset(tmp / "ds")
    out = tmp / "out"
    r = runner.invoke(app, ["train-lora", str(root), "--tag", TAG, "--out", str(out), "--max-steps", "4",
                            "--save-every", "2", "--format", "kohya", "--class", "handbag", *TRAIN_FAST,
                            *cfg(tiny_dir)], terminal_width=200)
    assert r.exit_code == 0, r.output
    return root, out, r.output


def test_train_lora_outputs_and_rule_snippet(cli_lora, tiny_settings):
    root, out, output = cli_lora
    lora = out / f"{TAG}.safetensors"
    assert lora.is_file() and (out / f"{TAG}.kohya.safetensors").is_file()
    man = json.loads((out / f"{TAG}.json").read_text())
    assert man["tag"] == TAG and man["steps"] == 4 and man["rank"] == 4
    assert "trained 4 steps" in output and "train" in output
    # the printed snippet is a valid rules file using the new LoRA for the class
    snippet = output[output.index("rules:"): output.index("try it:")]
    data = yaml.safe_load(snippet)
    rule = data["rules"][0]
    assert rule["match"] == {"class": "handbag"}
    assert rule["actions"] == [{"enhance": {"loras": [{"path": str(lora.resolve()), "weight": 1.0}], "tag": TAG}}]
    rules = pytest.importorskip("pipeline.run.rules")
    if hasattr(rules, "rules_from_dict"):
        rules.rules_from_dict(data, tiny_settings)


def test_train_lora_resume_and_refusals(cli_lora, tiny_dir):
    root, out, _ = cli_lora
    args = ["train-lora", str(root), "--tag", TAG, "--out", str(out), *TRAIN_FAST, *cfg(tiny_dir)]
    r = runner.invoke(app, [*args, "--max-steps", "6"], terminal_width=200)
    assert r.exit_code == 2 and "--resume" in r.output and "--overwrite" in r.output
    r = runner.invoke(app, [*args, "--max-steps", "6", "--resume"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "resumed from step-000004" in r.output and "trained 6 steps (resumed from step 4)" in r.output
    r = runner.invoke(app, [*args, "--max-steps", "8", "--resume", "--batch-size", "2"], terminal_width=200)
    assert r.exit_code == 2 and "batch_size: checkpoint 1, now 2" in r.output


def test_train_lora_bad_input_exit_codes(tmp_path, tiny_dir):
    root = dataset(tmp_path / "ds")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(masks / f"p{i}.png")
    base = ["train-lora", str(root), "--tag", TAG, "--out", str(tmp_path / "o"), *TRAIN_FAST, *cfg(tiny_dir)]
    r = runner.invoke(app, [*base, "--mask-dir", str(masks)], terminal_width=200)
    assert r.exit_code == 4 and "no product pixels" in r.output and "p0.png" in r.output
    r = runner.invoke(app, [*base, "--crop", "sideways"], terminal_width=200)
    assert r.exit_code == 2 and "--crop" in r.output
    r = runner.invoke(app, [*base, "--mixed-precision", "fp16"], terminal_width=200)
    assert r.exit_code == 2 and "fp16 needs a CUDA GPU" in r.output
    r = runner.invoke(app, [*base, "--use-8bit-adam"], terminal_width=200)
    assert r.exit_code == 2 and "bitsandbytes" in r.output
    (root / "p1.txt").unlink()
    r = runner.invoke(app, base, terminal_width=200)
    assert r.exit_code == 4 and "no caption: p1.png" in r.output


def test_generate_n_images_with_records_reproducible_by_seed(cli_lora, tmp_path, tiny_dir):
    _, out, _ = cli_lora
    lora = out / f"{TAG}.safetensors"
    r = runner.invoke(app, ["generate", "--class", "handbag", "--lora", f"{lora}:0.8", "-n", "2", "--seed", "5",
                            "--out", str(tmp_path / "a"), *cfg(tiny_dir)], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["handbag-5.json", "handbag-5.png",
                                                                   "handbag-6.json", "handbag-6.png"]
    rec = json.loads((tmp_path / "a" / "handbag-6.json").read_text())
    assert rec["seed"] == 6 and rec["class"] == "handbag" and rec["size"] == [64, 64]
    assert rec["prompt"].startswith(f"{TAG}, handbag, studio photography")
    assert rec["loras"][0]["weight"] == 0.8 and len(rec["loras"][0]["sha256"]) == 64
    assert rec["loras"][0]["tag"] == TAG and rec["model"]["role"] == "base"
    # image k of a run is image 0 of a run with seed+k; the LoRA changes the picture
    r = runner.invoke(app, ["generate", "--class", "handbag", "--lora", f"{lora}:0.8", "--seed", "6",
                            "--out", str(tmp_path / "b"), *cfg(tiny_dir)])
    assert r.exit_code == 0, r.output
    a6 = np.asarray(Image.open(tmp_path / "a" / "handbag-6.png"))
    assert np.array_equal(a6, np.asarray(Image.open(tmp_path / "b" / "handbag-6.png")))
    r = runner.invoke(app, ["generate", "--class", "handbag", "--tag", TAG, "--seed", "6",
                            "--out", str(tmp_path / "c"), *cfg(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert not np.array_equal(a6, np.asarray(Image.open(tmp_path / "c" / "handbag-6.png")))
    assert json.loads((tmp_path / "c" / "handbag-6.json").read_text())["loras"] == []


def test_generate_bad_lora_and_options(tmp_path, tiny_dir):
    r = runner.invoke(app, ["generate", "--class", "handbag", "--lora", str(tmp_path / "nope.safetensors"),
                            *cfg(tiny_dir)])
    assert r.exit_code == 4 and "LoRA file not found" in r.output
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    r = runner.invoke(app, ["generate", "--class", "handbag", "--lora", str(junk), "--out", str(tmp_path / "o"),
                            *cfg(tiny_dir)], terminal_width=200)
    assert r.exit_code == 4 and "junk.safetensors" in r.output
    # a LoRA for another model (wrong layer sizes) fails when applied, with the file named
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(other))
    r = runner.invoke(app, ["generate", "--class", "handbag", "--lora", str(other), "--out", str(tmp_path / "o"),
                            *cfg(tiny_dir)], terminal_width=200)
    assert r.exit_code == 4 and "other.safetensors" in r.output and "could not be loaded" in r.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))
    r = runner.invoke(app, ["generate", "--class", "handbag", "--width", "100", "--out", str(tmp_path / "o"),
                            *cfg(tiny_dir)])
    assert r.exit_code == 2 and "multiple of 8" in r.output
