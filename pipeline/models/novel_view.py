"""Novel-view synthesis (Zero-1-to-3) from the components of the Zero123 diffusers layout.

:class:`NovelViewPipeline` runs the model exactly as the reference does (cvlab-columbia/zero123
``gradio_new.py`` ``sample_model`` and the diffusers community ``pipeline_zero1to3.py``):

* **Pose** (:func:`pose_embedding`): the *relative* camera change from the input view to the
  wanted one, ``T = [polar in radians, sin(azimuth), cos(azimuth), radius]``, shape ``[B, 1, 4]``.
  Reference sign conventions (its demo's presets): polar ``+`` moves the camera **down** (view
  from below), ``-`` **up** (``-90`` = view from above); azimuth ``+`` moves the camera to the
  **right**, ``-`` to the left, ``180`` = from behind; radius ``+`` moves the camera **farther**.
  In training the azimuth delta is taken modulo 360 degrees; sin/cos make -90 and 270 the same.
* **Image conditioning**: the CLIP image embedding of the input view (``image_encoder``
  ``image_embeds``, ``[B, 1, D]``) concatenated with ``T`` -> ``cc_projection`` -> the UNet's
  cross-attention states ``[B, 1, cross_dim]``. The input view's VAE latents (the latent
  distribution's *mode*, **not** multiplied by the VAE scaling factor, as the reference) are
  concatenated with the noisy latents along channels: 4 + 4 = the UNet's 8 input channels.
* **Classifier-free guidance**: the unconditional branch gets zeros for both the projected
  embedding and the image latents; ``eps = eps_u + guidance * (eps_c - eps_u)``, batch order
  ``[uncond, cond]``. Guidance is on whenever ``guidance != 1`` (as the reference's ``scale != 1``).
* **Sampler**: DDIM (a fresh :class:`~diffusers.DDIMScheduler` per call from the layout's
  scheduler config, so concurrent calls never share timestep state), ``eta`` as given (the
  reference demo uses 1.0). Noise comes from a CPU ``torch.Generator`` seeded per call, so a seed
  gives the same result on every device (up to kernel numerics).

The CLIP input is prepared as the reference prepares it (OpenAI's preprocessing, not
``CLIPImageProcessor``'s): the ``[-1, 1]`` view resized bicubically (``align_corners=True``, no
antialias) to the image encoder's input size, mapped to ``[0, 1]`` and normalised with the
feature extractor's mean/std (only its statistics are read).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.models.novel_view_layout import COMPONENTS, write_model_index
from pipeline.models.pose import AZIMUTH_LIMIT, POLAR_LIMIT, RADIUS_LIMIT, check_pose  # noqa: F401 - re-exported

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import NovelViewComponents

__all__ = ["AZIMUTH_LIMIT", "POLAR_LIMIT", "RADIUS_LIMIT", "NovelViewPipeline", "check_pose", "pose_embedding"]

# The ranges of the reference demo's sliders; beyond them the model was never asked anything.


def _as_list(v: float | Sequence[float]) -> list[float]:
    if isinstance(v, torch.Tensor):
        return [float(x) for x in v.reshape(-1).tolist()]
    if isinstance(v, (list, tuple, np.ndarray)):
        return [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)]
    return [float(v)]


def pose_embedding(polar_deg: float | Sequence[float], azimuth_deg: float | Sequence[float],
                   radius: float | Sequence[float] = 0.0, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Zero123's pose conditioning: ``[B, 1, 4]`` = ``[radians(polar), sin(radians(azimuth)),
    cos(radians(azimuth)), radius]`` per batch item.

    Arguments are the relative camera change in degrees (polar, azimuth) and relative distance
    (radius), scalars or equal-length sequences (a scalar is broadcast). Computed in float64 and
    cast to ``dtype`` so hand-computed values match to the last bit of ``dtype``.
    """
    p, a, r = _as_list(polar_deg), _as_list(azimuth_deg), _as_list(radius)
    n = max(len(p), len(a), len(r))
    for name, v in (("polar", p), ("azimuth", a), ("radius", r)):
        if len(v) not in (1, n):
            raise ValueError(f"pose_embedding: {name} has {len(v)} values, expected 1 or {n}")
    p, a, r = (v * n if len(v) == 1 else v for v in (p, a, r))
    pol = torch.deg2rad(torch.tensor(p, dtype=torch.float64))
    az = torch.deg2rad(torch.tensor(a, dtype=torch.float64))
    t = torch.stack([pol, torch.sin(az), torch.cos(az), torch.tensor(r, dtype=torch.float64)], dim=-1)
    return t[:, None, :].to(device=device, dtype=dtype)


