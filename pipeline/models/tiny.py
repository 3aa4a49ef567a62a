"""Tiny random-weight model sets in the real checkpoints' on-disk layouts.

``make_tiny_set(DIR)`` writes one folder (or file) per model role, laid out exactly as the real
checkpoints are (``model_index.json`` + component subfolders for diffusers pipelines, ``config.json``
+ ``model.safetensors`` + processor files for transformers models, a single state-dict file for
SAM, a single TorchScript ``big-lama.pt`` for LaMa), plus ``DIR/settings.yaml`` pointing every role at them. The registry then loads them through
the same code that loads real weights, so the whole product runs offline, in seconds, on a CPU.

Random weights produce noise, not quality: the set exists to exercise code paths, never to judge
output. Detection thresholds in the written settings are permissive so every stage still runs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence
from pipeline.models.registry import file_sha256, quiet_libraries

# Kept small so that the whole set builds in a few seconds and every forward pass is cheap.
TEXT_DIM = 32
CROSS_DIM = 32
PROJ_DIM = 16
CLIP_IMAGE = 32
SAM_IMAGE = 256  # SAM's real input is 1024; every size is inferred from the weights on load

# SD 1.5's scheduler_config.json; each scheduler class takes the keys it knows from it.
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
    "trained_betas": None,
}


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table every GPT-2/CLIP BPE vocabulary is built on.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_tokenizer(specials_last: bool = False, max_length: int = 77):
    """A real CLIP BPE tokenizer with a byte-level vocabulary and no merges (514 tokens).

    ``specials_last``: start/end tokens at the end of the vocabulary, as in the real CLIP vocabulary
    (OWLv2 treats a query whose first id is 0 as padding)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    body = chars + [c + "</w>" for c in chars]
    vocab = body + specials if specials_last else specials + body
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(vocab=str(Path(d) / "vocab.json"), merges=str(Path(d) / "merges.txt"),
                             model_max_length=max_length)


def _bert_tokenizer():
    """A real WordPiece tokenizer (BLIP's text side) over a tiny character vocabulary."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = specials + chars + ["##" + c for c in chars] + ["a", "photo", "of", "product", "bag", "shoe", "chair"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
        tok = BertTokenizer(vocab=str(Path(d) / "vocab.txt"), model_max_length=32)
    # BLIP decodes from a [DEC] token, as the real processor adds it.
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _clip_image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def make_clip(out: Path) -> None:
    """transformers CLIPModel + CLIPProcessor (as openai/clip-vit-base-patch32)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tok = _clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=CLIP_IMAGE, patch_size=8),
        projection_dim=PROJ_DIM,
    )
    _seeded(0)
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor(image_processor=_clip_image_processor(CLIP_IMAGE), tokenizer=tok).save_pretrained(out)


def make_sam(out_file: Path) -> None:
    """A SAM state dict (the official checkpoint's keys) with a tiny encoder, as .safetensors."""
    from functools import partial

    import torch
    from safetensors.torch import save_file
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    _seeded(1)
    dim = 32
    enc = ImageEncoderViT(img_size=SAM_IMAGE, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                          out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, global_attn_indexes=(1,), window_size=4)
    grid = SAM_IMAGE // 16
    sam = Sam(
        image_encoder=enc,
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(SAM_IMAGE, SAM_IMAGE), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=8),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(out_file))


