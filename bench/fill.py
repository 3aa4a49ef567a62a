"""Fill cost per backend: LaMa, SD inpainting and OpenCV filling the same product-sized hole.

Each case is :func:`pipeline.ops.inpaint.fill` on a 1024 x 768 photo (default) with the hole a
product leaves (a rounded box 30 % of the width and 45 % of the height, dilated by the shipped
``displace.mask_dilation``), at the shipped ``displace`` settings: crop margin 0.5, blend 4, SD at
512 px with 30 DDIM steps, guidance 2 (classifier-free guidance, batch 2), strength 1.0; LaMa on the
crop at the photo's own scale (up to ``lama_resolution`` 1024), padded to a multiple of 8.

Models are full-size **random weights** (seeded), installed into a
:class:`~pipeline.models.registry.ModelRegistry`, so ``fill`` runs on them unchanged; cost does not depend
on the weights' values:

``lama``
    big-lama's architecture (FFCResNetGenerator: 3 downsamplings, 18 Fourier-convolution blocks,
    51 M parameters) from spandrel (MIT, maintained; ``pip install spandrel``), an eager module
    with the published TorchScript file's contract, float32 as the registry loads it.
``sd``
    SD 1.5 inpainting: UNet (9 input channels, ~860 M parameters), VAE, CLIP ViT-L/14 text encoder
    (:func:`bench.enhance.build_full_registry`).
``classical``
    ``cv2.inpaint`` Navier-Stokes, radius 5 (no model).

One warm-up run per case, then the median of ``repeats`` runs, interleaved round by round; an SD
case whose warm-up took over ``SLOW_SD_S`` runs only that once (counted; the results say so).
With ``--quick`` SD runs at 2 and 4 steps (a warm-up and one counted run each) and its cost at
the shipped step count is *extrapolated* linearly from those two (fixed part + steps x per-step
part), and the results say so. Ratio: ``sd / lama`` at the shipped settings.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from bench import malloc_mode
from bench.detect import BenchError, _peak_rss_mib, repeats_option, synthetic_image
from bench.measure import PeakMemory, Rounds, run_with_models, stats
from pipeline.models.registry import ModelRegistry
from pipeline.settings import DisplaceSettings

CASES = ("lama", "sd", "classical")
DEFAULT_SIZE = (1024, 768)
TINY_SIZE = (160, 120)
QUICK_SD_STEPS = (2, 4)
SLOW_SD_S = 120.0
SEED = 0
MEASURES = {
    "lama": "LaMa (big-lama architecture): one forward pass on the hole's crop at the photo's scale",
    "sd": "SD 1.5 inpainting on the hole's crop at `resolution` px (steps in the case name)",
    "classical": "OpenCV cv2.inpaint (Navier-Stokes) on the hole's box",
}


def hole_mask(width: int, height: int) -> np.ndarray:
    """HxW bool: a product-sized rounded box, 30 % of the width and 45 % of the height, centred
    slightly below the middle (where a product stands in a catalogue photo)."""
    import cv2

    m = np.zeros((height, width), np.uint8)
    w, h = int(0.3 * width), int(0.45 * height)
    x0, y0 = (width - w) // 2, int(0.3 * height)
    x1, y1 = x0 + w - 1, y0 + h - 1  # cv2 draws inclusive corners
    r = max(1, min(w, h) // 8)
    cv2.rectangle(m, (x0 + r, y0), (x1 - r, y1), 1, -1)
    cv2.rectangle(m, (x0, y0 + r), (x1, y1 - r), 1, -1)
    for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
        cv2.circle(m, (cx, cy), r, 1, -1)
    return m.astype(bool)


def full_lama(device: Any, seed: int = SEED) -> Any:
    """big-lama's architecture with random weights, from spandrel (never a hand-written copy)."""
    import torch

    try:
        from spandrel.architectures.LaMa import LaMa
    except ImportError:
        raise BenchError("the full-size LaMa case needs spandrel (pip install 'product-studio[dev]' or "
                         "pip install spandrel); --tiny runs without it") from None
    torch.manual_seed(seed)
    return LaMa(in_nc=4, out_nc=3).to(device=device, dtype=torch.float32).eval()


