"""Typed settings: the one place the YAML settings file becomes Python objects.

The file is ``conf/settings.yaml`` unless ``--config PATH`` or ``$PRODUCT_STUDIO_CONFIG`` names
another. Relative paths in the file are resolved against ``root``, which itself is relative to the
folder holding the file (``conf/settings.yaml`` says ``root: ..`` so paths read from the repo top).

A bad file raises :class:`SettingsError` naming the file, the field (with its YAML line where it can
be found) and the reason. Library code raises; only the CLI turns that into an exit code.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from pipeline.errors import BadInput, LoraError

# LoRA weights beyond this are mistakes (a typo such as 08 for 0.8), not styles.
MAX_LORA_WEIGHT = 10.0
# A weight is the text after the last ':' only when it is a plain decimal number, so Windows drive
# letters ("C:\\loras\\x.safetensors") and other colons stay part of the path.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def split_spec(text: str) -> tuple[str, float]:
    """``"FILE[:WEIGHT]"`` -> ``(FILE, WEIGHT)``; the weight defaults to 1.0.

    The weight is the part after the **last** colon, and only when it parses as a decimal number
    (``0.8``, ``-1``, ``1e-1``); otherwise the whole text is the file name. Raises
    :class:`LoraError` for an empty spec or a weight outside ``[-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT]``.
    """
    if not isinstance(text, (str, os.PathLike)):
        raise LoraError(f"a LoRA is given as 'FILE' or 'FILE:WEIGHT', got {text!r}")
    s = os.fspath(text).strip()
    head, sep, tail = s.rpartition(":")
    if sep and _NUMBER.fullmatch(tail.strip()):
        path, weight = head.strip(), float(tail)
    else:
        path, weight = s, 1.0
    if not path:
        raise LoraError(f"LoRA spec {text!r} names no file (expected FILE or FILE:WEIGHT)")
    if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
        raise LoraError(f"LoRA {path}: weight {weight:g} is outside -{MAX_LORA_WEIGHT:g} .. {MAX_LORA_WEIGHT:g}")
    return path, weight


def split_entry(item: Any) -> tuple[str, float]:
    """A LoRA entry as settings, rules or options give it -> ``(FILE, WEIGHT)``: the text
    ``"FILE[:WEIGHT]"`` (see :func:`split_spec`) or a mapping ``{path: FILE, weight: NUMBER}``
    (weight optional, default 1.0). Raises :class:`LoraError`."""
    if isinstance(item, dict):
        extra = set(item) - {"path", "weight"}
        if "path" not in item or extra:
            raise LoraError(f"a LoRA mapping holds 'path' and optionally 'weight', got {item!r}")
        w = item.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise LoraError(f"LoRA {item['path']}: weight must be a number, got {w!r}")
        path = os.fspath(item["path"]).strip()
        if not path:
            raise LoraError(f"LoRA mapping {item!r} names no file")
        if not math.isfinite(w) or abs(w) > MAX_LORA_WEIGHT:
            raise LoraError(f"LoRA {path}: weight {w:g} is outside -{MAX_LORA_WEIGHT:g} .. {MAX_LORA_WEIGHT:g}")
        return path, float(w)
    return split_spec(item)


ENV_CONFIG = "PRODUCT_STUDIO_CONFIG"
DEFAULT_CONFIG = Path("conf") / "settings.yaml"

ROLES: tuple[str, ...] = (
    "clip",
    "sam",
    "base",
    "inpaint",
    "inpaint_fill",
    "controlnet_depth",
    "depth",
    "novel_view",
    "upscaler",
    "captioner",
    "matting",
    "lcm_lora",
    "tcd_lora",
    "hyper_lora",
    "grounding",
    "clipseg",
    "sam3",
)


class SettingsError(BadInput):
    """A settings (or rules) file that cannot be used.

    ``problems`` is a list of ``(field, reason, line)``; ``line`` is 1-based or None.
    """

    def __init__(self, file: str | os.PathLike | None, problems: list[tuple[str, str, int | None]]):
        self.file = str(file) if file is not None else "<defaults>"
        self.problems = problems
        super().__init__(self.format())

    def __reduce__(self) -> tuple:
        # Picklable with its own arguments: it may come back from a Ray actor.
        return (type(self), (None if self.file == "<defaults>" else self.file, self.problems))

    def format(self) -> str:
        lines = [f"invalid configuration in {self.file}:"]
        for field, reason, line in self.problems:
            where = f"{self.file}:{line}" if line else self.file
            lines.append(f"  {where}: {field or '<top level>'}: {reason}")
        return "\n".join(lines)


class _Strict(BaseModel):
    # A typo in a settings key must be an error, not a silently ignored field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(_Strict):
    """Where one model role comes from: a Hub repo (+ revision) or a local directory / file."""

    repo: str | None = Field(None, description="Hugging Face Hub repo id, e.g. openai/clip-vit-base-patch32")
    revision: str | None = Field(None, description="branch, tag or commit of `repo` (pin a commit for reproducibility)")
    filename: str | None = Field(None, description="single checkpoint file inside `repo` (SAM .pth/.safetensors)")
    path: Path | None = Field(None, description="local directory (diffusers/transformers layout) or checkpoint file")
    sha256: str | None = Field(None, description="SHA-256 of a single-file checkpoint (`filename` or a file `path`); "
                               "checked before loading, a mismatch refuses the file")
    model_type: str | None = Field(None, description="SAM only: vit_b | vit_l | vit_h | auto (inferred from the weights)")
    licence: str = Field("", description="licence note shown by `models list` and written into records")
    commercial: bool | None = Field(None, description="False for weights under a non-commercial licence (refused "
                                    "when `commercial_use: true`); True if cleared; None = not known")

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", v):
            raise ValueError(f"{v!r} is not a Hub repo id (expected 'owner/name')")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError(f"{v!r} is not a SHA-256 (64 hex digits)")
        return None if v is None else v.lower()

    @field_validator("model_type")
    @classmethod
    def _sam_type(cls, v: str | None) -> str | None:
        if v is not None and v not in {"auto", "vit_b", "vit_l", "vit_h"}:
            raise ValueError(f"{v!r} is not a SAM model type (vit_b, vit_l, vit_h or auto)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of `repo` (Hub id) or `path` (local directory or file)")
        if self.path is not None and (self.revision or self.filename):
            raise ValueError("`revision` and `filename` only apply to a `repo` source")
        return self

    def describe(self) -> str:
        if self.repo:
            s = self.repo + (f"/{self.filename}" if self.filename else "")
            return s + (f"@{self.revision}" if self.revision else "")
        return str(self.path)


# Pinned commits of the default Hub sources whose bytes are known (the SAM checkpoint's SHA-256 is
# checked by `models verify`, see pipeline.models.hub.KNOWN_SHA256). zero123-xl's main holds pickled .bin
# weights only (loaded weights-only); its refs/pr/1 is a safetensors copy.
SAM_REVISION = "7790786db131bcdc639f24a915d9f2c331d843ee"
ZERO123_XL_REVISION = "7d8aec2223b93e84eb26893d1e732e013523474b"


class ModelsSettings(_Strict):
    """One entry per model role. Defaults are the real checkpoints (never fetched in tests)."""

    clip: ModelSource = ModelSource(repo="openai/clip-vit-base-patch32", licence="MIT")
    sam: ModelSource = ModelSource(
        repo="ybelkada/segment-anything",
        revision=SAM_REVISION,
        filename="checkpoints/sam_vit_b_01ec64.pth",
        model_type="vit_b",
        licence="Apache-2.0",
    )
    base: ModelSource = ModelSource(
        repo="stable-diffusion-v1-5/stable-diffusion-v1-5", licence="CreativeML OpenRAIL-M"
    )
    inpaint: ModelSource = ModelSource(
        repo="stable-diffusion-v1-5/stable-diffusion-inpainting", licence="CreativeML OpenRAIL-M"
    )
    # LaMa ("big-lama", Apache-2.0) as the TorchScript file IOPaint loads with torch.jit.load. The
    # canonical copy is IOPaint's release asset
    # https://github.com/Sanster/models/releases/download/add_big_lama/big-lama.pt (download it and
    # set `path:` to use it); the default is a Hub mirror of the same file. The SHA-256 is the
    # canonical file's (205669692 bytes), so a mirror serving other bytes is refused at load.
    inpaint_fill: ModelSource = ModelSource(
        repo="fashn-ai/LaMa", filename="big-lama.pt",
        sha256="344c77bbcb158f17dd143070d1e789f38a66c04202311ae3a258ef66667a9ea9", licence="Apache-2.0",
    )
    controlnet_depth: ModelSource = ModelSource(
        repo="lllyasviel/control_v11f1p_sd15_depth", licence="CreativeML OpenRAIL-M"
    )
    depth: ModelSource = ModelSource(repo="depth-anything/Depth-Anything-V2-Small-hf", licence="Apache-2.0")
    novel_view: ModelSource = ModelSource(
        repo="kxic/zero123-xl",
        revision=ZERO123_XL_REVISION,
        licence="check before commercial use: Zero123 weights derive from SD image-variations "
        "(CreativeML OpenRAIL-M) trained on Objaverse; some novel-view weights are non-commercial",
    )
    upscaler: ModelSource = ModelSource(repo="caidas/swin2SR-classical-sr-x4-64", licence="Apache-2.0")
    captioner: ModelSource = ModelSource(repo="Salesforce/blip-image-captioning-base", licence="BSD-3-Clause")
    # ViTMatte (optional: only `background.matte: vitmatte` loads it). Licence: apache-2.0 on the
    # model card (https://huggingface.co/hustvl/vitmatte-small-composition-1k); the upstream code
    # (github.com/hustvl/ViTMatte) is MIT. Trained on Composition-1k.
    matting: ModelSource = ModelSource(repo="hustvl/vitmatte-small-composition-1k", licence="Apache-2.0")
    # Few-step acceleration LoRAs for SD 1.5 (pipeline.models.samplers); licences from their model cards.
    lcm_lora: ModelSource = ModelSource(repo="latent-consistency/lcm-lora-sdv1-5",
                                        filename="pytorch_lora_weights.safetensors", licence="openrail++")
    tcd_lora: ModelSource = ModelSource(repo="h1t/TCD-SD15-LoRA", filename="pytorch_lora_weights.safetensors",
                                        licence="MIT")
    hyper_lora: ModelSource = ModelSource(repo="ByteDance/Hyper-SD", filename="Hyper-SD15-8steps-lora.safetensors",
                                          licence="openrail++")
    # Detection front-ends (detect.proposals: grounded | clipseg | sam3), loaded only by their mode.
    # grounding: any transformers zero-shot object detector (OWLv2, Grounding DINO, MM-Grounding-DINO);
    # e.g. IDEA-Research/grounding-dino-tiny (Apache-2.0) works the same way.
    grounding: ModelSource = ModelSource(repo="google/owlv2-base-patch16-ensemble", licence="Apache-2.0")
    clipseg: ModelSource = ModelSource(repo="CIDAS/clipseg-rd64-refined", licence="Apache-2.0")
    # SAM 3 (gated repo): Meta's custom "SAM License" (2025-11-19), not an open-source licence. It grants
    # use incl. commercial, with attribution, prohibited end uses and trade-control terms: review it
    # before commercial use (set commercial: false to have `commercial_use: true` refuse it).
    sam3: ModelSource = ModelSource(repo="facebook/sam3", licence="SAM License (Meta, custom; review before "
                                    "commercial use)")

    def source(self, role: str) -> ModelSource:
        if role not in ROLES:
            raise KeyError(f"unknown model role {role!r} (roles: {', '.join(ROLES)})")
        return getattr(self, role)


class PathsSettings(_Strict):
    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    ledger: Path = Path("outbox/.ledger.sqlite3")
    rules: Path = Path("conf/rules.yaml")
    # Converted checkpoints (SAM .pth -> safetensors) live here, outside the read-only HF cache.
    model_cache: Path = Path("~/.cache/product-studio")
    # What `models pull` fetched (role, repo, resolved commit, files with size and SHA-256); later
    # pulls and loads use it, so every machine with this file runs the same bytes.
    models_lock: Path = Path("conf/models.lock")


SamplerName = Literal["default", "lcm", "tcd", "hyper"]
SAMPLER_HELP = ("default: the section's steps and guidance; lcm, tcd, hyper: a few-step acceleration LoRA and "
                "its scheduler, steps and guidance from the `samplers` section")


class FewStepSampler(_Strict):
    """One few-step sampler's settings (:mod:`pipeline.models.samplers`)."""

    steps: int = Field(4, ge=1, le=100)
    guidance: float = Field(1.0, ge=0.0, le=50.0, description="<= 1 runs one UNet pass per step (no CFG)")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="scheduler eta (TCD's gamma); None: not passed")
    lora_weight: float = Field(1.0, ge=-10.0, le=10.0, description="adapter weight of the acceleration LoRA")


