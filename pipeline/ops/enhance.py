"""Enhance: restyle or clean up a detected product in place; everything else stays as it was.

Steps for one product (image PIL RGB, mask HxW bool at full resolution):

1. **Region**: the product mask dilated by ``mask_dilation`` px. It is ``Edit.edit_mask``: every
   pixel outside it is bit-identical to the input.
2. **Work crop** (``mode: crop``): the region's box plus ``crop_margin`` x its size of context,
   resized so the long side is ``resolution`` (``auto``, the default: the inpaint model's native
   size, 512 for SD 1.5, 1024 for SDXL; :meth:`pipeline.models.registry.ModelRegistry.work_resolution`)
   with both sides multiples of 8 and the aspect kept (:func:`pipeline.ops.inpaint.plan_crop`). The
   cost depends on the product, not the photo.
   ``mode: whole`` uses the whole photo at its own size instead (long side capped at
   ``whole_max_side``).
3. **Depth** (``controlnet: true``): :func:`pipeline.ops.depth.depth_map` of the work crop (near =
   bright, 0..255, as ControlNet-depth expects) keeps the product's shape while the look changes.
4. **Generation**: the inpaint model's family's ControlNet-inpaint pipeline (diffusers
   ``StableDiffusionControlNetInpaintPipeline``, SDXL: ``StableDiffusionXLControlNetInpaintPipeline``;
   :mod:`pipeline.models.families`) built once per registry
   from the ``inpaint`` role's own components plus the ``controlnet_depth`` model (the base is
   never loaded twice), or the plain inpaint pipeline when ControlNet is off. The prompt is the
   class template (``{tag}, {label}, ...``); the class's LoRAs are activated for this call only
   (the registry's :class:`pipeline.models.lora_weights.LoraAdapters` for ``inpaint``, under the role's
   lock, which the SD hole fill takes too). Seeded with a CPU ``torch.Generator`` so a seed
   gives the same noise on every device.
5. **Paste**: the result, resized back to the crop, is blended into the input only inside the
   region: alpha 1 on the product mask, fading over ``mask_feather`` px towards the region's edge,
   0 outside (:func:`pipeline.io.composite.inner_feather_alpha`, :func:`pipeline.io.composite.paste`).

GPU memory: the registry loads the inpaint pipeline and ControlNet in fp16 (or bf16) on CUDA with
SDPA attention (diffusers' default on torch 2), and applies model CPU offload and VAE tiling from
``runtime`` settings; the ControlNet pipeline built here gets the same offload. On CPU all is fp32.

Images are PIL ``"RGB"`` (uint8, R, G, B); masks are HxW ``bool`` numpy arrays.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Sequence

import numpy as np
from PIL import Image
from pydantic import BeforeValidator, ValidationInfo, field_validator

from pipeline.io.composite import bbox, dilate, inner_feather_alpha, paste
from pipeline.ops.edits import Edit, EditContext, EditError, OpParams
from pipeline.ops.inpaint import CropBox, plan_crop
from pipeline.models.lora_weights import LoraError, LoraSpec, check_unique, parse_lora
from pipeline.settings import EnhanceSettings
from pipeline.models.samplers import plan_sampler, sampling
from pipeline.ops.depth import depth_map
from pipeline.models.families import family_of_config

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.detect.detector import Detection
    from pipeline.models.samplers import SamplerPlan
    from pipeline.models.registry import ModelRegistry

__all__ = ["EnhanceParams", "LoraError", "build_prompt", "class_loras", "controlnet_pipeline", "enhance",
           "enhance_detection", "plan_work", "run_enhance"]


# ------------------------------------------------------------------------------------------------
# Pipelines: the registry owns them (and the LoRA adapters, and the lock)


def controlnet_pipeline(registry: "ModelRegistry") -> Any:
    """The inpaint model's family's ControlNet-inpaint pipeline (SD 1.x/2.x
    ``StableDiffusionControlNetInpaintPipeline``, SDXL ``StableDiffusionXLControlNetInpaintPipeline``) made of the registry's inpaint pipeline's own
    components (same UNet, VAE, text encoder, tokenizer, scheduler objects) and its
    ``controlnet_depth`` model. Built once per registry (:meth:`ModelRegistry.derived`, dropped when
    either role is unloaded); never a second load of the base."""
    inpaint = registry.get("inpaint")
    cn = registry.get("controlnet_depth")

    def build() -> Any:
        import inspect

        import diffusers

        # The family's ControlNet-inpaint class (SD 1.x/2.x: StableDiffusionControlNetInpaintPipeline;
        # SDXL: StableDiffusionXLControlNetInpaintPipeline, whose added conditioning, pooled text
        # embeds and size/crop time ids, diffusers computes). The registry checked that the
        # ControlNet fits this UNet when it loaded it.
        family = family_of_config(dict(inpaint.unet.config), type(inpaint).__name__)
        cls = getattr(diffusers, family.controlnet_inpaint)
        params = inspect.signature(cls.__init__).parameters
        kw = {k: v for k, v in inpaint.components.items() if k in params}
        if "requires_safety_checker" in params:
            kw["requires_safety_checker"] = False
        pipe = cls(**kw, controlnet=cn)
        pipe.set_progress_bar_config(disable=True)
        rt = registry.runtime
        # The registry applied offload to the inpaint pipeline's modules; this pipeline adds the
        # ControlNet to the chain. VAE tiling lives on the shared VAE and is already set.
        if rt.offload == "model":
            pipe.enable_model_cpu_offload(device=rt.device)
        elif rt.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=rt.device)
        return pipe

    return registry.derived("enhance.controlnet_inpaint", build, roles=("inpaint", "controlnet_depth"))


# ------------------------------------------------------------------------------------------------
# Parameters


def build_prompt(template: str, label: str, tag: str | None = "") -> str:
    """Fill ``{tag}`` and ``{label}`` and drop empty comma-separated items, so an empty (or None)
    tag leaves no stray ``", "``. Other text (braces included) is kept as written."""
    text = template.replace("{tag}", (tag or "").strip()).replace("{label}", label.strip())
    if "," not in text:
        return text.strip()
    return ", ".join(p.strip() for p in text.split(",") if p.strip())


def class_loras(params: EnhanceSettings, label: str, base_dir: str | Path | None = None) -> list[LoraSpec]:
    """The LoRAs configured for ``label`` in ``params.classes`` (relative paths against
    ``base_dir``, the settings root), checked and hashed. Raises :class:`LoraError`."""
    style = params.classes.get(label)
    if style is None:
        return []
    return [parse_lora(t, bases=(base_dir,)) for t in style.loras]


def plan_work(region: np.ndarray, params: EnhanceSettings, resolution: int | None) -> CropBox:
    """The part of the image the model sees and its work size (see the module docstring).
    ``resolution``: the crop mode's long side, px: ``params.resolution`` resolved
    (:meth:`pipeline.models.registry.ModelRegistry.work_resolution`); whole mode ignores it."""
    H, W = region.shape
    if params.mode == "whole":
        long_side = max(W, H)
        res = min(params.whole_max_side, max(64, long_side - long_side % 8))
        return plan_crop((0, 0, W, H), (W, H), margin=0.0, resolution=res)
    if resolution is None:
        raise ValueError("enhance mode crop needs the work resolution (ModelRegistry.work_resolution)")
    box = bbox(region)
    return plan_crop(box, (W, H), margin=params.crop_margin, resolution=resolution)


def _check_args(image: Image.Image, mask: np.ndarray, params: EnhanceSettings, seed: Any) -> np.ndarray:
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ValueError(f"enhance expects a PIL RGB image, got {getattr(image, 'mode', type(image).__name__)}"
                         " (convert first)")
    if not isinstance(params, EnhanceSettings):
        raise ValueError(f"enhance params must be EnhanceSettings, got {type(params).__name__}")
    W, H = image.size
    m = np.asarray(mask)
    if m.shape != (H, W):
        raise ValueError(f"product mask shape {m.shape} does not match the image ({H}, {W})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    m = m.astype(bool, copy=False)
    if not m.any():
        raise EditError("enhance: the product mask is empty; nothing to enhance")
    return m


def _round(v: float) -> float:
    return round(float(v), 4)


# ------------------------------------------------------------------------------------------------
# The edit


def _generate(pipe: Any, image: Image.Image, mask: Image.Image, control: Image.Image | None, *, prompt: str,
              negative_prompt: str, seed: int, params: EnhanceSettings, plan: "SamplerPlan") -> Image.Image:
    """One diffusers call at the work size. ``image`` PIL RGB, ``mask`` PIL L (255 = regenerate),
    ``control`` PIL RGB depth (ControlNet pipeline) or None. Returns PIL RGB of the same size."""
    import torch

    w, h = image.size
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    kw: dict[str, Any] = dict(prompt=prompt, negative_prompt=negative_prompt or None, image=image, mask_image=mask,
                              height=h, width=w, strength=params.strength, num_inference_steps=plan.steps,
                              guidance_scale=plan.guidance, generator=gen, output_type="np")
    if plan.eta is not None:
        kw["eta"] = plan.eta
    if control is not None:
        kw.update(control_image=control, controlnet_conditioning_scale=params.controlnet_scale)
    out = pipe(**kw)
    arr = np.asarray(out.images[0], dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "RGB")


def _family_name(pipe: Any) -> str:
    return family_of_config(dict(pipe.unet.config), type(pipe).__name__).name


def _runtime_record(registry: "ModelRegistry", pipe: Any) -> dict[str, Any]:
    rt = registry.runtime
    procs = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    # The dtype the generation ran in (the diffusion dtype, see pipeline.models.registry.Runtime), per component
    # where they differ: registry.role_dtype("inpaint").
    return {"device": str(rt.device), "dtype": registry.role_dtype("inpaint"), "offload": rt.offload,
            "vae_tiling": bool(registry.settings.runtime.vae_tiling), "attention": sorted(procs)}


def enhance(image: Image.Image, mask: np.ndarray, label: str, params: EnhanceSettings,
            registry: "ModelRegistry", *, loras: Sequence[LoraSpec] = (), tag: str | None = None,
            prompt: str | None = None, seed: int | None = None) -> Edit:
    """Restyle the product under ``mask``; nothing outside ``dilate(mask, params.mask_dilation)``
    changes.

    ``image``: PIL ``"RGB"`` (uint8, R, G, B). ``mask``: HxW bool, the product at full resolution.
    ``label``: its class (fills ``{label}``; selects ``params.classes[label]`` for the prompt
    template, negative prompt and tag). ``params``: the ``enhance`` settings. ``registry``: roles
    ``inpaint``, plus ``controlnet_depth`` and ``depth`` when ``params.controlnet``.
    ``loras``: checked LoRA files with weights (:func:`pipeline.models.lora_weights.parse_lora`), active
    for this call only (a class's configured LoRAs are resolved by :func:`class_loras` /
    :func:`op_enhance`, which know the settings root for relative paths). ``tag``: activation tag (default: the class's, else ``params.tag``).
    ``prompt``: replaces the template (``{tag}``/``{label}`` still filled). ``seed``: default
    ``params.seed``.

    Returns an :class:`Edit` whose ``edit_mask`` is the dilated product mask and whose record holds
    prompt, negative prompt, seed, sampler settings, crop, LoRA files (SHA-256, weights), model
    provenance, runtime and timings. Raises ValueError (bad arguments, LoRA problems) or
    :class:`EditError` (empty mask) before any model is loaded or run.
    """
    t_start = time.perf_counter()
    m = _check_args(image, mask, params, seed)
    loras = check_unique(loras)
    if registry is None:
        raise ValueError("enhance needs a model registry (roles 'inpaint', 'controlnet_depth', 'depth')")
    plan = plan_sampler(params.sampler, params.steps, params.guidance, registry.settings.samplers)
    if int(plan.steps * params.strength) < 1:
        raise ValueError(f"sampler {plan.name}: steps={plan.steps} x strength={params.strength} leaves no "
                         "denoising step")
    seed = params.seed if seed is None else int(seed)
    style = params.classes.get(label)
    if tag is None:
        tag = style.tag if style is not None and style.tag is not None else params.tag
    template = style.prompt_template if style is not None and style.prompt_template is not None \
        else params.prompt_template
    negative = style.negative_prompt if style is not None and style.negative_prompt is not None \
        else params.negative_prompt
    text = build_prompt(prompt if prompt is not None else template, label, tag)

    W, H = image.size
    region = dilate(m, params.mask_dilation)
    # auto: the inpaint model's native size, read from its files (the model is not loaded for it).
    resolution = registry.work_resolution(params.resolution) if params.mode == "crop" else None
    crop = plan_work(region, params, resolution)
    timings: dict[str, float] = {}

    # -- models from here on -----------------------------------------------------------------------
    work_img = crop.to_work(image)
    work_mask = crop.mask_to_work(region)
    control = None
    if params.controlnet:
        t0 = time.perf_counter()
        control = depth_map(work_img, registry)
        timings["depth"] = time.perf_counter() - t0
    # Adapter state is global to the shared UNet: one generation at a time on the inpaint role.
    with registry.lock("inpaint"):
        pipe = controlnet_pipeline(registry) if params.controlnet else registry.get("inpaint")
        t0 = time.perf_counter()
        # Adapters (acceleration + style LoRAs) and the scheduler are switched back on exit: other
        # users of the shared UNet (displace's SD fill) never see them.
        with sampling(registry, pipe, plan, loras) as sampler_rec:
            timings["lora"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            work_out = _generate(pipe, work_img, work_mask, control, prompt=text, negative_prompt=negative,
                                 seed=seed, params=params, plan=plan)
            timings["generate"] = time.perf_counter() - t0
        lora_records = sampler_rec.pop("loras")

    # -- paste back inside the region only -----------------------------------------------------------
    t0 = time.perf_counter()
    src = np.asarray(image)
    # A window one pixel larger than the crop (where the image allows), so the feather sees the
    # region's real edges: the crop border itself is no edge to fade towards.
    wx0, wy0 = max(0, crop.x0 - 1), max(0, crop.y0 - 1)
    wx1, wy1 = min(W, crop.x1 + 1), min(H, crop.y1 + 1)
    src_win = src[wy0:wy1, wx0:wx1]
    reg_win = region[wy0:wy1, wx0:wx1]
    gen_win = src_win.copy()
    gen_win[crop.y0 - wy0:crop.y1 - wy0, crop.x0 - wx0:crop.x1 - wx0] = np.asarray(crop.from_work(work_out))
    alpha = inner_feather_alpha(reg_win, params.mask_feather, core=m[wy0:wy1, wx0:wx1])
    out_win = paste(src_win, gen_win, alpha)
    out = src.copy()
    out[wy0:wy1, wx0:wx1] = out_win
    timings["paste"] = time.perf_counter() - t0
    result = Image.fromarray(out, "RGB")
    if "icc_profile" in image.info:
        result.info["icc_profile"] = image.info["icc_profile"]

    provenance = {"inpaint": registry.provenance("inpaint")}
    if params.controlnet:
        provenance["controlnet_depth"] = registry.provenance("controlnet_depth")
        provenance["depth"] = registry.provenance("depth")
    timings["total"] = time.perf_counter() - t_start
    record: dict[str, Any] = {
        "op": "enhance", "label": label, "image_size": [W, H], "mode": params.mode,
        "prompt": text, "negative_prompt": negative, "tag": tag, "prompt_source": "given" if prompt is not None
        else ("class template" if style is not None and style.prompt_template is not None else "template"),
        "seed": seed, "steps": plan.steps, "guidance": plan.guidance, "strength": params.strength,
        "sampler": sampler_rec,
        "controlnet": params.controlnet, "controlnet_scale": params.controlnet_scale if params.controlnet else None,
        "pipeline": type(pipe).__name__, "family": _family_name(pipe), "crop": crop.to_record(), "resolution": resolution,
        "mask_dilation": params.mask_dilation, "mask_feather": params.mask_feather,
        "mask_pixels": int(m.sum()), "edit_pixels": int(region.sum()),
        "loras": lora_records, "models": provenance, "runtime": _runtime_record(registry, pipe),
        "timings": {k: _round(v) for k, v in timings.items()},
        "params": params.model_dump(mode="json"),
    }
    # The product stays where it was: enhance restyles it in place.
    return Edit(result, region, m.copy(), record)


def enhance_detection(image: Image.Image, detection: "Detection", params: EnhanceSettings,
                      models: "ModelRegistry", **kwargs: Any) -> Edit:
    """The edit-card form ``(image, detection, params, models) -> Edit`` of :func:`enhance`
    (an RGBA or other-mode image is converted to RGB first)."""
    return enhance(image.convert("RGB") if image.mode != "RGB" else image, detection.mask, detection.label,
                   params, models, **kwargs)


# ------------------------------------------------------------------------------------------------
# The operation-table entry (rules, `run --op enhance`, catalog rows)


def _lora_item(v: Any, info: ValidationInfo) -> LoraSpec:
    # parse_lora checks the file (exists, loads, is a LoRA) and hashes it: a bad file is refused
    # when the rules load, not mid-image. Relative paths: the caller's bases, in order.
    try:
        return parse_lora(v, bases=(info.context or {}).get("bases", (None,)))
    except LoraError as e:
        raise ValueError(str(e)) from None


class EnhanceParams(OpParams):
    """``enhance``: restyle the product. ``loras``: replaces the class's configured LoRAs (each
    ``"FILE[:WEIGHT]"`` or ``{path: FILE, weight: W}``; a relative FILE is looked up against the
    places the caller gives: the rule file's folder, the working directory, the settings root);
    ``prompt`` replaces the template; ``tag`` the activation tag. Every field of the ``enhance``
    settings section (``steps``, ``strength``, ``seed``, ``mode``, ...) may be overridden."""

    section = "enhance"
    loras: list[Annotated[LoraSpec, BeforeValidator(_lora_item)]] | None = None
    prompt: str | None = None
    tag: str | None = None
    settings: EnhanceSettings

    @field_validator("loras", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path, dict, LoraSpec)) else v

    @field_validator("loras", mode="after")
    @classmethod
    def _unique(cls, v: list[LoraSpec] | None) -> list[LoraSpec] | None:
        try:
            return None if v is None else check_unique(v)
        except LoraError as e:
            raise ValueError(str(e)) from None

    def own(self) -> dict[str, Any]:
        out = super().own()
        if self.loras is not None:
            out["loras"] = [{"path": str(l.path), "weight": l.weight} for l in self.loras]
        return out


def run_enhance(image: Image.Image, mask: np.ndarray, label: str, params: EnhanceParams, ctx: EditContext) -> Edit:
    """Enhance with the action's LoRAs, or else the class's configured ones (relative to the
    settings root)."""
    s = params.settings
    loras = params.loras if params.loras is not None else class_loras(s, label, getattr(ctx.settings, "base_dir", None))
    return enhance(image, mask, label, s, ctx.registry, loras=loras, tag=params.tag, prompt=params.prompt)
