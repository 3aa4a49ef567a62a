"""Small random LoRA files in both on-disk layouts, for a given tiny UNet (test-only: never shipped),
the way :mod:`pipeline.models.tiny` writes tiny models. Loaded through the real code
(:class:`pipeline.models.lora_weights.LoraAdapters`), like a user's file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_UNET_ATTN = re.compile(r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TE_ATTN = re.compile(r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def make_diffusers_lora(unet: Any, out_file: str | os.PathLike, *, rank: int = 4, seed: int = 0,
                        scale: float = 0.3) -> Path:
    """Write a diffusers-format LoRA for ``unet`` (a ``UNet2DConditionModel``, left untouched) the way
    the diffusers training scripts do: peft ``LoraConfig`` on the attention projections of a copy,
    ``get_peft_model_state_dict``, ``save_lora_weights``. peft starts ``lora_B`` at zero (a no-op
    LoRA), so every LoRA tensor is set to seeded Gaussian noise times ``scale`` instead."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet).to("cpu", torch.float32)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(ATTN_TARGETS)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out.parent), unet_lora_layers=layers, weight_name=out.name,
                                              safe_serialization=True)
    return out


def make_kohya_lora(unet: Any, out_file: str | os.PathLike, *, text_encoder: Any = None, rank: int = 4,
                    alpha: float = 2.0, seed: int = 0, scale: float = 0.3) -> Path:
    """Write a kohya/A1111-format LoRA (``lora_unet_<module_path_with_underscores>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``; ``lora_te_text_model_...`` for ``text_encoder`` if given) with
    seeded Gaussian weights for the attention projections of ``unet``."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}

    def add(prefix: str, module: Any) -> None:
        state[f"{prefix}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * scale
        state[f"{prefix}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * scale
        state[f"{prefix}.alpha"] = torch.tensor(float(alpha))

    for name, module in unet.named_modules():
        if _UNET_ATTN.search(name):
            add("lora_unet_" + name.replace(".", "_"), module)
    if text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if _TE_ATTN.search(name):
                # kohya names follow transformers' CLIPTextModel layout, which had a text_model level.
                full = name if name.startswith("text_model.") else "text_model." + name
                add("lora_te_" + full.replace(".", "_"), module)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
