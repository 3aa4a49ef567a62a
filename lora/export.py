"""Writing a trained LoRA: diffusers format, kohya/A1111 format, manifest, and the rule snippet.

- **diffusers** (``NAME.safetensors``): what ``pipe.load_lora_weights(FILE)`` reads. Keys
  ``unet.<module>.lora_A.weight`` / ``lora_B`` (and ``text_encoder.text_model.<module>`` ones, the
  original CLIP checkpoint's names, as diffusers and other tools expect), with diffusers'
  ``lora_adapter_metadata`` (rank, alpha, target modules) so alpha != rank loads at the right scale.
- **kohya** (``NAME.kohya.safetensors``): what A1111, ComfyUI and kohya sd-scripts read (and
  diffusers too). Per module ``lora_unet_<module with _>.lora_down.weight`` (= peft ``lora_A``,
  ``[rank, in(, k, k)]``), ``.lora_up.weight`` (= ``lora_B``, ``[out, rank(, 1, 1)]``) and
  ``.alpha`` (0-dim float); text encoder modules use the ``lora_te_`` prefix. SD 1.x/2.x kohya
  LoRAs are trained on the diffusers UNet, so module paths are the diffusers ones with dots as
  ``_``; SDXL ones on the original (sgm) UNet, so its module names are used
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and the two text encoders
  get ``lora_te1_`` / ``lora_te2_``.
  ``ss_*`` metadata is what A1111's LoRA browser shows (``ss_tag_frequency`` gives the tag).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.io.imageio import atomic_write_text, atomic_path
from pipeline.io.hashing import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    import torch

KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TE_PREFIX = "lora_te"
# SDXL kohya files: one prefix per text encoder (CLIP ViT-L, OpenCLIP bigG).
KOHYA_TE1_PREFIX = "lora_te1"
KOHYA_TE2_PREFIX = "lora_te2"

# A diffusers ResNet block's layers under their sgm (original SDXL checkpoint) names.
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
               "time_emb_proj": "emb_layers.1", "norm1": "in_layers.0", "norm2": "out_layers.0"}


def diffusers_to_sgm_unet(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module path -> the sgm/LDM name kohya's SDXL LoRAs use (kohya trains SDXL
    on the original UNet): ``down_blocks.I.{resnets,attentions}.J`` -> ``input_blocks.N.{0,1}``
    with ``N = 1 + I * (L + 1) + J``; ``mid_block`` -> ``middle_block.{0,1,2}``;
    ``up_blocks.I.*.J`` -> ``output_blocks.(I * (L + 1) + J)``; a resnet's layers get their sgm
    names (``conv1`` -> ``in_layers.2``, ...). Transformer internals are named alike in both.
    The inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``.
    Raises ValueError for a module outside the blocks (conv_in, time embedding, ...)."""
    parts = module.split(".")
    L = int(layers_per_block)

    def inner(kind: str, rest: list[str]) -> list[str]:
        if kind == "attentions":
            return ["1", *rest]
        if rest and rest[0] in _SGM_RESNET:
            return ["0", *_SGM_RESNET[rest[0]].split("."), *rest[1:]]
        raise ValueError(f"no sgm name for {module}")

    if parts[0] == "down_blocks" and parts[2] in ("attentions", "resnets"):
        i, j = int(parts[1]), int(parts[3])
        return ".".join(["input_blocks", str(1 + i * (L + 1) + j), *inner(parts[2], parts[4:])])
    if parts[0] == "up_blocks" and parts[2] in ("attentions", "resnets"):
        i, j = int(parts[1]), int(parts[3])
        return ".".join(["output_blocks", str(i * (L + 1) + j), *inner(parts[2], parts[4:])])
    if parts[0] == "mid_block" and parts[1] in ("attentions", "resnets"):
        idx = 1 if parts[1] == "attentions" else (0 if parts[2] == "0" else 2)
        rest = parts[3:]
        if parts[1] == "resnets":
            rest = inner("resnets", rest)[1:]
        return ".".join(["middle_block", str(idx), *rest])
    raise ValueError(f"no sgm name for {module}")


