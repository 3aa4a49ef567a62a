"""Whole cost of one photo per diffusion operation, default sampler against the few-step samplers.

For each operation the real code runs (:func:`pipeline.enhance.enhance`,
:func:`pipeline.displace.displace` with the SD fill, :func:`pipeline.rotate.rotate` with the SD
fill) on a 1024x768 photo, at the shipped settings (``Settings()``), on full-size **random-weight**
models installed into a :class:`~pipeline.models.registry.ModelRegistry` (SD 1.5 inpainting, ControlNet
depth, Depth Anything V2 Small as in :mod:`bench.enhance`; Zero123 with a CLIP ViT-L/14 image
encoder; one rank-64 acceleration LoRA per few-step sampler on the UNet's attention and
feed-forward layers, loaded unfused through the registry's adapters as the product runs it).
Cost does not depend on the weights' values.

**Cut and scaled.** A shipped default run is minutes per photo on a CPU. Where a stage runs more
denoising steps than ``CUT[1]``, the case runs twice, at ``CUT[0]`` and ``CUT[1]`` steps of that
stage; the stage's per-step cost is the difference over the step difference, and the estimate is
the ``CUT[1]`` run's total plus that per-step cost times the steps left. The few-step samplers'
enhance and fill run at their shipped step counts (nothing scaled). Rotate's novel view (75 DDIM
steps, Zero123; the sampler does not apply to it) is scaled alike in every rotate case. The
results say which stages were scaled from which step counts.

Bench-only changes to the shipped settings, all said in the notes: displace ``recheck: false``
(no CLIP model in the bench; so no retries), rotate ``upscale: off`` and ``matte_refine: false``
(no upscaler or SAM model), ``fill: sd`` (the shipped fill).

Ratios: ``default / lcm`` per operation (goal >= 5 for enhance and displace's fill).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from bench import malloc_mode
from bench.detect import synthetic_image
from bench.measure import PeakMemory
from pipeline.models.registry import ModelRegistry
from pipeline.settings import Settings

OPS = ("enhance", "displace", "rotate")
QUICK_SAMPLERS = ("default", "lcm")
ALL_SAMPLERS = ("default", "lcm", "tcd", "hyper")
CUT = (1, 3)  # denoising steps of a scaled stage: measured at both, extrapolated from them
DEFAULT_SIZE = (1024, 768)
TINY_SIZE = (128, 96)
GOAL = 5.0
LABEL = "handbag"
ACCEL_RANK = 64


# ------------------------------------------------------------------------------------------------
# Models


def _write_accel_lora(unet: Any, out_file: Path, seed: int, rank: int = ACCEL_RANK) -> Path:
    """A random kohya-layout LoRA of ``rank`` on every attention projection and feed-forward linear
    of ``unet`` (the layers LCM-LoRA adapts)."""
    from pipeline.models.tiny import write_kohya_lora

    return write_kohya_lora(unet, out_file, seed, rank=rank, scale=0.01,
                            layers=r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)$")


def _full_novel_view(registry: ModelRegistry, seed: int = 3) -> None:
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipeline.models.registry import NovelViewComponents
    from pipeline.models.novel_view_layout import CCProjection
    from pipeline.models.tiny import SD15_SCHEDULER
    from bench.enhance import sd1_unet_vae

    rt = registry.runtime
    torch.manual_seed(seed)
    # Zero123-XL: SD 1.x UNet blocks with 8 input channels (latents + image latents), 768-d context.
    unet, vae = sd1_unet_vae(8, 32, 256)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                         num_hidden_layers=24, num_attention_heads=16,
                                                         image_size=224, patch_size=14, projection_dim=768))
    place = lambda m: m.to(device=rt.device, dtype=rt.dtype).eval()  # noqa: E731
    registry.put("novel_view", NovelViewComponents(
        vae=place(vae), image_encoder=place(enc), unet=place(unet),
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), feature_extractor=CLIPImageProcessor(),
        cc_projection=place(CCProjection(772, 768))))


def build_registry(device: str, work: Path, samplers: tuple[str, ...], tiny_dir: Path | None) -> ModelRegistry:
    """Full-size random weights (or the tiny set in ``tiny_dir``) for every role the cases use."""
    from pipeline.models.lora_weights import load_spec
    from pipeline.models.samplers import ACCEL_ROLES

    if tiny_dir is not None:
        from pipeline.settings import load_settings

        s = load_settings(tiny_dir / "settings.yaml")
        s.runtime.device = device
        reg = ModelRegistry(s)
        for role in ("inpaint", "controlnet_depth", "depth", "novel_view",
                     *(ACCEL_ROLES[x] for x in samplers if x != "default")):
            reg.get(role)
        return reg
    from bench.enhance import build_full_registry

    reg = build_full_registry(device)
    unet = reg.get("inpaint").unet
    for i, name in enumerate(x for x in samplers if x != "default"):
        f = _write_accel_lora(unet, work / ACCEL_ROLES[name] / "pytorch_lora_weights.safetensors", seed=20 + i)
        reg.put(ACCEL_ROLES[name], load_spec(f))
    _full_novel_view(reg)
    return reg


# ------------------------------------------------------------------------------------------------
# Cases


def _steps_for(denoise: int, strength: float) -> int:
    """Smallest ``steps`` for which diffusers runs ``denoise`` steps at ``strength``."""
    k = 1
    while min(int(k * strength), k) < denoise:
        k += 1
    return k


def _denoise(steps: int, strength: float) -> int:
    return min(int(steps * strength), steps)


def plan_case(op: str, sampler: str, settings: Settings) -> dict[str, Any]:
    """The settings of one case and its scaled stages: ``{"params": [settings per run],
    "scaled": {stage: (n_a, n_b, n_full)}}`` (one run when nothing is scaled)."""
    sp = settings.samplers
    if op == "enhance":
        e = settings.enhance.model_copy(update={"sampler": sampler})
        full = _denoise(e.steps if sampler == "default" else getattr(sp, sampler).steps, e.strength)
        if sampler != "default" or full <= CUT[1]:
            return {"params": [e], "scaled": {}, "denoise": full}
        runs = [e.model_copy(update={"steps": _steps_for(n, e.strength)}) for n in CUT]
        return {"params": runs, "scaled": {"generate": (*CUT, full)}, "denoise": full}
    if op == "displace":
        f = settings.displace.fill.model_copy(update={"sampler": sampler, "backend": "sd", "recheck": False})
        d = settings.displace.model_copy(update={"fill": f})
        full = _denoise(f.steps if sampler == "default" else getattr(sp, sampler).steps, f.strength)
        if sampler != "default" or full <= CUT[1]:
            return {"params": [d], "scaled": {}, "denoise": full}
        runs = [d.model_copy(update={"fill": f.model_copy(update={"steps": _steps_for(n, f.strength)})})
                for n in CUT]
        return {"params": runs, "scaled": {"fill": (*CUT, full)}, "denoise": full}
    if op == "rotate":
        f = settings.rotate.fill.model_copy(update={"sampler": sampler, "backend": "sd"})
        r = settings.rotate.model_copy(update={"fill": f, "upscale": "off", "matte_refine": False})
        fill_full = _denoise(f.steps if sampler == "default" else getattr(sp, sampler).steps, f.strength)
        scaled: dict[str, tuple[int, int, int]] = {}
        upd: list[dict[str, Any]] = [{}, {}]
        if r.steps > CUT[1]:
            scaled["novel_view"] = (*CUT, r.steps)
            for u, n in zip(upd, CUT):
                u["steps"] = n
        if sampler == "default" and fill_full > CUT[1]:
            scaled["fill"] = (*CUT, fill_full)
            for u, n in zip(upd, CUT):
                u["fill"] = f.model_copy(update={"steps": _steps_for(n, f.strength)})
        runs = [r.model_copy(update=u) for u in upd] if scaled else [r]
        return {"params": runs, "scaled": scaled, "denoise": fill_full}
    raise ValueError(f"unknown operation {op!r}")


def product_mask(width: int, height: int) -> np.ndarray:
    """HxW bool: an ellipse left of centre, 30 % of the width and 50 % of the height across."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return ((yy - 0.5 * height) / (0.25 * height)) ** 2 + ((xx - 0.35 * width) / (0.15 * width)) ** 2 <= 1.0


