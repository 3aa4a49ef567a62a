"""`models pull`, the models lock and `models verify` against a local test Hub (tests/hub_server.py)
set through HF_ENDPOINT: downloads, resume, lock reuse, dry run, offline pull and every Hub error."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from pipeline.models.registry import ModelLoadError, ModelRegistry, role_files
from pipeline.settings import ROLES as ALL_ROLES, load_settings
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tiny_dir, tmp_path, monkeypatch):
    """The test Hub with tiny repos, this process pointed at it, online, with an empty cache."""
    import huggingface_hub.constants as hc
    from safetensors.torch import load_file

    h = HubServer().start()
    clip = _files(tiny_dir / "clip")
    clip["tf_model.h5"] = b"h5" * 100          # formats we never load
    clip["pytorch_model.bin"] = b"bin" * 100   # a second precision / format of the same weights
    h.add("acme/tiny-clip", clip)
    sd = _files(tiny_dir / "base")
    idx = json.loads(sd["model_index.json"])
    idx["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    sd["model_index.json"] = json.dumps(idx).encode()
    sd["safety_checker/config.json"] = b"{}"
    sd["safety_checker/model.safetensors"] = b"x" * 5000
    sd["unet/diffusion_pytorch_model.fp16.safetensors"] = b"y" * 3000
    sd["v1-5-pruned.ckpt"] = b"z" * 4000
    h.add("acme/tiny-sd", sd)
    pth = tmp_path / "sam_tiny.pth"
    torch.save(load_file(str(tiny_dir / "sam" / "sam_tiny.safetensors")), pth)
    h.add("acme/tiny-sam", {"checkpoints/sam_tiny.pth": pth.read_bytes(), "README.md": b"sam"})
    h.add("acme/gated", {"config.json": b"{}"}, gated=True)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # read by huggingface_hub at import (conftest set it)
    yield h
    h.stop()


MODELS = """\
  clip: {repo: acme/tiny-clip}
  base: {repo: acme/tiny-sd}
  sam: {repo: acme/tiny-sam, filename: checkpoints/sam_tiny.pth, model_type: auto}