# Stable Diffusion families (pipeline.models.families). Each tiny family keeps its real architecture's
# distinguishing features at toy width, so a model of one family is refused by another exactly as
# real weights are: the cross-attention width (real: SD 1.x 768, SD 2.x 1024, SDXL 2048 = 768 + 1280
# of its two text encoders), SD 2.x's linear transformer projections and OpenCLIP's gelu, and
# SDXL's second text encoder with projection plus its added "text_time" conditioning.
FAMILY_NAMES = ("sd15", "sd2", "sdxl")
SD2_CROSS_DIM = 48
SDXL_TE1_DIM = 32
SDXL_TE2_DIM = 32
SDXL_CROSS_DIM = SDXL_TE1_DIM + SDXL_TE2_DIM
SDXL_TIME_EMBED = 8  # addition_time_embed_dim (real: 256)
# 6 time ids (original size, crop top-left, target size) x addition_time_embed_dim + pooled text
# embeds (text_encoder_2's projection_dim): 6 * 256 + 1280 = 2816 for the real SDXL UNet.
SDXL_PROJ_INPUT = 6 * SDXL_TIME_EMBED + SDXL_TE2_DIM
# SDXL's scheduler_config.json (stable-diffusion-xl-base-1.0 / -inpainting-0.1: EulerDiscreteScheduler)
SDXL_SCHEDULER = {**SD15_SCHEDULER, "interpolation_type": "linear", "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False}


def _family_unet_kwargs(family: str) -> dict[str, Any]:
    if family == "sd15":
        return {"cross_attention_dim": CROSS_DIM}
    if family == "sd2":
        return {"cross_attention_dim": SD2_CROSS_DIM, "use_linear_projection": True}
    if family == "sdxl":
        return {"cross_attention_dim": SDXL_CROSS_DIM, "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_EMBED,
                "projection_class_embeddings_input_dim": SDXL_PROJ_INPUT}
    raise ValueError(f"unknown Stable Diffusion family {family!r} (one of: {', '.join(FAMILY_NAMES)})")


def _family_sample_size(family: str) -> int:
    """The tiny UNet's ``sample_size`` (latent px): times the tiny VAE's downscale of 2 this is the
    family's toy native size (pipeline.models.families.native_resolution), 64 px, and 128 px for
    SDXL, twice SD 1.x's as for the real models (1024 vs 512), so ``resolution: auto`` picks it."""
    return 64 if family == "sdxl" else 32


def _sd_components(unet_in: int, cross_dim: int = CROSS_DIM, family: str = "sd15"):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _seeded(2)
    kw = _family_unet_kwargs(family)
    if family == "sd15":
        kw["cross_attention_dim"] = cross_dim
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=_family_sample_size(family), in_channels=unet_in,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=32, **kw,
    )
    vae_kw = {"scaling_factor": 0.13025, "force_upcast": True} if family == "sdxl" else {}
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64, **vae_kw,
    )
    return unet, vae


def _text_config(tok: Any, hidden: int, **kw: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kw)