class SamplersSettings(_Strict):
    """Steps, guidance, eta and LoRA weight of each few-step sampler, from the model cards:
    LCM-LoRA 4 steps at guidance 1 (card: 2-8 steps, guidance 0-2); TCD 4 steps at guidance 0,
    eta 0.3; Hyper-SD15 8-step LoRA 8 steps at guidance 0 (DDIM, trailing timesteps)."""

    lcm: FewStepSampler = FewStepSampler(steps=4, guidance=1.0)
    tcd: FewStepSampler = FewStepSampler(steps=4, guidance=0.0, eta=0.3)
    hyper: FewStepSampler = FewStepSampler(steps=8, guidance=0.0)


class RuntimeSettings(_Strict):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    cpu_offload: Literal["auto", "off", "model", "sequential"] = "auto"
    vae_tiling: bool = False
    offline: bool | None = Field(None, description="force offline model loading; None follows HF_HUB_OFFLINE")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default")
    keep_freed_memory: bool = Field(True, description="keep freed heap memory in the process (glibc): ~1.6x faster "
                                                      "CPU inference on VMs, ~20% more peak RSS; see pipeline/models/allocator.py")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"{v!r} is not a device (auto, cpu, cuda, cuda:N or mps)")
        return v


class LimitsSettings(_Strict):
    max_pixels: int = Field(64_000_000, gt=0, description="inputs with more pixels are refused")


