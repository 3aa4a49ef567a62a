"""Training options: one validated object, from a training file (``train-lora --train-config
train.yaml``, see :func:`load_train_config`), the CLI's flags (generated from this model's fields),
or code/tests.

The settings file (:mod:`pipeline.settings`) says *which* base model and device; everything about a
training run lives here, so one settings file serves every LoRA a shop trains. Names follow kohya
sd-scripts and diffusers' ``train_text_to_image_lora.py`` where they have one (``network_dim`` is
``rank``, ``network_alpha`` is ``alpha``, ``min_snr_gamma`` is ``snr_gamma``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import BadInput
from pipeline.settings import SettingsError, read_yaml_mapping, validation_problems, error_fields

# Which layers get LoRA. ``transformer`` is kohya's default LoRA for SD 1.x (every Linear and 1x1
# conv of the Transformer2D blocks); ``attn`` is diffusers' training example; ``all`` adds the
# ResNet convolutions and time-embedding projections (kohya "LoCon"), which learns fastest.
TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "all": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj"),
}
# CLIP text encoder: kohya and diffusers both train the attention and MLP linears.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# Changing one of these between a checkpoint and `--resume` would silently train something else.
RESUME_KEYS = ("rank", "alpha", "targets", "train_text_encoder", "resolution", "buckets", "bucket_step",
               "min_bucket", "max_bucket", "batch_size", "grad_accum", "seed", "tag", "optimizer")


class TrainConfigError(BadInput):
    """Invalid training options. ``problems``: ``[(option, reason)]``."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {v}" if k else v for k, v in problems))


class TrainConfig(BaseModel):
    """Every option of one LoRA training run. Paths are used as given (the CLI resolves them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- where
    dataset: Path = Field(description="folder of images + captions (kohya layout or metadata.jsonl)")
    output_dir: Path = Field(description="LoRA, manifest, checkpoints and validation images go here")
    name: str = Field("lora", description="file stem of the LoRA and its manifest")
    tag: str = Field(description="activation tag, prepended to every caption (e.g. ppzocketv2)")

    # -- data (kohya names in comments where different)
    resolution: int = Field(512, ge=16, le=4096, description="training side (square) or bucket area side")
    crop: Literal["center", "random"] = Field("center", description="crop to the training size: center or random")
    flip: bool = Field(False, description="random horizontal flip (kohya flip_aug)")
    buckets: bool = Field(False, description="aspect-ratio buckets (kohya enable_bucket)")
    bucket_step: int = Field(64, ge=8, description="bucket sides are multiples of this (bucket_reso_steps)")
    min_bucket: int = Field(256, ge=8, description="smallest bucket side (min_bucket_reso)")
    max_bucket: int = Field(1024, ge=8, description="largest bucket side (max_bucket_reso)")
    repeats: int = Field(1, ge=1, description="repeats for images not in an N_name folder")
    missing_caption: Literal["error", "tag"] = Field("error", description="image with no caption: error, or "
                                                     "train it with the activation tag alone")
    caption_extension: str = Field(".txt", description="caption file extension")
    shuffle_caption: bool = Field(False, description="shuffle comma-separated caption parts each step")
    keep_tokens: int = Field(1, ge=0, description="leading caption parts kept in place when shuffling "
                             "(1 keeps the activation tag first)")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="chance a caption is replaced by ''")
    cache_latents: bool = Field(False, description="encode every image once (needs --crop center, no --flip)")

    # -- network
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (kohya network_dim)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (network_alpha); None = rank (scale 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    targets: Literal["attn", "transformer", "all"] = Field(
        "transformer", description="layers with LoRA: attn | transformer (kohya default) | all (+ ResNet convs, LoCon)")
    train_text_encoder: bool = Field(False, description="also train a text-encoder LoRA")

    # -- optimisation
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="learning rate")
    text_encoder_lr: float | None = Field(None, gt=0, le=1.0, description="None = learning_rate")
    lr_scheduler: Literal[SCHEDULERS] = Field("constant", description="learning-rate schedule")  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(0, ge=0, description="warm-up steps of the schedule")
    lr_cycles: int = Field(1, ge=1, description="cosine_with_restarts cycles")
    epochs: int = Field(10, ge=1, le=100_000, description="passes over the dataset")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(1, ge=1, le=1024, description="images per micro-batch")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes and CUDA")
    weight_decay: float = Field(1e-2, ge=0.0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA, none on CPU")
    gradient_checkpointing: bool = Field(False, description="less memory, slower")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="random seed (data order, noise, LoRA init)")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="kohya noise_offset (typ. 0.05-0.1)")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting gamma (typ. 5.0)")
    min_timestep: int = Field(0, ge=0, le=1000, description="lowest training timestep")
    max_timestep: int = Field(1000, ge=1, le=1000, description="highest training timestep (exclusive)")

    # -- masked loss
    mask_dir: Path | None = Field(None, description="product masks, same stem as the images (white = product)")
    auto_mask: str | None = Field(None, description="detect this class (SAM + CLIP) for the masks")
    background_weight: float = Field(0.0, ge=0.0, le=1.0, description="loss weight of non-product pixels")

    # -- checkpoints
    save_every: int = Field(0, ge=0, description="checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="keep the last K checkpoints")
    resume: bool = Field(False, description="continue from the latest checkpoint in output_dir")
    overwrite: bool = Field(False, description="start over, deleting earlier checkpoints in output_dir")

    # -- validation
    validation_prompt: str | None = Field(None, description="'{tag}' is replaced by the activation tag")
    validation_images: int = Field(2, ge=1, le=64, description="images per validation round")
    validation_steps: int = Field(20, ge=1, le=500, description="sampling steps per validation image")
    validation_every: int = Field(1, ge=1, description="epochs between validation rounds")
    validation_guidance: float = Field(7.0, ge=0.0, le=50.0)

    # -- export
    export_kohya: bool = Field(False, description="also write NAME.kohya.safetensors (A1111 / ComfyUI)")

    # -- safety
    max_pixels: int = Field(64_000_000, gt=0, description="images with more pixels are refused")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[\w][\w.\-]*", v) or v.endswith(".safetensors"):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-' and '.' (no extension)")
        return v

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        v = v.strip()
        if not v or "," in v or "\n" in v:
            raise ValueError("the activation tag must be one non-empty phrase without commas")
        return v

    @field_validator("caption_extension")
    @classmethod
    def _ext(cls, v: str) -> str:
        if not re.fullmatch(r"\.[\w]+", v):
            raise ValueError(f"{v!r} is not a file extension (e.g. .txt or .caption)")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":
        problems = []
        if self.resolution % 8:
            problems.append("resolution must be a multiple of 8")
        if self.buckets:
            if self.bucket_step % 8:
                problems.append("bucket_step must be a multiple of 8")
            if not self.min_bucket <= self.resolution <= self.max_bucket:
                problems.append(f"resolution {self.resolution} must lie within min_bucket {self.min_bucket} "
                                f"and max_bucket {self.max_bucket}")
        if self.mask_dir is not None and self.auto_mask:
            problems.append("give mask_dir or auto_mask, not both")
        if self.min_timestep >= self.max_timestep:
            problems.append("min_timestep must be below max_timestep")
        if self.cache_latents and (self.crop == "random" or self.flip):
            problems.append("cache_latents needs a fixed crop: use crop=center and no flip")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ------------------------------------------------------------------------------------------
    @property
    def network_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def masked(self) -> bool:
        return self.mask_dir is not None or bool(self.auto_mask)

    @property
    def lora_file(self) -> Path:
        return self.output_dir / f"{self.name}.safetensors"

    @property
    def kohya_file(self) -> Path:
        return self.output_dir / f"{self.name}.kohya.safetensors"

    @property
    def manifest_file(self) -> Path:
        return self.output_dir / f"{self.name}.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def resume_fingerprint(self) -> dict:
        return {k: getattr(self, k) for k in RESUME_KEYS}

    @classmethod
    def build(cls, **kwargs) -> "TrainConfig":
        """Validate ``kwargs``; raise :class:`TrainConfigError` with one ``(option, reason)`` per problem."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise TrainConfigError(error_fields(e, "unknown option")) from None