"""


def _config(tmp_path: Path, models: str = MODELS, offline: bool = False) -> Path:
    p = tmp_path / "settings.yaml"
    p.write_text(f"root: .\nruntime: {{device: cpu, offline: {str(offline).lower()}}}\n"
                 f"paths: {{model_cache: {tmp_path / 'ps-cache'}, models_lock: conf/models.lock}}\nmodels:\n{models}")
    return p


def _pull(cfg: Path, *args: str):
    r = CliRunner().invoke(app, ["models", "pull", "--config", str(cfg), *args], terminal_width=250)
    assert "Traceback" not in r.output, r.output
    return r


ROLES = ["-r", "clip", "-r", "base", "-r", "sam"]


def test_pull_fetches_only_loaded_files_writes_lock_and_second_pull_downloads_nothing(hub, tmp_path):
    cfg = _config(tmp_path)
    r = _pull(cfg, *ROLES)
    assert r.exit_code == 0, r.output
    lock = json.loads((tmp_path / "conf" / "models.lock").read_text())
    repo = hub.repos["acme/tiny-sd"]
    commit = repo.refs["main"]
    base = lock["roles"]["base"]
    assert base["repo"] == "acme/tiny-sd" and base["commit"] == commit and base["revision"] is None
    content = repo.commits[commit]
    got = {f["path"] for f in base["files"]}
    assert got == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                   "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"}
    for f in base["files"]:
        assert f["size"] == len(content[f["path"]]) and f["sha256"] == hashlib.sha256(content[f["path"]]).hexdigest()
    downloaded = {g[1].split("/resolve/")[1].split("/", 1)[1] for g in hub.gets("/resolve/")}
    assert not any(p.startswith("safety_checker/") or p.endswith((".ckpt", ".h5", ".bin")) or ".fp16." in p
                   for p in downloaded), downloaded
    assert {f["path"] for f in lock["roles"]["clip"]["files"]} == {
        "config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert lock["roles"]["sam"]["filename"] == "checkpoints/sam_tiny.pth"
    assert list((tmp_path / "ps-cache" / "sam").glob("sam_tiny-*.safetensors"))  # converted on pull
    n_gets = len(hub.gets("/resolve/"))
    assert n_gets == len(downloaded) == sum(len(e["files"]) for e in lock["roles"].values())

    before = len(hub.requests)
    r2 = _pull(cfg, *ROLES)
    assert r2.exit_code == 0, r2.output
    assert len(hub.requests) == before  # everything from the cache at the locked commit: no request at all
    assert "cached" in r2.output

    # Loads follow the lock; records name the commit.
    reg = ModelRegistry(load_settings(cfg))
    assert reg.get("base").unet.config.in_channels == 4
    assert reg.get("sam").model_type == "custom"
    assert reg.provenance("base")["revision"] == commit
    assert reg.provenance("sam")["revision"] == hub.repos["acme/tiny-sam"].refs["main"]
    assert len(hub.requests) == before


def test_lock_pins_the_commit_on_another_machine(hub, tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    assert _pull(cfg, "-r", "clip").exit_code == 0
    old = hub.repos["acme/tiny-clip"].refs["main"]
    files = dict(hub.repos["acme/tiny-clip"].commits[old])
    files["config.json"] = files["config.json"].replace(b"{", b'{"_moved": 1, ', 1)
    new = hub.add("acme/tiny-clip", files)  # main moves on
    assert new != old
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other-machine-cache"))
    lock_before = (tmp_path / "conf" / "models.lock").read_text()
    r = _pull(cfg, "-r", "clip")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "conf" / "models.lock").read_text() == lock_before
    snap = tmp_path / "other-machine-cache" / "models--acme--tiny-clip" / "snapshots"
    assert [p.name for p in snap.iterdir()] == [old]
    assert (snap / old / "config.json").read_bytes() == hub.repos["acme/tiny-clip"].commits[old]["config.json"]
    # A load on a third machine (empty cache, same lock) fetches the locked commit on first use.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "third-machine-cache"))
    reg = ModelRegistry(load_settings(cfg))
    assert reg.get("clip").model.config.model_type == "clip"
    assert reg.provenance("clip")["revision"] == old
    assert [p.name for p in (tmp_path / "third-machine-cache" / "models--acme--tiny-clip" / "snapshots").iterdir()] == [old]
    # Without the lock the same settings would take the new head.
    (tmp_path / "conf" / "models.lock").unlink()
    assert _pull(cfg, "-r", "clip").exit_code == 0
    assert json.loads((tmp_path / "conf" / "models.lock").read_text())["roles"]["clip"]["commit"] == new


def test_dry_run_lists_every_file_and_size_and_downloads_nothing(hub, tmp_path):
    cfg = _config(tmp_path)
    r = _pull(cfg, "--dry-run", *ROLES)
    assert r.exit_code == 0, r.output
    assert not hub.gets("/resolve/") and not (tmp_path / "conf" / "models.lock").exists()
    total = 0
    for repo, role in (("acme/tiny-clip", "clip"), ("acme/tiny-sd", "base")):
        content = hub.repos[repo].commits[hub.repos[repo].refs["main"]]
        for name in role_files(role, sorted(content)):
            line = next(ln for ln in r.output.splitlines() if f" {name} " in ln and role in ln)
            assert f"{len(content[name]):,}" in line
            total += len(content[name])
    sam = hub.repos["acme/tiny-sam"].commits[hub.repos["acme/tiny-sam"].refs["main"]]["checkpoints/sam_tiny.pth"]
    total += len(sam)
    assert f"to download: " in r.output and f"({total:,} bytes)" in r.output
    assert "safety_checker" not in r.output and ".ckpt" not in r.output


def test_every_hub_failure_is_one_line_per_role_and_pull_goes_on(hub, tmp_path):
    models = """\
  clip: {repo: acme/gated}
  base: {repo: acme/no-such-repo}
  sam: {repo: acme/tiny-sam, filename: checkpoints/missing.pth}
  depth: {repo: acme/tiny-clip, revision: no-such-branch}
  upscaler: {repo: acme/tiny-clip}