class ProductClass(_Strict):
    name: str = Field(min_length=1)
    prompts: list[str] = Field(default_factory=list, description="extra prompts / synonyms")
    threshold: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[\w][\w \-]*", v):
            raise ValueError(f"class name {v!r} may hold letters, digits, spaces, '-' and '_' only")
        return v.strip()


class DetectSettings(_Strict):
    classes: list[ProductClass] = Field(
        default_factory=lambda: [
            ProductClass(name="handbag", prompts=["purse", "leather bag"]),
            ProductClass(name="shoe", prompts=["sneaker", "boot"]),
            ProductClass(name="chair"),
        ]
    )
    background_prompts: list[str] = Field(
        default_factory=lambda: ["background", "a wall", "a floor", "a table top", "an empty room", "texture"]
    )
    margin: float = Field(0.1, ge=0.0, le=1.0, description="best class must beat the runner-up by this much")
    context_pad: float = Field(0.15, ge=0.0, le=2.0, description="crop padding, share of the box size")
    points_per_side: int = Field(32, ge=1, le=128, description="SAM automatic mask generator density")
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    min_mask_area: float = Field(0.002, ge=0.0, le=1.0, description="share of the image; smaller masks dropped")
    max_per_class: int = Field(5, ge=1)
    prefilter: bool = Field(True, description="cheap whole-image + tiles CLIP pass before SAM")
    prefilter_threshold: float = Field(0.2, ge=0.0, le=1.0)
    proposals: Literal["guided", "everything", "grounded", "clipseg", "sam3"] = Field(
        "guided", description="guided: CLIP-guided SAM points; everything: SAM's automatic generator; grounded: "
        "zero-shot detector boxes (models.grounding) -> SAM box prompts; clipseg: CLIPSeg heatmap peaks "
        "(models.clipseg) -> SAM point prompts; sam3: SAM 3 instance masks per class (models.sam3). CLIP "
        "re-scores every proposal against classes and background in all modes but sam3")
    box_threshold: float = Field(0.25, ge=0.0, le=1.0, description="grounded: detector box score to keep a box")
    max_boxes: int = Field(16, ge=1, le=256, description="grounded: most boxes (best detector scores after box NMS) "
                           "decoded by SAM and classified by CLIP")
    heatmap_threshold: float = Field(0.4, ge=0.0, le=1.0, description="clipseg: a peak must be above this heatmap value")
    heatmap_peaks: int = Field(3, ge=1, le=64, description="clipseg: most peaks (SAM point prompts) per class")
    sam3_threshold: float = Field(0.5, ge=0.0, le=1.0, description="sam3: instance score (detection x presence)")
    presence_threshold: float = Field(0.5, ge=0.0, le=1.0, description="sam3: an image whose presence score is "
                                      "below this for every class is skipped")

    @model_validator(mode="after")
    def _unique(self) -> "DetectSettings":
        names = [c.name for c in self.classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"class names must be unique; repeated: {', '.join(dup)}")
        return self


# A diffusion work size: ``auto`` (the default) is the inpaint model's native size, read from its
# files when the work size is planned (:meth:`pipeline.models.registry.ModelRegistry.work_resolution`),
# so pointing the inpaint role at an SDXL checkpoint works at 1024 px without touching the sizes.
AUTO_RESOLUTION = "auto"
RESOLUTION_RANGE = (64, 2048)
RESOLUTION_HELP = ("long side of the work size, px (a multiple of 8 within 64..2048), or auto: the inpaint "
                   "model's native size (SD 1.5 and SD 2 inpainting 512, SDXL 1024)")


def check_resolution(v: Any) -> int | str:
    """A ``resolution`` setting: ``"auto"`` or a whole number of px, a multiple of 8 within
    :data:`RESOLUTION_RANGE` (a digit string, as a ``--param`` gives it, is taken as its number).
    Returns ``"auto"`` or the int. Raises ValueError (one message naming both forms)."""
    if v == AUTO_RESOLUTION:
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        v = int(v)
    elif isinstance(v, float) and v.is_integer():
        v = int(v)
    lo, hi = RESOLUTION_RANGE
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"resolution must be auto (the inpaint model's native size) or a number of px, "
                         f"a multiple of 8 within {lo}..{hi}")
    if not lo <= v <= hi:
        raise ValueError(f"resolution must lie within {lo}..{hi} px (or be auto)")
    if v % 8:
        raise ValueError("resolution must be a multiple of 8 (or auto)")
    return v