def _module_dtype(m: torch.nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def _module_device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device


class NovelViewPipeline:
    """Zero-1-to-3 inference on the six components of the Zero123 diffusers layout.

    Not a ``DiffusionPipeline`` subclass: the registry owns loading, device and dtype; this class
    only runs the components where they already are.
    """

    def __init__(self, vae: Any, image_encoder: Any, unet: Any, scheduler: Any, feature_extractor: Any,
                 cc_projection: Any):
        self.vae = vae
        self.image_encoder = image_encoder
        self.unet = unet
        self.scheduler = scheduler
        self.feature_extractor = feature_extractor
        self.cc_projection = cc_projection
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise ValueError(f"novel-view unet takes {unet.config.in_channels} channels; the Zero123 layout needs "
                             f"{2 * vae.config.latent_channels} (noisy latents + input-view latents)")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_components(cls, components: "NovelViewComponents") -> "NovelViewPipeline":
        """From the registry's ``get("novel_view")`` bundle (no copies; shares the modules)."""
        return cls(**{name: getattr(components, name) for name in COMPONENTS})

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "NovelViewPipeline":
        """Load a folder in the Zero123 layout directly (the registry is the usual loader).

        Raises ValueError naming every missing component subfolder."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from pipeline.models.novel_view_layout import CCProjection

        folder = Path(folder)
        missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise ValueError(f"{folder} is not a Zero123 layout: missing {', '.join(c + '/' for c in missing)}")
        kw = dict(local_files_only=True)
        pipe = cls(
            vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, **kw),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", dtype=dtype, **kw),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype, **kw),
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler", **kw),
            feature_extractor=CLIPImageProcessor.from_pretrained(folder / "feature_extractor", **kw),
            cc_projection=CCProjection.from_pretrained(folder / "cc_projection", dtype=dtype, **kw),
        )
        for m in pipe.modules():
            m.to(device).eval()
        return pipe

    def modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.image_encoder, self.unet, self.cc_projection]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the Zero123 diffusers layout (component subfolders + ``model_index.json``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("vae", "unet", "cc_projection"):
            getattr(self, name).save_pretrained(folder / name, safe_serialization=True)
        self.image_encoder.save_pretrained(folder / "image_encoder")
        self.feature_extractor.save_pretrained(folder / "feature_extractor")
        self.scheduler.save_pretrained(folder / "scheduler")
        write_model_index(folder)
        return folder

    # ------------------------------------------------------------------------------------------
    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @staticmethod
    def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
        """PIL image -> ``[1, 3, size, size]`` float32 in [-1, 1], RGB order (Lanczos resize if needed)."""
        im = image.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()

    def _clip_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> CLIP pixel values (the reference's OpenAI preprocessing)."""
        import torch.nn.functional as F

        fe = self.feature_extractor
        # The encoder's own input size (224 for the CLIP ViT-L/14 of the real checkpoints).
        n = int(self.image_encoder.config.image_size)
        y = F.interpolate(x.float(), size=(n, n), mode="bicubic", align_corners=True, antialias=False)
        y = (y + 1.0) / 2.0
        mean = torch.tensor(fe.image_mean, dtype=y.dtype, device=y.device)[None, :, None, None]
        std = torch.tensor(fe.image_std, dtype=y.dtype, device=y.device)[None, :, None, None]
        return (y - mean) / std

    @torch.no_grad()
    def conditioning(self, image: torch.Tensor, pose: torch.Tensor, *,
                     guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's two conditioning inputs for one input view.

        ``image``: ``[1, 3, H, W]`` float in [-1, 1]; ``pose``: ``[1, 1, 4]`` (:func:`pose_embedding`).
        Returns ``(encoder_hidden_states [B, 1, cross_dim], image_latents [B, 4, H/f, W/f])`` with
        ``B = 2`` (zeros first: the unconditional half) when guidance is on, else ``B = 1``.
        """
        enc_dev, enc_dt = _module_device(self.image_encoder), _module_dtype(self.image_encoder)
        emb = self.image_encoder(pixel_values=self._clip_input(image).to(enc_dev, enc_dt)).image_embeds
        cc_dev, cc_dt = _module_device(self.cc_projection), _module_dtype(self.cc_projection)
        emb = emb.to(cc_dev, cc_dt)[:, None, :]
        cond = self.cc_projection(torch.cat([emb, pose.to(cc_dev, cc_dt)], dim=-1))
        vae_dev, vae_dt = _module_device(self.vae), _module_dtype(self.vae)
        img_lat = self.vae.encode(image.to(vae_dev, vae_dt)).latent_dist.mode()
        if guidance != 1.0:
            cond = torch.cat([torch.zeros_like(cond), cond])
            img_lat = torch.cat([torch.zeros_like(img_lat), img_lat])
        return cond, img_lat

    @torch.no_grad()
    def __call__(self, image: Image.Image, polar: float, azimuth: float, radius: float = 0.0, *, steps: int = 75,
                 guidance: float = 3.0, eta: float = 1.0, seed: int = 0, size: int | None = None) -> Image.Image:
        """Generate the view after the relative camera change (``polar``, ``azimuth`` in degrees,
        ``radius`` relative distance; signs as in the module docstring).

        ``image``: PIL, the object centred on white (RGB; other modes converted), resized to
        ``size`` x ``size`` (default: the UNet's sample size x the VAE factor; must be a multiple of
        8 and of the VAE factor). Returns PIL ``"RGB"`` uint8 of ``size`` x ``size``.
        """
        from diffusers import DDIMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        size = int(size or self.default_size)
        if size % 8 or size % self.vae_scale_factor:
            raise ValueError(f"novel-view size {size} must be a multiple of 8 and of the VAE factor "
                             f"{self.vae_scale_factor}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        x = self.image_to_tensor(image, size)
        pose = pose_embedding(polar, azimuth, radius)
        cond, img_lat = self.conditioning(x, pose, guidance=guidance)
        cfg = cond.shape[0] == 2

        unet_dev, unet_dt = _module_device(self.unet), _module_dtype(self.unet)
        cond, img_lat = cond.to(unet_dev, unet_dt), img_lat.to(unet_dev, unet_dt)
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=unet_dev)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        lat_ch = self.vae.config.latent_channels
        f = self.vae_scale_factor
        latents = randn_tensor((1, lat_ch, size // f, size // f), generator=gen, device=unet_dev, dtype=unet_dt)
        latents = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = torch.cat([sched.scale_model_input(inp, t), img_lat], dim=1)
            eps = self.unet(inp, t, encoder_hidden_states=cond).sample
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents, eta=eta, generator=gen).prev_sample

        vae_dev, vae_dt = _module_device(self.vae), _module_dtype(self.vae)
        out = self.vae.decode(latents.to(vae_dev, vae_dt) / self.vae.config.scaling_factor).sample
        out = ((out.float() + 1.0) / 2.0).clamp(0.0, 1.0)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.rint(out * 255.0).astype(np.uint8), "RGB")