def default_name(tag: str) -> str:
    """The LoRA file stem for an activation tag: its word characters, '.' and '-' (else ``lora``)."""
    return re.sub(r"[^\w.\-]+", "_", tag.strip()).strip("_.") or "lora"


# Fields holding paths: in a training file they resolve against the file's folder.
PATH_FIELDS = ("dataset", "output_dir", "mask_dir")


def load_train_config(file: Path | None, overrides: dict, *, loras_root: Path, max_pixels: int,
                      flag_names: dict[str, str] | None = None) -> TrainConfig:
    """The options of one run: ``file`` (a YAML mapping of :class:`TrainConfig` fields; None: no
    file), then ``overrides`` (the flags given; None values are not given) on top. ``name``
    defaults to the tag's stem and ``output_dir`` to ``loras_root / name``; ``max_pixels`` comes
    from the settings unless the file sets it.

    Raises :class:`SettingsError` naming the file, line and field for a bad file (or a bad flag
    given with one, named by ``flag_names[field]``), :class:`TrainConfigError` with one
    ``(field, reason)`` per problem when there is no file."""
    data: dict = {}
    text = ""
    if file is not None:
        data, text = read_yaml_mapping(file)
        for k in PATH_FIELDS:
            v = data.get(k)
            if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
                data[k] = (file.parent / Path(v).expanduser()).resolve()
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {"max_pixels": max_pixels, **data, **given}
    if isinstance(merged.get("tag"), str):
        merged.setdefault("name", default_name(merged["tag"]))
        if isinstance(merged["name"], str):
            merged.setdefault("output_dir", loras_root / merged["name"])
    try:
        return TrainConfig(**merged)
    except ValidationError as e:
        if file is None:
            raise TrainConfigError(error_fields(e, "unknown option")) from None
        problems = []
        for field, reason, line in validation_problems(e, text):
            top = field.split(".")[0]
            if top in given:  # a flag's fault, not the file's
                problems.append((f"{(flag_names or {}).get(top, top)} (flag)", reason, None))
            else:
                problems.append((field, reason, line))
        raise SettingsError(file, problems) from None