# ``resolution: auto`` or ``resolution: 768`` (see :func:`check_resolution`).
Resolution = Annotated[Union[int, Literal["auto"]], BeforeValidator(check_resolution)]


class EnhanceSettings(_Strict):
    """Restyle or clean up a detected product in place (:mod:`pipeline.ops.enhance`): SD inpainting with
    ControlNet depth on a crop around the product; only the dilated product mask is written back."""

    class ClassStyle(_Strict):
        """Per-class look: prompt, activation tag and LoRA files (``FILE[:WEIGHT]``, relative paths
        against ``root``). Unset fields fall back to the ``enhance`` ones."""

        prompt_template: str | None = Field(None, description="overrides enhance.prompt_template")
        negative_prompt: str | None = Field(None, description="overrides enhance.negative_prompt")
        tag: str | None = Field(None, description="LoRA activation tag, filled into {tag}")
        loras: list[str | dict[str, Any]] = Field(default_factory=list, description="LoRA .safetensors files: "
                                                  "FILE, FILE:WEIGHT or {path: FILE, weight: W}")

        @field_validator("prompt_template")
        @classmethod
        def _template(cls, v: str | None) -> str | None:
            return None if v is None else EnhanceSettings.check_template(v)

        @field_validator("loras")
        @classmethod
        def _loras(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
            for item in v:
                try:
                    split_entry(item)  # syntax and weight range only; the file is checked when used
                except LoraError as e:  # pydantic reports ValueErrors raised in validators
                    raise ValueError(str(e)) from None
            return v

    prompt_template: str = Field("{tag}, {label}, studio photography, product photography, ultra realistic",
                                 description="placeholders {tag} and {label}; empty comma items are dropped")
    negative_prompt: str = "blurry, deformed, lowres, watermark, text"
    tag: str = Field("", description="default LoRA activation tag (classes.NAME.tag overrides)")
    sampler: SamplerName = Field("default", description=SAMPLER_HELP)
    steps: int = Field(30, ge=1, le=500)
    guidance: float = Field(7.0, ge=0.0, le=50.0)
    strength: float = Field(0.75, gt=0.0, le=1.0, description="share of the schedule re-noised; steps x strength "
                            "must be at least 1")
    controlnet: bool = Field(True, description="ControlNet depth keeps the product's shape; off = plain inpainting")
    controlnet_scale: float = Field(0.8, ge=0.0, le=5.0)
    mode: Literal["crop", "whole"] = Field("crop", description="crop: product box + margin at `resolution`; "
                                           "whole: the whole photo at its own size (up to whole_max_side)")
    resolution: Resolution = Field(AUTO_RESOLUTION, description="crop mode: " + RESOLUTION_HELP)
    whole_max_side: int = Field(2048, ge=64, le=8192, multiple_of=8, description="whole mode: longer photos are "
                                "scaled down to this long side")
    mask_dilation: int = Field(8, ge=0, le=512, description="px the edited region grows beyond the product mask")
    mask_feather: int = Field(4, ge=0, le=256, description="px over which the result fades into the original at "
                              "the edge of the dilated mask")
    crop_margin: float = Field(0.25, ge=0.0, le=4.0, description="context around the product, share of its box size")
    seed: int = 0
    classes: dict[str, ClassStyle] = Field(default_factory=dict, description="per-class prompt, tag and LoRAs")

    @staticmethod
    def check_template(v: str) -> str:
        """A prompt template may hold only the placeholders {tag} and {label}."""
        bad = sorted(set(re.findall(r"\{([^{}]*)\}", v)) - {"tag", "label"})
        if bad:
            raise ValueError(f"unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)} "
                             "(a prompt template may use {tag} and {label})")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return cls.check_template(v)

    @model_validator(mode="after")
    def _some_denoising(self) -> "EnhanceSettings":
        # diffusers runs int(steps * strength) steps; zero would fail inside the model call.
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps={self.steps} x strength={self.strength} leaves no denoising step "
                             "(int(steps x strength) must be at least 1); raise either")
        return self


FILL_BACKENDS: tuple[str, ...] = ("lama", "sd", "classical")


def check_fill(v: Any) -> str | list[str]:
    """A hole-fill choice: one backend name (``lama``, ``sd`` or ``classical``) or a fallback order
    (a non-empty list of them without repeats). Returned unchanged when valid."""
    known = ", ".join(FILL_BACKENDS)
    if isinstance(v, str):
        if v not in FILL_BACKENDS:
            raise ValueError(f"unknown fill backend {v!r} (one of: {known}, or a list of them)")
        return v
    if isinstance(v, (list, tuple)):
        items = list(v)
        if not items:
            raise ValueError(f"an empty fill order; list at least one of {known}")
        bad = [x for x in items if not isinstance(x, str) or x not in FILL_BACKENDS]
        if bad:
            raise ValueError(f"unknown fill backend(s) {', '.join(map(repr, bad))} in the fill order (one of: {known})")
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            raise ValueError(f"fill order repeats {', '.join(dup)}; name each backend once")
        return items
    raise ValueError(f"fill must be one of {known} or a list of them, got {type(v).__name__}")


def fill_order(v: str | Sequence[str]) -> list[str]:
    """The backends a fill tries, in order. A list is taken as given; a single name is shorthand for
    that backend followed by ``classical`` (no weights, the fallback since before fill orders)."""
    if isinstance(v, str):
        return [v] if v == "classical" else [v, "classical"]
    return list(v)


# ``fill: lama`` or ``fill: [lama, sd, classical]`` (the first result that passes the re-check wins).
FillSpec = Annotated[Union[str, list[str]], BeforeValidator(check_fill)]


