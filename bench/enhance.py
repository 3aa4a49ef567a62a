"""Enhance cost: the crop strategy against whole-image enhancement of the same photo.

Models are full-size **random-weight** SD 1.5 shapes (seeded): the inpainting UNet (9 input
channels, ~860 M parameters), the VAE, the CLIP ViT-L/14 text encoder, the ControlNet (depth) and a
Depth Anything V2 Small depth model, built in-process and installed into a
:class:`~pipeline.models.registry.ModelRegistry`, so :func:`pipeline.enhance.enhance` runs on them unchanged.
What is measured is cost, which for dense models does not depend on the weights' values.

Cases (one product, same prompt, seed, sampler settings: ``STEPS`` steps at strength 1.0, guidance
7 (classifier-free guidance, batch 2), ControlNet depth on; each case is the whole edit: depth,
generation, paste):

``crop``
    ``mode: crop``: the product's box plus a 25 % margin, resized to a long side of 512 (SD 1.5's
    native size); the result is pasted back inside the dilated product mask.
``whole``
    ``mode: whole``: the whole photo at its own size (1024 x 1024 by default), pasted back the same
    way. What enhancing without a crop costs.

One warm-up run per case, then the median of ``repeats`` timed runs, interleaved round by round; a
``whole`` case whose warm-up exceeds ``SLOW_WHOLE_S`` is run only that once (its models are already
warm from the crop warm-up, so that run is counted) and the output says so.
Ratio: ``whole / crop`` (goal >= 3).
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
from bench.detect import BenchError, _peak_rss_mib, common_options, synthetic_image
from bench.measure import PeakMemory, Rounds, run_with_models, stats, tiny_registry
from pipeline.models.registry import HFBundle, ModelRegistry
from pipeline.settings import EnhanceSettings, Settings

CASES = ("crop", "whole")
GOAL = 3.0
STEPS = 2
SLOW_WHOLE_S = 60.0
DEFAULT_SIZE = (1024, 1024)
QUICK_SIZE = (768, 768)
TINY_SIZE = (128, 128)
SEED = 0
LABEL = "handbag"
MEASURES = {
    "crop": "mode crop: product box + 25% margin at long side `resolution`, pasted back in the dilated mask",
    "whole": "mode whole: the whole photo at its own size, pasted back in the dilated mask",
}


# ------------------------------------------------------------------------------------------------
# Inputs


def product_mask(width: int, height: int) -> np.ndarray:
    """HxW bool: a centred ellipse 40 % of the width and 60 % of the height across (a large
    product, which is the crop strategy's least favourable case)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx, ry, rx = 0.5 * height, 0.5 * width, 0.3 * height, 0.2 * width
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def case_params(case: str, base: EnhanceSettings | None = None, steps: int = STEPS) -> EnhanceSettings:
    """The enhance settings of one case: ``base`` (default: the defaults, resolution auto: 512 for SD 1.5) with
    ``steps`` steps, strength 1.0 (every step runs), ControlNet on, and the case's mode."""
    data = (base or EnhanceSettings()).model_dump()
    data.update(mode=case, steps=steps, strength=1.0, controlnet=True, seed=SEED, classes={})
    return EnhanceSettings.model_validate(data)


# ------------------------------------------------------------------------------------------------
# Models


def sd1_unet_vae(in_channels: int, unet_size: int, vae_size: int) -> tuple[Any, Any]:
    """A full-size SD 1.x UNet (``in_channels`` inputs, 768-d cross-attention, ``unet_size``
    latent side) and VAE (``vae_size`` px), random weights from the current torch seed."""
    from diffusers import UNet2DConditionModel

    # UNet2DConditionModel()'s defaults are SD 1.x's blocks.
    unet = UNet2DConditionModel(sample_size=unet_size, in_channels=in_channels, out_channels=4,
                                cross_attention_dim=768)
    return unet, sd1_vae(vae_size)


def sd1_vae(size: int) -> Any:
    """A full-size SD 1.x VAE (``size`` px), random weights from the current torch seed."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=size,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4)


def build_full_registry(device: str = "auto", seed: int = SEED, dtype: str = "auto",
                        roles: tuple[str, ...] = ("inpaint", "controlnet_depth", "depth")) -> ModelRegistry:
    """Registry holding full-size random-weight SD 1.5 inpainting, ControlNet depth and Depth
    Anything V2 Small (never a checkpoint, never the Hub), in ``dtype`` (``auto``: the product's
    choice, see pipeline.models.registry.resolve_runtime: the SD models in its
    diffusion dtype, Depth Anything in its general dtype). ``roles=("inpaint",)`` builds the SD inpainting
    pipeline only (the fill benchmark)."""
    import torch
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        DPTImageProcessor,
    )

    from pipeline.models.tiny import SD15_SCHEDULER, _clip_tokenizer

    settings = Settings()
    settings.runtime.device = device
    settings.runtime.dtype = dtype
    settings.runtime.offline = True
    registry = ModelRegistry(settings)
    rt = registry.runtime

    torch.manual_seed(seed)
    # The inpainting UNet takes 9 channels (latents + mask + masked-image latents) and SD 1.5
    # cross-attends to 768-d CLIP ViT-L text.
    unet, vae = sd1_unet_vae(9, 64, 512)
    tok = _clip_tokenizer()
    # ViT-L/14 text tower; only the vocabulary follows the small offline tokenizer (77 tokens either way).
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                          scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                          feature_extractor=CLIPImageProcessor(), requires_safety_checker=False)
    pipe.to(device=rt.device, dtype=rt.diffusion_dtype)
    pipe.set_progress_bar_config(disable=True)
    registry.put("inpaint", pipe)
    if "controlnet_depth" not in roles and "depth" not in roles:
        return registry

    torch.manual_seed(seed + 1)
    cn = ControlNetModel(in_channels=4, conditioning_channels=3, cross_attention_dim=768)
    registry.put("controlnet_depth", cn.to(device=rt.device, dtype=rt.diffusion_dtype).eval())

    torch.manual_seed(seed + 2)
    depth_cfg = DepthAnythingConfig(
        backbone_config={"model_type": "dinov2", "image_size": 518, "hidden_size": 384, "num_attention_heads": 6,
                         "num_hidden_layers": 12, "out_indices": [3, 6, 9, 12], "apply_layernorm": True,
                         "reshape_hidden_states": False},
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)
    depth = DepthAnythingForDepthEstimation(depth_cfg)
    proc = DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                             resample=Image.Resampling.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225])
    registry.put("depth", HFBundle(depth.to(device=rt.device, dtype=rt.dtype).eval(), proc))
    return registry


# ------------------------------------------------------------------------------------------------
# Running and reporting


def _sync(registry: ModelRegistry) -> None:
    if registry.runtime.device.type == "cuda":
        import torch

        torch.cuda.synchronize(registry.runtime.device)


def run_enhance(*, repeats: int = 3, size: tuple[int, int] = DEFAULT_SIZE, device: str = "auto",
                tiny_dir: str | Path | None = None, slow_whole_s: float = SLOW_WHOLE_S, warmup: bool = True,
                steps: int = STEPS,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run both cases side by side and return the result dict (see the module docstring).

    ``tiny_dir``: use that tiny model set (and its ``enhance`` resolution) instead of full-size
    random weights: a smoke run whose ratio means nothing.
    """
    import torch

    from pipeline.ops.enhance import enhance

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    if tiny_dir is not None:
        registry = tiny_registry(tiny_dir, device, ("inpaint", "controlnet_depth", "depth"))
        models = f"tiny random-weight set ({tiny_dir})"
        base = registry.settings.enhance
    else:
        say("building full-size random-weight SD 1.5 inpainting + ControlNet depth + Depth Anything V2 Small ...")
        registry = build_full_registry(device)
        models = ("full-size random weights: SD 1.5 inpainting UNet/VAE/CLIP ViT-L text, ControlNet depth, "
                  "Depth Anything V2 Small")
        base = None
    params = {c: case_params(c, base, steps) for c in CASES}
    W, H = size
    image = Image.fromarray(synthetic_image(W, H), "RGB")
    mask = product_mask(W, H)
    src = np.asarray(image)

    mem = {c: PeakMemory(registry.runtime.device) for c in CASES}

    def run_case(case: str) -> tuple[float, dict[str, Any]]:
        with mem[case]:
            t0 = time.perf_counter()
            edit = enhance(image, mask, LABEL, params[case], registry)
            _sync(registry)
            dt = time.perf_counter() - t0
        rec = edit.record
        if rec["mode"] != case or rec["pipeline"] != "StableDiffusionControlNetInpaintPipeline":
            raise BenchError(f"{case}: ran mode {rec['mode']!r} with {rec['pipeline']}")
        if not (np.asarray(edit.image)[~edit.edit_mask] == src[~edit.edit_mask]).all():
            raise BenchError(f"{case}: pixels outside the edit mask changed")
        say(f"  {case:<6} {dt:9.3f} s")
        return dt, {"work_size": rec["crop"]["work_size"], "box": rec["crop"]["box"], "timings": rec["timings"]}

    # Without a warm-up (quick mode) each case runs once, cold: both pay their own first-call set-up
    # (per-shape kernels) alike.
    rounds = Rounds(CASES, lambda case, _warmup: run_case(case), repeats=repeats if warmup else 1,
                    warm=CASES if warmup else (), slow="whole", slow_s=slow_whole_s, say=say)
    times = rounds.times
    details = {c: rounds.details[c][-1] for c in CASES}
    whole_note = rounds.note if warmup else "each case ran once without a warm-up (quick mode)"

    med = {c: statistics.median(times[c]) for c in CASES}
    cases: dict[str, Any] = {}
    for c in CASES:
        ww, wh = details[c]["work_size"]
        cases[c] = {**stats(times[c]), "measures": MEASURES[c], **details[c], "work_pixels": ww * wh,
                    **mem[c].record()}
    value = med["whole"] / med["crop"] if med["crop"] > 0 else float("inf")
    x0, y0, x1, y1 = cases["crop"]["box"]
    context = {
        "models": models,
        "device": str(registry.runtime.device) + (f" ({torch.cuda.get_device_name(registry.runtime.device)})"
                                                  if registry.runtime.device.type == "cuda" else ""),
        "dtype": registry.role_dtype("inpaint"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image_size": [W, H],
        "product_box_share": round(float((x1 - x0) * (y1 - y0)) / (W * H), 3),
        "steps": steps, "strength": 1.0, "guidance": params["crop"].guidance,
        "resolution": registry.work_resolution(params["crop"].resolution),
        "repeats": repeats,
        "whole_runs": len(times["whole"]),
        "whole_note": whole_note,
        "malloc": malloc_mode(),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "total_s": time.perf_counter() - t_start,
    }
    context["notes"] = [
        f"{models}; {context['device']} {context['dtype']}; image {W}x{H}, crop box {context['product_box_share']:.0%} "
        f"of it; {steps} step(s) at strength 1.0, guidance {context['guidance']:g} (CFG batch 2), ControlNet depth on; "
        f"{whole_note}.",
        "Each case is the whole edit (depth map, generation, paste back); the crop works at "
        f"{'x'.join(map(str, cases['crop']['work_size']))}, whole at {'x'.join(map(str, cases['whole']['work_size']))}.",
    ]
    return {"benchmark": "enhance", "context": context, "cases": cases,
            "ratios": {"whole/crop": {"value": value, "goal": GOAL, "met": value >= GOAL}}}


def render(result: dict[str, Any], console: Any = None) -> None:
    """Print the result as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    ctx, cases, ratios = result["context"], result["cases"], result["ratios"]
    t = Table(title="enhance: cost per product (median seconds; absolute times are context only)")
    for col, kw in (("case", {}), ("median s", {"justify": "right"}), ("runs", {"justify": "right"}),
                    ("work size", {"justify": "right"}), ("stages (last run, s)", {})):
        t.add_column(col, **kw)
    for c in CASES:
        d = cases[c]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in d["timings"].items())
        t.add_row(c, f"{d['median_s']:.3f}", str(len(d["runs_s"])), "x".join(map(str, d["work_size"])), stages)
    con.print(t)
    r = Table(title="ratio (measured side by side in this run)")
    for col in ("ratio", "value", "goal", "met"):
        r.add_column(col, justify="right" if col != "ratio" else "left")
    for name, v in ratios.items():
        r.add_row(name, f"{v['value']:.1f}x", f">= {v['goal']:g}", "[green]yes[/green]" if v["met"] else "[red]NO[/red]")
    con.print(r)
    con.print(f"context: {ctx['models']}; device {ctx['device']} {ctx['dtype']}, {ctx['cpu_count']} CPUs, torch "
              f"{ctx['torch']} with {ctx['torch_threads']} threads; image {ctx['image_size'][0]}x{ctx['image_size'][1]}, "
              f"crop box {ctx['product_box_share']:.0%} of it; {ctx['steps']} steps, guidance {ctx['guidance']:g}; "
              f"{ctx['repeats']} repeats; {ctx['whole_note']}; malloc: {ctx['malloc']}; "
              f"peak RSS {ctx['peak_rss_mib']:.0f} MiB; total {ctx['total_s']:.0f} s")


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench enhance``: run with the CLI options, print the tables, return the result."""
    quick, common = common_options(opts, TINY_SIZE, QUICK_SIZE, DEFAULT_SIZE)
    if quick:
        # Each case once, one denoising step: both cases' UNet work halves alike, the ratio stays.
        common.update(warmup=False, steps=1)
    result = run_with_models(opts.tiny, ["inpaint", "controlnet_depth", "depth"], run_enhance, **common)
    render(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.enhance [options]``: the shared bench CLI, with this benchmark registered
    for this process (until ``bench.BENCHMARKS`` lists it)."""
    from bench import BENCHMARKS
    from bench.__main__ import main as bench_main

    BENCHMARKS.setdefault("enhance", "bench.enhance:run_from_options")
    return bench_main(["enhance", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
