"""bf16 against fp32 for the three networks that dominate the product's cost, side by side in one run.

``python -m bench dtype``. Full-size **random-weight** networks (real FLOPs; outputs are noise):

``clip``
    CLIP ViT-B/32 through the product's :class:`~pipeline.detect.detector.ClipScorer` on one batch of
    ``CLIP_CROPS`` crops (detection's classify batch), with the model in fp32, then in bf16.
``sam``
    The SAM ViT-B image encoder on one 1024x1024 input (detection's most expensive step), in fp32
    and under ``torch.autocast(bfloat16)``: how the registry runs it with ``runtime.dtype:
    bfloat16`` (its weights stay fp32, since segment-anything's predictor feeds fp32).
``unet``
    One denoising step of the SD 1.5 inpainting UNet (9 input channels, ~860 M parameters) at
    64x64 latents (512 px) with classifier-free guidance (batch 2): enhance's inner loop.

Each network is timed in both dtypes, one warm-up each, then ``repeats`` runs interleaved
(fp32, bf16, fp32, bf16, ...). Ratio per network: ``fp32 / bf16`` (above 1: bf16 is faster). No
goal: the figure decides whether ``runtime.dtype: bfloat16`` pays on this hardware. On a CPU
without native bf16 instructions (``avx512_bf16`` / ``amx_bf16``) bf16 is emulated and the
benchmark says so and runs nothing; on CUDA it runs on the GPU.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

from bench.measure import PeakMemory, stats

NETWORKS = ("clip", "sam", "unet")
CLIP_CROPS = 16
SEED = 0
MEASURES = {
    "clip": f"CLIP ViT-B/32 image features for {CLIP_CROPS} crops (ClipScorer, one batch)",
    "sam": "SAM ViT-B image encoder, one 1024x1024 input",
    "unet": "SD 1.5 inpainting UNet, one step at 64x64 latents, batch 2 (CFG)",
}


def bf16_support(device: "Any") -> tuple[bool, str]:
    """Whether bf16 runs natively on ``device`` (a torch.device), and why not if not."""
    import torch

    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "" if ok else "this GPU has no bf16 support"
    from pipeline.models.registry import cpu_native_bf16  # the product's own probe (runtime.dtype: auto)

    native = cpu_native_bf16()
    mkldnn = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if native and (mkldnn is None or mkldnn()):
        return True, ""
    return False, "this CPU has no native bf16 instructions (avx512_bf16 / amx_bf16): bf16 would be emulated"


def _builders(device: Any) -> dict[str, Callable[[Any], Callable[[], Any]]]:
    """network -> (dtype -> a zero-argument function running one forward in that dtype)."""
    import numpy as np
    import torch
    from PIL import Image

    from bench.detect import synthetic_image

    made: dict[str, Any] = {}

    def clip(dtype: Any) -> Callable[[], Any]:
        from bench.detect import full_clip
        from pipeline.detect.detector import ClipScorer
        from pipeline.models.registry import ClipBundle

        if "clip" not in made:
            made["clip"] = full_clip(SEED + 1)
        bundle = made["clip"]
        model = copy.deepcopy(bundle.model).to(device=device, dtype=dtype)
        scorer = ClipScorer(ClipBundle(model, bundle.processor), device)
        rgb = synthetic_image(640, 480)
        crops = [Image.fromarray(np.ascontiguousarray(rgb[(i * 17) % 200:(i * 17) % 200 + 240,
                                                          (i * 29) % 300:(i * 29) % 300 + 300]))
                 for i in range(CLIP_CROPS)]
        return lambda: scorer.encode_images(crops)

    def sam(dtype: Any) -> Callable[[], Any]:
        from bench.detect import full_sam

        if "sam" not in made:
            made["sam"] = full_sam(SEED).to(device)
        enc = made["sam"].image_encoder
        x = torch.randn(1, 3, 1024, 1024, device=device)

        def run() -> Any:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=dtype == torch.bfloat16):
                return enc(x)

        return run

    def unet(dtype: Any) -> Callable[[], Any]:
        from diffusers import UNet2DConditionModel

        if "unet" not in made:
            torch.manual_seed(SEED)
            made["unet"] = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4,
                                                cross_attention_dim=768).to(device).eval()
        model = made["unet"] if dtype == torch.float32 else copy.deepcopy(made["unet"]).to(dtype)
        g = torch.Generator().manual_seed(SEED)
        sample = torch.randn(2, 9, 64, 64, generator=g).to(device, dtype)
        text = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        t = torch.tensor([500], device=device)

        def run() -> Any:
            with torch.inference_mode():
                return model(sample, t, encoder_hidden_states=text).sample

        return run

    return {"clip": clip, "sam": sam, "unet": unet}


def run_dtype(*, repeats: int = 3, device: str = "auto", networks: tuple[str, ...] = NETWORKS,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every network in fp32 and bf16 side by side; return the result dict."""
    import statistics

    import torch

    from pipeline.models.registry import resolve_runtime
    from pipeline.settings import Settings

    say = log or (lambda _m: None)
    settings = Settings()
    settings.runtime.device = device
    dev = resolve_runtime(settings).device
    ok, why = bf16_support(dev)
    result: dict[str, Any] = {"benchmark": "dtype", "cases": {}, "ratios": {},
                              "context": {"device": str(dev), "bf16_native": ok, "repeats": repeats}}
    if not ok:
        result["context"]["notes"] = [f"not run: {why}."]
        say(f"dtype: not run: {why}")
        return result

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    builders = _builders(dev)
    for net in networks:
        say(f"{net}: building fp32 and bf16 copies ...")
        fns = {name: builders[net](dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        mem = {name: PeakMemory(dev) for name in fns}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for rnd in range(repeats + 1):  # round 0 is the warm-up
            for name, fn in fns.items():
                with mem[name]:
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    dt = time.perf_counter() - t0
                say(f"  {net} {name} {'warm-up' if rnd == 0 else f'run {rnd}'}: {dt:.3f} s")
                if rnd:
                    times[name].append(dt)
        for name in fns:
            result["cases"][f"{net}_{name}"] = {**stats(times[name]), "measures": f"{MEASURES[net]}, {name}",
                                                **mem[name].record()}
        value = statistics.median(times["fp32"]) / statistics.median(times["bf16"])
        result["ratios"][f"{net} fp32/bf16"] = {"value": value, "goal": None, "met": None}
        del fns
    best = max(result["ratios"].items(), key=lambda kv: kv[1]["value"])
    result["context"]["notes"] = [
        f"Full-size random-weight networks on {dev}; one warm-up then {repeats} interleaved run(s) per dtype; "
        "SAM in bf16 runs its encoder under autocast, as the registry does with runtime.dtype bfloat16.",
        f"Above 1x bf16 is faster (best here: {best[0]} {best[1]['value']:.2f}x); `runtime.dtype: bfloat16` in the "
        "settings switches the diffusion and CLIP models to bf16 and runs SAM's encoder under bf16 autocast "
        "(outputs then differ slightly from fp32).",
    ]
    return result


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench dtype``: ``--quick`` one run per dtype and no SAM encoder (which the product
    keeps in fp32); ``--tiny`` CLIP only (a smoke run)."""
    from rich.console import Console

    from bench.detect import repeats_option
    from bench.report import render

    err = Console(stderr=True)
    nets = ("clip",) if opts.tiny else ("clip", "unet") if getattr(opts, "quick", False) else NETWORKS
    res = run_dtype(repeats=repeats_option(opts), device=opts.device, networks=nets,
                    log=lambda m: err.print(m, highlight=False))
    render(res, title="dtype: bf16 vs fp32 (seconds; absolute times are context only)")
    return res