class FillSettings(_Strict):
    """The hole fill shared by every operation that fills (:func:`pipeline.ops.inpaint.fill_in_order`):
    ``displace.fill``, ``rotate.fill``. ``fill: lama`` (a name or an order) is short for
    ``fill: {backend: lama}``; the other fields keep the section's defaults. Removal defaults from
    the seed projects: empty prompt, guidance ~2, strength 1.0, mask dilated by ~20 px."""

    backend: FillSpec = Field("sd", description="lama (LaMa, one forward pass), sd (SD inpainting) or classical "
                              "(OpenCV, no weights), or a fallback order such as [lama, sd, classical]; a single "
                              "name is followed by classical")
    sampler: SamplerName = Field("default", description="sd fill: " + SAMPLER_HELP)
    steps: int = Field(30, ge=1, le=500, description="sd fill: denoising steps")
    guidance: float = Field(2.0, ge=0.0, le=50.0, description="sd fill: classifier-free guidance")
    strength: float = Field(1.0, ge=0.0, le=1.0, description="sd fill: share of the schedule re-noised")
    prompt: str = Field("", description="sd fill prompt; empty removes best")
    negative_prompt: str = ""
    resolution: Resolution = Field(AUTO_RESOLUTION, description="sd fill crop: " + RESOLUTION_HELP)
    crop_margin: float = Field(0.5, ge=0.0, le=4.0, description="context around the hole, share of its box size")
    lama_resolution: int = Field(1024, ge=64, le=4096, multiple_of=8, description="LaMa works on the hole's crop at "
                                 "the photo's own scale up to this long side; larger crops are scaled down to it")
    mask_dilation: int = Field(20, ge=0, le=512, description="px the hole grows beyond the product mask")
    blend: int = Field(4, ge=0, le=256, description="px the fill fades into the original at the hole edge "
                       "(clamped to mask_dilation)")
    classical_method: Literal["ns", "telea"] = Field("ns", description="cv2.inpaint algorithm (ns keeps flat "
                                                     "backgrounds flat; telea drifts a few levels)")
    classical_radius: int = Field(5, ge=1, le=64, description="cv2.inpaint neighbourhood radius")
    recheck: bool = Field(True, description="CLIP-check the old region after each fill and move on in the order "
                          "while it still shows the product (needs the clip role)")
    recheck_threshold: float = Field(0.5, ge=0.0, le=1.0, description="class probability at which it is still there")
    retries: int = Field(2, ge=0, le=20, description="with recheck: SD re-fills with seed+1.. before the next "
                         "backend in the order")

    @property
    def order(self) -> list[str]:
        """The backends tried, in order (:func:`fill_order`)."""
        return fill_order(self.backend)

    @model_validator(mode="after")
    def _some_denoising(self) -> "FillSettings":
        # diffusers runs int(steps * strength) steps; zero would fail inside the SD fill.
        if "sd" in self.order and int(self.steps * self.strength) < 1:
            raise ValueError(f"steps={self.steps} x strength={self.strength} leaves no denoising step for the sd "
                             "fill; raise either (or use backend: classical)")
        return self


class SettingsDeprecation(FutureWarning):
    """An old spelling in a settings, rules or action that still works for now (shown by default)."""


# The flat fill keys each section had before ``fill`` became a :class:`FillSettings`, mapped to the
# nested field; still read (with a :class:`SettingsDeprecation` warning) for one release.
LEGACY_FILL_KEYS: dict[str, dict[str, str]] = {
    "displace": {"sampler": "sampler", "steps": "steps", "guidance": "guidance", "strength": "strength",
                 "prompt": "prompt", "negative_prompt": "negative_prompt", "resolution": "resolution",
                 "crop_margin": "crop_margin", "lama_resolution": "lama_resolution",
                 "mask_dilation": "mask_dilation", "fill_blend": "blend", "classical_method": "classical_method",
                 "classical_radius": "classical_radius", "recheck": "recheck",
                 "recheck_threshold": "recheck_threshold", "retries": "retries"},
    "rotate": {"fill_sampler": "sampler", "fill_steps": "steps", "fill_guidance": "guidance",
               "fill_strength": "strength", "fill_prompt": "prompt", "fill_negative_prompt": "negative_prompt",
               "fill_resolution": "resolution", "fill_crop_margin": "crop_margin",
               "fill_lama_resolution": "lama_resolution", "mask_dilation": "mask_dilation", "fill_blend": "blend",
               "classical_method": "classical_method", "classical_radius": "classical_radius",
               "recheck": "recheck", "recheck_threshold": "recheck_threshold", "fill_retries": "retries"},
}


class FillKeyConflict(ValueError):
    """A fill field given both as an old flat key and in ``fill`` (a ValueError for pydantic)."""


