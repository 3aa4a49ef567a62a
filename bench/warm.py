"""Warm vs cold: one process detecting N images against a new process per image (the seed CLIs' way).

``python -m bench warm`` (or ``python -m bench.warm --images N``): a full-size **random-weight**
model set is written to a temp folder in the real on-disk layouts — CLIP ViT-B/32
(``CLIPModel(CLIPConfig())`` + processor, ``save_pretrained``) and SAM ViT-B (a safetensors state
dict) — with settings files pointing ``models.clip`` / ``models.sam`` at them, so each process
times the product's real start-up: interpreter and library imports, settings, the registry loading
both models from disk, then detection. Random weights decide nothing, so each image kind is forced
by its settings file, as in :mod:`bench.detect`:

``product``
    Every gate open (prefilter threshold 0, SAM thresholds 0, margin 0, no background prompts,
    class thresholds 0): prefilter, SAM and CLIP run to the end for every image.
``skip``
    Prefilter threshold 1.0: every image is decided "no product" by one CLIP batch (a shop's
    inbox holds many of these).

For each kind, side by side in this run (after one untimed process that imports the libraries,
so every process finds them in the page cache):

``warm``
    One ``python -m cli detect IMG1 .. IMGN --out D --config S`` process.
``cold``
    ``python -m cli detect IMGk --out D --config S``, a new process per image. Every such process
    does the same work, so only the first few run (``cold_runs``: 4 product and 8 skip images; 1
    and 2 with ``--quick``) and the cold total counts N x their median (the report says so).

Reported per kind: ``cold/warm`` (goal >= 10) and the per-image start-up overhead
``(cold - warm) / N``, with each image's in-process detection time (from its record) as context:
where detection itself costs seconds per image (SAM ViT-B on a CPU) it dominates both cases and
caps the ratio near ``(start-up + detect) / detect``, whatever start-up costs. ``--tiny`` uses the
tiny model set instead (a smoke run in seconds).
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

from bench.measure import stats, status_kib

GOAL = 10.0
KINDS = ("product", "skip")
# Images per kind. Product detection costs seconds per image on a CPU, which caps cold/warm near
# (start-up + detect) / detect whatever N is; skip decisions are cheap, so N bounds that ratio
# (cold/warm < N) and needs to be well above the goal of 10.
# A shop's inbox brings tens to thousands of images at a time; 40 is a small batch.
DEFAULT_IMAGES = {"product": 4, "skip": 40}
QUICK_IMAGES = {"product": 2, "skip": 12}
# Cold processes actually run per kind (each does the same work; the rest is N x their median).
DEFAULT_COLD_RUNS = {"product": 4, "skip": 8}
QUICK_COLD_RUNS = {"product": 1, "skip": 2}
TINY_IMAGES = {"product": 2, "skip": 2}
DEFAULT_SIZE = (1024, 768)
QUICK_SIZE = (512, 384)
TINY_SIZE = (256, 192)
SEED = 0
RUN_TIMEOUT_S = 900.0
EXPECTED_STATUS = {"product": "detected", "skip": "skipped"}


# ------------------------------------------------------------------------------------------------
# Inputs


def forced_detect(base: dict[str, Any], kind: str) -> dict[str, Any]:
    """``base`` detect settings (a dict) forced to one image kind (see the module docstring)."""
    if kind == "product":
        return {**base, "classes": [{**c, "threshold": 0.0} for c in base["classes"]], "background_prompts": [],
                "margin": 0.0, "prefilter": True, "prefilter_threshold": 0.0, "pred_iou_thresh": 0.0,
                "stability_score_thresh": 0.0, "min_mask_area": 0.0, "proposals": "guided"}
    if kind == "skip":
        return {**base, "prefilter": True, "prefilter_threshold": 1.0}
    raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")


def write_settings_variants(folder: Path, data: dict[str, Any], header: str) -> dict[str, Path]:
    """One settings file per kind (``settings-KIND.yaml``) from the settings dict ``data``."""
    import yaml

    out = {}
    for kind in KINDS:
        d = {**data, "detect": forced_detect(data["detect"], kind)}
        p = folder / f"settings-{kind}.yaml"
        p.write_text(f"# {header} ({kind} images forced by settings).\n" + yaml.safe_dump(d, sort_keys=False))
        out[kind] = p
    return out


def write_full_set(out: Path, seed: int = SEED, device: str = "cpu") -> dict[str, Path]:
    """Full-size random-weight CLIP ViT-B/32 and SAM ViT-B in their real layouts, plus one settings
    file per kind. Returns ``{kind: settings path}``."""
    import torch
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipeline.models.registry import quiet_libraries
    from pipeline.settings import DetectSettings
    from pipeline.models.tiny import _clip_tokenizer, tiny_settings_dict

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
    data["runtime"] = {"device": device, "dtype": "auto", "offline": True}
    data["detect"] = DetectSettings().model_dump(mode="json")
    return write_settings_variants(out, data, "Full-size random-weight CLIP ViT-B/32 + SAM ViT-B for bench.warm")


def write_tiny_set(out: Path, device: str = "cpu") -> dict[str, Path]:
    import yaml

    from pipeline.models.tiny import make_tiny_set

    data = yaml.safe_load(make_tiny_set(out, roles=["clip", "sam"]).read_text())
    data["runtime"]["device"] = device
    return write_settings_variants(Path(out), data, "Tiny random-weight CLIP + SAM for bench.warm")


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
    """Run one process; wall seconds, exit code and the child's own peak RSS.

    The peak is the child's ``VmHWM``, polled while it runs (the high-water mark only grows, so the
    last reading is the peak up to ~10 ms before exit): its ``ru_maxrss`` from wait4 would be at
    least this big benchmark process's RSS, which Linux carries over fork and exec."""
    with open(log_file, "ab") as fh:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=_env())
        deadline = time.monotonic() + RUN_TIMEOUT_S
        hwm: float | None = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            kib = status_kib("VmHWM", p.pid)
            hwm = kib / 1024 if kib else hwm
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    p.returncode = code  # reaped here; tell Popen
    if hwm is None:  # not Linux: the kernel's own figure, an upper bound here
        hwm = ru.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru.ru_maxrss / 1024
    return {"wall_s": wall, "returncode": code, "peak_rss_mib": hwm}


