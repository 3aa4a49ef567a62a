"""LoRA training on the ``base`` role (SD 1.x text-to-image) with diffusers components and peft.

The recipe is diffusers' ``train_text_to_image_lora.py`` with the kohya sd-scripts options shops
use: the frozen UNet, VAE and CLIP text encoder are loaded *fresh* from the base model's folder
(``registry.locate("base")``), never the registry's shared pipeline, so training cannot disturb a
warm ``enhance``. LoRA adapters (peft) go on the UNet (optionally the text encoder); they are the
only trainable parameters and stay float32 under mixed precision.

One step: encode the crop with the VAE (latents ``[B, 4, h/f, w/f]``, ``f`` the VAE factor),
add noise at a random timestep (optional noise offset), predict it with the UNet conditioned on the
caption, and take the MSE against the noise (or velocity, for v-prediction models). With a mask
the error is averaged over product pixels only (background weighted ``background_weight``);
optional min-SNR weighting per sample.

Reproducibility and resume: every random choice of a step (crop, flip, caption shuffle, VAE
sample, noise, timesteps) is drawn from one CPU ``torch.Generator``; the batch order of an epoch
depends only on (seed, epoch). A checkpoint stores the LoRA weights (safetensors), the optimizer,
LR-scheduler and grad-scaler state (``torch.save``, read back with ``weights_only=True``), the
generator and torch RNG states (safetensors) and the step position (JSON). Resuming therefore
continues the run exactly: the same batches, noise and updates as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from lora.config import TARGETS, TEXT_ENCODER_TARGETS, TrainConfig
from lora.dataset import TrainDataset, load_dataset
from pipeline.detect.detector import Detector
from pipeline.run.detect_run import resolve_classes
from pipeline.io.imageio import atomic_write_text, save_image
from lora.export import (kohya_metadata, lora_files_record, lora_state_dict, save_diffusers_lora,
    save_kohya_lora, write_manifest)
from pipeline import PIPELINE_VERSION
from pipeline.io.outputs import now_iso
from pipeline.models.families import family_of_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import Settings

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
MANIFEST_FORMAT = "product-studio.lora/1"


class TrainError(RuntimeError):
    """Training cannot start or continue (environment, checkpoint or masked-loss problem)."""


class MaskedLossError(TrainError, ValueError):
    """A masked loss with no product pixels to average over."""


class TrainDiverged(TrainError):
    """The loss became NaN or infinite."""


class TrainObserver:
    """Progress hooks (the CLI draws a rich progress bar from them). All are optional no-ops."""

    def begin(self, total_steps: int, start_step: int, info: dict[str, Any]) -> None: ...

    def step(self, step: int, loss: float, lr: float) -> None: ...

    def message(self, text: str) -> None: ...

    def end(self) -> None: ...


@dataclass
class TrainResult:
    lora_file: Path
    manifest_file: Path
    manifest: dict[str, Any]
    kohya_file: Path | None
    steps: int
    losses: list[float]  # mean loss of each optimizer step of this process (resumed steps excluded)
    resumed_from: int | None
    validation_images: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Loss


def diffusion_loss(pred: "torch.Tensor", target: "torch.Tensor", weights: "torch.Tensor | None" = None,
                   sample_weights: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Mean squared error of ``pred`` against ``target`` (both ``[B, C, h, w]``), as a scalar.

    ``weights``: ``[B, 1, h, w]`` non-negative per-pixel weights (the product mask at latent size,
    background at ``background_weight``); each sample's error is the weighted mean over its
    pixels, so a small product counts as much as a large one. Raises :class:`MaskedLossError` if a
    sample's weights sum to zero (an all-zero mask: nothing to learn from). ``sample_weights``:
    ``[B]`` (min-SNR). Computed in float32 whatever the inputs' dtype."""
    import torch

    err = (pred.float() - target.float()) ** 2
    if weights is None:
        per = err.mean(dim=(1, 2, 3))
    else:
        w = weights.float().expand(-1, err.shape[1], -1, -1)
        denom = w.sum(dim=(1, 2, 3))
        if bool((denom <= 0).any()):
            bad = [i for i, d in enumerate(denom.tolist()) if d <= 0]
            raise MaskedLossError(f"masked loss: sample(s) {bad} of the batch have an all-zero mask (no product "
                                  "pixels) and no background weight; there is nothing to average over")
        per = (err * w).sum(dim=(1, 2, 3)) / denom
    if sample_weights is not None:
        per = per * sample_weights.float().to(per.device)
    return per.mean() if per.numel() else torch.zeros((), device=err.device)


