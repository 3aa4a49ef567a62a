"""Detection cost: our skip and product paths against the seed-style SAM-everything + CLIP baseline.

Models are full-size **random-weight** SAM ViT-B and CLIP ViT-B/32 (seeded), built in-process and
installed into a :class:`~pipeline.models.registry.ModelRegistry`, so the product's own :class:`Detector`
runs on them unchanged. Random weights make detections meaningless, so settings force each path;
what is measured is cost, which for dense models does not depend on the weights' values.

Cases (one warm-up each, then the median of ``repeats`` timed runs, interleaved round by round so
that a machine slowing down affects every case alike; a baseline whose first run exceeds
``SLOW_BASELINE_S`` is run only that once, and the output says so):

``ours_skip``
    ``Detector.detect`` deciding "no product": one CLIP batch over the whole image and 5 tiles,
    no SAM. Forced with ``prefilter_threshold=1.0`` (no class probability reaches it).
``ours_product``
    ``Detector.detect(proposals="guided")`` run to the end: prefilter CLIP batch, SAM image
    embedding once, mask decoding for the guided point prompts, one CLIP batch over every proposal's
    crop, post-processing and full-resolution masks. Forced with every threshold at 0, margin 0 and
    no background prompts, so every proposal is classified and the best class always wins.
``baseline``
    The seed-style approach: segment-anything's automatic mask generator with a 32x32 point grid
    (1024 prompts; IoU and stability thresholds 0 so random weights still yield masks), then for
    *each* mask its box cropped from the image and run through CLIP on its own (one forward per
    crop) against class text embeddings computed once, as the public SAM+CLIP tool does.
``floor``
    The least our product path could cost for the same work: SAM image encoder once, the mask
    decoder for exactly the prompts ``ours_product`` decoded, one CLIP batch of exactly the crops it
    classified. No prefilter, cropping, thresholds, upsampling or post-processing.

Ratios: ``baseline / ours_skip`` (goal >= 50), ``baseline / ours_product`` (goal >= 5) and
``ours_product / floor`` (how close the product path is to its minimum). The baseline is also
reported as a lower bound without its mask post-processing, because with random weights that part
is inflated (see :meth:`DetectBench.baseline`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from bench import malloc_mode
from bench.measure import PeakMemory, Rounds, process_peak_rss_mib, run_with_models, stats, tiny_registry
from pipeline.detect.detector import ClipScorer, Detector, softmax_probs
from pipeline.models.registry import ClipBundle, ModelRegistry, SamBundle
from pipeline.settings import DetectSettings, Settings

CASES = ("ours_skip", "ours_product", "baseline", "floor")
SKIP_GOAL = 50.0
PRODUCT_GOAL = 5.0
# Above this, one baseline run is all the budget allows (and a warm-up would add nothing: first-call
# overheads are well under a second, and its models are already warm from the other cases).
SLOW_BASELINE_S = 60.0
DEFAULT_SIZE = (1024, 768)
# The baseline's cost is mostly its mask decoder over 1,024 prompts, whatever the image size, so a
# small image keeps its ratios while saving a minute.
QUICK_SIZE = (320, 240)
TINY_SIZE = (256, 192)
SEED = 0


class BenchError(RuntimeError):
    """A forced path did not happen, so the timing would measure something else."""


# ------------------------------------------------------------------------------------------------
# Inputs


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like WIDTHxHEIGHT, e.g. 1024x768 (got {text!r})") from None
    if w < 16 or h < 16:
        raise ValueError(f"size {w}x{h} is too small (at least 16x16)")
    return w, h


def synthetic_image(width: int, height: int) -> np.ndarray:
    """Deterministic ``HxWx3`` uint8 RGB: a diagonal gradient with a filled rectangle and an
    ellipse, so SAM and the crops see some structure (the models' cost does not depend on it)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1),
                    np.full_like(xx, 96.0) + 64 * (xx + yy) / max(width + height - 2, 1)], axis=-1)
    img[int(0.25 * height):int(0.7 * height), int(0.15 * width):int(0.45 * width)] = (200, 40, 40)
    cy, cx, ry, rx = 0.55 * height, 0.7 * width, 0.22 * height, 0.14 * width
    img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = (30, 60, 190)
    return np.clip(img, 0, 255).astype(np.uint8)


def skip_settings() -> DetectSettings:
    """Default classes and background prompts; no class can reach a prefilter threshold of 1.0."""
    return DetectSettings.model_validate({**DetectSettings().model_dump(), "prefilter": True,
                                          "prefilter_threshold": 1.0})


def product_settings() -> DetectSettings:
    """Default classes with every gate open, so random weights still run the path to the end."""
    base = DetectSettings().model_dump()
    return DetectSettings.model_validate({
        **base,
        "classes": [{**c, "threshold": 0.0} for c in base["classes"]],
        "background_prompts": [], "margin": 0.0, "prefilter": True, "prefilter_threshold": 0.0,
        "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
    })


# ------------------------------------------------------------------------------------------------
# Models


def full_sam(seed: int = SEED) -> Any:
    """segment-anything's SAM ViT-B with random weights (seeded), fp32, on the CPU."""
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    return sam_model_registry["vit_b"](checkpoint=None).eval()


