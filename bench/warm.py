"""Warm vs cold: one process detecting N images against a new process per image (the seed CLIs' way).

``python -m bench warm`` (or ``python -m bench.warm --images N``): a full-size **random-weight**
model set is written to a temp folder in the real on-disk layouts — CLIP ViT-B/32
(``CLIPModel(CLIPConfig())`` + processor, ``save_pretrained``) and SAM ViT-B (a safetensors state
dict) — with a ``settings.yaml`` pointing ``models.clip`` / ``models.sam`` at them, so each process
times the product's real start-up: interpreter and library imports, settings, the registry loading
both models from disk, then detection. Detection is forced to the product path as in
:mod:`bench.detect` (prefilter threshold 0, SAM thresholds 0, margin 0, no background prompts,
class thresholds 0), so every image runs prefilter, SAM and CLIP to the end.

Cases, each run once, side by side in this run (after one untimed process that imports the
libraries, so both cases find them in the page cache):

``warm``
    One ``python -m cli detect IMG1 .. IMGN --out D --config S`` process.
``cold``
    N processes ``python -m cli detect IMGk --out D --config S``, one per image.

Reported: ``cold/warm`` (goal >= 10) and the per-image start-up overhead ``(cold - warm) / N``,
with each image's in-process detection time (from its record) as context: when detection itself
costs seconds per image on the CPU, it dominates both cases and caps the ratio far below the goal,
whatever start-up costs. ``--tiny`` uses the tiny model set instead (a smoke run in seconds).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

GOAL = 10.0
DEFAULT_IMAGES = 4
DEFAULT_SIZE = (1024, 768)
TINY_SIZE = (256, 192)
SEED = 0
RUN_TIMEOUT_S = 900.0


# ------------------------------------------------------------------------------------------------
# Inputs


def write_full_set(out: Path, seed: int = SEED) -> Path:
    """Full-size random-weight CLIP ViT-B/32 and SAM ViT-B in their real layouts, plus settings.yaml
    forcing the product path. Returns the settings path."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from bench.detect import product_settings
    from pipeline.models import quiet_libraries
    from pipeline.tiny import _clip_tokenizer, tiny_settings_dict

    quiet_libraries()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer()
    # CLIPConfig() is ViT-B/32; only the vocabulary and special ids follow the small offline tokenizer.
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1))
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(out / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                     crop_size={"height": 224, "width": 224}),
                  tokenizer=tok).save_pretrained(out / "clip")
    torch.manual_seed(seed + 1)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    (out / "sam").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(out / "sam" / "sam_vit_b.safetensors"))
    del sam

    data = tiny_settings_dict(out)
    lic = "full-size random weights (benchmark only)"
    data["models"] = {"clip": {"path": "clip", "licence": lic},
                      "sam": {"path": "sam/sam_vit_b.safetensors", "model_type": "vit_b", "licence": lic}}
    data["runtime"] = {"device": "cpu", "dtype": "float32", "offline": True}
    data["detect"] = {**product_settings().model_dump(mode="json"), "proposals": "guided", "min_mask_area": 0.0}
    settings = out / "settings.yaml"
    settings.write_text("# Full-size random-weight CLIP ViT-B/32 + SAM ViT-B for bench.warm (outputs are noise).\n"
                        + yaml.safe_dump(data, sort_keys=False))
    return settings