def _sd_text(family: str = "sd15") -> dict[str, Any]:
    """The family's text side as pipeline components: SD 1.x CLIP ViT-L (quick_gelu), SD 2.x
    OpenCLIP-H (gelu), SDXL CLIP ViT-L + OpenCLIP-bigG with projection (``text_encoder_2``, whose
    pooled, projected output is SDXL's added text embedding) and a second tokenizer."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _clip_tokenizer()
    _seeded(3)
    if family == "sd15":
        return {"text_encoder": CLIPTextModel(_text_config(tok, CROSS_DIM)), "tokenizer": tok}
    if family == "sd2":
        return {"text_encoder": CLIPTextModel(_text_config(tok, SD2_CROSS_DIM, hidden_act="gelu")), "tokenizer": tok}
    te1 = CLIPTextModel(_text_config(tok, SDXL_TE1_DIM))
    te2 = CLIPTextModelWithProjection(_text_config(tok, SDXL_TE2_DIM, hidden_act="gelu",
                                                   projection_dim=SDXL_TE2_DIM))
    return {"text_encoder": te1, "tokenizer": tok, "text_encoder_2": te2, "tokenizer_2": _clip_tokenizer()}


def _save_sd(out: Path, pipeline_cls, unet_in: int, scheduler_cls, family: str = "sd15") -> None:
    unet, vae = _sd_components(unet_in, family=family)
    text = _sd_text(family)
    if family == "sdxl":
        sched = scheduler_cls.from_config(SDXL_SCHEDULER)
        pipe = pipeline_cls(vae=vae, unet=unet, scheduler=sched, **text)
    else:
        sched = scheduler_cls.from_config(SD15_SCHEDULER)
        pipe = pipeline_cls(vae=vae, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=_clip_image_processor(CLIP_IMAGE), requires_safety_checker=False, **text)
    pipe.save_pretrained(out, safe_serialization=True)


def make_base(out: Path, family: str = "sd15") -> None:
    """The family's diffusers text-to-image layout: StableDiffusionPipeline (SD 1.5, SD 2.x) or
    StableDiffusionXLPipeline (SDXL base): model_index.json + components."""
    import diffusers

    if family == "sdxl":
        _save_sd(out, diffusers.StableDiffusionXLPipeline, 4, diffusers.EulerDiscreteScheduler, family)
    else:
        _save_sd(out, diffusers.StableDiffusionPipeline, 4, diffusers.PNDMScheduler, family)


def make_inpaint(out: Path, family: str = "sd15") -> None:
    """The family's diffusers inpainting layout: the UNet takes 9 channels (latents+mask+masked);
    StableDiffusionInpaintPipeline (SD 1.5, SD 2 inpainting) or StableDiffusionXLInpaintPipeline
    (as diffusers/stable-diffusion-xl-1.0-inpainting-0.1)."""
    import diffusers

    if family == "sdxl":
        _save_sd(out, diffusers.StableDiffusionXLInpaintPipeline, 9, diffusers.EulerDiscreteScheduler, family)
    else:
        _save_sd(out, diffusers.StableDiffusionInpaintPipeline, 9, diffusers.DDIMScheduler, family)


ATTENTION_LAYERS = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def write_kohya_lora(unet: Any, out_file: Path, seed: int, *, rank: int = 4, scale: float = 0.3,
                     layers: str = ATTENTION_LAYERS) -> Path:
    """Seeded random LoRA weights for every ``torch.nn.Linear`` of ``unet`` whose name matches the
    regex ``layers``, saved in the kohya layout the published acceleration LoRAs use
    (``lora_unet_*.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; float32 safetensors)."""
    import re as _re

    import torch
    from safetensors.torch import save_file

    pat = _re.compile(layers)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if pat.search(name) and isinstance(module, torch.nn.Linear):
            prefix = "lora_unet_" + name.replace(".", "_")
            state[f"{prefix}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * scale
            state[f"{prefix}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * scale
            state[f"{prefix}.alpha"] = torch.tensor(float(rank))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return out_file


def _accel_lora_builder(seed: int) -> Callable[..., None]:
    def make(out_file: Path, family: str = "sd15") -> None:
        """A few-step acceleration LoRA for the family's tiny inpaint UNet in the published files'
        layout (``pytorch_lora_weights.safetensors``), seeded random weights on every attention projection."""
        unet, _ = _sd_components(9, family=family)
        write_kohya_lora(unet, out_file, seed)

    return make


@functools.cache
def _tiny_lama_class() -> type:
    import torch
    from torch import nn

    class TinyLama(nn.Module):
        """LaMa's TorchScript contract at toy size: ``forward(image, mask)`` with image float32
        ``Bx3xHxW`` RGB in [0, 1] and mask ``Bx1xHxW`` in {0, 1} (1 = fill) -> ``Bx3xHxW`` in
        [0, 1], the known pixels passed through. Like big-lama it blanks the hole before looking,
        downsamples three times by 2 (H and W must be multiples of 8, else the skip sum fails) and
        has a Fourier (FFT) branch at the bottleneck."""

        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
            self.spectral = nn.Conv2d(32, 32, 1)
            self.up = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(),
                                    nn.Upsample(scale_factor=2.0), nn.Conv2d(16, 8, 3, 1, 1), nn.ReLU(),
                                    nn.Upsample(scale_factor=2.0), nn.Conv2d(8, 3, 3, 1, 1))
            self.skip = nn.Conv2d(4, 3, 1)

        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            mask = mask.to(image.dtype)
            x = torch.cat([image * (1 - mask), mask], dim=1)
            z = self.down(x)
            f = torch.fft.rfft2(z, norm="ortho")
            f = self.spectral(torch.cat([f.real, f.imag], dim=1))
            re, im = torch.chunk(f, 2, dim=1)
            z = z + torch.fft.irfft2(torch.complex(re, im), s=[z.shape[-2], z.shape[-1]], norm="ortho")
            pred = torch.sigmoid(self.up(z) + self.skip(x))
            return mask * pred + (1 - mask) * image

    return TinyLama


def tiny_lama() -> Any:
    """The tiny LaMa-contract module, scripted (seeded weights)."""
    import warnings

    import torch

    _seeded(9)
    with warnings.catch_warnings():  # deprecated by torch, but it is the real checkpoint's format
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        return torch.jit.script(_tiny_lama_class()().eval())


def make_inpaint_fill(out_file: Path) -> None:
    """LaMa's on-disk form: one TorchScript file (``big-lama.pt``) written with ``torch.jit.save``,
    loaded by the registry with ``torch.jit.load`` exactly as the real file is."""
    import warnings

    import torch

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        torch.jit.save(tiny_lama(), str(out_file))


def make_controlnet_depth(out: Path, family: str = "sd15") -> None:
    """diffusers ControlNetModel layout (config.json + diffusion_pytorch_model.safetensors) for the
    family's UNet (SDXL: with the added text_time conditioning, as diffusers/controlnet-depth-sdxl-1.0-small)."""
    from diffusers import ControlNetModel

    import torch

    _seeded(4)
    cn = ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=32,
        **_family_unet_kwargs(family),
    )
    # ControlNet's "zero convolutions" start at zero, so a fresh one changes nothing; random small
    # values make the depth conditioning really reach the UNet in every test.
    zero_convs = [cn.controlnet_cond_embedding.conv_out, *cn.controlnet_down_blocks, cn.controlnet_mid_block]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, 0.02)
            conv.bias.normal_(0, 0.02)
    cn.save_pretrained(out, safe_serialization=True)


