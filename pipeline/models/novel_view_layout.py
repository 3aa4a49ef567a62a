"""The Zero123 diffusers layout (as published for kxic/zero123-xl) and its one custom module.

Layout of a novel-view model folder::

    model_index.json          _class_name Zero1to3StableDiffusionPipeline
    unet/                     UNet2DConditionModel, in_channels 8 (noisy latents + input-view latents)
    vae/                      AutoencoderKL
    image_encoder/            transformers CLIPVisionModelWithProjection
    feature_extractor/        CLIPImageProcessor
    scheduler/                DDIMScheduler
    cc_projection/            CCProjection: config.json + weights (projection.weight / projection.bias)

``cc_projection`` maps the CLIP image embedding concatenated with the 4 pose numbers
(polar in radians, sin(azimuth), cos(azimuth), radius) to the UNet's cross-attention width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

COMPONENTS = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor", "cc_projection")


class CCProjection(ModelMixin, ConfigMixin):
    """Linear map ``[B, N, in_channel] -> [B, N, out_channel]`` (float; in = CLIP proj dim + 4)."""

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768):
        super().__init__()
        self.projection = torch.nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


def write_model_index(folder: Path) -> None:
    """model_index.json as the published Zero123 diffusers checkpoints carry it."""
    index = {
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "_diffusers_version": "0.20.0",
        "cc_projection": ["pipeline_zero1to3", "CCProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
