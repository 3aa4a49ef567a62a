"""Whole cost of one photo per diffusion operation, default sampler against the few-step samplers.

For each operation the real code runs (:func:`pipeline.enhance.enhance`,
:func:`pipeline.displace.displace` with the SD fill, :func:`pipeline.rotate.rotate` with the SD
fill) on a 1024x768 photo, at the shipped settings (``Settings()``), on full-size **random-weight**
models installed into a :class:`~pipeline.models.registry.ModelRegistry` (SD 1.5 inpainting, ControlNet
depth, Depth Anything V2 Small as in :mod:`bench.enhance`; Zero123 with a CLIP ViT-L/14 image
encoder; one rank-64 acceleration LoRA per few-step sampler on the UNet's attention and
feed-forward layers, loaded unfused through the registry's adapters as the product runs it).
Cost does not depend on the weights' values.

**Cut and scaled.** A shipped default run is minutes per photo on a CPU. A stage that runs more
denoising steps than ``MEASURED_STEPS`` runs at ``MEASURED_STEPS`` instead, once; a forward
pre-hook on its UNet timestamps every denoising step, and the stage's per-step cost is the median
interval between consecutive steps' UNet calls (UNet, ControlNet, scheduler: one whole step). The
estimate is the run's total plus that per-step cost times the steps left. The few-step samplers'
enhance and fill run at their shipped step counts (nothing scaled). Rotate's novel view (75 DDIM
steps, Zero123; the sampler does not apply to it) is scaled alike in every rotate case. The
results say which stages were scaled from what.

Each operation first runs once untimed at one denoising step (every case then finds its kernels,
buffers and the depth model warm). Models are built once: Zero123's UNet shares the inpainting
UNet's weights (all but its 8-channel input convolution), which changes no cost.

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
MEASURED_STEPS = 2  # denoising steps a scaled stage runs; per-step cost from the intervals between them
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
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipeline.models.registry import NovelViewComponents
    from pipeline.models.novel_view_layout import CCProjection
    from pipeline.models.tiny import SD15_SCHEDULER
    from bench.enhance import sd1_vae

    rt = registry.runtime
    torch.manual_seed(seed)
    # Zero123-XL: SD 1.x UNet blocks with 8 input channels (latents + image latents), 768-d context.
    # Built on the meta device and given the inpainting UNet's tensors (all but conv_in): no second
    # 860M-parameter random init, no second copy in memory; cost does not depend on the values.
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=32, in_channels=8, out_channels=4, cross_attention_dim=768)
    shared = {k: v for k, v in registry.get("inpaint").unet.state_dict().items() if not k.startswith("conv_in.")}
    unet.load_state_dict(shared, strict=False, assign=True)
    unet.conv_in = torch.nn.Conv2d(8, unet.conv_in.out_channels, kernel_size=3, padding=1)
    vae = sd1_vae(256)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                         num_hidden_layers=24, num_attention_heads=16,
                                                         image_size=224, patch_size=14, projection_dim=768))
    place = lambda m: m.to(device=rt.device, dtype=rt.diffusion_dtype).eval()  # noqa: E731
    registry.put("novel_view", NovelViewComponents(
        vae=place(vae), image_encoder=place(enc), unet=place(unet),
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), feature_extractor=CLIPImageProcessor(),
        cc_projection=place(CCProjection(772, 768))))


def build_registry(device: str, work: Path, samplers: tuple[str, ...], tiny_dir: Path | None,
                   dtype: str | None = None) -> ModelRegistry:
    """Full-size random weights (or the tiny set in ``tiny_dir``) for every role the cases use."""
    from pipeline.models.lora_weights import load_spec
    from pipeline.models.samplers import ACCEL_ROLES

    if tiny_dir is not None:
        from pipeline.settings import load_settings

        s = load_settings(tiny_dir / "settings.yaml")
        s.runtime.device = device
        if dtype is not None:  # else the tiny set's own (float32)
            s.runtime.dtype = dtype
        reg = ModelRegistry(s)
        for role in ("inpaint", "controlnet_depth", "depth", "novel_view",
                     *(ACCEL_ROLES[x] for x in samplers if x != "default")):
            reg.get(role)
        return reg
    from bench.enhance import build_full_registry

    reg = build_full_registry(device, dtype=dtype or "auto")
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


def plan_case(op: str, sampler: str, settings: Settings, measured: int = MEASURED_STEPS) -> dict[str, Any]:
    """The settings of one case's one run and its scaled stages: ``{"params": settings,
    "scaled": {stage: (n_measured, n_full)}, "denoise": the fill's / generation's full steps}``."""
    sp = settings.samplers
    if op == "enhance":
        e = settings.enhance.model_copy(update={"sampler": sampler})
        full = _denoise(e.steps if sampler == "default" else getattr(sp, sampler).steps, e.strength)
        if sampler != "default" or full <= measured:
            return {"params": e, "scaled": {}, "denoise": full}
        return {"params": e.model_copy(update={"steps": _steps_for(measured, e.strength)}),
                "scaled": {"generate": (measured, full)}, "denoise": full}
    if op == "displace":
        f = settings.displace.fill.model_copy(update={"sampler": sampler, "backend": "sd", "recheck": False})
        d = settings.displace.model_copy(update={"fill": f})
        full = _denoise(f.steps if sampler == "default" else getattr(sp, sampler).steps, f.strength)
        if sampler != "default" or full <= measured:
            return {"params": d, "scaled": {}, "denoise": full}
        return {"params": d.model_copy(update={"fill": f.model_copy(update={"steps": _steps_for(measured, f.strength)})}),
                "scaled": {"fill": (measured, full)}, "denoise": full}
    if op == "rotate":
        f = settings.rotate.fill.model_copy(update={"sampler": sampler, "backend": "sd"})
        r = settings.rotate.model_copy(update={"fill": f, "upscale": "off", "matte_refine": False})
        fill_full = _denoise(f.steps if sampler == "default" else getattr(sp, sampler).steps, f.strength)
        scaled: dict[str, tuple[int, int]] = {}
        upd: dict[str, Any] = {}
        if r.steps > measured:
            scaled["novel_view"] = (measured, r.steps)
            upd["steps"] = measured
        if sampler == "default" and fill_full > measured:
            scaled["fill"] = (measured, fill_full)
            upd["fill"] = f.model_copy(update={"steps": _steps_for(measured, f.strength)})
        return {"params": r.model_copy(update=upd), "scaled": scaled, "denoise": fill_full}
    raise ValueError(f"unknown operation {op!r}")


class StepClock:
    """Forward pre-hooks on UNets, one name per UNet (``{"generate": inpaint_unet}``): the time of
    every call, so a run's per-step cost is read off the steps it ran. One UNet call is one
    denoising step (classifier-free guidance batches both passes into one call)."""

    def __init__(self, unets: dict[str, Any]):
        self.unets = unets
        self.times: dict[str, list[float]] = {k: [] for k in unets}
        # The process's CPU time (all threads) at the same calls: far less disturbed than wall
        # time when other processes share the CPU.
        self.cpu: dict[str, list[float]] = {k: [] for k in unets}
        self._handles: list[Any] = []

    def __enter__(self) -> "StepClock":
        def stamp(wall: list[float], cpu: list[float]) -> Callable[..., None]:
            def hook(*_a: Any) -> None:  # returns None: a pre-hook's return value would replace the input
                wall.append(time.perf_counter())
                cpu.append(time.process_time())
            return hook

        for name, unet in self.unets.items():
            self._handles.append(unet.register_forward_pre_hook(stamp(self.times[name], self.cpu[name])))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def per_step(self, name: str, cpu: bool = False) -> float | None:
        """Median interval between consecutive calls of ``name``'s UNet, in wall seconds or (``cpu``)
        the process's CPU seconds (None: fewer than 2 calls)."""
        t = (self.cpu if cpu else self.times)[name]
        gaps = [b - a for a, b in zip(t, t[1:])]
        return float(np.median(gaps)) if gaps else None


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