def _detect_cmd(images: list[Path], out: Path, settings: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "detect", *map(str, images), "--out", str(out), "--config", str(settings)]


def _records(out: Path, images: list[Path], kind: str) -> list[dict[str, Any]]:
    from bench.detect import BenchError

    from pipeline.io.outputs import record_folder, stem_for

    recs = []
    for img in images:
        f = record_folder(out, EXPECTED_STATUS[kind]) / f"{stem_for(img.name)}.json"
        if not f.is_file():
            raise BenchError(f"no record {f} for {img.name}")
        rec = json.loads(f.read_text())
        if rec.get("status") != EXPECTED_STATUS[kind]:
            raise BenchError(f"{kind}: {img.name}: status {rec.get('status')!r}, not the forced "
                             f"{EXPECTED_STATUS[kind]!r} path (reason {rec.get('reason')!r})")
        recs.append(rec)
    return recs


def _detect_s(rec: dict[str, Any]) -> float:
    t = (rec.get("detect") or {}).get("timings") or rec.get("timings") or {}
    return float(t["total"]) if "total" in t else float(sum(t.values()))


def _kind_result(kind: str, n: int, warm: dict[str, Any], cold_runs: list[dict[str, Any]],
                 warm_recs: list[dict[str, Any]], cold_recs: list[dict[str, Any]]) -> dict[str, Any]:
    measured = len(cold_runs)
    cold_s = sum(r["wall_s"] for r in cold_runs)
    if measured < n:  # every cold process does the same work: N x the median of those measured
        cold_s = n * statistics.median(r["wall_s"] for r in cold_runs)
    warm_s = warm["wall_s"]
    cold_detect = [_detect_s(r) for r in cold_recs]
    warm_detect = [_detect_s(r) for r in warm_recs]
    ratio = cold_s / warm_s if warm_s > 0 else float("inf")
    n_dets = lambda recs: [len((r.get("detect") or {}).get("detections", [])) for r in recs]  # noqa: E731
    return {
        "cases": {
            f"{kind}_warm": {**stats([warm_s]), "processes": 1, "per_image_s": warm_s / n,
                             "measures": f"one process detecting {n} {kind} images (start-up once)",
                             "detect_s_per_image": warm_detect, "startup_s": warm_s - sum(warm_detect),
                             "detections": n_dets(warm_recs), "peak_rss_mib": round(warm["peak_rss_mib"], 1)},
            f"{kind}_cold": {**stats([r["wall_s"] for r in cold_runs]), "processes": n, "wall_s": cold_s,
                             "per_image_s": cold_s / n,
                             "measures": f"a new process per {kind} image (runs = one process each; total "
                                         f"{cold_s:.1f} s for {n}"
                                         + (f", = {n} x the median of {measured} measured)" if measured < n else ")"),
                             "cold_processes_measured": measured,
                             "detect_s_per_image": cold_detect,
                             "startup_s_per_process": [r["wall_s"] - t for r, t in zip(cold_runs, cold_detect)],
                             "detections": n_dets(cold_recs),
                             "peak_rss_mib": round(max(r["peak_rss_mib"] for r in cold_runs), 1)},
        },
        "ratio": {"value": ratio, "goal": GOAL, "met": ratio >= GOAL, "label": f"cold/warm, {kind} images"},
        "startup_overhead_per_image_s": (cold_s - warm_s) / n,
        "startup_share_of_cold": (cold_s - sum(cold_detect)) / cold_s if cold_s > 0 else 0.0,
        "detect_median_s": statistics.median(cold_detect + warm_detect),
        # Detection in a fresh process is slower than in a warm one (first forwards: lazy init,
        # kernel/primitive set-up, allocator growth); that is start-up cost too, inside "detect".
        "first_detect_penalty_s": statistics.median(cold_detect) - statistics.median(warm_detect),
    }


