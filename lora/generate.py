"""`generate`: product photoshoot visuals from text, in a trained LoRA's style.

SD text-to-image on the registry's warm ``base`` pipeline (the one ``enhance`` shares, never a
second copy), with LoRAs applied for the call only (:func:`lora.apply.applied_loras`). The prompt
is the settings' ``enhance.prompt_template`` (``"{tag}, {label}, studio photography, ..."``) with
the activation tag and the class name, unless a prompt is given (which may use ``{tag}`` and
``{label}`` too).

Image ``k`` of a run with ``--seed S`` uses seed ``S + k`` on its own CPU generator, so it is
reproduced by ``--seed S+k -n 1`` on any device. Each image ``CLASS-SEED.png`` gets a JSON record
``CLASS-SEED.json`` (written last): prompt, seed, steps, guidance, size, model provenance and the
LoRAs' files, SHA-256 and weights.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lora.apply import LoraSpec, applied_loras, lora_tag
from pipeline.models.samplers import plan_sampler
from pipeline import PIPELINE_VERSION
from pipeline.io.imageio import atomic_write_text, save_image
from pipeline.io.outputs import now_iso
from pipeline.ops.enhance import build_prompt

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import Settings


@dataclass
class Generated:
    image_path: Path
    record_path: Path
    record: dict[str, Any]


def _slug(label: str) -> str:
    return re.sub(r"[^\w\-]+", "_", label.strip()).strip("_") or "product"


def generate_images(registry: "ModelRegistry", settings: "Settings", label: str, *, out_dir: Path,
                    loras: Sequence[LoraSpec] = (), prompt: str | None = None, tag: str | None = None,
                    n: int = 1, seed: int | None = None, steps: int | None = None,
                    guidance: float | None = None, width: int | None = None, height: int | None = None,
                    negative_prompt: str | None = None, sampler: str | None = None) -> list[Generated]:
    """Render ``n`` images of a ``label`` product; see the module docstring.

    ``loras``: checked files (:func:`lora.apply.parse_lora`). ``tag`` defaults to the first LoRA's
    activation tag (from its manifest or kohya metadata).
    ``steps``, ``guidance``, ``negative_prompt`` and the size default to ``settings.enhance``
    (size: ``resolution`` square; ``auto``: the base model's native size). ``sampler``: default
    ``settings.enhance.sampler``; a few-step sampler (:mod:`pipeline.models.samplers`) adds its acceleration LoRA before ``loras`` and swaps the
    scheduler for this call, with its own steps and guidance unless given. Returns one :class:`Generated` per image, in seed order.
    Raises LoraError for a LoRA that does not fit the base model, ValueError for other bad
    arguments, ModelLoadError if the base model cannot load."""
    if n < 1:
        raise ValueError("-n must be at least 1")
    enh = settings.enhance
    seed = enh.seed if seed is None else seed
    plan = plan_sampler(sampler or enh.sampler, steps or enh.steps, enh.guidance if guidance is None else guidance,
                        settings.samplers)
    steps = steps or plan.steps
    guidance = plan.guidance if guidance is None else guidance
    # auto: the base model's native size (SD 1.5 512, SDXL 1024), read from its files.
    size = None if width and height else registry.work_resolution(enh.resolution, "base")
    width = width or size
    height = height or size
    for side, v in (("width", width), ("height", height)):
        if v % 8 or not 32 <= v <= 2048:
            raise ValueError(f"{side} {v} must be a multiple of 8 within 32..2048")
    negative = enh.negative_prompt if negative_prompt is None else negative_prompt
    if tag is None:
        tag = next((t for t in (lora_tag(s.path) for s in loras) if t), None)
    text = build_prompt(prompt if prompt is not None else enh.prompt_template, label, tag)

    pipe = registry.get("base")
    model = registry.provenance("base")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    accel = None
    if plan.role is not None:
        import dataclasses

        accel = dataclasses.replace(registry.get(plan.role), weight=plan.lora_weight)
    with applied_loras(pipe, [accel, *loras] if accel is not None else list(loras)) as records_all:
        records_loras = records_all[1:] if accel is not None else records_all
        sampler_rec = {"sampler": plan.name, "eta": plan.eta,
                       "acceleration": None if accel is None else {**records_all[0], "role": plan.role,
                                                                  "provenance": registry.provenance(plan.role)}}
        old_scheduler = pipe.scheduler
        if plan.scheduler is not None:
            import diffusers

            pipe.scheduler = getattr(diffusers, plan.scheduler).from_config(old_scheduler.config,
                                                                            **plan.scheduler_kwargs)
        sampler_rec["scheduler"] = type(pipe.scheduler).__name__
        try:
            results = _render(pipe, n, seed, text, negative, steps, guidance, width, height, plan, label, tag,
                              model, records_loras, sampler_rec, out_dir)
        finally:
            pipe.scheduler = old_scheduler
    return results


def _render(pipe: Any, n: int, seed: int, text: str, negative: str, steps: int, guidance: float, width: int,
            height: int, plan: Any, label: str, tag: str | None, model: dict[str, Any],
            records_loras: list[dict[str, Any]], sampler_rec: dict[str, Any], out_dir: Path) -> list[Generated]:
    import torch

    results = []
    for k in range(n):
        s = seed + k
        t0 = time.perf_counter()
        g = torch.Generator("cpu").manual_seed(s)
        image = pipe(text, negative_prompt=negative or None, num_inference_steps=steps,
                     guidance_scale=guidance, width=width, height=height, generator=g,
                     **({} if plan.eta is None else {"eta": plan.eta})).images[0]
        stem = f"{_slug(label)}-{s}"
        img_path = save_image(image, out_dir / f"{stem}.png")
        record = {
            "status": "generated",
            "class": label,
            "prompt": text,
            "negative_prompt": negative,
            "tag": tag,
            "seed": s,
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler_rec,
            "size": [width, height],
            "model": model,
            "loras": records_loras,
            "outputs": {"image": img_path.name},
            "seconds": round(time.perf_counter() - t0, 3),
            "pipeline_version": PIPELINE_VERSION,
            "created": now_iso(),
        }
        rec_path = atomic_write_text(out_dir / f"{stem}.json", json.dumps(record, indent=2, default=str) + "\n")
        results.append(Generated(img_path, rec_path, record))
    return results