def full_clip(seed: int = SEED) -> ClipBundle:
    """CLIP ViT-B/32 with random weights (seeded) and its processor, fp32, on the CPU.

    ``CLIPConfig()`` is ViT-B/32 (vision 768 x 12 layers, patch 32 at 224; text 512; projection 512).
    Only the vocabulary and special ids follow the small offline tokenizer: the text side runs once
    per class set and is cached, so its size does not matter here."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipeline.models.tiny import _clip_tokenizer

    tok = _clip_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1))
    torch.manual_seed(seed)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tok,
    )
    return ClipBundle(CLIPModel(cfg).eval(), processor)


def build_full_registry(device: str = "auto", seed: int = SEED) -> ModelRegistry:
    """Registry holding full-size random-weight SAM ViT-B and CLIP ViT-B/32 (never a checkpoint)."""
    import torch

    settings = Settings()
    settings.runtime.device = device
    settings.runtime.offline = True  # nothing here may reach the Hub
    registry = ModelRegistry(settings)
    rt = registry.runtime
    # segment-anything's predictor feeds float32; the registry keeps SAM float32 on every device.
    registry.put("sam", SamBundle(full_sam(seed).to(device=rt.device, dtype=torch.float32), "vit_b", 1024))
    clip = full_clip(seed + 1)
    registry.put("clip", ClipBundle(clip.model.to(device=rt.device, dtype=rt.dtype).eval(), clip.processor))
    return registry


def build_tiny_registry(tiny_dir: str | Path, device: str = "auto") -> ModelRegistry:
    """Registry over a tiny set with the detection models loaded (:func:`bench.measure.tiny_registry`)."""
    return tiny_registry(tiny_dir, device, ("clip", "sam"))


# ------------------------------------------------------------------------------------------------
# The cases


class DetectBench:
    """The four cases over one image and one set of warm models. Each case method runs once,
    checks that its forced path really happened (raises :class:`BenchError` if not) and returns
    what it did (counts, stage times)."""

    def __init__(self, registry: ModelRegistry, rgb: np.ndarray, points_per_side: int = 32):
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        self.rgb = rgb
        self.image = Image.fromarray(rgb)
        self.device = registry.runtime.device
        self.sam = registry.get("sam").model
        # One scorer shared by every case: same model, same preprocessing, and one place to record
        # which crops the product path classified (the floor repeats exactly those).
        self.scorer = ClipScorer(registry.get("clip"), self.device)
        self.skip_det = Detector(registry, skip_settings(), scorer=self.scorer)
        self.product_det = Detector(registry, product_settings(), scorer=self.scorer)
        self.classes = self.product_det.cfg.classes
        # The tool embeds its class prompts once per run, not per crop: computed here, untimed.
        self.text = self.product_det.bank.get(self.classes, [])
        self.points_per_side = points_per_side
        self.generator = SamAutomaticMaskGenerator(self.sam, points_per_side=points_per_side,
                                                   pred_iou_thresh=0.0, stability_score_thresh=0.0)
        self._stage_s: dict[str, float] = {}
        self._time_stage(self.generator.predictor, "set_image", "encode")
        self._time_stage(self.generator.predictor, "predict_torch", "decode")
        self.floor_predictor = SamPredictor(self.sam)
        self.probe: dict[str, Any] | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _time_stage(self, obj: Any, method: str, stage: str) -> None:
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.sync()
            self._stage_s[stage] = self._stage_s.get(stage, 0.0) + time.perf_counter() - t0
            return out

        setattr(obj, method, timed)

    # -- cases -----------------------------------------------------------------------------------
    def ours_skip(self) -> dict[str, Any]:
        """Our "no product" decision: one CLIP batch (whole image + 5 tiles) scored against every
        class and background prompt; SAM never runs."""
        res = self.skip_det.detect(self.image)
        pf = res.prefilter or {}
        if not (res.skipped and pf.get("decision") == "skip" and "prefilter" in (res.reason or "")):
            raise BenchError(f"ours_skip: the prefilter did not skip the image (reason: {res.reason!r})")
        if "sam_embedding" in res.timings or res.proposals:
            raise BenchError("ours_skip: SAM ran although the prefilter skipped")
        return {"skipped": True, "reason": res.reason, "clip_views": pf.get("views", 0),
                "timings": dict(res.timings)}

    def ours_product(self) -> dict[str, Any]:
        """Our product path end to end: prefilter CLIP batch, SAM embedding once, guided prompts
        decoded, every proposal's crop classified in one CLIP batch, post-processing, full masks."""
        res = self.product_det.detect(self.image, proposals="guided")
        if res.skipped or not res.proposals or "classify" not in res.timings or not res.detections:
            raise BenchError(f"ours_product: the path did not run to the end (proposals {res.proposals}, "
                             f"detections {len(res.detections)}, reason {res.reason!r})")
        return {"proposals": res.proposals, "detections": len(res.detections),
                "clip_views": (res.prefilter or {}).get("views", 0), "timings": dict(res.timings)}

    def probe_product(self) -> dict[str, Any]:
        """One ``ours_product`` run (the warm-up) that also records the point prompts SAM decoded
        and the crops CLIP classified, which the floor repeats."""
        det = self.product_det
        proposer, scorer = det.proposer, det.scorer
        points: list[np.ndarray] = []
        batches: list[list[Image.Image]] = []
        propose, encode = proposer.propose, scorer.encode_images

        def record_propose(pts: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            points.append(np.array(pts, dtype=np.float32))
            return propose(pts, *args, **kwargs)

        def record_encode(images: list[Image.Image]) -> np.ndarray:
            batches.append(list(images))
            return encode(images)

        proposer.propose, scorer.encode_images = record_propose, record_encode
        try:
            out = self.ours_product()
        finally:
            del proposer.propose, scorer.encode_images
        if len(points) != 1 or len(batches) != 2:
            raise BenchError(f"ours_product: expected 1 SAM prompt batch and 2 CLIP batches (prefilter, "
                             f"proposals), saw {len(points)} and {len(batches)}")
        self.probe = {"points": np.concatenate(points), "crops": batches[1]}
        return {**out, "prompts": len(self.probe["points"]), "crops": len(self.probe["crops"])}

    def floor(self) -> dict[str, Any]:
        """The minimum for our product path's work: SAM image encoder once, mask decoder for exactly
        the prompts ours_product decoded (one batch, low-res logits only), one CLIP batch of exactly
        the crops it classified. No prefilter, cropping, thresholds or post-processing."""
        import torch

        if self.probe is None:
            raise BenchError("floor: run probe_product first (it records the prompts and crops)")
        pts, crops = self.probe["points"], self.probe["crops"]
        p = self.floor_predictor
        p.set_image(self.rgb, image_format="RGB")
        with torch.inference_mode():
            coords = torch.as_tensor(p.transform.apply_coords(pts, p.original_size), dtype=torch.float32,
                                     device=self.device)[:, None, :]
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
            sparse, dense = self.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            self.sam.mask_decoder(image_embeddings=p.features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=True)
        self.scorer.encode_images(crops)
        return {"prompts": len(pts), "crops": len(crops)}

    def baseline(self) -> dict[str, Any]:
        """Seed-style SAM "everything" + CLIP: the automatic mask generator over a 32x32 grid
        (1024 prompts, thresholds 0), then each mask's box cropped and classified by CLIP one
        forward at a time against the class text embeddings (computed once, untimed).

        Stage times: ``encode`` (SAM image encoder), ``decode`` (mask decoder for every prompt,
        upsampled to full resolution), ``post`` (the generator's stability scores, RLE encoding,
        NMS and mask decoding) and ``classify`` (the per-crop CLIP forwards). With random weights the
        masks are pixel noise, whose RLEs are huge, so ``post`` costs far more than it would with
        real weights, while NMS leaves few masks, so ``classify`` costs far less; ``model_s``
        (encode + decode + classify) is a lower bound for the baseline either way.
        """
        self._stage_s.clear()
        t0 = time.perf_counter()
        anns = self.generator.generate(self.rgb)
        self.sync()
        t1 = time.perf_counter()
        labels = []
        for a in anns:
            x, y, w, h = (int(round(v)) for v in a["bbox"])
            # A degenerate mask has an empty box; the tool still pays one forward for it.
            crop = self.image.crop((x, y, x + max(w, 1), y + max(h, 1)))
            probs = softmax_probs(self.scorer.encode_images([crop]), self.text, self.scorer.logit_scale)
            labels.append(int(probs[0].argmax()))
        self.sync()
        t2 = time.perf_counter()
        if not anns:
            raise BenchError("baseline: the automatic mask generator produced no masks")
        encode, decode = self._stage_s.get("encode", 0.0), self._stage_s.get("decode", 0.0)
        segment, classify = t1 - t0, t2 - t1
        return {"prompts": self.points_per_side ** 2, "masks": len(anns), "crops": len(labels),
                "timings": {"encode": encode, "decode": decode, "post": max(0.0, segment - encode - decode),
                            "classify": classify},
                "model_s": encode + decode + classify}


# ------------------------------------------------------------------------------------------------
# Running and reporting


def _median_details(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run details -> one dict: float stage times as medians, everything else from the last run."""
    out = dict(runs[-1])
    for key, val in runs[-1].items():
        if isinstance(val, dict) and all(isinstance(v, float) for v in val.values()):
            out[key] = {k: statistics.median(r[key].get(k, 0.0) for r in runs) for k in val}
        elif isinstance(val, float):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def _peak_rss_mib() -> float:
    return process_peak_rss_mib()


def run_detect(*, repeats: int = 3, size: tuple[int, int] = DEFAULT_SIZE, device: str = "auto",
               tiny_dir: str | Path | None = None, points_per_side: int | None = None,
               slow_baseline_s: float = SLOW_BASELINE_S, warm_floor: bool = True, front_ends: bool = True,
               front_repeats: int = 1, front_warm: bool = True, front_cases: Sequence[str] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every case side by side and return the result dict (see the module docstring).

    ``front_cases``: only these front-end cases (names as in ``FRONT_PRODUCT`` / ``FRONT_SKIP``;
    default all; an empty list runs none).

    ``tiny_dir``: use that tiny model set instead of full-size random weights (smoke runs; its
    ``detect.points_per_side`` then sizes the baseline grid unless ``points_per_side`` is given).
    """
    import torch

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    if tiny_dir is not None:
        registry = build_tiny_registry(tiny_dir, device)
        models = f"tiny random-weight set ({tiny_dir})"
        pps = points_per_side or registry.settings.detect.points_per_side
    else:
        say("building full-size random-weight SAM ViT-B and CLIP ViT-B/32 ...")
        registry = build_full_registry(device)
        models = "full-size random weights: SAM ViT-B, CLIP ViT-B/32"
        pps = points_per_side or 32
    rgb = synthetic_image(*size)
    bench = DetectBench(registry, rgb, pps)

    mem = {c: PeakMemory(bench.device) for c in CASES}

    def timed(case: str, fn: Callable[[], dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        with mem[case]:
            t0 = time.perf_counter()
            out = fn()
            bench.sync()
            dt = time.perf_counter() - t0
        say(f"  {case:<13} {dt:9.3f} s")
        return dt, out

    def run(case: str, warmup: bool) -> tuple[float, dict[str, Any]]:
        # The product path's warm-up also records the prompts and crops the floor repeats.
        fn = bench.probe_product if warmup and case == "ours_product" else getattr(bench, case)
        return timed(case, fn)

    # Warm-up order matters: ours_product's warm-up (the probe) comes before the floor's runs.
    warm = [c for c in ("ours_skip", "ours_product", "floor", "baseline") if warm_floor or c != "floor"]
    rounds = Rounds(("ours_skip", "ours_product", "floor", "baseline"), run, repeats=repeats, warm=warm,
                    slow="baseline", slow_s=slow_baseline_s, say=say)
    times, details, probe, baseline_note = rounds.times, rounds.details, rounds.warmups["ours_product"], rounds.note

    med = {c: statistics.median(times[c]) for c in CASES}
    cases: dict[str, Any] = {}
    for c in CASES:
        doc = (getattr(DetectBench, c).__doc__ or "").strip().split("\n\n")[0]
        cases[c] = {**_median_details(details[c]), **stats(times[c]), "measures": " ".join(doc.split()),
                    **mem[c].record()}
    cases["ours_product"]["prompts"] = probe["prompts"]
    cases["ours_product"]["crops"] = probe["crops"]
    baseline_model = statistics.median(d["model_s"] for d in details["baseline"])

    def ratio(num: float, den: float, goal: float | None) -> dict[str, Any]:
        value = num / den if den > 0 else float("inf")
        return {"value": value, "goal": goal, "met": None if goal is None else value >= goal}

    fronts: dict[str, Any] = {}
    if front_ends and front_cases != []:
        if tiny_dir is not None:
            front_models = tiny_front_models(tiny_dir, registry)
        else:
            say("building full-size random-weight front-end models ...")
            front_models = full_front_models(log=say, names=front_case_models(front_cases))
        say("front-ends and segmenters")
        fronts = run_front_ends(registry, bench.image, front_models, bench.scorer, front_repeats, say, front_warm,
                                front_cases)
        front_params = {"sam-vit-b (segment-anything)": _params(registry.get("sam").model),
                        "clip-vit-b-32": _params(registry.get("clip").model),
                        **{k: _params(v.model) for k, v in front_models.items()}}
        del front_models

    ratios = {
        "baseline/ours_skip": ratio(med["baseline"], med["ours_skip"], SKIP_GOAL),
        "baseline/ours_product": ratio(med["baseline"], med["ours_product"], PRODUCT_GOAL),
        "ours_product/floor": ratio(med["ours_product"], med["floor"], None),
        "baseline_model/ours_skip": ratio(baseline_model, med["ours_skip"], SKIP_GOAL),
        "baseline_model/ours_product": ratio(baseline_model, med["ours_product"], PRODUCT_GOAL),
    }
    products = {c: v["median_s"] for c, v in fronts.items() if v["path"] == "product" and "median_s" in v}
    for c, v in products.items():
        ratios[f"ours_product/{c}"] = ratio(med["ours_product"], v, None)
    today = products.pop("guided+vit_b", None)
    if products:
        best = min(products, key=products.get)
        ratios["ours_product/fastest_front_end"] = {
            **ratio(med["ours_product"], products[best], FRONT_GOAL),
            "label": f"today's guided SAM ViT-B / fastest product case ({best})"}
    if today is not None:  # the same ratios from interleaved rounds (the fairer figure on a busy machine)
        if "ours_product/fastest_front_end" in ratios:  # measured rounds apart: context, not the goal's test
            ratios["ours_product/fastest_front_end"].update(goal=None, met=None)
        for c, v in products.items():
            ratios[f"guided+vit_b/{c}"] = ratio(today, v, None)
        if products:
            ratios["guided+vit_b/fastest_front_end"] = {
                **ratio(today, products[best], FRONT_GOAL),
                "label": f"guided+vit_b / fastest product case ({best}), interleaved in the same rounds"}
    context = {
        "models": models,
        "device": str(bench.device) + (f" ({torch.cuda.get_device_name(bench.device)})" if bench.device.type == "cuda" else ""),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image_size": list(size),
        "repeats": repeats,
        "baseline_runs": len(times["baseline"]),
        "baseline_note": baseline_note,
        "baseline_points_per_side": pps,
        "malloc": malloc_mode(),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "total_s": time.perf_counter() - t_start,
        "notes": [
            f"{models}, image {size[0]}x{size[1]}, device {bench.device}; {baseline_note}.",
            *([f"The baseline ran SAM everything with a {pps}x{pps} grid ({pps * pps} prompts), fewer than the "
               "seed's 32x32 (1,024): its cost is understated, so its ratios are lower bounds."]
              if pps < 32 and tiny_dir is None else []),
            "Random weights force each path by settings (see bench/detect.py); cost, not quality, is measured.",
            "baseline lower bound = its encode + decode + classify without the mask generator's RLE/NMS "
            "post-processing, which random-weight noise masks inflate; with real weights the baseline would "
            f"also classify far more than {cases['baseline'].get('masks')} mask(s).",
            f"ours_product/floor {ratios['ours_product/floor']['value']:.2f}: the product path's overhead over "
            "the least its work could cost.",
        ],
    }
    if fronts:
        context["front_model_parameters"] = front_params
        context["notes"].append(
            f"Front-ends: {len(fronts)} cases after ours_product, {front_repeats} timed run(s) each "
            f"({'product cases after a warm-up' if front_warm else 'no warm-up: first calls included'}); product cases run with the CLIP prefilter on and every gate open; skip cases with "
            "the prefilter off and the mode's own gate shut (with the prefilter on, every mode skips as ours_skip).")
    for name, label in (("baseline_model/ours_skip", "baseline lower bound / ours_skip"),
                        ("baseline_model/ours_product", "baseline lower bound / ours_product")):
        ratios[name]["label"] = label
    return {"benchmark": "detect", "context": context, "cases": cases, "ratios": ratios, "front_ends": fronts}


def render(result: dict[str, Any], console: Any = None) -> None:
    """Print the result as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    ctx, cases, ratios = result["context"], result["cases"], result["ratios"]

    t = Table(title="detect: cost per image (median seconds; absolute times are context only)")
    for col, kw in (("case", {}), ("median s", {"justify": "right"}), ("runs", {"justify": "right"}),
                    ("work", {}), ("stages (median s)", {})):
        t.add_column(col, **kw)

    def stages(c: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in c.get("timings", {}).items())

    sk, pr, bl, fl = (cases[c] for c in CASES)
    t.add_row("ours_skip", f"{sk['median_s']:.3f}", str(len(sk["runs_s"])),
              f"1 CLIP batch of {sk['clip_views']} views; skipped by prefilter", stages(sk))
    t.add_row("ours_product", f"{pr['median_s']:.3f}", str(len(pr["runs_s"])),
              f"CLIP {pr['clip_views']} views + SAM embed + {pr['prompts']} prompts -> {pr['proposals']} proposals; "
              f"1 CLIP batch of {pr['crops']} crops; {pr['detections']} detections", stages(pr))
    t.add_row("baseline", f"{bl['median_s']:.3f}", str(len(bl["runs_s"])),
              f"SAM everything {bl['prompts']} prompts -> {bl['masks']} masks; {bl['crops']} CLIP forwards of 1 crop",
              stages(bl))
    t.add_row("floor", f"{fl['median_s']:.3f}", str(len(fl["runs_s"])),
              f"SAM embed + {fl['prompts']} prompts decoded; 1 CLIP batch of {fl['crops']} crops", stages(fl))
    con.print(t)
    con.print("stages as each path reports them; the Detector's `proposals` includes its `sam_embedding`.")

    r = Table(title="ratios (measured side by side in this run)")
    for col in ("ratio", "value", "goal", "met"):
        r.add_column(col, justify="right" if col != "ratio" else "left")
    labels = {"baseline_model/ours_skip": "baseline lower bound*/ours_skip",
              "baseline_model/ours_product": "baseline lower bound*/ours_product"}
    for name, v in ratios.items():
        met = "" if v["met"] is None else ("[green]yes[/green]" if v["met"] else "[red]NO[/red]")
        goal = "" if v["goal"] is None else f">= {v['goal']:g}"
        r.add_row(labels.get(name, name), f"{v['value']:.1f}x", goal, met)
    con.print(r)
    if result.get("front_ends"):
        f = Table(title="front-ends and segmenters (median s; product path vs today's guided SAM ViT-B)")
        for col in ("case", "path", "median s", "vs ours_product", "stages (median s)", "peak RSS MiB"):
            f.add_column(col, justify="right" if col in ("median s", "vs ours_product", "peak RSS MiB") else "left")
        for name, c in result["front_ends"].items():
            if "error" in c:
                f.add_row(name, c["path"], "failed", "", c["error"][:120], "")
                continue
            f.add_row(name, c["path"], f"{c['median_s']:.3f}", f"{pr['median_s'] / c['median_s']:.1f}x",
                      stages(c), f"{c.get('peak_rss_mib', 0) or 0:.0f}")
        con.print(f)
    con.print("* lower bound: baseline encode + decode + classify, without the mask generator's post-processing "
              "(RLE/NMS), which random-weight noise masks inflate; with real weights the baseline would also "
              f"classify far more than {bl['masks']} mask(s).")
    con.print(f"context: {ctx['models']}; device {ctx['device']}, {ctx['cpu_count']} CPUs, torch {ctx['torch']} "
              f"with {ctx['torch_threads']} threads; image {ctx['image_size'][0]}x{ctx['image_size'][1]}; "
              f"{ctx['repeats']} repeats; {ctx['baseline_note']}; malloc: {ctx['malloc']}; peak RSS {ctx['peak_rss_mib']:.0f} MiB; "
              f"total {ctx['total_s']:.0f} s")


def repeats_option(opts: Any) -> int:
    """``--repeats`` as given, else 1 in ``--quick`` mode and 3 otherwise."""
    n = getattr(opts, "repeats", None)
    return n if n else (1 if getattr(opts, "quick", False) else 3)


def common_options(opts: Any, tiny_size: tuple[int, int], quick_size: tuple[int, int],
                   default_size: tuple[int, int]) -> tuple[bool, dict[str, Any]]:
    """``(quick, keyword arguments every benchmark's run takes)`` from the CLI options: repeats,
    image size (``--size``, else the tiny, quick or default size), device, and a log to stderr."""
    from rich.console import Console

    err = Console(stderr=True)
    quick = getattr(opts, "quick", False)
    size = opts.size or (tiny_size if opts.tiny else quick_size if quick else default_size)
    return quick, dict(repeats=repeats_option(opts), size=size, device=opts.device,
                       log=lambda m: err.print(m, highlight=False))


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench detect``: run with the CLI options, print the tables, return the result."""
    quick, common = common_options(opts, TINY_SIZE, QUICK_SIZE, DEFAULT_SIZE)
    if quick:
        # The baseline runs once (its models are warm from the other cases), the floor without a
        # warm-up (its models and shapes are warm from ours_product).
        common.update(slow_baseline_s=0.0, warm_floor=False, front_warm=False)
    common["front_cases"] = select_front_cases(getattr(opts, "front", None))
    common["points_per_side"] = getattr(opts, "points_per_side", None)
    common["front_repeats"] = common["repeats"]
    result = run_with_models(opts.tiny, ["clip", "sam", "grounding", "clipseg", "sam3"], run_detect, **common)
    render(result)
    return result


# ------------------------------------------------------------------------------------------------
# Detection front-ends and segmenters (detect.proposals grounded | clipseg | sam3; the sam role from
# a transformers SAM 2.1 repo), side by side with today's guided SAM ViT-B (``ours_product``).

FRONT_GOAL = 5.0
# (case, proposals mode, segmenter, text front-end model); segmenter "vit_b" is segment-anything's
# SAM ViT-B (today's), "sam2.1-tiny" transformers' Sam2Model at sam2.1-hiera-tiny's size, "edgetam"
# transformers' EdgeTamModel at facebook/EdgeTAM's size (RepViT-M1 backbone; needs timm).
FRONT_PRODUCT = (
    # today's path again, inside the front-end rounds: interleaved with the segmenter cases, so a
    # machine whose load changes between ours_product and the front-ends cannot skew their ratio
    ("guided+vit_b", "guided", "vit_b", None),
    ("guided+sam2.1-tiny", "guided", "sam2.1-tiny", None),
    ("guided+edgetam", "guided", "edgetam", None),
    ("grounded:owlv2-base+vit_b", "grounded", "vit_b", "owlv2-base"),
    ("grounded:gdino-tiny+vit_b", "grounded", "vit_b", "gdino-tiny"),
    ("grounded:gdino-tiny+sam2.1-tiny", "grounded", "sam2.1-tiny", "gdino-tiny"),
    ("clipseg+vit_b", "clipseg", "vit_b", "clipseg-rd64"),
    ("clipseg+sam2.1-tiny", "clipseg", "sam2.1-tiny", "clipseg-rd64"),
    ("sam3", "sam3", None, "sam3"),
)
# The mode's own "no product" decision with the CLIP prefilter off (with it on, every mode skips
# exactly as ``ours_skip`` does, before any of these models runs).
FRONT_SKIP = (
    ("skip:grounded:owlv2-base", "grounded", None, "owlv2-base"),
    ("skip:grounded:gdino-tiny", "grounded", None, "gdino-tiny"),
    ("skip:clipseg", "clipseg", None, "clipseg-rd64"),
    # SAM 3 has no cheaper gate of its own: its presence score comes out of the same vision encoder
    # and per-class decoders as its product path (only the masks' upsampling is saved), so its skip
    # costs about its product case; not timed separately (its encoder is minutes on a shared CPU).
)
FRONT_ROLE = {"grounded": "grounding", "clipseg": "clipseg", "sam3": "sam3"}


def front_case_models(cases: Sequence[str] | None = None) -> set[str]:
    """The segmenter and front-end model names the front-end ``cases`` (default: all) use."""
    names: set[str] = set()
    for name, _mode, seg, front in (*FRONT_PRODUCT, *FRONT_SKIP):
        if cases is None or name in cases:
            names.update(m for m in (seg, front) if m not in (None, "vit_b"))
    return names


def select_front_cases(spec: str | None) -> list[str] | None:
    """``--front`` -> the front-end case names to run (None: all; ``none``: no case). Comma-separated
    case names as the table prints them (e.g. ``guided+edgetam,guided+sam2.1-tiny``)."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return []
    known = [c[0] for c in (*FRONT_PRODUCT, *FRONT_SKIP)]
    chosen = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ValueError(f"unknown front-end case(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def full_edgetam(seed: int = SEED) -> Any:
    """EdgeTAM's image model at facebook/EdgeTAM's size with random weights (seeded), fp32, and its
    processor: ``EdgeTamConfig()`` with the RepViT-M1 backbone transformers' conversion writes
    (timm ``repvit_m1``, features only, 4 stages; see :func:`pipeline.models.tiny.edgetam_backbone_config`),
    FPN 256, 1024 px squashed input, the SAM 2 prompt encoder and mask decoder defaults."""
    import torch
    from transformers import EdgeTamConfig, EdgeTamModel, EdgeTamVisionConfig, Sam2ImageProcessor, Sam2Processor

    from pipeline.models.registry import HFSamBundle
    from pipeline.models.tiny import edgetam_backbone_config

    torch.manual_seed(seed)
    cfg = EdgeTamConfig(vision_config=EdgeTamVisionConfig(backbone_config=edgetam_backbone_config()))
    return HFSamBundle(EdgeTamModel(cfg).eval(), Sam2Processor(Sam2ImageProcessor()), "edgetam")


def full_front_models(seed: int = SEED, log: Callable[[str], None] | None = None,
                      names: set[str] | None = None) -> dict[str, Any]:
    """Full-size random-weight front-end models with their processors, at the published checkpoints'
    sizes: SAM 2.1 hiera-tiny (``Sam2Config()``, 1024 px), EdgeTAM (:func:`full_edgetam`; left out
    when ``timm`` is missing), OWLv2 base patch16 at 960 px,
    Grounding DINO tiny (``GroundingDinoConfig()``: Swin-T + BERT-base, 800 px short side),
    CLIPSeg rd64 (ViT-B/16, 352 px) and SAM 3 (``Sam3Config()``, 1008 px). Only the vocabularies
    follow the small offline tokenizers (text runs once per class prompt, a small share).
    ``names``: build only these (default: all)."""
    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoImageProcessor, GroundingDinoProcessor,
                              Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor, Sam2Config,
                              Sam2ImageProcessor, Sam2Model, Sam2Processor, Sam3Config, Sam3ImageProcessor, Sam3Model,
                              Sam3Processor, ViTImageProcessor)

    from pipeline.models.registry import HFSamBundle
    from pipeline.models.registry import HFBundle
    from pipeline.models.tiny import _bert_tokenizer, _clip_tokenizer

    say = log or (lambda _m: None)
    out: dict[str, Any] = {}
    want = (lambda n: names is None or n in names)
    torch.manual_seed(seed + 10)
    if want("sam2.1-tiny"):
        say("  SAM 2.1 hiera-tiny ...")
        out["sam2.1-tiny"] = HFSamBundle(Sam2Model(Sam2Config()).eval(), Sam2Processor(Sam2ImageProcessor()), "sam2")
    if want("edgetam"):
        import importlib.util

        if importlib.util.find_spec("timm") is None:
            say("  EdgeTAM: left out (needs timm: pip install 'product-studio[edgetam]')")
        else:
            say("  EdgeTAM (RepViT-M1) ...")
            out["edgetam"] = full_edgetam(seed + 11)
    if want("owlv2-base"):
        say("  OWLv2 base patch16 (960 px) ...")
        out["owlv2-base"] = HFBundle(Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960})).eval(),
                                 Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 960, "width": 960}),
                                                tokenizer=_clip_tokenizer(specials_last=True, max_length=16)))
    if want("gdino-tiny"):
        say("  Grounding DINO tiny ...")
        bert = _bert_tokenizer()
        bert.model_max_length = 256
        out["gdino-tiny"] = HFBundle(GroundingDinoForObjectDetection(GroundingDinoConfig()).eval(),
                                     GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=bert))
    if want("clipseg-rd64"):
        say("  CLIPSeg rd64 (ViT-B/16, 352 px) ...")
        out["clipseg-rd64"] = HFBundle(
            CLIPSegForImageSegmentation(CLIPSegConfig(vision_config={"patch_size": 16})).eval(),
            CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 352, "width": 352},
                                                               image_mean=[0.485, 0.456, 0.406],
                                                               image_std=[0.229, 0.224, 0.225]),
                             tokenizer=_clip_tokenizer(specials_last=True)))
    if want("sam3"):
        say("  SAM 3 (1008 px) ...")
        out["sam3"] = HFBundle(Sam3Model(Sam3Config()).eval(),
                               Sam3Processor(image_processor=Sam3ImageProcessor(),
                                             tokenizer=_clip_tokenizer(specials_last=True, max_length=32)))
    return out


def _params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def tiny_front_models(tiny_dir: str | Path, registry: ModelRegistry) -> dict[str, Any]:
    """The tiny set's front-end roles (OWLv2 layout for grounding) and its SAM 2.1 alternative."""
    from pipeline.settings import ModelSource

    out: dict[str, Any] = {}
    for name, folder in (("sam2.1-tiny", "sam2_hf"), ("edgetam", "edgetam_hf")):
        if (Path(tiny_dir) / folder).is_dir():  # EdgeTAM's is written only where timm is installed
            s = registry.settings.model_copy(deep=True)
            s.models.sam = ModelSource(path=Path(tiny_dir) / folder)
            out[name] = ModelRegistry(s).get("sam")
    names = {"grounding": "owlv2-base", "clipseg": "clipseg-rd64", "sam3": "sam3"}
    for role, name in names.items():
        if registry.status(role).available:
            out[name] = registry.get(role)
    return out


def front_settings(product: bool) -> DetectSettings:
    """Product: every gate open (random weights still run each path to the end). Skip: prefilter off
    and the mode's own gate shut (no box, peak or presence can reach 1.0)."""
    if product:
        return product_settings().model_copy(update={"box_threshold": 0.0, "heatmap_threshold": 0.0,
                                                     "sam3_threshold": 0.0, "presence_threshold": 0.0})
    return skip_settings().model_copy(update={"prefilter": False, "box_threshold": 1.0, "heatmap_threshold": 1.0,
                                              "presence_threshold": 1.0})


class FrontBench:
    """One Detector per front-end case over the same image, CLIP and SAM ViT-B as ``DetectBench``."""

    def __init__(self, registry: ModelRegistry, image: Image.Image, models: dict[str, Any], scorer: ClipScorer,
                 cases: Sequence[str] | None = None):
        from pipeline.detect.fronts import HFSamProposer

        self.image = image
        self.device = registry.runtime.device
        self.cases: dict[str, tuple[Detector, str, bool]] = {}
        for product, table in ((True, FRONT_PRODUCT), (False, FRONT_SKIP)):
            for name, mode, seg, front in table:
                if cases is not None and name not in cases:
                    continue
                if (front is not None and front not in models) or (seg not in (None, "vit_b") and seg not in models):
                    continue
                reg = ModelRegistry(registry.settings)
                reg.put("clip", registry.get("clip"))
                if mode != "sam3":
                    reg.put("sam", registry.get("sam"))
                if front is not None:
                    reg.put(FRONT_ROLE[mode], models[front])
                det = Detector(reg, front_settings(product), scorer=scorer)
                if seg not in (None, "vit_b"):
                    det._proposer = HFSamProposer(models[seg], self.device)
                self.cases[name] = (det, mode, product)

    def run(self, case: str) -> dict[str, Any]:
        det, mode, product = self.cases[case]
        res = det.detect(self.image, proposals=mode)
        if product and (res.skipped or not res.detections):
            raise BenchError(f"{case}: the product path did not run to the end ({res.reason!r})")
        if not product and (not res.skipped or res.proposals):
            raise BenchError(f"{case}: the mode's own gate did not skip the image ({res.reason!r})")
        return {"proposals": res.proposals, "detections": len(res.detections), "timings": dict(res.timings),
                "skipped": res.skipped}


def run_front_ends(registry: ModelRegistry, image: Image.Image, models: dict[str, Any], scorer: ClipScorer,
                   repeats: int, say: Callable[[str], None], warm: bool = True,
                   cases: Sequence[str] | None = None) -> dict[str, Any]:
    """Every front-end case: with ``warm``, one warm-up for the product cases (the skip cases reuse
    their warm models and shapes), then ``repeats`` interleaved timed runs. Returns ``{case: record}``; a case
    that fails (a model or path problem) is recorded with its error and dropped from later rounds,
    so it never costs the figures of the others."""
    fb = FrontBench(registry, image, models, scorer, cases)
    names = list(fb.cases)
    mem = {c: PeakMemory(fb.device) for c in names}
    times: dict[str, list[float]] = {c: [] for c in names}
    details: dict[str, list[Any]] = {c: [] for c in names}
    errors: dict[str, str] = {}

    def run(case: str, counted: bool) -> None:
        if case in errors:
            return
        try:
            with mem[case]:
                t0 = time.perf_counter()
                out = fb.run(case)
                dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded and reported; the other cases go on
            errors[case] = f"{type(e).__name__}: {e}"
            say(f"  {case:<34} FAILED {errors[case][:200]}")
            return
        say(f"  {case:<34} {dt:9.3f} s" + ("" if counted else " (warm-up)"))
        if counted:
            times[case].append(dt)
            details[case].append(out)

    for c in names:
        if warm and fb.cases[c][2]:
            run(c, False)
    for _ in range(repeats):
        for c in names:
            run(c, True)
    out: dict[str, Any] = {}
    for c in names:
        det, mode, product = fb.cases[c]
        path = "product" if product else "skip (prefilter off)"
        if c in errors:
            out[c] = {"mode": mode, "path": path, "error": errors[c]}
            continue
        out[c] = {**_median_details(details[c]), **stats(times[c]), "mode": mode, "path": path, **mem[c].record()}
    return out