def make_depth(out: Path) -> None:
    """transformers DPTForDepthEstimation + DPTImageProcessor (the depth-estimation layout)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    _seeded(5)
    cfg = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32],
                    fusion_hidden_size=16, head_in_index=-1, is_hybrid=False, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(cfg).save_pretrained(out)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(out)


def make_novel_view(out: Path) -> None:
    """The Zero123 diffusers layout (as kxic/zero123-xl): unet (8 in-channels), vae, image_encoder
    (CLIP vision with projection), feature_extractor, scheduler, and cc_projection, a linear layer
    mapping [CLIP image embedding, 4 pose numbers] to the UNet's cross-attention size."""
    from diffusers import DDIMScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipeline.models.novel_view_layout import CCProjection, write_model_index

    unet, vae = _sd_components(8)
    _seeded(6)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                         num_attention_heads=4, image_size=CLIP_IMAGE, patch_size=8,
                                                         projection_dim=PROJ_DIM))
    cc = CCProjection(in_channel=PROJ_DIM + 4, out_channel=CROSS_DIM)
    sched = DDIMScheduler.from_config(SD15_SCHEDULER)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    enc.save_pretrained(out / "image_encoder")
    _clip_image_processor(CLIP_IMAGE).save_pretrained(out / "feature_extractor")
    sched.save_pretrained(out / "scheduler")
    cc.save_pretrained(out / "cc_projection", safe_serialization=True)
    write_model_index(out)


def make_upscaler(out: Path) -> None:
    """transformers Swin2SRForImageSuperResolution (x4, as caidas/swin2SR-classical-sr-x4-64)."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    _seeded(7)
    cfg = Swin2SRConfig(image_size=32, patch_size=1, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                        mlp_ratio=2.0, upscale=4, upsampler="pixelshuffle", img_range=1.0)
    Swin2SRForImageSuperResolution(cfg).save_pretrained(out)
    Swin2SRImageProcessor(pad_size=4).save_pretrained(out)


def make_captioner(out: Path) -> None:
    """transformers BlipForConditionalGeneration + BlipProcessor (as Salesforce/blip-image-captioning-base)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _bert_tokenizer()
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                         eos_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=PROJ_DIM,
    )
    _seeded(8)
    model = BlipForConditionalGeneration(cfg)
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(out)
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(out)


def make_matting(out: Path) -> None:
    """transformers VitMatteForImageMatting (VitDet backbone) + VitMatteImageProcessor, the layout of
    hustvl/vitmatte-small-composition-1k (config.json, model.safetensors, preprocessor_config.json)."""
    from transformers import VitDetConfig, VitMatteConfig, VitMatteForImageMatting, VitMatteImageProcessor

    _seeded(9)
    backbone = VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64,
                            pretrain_image_size=64, patch_size=16, num_channels=4, out_features=["stage2"],
                            window_block_indices=[], residual_block_indices=[], use_relative_position_embeddings=False)
    cfg = VitMatteConfig(backbone_config=backbone, hidden_size=32, convstream_hidden_sizes=[8, 16, 16],
                         fusion_hidden_sizes=[16, 8, 8, 8])
    VitMatteForImageMatting(cfg).save_pretrained(out, safe_serialization=True)
    VitMatteImageProcessor().save_pretrained(out)