def _unets(registry: ModelRegistry, op: str) -> dict[str, Any]:
    """The UNets whose steps an operation's scaled stages count (see :class:`StepClock`)."""
    inpaint = registry.get("inpaint").unet
    if op == "enhance":
        return {"generate": inpaint}
    if op == "displace":
        return {"fill": inpaint}
    return {"fill": inpaint, "novel_view": registry.get("novel_view").unet}


def run_ops(*, size: tuple[int, int] = DEFAULT_SIZE, device: str = "auto", samplers: tuple[str, ...] = ALL_SAMPLERS,
            ops: tuple[str, ...] = OPS, tiny_dir: str | Path | None = None, dtype: str | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (operation, sampler) case once and return the result dict: ``cases[op][sampler]``
    with the measured run, the estimate at shipped settings (scaled stages: per-step cost from
    :class:`StepClock`), stages, peak memory and the sampler record; ``ratios`` ``op default/lcm``.
    ``dtype``: ``runtime.dtype`` (None: ``auto``, the product's choice, bf16 diffusion models on a
    CPU with native bf16; the tiny set: its own settings, float32)."""
    import torch

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as work:
        say("building models (full-size random weights)" if tiny_dir is None else "loading the tiny set")
        registry = build_registry(device, Path(work), samplers, Path(tiny_dir) if tiny_dir else None, dtype=dtype)
        build_s = time.perf_counter() - t_start
        say(f"  built in {build_s:.0f} s; diffusion models in {registry.role_dtype('inpaint')}")
        if tiny_dir is not None:
            settings = registry.settings
        W, H = size
        image = Image.fromarray(synthetic_image(W, H), "RGB")
        mask = product_mask(W, H)
        cases: dict[str, dict[str, Any]] = {}
        warmup_s: dict[str, float] = {}
        for op in ops:
            cases[op] = {}
            # One untimed 1-step run per operation first: every case then finds its per-shape
            # kernels and buffers warm, so the first case timed pays no first-call set-up.
            say(f"  {op}: warm-up")
            t0 = time.perf_counter()
            _run_op(op, plan_case(op, samplers[0], settings, measured=1)["params"], image, mask, registry)
            warmup_s[op] = time.perf_counter() - t0
            for sampler in samplers:
                plan = plan_case(op, sampler, settings)
                mem = PeakMemory(registry.runtime.device)
                with mem, StepClock(_unets(registry, op)) as clock:
                    t0, c0 = time.perf_counter(), time.process_time()
                    edit = _run_op(op, plan["params"], image, mask, registry)
                    if registry.runtime.device.type == "cuda":
                        torch.cuda.synchronize(registry.runtime.device)
                    dt, cpu_s = time.perf_counter() - t0, time.process_time() - c0
                estimate, estimate_cpu = dt, cpu_s
                per_step: dict[str, float] = {}
                per_step_cpu: dict[str, float] = {}
                for stage, (n, nfull) in plan["scaled"].items():
                    ps = clock.per_step(stage)
                    if ps is None:
                        raise RuntimeError(f"{op} {sampler}: stage {stage} ran fewer than 2 UNet steps; cannot scale")
                    per_step[stage] = ps
                    per_step_cpu[stage] = clock.per_step(stage, cpu=True) or 0.0
                    estimate += ps * (nfull - n)
                    estimate_cpu += per_step_cpu[stage] * (nfull - n)
                srec = _sampler_record(op, edit.record)
                scaled_txt = "; ".join(f"{k} run at {a} steps, scaled to {n} at {per_step[k]:.2f} s per step"
                                       for k, (a, n) in plan["scaled"].items())
                dtype_used = registry.role_dtype("inpaint")
                cases[op][sampler] = {
                    "estimate_s": estimate, "measured_s": [dt],
                    # the same in the process's CPU seconds (all threads): robust to a shared CPU
                    "cpu_s": cpu_s, "estimate_cpu_s": estimate_cpu,
                    # report.py's case table: the run as measured (cut runs included)
                    "runs_s": [dt], "min_s": dt, "median_s": dt, "max_s": dt,
                    "measures": f"{op}, sampler {sampler} ({srec['scheduler']}, {plan['denoise']} denoising steps, "
                                f"guidance {srec['guidance']:g}, {dtype_used}): {estimate:.1f} s per photo at "
                                "shipped settings" + (f" ({scaled_txt})" if scaled_txt else " (not scaled)"),
                    "scaled": {k: {"measured_steps": a, "shipped_steps": n, "per_step_s": per_step[k],
                                   "per_step_cpu_s": per_step_cpu[k]}
                               for k, (a, n) in plan["scaled"].items()},
                    "stages": edit.record.get("timings", {}), "denoise_steps": plan["denoise"],
                    "scheduler": srec["scheduler"], "guidance": srec["guidance"], "dtype": dtype_used,
                    "acceleration": None if not srec.get("acceleration") else
                    {k: srec["acceleration"].get(k) for k in ("role", "sha256", "weight")},
                    **mem.record(),
                }
                say(f"  {op:<8} {sampler:<7} {estimate:9.2f} s per photo (ran {dt:.1f} s)"
                    + (" (scaled)" if plan["scaled"] else ""))
    ratios = {}
    for op in ops:
        if "default" in cases[op] and "lcm" in cases[op]:
            v = cases[op]["default"]["estimate_s"] / max(cases[op]["lcm"]["estimate_s"], 1e-9)
            goal = GOAL if op in ("enhance", "displace") else None
            vc = cases[op]["default"]["estimate_cpu_s"] / max(cases[op]["lcm"]["estimate_cpu_s"], 1e-9)
            ratios[f"{op} default/lcm"] = {"value": v, "goal": goal, "met": None if goal is None else v >= goal,
                                           "cpu_value": vc}
    rt = registry.runtime
    context = {
        "models": "tiny random-weight set" if tiny_dir else ("full-size random weights: SD 1.5 inpainting, ControlNet "
                                                             "depth, Depth Anything V2 Small, Zero123 (CLIP ViT-L/14 "
                                                             f"image encoder), rank-{ACCEL_RANK} acceleration LoRAs"),
        "device": str(rt.device) + (f" ({torch.cuda.get_device_name(rt.device)})" if rt.device.type == "cuda" else ""),
        "dtype": f"diffusion models {registry.role_dtype('inpaint')}, depth {registry.role_dtype('depth')} "
                 f"(runtime.dtype {registry.settings.runtime.dtype})",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "image_size": [W, H],
        "malloc": malloc_mode(), "build_s": build_s, "warmup_s": warmup_s,
        "total_s": time.perf_counter() - t_start,
        "notes": [
            f"one photo {W}x{H}, shipped settings; stages with more than {MEASURED_STEPS} denoising steps run at "
            f"{MEASURED_STEPS} and scaled by their per-step cost, timed inside the run at the UNet (see `scaled`)",
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
    for col in ("operation", "sampler", "scheduler", "dtype", "steps", "guidance", "s per photo", "photos/h",
                "measured s", "CPU s per photo", "peak RSS MiB"):
        t.add_column(col, justify="left" if col in ("operation", "sampler", "scheduler", "dtype") else "right")
    for name, c in result["cases"].items():
        op, s = name.split(" ", 1)
        est = c["estimate_s"]
        t.add_row(op, s, c["scheduler"], c.get("dtype", "-"), str(c["denoise_steps"]), f"{c['guidance']:g}",
                  f"{est:.1f}" + ("*" if c["scaled"] else ""), f"{3600 / est:.0f}" if est > 0 else "-",
                  ", ".join(f"{x:.1f}" for x in c["measured_s"]),
                  f"{c['estimate_cpu_s']:.1f}" if "estimate_cpu_s" in c else "-", f"{c['peak_rss_mib']:.0f}")
    con.print(t)
    for name, v in result["ratios"].items():
        goal = "" if v["goal"] is None else f" (goal >= {v['goal']:g}: {'met' if v['met'] else 'NOT met'})"
        cpu = f"; in CPU seconds {v['cpu_value']:.1f}x" if "cpu_value" in v else ""
        con.print(f"{name}: {v['value']:.1f}x{goal}{cpu}")
    ctx = result["context"]
    con.print(f"context: {ctx['models']}; {ctx['device']} {ctx['dtype']}, {ctx['cpu_count']} CPUs, "
              f"{ctx['torch_threads']} threads; models built in {ctx.get('build_s', 0):.0f} s; "
              f"total {ctx['total_s']:.0f} s. " + " ".join(ctx["notes"]))


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench ops``: ``--quick`` runs default and lcm only; ``--tiny`` the tiny set;
    ``--dtype`` the models' ``runtime.dtype`` (default ``auto``, the product's choice)."""
    from rich.console import Console

    err = Console(stderr=True)
    quick = getattr(opts, "quick", False)
    samplers = QUICK_SAMPLERS if quick else ALL_SAMPLERS
    size = opts.size or (TINY_SIZE if opts.tiny else DEFAULT_SIZE)
    common = dict(size=size, device=opts.device, samplers=samplers, dtype=getattr(opts, "dtype", None),
                  log=lambda m: err.print(m, highlight=False))
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