def _run_op(op: str, params: Any, image: Image.Image, mask: np.ndarray, registry: ModelRegistry) -> Any:
    if op == "enhance":
        from pipeline.ops.enhance import enhance

        return enhance(image, mask, LABEL, params, registry)
    if op == "displace":
        from pipeline.ops.displace import displace

        return displace(image, mask, LABEL, image.size[0] // 10, 0, params, registry)
    from pipeline.ops.rotate import rotate

    return rotate(image, mask, LABEL, 30.0, 0.0, params, registry)


def _sampler_record(op: str, rec: dict[str, Any]) -> dict[str, Any]:
    if op == "enhance":
        return rec["sampler"]
    tries = rec["fill"]["tries"]
    return tries[-1]["fill"]["sampler"]


def run_ops(*, size: tuple[int, int] = DEFAULT_SIZE, device: str = "auto", samplers: tuple[str, ...] = ALL_SAMPLERS,
            ops: tuple[str, ...] = OPS, tiny_dir: str | Path | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (operation, sampler) case once (twice where a stage is scaled) and return the
    result dict: ``cases[op][sampler]`` with measured runs, the estimate at shipped settings,
    stages, peak memory and the sampler record; ``ratios`` ``op default/lcm``."""
    import torch

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as work:
        say("building models (full-size random weights)" if tiny_dir is None else "loading the tiny set")
        registry = build_registry(device, Path(work), samplers, Path(tiny_dir) if tiny_dir else None)
        if tiny_dir is not None:
            settings = registry.settings
        W, H = size
        image = Image.fromarray(synthetic_image(W, H), "RGB")
        mask = product_mask(W, H)
        cases: dict[str, dict[str, Any]] = {}
        for op in ops:
            cases[op] = {}
            # One untimed 1-step run per operation first: every case then finds its per-shape
            # kernels and buffers warm, so the first case timed pays no first-call set-up.
            say(f"  {op}: warm-up")
            _run_op(op, plan_case(op, samplers[0], settings)["params"][0], image, mask, registry)
            for sampler in samplers:
                plan = plan_case(op, sampler, settings)
                mem = PeakMemory(registry.runtime.device)
                runs = []
                for params in plan["params"]:
                    with mem:
                        t0 = time.perf_counter()
                        edit = _run_op(op, params, image, mask, registry)
                        if registry.runtime.device.type == "cuda":
                            torch.cuda.synchronize(registry.runtime.device)
                        dt = time.perf_counter() - t0
                    runs.append({"seconds": dt, "timings": dict(edit.record.get("timings", {}))})
                last = runs[-1]
                estimate = last["seconds"]
                per_step: dict[str, float] = {}
                for stage, (na, nb, nfull) in plan["scaled"].items():
                    a, b = runs[0]["timings"].get(stage, 0.0), runs[-1]["timings"].get(stage, 0.0)
                    per_step[stage] = max(0.0, (b - a) / (nb - na))
                    estimate += per_step[stage] * (nfull - nb)
                srec = _sampler_record(op, edit.record)
                measured = [r["seconds"] for r in runs]
                scaled_txt = "; ".join(f"{k} measured at {a} and {b} steps, scaled to {n}"
                                       for k, (a, b, n) in plan["scaled"].items())
                cases[op][sampler] = {
                    "estimate_s": estimate, "measured_s": measured,
                    # report.py's case table: the runs as measured (cut runs included)
                    "runs_s": measured, "min_s": min(measured), "median_s": float(np.median(measured)),
                    "max_s": max(measured),
                    "measures": f"{op}, sampler {sampler} ({srec['scheduler']}, {plan['denoise']} denoising steps, "
                                f"guidance {srec['guidance']:g}): {estimate:.1f} s per photo at shipped settings"
                                + (f" ({scaled_txt})" if scaled_txt else " (not scaled)"),
                    "scaled": {k: {"measured_at_steps": [a, b], "shipped_steps": n, "per_step_s": per_step[k]}
                               for k, (a, b, n) in plan["scaled"].items()},
                    "stages": last["timings"], "denoise_steps": plan["denoise"],
                    "scheduler": srec["scheduler"], "guidance": srec["guidance"],
                    "acceleration": None if not srec.get("acceleration") else
                    {k: srec["acceleration"].get(k) for k in ("role", "sha256", "weight")},
                    **mem.record(),
                }
                say(f"  {op:<8} {sampler:<7} {estimate:9.2f} s per photo"
                    + (" (scaled)" if plan["scaled"] else ""))
    ratios = {}
    for op in ops:
        if "default" in cases[op] and "lcm" in cases[op]:
            v = cases[op]["default"]["estimate_s"] / max(cases[op]["lcm"]["estimate_s"], 1e-9)
            goal = GOAL if op in ("enhance", "displace") else None
            ratios[f"{op} default/lcm"] = {"value": v, "goal": goal, "met": None if goal is None else v >= goal}
    context = {
        "models": "tiny random-weight set" if tiny_dir else ("full-size random weights: SD 1.5 inpainting, ControlNet "
                                                             "depth, Depth Anything V2 Small, Zero123 (CLIP ViT-L/14 "
                                                             f"image encoder), rank-{ACCEL_RANK} acceleration LoRAs"),
        "device": str(registry.runtime.device) + (f" ({torch.cuda.get_device_name(registry.runtime.device)})"
                                                  if registry.runtime.device.type == "cuda" else ""),
        "dtype": str(registry.runtime.dtype).replace("torch.", ""),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "image_size": [W, H],
        "malloc": malloc_mode(), "total_s": time.perf_counter() - t_start,
        "notes": [
            f"one photo {W}x{H}, shipped settings; stages with more than {CUT[1]} denoising steps measured at "
            f"{CUT[0]} and {CUT[1]} steps and scaled by the measured per-step cost (see `scaled`)",
            "bench-only: displace recheck off (no CLIP model); rotate upscale off and matte_refine off (no "
            "upscaler or SAM model); fill sd; rotate's novel view (Zero123, 75 DDIM steps) is scaled in every case",
        ],
    }
    flat = {f"{op} {s}": c for op, by in cases.items() for s, c in by.items()}
    return {"benchmark": "ops", "context": context, "cases": flat, "ratios": ratios}


def render(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=160)
    t = Table(title="ops: seconds per photo at shipped settings (estimate; scaled stages marked)")
    for col in ("operation", "sampler", "scheduler", "steps", "guidance", "s per photo", "photos/h", "measured s",
                "peak RSS MiB"):
        t.add_column(col, justify="left" if col in ("operation", "sampler", "scheduler") else "right")
    for name, c in result["cases"].items():
        op, s = name.split(" ", 1)
        est = c["estimate_s"]
        t.add_row(op, s, c["scheduler"], str(c["denoise_steps"]), f"{c['guidance']:g}",
                  f"{est:.1f}" + ("*" if c["scaled"] else ""), f"{3600 / est:.0f}" if est > 0 else "-",
                  ", ".join(f"{x:.1f}" for x in c["measured_s"]), f"{c['peak_rss_mib']:.0f}")
    con.print(t)
    for name, v in result["ratios"].items():
        goal = "" if v["goal"] is None else f" (goal >= {v['goal']:g}: {'met' if v['met'] else 'NOT met'})"
        con.print(f"{name}: {v['value']:.1f}x{goal}")
    ctx = result["context"]
    con.print(f"context: {ctx['models']}; {ctx['device']} {ctx['dtype']}, {ctx['cpu_count']} CPUs, "
              f"{ctx['torch_threads']} threads; total {ctx['total_s']:.0f} s. " + " ".join(ctx["notes"]))


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench ops``: ``--quick`` runs default and lcm only; ``--tiny`` the tiny set."""
    from rich.console import Console

    err = Console(stderr=True)
    quick = getattr(opts, "quick", False)
    samplers = QUICK_SAMPLERS if quick else ALL_SAMPLERS
    size = opts.size or (TINY_SIZE if opts.tiny else DEFAULT_SIZE)
    common = dict(size=size, device=opts.device, samplers=samplers, log=lambda m: err.print(m, highlight=False))
    if opts.tiny:
        from pipeline.models.tiny import make_tiny_set

        with tempfile.TemporaryDirectory(prefix="bench-tiny-") as d:
            err.print("building the tiny model set ...")
            make_tiny_set(d, roles=["inpaint", "controlnet_depth", "depth", "novel_view", "lcm_lora", "tcd_lora",
                                    "hyper_lora"])
            result = run_ops(tiny_dir=d, **common)
    else:
        result = run_ops(**common)
    render(result)
    return result
