"""Build a segment-anything ``Sam`` from a state dict, reading the architecture off the weights.

The official checkpoints (vit_b / vit_l / vit_h) are built with segment-anything's own
``sam_model_registry`` and loaded strictly. Any other architecture (the tiny test set, or a
distilled variant with the same module names) is built from the same segment-anything modules
with every size inferred from tensor shapes, so one code path serves real and tiny weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch


@dataclass(frozen=True)
class SamArch:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    img_size: int
    mlp_ratio: float
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    iou_head_depth: int
    iou_head_hidden_dim: int


# The official architectures (segment-anything build_sam.py).
STANDARD = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def infer_arch(state: dict[str, torch.Tensor]) -> SamArch:
    """Read every size of the SAM architecture from tensor shapes. Raises ValueError if not SAM."""
    try:
        pe = state["image_encoder.patch_embed.proj.weight"]  # [C, 3, p, p]
        pos = state["image_encoder.pos_embed"]  # [1, g, g, C]
    except KeyError as e:
        raise ValueError(f"not a segment-anything state dict (missing {e.args[0]})") from None
    embed_dim, patch = pe.shape[0], pe.shape[-1]
    grid = pos.shape[1]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    depth = len(blocks)
    global_idx, window = [], 0
    head_dim = None
    for i in blocks:
        rel = state.get(f"image_encoder.blocks.{i}.attn.rel_pos_h")  # [2*size-1, head_dim]
        if rel is None:
            raise ValueError("SAM checkpoints without relative positions are not supported")
        head_dim = rel.shape[1]
        size = (rel.shape[0] + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            window = size
    lin1 = state["image_encoder.blocks.0.mlp.lin1.weight"]
    prompt_dim = state["prompt_encoder.no_mask_embed.weight"].shape[1]
    dec_layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    iou_layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))}
    return SamArch(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(global_idx),
        window_size=window,
        patch_size=patch,
        img_size=grid * patch,
        mlp_ratio=lin1.shape[0] / embed_dim,
        prompt_dim=prompt_dim,
        mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=len(dec_layers),
        decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )


def standard_type(arch: SamArch) -> str | None:
    for name, (dim, depth, heads, glob) in STANDARD.items():
        if (arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes) == (dim, depth, heads, glob) \
                and arch.img_size == 1024 and arch.prompt_dim == 256:
            return name
    return None


def _build_custom(a: SamArch):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = a.img_size // a.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=a.img_size, patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth,
            num_heads=a.num_heads, mlp_ratio=a.mlp_ratio, out_chans=a.prompt_dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            global_attn_indexes=a.global_attn_indexes, window_size=a.window_size,
        ),
        prompt_encoder=PromptEncoder(embed_dim=a.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(a.img_size, a.img_size), mask_in_chans=a.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            # segment-anything always uses 8 decoder heads; head count is not visible in shapes.
            transformer=TwoWayTransformer(depth=a.decoder_depth, embedding_dim=a.prompt_dim,
                                          mlp_dim=a.decoder_mlp_dim, num_heads=8),
            transformer_dim=a.prompt_dim, iou_head_depth=a.iou_head_depth, iou_head_hidden_dim=a.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def build_sam_from_state(state: dict[str, torch.Tensor], model_type: str = "auto"):
    """Return ``(sam, model_type, image_size)``; ``sam`` in eval mode on CPU, float32.

    ``model_type`` vit_b/vit_l/vit_h insists on that architecture; ``auto`` reads it off the weights.
    """
    from segment_anything import sam_model_registry

    arch = infer_arch(state)
    found = standard_type(arch)
    if model_type not in ("auto", None) and model_type != found:
        raise ValueError(f"settings say model_type {model_type} but the checkpoint is "
                         f"{found or 'a non-standard SAM'} (embed dim {arch.embed_dim}, depth {arch.depth})")
    # checkpoint=None: segment-anything's own loader unpickles without weights_only.
    sam = sam_model_registry[found](checkpoint=None) if found else _build_custom(arch)
    state = {k: v.float() for k, v in state.items()}
    sam.load_state_dict(state, strict=True)
    return sam.eval(), found or "custom", arch.img_size