def _tiny_text(tok: Any, max_len: int) -> dict:
    ids = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    return dict(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=ids[0], eos_token_id=ids[1],
                pad_token_id=ids[1])


def make_grounding(out: Path) -> None:
    """transformers Owlv2ForObjectDetection + Owlv2Processor, the layout of
    google/owlv2-base-patch16-ensemble (a zero-shot detector for ``detect.proposals: grounded``).
    The box head's last layer is zeroed, so every patch predicts a box around itself (OWLv2's box
    bias) instead of random degenerate boxes: the code path after the detector always runs."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok = _clip_tokenizer(specials_last=True, max_length=16)  # OWLv2's queries are 16 tokens
    cfg = Owlv2Config(text_config=_tiny_text(tok, 16),
                      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=64, patch_size=16),
                      projection_dim=TEXT_DIM)
    _seeded(21)
    model = Owlv2ForObjectDetection(cfg)
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(out)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok).save_pretrained(out)


def make_grounding_dino(out: Path) -> None:
    """transformers GroundingDinoForObjectDetection + GroundingDinoProcessor (Swin backbone, BERT
    text side), the layout of IDEA-Research/grounding-dino-tiny: the ``grounding`` role's other family."""
    from transformers import (GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor)

    tok = _bert_tokenizer()
    tok.model_max_length = 256
    cfg = GroundingDinoConfig(
        backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                             window_size=4, out_indices=[2, 3, 4], image_size=64),
        text_config=dict(model_type="bert", vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=20, encoder_n_points=2, decoder_n_points=2,
        num_feature_levels=4)
    _seeded(26)
    GroundingDinoForObjectDetection(cfg).save_pretrained(out)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           tokenizer=tok).save_pretrained(out)