"""
    cfg = _config(tmp_path, models)
    r = _pull(cfg, "-r", "clip", "-r", "base", "-r", "sam", "-r", "depth", "-r", "upscaler")
    assert r.exit_code == 3, r.output
    fails = {ln.split()[1].rstrip(":"): ln for ln in r.output.splitlines() if ln.startswith("fail ")}
    assert set(fails) == {"clip", "base", "sam", "depth"}
    assert "gated" in fails["clip"] and "hf auth login" in fails["clip"] and "accept the licence" in fails["clip"]
    assert "401" in fails["clip"]
    assert "acme/no-such-repo" in fails["base"] and "not found" in fails["base"] and "404" in fails["base"]
    assert "checkpoints/missing.pth" in fails["sam"] and "404" in fails["sam"]
    assert "no-such-branch" in fails["depth"] and "models.depth.revision" in fails["depth"]
    row = next(ln for ln in r.output.splitlines() if ln.startswith("│ upscaler"))
    assert "downloaded" in row
    assert "4 role(s) could not be pulled" in r.output


def test_cut_download_is_resumed_with_a_range_request(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    # huggingface_hub writes in 10 MB chunks; the tiny file must span several for a cut to leave bytes.
    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.cut["model.safetensors"] = 1
    cfg = _config(tmp_path)
    r = _pull(cfg, "-r", "clip")
    assert r.exit_code == 0, r.output
    gets = hub.gets("model.safetensors")
    assert len(gets) == 2 and gets[0][2] is None and gets[1][2] and gets[1][2].startswith("bytes=")
    data = hub.repos["acme/tiny-clip"].commits[hub.repos["acme/tiny-clip"].refs["main"]]["model.safetensors"]
    resumed_at = int(gets[1][2][len("bytes="):-1])
    assert 0 < resumed_at <= len(data) // 2  # the whole chunks written before the cut are kept
    lock = json.loads((tmp_path / "conf" / "models.lock").read_text())
    sha = {f["path"]: f["sha256"] for f in lock["roles"]["clip"]["files"]}
    assert sha["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_download_cut_for_good_fails_in_one_line_and_the_next_pull_resumes(hub, tmp_path, monkeypatch):
    """huggingface_hub resumes a cut transfer up to 5 times without progress; when every try is cut
    the pull fails with one line saying so, and the next pull asks only for the rest of the file."""
    import huggingface_hub.constants as hc
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", 4096)
    monkeypatch.setattr(fd.time, "sleep", lambda s: None)  # its 1 s pause between retries
    hub.cut["model.safetensors"] = 6
    cfg = _config(tmp_path)
    r = _pull(cfg, "-r", "clip")
    assert r.exit_code == 3, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("fail clip"))
    assert "connection to the Hub" in line and "lost" in line and "again" in line
    assert not (tmp_path / "conf" / "models.lock").exists()
    n = len(hub.gets("model.safetensors"))
    assert n == 6 and all(g[2] for g in hub.gets("model.safetensors")[1:])  # each retry resumed by Range
    done = {g[1] for g in hub.gets("/resolve/")} - {g[1] for g in hub.gets("model.safetensors")}
    r = _pull(cfg, "-r", "clip")
    assert r.exit_code == 0, r.output
    last = hub.gets("model.safetensors")[n:]
    data = hub.repos["acme/tiny-clip"].commits[hub.repos["acme/tiny-clip"].refs["main"]]["model.safetensors"]
    assert len(last) == 1 and last[0][2] and 0 < int(last[0][2][len("bytes="):-1]) <= len(data) // 2
    assert done
    others = [g[1] for g in hub.gets("/resolve/") if not g[1].endswith("/model.safetensors")]
    assert len(others) == len(set(others)) == 4  # every other file once, across both runs
    assert not list((Path(os.environ["HF_HUB_CACHE"]) / "models--acme--tiny-clip" / "blobs").glob("*.partial"))
    lock = json.loads((tmp_path / "conf" / "models.lock").read_text())
    assert {f["path"]: f["sha256"] for f in lock["roles"]["clip"]["files"]}["model.safetensors"] == \
        hashlib.sha256(data).hexdigest()


def test_disk_full_is_one_line(hub, tmp_path, monkeypatch):
    import shutil

    import pipeline.models.hub as ph

    monkeypatch.setattr(ph.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    r = _pull(_config(tmp_path), "-r", "clip")
    assert r.exit_code == 3
    line = next(ln for ln in r.output.splitlines() if ln.startswith("fail clip"))
    assert "disk full" in line and "HF_HUB_CACHE" in line
    # A full disk in the middle of a download (ENOSPC from the write) says the same.
    src = load_settings(_config(tmp_path)).models.clip
    err = ph.hub_error("clip", src, OSError(errno.ENOSPC, "No space left on device"), file="model.safetensors")
    assert "disk full" in err.reason and "HF_HUB_CACHE" in err.hint


def test_offline_pull_of_a_cached_role_succeeds_and_converts_sam(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cfg = _config(tmp_path)
    assert _pull(cfg, "-r", "clip", "-r", "sam").exit_code == 0
    lock = (tmp_path / "conf" / "models.lock").read_text()
    (tmp_path / "conf" / "models.lock").unlink()
    import shutil

    shutil.rmtree(tmp_path / "ps-cache")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    off = _config(tmp_path, offline=True)
    n = len(hub.requests)
    r = _pull(off, "-r", "clip", "-r", "sam")
    assert r.exit_code == 0, r.output
    assert len(hub.requests) == n
    assert list((tmp_path / "ps-cache" / "sam").glob("sam_tiny-*.safetensors"))
    assert json.loads((tmp_path / "conf" / "models.lock").read_text()) == json.loads(lock)
    # With the lock, offline still works; a role never fetched fails with the offline message.
    r = _pull(off, "-r", "clip", "-r", "sam", "-r", "base")
    assert r.exit_code == 3
    line = next(ln for ln in r.output.splitlines() if ln.startswith("fail base"))
    assert "offline mode is on" in line and "models pull" in line


def test_verify_checks_hashes_against_the_lock_and_known_values(hub, tmp_path, monkeypatch):
    import pipeline.models.hub as ph

    cfg = _config(tmp_path)
    assert _pull(cfg, "-r", "clip", "-r", "sam").exit_code == 0
    reg = ModelRegistry(load_settings(cfg))
    assert reg.check_files("clip") == [] and reg.check_files("sam") == []
    sam_bytes = hub.repos["acme/tiny-sam"].commits[hub.repos["acme/tiny-sam"].refs["main"]]["checkpoints/sam_tiny.pth"]
    monkeypatch.setitem(ph.KNOWN_SHA256, ("acme/tiny-sam", "checkpoints/sam_tiny.pth"), ("0" * 64, len(sam_bytes)))
    assert any("published" in p for p in reg.check_files("sam"))
    monkeypatch.setitem(ph.KNOWN_SHA256, ("acme/tiny-sam", "checkpoints/sam_tiny.pth"),
                        (hashlib.sha256(sam_bytes).hexdigest(), len(sam_bytes)))
    assert reg.check_files("sam") == []
    r = CliRunner().invoke(app, ["models", "verify", "--config", str(cfg), "-r", "clip"], terminal_width=250)
    assert r.exit_code == 0 and "sha256 ok" in r.output, r.output
    blob = (Path(os.environ["HF_HUB_CACHE"]) / "models--acme--tiny-clip" / "snapshots").glob("*/model.safetensors")
    target = next(blob).resolve()
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["models", "verify", "--config", str(cfg), "-r", "clip"], terminal_width=250)
    assert r.exit_code == 3 and "model.safetensors: SHA-256" in r.output, r.output


def test_first_use_with_unreachable_hub_is_a_model_load_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    reg = ModelRegistry(load_settings(_config(tmp_path)))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"'clip'.*cannot be reached") as e:
        reg.get("clip")
    assert "offline mode is on" not in str(e.value) and time.monotonic() - t0 < 10


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_pull_with_the_hub_unreachable_exits_in_seconds_with_one_line_per_role(tmp_path):
    """The real command in a fresh process, default settings (every role on the Hub), closed port."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO_ROOT), PRODUCT_STUDIO_CONFIG=str(REPO_ROOT / "conf" / "settings.yaml"))
    cfg = tmp_path / "settings.yaml"
    cfg.write_text((REPO_ROOT / "conf" / "settings.yaml").read_text().replace("root: ..", f"root: {tmp_path}", 1))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cli", "models", "pull", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 3, out
    assert "Traceback" not in out and "Retrying" not in out
    fails = [ln for ln in out.splitlines() if ln.startswith("fail ")]
    assert len(fails) == len(ALL_ROLES) and all("cannot be reached" in ln and "HF_HUB_OFFLINE=1" in ln for ln in fails), out
    assert elapsed < 60, elapsed