def build_registry(device: str, tiny_dir: str | Path | None) -> tuple[ModelRegistry, str]:
    if tiny_dir is not None:
        from pipeline.settings import load_settings

        settings = load_settings(Path(tiny_dir) / "settings.yaml")
        settings.runtime.device = device
        registry = ModelRegistry(settings)
        for role in ("inpaint", "inpaint_fill"):
            registry.get(role)  # load outside every timing
        return registry, f"tiny random-weight set ({tiny_dir})"
    from bench.enhance import build_full_registry

    registry = build_full_registry(device, roles=("inpaint",))
    registry.put("inpaint_fill", full_lama(registry.runtime.device))
    return registry, ("full-size random weights: big-lama architecture (spandrel, 51 M parameters, float32); "
                      "SD 1.5 inpainting UNet/VAE/CLIP ViT-L text")


def _sync(registry: ModelRegistry) -> None:
    if registry.runtime.device.type == "cuda":
        import torch

        torch.cuda.synchronize(registry.runtime.device)


def run_fill(*, repeats: int = 3, size: tuple[int, int] = DEFAULT_SIZE, device: str = "auto",
             tiny_dir: str | Path | None = None, sd_steps: tuple[int, ...] | None = None, warmup: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the cases side by side and return the result dict (see the module docstring).

    ``sd_steps``: None runs SD at the shipped ``displace.fill.steps``; two step counts run SD at each
    (once per round) and extrapolate the shipped cost from them.
    """
    import torch

    from pipeline.io.composite import dilate, bbox
    from pipeline.ops.inpaint import fill

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if sd_steps is not None and (len(sd_steps) != 2 or sd_steps[0] >= sd_steps[1]):
        raise ValueError("sd_steps: two increasing step counts")
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    say("building the models ..." if tiny_dir else "building full-size random-weight big-lama and SD 1.5 inpainting ...")
    registry, models = build_registry(device, tiny_dir)
    shipped = DisplaceSettings()
    p = registry.settings.displace if tiny_dir else shipped
    W, H = size
    image = Image.fromarray(synthetic_image(W, H), "RGB")
    mask = hole_mask(W, H)
    hole = dilate(mask, p.fill.mask_dilation)
    src = np.asarray(image)
    steps_list = [p.fill.steps] if sd_steps is None else list(sd_steps)
    names = ["lama", *(f"sd@{s}" for s in steps_list), "classical"]
    mem = {n: PeakMemory(registry.runtime.device) for n in names}

    def run_case(name: str) -> tuple[float, dict[str, Any]]:
        backend = name.split("@")[0]
        fs = p.fill.model_copy(update={"steps": int(name.split("@")[1])}) if backend == "sd" else p.fill
        with mem[name]:
            t0 = time.perf_counter()
            out, rec = fill(image, mask, fs, registry, seed=p.seed, backend=backend)
            _sync(registry)
            dt = time.perf_counter() - t0
        if rec["backend"] != backend:
            raise BenchError(f"{name}: filled with {rec['backend']}")
        if not (np.asarray(out)[~hole] == src[~hole]).all():
            raise BenchError(f"{name}: pixels outside the dilated hole changed")
        say(f"  {name:<9} {dt:9.3f} s")
        return dt, {k: rec[k] for k in ("crop", "scale", "padded_size", "steps") if k in rec}

    slow = f"sd@{p.fill.steps}" if sd_steps is None else None
    rounds = Rounds(names, lambda name, _warmup: run_case(name), repeats=repeats if warmup else 1,
                    warm=names if warmup else (), slow=slow, slow_s=SLOW_SD_S, say=say)
    times = rounds.times
    cases: dict[str, Any] = {}
    for n in names:
        cases[n] = {**stats(times[n]), "measures": MEASURES[n.split("@")[0]], **rounds.details[n][-1],
                    **mem[n].record()}
    med = {n: statistics.median(times[n]) for n in names}
    if sd_steps is None:
        sd_cost, sd_how = med[f"sd@{p.fill.steps}"], f"measured at {p.fill.steps} steps"
    else:
        (s1, s2) = sd_steps
        per_step = (med[f"sd@{s2}"] - med[f"sd@{s1}"]) / (s2 - s1)
        fixed = med[f"sd@{s1}"] - s1 * per_step
        sd_cost = fixed + shipped.fill.steps * per_step
        sd_how = (f"extrapolated to {shipped.fill.steps} steps from runs at {s1} and {s2} steps "
                  f"(fixed {fixed:.2f} s + {per_step:.2f} s/step)")
        cases["sd (extrapolated)"] = {"median_s": sd_cost, "measures": sd_how, "per_step_s": per_step,
                                      "fixed_s": fixed, "steps": shipped.fill.steps, "extrapolated": True}
    value = sd_cost / med["lama"] if med["lama"] > 0 else float("inf")
    x0, y0, x1, y1 = bbox(mask)
    context = {
        "models": models,
        "device": str(registry.runtime.device) + (f" ({torch.cuda.get_device_name(registry.runtime.device)})"
                                                  if registry.runtime.device.type == "cuda" else ""),
        "dtype": f"lama float32, sd {registry.role_dtype('inpaint')}",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "image_size": [W, H], "hole_box": [int(x0), int(y0), int(x1), int(y1)],
        "hole_share": round(float(hole.sum()) / (W * H), 3),
        "sd_steps": steps_list, "sd_cost_s": sd_cost, "sd_cost_how": sd_how,
        "repeats": repeats, "sd_note": rounds.note, "malloc": malloc_mode(), "peak_rss_mib": round(_peak_rss_mib(), 1),
        "total_s": time.perf_counter() - t_start,
    }
    lama_crop = cases["lama"].get("crop", {})
    context["notes"] = [
        f"{models}; {context['device']}; image {W}x{H}, hole box {x1 - x0}x{y1 - y0} px ({context['hole_share']:.0%} "
        f"of the photo after dilation {p.fill.mask_dilation}); LaMa crop {'x'.join(map(str, lama_crop.get('work_size', [])))} "
        f"at scale {cases['lama'].get('scale')}, padded to {'x'.join(map(str, cases['lama'].get('padded_size', [])))}.",
        (f"SD fill at the shipped settings ({shipped.fill.steps} steps, guidance {shipped.fill.guidance:g}, {registry.work_resolution(shipped.fill.resolution)} px): "
         f"{sd_how}; {rounds.note}." if tiny_dir is None else
         f"tiny set: SD {sd_how} at {registry.work_resolution(p.fill.resolution)} px; a smoke run, the ratio means nothing."),
    ]
    return {"benchmark": "fill", "context": context, "cases": cases,
            "ratios": {"sd/lama": {"value": value, "goal": 1.0, "met": value >= 1.0}}}


def render(result: dict[str, Any], console: Any = None) -> None:
    """Print the result as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title="fill: cost per backend, one product-sized hole (median seconds; absolute times are context)")
    for col, kw in (("case", {}), ("median s", {"justify": "right"}), ("runs", {"justify": "right"}),
                    ("work size", {"justify": "right"}), ("measures", {})):
        t.add_column(col, **kw)
    for name, d in result["cases"].items():
        work = "x".join(map(str, d.get("crop", {}).get("work_size", []))) or "-"
        t.add_row(name, f"{d['median_s']:.3f}", str(len(d.get("runs_s", []))) or "-", work, d["measures"])
    con.print(t)
    r = result["ratios"]["sd/lama"]
    con.print(f"sd / lama at the shipped settings: {r['value']:.1f}x ({result['context']['sd_cost_how']})")
    for n in result["context"]["notes"]:
        con.print(f"note: {n}", highlight=False)


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench fill``: run with the CLI options, print the tables, return the result."""
    from rich.console import Console

    err = Console(stderr=True)
    quick = getattr(opts, "quick", False)
    size = opts.size or (TINY_SIZE if opts.tiny else DEFAULT_SIZE)
    common = dict(repeats=repeats_option(opts), size=size, device=opts.device,
                  log=lambda m: err.print(m, highlight=False))
    if quick:
        common.update(sd_steps=QUICK_SD_STEPS)
    result = run_with_models(opts.tiny, ["inpaint", "inpaint_fill"], run_fill, **common)
    render(result)
    return result


if __name__ == "__main__":
    from bench.__main__ import main as bench_main

    sys.exit(bench_main(["fill", *sys.argv[1:]]))