def peft_to_kohya(state: dict[str, "torch.Tensor"], prefix: str, alpha: float,
                  rename: Any = None) -> dict[str, "torch.Tensor"]:
    """peft LoRA state dict (``<module>.lora_A.weight`` / ``lora_B``, adapter name removed, as
    ``peft.get_peft_model_state_dict`` returns it) -> kohya keys under ``prefix`` (``lora_unet`` or
    ``lora_te``). Tensors are kept as they are (dtype, shape); ``alpha`` becomes one 0-dim float32
    ``.alpha`` tensor per module; text-encoder modules are named from ``text_model.`` as in the
    original CLIP checkpoint; ``rename(module) -> module`` maps module paths first (SDXL UNet:
    :func:`diffusers_to_sgm_unet`). Raises ValueError for a key that is not a LoRA A/B weight."""
    import torch

    out: dict[str, torch.Tensor] = {}
    modules = set()
    for key, t in state.items():
        for peft_kind, kohya_kind in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight")):
            if key.endswith(peft_kind):
                module = key[: -len(peft_kind)]
                if rename is not None:
                    module = rename(module)
                if prefix.startswith(KOHYA_TE_PREFIX) and not module.startswith("text_model."):
                    # transformers 5 dropped CLIPTextModel's `text_model.` level; kohya, A1111 and
                    # ComfyUI name text-encoder layers from the original checkpoint, which has it.
                    module = "text_model." + module
                name = f"{prefix}_{module.replace('.', '_')}"
                out[f"{name}.{kohya_kind}"] = t.detach().contiguous()
                modules.add(name)
                break
        else:
            raise ValueError(f"not a LoRA A/B weight: {key} (DoRA and other variants are not exported)")
    for name in modules:
        if f"{name}.lora_down.weight" not in out or f"{name}.lora_up.weight" not in out:
            raise ValueError(f"{name}: lora_A and lora_B must both be present")
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def lora_state_dict(module: Any) -> dict[str, "torch.Tensor"]:
    """The ``default`` LoRA adapter's weights of a peft-injected module, keyed as
    ``peft.get_peft_model_state_dict`` keys them (``<module>.lora_A.weight``, adapter name removed)."""
    out = {}
    for name, p in module.named_parameters():
        if ".lora_A.default." in name or ".lora_B.default." in name:
            out[name.replace(".default.", ".")] = p.detach()
    return out


def _te_keys(te_state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    # diffusers' convention, which ComfyUI, A1111 and kohya's tools read too, names text-encoder
    # layers from CLIPTextModel's `text_model.` level (text_encoder.text_model.encoder.layers.N...).
    # transformers 5 dropped that level, so peft keys lack it; diffusers strips it again when
    # loading into a flat CLIPTextModel (loaders/lora_base.py), so the file loads both ways.
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in te_state.items()}