def make_clipseg(out: Path) -> None:
    """transformers CLIPSegForImageSegmentation + CLIPSegProcessor, the layout of
    CIDAS/clipseg-rd64-refined (``detect.proposals: clipseg``)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tok = _clip_tokenizer(specials_last=True)
    cfg = CLIPSegConfig(text_config=_tiny_text(tok, 77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=64, patch_size=16),
                        projection_dim=PROJ_DIM, extract_layers=[0, 1], reduce_dim=16,
                        decoder_num_attention_heads=2, decoder_intermediate_size=32)
    _seeded(22)
    CLIPSegForImageSegmentation(cfg).save_pretrained(out)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok).save_pretrained(out)


def make_sam3(out: Path) -> None:
    """transformers Sam3Model + Sam3Processor, the layout of facebook/sam3 (``detect.proposals:
    sam3``): a 2-layer ViT at 112 px (patch 14, as SAM 3's 1008 px), one-layer DETR encoder and
    decoder with 10 queries, presence head included."""
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    tok = _clip_tokenizer(specials_last=True, max_length=32)
    side = 112
    cfg = Sam3Config(
        vision_config=dict(backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, image_size=side,
                                                patch_size=14, window_size=4, global_attn_indexes=[1],
                                                pretrain_image_size=56),
                           fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]),
        text_config={**_tiny_text(tok, 32), "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "projection_dim": 32},
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64,
                                 num_queries=10),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )
    _seeded(23)
    Sam3Model(cfg).save_pretrained(out)
    Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": side, "width": side}), tokenizer=tok,
                  target_size=side).save_pretrained(out)


def make_sam_hf(out: Path) -> None:
    """transformers SamModel + SamProcessor, the layout of facebook/sam-vit-base (the ``sam`` role
    from a transformers repo instead of a segment-anything checkpoint)."""
    from transformers import SamConfig, SamModel, SamProcessor

    _seeded(24)
    SamModel(SamConfig(**_tiny_sam_parts())).save_pretrained(out)
    SamProcessor(image_processor=_tiny_sam_image_processor()).save_pretrained(out)


def _tiny_sam_parts(**decoder: Any) -> dict[str, dict[str, Any]]:
    """The sub-configs of a toy transformers SAM (ViT encoder, prompt encoder, mask decoder), shared
    by the SAM and SAM-HQ layouts; ``decoder``: extra mask-decoder fields (SAM-HQ's ``vit_dim``)."""
    return dict(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SAM_IMAGE, patch_size=16, window_size=4, global_attn_indexes=[1],
                           mlp_dim=64, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=SAM_IMAGE, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32, **decoder),
    )


def _tiny_sam_image_processor() -> Any:
    from transformers import SamImageProcessor

    return SamImageProcessor(size={"longest_edge": SAM_IMAGE}, pad_size={"height": SAM_IMAGE, "width": SAM_IMAGE})


def make_sam_hq_hf(out: Path) -> None:
    """transformers SamHQModel + SamHQProcessor, the layout of syscv-community/sam-hq-vit-base (SAM
    with the HQ output token, fed the encoder's intermediate embeddings)."""
    from transformers import SamHQConfig, SamHQModel, SamHQProcessor

    _seeded(25)
    # vit_dim: the encoder width the HQ decoder reads its intermediate embeddings at
    SamHQModel(SamHQConfig(**_tiny_sam_parts(vit_dim=32))).save_pretrained(out)
    SamHQProcessor(image_processor=_tiny_sam_image_processor()).save_pretrained(out)


def make_sam2_hf(out: Path) -> None:
    """transformers Sam2Model + Sam2Processor, the layout of facebook/sam2.1-hiera-tiny (Hiera
    backbone, squashed square input)."""
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    cfg = Sam2Config(
        vision_config=dict(backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
                                                blocks_per_stage=[1, 2, 1, 1], embed_dim_per_stage=[16, 32, 64, 128],
                                                num_attention_heads_per_stage=[1, 1, 1, 1],
                                                window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[2],
                                                image_size=[SAM_IMAGE, SAM_IMAGE]),
                           backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=32,
                           backbone_feature_sizes=[[SAM_IMAGE // 4] * 2, [SAM_IMAGE // 8] * 2, [SAM_IMAGE // 16] * 2]),
        prompt_encoder_config=dict(hidden_size=32, image_size=SAM_IMAGE, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )
    _seeded(25)
    Sam2Model(cfg).save_pretrained(out)
    Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": SAM_IMAGE, "width": SAM_IMAGE})).save_pretrained(out)


def edgetam_backbone_config(embed_dim: Sequence[int] | None = None, depth: Sequence[int] | None = None) -> Any:
    """timm RepViT-M1 as EdgeTAM's backbone, features only (4 stages, strides 4-32), as transformers'
    EdgeTAM conversion writes it (``timm/repvit_m1.dist_in1k`` with ``features_only`` and
    ``out_indices`` 0-3). ``embed_dim`` / ``depth`` shrink it (tiny sets); the default is the real
    M1 (48, 96, 192, 384 channels; 2, 2, 14, 2 blocks). Note transformers' own default backbone is
    not RepViT (its default keyword is misspelt), so EdgeTAM is always built with this config."""
    from transformers import TimmWrapperConfig

    args: dict[str, Any] = {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}
    if embed_dim is not None:
        args["embed_dim"] = list(embed_dim)
    if depth is not None:
        args["depth"] = list(depth)
    return TimmWrapperConfig(architecture="repvit_m1", model_args=args)


def make_edgetam_hf(out: Path) -> None:
    """transformers EdgeTAM in the layout of facebook/EdgeTAM's transformers weights: an
    ``EdgeTamVideoModel`` checkpoint (``model_type: edgetam_video``, video memory modules included)
    with a ``Sam2VideoProcessor``; the ``sam`` role loads its image model (``EdgeTamModel``) from it.
    RepViT backbone (timm) at 4 small stages, squashed square input like SAM 2."""
    from transformers import (EdgeTamVideoConfig, EdgeTamVideoModel, EdgeTamVisionConfig, Sam2ImageProcessor,
                              Sam2VideoProcessor, Sam2VideoVideoProcessor)

    side = SAM_IMAGE
    chans = [8, 16, 32, 64]
    vision = EdgeTamVisionConfig(backbone_config=edgetam_backbone_config(chans, [1, 1, 1, 1]),
                                 backbone_channel_list=chans[::-1], fpn_hidden_size=32,
                                 backbone_feature_sizes=[[side // 4] * 2, [side // 8] * 2, [side // 16] * 2])
    emb = side // 16
    cfg = EdgeTamVideoConfig(
        vision_config=vision, image_size=side,
        prompt_encoder_config=dict(hidden_size=32, image_size=side, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
        memory_attention_hidden_size=32, memory_attention_num_layers=1, memory_attention_mlp_hidden_size=64,
        memory_attention_rope_feat_sizes=[emb, emb], memory_attention_rope_k_sizes=[4, 4],
        perceiver_resampler_num_latents=16, perceiver_resampler_num_latents_2d=16,
        perceiver_resampler_hidden_size=16, perceiver_resampler_mlp_intermediate_size=32,
        perceiver_resampler_attention_head_dim=16, perceiver_resampler_num_layers=1,
        memory_encoder_hidden_size=32, memory_encoder_output_channels=16, mask_downsampler_embed_dim=32,
        memory_fuser_intermediate_dim=64, memory_fuser_embed_dim=32, memory_fuser_num_layers=1,
        enable_temporal_pos_encoding_for_object_pointers=False, enable_occlusion_spatial_embedding=False,
    )
    _seeded(26)
    EdgeTamVideoModel(cfg).save_pretrained(out)
    size = {"height": side, "width": side}
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size=size),
                       video_processor=Sam2VideoVideoProcessor(size=size)).save_pretrained(out)


BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "clip": ("clip", make_clip),
    "sam": ("sam/sam_tiny.safetensors", make_sam),
    "base": ("base", make_base),
    "inpaint": ("inpaint", make_inpaint),
    "inpaint_fill": ("inpaint_fill/big-lama.pt", make_inpaint_fill),
    "controlnet_depth": ("controlnet_depth", make_controlnet_depth),
    "depth": ("depth", make_depth),
    "novel_view": ("novel_view", make_novel_view),
    "upscaler": ("upscaler", make_upscaler),
    "captioner": ("captioner", make_captioner),
    "matting": ("matting", make_matting),
    "lcm_lora": ("lcm_lora/pytorch_lora_weights.safetensors", _accel_lora_builder(11)),
    "tcd_lora": ("tcd_lora/pytorch_lora_weights.safetensors", _accel_lora_builder(12)),
    "hyper_lora": ("hyper_lora/Hyper-SD15-8steps-lora.safetensors", _accel_lora_builder(13)),
    "grounding": ("grounding", make_grounding),
    "clipseg": ("clipseg", make_clipseg),
    "sam3": ("sam3", make_sam3),
}

# Other families a role can be pointed at, written next to the default ones when the role is built
# (point models.<role>.path at the folder; tests and `python -m bench detect` do): the ``sam`` role
# from a transformers SAM, SAM 2.1 or EdgeTAM repo instead of a segment-anything checkpoint, and the
# ``grounding`` role as Grounding DINO instead of OWLv2. An alternative whose package is missing
# (EdgeTAM without ``timm``, the ``edgetam`` extra) is left out of the set.
ALTERNATIVES: dict[str, list[tuple[str, Callable[[Path], None]]]] = {
    "sam": [("sam_hf", make_sam_hf), ("sam_hq_hf", make_sam_hq_hf), ("sam2_hf", make_sam2_hf),
            ("edgetam_hf", make_edgetam_hf)],
    "grounding": [("grounding_dino", make_grounding_dino)],
}
ALTERNATIVE_NEEDS = {"edgetam_hf": "timm"}


# The roles whose models belong to one SD family (built per family; the others are shared).
FAMILY_ROLES = ("base", "inpaint", "controlnet_depth", "lcm_lora", "tcd_lora", "hyper_lora")


def _family_rel(role: str, family: str, nested: bool) -> str:
    """Where ``role`` of ``family`` lives in a tiny set: its usual place, or under ``FAMILY/`` when
    several families share one folder (``--family all``; SD 1.5 keeps the usual places)."""
    rel = BUILDERS[role][0]
    return f"{family}/{rel}" if nested and family != "sd15" and role in FAMILY_ROLES else rel


def tiny_settings_dict(out: Path, family: str = "sd15", nested: bool = False) -> dict:
    """Settings pointing every role at the tiny set (the ``family``'s diffusion models), with
    permissive detection for random weights."""
    models = {role: {"path": _family_rel(role, family, nested), "licence": "tiny random weights (tests/demo only)"}
              for role in BUILDERS}
    models["sam"]["model_type"] = "auto"
    lama = out / BUILDERS["inpaint_fill"][0]
    if lama.is_file():  # pinned like the real file, so the checksum path runs in every test
        models["inpaint_fill"]["sha256"] = file_sha256(lama)
    return {
        "root": ".",
        "paths": {"inbox": "inbox", "outbox": "outbox", "ledger": "outbox/.ledger.sqlite3", "rules": "rules.yaml",
                  "model_cache": "cache"},
        "runtime": {"device": "cpu", "dtype": "float32", "offline": True},
        "models": models,
        "detect": {
            "classes": [{"name": "handbag", "prompts": ["purse"], "threshold": 0.0},
                        {"name": "shoe", "prompts": ["sneaker"], "threshold": 0.0}],
            # Random CLIP weights favour no class; with no background prompts and zero margin the
            # best class always wins, so every stage after the prefilter runs.
            "background_prompts": [],
            "margin": 0.0, "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
            "min_mask_area": 0.0, "prefilter_threshold": 0.0,
            # the text-grounded front-ends keep every box, peak and instance of the random models
            "box_threshold": 0.0, "heatmap_threshold": 0.0, "sam3_threshold": 0.0, "presence_threshold": 0.0,
        },
        "samplers": {"lcm": {"steps": 2, "guidance": 1.0}, "tcd": {"steps": 2, "guidance": 0.0, "eta": 0.3},
                     "hyper": {"steps": 2, "guidance": 0.0}},
        # The diffusion work sizes stay at auto: the family's toy native size (64 px; SDXL 128).
        "enhance": {"steps": 2},
        "displace": {"fill": {"steps": 2}},
        "rotate": {"steps": 2, "view_size": 64},
    }


TINY_RULES = {
    "version": 1,
    "rules": [
        {"name": "bags get the look", "match": {"class": "handbag"},
         "actions": [{"enhance": {"tag": "tinystyle"}}], "continue": True},
        {"name": "bags move right", "match": {"class": "handbag"},
         "actions": [{"displace": {"x": "10%", "y": 0, "fill": "classical"}}]},
        {"name": "shoes turn", "match": {"class": "shoe"},
         "actions": [{"rotate": {"azimuth": 30, "polar": 0, "fill": "classical"}}]},
    ],
    "no_match": "skip",
}


def make_tiny_set(out: str | Path, roles: list[str] | None = None, family: str = "sd15") -> Path:
    """Write the tiny set for ``roles`` (default all) and ``out/settings.yaml``. Returns the settings path.

    ``family``: ``sd15`` (default), ``sd2`` or ``sdxl``: the Stable Diffusion family of the
    diffusion roles (:data:`FAMILY_ROLES`); ``all``: SD 1.5 in the usual places with
    ``settings.yaml``, plus the SD 2 and SDXL diffusion roles under ``out/sd2/`` and ``out/sdxl/``
    with ``settings-sd2.yaml`` and ``settings-sdxl.yaml`` sharing the other roles."""
    import yaml

    if family != "all" and family not in FAMILY_NAMES:
        raise ValueError(f"unknown Stable Diffusion family {family!r} (one of: {', '.join(FAMILY_NAMES)}, all)")
    quiet_libraries()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nested = family == "all"
    families = list(FAMILY_NAMES) if nested else [family]
    for role in list(BUILDERS) if roles is None else roles:
        rel, build = BUILDERS[role]
        if role in FAMILY_ROLES:
            for fam in families:
                build(out / _family_rel(role, fam, nested), family=fam)
        else:
            build(out / rel)
        for alt_rel, alt_build in ALTERNATIVES.get(role, []):
            need = ALTERNATIVE_NEEDS.get(alt_rel)
            if need is None or importlib.util.find_spec(need) is not None:
                alt_build(out / alt_rel)
    rules = out / "rules.yaml"
    rules.write_text("# Rules for the tiny set: every stage runs offline in seconds (outputs are noise).\n"
                     + yaml.safe_dump(TINY_RULES, sort_keys=False))
    first = None
    for fam in families:
        settings = out / ("settings.yaml" if fam == "sd15" or not nested else f"settings-{fam}.yaml")
        header = "# Tiny random-weight model set written by `product-studio models make-tiny`.\n" \
                 f"# Stable Diffusion family: {fam}. It exercises every code path offline; its outputs are noise.\n"
        settings.write_text(header + yaml.safe_dump(tiny_settings_dict(out, fam, nested), sort_keys=False))
        first = first or settings
    return first