def min_snr_weights(scheduler: Any, timesteps: "torch.Tensor", gamma: float) -> "torch.Tensor":
    """Min-SNR-gamma weights ``[B]`` (Hang et al. 2023), as in diffusers' training examples."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    w = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return w / (snr + 1)
    return w / snr


# ------------------------------------------------------------------------------------------------
# Checkpoint files


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-NNNNNN`` with ``state.json``), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    out = []
    for p in checkpoint_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def auto_mask_fn(registry: "ModelRegistry", settings: "Settings", class_name: str,
                 save_dir: Path | None = None) -> Callable[[str, Any], np.ndarray | None]:
    """``mask_fn`` for :func:`lora.dataset.load_dataset`: the union of ``class_name`` detections
    (SAM + CLIP through :class:`pipeline.detect.detector.Detector`), saved as PNG under ``save_dir`` so the
    user can see what the loss focused on. None when the class is not found in an image."""
    detector = Detector(registry, settings.detect)
    classes = resolve_classes(settings, [class_name])

    def fn(rel: str, image: Any) -> np.ndarray | None:
        res = detector.detect(image, classes)
        masks = [d.mask for d in res.detections if d.label == class_name]
        if not masks:
            return None
        mask = np.logical_or.reduce(masks)
        if save_dir is not None:
            save_image(mask, save_dir / Path(rel).with_suffix(".png"))
        return mask

    return fn


# ------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One training run. ``prepare()`` checks and loads everything; ``train()`` runs and exports.

    ``registry`` supplies the base model's location, the device and (for ``--auto-mask``) the
    detector models; ``settings`` the detection settings and model provenance."""

    def __init__(self, cfg: TrainConfig, registry: "ModelRegistry", settings: "Settings | None" = None,
                 observer: TrainObserver | None = None):
        self.cfg = cfg
        self.registry = registry
        self.settings = settings if settings is not None else registry.settings
        self.obs = observer or TrainObserver()
        self.prepared = False
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed_from: int | None = None
        self.losses: list[float] = []
        self.validation_images: list[Path] = []
        self.saved_checkpoints: list[Path] = []
        self._val_pipe = None
        self._latent_cache: dict[int, tuple["torch.Tensor", "torch.Tensor"]] = {}
        self._log_fh = None

    # -------------------------------------------------------------------------------------------
    # set-up

    def _check_output_dir(self) -> None:
        cfg = self.cfg
        existing = list_checkpoints(cfg.checkpoint_dir)
        if cfg.resume:
            if not existing:
                raise TrainError(f"--resume: no checkpoint in {cfg.checkpoint_dir} (train without --resume to start)")
            return
        if existing or cfg.lora_file.exists():
            if not cfg.overwrite:
                raise TrainError(f"{cfg.output_dir} already holds a training run ({len(existing)} checkpoint(s)"
                                 f"{', ' + cfg.lora_file.name if cfg.lora_file.exists() else ''}); "
                                 "continue it with --resume, or start over with --overwrite")
            shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
            shutil.rmtree(cfg.output_dir / "validation", ignore_errors=True)
        # A fresh start (also after a run that died before its first checkpoint) gets a fresh log.
        (cfg.output_dir / "train-log.jsonl").unlink(missing_ok=True)

    def _precision(self) -> tuple[str, "torch.dtype"]:
        import torch

        dev = self.device
        mp = self.cfg.mixed_precision
        if mp == "auto":
            mp = "fp16" if dev.type == "cuda" else "no"
        if mp == "fp16" and dev.type != "cuda":
            raise TrainError(f"mixed precision fp16 needs a CUDA GPU (device is {dev}); use no or bf16")
        if mp == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainError("this GPU does not support bf16; use fp16")
        return mp, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]

    def prepare(self) -> "Trainer":
        """Validate the output folder and environment, load data and models, build the optimizer,
        and load the latest checkpoint when resuming. Raises TrainError / DatasetError /
        ModelLoadError with a clear message before any long work starts."""
        import torch

        cfg = self.cfg
        self._check_output_dir()
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = self.registry.runtime.device
        self.mixed_precision, self.weight_dtype = self._precision()
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise TrainError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
            if self.device.type != "cuda":
                raise TrainError("8-bit Adam (bitsandbytes) needs a CUDA GPU")
        base = self.registry.locate("base")
        if not base.is_dir() or not (base / "unet").is_dir():
            raise TrainError(f"the base model at {base} is not a diffusers folder (unet/, vae/, text_encoder/, ...); "
                             "LoRA training needs the diffusers layout of an SD 1.x, 2.x or SDXL text-to-image model")
        self.base_dir = base
        try:
            self.family = family_of_dir(base)[0]
        except (OSError, ValueError) as e:
            raise TrainError(f"the base model at {base}: cannot read model_index.json / unet/config.json ({e})") from None
        missing = [c for c in self.family.components if not (base / c).is_dir()]
        if missing:
            raise TrainError(f"the base model at {base} is {self.family.title} but lacks {', '.join(missing)}/")

        # Data first: a bad dataset should fail in seconds, before any model is loaded.
        mask_fn = None
        if cfg.auto_mask:
            self.obs.message(f"auto-mask: detecting '{cfg.auto_mask}' in every image (SAM + CLIP)")
            mask_fn = auto_mask_fn(self.registry, self.settings, cfg.auto_mask, cfg.output_dir / "auto-masks")
        self.dataset: TrainDataset = load_dataset(cfg, mask_fn)
        if cfg.auto_mask:
            # Detection models are done with; their memory belongs to training now.
            for role in ("clip", "sam"):
                self.registry.unload(role)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        self._load_models()
        self.batches_per_epoch = self.dataset.batches_per_epoch(cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self._build_optimizer()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.resume:
            self._load_checkpoint(list_checkpoints(cfg.checkpoint_dir)[-1][1])
        if cfg.cache_latents:
            self._cache_latents()
        self.prepared = True
        return self

    def _load_models(self) -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        cfg, loc = self.cfg, self.base_dir
        kw = dict(local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(loc, subfolder="tokenizer", **kw)
        self.text_encoder = CLIPTextModel.from_pretrained(loc, subfolder="text_encoder", **kw)
        # SDXL: the second text encoder (OpenCLIP bigG with projection) and its tokenizer; its
        # penultimate hidden states are concatenated with the first's and its pooled projection
        # is the UNet's added text embedding.
        self.tokenizer_2 = self.text_encoder_2 = None
        if self.family.two_text_encoders:
            from transformers import CLIPTextModelWithProjection

            self.tokenizer_2 = CLIPTokenizer.from_pretrained(loc, subfolder="tokenizer_2", **kw)
            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(loc, subfolder="text_encoder_2", **kw)
        self.vae = AutoencoderKL.from_pretrained(loc, subfolder="vae", **kw)
        self.unet = UNet2DConditionModel.from_pretrained(loc, subfolder="unet", **kw)
        self.noise_scheduler = DDPMScheduler.from_pretrained(loc, subfolder="scheduler", **kw)
        for m in (self.text_encoder, self.vae, self.unet, *self._text_encoders()[1:]):
            m.requires_grad_(False)
        dev, wdt = self.device, self.weight_dtype
        self.vae.to(dev, dtype=wdt).eval()
        for te in self._text_encoders():
            te.to(dev, dtype=wdt)
        self.unet.to(dev, dtype=wdt)
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

        # peft's Gaussian init of lora_A draws from the global RNG: seed it for a reproducible start.
        torch.manual_seed(cfg.seed)
        self.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.network_alpha, lora_dropout=cfg.dropout,
                                         init_lora_weights="gaussian", target_modules=list(TARGETS[cfg.targets])))
        self.te_lora_config = None
        if cfg.train_text_encoder:
            from peft import inject_adapter_in_model

            # peft directly, not transformers' add_adapter: that refuses peft older than it was
            # built for (transformers 5 wants 0.22), although the layers are the same and diffusers
            # loads the result back fine.
            self.te_lora_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.network_alpha, lora_dropout=cfg.dropout,
                                             init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS))
            for te in self._text_encoders():
                inject_adapter_in_model(self.te_lora_config, te, adapter_name="default")
        # Trainable LoRA weights stay float32 even when the frozen weights are fp16/bf16: fp16
        # Adam updates underflow.
        for m in self._trained_modules():
            for p in m.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in self._text_encoders():
                    # transformers 5 renamed it; non-reentrant so LoRA grads flow through frozen layers.
                    enable = (getattr(te, "activation_checkpointing_enable", None)
                              or te.gradient_checkpointing_enable)
                    enable({"use_reentrant": False})
        self.unet.train()
        for te in self._text_encoders():
            te.train(cfg.train_text_encoder)
        self.trainable = {f"unet.{n}": p for n, p in self.unet.named_parameters() if p.requires_grad}
        if cfg.train_text_encoder:
            for prefix, te in zip(("text_encoder", "text_encoder_2"), self._text_encoders()):
                self.trainable.update({f"{prefix}.{n}": p for n, p in te.named_parameters() if p.requires_grad})
        if not self.trainable:
            raise TrainError(f"no layer of the UNet matched the LoRA targets {TARGETS[cfg.targets]}")

    def _text_encoders(self) -> list[Any]:
        """The text encoders: one (SD 1.x/2.x) or two (SDXL)."""
        return [self.text_encoder] + ([self.text_encoder_2] if getattr(self, "text_encoder_2", None) is not None
                                      else [])

    def _trained_modules(self) -> list[Any]:
        return [self.unet] + (self._text_encoders() if self.cfg.train_text_encoder else [])

    def _build_optimizer(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        groups = [{"params": [p for n, p in self.trainable.items() if n.startswith("unet.")],
                   "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": [p for n, p in self.trainable.items() if n.startswith("text_encoder")],
                           "lr": cfg.text_encoder_lr or cfg.learning_rate})
        kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(groups, **kw)
        else:
            self.optimizer = torch.optim.AdamW(groups, **kw)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=self.total_steps, num_cycles=cfg.lr_cycles)
        self.scaler = torch.amp.GradScaler("cuda") if self.mixed_precision == "fp16" else None

    def _autocast(self):
        import torch

        if self.mixed_precision == "no":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def _cache_latents(self) -> None:
        import torch

        self.obs.message(f"caching latents of {len(self.dataset)} image(s)")
        with torch.no_grad():
            for i in range(len(self.dataset)):
                px = self.dataset.example(i, None)["pixels"][None].to(self.device, self.weight_dtype)
                dist = self.vae.encode(px).latent_dist
                self._latent_cache[i] = (dist.mean.float().cpu(), dist.std.float().cpu())

    # -------------------------------------------------------------------------------------------
    # one step

    def _encode_text(self, captions: list[str]) -> "torch.Tensor":
        """SD 1.x/2.x: the text encoder's last hidden states [B, 77, D]. SDXL: see :meth:`_encode_sdxl`."""
        import torch

        if self.text_encoder_2 is not None:
            return self._encode_sdxl(captions)[0]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        ctx = nullcontext() if self.cfg.train_text_encoder else torch.no_grad()
        with ctx:
            return self.text_encoder(ids)[0]

    def _encode_sdxl(self, captions: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """SDXL's text conditioning as its pipelines compute it: both encoders' penultimate hidden
        states concatenated ([B, 77, D1 + D2]) and text_encoder_2's pooled projection ([B, P])."""
        import torch

        ctx = nullcontext() if self.cfg.train_text_encoder else torch.no_grad()
        embeds, pooled = [], None
        with ctx:
            for tok, te in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
                out = te(ids, output_hidden_states=True)
                embeds.append(out.hidden_states[-2])
                pooled = out[0]  # text_encoder_2 (CLIPTextModelWithProjection): text_embeds
        return torch.cat(embeds, dim=-1), pooled

    def _predict(self, noisy: "torch.Tensor", t: "torch.Tensor", captions: list[str],
                 time_ids: "torch.Tensor | None") -> "torch.Tensor":
        """The UNet's prediction for ``noisy`` latents at timesteps ``t``. SDXL also gets its added
        conditioning: the pooled text embeds and ``time_ids`` [B, 6] (original size, crop
        top-left, target size, in pixels)."""
        if self.text_encoder_2 is None:
            return self.unet(noisy, t, self._encode_text(captions)).sample
        emb, pooled = self._encode_sdxl(captions)
        if time_ids is None:  # the whole image at the training size, uncropped
            h, w = noisy.shape[-2] * self.vae_factor, noisy.shape[-1] * self.vae_factor
            import torch

            time_ids = torch.tensor([[h, w, 0, 0, h, w]] * noisy.shape[0], dtype=torch.float32)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device, emb.dtype)}
        return self.unet(noisy, t, emb, added_cond_kwargs=added).sample

    def _latents(self, batch: dict[str, Any], gen: "torch.Generator") -> "torch.Tensor":
        import torch

        with torch.no_grad():
            if self._latent_cache:
                mean = torch.cat([self._latent_cache[i][0] for i in batch["indices"]])
                std = torch.cat([self._latent_cache[i][1] for i in batch["indices"]])
                lat = mean + std * torch.randn(mean.shape, generator=gen)
                lat = lat.to(self.device)
            else:
                px = batch["pixels"].to(self.device, self.weight_dtype)
                lat = self.vae.encode(px).latent_dist.sample(generator=gen)
        return lat.float() * self.vae_scale

    def batch_loss(self, batch: dict[str, Any], gen: "torch.Generator") -> "torch.Tensor":
        """The (masked, SNR-weighted) diffusion loss of one batch, with grad for the LoRA weights.

        ``batch`` is :meth:`TrainDataset.collate` output; ``gen`` (CPU) supplies the VAE sample,
        noise, noise offset and timesteps, in that order."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        lat = self._latents(batch, gen)
        b = lat.shape[0]
        noise = torch.randn(lat.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((b, lat.shape[1], 1, 1), generator=gen)
        t = torch.randint(cfg.min_timestep, cfg.max_timestep, (b,), generator=gen)
        noise, t = noise.to(self.device), t.to(self.device)
        noisy = self.noise_scheduler.add_noise(lat, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(lat, noise, t)
        else:
            target = noise
        with self._autocast():
            pred = self._predict(noisy, t, batch["captions"], batch.get("time_ids"))
        weights = None
        if batch.get("mask") is not None:
            m = F.interpolate(batch["mask"].to(self.device).float(), size=lat.shape[-2:], mode="area")
            weights = cfg.background_weight + (1.0 - cfg.background_weight) * m
        sw = min_snr_weights(self.noise_scheduler, t, cfg.snr_gamma) if cfg.snr_gamma else None
        return diffusion_loss(pred, target, weights, sw)

    def probe_loss(self, draws: int = 4, seed: int = 1234) -> float:
        """Loss on fixed noise and timesteps over every image (centre crop, full caption, VAE mean),
        without training or touching the run's RNG: a low-variance "is it learning" number."""
        import torch

        g = torch.Generator().manual_seed(seed)
        modules = self._trained_modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                for i in range(len(self.dataset)):
                    it = self.dataset.items[i]
                    x, y = it.crop_box("center", None)
                    bw, bh = it.bucket
                    px = torch.from_numpy(np.array(it.pixels[y:y + bh, x:x + bw])).permute(2, 0, 1)
                    px = (px.float() / 127.5 - 1.0)[None].to(self.device, self.weight_dtype)
                    lat = self.vae.encode(px).latent_dist.mean.float() * self.vae_scale
                    mask = None
                    if it.mask is not None:
                        mask = torch.from_numpy(np.array(it.mask[y:y + bh, x:x + bw]))[None, None]
                    for _ in range(draws):
                        noise = torch.randn(lat.shape, generator=g).to(self.device)
                        t = torch.randint(self.cfg.min_timestep, self.cfg.max_timestep, (1,), generator=g)
                        t = t.to(self.device)
                        with self._autocast():
                            pred = self._predict(self.noise_scheduler.add_noise(lat, noise, t), t, [it.caption],
                                                 None)
                        target = (self.noise_scheduler.get_velocity(lat, noise, t)
                                  if self.noise_scheduler.config.prediction_type == "v_prediction" else noise)
                        w = None
                        if mask is not None:
                            import torch.nn.functional as F

                            m = F.interpolate(mask.float().to(self.device), size=lat.shape[-2:], mode="area")
                            w = self.cfg.background_weight + (1.0 - self.cfg.background_weight) * m
                        total += float(diffusion_loss(pred, target, w))
                        n += 1
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return total / max(n, 1)

    # -------------------------------------------------------------------------------------------
    # checkpoints

    def _rng_tensors(self) -> dict[str, "torch.Tensor"]:
        import torch

        out = {"data_generator": self.gen.get_state(), "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-NNNNNN/`` atomically (built under a hidden name, then renamed);
        keep the newest ``keep_checkpoints``. Files: ``adapter.safetensors`` (trainable weights,
        for resume), ``lora.safetensors`` (diffusers format, usable as is), ``optimizer.pt``,
        ``rng.safetensors``, ``state.json`` (last)."""
        import torch
        from safetensors.torch import save_file

        cfg = self.cfg
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.global_step:06d}"
        final = cfg.checkpoint_dir / name
        tmp = cfg.checkpoint_dir / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in self.trainable.items()},
                  str(tmp / "adapter.safetensors"), metadata={"step": str(self.global_step)})
        self._save_diffusers(tmp / "lora.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None},
                   tmp / "optimizer.pt")
        save_file({k: v.contiguous().cpu() for k, v in self._rng_tensors().items()}, str(tmp / "rng.safetensors"))
        state = {"step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "total_steps": self.total_steps, "config": self.cfg.resume_fingerprint(),
                 "dataset_sha256": self.dataset.content_hash(), "recent_losses": self.losses[-100:],
                 "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.saved_checkpoints.append(final)
        for _, old in list_checkpoints(cfg.checkpoint_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        now = self.cfg.resume_fingerprint()
        diff = [f"{k}: checkpoint {state['config'].get(k)!r}, now {now[k]!r}"
                for k in now if state["config"].get(k) != now[k]]
        if diff:
            raise TrainError(f"cannot resume from {path}: options differ from the checkpoint's ("
                             + "; ".join(diff) + "); use the same options, or --overwrite to start over")
        if state["dataset_sha256"] != self.dataset.content_hash():
            raise TrainError(f"cannot resume from {path}: the dataset changed since the checkpoint (images, "
                             "captions, repeats or masks); use --overwrite to start over on the new data")
        weights = load_file(str(path / "adapter.safetensors"), device="cpu")
        if set(weights) != set(self.trainable):
            raise TrainError(f"{path}/adapter.safetensors does not match this LoRA's layers")
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        # weights_only: the optimizer file is data; never let it run code.
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        if self.scaler is not None and opt.get("scaler"):
            self.scaler.load_state_dict(opt["scaler"])
        rng = load_file(str(path / "rng.safetensors"), device="cpu")
        self.gen.set_state(rng["data_generator"])
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.global_step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.resumed_from = self.global_step
        if self.global_step >= self.total_steps:
            raise TrainError(f"the checkpoint at step {self.global_step} already reached the {self.total_steps} "
                             "steps asked for; raise --max-steps or --epochs to train further")
        self.obs.message(f"resumed from {path.name} (step {self.global_step}, epoch {self.epoch + 1})")

    # -------------------------------------------------------------------------------------------
    # validation

    def validate(self, label: str) -> list[Path]:
        """Render ``validation_images`` images of the validation prompt with the current LoRA into
        ``validation/LABEL-N.png``. Uses fixed seeds and leaves the training RNG untouched."""
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        cfg = self.cfg
        if not cfg.validation_prompt:
            return []
        if self._val_pipe is None:
            sched = DDIMScheduler.from_config(self.noise_scheduler.config)
            if self.text_encoder_2 is not None:
                from diffusers import StableDiffusionXLPipeline

                self._val_pipe = StableDiffusionXLPipeline(
                    vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                    tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=sched)
            else:
                self._val_pipe = StableDiffusionPipeline(
                    vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._val_pipe.set_progress_bar_config(disable=True)
        prompt = cfg.validation_prompt.replace("{tag}", cfg.tag)
        modules = self._trained_modules()
        modes = [m.training for m in modules]
        out = []
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            for m in modules:
                m.eval()
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
                for i in range(cfg.validation_images):
                    g = torch.Generator("cpu").manual_seed(cfg.seed + i)
                    img = self._val_pipe(prompt, num_inference_steps=cfg.validation_steps,
                                         guidance_scale=cfg.validation_guidance, generator=g,
                                         height=cfg.resolution, width=cfg.resolution).images[0]
                    out.append(save_image(img, cfg.output_dir / "validation" / f"{label}-{i}.png"))
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        self.validation_images.extend(out)
        self.obs.message(f"validation images: {', '.join(p.name for p in out)}")
        return out

    # -------------------------------------------------------------------------------------------
    # the loop

    def _optimizer_step(self) -> float:
        import torch

        params = list(self.trainable.values())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = float(self.lr_scheduler.get_last_lr()[0])
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _log(self, record: dict[str, Any]) -> None:
        if self._log_fh is None:
            self._log_fh = open(self.cfg.output_dir / "train-log.jsonl", "a", encoding="utf-8")
        self._log_fh.write(json.dumps(record) + "\n")
        self._log_fh.flush()

    def run_steps(self, until: int | None = None) -> None:
        """Train up to optimizer step ``until`` (default: the end). Checkpoints every
        ``save_every`` steps; validation after every ``validation_every``-th complete epoch."""
        cfg = self.cfg
        until = min(until or self.total_steps, self.total_steps)
        accum = cfg.grad_accum
        while self.global_step < until and self.epoch < self.num_epochs:
            epoch = self.epoch
            batches = self.dataset.epoch_batches(epoch, cfg.batch_size, cfg.seed)
            micro, group_losses = 0, []
            bi = self.batch_in_epoch
            while bi < len(batches) and self.global_step < until:
                batch = self.dataset.collate(batches[bi], self.gen)
                loss = self.batch_loss(batch, self.gen)
                if not math.isfinite(float(loss.detach())):
                    raise TrainDiverged(f"loss became {float(loss.detach())} at step {self.global_step + 1}; lower the "
                                     "learning rate or use --mixed-precision no/bf16")
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                group_losses.append(float(loss.detach()))
                micro += 1
                bi += 1
                last = bi == len(batches)
                if bi % accum == 0 or last:
                    lr = self._optimizer_step()
                    self.global_step += 1
                    step_loss = sum(group_losses) / len(group_losses)
                    self.losses.append(step_loss)
                    group_losses = []
                    self.epoch, self.batch_in_epoch = (epoch + 1, 0) if last else (epoch, bi)
                    self._log({"step": self.global_step, "epoch": epoch + 1, "loss": round(step_loss, 6),
                               "lr": lr})
                    self.obs.step(self.global_step, step_loss, lr)
                    if cfg.save_every and self.global_step % cfg.save_every == 0 \
                            and self.global_step < self.total_steps:
                        self.save_checkpoint()
            if self.batch_in_epoch == 0 and self.epoch == epoch + 1 and (epoch + 1) % cfg.validation_every == 0 \
                    and self.global_step < self.total_steps:
                self.validate(f"epoch-{epoch + 1:03d}")

    def train(self) -> TrainResult:
        """Run (or finish) the training, then export the LoRA, the manifest and a final checkpoint."""
        if not self.prepared:
            self.prepare()
        cfg = self.cfg
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = {"images": len(self.dataset), "samples_per_epoch": self.dataset.samples_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.num_epochs,
                "device": str(self.device), "mixed_precision": self.mixed_precision,
                "trainable_parameters": sum(p.numel() for p in self.trainable.values())}
        self.obs.begin(self.total_steps, self.global_step, info)
        try:
            self.run_steps()
            self.save_checkpoint()
            self.validate("final")
        finally:
            self.obs.end()
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None
        return self.export(seconds=time.perf_counter() - t0)

    # -------------------------------------------------------------------------------------------
    # export

    def lora_state(self) -> tuple[dict, dict, dict | None, dict | None]:
        """(UNet LoRA weights, its LoraConfig dict, text-encoder weights or None, its config or None);
        weights peft-keyed (``<module>.lora_A.weight``)."""
        te_sd = te_conf = None
        if self.cfg.train_text_encoder:
            te_sd, te_conf = lora_state_dict(self.text_encoder), self.te_lora_config.to_dict()
        return lora_state_dict(self.unet), self.unet.peft_config["default"].to_dict(), te_sd, te_conf

    def _save_diffusers(self, path: Path) -> Path:
        te2 = None
        if self.cfg.train_text_encoder and self.text_encoder_2 is not None:
            te2 = lora_state_dict(self.text_encoder_2)
        return save_diffusers_lora(path, *self.lora_state(), te2_state=te2,
                                   sdxl=self.text_encoder_2 is not None)

    def manifest(self, seconds: float | None = None) -> dict[str, Any]:
        cfg = self.cfg
        base = self.registry.provenance("base")
        base["path"] = str(self.base_dir)
        base["family"] = self.family.name
        masked = None
        if cfg.masked:
            masked = {"source": "auto_mask" if cfg.auto_mask else "mask_dir",
                      "class": cfg.auto_mask, "mask_dir": str(cfg.mask_dir) if cfg.mask_dir else None,
                      "background_weight": cfg.background_weight}
        recent = self.losses[-50:]
        return {
            "format": MANIFEST_FORMAT,
            "name": cfg.name,
            "tag": cfg.tag,
            "base_model": base,
            "rank": cfg.rank,
            "alpha": cfg.network_alpha,
            "dropout": cfg.dropout,
            "targets": cfg.targets,
            "target_modules": list(TARGETS[cfg.targets]),
            "text_encoder": cfg.train_text_encoder,
            "resolution": cfg.resolution,
            "buckets": cfg.buckets,
            "crop": cfg.crop,
            "flip": cfg.flip,
            "steps": self.global_step,
            "epochs": self.num_epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "learning_rate": cfg.learning_rate,
            "text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else None,
            "lr_scheduler": cfg.lr_scheduler,
            "lr_warmup_steps": cfg.lr_warmup_steps,
            "optimizer": cfg.optimizer,
            "mixed_precision": self.mixed_precision,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "seed": cfg.seed,
            "noise_offset": cfg.noise_offset,
            "snr_gamma": cfg.snr_gamma,
            "timesteps": [cfg.min_timestep, cfg.max_timestep],
            "masked_loss": masked,
            "dataset": self.dataset.describe(),
            "loss": {"first": self.losses[0] if self.losses else None,
                     "last_mean": sum(recent) / len(recent) if recent else None},
            "resumed_from": self.resumed_from,
            "seconds": round(seconds, 1) if seconds is not None else None,
            "pipeline_version": PIPELINE_VERSION,
            "created": now_iso(),
        }

    def export(self, seconds: float | None = None) -> TrainResult:
        """Write ``NAME.safetensors`` (diffusers), optionally ``NAME.kohya.safetensors``, then
        ``NAME.json`` (the manifest, last, with the files' SHA-256)."""
        cfg = self.cfg
        unet_sd, unet_conf, te_sd, te_conf = self.lora_state()
        self._save_diffusers(cfg.lora_file)
        man = self.manifest(seconds)
        man["files"] = {"diffusers": lora_files_record(cfg.lora_file)}
        kohya = None
        if cfg.export_kohya:
            sdxl = self.text_encoder_2 is not None
            te2 = lora_state_dict(self.text_encoder_2) if sdxl and cfg.train_text_encoder else None
            kohya = save_kohya_lora(cfg.kohya_file, unet_sd, cfg.network_alpha, te_sd, kohya_metadata(man),
                                    te2_state=te2,
                                    sdxl_layers_per_block=self.unet.config.layers_per_block if sdxl else None)
            man["files"]["kohya"] = lora_files_record(kohya)
        write_manifest(cfg.manifest_file, man)
        return TrainResult(cfg.lora_file, cfg.manifest_file, man, kohya, self.global_step, list(self.losses),
                           self.resumed_from, list(self.validation_images), list(self.saved_checkpoints))


def train_lora(cfg: TrainConfig, registry: "ModelRegistry", settings: "Settings | None" = None,
               observer: TrainObserver | None = None) -> TrainResult:
    """Prepare and run one training; see :class:`Trainer`."""
    return Trainer(cfg, registry, settings, observer).train()
