"""Stable Diffusion families (SD 1.x, SD 2.x, SDXL): which one a checkpoint is, which diffusers
pipeline classes run it, and whether a ControlNet or LoRA belongs to it.

The family is read from the files, never guessed from a repo name:

- ``model_index.json``'s ``_class_name`` names the pipeline class (``StableDiffusionXL*`` is SDXL);
- the UNet's ``config.json``: SDXL has ``addition_embed_type: text_time`` (its pooled text embeds
  and size/crop time ids), SD 2.x ``use_linear_projection: true`` (OpenCLIP-H text encoder,
  1024-wide cross attention), SD 1.x neither (CLIP ViT-L, 768-wide).

A checkpoint's native work size (:func:`native_resolution`) comes from its files too: the UNet's
``sample_size`` times the VAE's downscale, as diffusers' pipelines default their height and width.
The ``resolution: auto`` settings resolve to it (:meth:`pipeline.models.registry.ModelRegistry.work_resolution`).

A ControlNet or LoRA made for another family fails in the middle of a generation with a matrix
shape error; :func:`check_controlnet` and :func:`check_lora` refuse it when it is loaded, naming
both sides (``controlnet cross_attention_dim 768 (sd15) vs inpaint 2048 (sdxl)``).

Belongs with the model registry (room ``pipeline/models``). Imports nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError

__all__ = ["FAMILIES", "Family", "check_controlnet", "check_lora", "family_of_config", "family_of_dir",
           "lora_family_facts", "native_resolution", "read_unet_config", "read_vae_config"]


@dataclass(frozen=True)
class Family:
    """One SD family: its name, the diffusers pipeline classes per use, its native resolution and
    the folders of its diffusers layout that the registry loads."""

    name: str
    title: str
    base: str  # text-to-image pipeline class (role ``base``, LoRA training)
    inpaint: str  # inpainting pipeline class (role ``inpaint``)
    controlnet_inpaint: str  # ControlNet-inpaint pipeline class (enhance with controlnet: true)
    resolution: int  # the family's usual native work size (long side); a checkpoint's own: native_resolution
    components: tuple[str, ...]  # loaded subfolders of the diffusers layout

    @property
    def two_text_encoders(self) -> bool:
        return "text_encoder_2" in self.components


_SD = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "SD 1.x", "StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
                   "StableDiffusionControlNetInpaintPipeline", 512, _SD),
    "sd2": Family("sd2", "SD 2.x", "StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
                  "StableDiffusionControlNetInpaintPipeline", 512, _SD),
    "sdxl": Family("sdxl", "SDXL", "StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline",
                   "StableDiffusionXLControlNetInpaintPipeline", 1024,
                   ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")),
}


def family_of_config(cfg: dict[str, Any], class_name: str = "") -> Family:
    """The family of a UNet or ControlNet ``config.json`` (dict), with the pipeline's
    ``_class_name`` when known (see the module docstring for the rule)."""
    if class_name.startswith("StableDiffusionXL") or cfg.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    if cfg.get("use_linear_projection"):
        return FAMILIES["sd2"]
    return FAMILIES["sd15"]


def read_unet_config(loc: Path) -> dict[str, Any]:
    """``loc/unet/config.json`` of a diffusers pipeline folder. Raises FileNotFoundError/ValueError."""
    return json.loads((Path(loc) / "unet" / "config.json").read_text())


def read_vae_config(loc: Path) -> dict[str, Any]:
    """``loc/vae/config.json`` of a diffusers pipeline folder. Raises FileNotFoundError/ValueError."""
    return json.loads((Path(loc) / "vae" / "config.json").read_text())


def native_resolution(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], family: Family) -> int:
    """The long side, px, a checkpoint was trained at: the UNet's ``sample_size`` (latent px) times
    the VAE's downscale ``2 ** (len(block_out_channels) - 1)``, the rule diffusers' SD pipelines use
    for their default height and width (SD 1.5 and SD 2 inpainting: 64 x 8 = 512; SDXL: 128 x 8 =
    1024; SD 2.x 768-v: 96 x 8 = 768). ``family.resolution`` when a config lacks either field."""
    sample = unet_cfg.get("sample_size")
    if isinstance(sample, (list, tuple)) and sample:
        sample = max(sample)
    blocks = vae_cfg.get("block_out_channels")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample <= 0 \
            or not isinstance(blocks, (list, tuple)) or not blocks:
        return family.resolution
    return int(sample) * 2 ** (len(blocks) - 1)


def family_of_dir(loc: Path) -> tuple[Family, str, dict[str, Any]]:
    """(family, ``_class_name`` of ``model_index.json``, UNet config) of a diffusers SD folder."""
    index = json.loads((Path(loc) / "model_index.json").read_text())
    cls = str(index.get("_class_name", ""))
    unet = read_unet_config(loc)
    return family_of_config(unet, cls), cls, unet


def _describe(cfg: dict[str, Any]) -> str:
    return f"{cfg.get('cross_attention_dim')} ({family_of_config(cfg).name})"


def check_controlnet(cn_cfg: dict[str, Any], unet_cfg: dict[str, Any], *, source: str, inpaint_source: str) -> None:
    """Refuse a ControlNet whose config does not fit the inpaint UNet's (cross-attention width,
    SDXL's added conditioning, the down blocks whose residuals it adds). Raises
    :class:`ModelLoadError` for role ``controlnet_depth`` naming both sides."""
    problems = []
    if cn_cfg.get("cross_attention_dim") != unet_cfg.get("cross_attention_dim"):
        problems.append(f"controlnet cross_attention_dim {_describe(cn_cfg)} vs inpaint {_describe(unet_cfg)}")
    if cn_cfg.get("addition_embed_type") != unet_cfg.get("addition_embed_type"):
        problems.append(f"controlnet addition_embed_type {cn_cfg.get('addition_embed_type')} vs inpaint "
                        f"{unet_cfg.get('addition_embed_type')}")
    for key in ("block_out_channels", "layers_per_block", "projection_class_embeddings_input_dim"):
        a, b = cn_cfg.get(key), unet_cfg.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b and not problems:  # a family mismatch says it all; otherwise the architecture differs
            problems.append(f"controlnet {key} {a} vs inpaint {b}")
    if problems:
        cf, uf = family_of_config(cn_cfg), family_of_config(unet_cfg)
        raise ModelLoadError("controlnet_depth", source,
                             f"made for {cf.title}, the inpaint model {inpaint_source} is {uf.title}: "
                             + "; ".join(problems),
                             f"use a depth ControlNet for {uf.title} (see conf/presets/ and docs/models.md)")


def lora_family_facts(path: Path) -> dict[str, Any]:
    """What a LoRA file's header says about the model it was made for: ``cross_attention_dim``
    (the input width of a cross-attention ``to_k``/``to_v`` down projection; None when it holds
    no such layer) and ``two_text_encoders`` (kohya ``lora_te1_``/``lora_te2_`` or diffusers
    ``text_encoder_2.`` keys: SDXL). Reads only the safetensors header."""
    from safetensors import safe_open

    cross = None
    two = False
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")):
                two = True
            low = k.replace(".", "_")
            if cross is None and "attn2" in low and ("to_k" in low or "to_v" in low) \
                    and ("lora_down" in low or "lora_A" in low or "lora_a" in low.lower()):
                shape = f.get_slice(k).get_shape()
                if len(shape) == 2:
                    cross = int(shape[1])
    return {"cross_attention_dim": cross, "two_text_encoders": two}


def check_lora(path: Path, unet_cfg: dict[str, Any], *, has_text_encoder_2: bool, target: str) -> str | None:
    """Why the LoRA file at ``path`` does not fit a pipeline whose UNet has config ``unet_cfg``
    (and a second text encoder or not), or None when it fits. ``target`` names the pipeline in
    the message (e.g. the inpaint role's source)."""
    facts = lora_family_facts(path)
    fam = family_of_config(unet_cfg)
    cross = facts["cross_attention_dim"]
    if cross is not None and cross != unet_cfg.get("cross_attention_dim"):
        return (f"LoRA cross_attention_dim {cross} vs {target} {_describe(unet_cfg)}: the LoRA is made for "
                f"another Stable Diffusion family than {fam.title}")
    if facts["two_text_encoders"] and not has_text_encoder_2:
        return f"LoRA holds SDXL text-encoder layers (lora_te1_/lora_te2_) but {target} is {fam.title}"
    return None