def test_role_files_match_the_real_repositories():
    """The real repos' listings (as of the pinned commits): no safety checker, one precision, no .ckpt."""
    sd15 = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
            "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.fp16.safetensors", "README.md", ".gitattributes",
            "feature_extractor/preprocessor_config.json"]
    for comp in ("safety_checker", "text_encoder"):
        sd15 += [f"{comp}/config.json", f"{comp}/model.safetensors", f"{comp}/model.fp16.safetensors",
                 f"{comp}/pytorch_model.bin", f"{comp}/pytorch_model.fp16.bin"]
    for comp in ("unet", "vae"):
        sd15 += [f"{comp}/config.json", f"{comp}/diffusion_pytorch_model.safetensors",
                 f"{comp}/diffusion_pytorch_model.fp16.safetensors", f"{comp}/diffusion_pytorch_model.bin",
                 f"{comp}/diffusion_pytorch_model.fp16.bin", f"{comp}/diffusion_pytorch_model.non_ema.bin",
                 f"{comp}/diffusion_pytorch_model.non_ema.safetensors"]
    sd15 += ["scheduler/scheduler_config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
             "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
    assert role_files("base", sd15) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    z123 = ["model_index.json", "README.md", "zero123-xl.ckpt", "feature_extractor/preprocessor_config.json",
            "safety_checker/config.json", "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json"]
    for comp, w in (("cc_projection", "diffusion_pytorch_model.bin"), ("image_encoder", "pytorch_model.bin"),
                    ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin")):
        z123 += [f"{comp}/config.json", f"{comp}/{w}"]
    got = role_files("novel_view", z123)
    assert not any(f.startswith("safety_checker/") or f.endswith(".ckpt") for f in got)
    assert {f.split("/")[0] for f in got if "/" in f} == {"cc_projection", "image_encoder", "unet", "vae",
                                                           "feature_extractor", "scheduler"}
    sharded = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin"]
    assert role_files("captioner", sharded) == sorted(["config.json", "model.safetensors.index.json",
                                                       "model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"])


def test_locked_commit_gone_from_the_hub_says_so(hub, tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    assert _pull(cfg, "-r", "clip").exit_code == 0
    repo = hub.repos["acme/tiny-clip"]
    old = repo.refs["main"]
    files = dict(repo.commits.pop(old))
    files["config.json"] = files["config.json"].replace(b"{", b'{"_force_pushed": 1, ', 1)
    hub.add("acme/tiny-clip", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh-cache"))
    r = _pull(cfg, "-r", "clip")
    assert r.exit_code == 3
    line = next(ln for ln in r.output.splitlines() if ln.startswith("fail clip"))
    assert f"revision {old} (from the models lock) not found" in line and "models lock" in line.split(";")[-1]