def run_warm(*, n: int | dict[str, int] | None = None, tiny: bool = False, size: tuple[int, int] | None = None,
             kinds: tuple[str, ...] = KINDS, cold_runs: int | dict[str, int] | None = None, device: str = "cpu",
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the model set and images, run both cases per kind, return the result dict.

    ``n``: images per kind (an int for every kind, or ``{kind: n}``; default :data:`DEFAULT_IMAGES`);
    ``cold_runs``: how many cold processes to run per kind (an int or ``{kind: n}``; default all
    ``n``); ``device``: the
    settings' ``runtime.device`` (``auto``: CUDA when there is a GPU)."""
    from bench.detect import BenchError

    counts = dict(DEFAULT_IMAGES) if n is None else ({k: n for k in KINDS} if isinstance(n, int) else dict(n))
    colds = {k: (cold_runs.get(k) if isinstance(cold_runs, dict) else cold_runs) or counts[k] for k in kinds}
    if any(counts[k] < 1 or colds[k] < 1 for k in kinds):
        raise ValueError("image and process counts must be at least 1")
    say = log or (lambda _m: None)
    size = size or (TINY_SIZE if tiny else DEFAULT_SIZE)
    repo = Path(__file__).resolve().parent.parent
    t_start = time.perf_counter()
    per_kind: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as d:
        root = Path(d)
        t0 = time.perf_counter()
        if tiny:
            say("writing the tiny model set (clip, sam) ...")
            settings = write_tiny_set(root / "models", device)
            models = "tiny random-weight set (clip, sam)"
        else:
            say("writing full-size random-weight CLIP ViT-B/32 and SAM ViT-B in their on-disk layouts ...")
            settings = write_full_set(root / "models", device=device)
            models = "full-size random weights on disk: CLIP ViT-B/32 (save_pretrained), SAM ViT-B (safetensors)"
        write_s = time.perf_counter() - t0
        disk_mib = sum(f.stat().st_size for f in (root / "models").rglob("*") if f.is_file()) / 2 ** 20
        all_images = write_images(root / "images", max(counts[k] for k in kinds), size)
        log_file = root / "runs.log"

        say("untimed: one process importing the libraries (page cache) ...")
        _run([sys.executable, "-c", "import torch, transformers, segment_anything, safetensors, cli.app"],
             log_file, repo)

        for kind in kinds:
            images = all_images[:counts[kind]]
            n_cold = min(colds[kind], len(images))
            say(f"{kind} images, cold: {n_cold} processes, one image each ...")
            cold = []
            for i, img in enumerate(images[:n_cold]):
                r = _run(_detect_cmd([img], root / kind / "cold", settings[kind]), log_file, repo)
                say(f"  cold {i + 1}/{n_cold}: {r['wall_s']:.2f} s (exit {r['returncode']})")
                cold.append(r)
            say(f"{kind} images, warm: 1 process, {len(images)} images ...")
            warm = _run(_detect_cmd(images, root / kind / "warm", settings[kind]), log_file, repo)
            say(f"  warm: {warm['wall_s']:.2f} s (exit {warm['returncode']})")
            bad = [r for r in [*cold, warm] if r["returncode"] != 0]
            if bad:
                tail = log_file.read_text(errors="replace")[-3000:]
                raise BenchError(f"{len(bad)} detect process(es) failed (exit {bad[0]['returncode']}):\n{tail}")
            per_kind[kind] = _kind_result(kind, len(images), warm, cold,
                                          warm_recs=_records(root / kind / "warm", images, kind),
                                          cold_recs=_records(root / kind / "cold", images[:n_cold], kind))

    import torch

    context = {
        "models": models,
        "model_files_mib": round(disk_mib, 1),
        "model_set_write_s": write_s,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "image_size": list(size),
        "images": {k: counts[k] for k in kinds},
        "python": sys.executable,
        "peak_rss_mib": {"bench_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "total_s": time.perf_counter() - t_start,
    }
    notes = [f"{models}; images of {size[0]}x{size[1]} ({', '.join(f'{counts[k]} {k}' for k in kinds)}); each process is `python -m cli detect` "
             "(imports, settings, registry loading both models from disk, detection, outputs); peak RSS is each "
             "process's own (the largest cold one)."]
    for kind, k in per_kind.items():
        cold = k["cases"][f"{kind}_cold"]
        notes.append(f"{kind} images: start-up costs {k['startup_overhead_per_image_s']:.1f} s per image "
                     f"({k['startup_share_of_cold']:.0%} of the cold wall time is outside detection); detection "
                     f"itself {statistics.median(cold['detect_s_per_image']):.2f} s per image in a fresh process"
                     + (", which caps cold/warm near (start-up + detect) / detect here." if kind == "product"
                        else f"; cold/warm can never exceed N = {counts[kind]}."))
    context["notes"] = notes
    return {
        "benchmark": "warm",
        "context": context,
        "kinds": {kind: {k: v for k, v in r.items() if k not in ("cases", "ratio")} for kind, r in per_kind.items()},
        "cases": {name: c for r in per_kind.values() for name, c in r["cases"].items()},
        "ratios": {f"cold/warm ({kind})": r["ratio"] for kind, r in per_kind.items()},
    }


# ------------------------------------------------------------------------------------------------
# Reporting


def render(result: dict[str, Any], console: Any = None) -> None:
    from bench.report import render as render_result

    render_result(result, console, title="warm vs cold: detect only (each process run once; seconds are context)")


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench warm``: ``--tiny`` for the tiny set, ``--quick``, ``--size``, ``--images N``."""
    from rich.console import Console

    err = Console(stderr=True)
    quick = getattr(opts, "quick", False)
    n = getattr(opts, "images", None) or (TINY_IMAGES if opts.tiny else QUICK_IMAGES if quick else DEFAULT_IMAGES)
    size = opts.size or (TINY_SIZE if opts.tiny else QUICK_SIZE if quick else DEFAULT_SIZE)
    cold = None if opts.tiny else QUICK_COLD_RUNS if quick else DEFAULT_COLD_RUNS
    result = run_warm(n=n, tiny=opts.tiny, size=size, cold_runs=cold,
                      device=getattr(opts, "device", "auto"), log=lambda m: err.print(m, highlight=False))
    render(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.warm [--images N] [bench options]``."""
    from bench.__main__ import main as bench_main

    return bench_main(["warm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