def nest_fill(section: str, data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``data`` (a section's keys as written) with the fill in its nested form: ``fill: NAME`` or
    ``fill: [ORDER]`` becomes ``fill: {backend: ...}`` and the section's old flat fill keys move
    into ``fill``. Returns ``(new dict, [(old key, new dotted key)])``; the fill dict holds only
    what was given (callers merge it over the fill in force). Raises :class:`FillKeyConflict` when
    a value is given both ways."""
    legacy = LEGACY_FILL_KEYS[section]
    out = dict(data)
    moved: list[tuple[str, str]] = []
    fill = out.get("fill")
    if isinstance(fill, BaseModel):
        fill = fill.model_dump()
    elif fill is None or isinstance(fill, (str, list, tuple)):
        fill = {} if fill is None else {"backend": fill}
    elif isinstance(fill, dict):
        fill = dict(fill)
    else:
        return out, moved  # not a fill at all: let the model say so
    for old, new in legacy.items():
        if old in out:
            if new in fill:
                raise FillKeyConflict(f"{section}.{old} and {section}.fill.{new} both given; keep fill.{new}")
            fill[new] = out.pop(old)
            moved.append((old, f"fill.{new}"))
    if fill or "fill" in out:
        out["fill"] = fill
    return out, moved


def deprecation_note(where: str, section: str, old: str, new: str) -> str:
    return f"{where}: {section}.{old} is deprecated, write {section}.{new} (the old key is read until the next release)"


def merge_nested(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, merging nested dicts key by key (for overrides)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_nested(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _FillSection(_Strict):
    """A settings section with a ``fill`` (:class:`FillSettings`); takes the short and the old flat forms."""

    section: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _nest_fill(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        out, moved = nest_fill(cls.section, data)
        if "fill" in out and isinstance(out["fill"], dict):
            # Given fields over this section's default fill (rotate's defaults differ from displace's).
            out["fill"] = {**cls.model_fields["fill"].get_default(call_default_factory=True).model_dump(),
                           **out["fill"]}
        if moved:
            sink = (info.context or {}).get("deprecated") if info.context else None
            for old, new in moved:
                if sink is not None:
                    sink.append((cls.section, old, new))
                else:
                    warnings.warn(deprecation_note("settings", cls.section, old, new), SettingsDeprecation,
                                  stacklevel=2)
        return out

    @field_validator("fill", mode="before", check_fields=False)
    @classmethod
    def _fill_shorthand(cls, v: Any) -> Any:
        # Assignment (``section.fill = "lama"``) skips the model validator above.
        if isinstance(v, (str, list, tuple)):
            default = cls.model_fields["fill"].get_default(call_default_factory=True)
            return {**default.model_dump(), "backend": v}
        return v


class DisplaceSettings(_FillSection):
    """Move a detected product (:mod:`pipeline.ops.displace`): cut, fill the hole (``fill``), paste."""

    section: ClassVar[str] = "displace"

    fill: FillSettings = Field(default_factory=FillSettings, description="the hole fill (a backend name or order is "
                               "short for {backend: ...})")
    feather: int = Field(3, ge=0, le=256, description="px of soft edge outside the pasted product's mask")
    harmonize_ring: int = Field(0, ge=0, le=256, description="px ring around the pasted product to re-fill; 0 = off")
    out_of_frame: Literal["clip", "refuse"] = Field("clip", description="product partly leaving the frame: clip it, "
                                                    "or refuse beyond max_outside_share")
    max_outside_share: float = Field(0.5, ge=0.0, le=1.0, description="refuse: largest share allowed out of frame")
    seed: int = Field(0, description="seed of the sd fill (re-fills use seed+1, ...)")


class RotateSettings(_FillSection):
    """Show a detected product from another viewpoint (:mod:`pipeline.ops.rotate`). Novel-view defaults
    from the Zero123 reference demo (guidance 3, 75 DDIM steps, eta 1, 256 px views); removal of the
    old product by the shared fill (``fill``; no CLIP re-check by default)."""

    section: ClassVar[str] = "rotate"

    # -- the novel view (Zero123) --
    steps: int = Field(75, ge=1, le=500, description="DDIM steps of the novel-view model")
    guidance: float = Field(3.0, ge=0.0, le=50.0, description="classifier-free guidance (1 = off)")
    eta: float = Field(1.0, ge=0.0, le=1.0, description="DDIM eta (1.0 as the reference demo; 0 = deterministic DDIM)")
    # Zero123's reference preprocessing (ldm/util.py load_and_preprocess) shrinks the product's box
    # to a 200 px long side and centres it on a 256 px white square: the product spans 200/256 =
    # 0.78 of the frame. 0.14 gives the same: 1 / (1 + 2 x 0.14) = 0.78125.
    crop_padding: float = Field(0.14, ge=0.0, le=4.0, description="white margin around the product in the model "
                                "input, share of its box's long side on each side (0.14: the product spans "
                                "0.78 of the view, as Zero123's reference preprocessing)")
    view_size: int = Field(256, ge=32, le=1024, multiple_of=8, description="novel-view model input/output size, px")
    radius: float = Field(0.0, ge=-0.5, le=0.5, description="relative camera distance change (+ = farther)")
    max_polar: float = Field(90.0, gt=0.0, le=90.0, description="largest |polar| accepted, degrees")
    warn_azimuth: float = Field(90.0, ge=0.0, le=180.0, description="|azimuth| at or above this adds a warning "
                                "(large turns distort)")
    # -- the new view: upscale and matte --
    upscale: Literal["auto", "always", "off"] = Field("auto", description="upscaler role on the new view: auto = "
                                                     "only when the product would be enlarged")
    matte_threshold: int = Field(24, ge=1, le=254, description="distance from white (max over R, G, B) above which "
                                 "a view pixel is the product")
    matte_refine: bool = Field(True, description="refine the view's matte with SAM (box prompt)")
    matte_edge: int = Field(1, ge=0, le=16, description="px of soft alpha at the matte's edge (view resolution)")
    # -- placement and compositing --
    anchor: Literal["bottom-center", "center", "keep-box"] = Field(
        "bottom-center", description="bottom-center: same bottom and centre x as the old box; center: same centre; "
        "keep-box: scaled to fit inside the old box, bottom-centred in it")
    scale_by: Literal["height", "width"] = Field("height", description="match the old product's height or width "
                                                 "(keep-box ignores this)")
    feather: int = Field(3, ge=0, le=256, description="px of soft edge outside the pasted product")
    poisson: bool = Field(False, description="Poisson-blend the new product into the background (cv2.seamlessClone)")
    # -- removing the old product --
    fill: FillSettings = Field(default_factory=lambda: FillSettings(recheck=False, retries=0),
                               description="removing the old product (a backend name or order is short for "
                               "{backend: ...}); recheck off by default")
    seed: int = Field(0, description="seed of the novel view and the sd fill")


def parse_colour(v: Any) -> tuple[int, int, int]:
    """``"#RRGGBB"``, ``"#RGB"`` or ``[R, G, B]`` (0..255) -> ``(R, G, B)``. Raises ValueError."""
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in v):
        return (int(v[0]), int(v[1]), int(v[2]))
    if isinstance(v, str):
        t = v.strip().lstrip("#")
        if re.fullmatch(r"[0-9a-fA-F]{3}", t):
            t = "".join(c * 2 for c in t)
        if re.fullmatch(r"[0-9a-fA-F]{6}", t):
            return (int(t[0:2], 16), int(t[2:4], 16), int(t[4:6], 16))
    raise ValueError(f"{v!r} is not a colour (\"#RRGGBB\" or [R, G, B] with 0..255)")


def _colour_text(v: str) -> str:
    parse_colour(v)
    return v


# A colour as written in a settings file ("#RRGGBB" or "#RGB"), checked by parse_colour.
Colour = Annotated[str, AfterValidator(_colour_text)]


class BackgroundSettings(_Strict):
    """Put the product on a new background (:mod:`pipeline.ops.background`). The product's own pixels
    (its mask) stay bit-identical; every other pixel is the new background, with a soft edge of
    ``edge`` px just outside the mask made of the product's edge colours."""

    mode: Literal["color", "transparent", "blur", "image", "generate"] = Field(
        "color", description="color: a flat colour; transparent: RGBA; blur: the original background blurred; "
        "image: a backdrop file; generate: SD inpainting of everything but the product")
    color: Colour = Field("#FFFFFF", description="mode color (and the colour under transparent pixels)")
    edge: int = Field(1, ge=0, le=32, description="px of soft edge outside the product mask (matte: ramp)")
    matte: Literal["ramp", "vitmatte"] = Field(
        "ramp", description="the soft edge outside the mask: ramp (a linear fall-off over `edge` px) or vitmatte "
        "(the `matting` role's alpha from a trimap around the mask, in a `matte_band` px band outside it)")
    matte_band: int = Field(8, ge=1, le=64, description="vitmatte: trimap half-width, px (unknown band = "
                            "dilate(mask, b) & ~erode(mask, b)); the matte decides the pixels up to b px outside")
    matte_resolution: int = Field(1024, ge=64, le=2048, multiple_of=32, description="vitmatte: long side of the "
                                  "crop the model sees (the crop around the product is scaled down to it)")
    blur_radius: int = Field(25, ge=1, le=512, description="mode blur: Gaussian sigma, px")
    image: Path | None = Field(None, description="mode image: backdrop file (relative: against root), "
                               "scaled to cover the frame")
    shadow: Literal["none", "contact", "drop"] = Field("none", description="contact: a soft ellipse under the "
                                                       "product's base; drop: a blurred offset silhouette")
    shadow_opacity: float = Field(0.35, ge=0.0, le=1.0, description="darkening at the shadow's core")
    shadow_blur: int = Field(12, ge=0, le=256, description="shadow softness, px (Gaussian sigma)")
    shadow_offset: tuple[float, float] = Field((0.04, 0.03), description="drop: offset as a share of the "
                                                "product box's width and height")
    contact_height: float = Field(0.08, gt=0.0, le=1.0, description="contact: ellipse height, share of the "
                                  "product box height")
    # -- mode generate (SD inpainting of everything but the product; enhance's models) --
    prompt: str = Field("{label}, product photography, on a clean studio table, soft light",
                        description="generate: prompt ({label} and {tag} filled)")
    negative_prompt: str = "blurry, deformed, lowres, watermark, text"
    sampler: SamplerName = Field("default", description="generate: " + SAMPLER_HELP)
    steps: int = Field(30, ge=1, le=500)
    guidance: float = Field(7.0, ge=0.0, le=50.0)
    controlnet: bool = Field(True, description="generate: ControlNet depth keeps the scene's layout")
    resolution: Resolution = Field(AUTO_RESOLUTION, description="generate: " + RESOLUTION_HELP)
    loras: list[str | dict[str, Any]] = Field(default_factory=list, description="generate: LoRA files")
    seed: int = 0

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        return EnhanceSettings.check_template(v)


class FrameSettings(_Strict):
    """Crop and pad around the product (:mod:`pipeline.ops.frame`): the product's box fills ``fill``
    of the frame along its limiting side, placed by ``anchor``; padding is ``pad_color``."""

    aspect: str = Field("1:1", description="W:H of the frame, or 'keep' (the input's)")
    size: tuple[int, int] | None = Field(None, description="exact frame size [W, H] (overrides aspect)")
    min_long_side: int = Field(0, ge=0, le=20000, description="frame long side at least this (the product is "
                               "upscaled when needed)")
    fill: float = Field(0.85, gt=0.0, le=1.0, description="product box / frame along the limiting side")
    anchor: Literal["center", "bottom", "top"] = "center"
    pad_color: Colour = Field("#FFFFFF", description="padding colour")
    upscale: Literal["resample", "upscaler", "refuse"] = Field(
        "resample", description="product smaller than asked: resample (Lanczos), the upscaler role, or refuse")
    max_upscale: float = Field(8.0, ge=1.0, le=64.0, description="refuse scaling up more than this")

    @field_validator("aspect")
    @classmethod
    def _aspect(cls, v: str) -> str:
        if v != "keep" and not re.fullmatch(r"\d+(\.\d+)?:\d+(\.\d+)?", v) or v.startswith("0:") or v.endswith(":0"):
            raise ValueError(f"aspect {v!r} is not W:H (e.g. 1:1, 4:5) or 'keep'")
        return v

    def ratio(self, in_size: tuple[int, int]) -> float:
        if self.size is not None:
            return self.size[0] / self.size[1]
        if self.aspect == "keep":
            return in_size[0] / in_size[1]
        a, b = self.aspect.split(":")
        return float(a) / float(b)


class OutputSettings(_Strict):
    """How result images are encoded (:func:`pipeline.io.outputs.encode_image`). Every QA check runs
    on the pixels before encoding; the record says when a lossy format was used."""

    format: Literal["png", "jpeg", "webp", "avif", "tiff"] = "png"
    quality: int = Field(92, ge=1, le=100, description="jpeg, webp and avif quality")
    lossless: bool = Field(False, description="webp / avif: lossless mode")
    srgb: bool = Field(False, description="convert from the input's ICC profile to sRGB and tag the file sRGB "
                       "(the main output keeps the input's bytes by default; profiles turn it on)")
    metadata: Literal["keep", "strip"] = Field("keep", description="keep: embed the ICC profile (sRGB after "
                                               "conversion); strip: write no ICC profile or other metadata")


class CheckSettings(_Strict):
    """A profile's compliance rules (:mod:`pipeline.ops.compliance`); None = not checked."""

    background: Colour | None = Field(None, description="the background colour required outside the product")
    min_background_share: float = Field(0.98, ge=0.0, le=1.0, description="share of pixels outside the product "
                                        "(and its edge band) that must be exactly `background`")
    edge_band: int = Field(8, ge=0, le=64, description="px around the product not counted: its anti-aliased "
                           "edge and JPEG's ringing, which stays within one 8 px block")
    min_fill: float | None = Field(None, ge=0.0, le=1.0, description="product box / frame, limiting side")
    max_fill: float | None = Field(None, ge=0.0, le=1.0)
    min_long_side: int | None = Field(None, ge=1)
    max_long_side: int | None = Field(None, ge=1)
    min_short_side: int | None = Field(None, ge=1)
    square: bool = Field(False, description="width must equal height")
    formats: list[str] | None = Field(None, description="allowed file formats (JPEG, PNG, WEBP, ...)")
    srgb: bool = Field(False, description="the file must be sRGB (tagged sRGB, or untagged)")
    no_borders: bool = Field(False, description="no uniform border lines of another colour at the edges")
    max_bytes: int | None = Field(None, ge=1, description="largest file size")


class ProfileSettings(_Strict):
    """A marketplace profile: background + frame + output + the compliance rules. ``background`` /
    ``frame``: overrides of those settings sections (None: that step is not run)."""

    description: str = ""
    background: dict[str, Any] | None = None
    frame: dict[str, Any] | None = None
    output: OutputSettings = OutputSettings()
    check: CheckSettings = CheckSettings()
    sources: list[str] = Field(default_factory=list, description="where the rules come from (docs/profiles.md)")


class Settings(_Strict):
    """The whole settings file. ``source_file`` and ``base_dir`` are set by :func:`load_settings`."""

    root: Path = Path(".")
    commercial_use: bool = Field(False, description="outputs are for commercial use: refuse models marked "
                                 "`commercial: false`")
    paths: PathsSettings = PathsSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    limits: LimitsSettings = LimitsSettings()
    models: ModelsSettings = ModelsSettings()
    samplers: SamplersSettings = Field(SamplersSettings(), description="few-step samplers' steps, guidance, eta "
                                       "and LoRA weight")
    detect: DetectSettings = DetectSettings()
    enhance: EnhanceSettings = EnhanceSettings()
    displace: DisplaceSettings = DisplaceSettings()
    rotate: RotateSettings = RotateSettings()
    background: BackgroundSettings = BackgroundSettings()
    frame: FrameSettings = FrameSettings()
    output: OutputSettings = Field(OutputSettings(), description="how the main result image is encoded")
    profiles: dict[str, ProfileSettings] = Field(default_factory=dict, description="marketplace profiles, "
                                                 "added to (or replacing) the shipped presets")

    source_file: Path | None = Field(None, exclude=True)
    base_dir: Path = Field(Path("."), exclude=True)

    def resolve_path(self, p: Path | str) -> Path:
        """Absolute path for a settings path: ``~`` expanded, relative ones against ``root``."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def model_path(self, role: str) -> Path | None:
        src = self.models.source(role)
        return self.resolve_path(src.path) if src.path is not None else None

    @property
    def offline(self) -> bool:
        if self.runtime.offline is not None:
            return self.runtime.offline
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Loading


def yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (keys / list indices), or of its nearest parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], str]:
    """Read a YAML file that must hold a mapping. Raises SettingsError on any failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(path, [("", "file not found", None)]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(path, [("", f"cannot read file: {e}", None)]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        reason = f"not valid YAML: {getattr(e, 'problem', None) or e}"
        raise SettingsError(path, [("", reason, mark.line + 1 if mark else None)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(path, [("", f"expected a mapping at the top level, got {type(data).__name__}", 1)])
    return data, text


def error_reason(e: Mapping[str, Any], unknown: str = "unknown field (check the spelling; see conf/settings.yaml "
                 "for the known ones)") -> str:
    """The reason of one pydantic error (an item of ``ValidationError.errors()``), without pydantic's
    "Value error, " prefix, with the offending value when the message does not show it."""
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        return unknown
    msg = msg.removeprefix("Value error, ")
    if "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, BaseModel)) \
            and repr(e["input"]) not in msg:
        msg += f" (got {e['input']!r})"
    return msg


def error_loc(e: Mapping[str, Any]) -> tuple[Any, ...]:
    """The field path of one pydantic error, without the validator steps pydantic puts in it."""
    return tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))


def error_fields(err: ValidationError, unknown: str = "unknown field") -> list[tuple[str, str]]:
    """``(dotted field, reason)`` for every error of ``err`` (:func:`error_loc`, :func:`error_reason`)."""
    return [(".".join(str(x) for x in error_loc(e)), error_reason(e, unknown)) for e in err.errors()]


def legacy_loc(loc: tuple[Any, ...], given: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """``loc`` as the user wrote it: ``(..., section, "fill", field)`` becomes ``(..., section, old
    flat key)`` when ``given`` (the raw mapping ``loc`` points into) spelt it the old way, and
    ``(..., section, "fill")`` for the backend of a short ``fill: NAME``."""
    for i in range(len(loc) - 2):
        section, fill, field = loc[i], loc[i + 1], loc[i + 2]
        if fill != "fill" or section not in LEGACY_FILL_KEYS:
            continue
        node: Any = given
        for k in loc[:i + 1]:
            node = node.get(k) if isinstance(node, Mapping) else None
        if not isinstance(node, Mapping):
            continue
        if field == "backend" and isinstance(node.get("fill"), (str, list, tuple)):
            return (*loc[:i + 2], *loc[i + 3:])
        if isinstance(node.get("fill"), Mapping) and field in node["fill"]:
            continue
        for old, new in LEGACY_FILL_KEYS[section].items():
            if new == field and old in node:
                return (*loc[:i + 1], old, *loc[i + 3:])
    return loc


def validation_problems(err: ValidationError, text: str,
                        given: Mapping[str, Any] | None = None) -> list[tuple[str, str, int | None]]:
    """Turn pydantic errors into (dotted field, reason, yaml line) triples. ``given``: the mapping
    read from ``text``, to name an old flat fill key as written (:func:`legacy_loc`)."""
    out = []
    for e in err.errors():
        loc = legacy_loc(error_loc(e), given)
        out.append((".".join(str(x) for x in loc), error_reason(e), yaml_line(text, loc)))
    return out


def config_path(path: str | os.PathLike | None = None) -> Path | None:
    """Which settings file applies: explicit path, then $PRODUCT_STUDIO_CONFIG, then ./conf/settings.yaml."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Load and validate settings. ``None`` uses :func:`config_path`; no file at all gives defaults."""
    p = config_path(path)
    if p is None:
        s = Settings()
        s.base_dir = Path.cwd()
        return s
    data, text = read_yaml_mapping(p)
    deprecated: list[tuple[str, str, str]] = []
    try:
        s = Settings.model_validate(data, context={"deprecated": deprecated})
    except ValidationError as e:
        raise SettingsError(p, validation_problems(e, text, data)) from None
    for section, old, new in deprecated:
        line = yaml_line(text, (section, old))
        warnings.warn(deprecation_note(f"{p}:{line}" if line else str(p), section, old, new), SettingsDeprecation,
                      stacklevel=2)
    s.source_file = p.resolve()
    root = s.root.expanduser()
    s.base_dir = (root if root.is_absolute() else p.resolve().parent / root).resolve()
    return s


def dump_settings(settings: Settings) -> str:
    """YAML text of the settings (for `make-tiny` and `config show`)."""
    data = settings.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