def save_diffusers_lora(path: Path, unet_state: dict[str, "torch.Tensor"], unet_config: dict[str, Any],
                        te_state: dict[str, "torch.Tensor"] | None = None,
                        te_config: dict[str, Any] | None = None,
                        te2_state: dict[str, "torch.Tensor"] | None = None,
                        te2_config: dict[str, Any] | None = None, *, sdxl: bool = False) -> Path:
    """Write a diffusers-format LoRA file from peft-keyed state dicts (:func:`lora_state_dict`) and
    their ``LoraConfig.to_dict()`` (stored as diffusers' adapter metadata, so rank and alpha load
    exactly). ``sdxl``: written by diffusers' SDXL writer, with ``te2_state`` (text_encoder_2)
    when the text encoders were trained. The file appears atomically."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # peft key names as they are: convert_state_dict_to_diffusers would rename only the attention
    # layers to the old ``.lora.down`` spelling, and diffusers then loads a mix of both spellings
    # incompletely (the attention part of a `transformer`/`all` LoRA was silently dropped).
    kwargs: dict[str, Any] = {"unet_lora_layers": unet_state, "unet_lora_adapter_metadata": dict(unet_config)}
    if te_state:
        kwargs["text_encoder_lora_layers"] = _te_keys(te_state)
        kwargs["text_encoder_lora_adapter_metadata"] = dict(te_config or {})
    if te2_state:
        kwargs["text_encoder_2_lora_layers"] = _te_keys(te2_state)
        kwargs["text_encoder_2_lora_adapter_metadata"] = dict(te2_config or te_config or {})
    writer = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    path = Path(path)
    # save_lora_weights writes straight to the name it is given; write beside, then rename, so a
    # crash never leaves a truncated LoRA where the daemon's rules point.
    with atomic_path(path) as tmp:
        writer.save_lora_weights(tmp.parent, weight_name=tmp.name, safe_serialization=True, **kwargs)
    return path


def save_kohya_lora(path: Path, unet_state: dict[str, "torch.Tensor"], alpha: float,
                    te_state: dict[str, "torch.Tensor"] | None = None,
                    metadata: dict[str, Any] | None = None, *,
                    te2_state: dict[str, "torch.Tensor"] | None = None,
                    sdxl_layers_per_block: int | None = None) -> Path:
    """Write the kohya/A1111 format (see the module docstring) from peft-keyed state dicts.
    ``metadata`` values are stringified (safetensors metadata is str -> str).

    SDXL (``sdxl_layers_per_block``: the UNet's ``layers_per_block``): UNet modules get their sgm
    names (:func:`diffusers_to_sgm_unet`), as kohya sd-scripts write SDXL LoRAs, and the text
    encoders the ``lora_te1_`` / ``lora_te2_`` prefixes."""
    from safetensors.torch import save_file

    sdxl = sdxl_layers_per_block is not None
    rename = (lambda m: diffusers_to_sgm_unet(m, sdxl_layers_per_block)) if sdxl else None
    tensors = peft_to_kohya(unet_state, KOHYA_UNET_PREFIX, alpha, rename)
    if te_state:
        tensors.update(peft_to_kohya(te_state, KOHYA_TE1_PREFIX if sdxl else KOHYA_TE_PREFIX, alpha))
    if te2_state:
        tensors.update(peft_to_kohya(te2_state, KOHYA_TE2_PREFIX, alpha))
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def kohya_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``ss_*`` keys A1111 / ComfyUI LoRA browsers read, from the run's manifest."""
    ds = manifest["dataset"]
    family = manifest["base_model"].get("family", "sd15")
    # kohya sd-scripts' own values for the base model
    version = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, "sd_v1")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": manifest["rank"],
        "ss_network_alpha": manifest["alpha"],
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "ss_output_name": manifest["name"],
        "ss_sd_model_name": manifest["base_model"].get("source", ""),
        "ss_resolution": f"({manifest['resolution']}, {manifest['resolution']})",
        "ss_num_train_images": ds["samples_per_epoch"],
        "ss_max_train_steps": manifest["steps"],
        "ss_learning_rate": manifest["learning_rate"],
        "ss_seed": manifest["seed"],
        "ss_tag_frequency": {"product-studio": {manifest["tag"]: ds["images"]}},
        "ss_dataset_hash": ds["sha256"],
        "ps_activation_tag": manifest["tag"],
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")


def lora_files_record(path: Path) -> dict[str, Any]:
    return {"file": Path(path).name, "sha256": file_sha256(Path(path)), "bytes": Path(path).stat().st_size}


def rule_snippet(lora_file: Path, class_name: str, tag: str, weight: float = 1.0, *,
                 class_is_guess: bool = False) -> str:
    """The rules-file YAML that enhances ``class_name`` products with this LoRA.

    Shape: ``rules: - match: {class: NAME} actions: - enhance: {loras: [{path, weight}], tag}``.
    The path is absolute so the snippet works in any rules file."""
    data = {"rules": [{
        "name": f"{class_name} in the {tag} style",
        "match": {"class": class_name},
        "actions": [{"enhance": {"loras": [{"path": str(Path(lora_file).resolve()), "weight": float(weight)}],
                                 "tag": tag}}],
    }]}
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=1000)
    if class_is_guess:
        text = f"# set `class` to the product class this style is for (classes: see conf/settings.yaml)\n{text}"
    return text