def write_tiny_set(out: Path) -> Path:
    from pipeline.tiny import make_tiny_set

    return make_tiny_set(out, roles=["clip", "sam"])


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` distinct PNGs (the synthetic scene of bench.detect, tinted per image)."""
    import numpy as np
    from PIL import Image

    from bench.detect import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    base = synthetic_image(*size).astype(np.int16)
    paths = []
    for i in range(n):
        img = np.clip(base + (i * 7) % 40 - 20, 0, 255).astype(np.uint8)
        p = folder / f"img{i:02d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# Running


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: list[str], log_file: Path, cwd: Path) -> dict[str, Any]:
    """Run one process; wall seconds, exit code and the child's own peak RSS (wait4)."""
    with open(log_file, "ab") as fh:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=_env())
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    p.returncode = code  # reaped here; tell Popen
    rss = ru.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru.ru_maxrss / 1024
    return {"wall_s": wall, "returncode": code, "peak_rss_mib": rss}


def _detect_cmd(images: list[Path], out: Path, settings: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "detect", *map(str, images), "--out", str(out), "--config", str(settings)]


def _records(out: Path, images: list[Path]) -> list[dict[str, Any]]:
    from bench.detect import BenchError

    recs = []
    for img in images:
        f = out / f"{img.stem}.json"
        if not f.is_file():
            raise BenchError(f"no record {f} for {img.name}")
        rec = json.loads(f.read_text())
        if rec.get("status") != "detected":
            raise BenchError(f"{img.name}: status {rec.get('status')!r}, not the forced product path "
                             f"(reason {rec.get('reason')!r})")
        recs.append(rec)
    return recs


def _detect_s(rec: dict[str, Any]) -> float:
    t = (rec.get("detect") or {}).get("timings") or {}
    return float(t["total"]) if "total" in t else float(sum(t.values()))


def run_warm(*, n: int = DEFAULT_IMAGES, tiny: bool = False, size: tuple[int, int] | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the model set and images, run both cases once each and return the result dict."""
    from bench.detect import BenchError

    if n < 1:
        raise ValueError("n must be at least 1")
    say = log or (lambda _m: None)
    size = size or (TINY_SIZE if tiny else DEFAULT_SIZE)
    repo = Path(__file__).resolve().parent.parent
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as d:
        root = Path(d)
        t0 = time.perf_counter()
        if tiny:
            say("writing the tiny model set (clip, sam) ...")
            settings = write_tiny_set(root / "models")
            models = "tiny random-weight set (clip, sam)"
        else:
            say("writing full-size random-weight CLIP ViT-B/32 and SAM ViT-B in their on-disk layouts ...")
            settings = write_full_set(root / "models")
            models = "full-size random weights on disk: CLIP ViT-B/32 (save_pretrained), SAM ViT-B (safetensors)"
        write_s = time.perf_counter() - t0
        disk_mib = sum(f.stat().st_size for f in (root / "models").rglob("*") if f.is_file()) / 2 ** 20
        images = write_images(root / "images", n, size)
        log_file = root / "runs.log"

        say("untimed: one process importing the libraries (page cache) ...")
        _run([sys.executable, "-c", "import torch, transformers, segment_anything, safetensors, cli.app"],
             log_file, repo)

        say(f"cold: {n} processes, one image each ...")
        cold_runs = []
        for i, img in enumerate(images):
            r = _run(_detect_cmd([img], root / "cold", settings), log_file, repo)
            say(f"  cold {i + 1}/{n}: {r['wall_s']:.2f} s (exit {r['returncode']})")
            cold_runs.append(r)
        say(f"warm: 1 process, {n} images ...")
        warm = _run(_detect_cmd(images, root / "warm", settings), log_file, repo)
        say(f"  warm: {warm['wall_s']:.2f} s (exit {warm['returncode']})")

        bad = [r for r in [*cold_runs, warm] if r["returncode"] != 0]
        if bad:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise BenchError(f"{len(bad)} detect process(es) failed (exit {bad[0]['returncode']}):\n{tail}")
        cold_recs = _records(root / "cold", images)
        warm_recs = _records(root / "warm", images)

    cold_s = sum(r["wall_s"] for r in cold_runs)
    warm_s = warm["wall_s"]
    cold_detect = [_detect_s(r) for r in cold_recs]
    warm_detect = [_detect_s(r) for r in warm_recs]
    ratio = cold_s / warm_s if warm_s > 0 else float("inf")
    overhead = (cold_s - warm_s) / n
    cold_startup = [r["wall_s"] - t for r, t in zip(cold_runs, cold_detect)]
    import torch

    context = {
        "models": models,
        "model_files_mib": round(disk_mib, 1),
        "model_set_write_s": write_s,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "image_size": list(size),
        "images": n,
        "python": sys.executable,
        "peak_rss_mib": {
            "bench_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "warm_process": round(warm["peak_rss_mib"], 1),
            "cold_process_max": round(max(r["peak_rss_mib"] for r in cold_runs), 1),
        },
        "total_s": time.perf_counter() - t_start,
    }
    return {
        "benchmark": "warm",
        "context": context,
        "cases": {
            "warm": {"processes": 1, "wall_s": warm_s, "per_image_s": warm_s / n,
                     "detect_s_per_image": warm_detect, "startup_s": warm_s - sum(warm_detect),
                     "detections": [len((r.get("detect") or {}).get("detections", [])) for r in warm_recs]},
            "cold": {"processes": n, "wall_s": cold_s, "per_image_s": cold_s / n,
                     "runs_s": [r["wall_s"] for r in cold_runs], "detect_s_per_image": cold_detect,
                     "startup_s_per_process": cold_startup,
                     "detections": [len((r.get("detect") or {}).get("detections", [])) for r in cold_recs]},
        },
        "ratios": {"cold/warm": {"value": ratio, "goal": GOAL, "met": ratio >= GOAL}},
        "startup_overhead_per_image_s": overhead,
        "startup_share_of_cold": (cold_s - sum(cold_detect)) / cold_s if cold_s > 0 else 0.0,
        "detect_median_s": statistics.median(cold_detect + warm_detect),
        # Detection in a fresh process is slower than in a warm one (first forwards: lazy init,
        # kernel/primitive set-up, allocator growth); that is start-up cost too, inside "detect".
        "first_detect_penalty_s": statistics.median(cold_detect) - statistics.median(warm_detect),
    }


# ------------------------------------------------------------------------------------------------
# Reporting


def render(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    ctx, w, c = result["context"], result["cases"]["warm"], result["cases"]["cold"]
    t = Table(title="warm vs cold: detect only (one run each; absolute seconds are context only)")
    for col in ("case", "processes", "wall s", "per image s", "detect in-process s/image (median)",
                "outside detect s (start-up, load, outputs)"):
        t.add_column(col, justify="left" if col == "case" else "right")
    t.add_row("warm (1 process, N images)", "1", f"{w['wall_s']:.2f}", f"{w['per_image_s']:.2f}",
              f"{statistics.median(w['detect_s_per_image']):.2f}", f"{w['startup_s']:.2f} (once)")
    t.add_row("cold (1 process per image)", str(c["processes"]), f"{c['wall_s']:.2f}", f"{c['per_image_s']:.2f}",
              f"{statistics.median(c['detect_s_per_image']):.2f}",
              f"{statistics.median(c['startup_s_per_process']):.2f} (per process, median)")
    con.print(t)
    r = Table(title="ratio (measured side by side in this run)")
    for col in ("ratio", "value", "goal", "met"):
        r.add_column(col, justify="left" if col == "ratio" else "right")
    v = result["ratios"]["cold/warm"]
    r.add_row("cold/warm", f"{v['value']:.2f}x", f">= {v['goal']:g}", "[green]yes[/green]" if v["met"] else "[red]NO[/red]")
    con.print(r)
    rss = ctx["peak_rss_mib"]
    con.print(f"start-up overhead per image (cold - warm)/N: {result['startup_overhead_per_image_s']:.2f} s; "
              f"share of the cold wall time outside detection: {result['startup_share_of_cold']:.0%}; a fresh process's "
              f"detection is also {result['first_detect_penalty_s']:.2f} s slower (median) than a warm one's. "
              "The ratio is capped near (startup + detect)/detect per image: detection itself dominates on this CPU.")
    con.print(f"context: {ctx['models']} ({ctx['model_files_mib']:.0f} MiB, written in {ctx['model_set_write_s']:.0f} s); "
              f"device cpu, {ctx['cpu_count']} CPUs, torch {ctx['torch']}; {ctx['images']} images of "
              f"{ctx['image_size'][0]}x{ctx['image_size'][1]}; peak RSS: warm process {rss['warm_process']:.0f} MiB, "
              f"cold process max {rss['cold_process_max']:.0f} MiB, bench process {rss['bench_process']:.0f} MiB; "
              f"total {ctx['total_s']:.0f} s")


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench warm``: ``--tiny`` for the tiny set; ``--size``; ``--images N`` via
    ``python -m bench.warm``."""
    from rich.console import Console

    import bench.daemon

    err = Console(stderr=True)
    n = getattr(opts, "images", None) or (bench.daemon.IMAGES_OVERRIDE[-1] if bench.daemon.IMAGES_OVERRIDE else None) \
        or DEFAULT_IMAGES
    if getattr(opts, "device", "auto") not in ("auto", "cpu"):
        err.print("bench warm runs on the CPU (the settings it writes say device cpu)")
    result = run_warm(n=n, tiny=opts.tiny, size=opts.size, log=lambda m: err.print(m, highlight=False))
    render(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.warm [--images N] [bench options]``."""
    from bench.__main__ import main as bench_main
    from bench.daemon import with_images

    return bench_main(["warm", *with_images(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
