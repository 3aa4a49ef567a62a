"""The model registry: one owner for locating, loading and keeping every model warm.

Each *role* (``clip``, ``sam``, ``base``, ``inpaint``, ``inpaint_fill``, ``controlnet_depth``,
``depth``, ``novel_view``, ``upscaler``, ``captioner``, ``matting``) maps to a :class:`~pipeline.settings.ModelSource`.
:meth:`ModelRegistry.get` loads a role the first time it is asked for and returns the same object
afterwards (thread-safe), on the device and dtype chosen once for the process.

The registry also owns the state that lives on those models: pipelines *derived* from them
(:meth:`ModelRegistry.derived`, e.g. the ControlNet-inpaint pipeline made of the ``inpaint``
role's components), the LoRA adapters loaded into a role's UNet (:meth:`ModelRegistry.adapters`)
and one lock per role (:meth:`ModelRegistry.lock`) held by every caller that runs a role whose
state is shared (adapters switched on and off). :meth:`ModelRegistry.unload` drops a role with
everything derived from it and its adapters, so its memory is freed once no caller holds it.

Sources are either a local path (a directory in the library's own layout, or a checkpoint file)
or a Hub repo. Hub repos are looked up in the local HF cache first; when offline
(``HF_HUB_OFFLINE=1`` or ``runtime.offline: true``) a missing one is a :class:`ModelLoadError`
naming the role, the source and what to do, never a hang or a silent fallback.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import math
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from pipeline.errors import ModelLoadError
from pipeline.io.hashing import file_sha256
from pipeline.io.imageio import atomic_path
from pipeline.settings import AUTO_RESOLUTION, ROLES, ModelSource, Settings
from pipeline.models.allocator import keep_freed_memory
from pipeline.models.hub import (KNOWN_SHA256, LockEntry, LockFileError, cached_commit, fetch_plan,
                                 hub_cache_dir, plan_role, read_lock, snapshot_dir, write_lock_entry)
from pipeline.models.lora_weights import LoraAdapters, load_spec
from pipeline.models.families import (check_controlnet, check_lora, family_of_config, family_of_dir, native_resolution,
                                      read_unet_config, read_vae_config)

if TYPE_CHECKING:  # pragma: no cover
    import torch


# What each role is, for locating files (layout) and for humans (`models list`).
ROLE_INFO: dict[str, tuple[str, str]] = {
    "clip": ("transformers", "CLIP image-text model (detection classifier)"),
    "sam": ("sam", "segmenter (mask proposals): a segment-anything checkpoint, or a transformers SAM / SAM 2.1 / "
            "EdgeTAM repo (config.json model_type)"),
    "base": ("diffusers", "Stable Diffusion text-to-image pipeline (LoRA training base)"),
    "inpaint": ("diffusers", "Stable Diffusion inpainting pipeline (enhance, hole filling)"),
    "inpaint_fill": ("torchscript", "LaMa big-lama TorchScript (hole filling, fill: lama)"),
    "controlnet_depth": ("diffusers-model", "ControlNet depth model"),
    "depth": ("transformers", "monocular depth estimation"),
    "novel_view": ("diffusers", "Zero123-style novel-view model (rotate)"),
    "upscaler": ("transformers", "image super-resolution"),
    "captioner": ("transformers", "image captioning (LoRA dataset captions)"),
    "matting": ("transformers", "ViTMatte image matting from a trimap (background matte: vitmatte)"),
    "lcm_lora": ("lora", "LCM-LoRA for SD 1.5 (sampler: lcm)"),
    "tcd_lora": ("lora", "TCD-LoRA for SD 1.5 (sampler: tcd)"),
    "hyper_lora": ("lora", "Hyper-SD 8-step LoRA for SD 1.5 (sampler: hyper)"),
    "grounding": ("transformers", "zero-shot box detector: OWLv2 / Grounding DINO (detect.proposals: grounded)"),
    "clipseg": ("transformers", "CLIPSeg text-prompted heatmaps (detect.proposals: clipseg)"),
    "sam3": ("transformers", "SAM 3 concept segmentation (detect.proposals: sam3)"),
}

_SKIP_WEIGHT_MARKERS = (".fp16.", "non_ema", ".ema.", "onnx", "flax", "openvino")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")

# The components the Stable Diffusion roles' loader reads (``_load_sd`` passes None for every other
# one in model_index.json): the safety checker (1.22 GB per repo) and its feature extractor are not
# used. `pull` fetches exactly these folders; SDXL's second text encoder and tokenizer are fetched
# when the repo has them (pipeline.models.families says which a family loads).
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_PULL_COMPONENTS = SD_COMPONENTS + ("text_encoder_2", "tokenizer_2")


def loaded_components(role: str) -> tuple[str, ...] | None:
    """The subfolders a diffusers-pipeline role's loader reads; None for single-folder layouts."""
    if role in ("base", "inpaint"):
        return SD_PULL_COMPONENTS
    if role == "novel_view":
        from pipeline.models.novel_view_layout import COMPONENTS

        return COMPONENTS
    return None


def role_files(role: str, files: list[str]) -> list[str]:
    """Of a Hub repo's ``files``, the ones ``role``'s loader reads: what `models pull` downloads,
    lists with ``--dry-run`` and writes into the lock. One list shared by pull and loader."""
    return select_repo_files(files, ROLE_INFO[role][0], components=loaded_components(role))


def select_repo_files(files: list[str], layout: str, components: tuple[str, ...] | None = None) -> list[str]:
    """Which files of a Hub repo to download for ``layout`` (pure; the listing comes from the Hub).

    Keeps configs, tokenizer/processor files and one weight format per folder (safetensors
    preferred over pickled .bin); drops fp16/EMA/ONNX/Flax variants, single-file checkpoints at
    the root of a diffusers repo, and formats we never load (.ckpt, .h5, .msgpack, .pt).
    ``components``: a diffusers pipeline's loaded subfolders; then only those and the root's
    ``model_index.json`` are kept (no ``safety_checker/``).
    """
    keep: list[str] = []
    weights: dict[str, list[str]] = {}
    indexes: dict[str, list[str]] = {}
    diffusers_repo = "model_index.json" in files
    for f in files:
        name = f.rsplit("/", 1)[-1]
        folder = f.rsplit("/", 1)[0] if "/" in f else ""
        if components is not None and f != "model_index.json" and folder.split("/")[0] not in components:
            continue
        if name.startswith(".") or f.endswith((".md", ".ckpt", ".h5", ".msgpack", ".pt", ".pth", ".onnx", ".png", ".jpg")):
            continue
        if f.endswith(".index.json"):  # a sharded checkpoint's index: kept with its format below
            if not any(m in f for m in _SKIP_WEIGHT_MARKERS):
                indexes.setdefault(folder, []).append(f)
            continue
        if f.endswith(_WEIGHT_SUFFIXES):
            if any(m in f for m in _SKIP_WEIGHT_MARKERS):
                continue
            if layout == "diffusers" and diffusers_repo and folder == "":
                continue
            weights.setdefault(folder, []).append(f)
        elif f.endswith((".json", ".txt", ".model", ".yaml", ".py")) or "tokenizer" in name:
            keep.append(f)
    for folder, ws in weights.items():
        st = [w for w in ws if w.endswith(".safetensors")]
        keep.extend(st or ws)
        fmt = ".safetensors.index.json" if st else ".bin.index.json"
        keep.extend(i for i in indexes.get(folder, []) if i.endswith(fmt))
    return sorted(keep)


@dataclass
class ClipBundle:
    """transformers ``CLIPModel`` (eval) and its ``CLIPProcessor``."""

    model: Any
    processor: Any


@functools.cache
def _autocast_encoder_class() -> type:
    import torch

    class AutocastEncoder(torch.nn.Module):
        """SAM's image encoder run under ``torch.autocast(dtype)``, its output cast back to float32,
        so everything downstream (predictor, prompt encoder, mask decoder) stays as segment-anything
        wrote it. The weights stay float32; ``img_size`` is the encoder's, which SAM reads."""

        def __init__(self, encoder: Any, dtype: "torch.dtype"):
            super().__init__()
            self.encoder = encoder
            self.dtype = dtype
            self.img_size = encoder.img_size

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            with torch.autocast(x.device.type, dtype=self.dtype):
                out = self.encoder(x)
            return out.float()

    return AutocastEncoder


def AutocastEncoder(encoder: Any, dtype: Any) -> Any:  # noqa: N802 (a class, built lazily: torch loads late)
    return _autocast_encoder_class()(encoder, dtype)


def sam_dtype(bundle: Any) -> str:
    """``float32``, or ``float32 (encoder under bfloat16 autocast)``, for records and `models verify`."""
    enc = getattr(bundle.model, "image_encoder", None)  # None: a transformers SAM-family model
    if hasattr(enc, "encoder") and hasattr(enc, "dtype"):
        return f"float32 (encoder under {str(enc.dtype).replace('torch.', '')} autocast)"
    return "float32"


@dataclass
class SamBundle:
    """segment-anything ``Sam`` (eval, float32) and the architecture it was built with."""

    model: Any
    model_type: str
    image_size: int


# config.json model_type of the transformers segmenters the ``sam`` role accepts, and the image model
# class each loads into. The published SAM 2.1 and EdgeTAM repos (facebook/sam2.1-hiera-*,
# facebook/EdgeTAM) are saved from the video models (``sam2_video``, ``edgetam_video``); their image
# models load from them, dropping the video memory weights (transformers' own ignore list). SAM-HQ
# (syscv-community/sam-hq-vit-*) decodes with the encoder's intermediate embeddings as well as the
# image embedding; the proposer keeps both. EdgeTAM's RepViT backbone needs ``timm`` (the
# ``edgetam`` extra).
HF_SAM_CLASSES = {"sam": "SamModel", "sam_hq": "SamHQModel", "sam2": "Sam2Model", "sam2_video": "Sam2Model",
                  "edgetam": "EdgeTamModel", "edgetam_video": "EdgeTamModel"}
HF_SAM_TYPES = tuple(HF_SAM_CLASSES)


@dataclass
class HFSamBundle:
    """A transformers SAM-family model (eval, float32) and its processor; ``family`` is the
    config's model_type (sam | sam_hq | sam2 | edgetam)."""

    model: Any
    processor: Any
    family: str


def hf_model_type(folder: Any) -> str | None:
    """``model_type`` from ``folder/config.json``, or None when there is none (a segment-anything
    checkpoint folder)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("model_type")


@dataclass
class HFBundle:
    """A transformers model (eval) with its processor: depth, upscaler, captioner, matting."""

    model: Any
    processor: Any


@dataclass
class NovelViewComponents:
    """The Zero123 layout's components (see :mod:`pipeline.models.novel_view_layout`)."""

    vae: Any
    image_encoder: Any
    unet: Any
    scheduler: Any
    feature_extractor: Any
    cc_projection: Any


@dataclass
class RoleStatus:
    role: str
    source: str
    licence: str
    available: bool
    location: str | None
    detail: str = ""


@dataclass
class PullResult:
    """What `pull` did for one role. ``status``: local | plan (dry run) | cached | downloaded."""

    role: str
    source: str
    status: str
    location: Path
    commit: str | None
    files: list[Any]  # pipeline.models.hub.PlanFile
    size: int
    downloaded: int
    origin: str = ""


@dataclass
class Runtime:
    """Device and dtypes chosen once per process.

    ``dtype``: the general models (CLIP, depth, captioner, and SAM's bf16 opt-in).
    ``diffusion_dtype``: the diffusion models (``base``, ``inpaint``, ``controlnet_depth``,
    ``novel_view``: UNet, text/image encoder, ControlNet, VAE); equal to ``dtype`` except under
    ``runtime.dtype: auto`` on a CPU with native bf16, where it is bfloat16 and ``dtype`` float32."""

    device: "torch.device"
    dtype: "torch.dtype"
    offload: str = "off"  # off | model | sequential (diffusers pipelines only)
    diffusion_dtype: "torch.dtype | None" = None  # None: the same as dtype

    def __post_init__(self) -> None:
        if self.diffusion_dtype is None:
            self.diffusion_dtype = self.dtype


def cpu_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix maths natively (x86 ``avx512_bf16`` or ``amx_bf16``;
    aarch64 ``bf16``), where bf16 is 1.7-3.4x faster than fp32 (``python -m bench dtype``).
    Without them torch emulates bf16, slower than fp32."""
    import platform

    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(cpu, name, None)
        if probe is not None and probe():
            return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_runtime(settings: Settings) -> Runtime:
    """``runtime.dtype: auto``: cuda fp16; on a CPU, fp32 for the general models and, for the
    diffusion models, bf16 where the CPU has native bf16 (:func:`cpu_native_bf16`), else fp32.
    An explicit dtype applies to every model (SAM: see :meth:`ModelRegistry._load_sam`)."""
    import torch

    dev = settings.runtime.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("*", f"runtime.device={dev}", "CUDA was asked for but torch sees no GPU")
    device = torch.device(dev)
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    diffusion_dtype = None
    if settings.runtime.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        if device.type == "cpu" and cpu_native_bf16():
            diffusion_dtype = torch.bfloat16
    else:
        dtype = names[settings.runtime.dtype]
    offload = settings.runtime.cpu_offload
    if offload == "auto":
        offload = "off"
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            offload = "model" if total < 12 * 1024**3 else "off"
    if device.type != "cuda":
        offload = "off"  # offload moves weights between CPU and GPU; meaningless without a GPU
    if settings.runtime.threads:
        torch.set_num_threads(settings.runtime.threads)
    if settings.runtime.keep_freed_memory:
        keep_freed_memory()  # process-wide, like the thread count: set before the first forward
    return Runtime(device=device, dtype=dtype, offload=offload, diffusion_dtype=diffusion_dtype)


@dataclass
class _Derived:
    """One object built from loaded roles (see :meth:`ModelRegistry.derived`)."""

    value: Any
    roles: tuple[str, ...]


class ModelRegistry:
    """Loads each role lazily, once per process; keeps it warm, with what is built on it. Thread-safe."""

    def __init__(self, settings: Settings, *, quiet: bool = True):
        # quiet=False: for commands that only fetch files (`models pull`); importing diffusers and
        # transformers to quieten them costs seconds that a failing pull should not wait for.
        if quiet:
            quiet_libraries()
        self.settings = settings
        self._runtime: Runtime | None = None
        self._cache: dict[str, Any] = {}
        self._locations: dict[str, Path] = {}
        self._locks = {r: threading.Lock() for r in ROLES}  # held while a role loads
        # Held while a role runs with shared state (its adapters) and while it is unloaded.
        self._use_locks = {r: threading.RLock() for r in ROLES}
        self._derived: dict[Hashable, _Derived] = {}
        self._adapters: dict[str, "LoraAdapters"] = {}
        self._build_locks: dict[Hashable, threading.Lock] = {}
        # Bumped whenever a role is unloaded or replaced: what was built from the old object while
        # that happened is returned to its caller but never kept.
        self._generation = {r: 0 for r in ROLES}
        self._state_lock = threading.RLock()  # guards the four dicts above
        self._rt_lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        with self._rt_lock:
            if self._runtime is None:
                self._runtime = resolve_runtime(self.settings)
            return self._runtime

    def source(self, role: str) -> ModelSource:
        return self.settings.models.source(role)

    def is_loaded(self, role: str) -> bool:
        return role in self._cache

    def get(self, role: str) -> Any:
        """The loaded model object for ``role`` (see the bundle classes); loads on first use."""
        if role not in ROLES:
            raise KeyError(f"unknown model role {role!r} (roles: {', '.join(ROLES)})")
        if role in self._cache:
            return self._cache[role]
        self._check_licence(role)
        with self._locks[role]:
            if role not in self._cache:
                t0 = time.perf_counter()
                obj = self._load(role)
                self.load_seconds[role] = time.perf_counter() - t0
                self._cache[role] = obj
        return self._cache[role]

    def _check_licence(self, role: str) -> None:
        """With ``commercial_use: true`` a role whose source is marked ``commercial: false`` is never
        loaded: every operation that needs it stops with the role, source and licence named."""
        src = self.source(role)
        if self.settings.commercial_use and src.commercial is False:
            where = str(self.settings.source_file) if self.settings.source_file else "the settings"
            raise ModelLoadError(role, src.describe(),
                                 f"marked non-commercial (commercial: false; licence: {src.licence or 'not stated'}) "
                                 f"while commercial_use is true in {where}",
                                 f"use a model whose licence allows commercial use for models.{role}, or set "
                                 "commercial_use: false for non-commercial work")

    def put(self, role: str, obj: Any) -> None:
        """Install an already-built object for ``role`` (benchmarks with full-size random weights).
        What was derived from the role's previous object, and its adapters, are dropped."""
        self._check_role(role)
        with self.lock(role):
            self._cache[role] = obj
            self._drop_state(role)

    def unload(self, role: str) -> None:
        """Drop ``role``, every object derived from it and its LoRA adapters, and free their memory
        (garbage collection, and the CUDA allocator's cache when torch uses a GPU). Waits for a
        caller holding :meth:`lock` (``role``) to finish. The next :meth:`get` loads it again."""
        self._check_role(role)
        with self.lock(role):
            self._cache.pop(role, None)
            self._drop_state(role)
        free_memory()

    # ----------------------------------------------------------------------------------------
    # State built on loaded roles

    def lock(self, role: str) -> threading.RLock:
        """The role's use lock (re-entrant). Hold it around every run of a role whose state is
        shared between callers: the ``inpaint`` UNet's LoRA adapters are switched on for one enhance
        generation and off again, so enhance and the SD fill (displace, rotate) take ``lock("inpaint")``
        (the ControlNet-inpaint pipeline shares that UNet). :meth:`unload` takes it too."""
        self._check_role(role)
        return self._use_locks[role]

    def derived(self, key: Hashable, builder: Callable[[], Any], *, roles: Sequence[str]) -> Any:
        """The object stored under ``key``, built by ``builder()`` the first time (once, also with
        several threads asking). ``roles``: the roles it is built from; unloading or replacing any of
        them drops it, so it is built again from the new objects on the next call. The builder gets
        the role objects itself (``registry.get``)."""
        roles = tuple(roles)
        for r in roles:
            self._check_role(r)
        hit = self._derived.get(key)
        if hit is not None:
            return hit.value
        with self._state_lock:
            build_lock = self._build_locks.setdefault(key, threading.Lock())
        with build_lock:
            hit = self._derived.get(key)
            if hit is None:
                gens = self._generations(roles)
                hit = _Derived(builder(), roles)
                with self._state_lock:
                    if self._generations(roles) == gens:
                        self._derived[key] = hit
        return hit.value

    def adapters(self, role: str = "inpaint") -> "LoraAdapters":
        """The LoRA adapters loaded into ``role``'s pipeline (UNet and text encoder), kept across
        calls so switching LoRAs never re-reads a file; dropped with the role. Use them only while
        holding :meth:`lock` (``role``)."""
        gens = self._generations((role,))
        pipe = self.get(role)
        with self._state_lock:
            a = self._adapters.get(role)
            if a is None:
                a = LoraAdapters(pipe)
                if self._generations((role,)) == gens:
                    self._adapters[role] = a
            return a

    def _generations(self, roles: tuple[str, ...]) -> tuple[int, ...]:
        with self._state_lock:
            return tuple(self._generation[r] for r in roles)

    def _drop_state(self, role: str) -> None:
        with self._state_lock:
            self._generation[role] += 1
            self._adapters.pop(role, None)
            for key in [k for k, d in self._derived.items() if role in d.roles]:
                del self._derived[key]

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise KeyError(f"unknown model role {role!r} (roles: {', '.join(ROLES)})")

    # ----------------------------------------------------------------------------------------
    # Locating files

    @property
    def lock_path(self) -> Path:
        return self.settings.resolve_path(self.settings.paths.models_lock)

    def lock_entry(self, role: str) -> "LockEntry | None":
        """The role's entry in the models lock, if it was written for the role's current source."""
        src = self.source(role)
        if src.repo is None:
            return None
        try:
            entry = read_lock(self.lock_path).roles.get(role)
        except LockFileError as e:
            raise ModelLoadError(role, src.describe(), str(e)) from None
        return entry if entry is not None and entry.matches(src) else None

    def locate(self, role: str, *, download: bool = False) -> Path:
        """Local path of the role's directory or checkpoint file.

        Local sources must exist. Hub sources come from the HF cache, at the commit the models lock
        names when it has the role; files missing there are downloaded (only the files the role's
        loader reads) unless the process is offline, which is a ModelLoadError saying what to do.
        ``download``: ask the Hub even when a cached copy exists (no lock: the revision may have moved).
        """
        src = self.source(role)
        if src.path is not None:
            p = self.settings.resolve_path(src.path)
            if not p.exists():
                raise ModelLoadError(role, str(p), "local path does not exist",
                                     f"fix models.{role}.path in {self.settings.source_file or 'the settings'}")
            return p
        if role in self._locations and not download:
            return self._locations[role]
        p = self._hub_locate(role, src, download=download)
        self._locations[role] = p
        return p

    def _hub_locate(self, role: str, src: ModelSource, *, download: bool) -> Path:
        offline = self.settings.offline
        entry = self.lock_entry(role)
        if entry is None and not download:
            cached = self._hub_cached(src)
            if cached is not None:
                return cached
        plan = plan_role(role, src, functools.partial(role_files, role), entry=entry, offline=offline)
        if plan.missing:
            if offline:  # only a lock plan can have missing files offline
                raise ModelLoadError(role, src.describe(), f"{len(plan.missing)} of the files the models lock names "
                                     f"(commit {plan.commit[:12]}) are not in the local Hugging Face cache and "
                                     "offline mode is on",
                                     "run `product-studio models pull` where the Hub is reachable")
            fetch_plan(plan, src, hash_cached=False)
        return plan.location()

    def status(self, role: str) -> RoleStatus:
        """Whether the role's files are present locally, without loading or downloading."""
        src = self.source(role)
        try:
            if src.path is not None:
                return RoleStatus(role, src.describe(), src.licence, True, str(self.locate(role)))
            entry = self.lock_entry(role)
            if entry is not None:
                snap = snapshot_dir(hub_cache_dir(), entry.repo, entry.commit)
                missing = [f.path for f in entry.files if not (snap / f.path).is_file()]
                if missing:
                    return RoleStatus(role, src.describe(), src.licence, False, None,
                                      f"{len(missing)} locked file(s) not in the HF cache")
                return RoleStatus(role, src.describe(), src.licence, True,
                                  str(snap / src.filename if src.filename else snap))
            loc = self._hub_cached(src)
            if loc is None:
                return RoleStatus(role, src.describe(), src.licence, False, None, "not in the HF cache")
            return RoleStatus(role, src.describe(), src.licence, True, str(loc))
        except ModelLoadError as e:
            return RoleStatus(role, src.describe(), src.licence, False, None, e.reason)

    @staticmethod
    def _hub_cached(src: ModelSource) -> Path | None:
        """The cached snapshot (folder, or file for a ``filename`` source) of ``src``'s revision."""
        cache = hub_cache_dir()
        commit = cached_commit(cache, src.repo, src.revision)
        if commit is None:
            return None
        snap = snapshot_dir(cache, src.repo, commit)
        if src.filename:
            return snap / src.filename if (snap / src.filename).is_file() else None
        marker = ("config.json", "model_index.json")
        return snap if any((snap / m).is_file() for m in marker) else None

    def provenance(self, role: str) -> dict[str, Any]:
        """What a record should say about the model that produced it: role, source, licence and,
        for Hub sources, ``revision``: the commit the files came from."""
        src = self.source(role)
        info: dict[str, Any] = {"role": role, "source": src.describe(), "licence": src.licence}
        loc = self._locations.get(role) or (self.settings.resolve_path(src.path) if src.path else None)
        if src.repo and loc is not None:
            parts = Path(loc).parts
            if "snapshots" in parts:  # HF cache layout: .../snapshots/<commit>/...
                info["revision"] = parts[parts.index("snapshots") + 1]
        if src.repo and "revision" not in info:
            try:
                entry = self.lock_entry(role)
            except ModelLoadError:
                entry = None
            if entry is not None:
                info["revision"] = entry.commit
        if role in self._cache and ROLE_INFO[role][0] != "lora":  # a LoRA runs in its UNet's dtype
            info["dtype"] = self.role_dtype(role)
        return info

    def role_dtype(self, role: str) -> str:
        """The dtype the loaded ``role`` computes in, read from its modules' weights: one name
        (``"bfloat16"``) when all its parts agree, else each part's (``"unet bfloat16, vae
        float32"``). SAM under autocast says so (:func:`sam_dtype`). Loads the role if needed."""
        obj = self.get(role)
        if role == "sam":
            return sam_dtype(obj)
        if ROLE_INFO[role][0] == "lora":
            return self.verify(role)["dtype"]  # the file's; applied, it runs in the UNet's dtype
        parts: dict[str, str] = {}
        for name in ("unet", "controlnet", "text_encoder", "image_encoder", "cc_projection", "vae", "model"):
            m = getattr(obj, name, None)
            if m is not None and hasattr(m, "parameters"):
                parts[name] = _param_dtype(m)
        if not parts:
            parts = {"model": _param_dtype(obj)} if hasattr(obj, "parameters") else {}
        names = sorted(set(parts.values()))
        if len(names) == 1:
            return names[0]
        return ", ".join(f"{k} {v}" for k, v in parts.items()) or "unknown"

    # ----------------------------------------------------------------------------------------
    # Pulling

    def pull(self, role: str, *, dry_run: bool = False, on_bytes: Any = None,
             on_plan: Any = None) -> "PullResult":
        """Fetch the role into the HF cache: the files its loader reads, at the commit the models
        lock names (else the settings' revision, resolved now and written into the lock). Offline,
        a cached role is taken from the cache. SAM ``.pth`` is converted to safetensors.

        ``dry_run``: plan only (files, sizes, what is cached), download nothing, write nothing.
        ``on_plan(plan)`` is called before downloading, ``on_bytes(n)`` as bytes arrive.
        Raises ModelLoadError (one line: role, source, reason, hint)."""
        src = self.source(role)
        if src.path is not None:
            loc = self.locate(role)
            size = sum(p.stat().st_size for p in ([loc] if loc.is_file() else loc.rglob("*")) if p.is_file())
            if role == "sam" and loc.suffix == ".pth" and not dry_run:
                self.converted_sam_path(loc, create=True)
            return PullResult(role, src.describe(), "local", loc, None, [], size, 0)
        entry = self.lock_entry(role)
        plan = plan_role(role, src, functools.partial(role_files, role), entry=entry, offline=self.settings.offline)
        if dry_run:
            return PullResult(role, src.describe(), "plan", plan.location(), plan.commit, plan.files, plan.size,
                              plan.to_download, origin=plan.origin)
        if on_plan is not None:
            on_plan(plan)
        to_download = plan.to_download
        if plan.missing and self.settings.offline:
            raise ModelLoadError(role, src.describe(), f"{len(plan.missing)} locked file(s) at {plan.commit[:12]} are "
                                 "not in the local Hugging Face cache and offline mode is on",
                                 "run `product-studio models pull` where the Hub is reachable")
        new_entry = fetch_plan(plan, src, on_bytes=on_bytes, hash_cached=entry is None)
        if entry is None or entry != new_entry:
            try:
                write_lock_entry(self.lock_path, role, new_entry)
            except OSError as e:
                raise ModelLoadError(role, src.describe(), f"cannot write the models lock {self.lock_path}: {e}",
                                     "check paths.models_lock and its folder's permissions") from None
        loc = plan.location()
        self._locations[role] = loc
        if role == "sam" and loc.suffix == ".pth":
            try:
                self.converted_sam_path(loc, create=True)
            except OSError as e:
                raise ModelLoadError(role, src.describe(), f"converting {loc.name} to safetensors failed: {e}",
                                     "free space at paths.model_cache or fix its permissions") from None
        return PullResult(role, src.describe(), "downloaded" if to_download else "cached", loc, plan.commit,
                          plan.files, plan.size, to_download, origin=plan.origin)

    def check_files(self, role: str) -> list[str]:
        """Problems with the role's files on disk, checked against the models lock (size and SHA-256
        of every file) and against the known SHA-256 of published checkpoints (the SAM ViT-B .pth).
        Empty list: all good. Local sources are checked against known hashes only."""
        src = self.source(role)
        problems: list[str] = []
        if src.path is not None:
            return problems
        entry = self.lock_entry(role)
        if entry is None:
            loc = self._hub_cached(src)
            if loc is None:
                return ["not in the HF cache"]
            files = [(src.filename, loc, None)] if src.filename else []
            if not files:
                problems.append("not in the models lock (run `product-studio models pull`): hashes not checked")
        else:
            snap = snapshot_dir(hub_cache_dir(), entry.repo, entry.commit)
            files = [(f.path, snap / f.path, f) for f in entry.files]
        for name, path, locked in files:
            if not path.is_file():
                problems.append(f"{name}: missing from the HF cache")
                continue
            size = path.stat().st_size
            digest = file_sha256(path)
            if locked is not None and (size, digest) != (locked.size, locked.sha256):
                problems.append(f"{name}: SHA-256 {digest[:12]}... ({size} bytes) is not the locked "
                                f"{locked.sha256[:12]}... ({locked.size} bytes)")
            known = KNOWN_SHA256.get((src.repo, name))
            if known is not None and (digest, size) != known:
                problems.append(f"{name}: SHA-256 {digest[:12]}... is not the published {known[0][:12]}...")
        return problems

    def converted_sam_path(self, pth: Path, *, create: bool = False) -> Path | None:
        """safetensors twin of an official SAM .pth, kept in ``paths.model_cache``."""
        from safetensors.torch import save_file

        cache = self.settings.resolve_path(self.settings.paths.model_cache) / "sam"
        target = cache / f"{pth.stem}-{file_sha256(pth)[:12]}.safetensors"
        if target.exists():
            return target
        if not create:
            return None
        state = _torch_load_state(pth)
        with atomic_path(target) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        return target

    # ----------------------------------------------------------------------------------------
    # Loading

    def _load(self, role: str) -> Any:
        src = self.source(role)
        try:
            # Inside the try: a Hub or disk failure while fetching on first use is a ModelLoadError too.
            loc = self.locate(role)
            if src.sha256:
                self._check_sha256(role, src, loc)
            return getattr(self, f"_load_{role}")(loc)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - any library failure becomes one clear error
            raise ModelLoadError(role, src.describe(), f"{type(e).__name__}: {e}") from e

    def _check_sha256(self, role: str, src: ModelSource, loc: Path) -> None:
        """A pinned single-file checkpoint must hash to ``src.sha256``; anything else is refused."""
        if not loc.is_file():
            raise ModelLoadError(role, src.describe(), f"sha256 is pinned but {loc} is a folder, not one file",
                                 f"point models.{role} at the checkpoint file (filename: or a file path:)")
        got = file_sha256(loc)
        if got != src.sha256:
            raise ModelLoadError(role, src.describe(), f"SHA-256 of {loc} is {got}, expected {src.sha256}",
                                 "the file is damaged or not the pinned checkpoint: delete it and pull again, or "
                                 f"fix models.{role}.sha256 if you changed the checkpoint on purpose")

    def _place(self, module: Any, *, dtype: "torch.dtype | None" = None, cast: bool = True) -> Any:
        """Move to the runtime device; cast to ``dtype`` (default runtime dtype) unless ``cast`` is
        False (diffusers models are loaded in their dtype, which keeps their fp32-pinned layers)."""
        rt = self.runtime
        if not cast:
            return module.to(device=rt.device).eval()
        return module.to(device=rt.device, dtype=dtype or rt.dtype).eval()

    def _load_clip(self, loc: Path) -> ClipBundle:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(loc, local_files_only=True)
        return ClipBundle(self._place(model), CLIPProcessor.from_pretrained(loc, local_files_only=True))

    def _load_sam(self, loc: Path) -> Any:
        from pipeline.models.sam_loader import build_sam_from_state

        if loc.is_dir() and (loc / "config.json").is_file():
            return self._load_sam_hf(loc)
        if loc.is_dir():
            cands = sorted([*loc.glob("*.safetensors"), *loc.glob("*.pth")])
            if len(cands) != 1:
                raise ModelLoadError("sam", str(loc), f"expected one .safetensors or .pth file in the folder, found {len(cands)}")
            loc = cands[0]
        if loc.suffix == ".pth":
            loc = self.converted_sam_path(loc) or loc
        state = load_state_file(loc)
        model, model_type, image_size = build_sam_from_state(state, self.source("sam").model_type or "auto")
        # segment-anything's predictor feeds float32 tensors; SAM's weights stay float32 on every
        # device. With runtime.dtype bfloat16 its image encoder (nearly all of SAM's cost) runs
        # under bf16 autocast: 2.8x faster on CPUs with avx512_bf16 (python -m bench dtype).
        import torch

        model = self._place(model, dtype=torch.float32)
        if self.runtime.dtype == torch.bfloat16:
            model.image_encoder = AutocastEncoder(model.image_encoder, torch.bfloat16)
        return SamBundle(model, model_type, image_size)

    def _load_sam_hf(self, loc: Path) -> Any:
        """A transformers SAM-family repo as the ``sam`` role: the class its config.json's model_type
        names (SamModel, SamHQModel, Sam2Model, EdgeTamModel), float32 like segment-anything's SAM."""
        import torch
        import transformers

        family = hf_model_type(loc)
        if family not in HF_SAM_TYPES:
            raise ModelLoadError("sam", str(loc), f"config.json model_type {family!r} is not a SAM-family segmenter "
                                 f"({', '.join(HF_SAM_TYPES)})", "point models.sam at a SAM-family repo")
        if family.startswith("edgetam") and importlib.util.find_spec("timm") is None:
            raise ModelLoadError("sam", str(loc), "EdgeTAM's RepViT image encoder needs the `timm` package",
                                 "pip install 'product-studio[edgetam]' (or timm), or choose another segmenter")
        cls = HF_SAM_CLASSES[family]
        model = getattr(transformers, cls).from_pretrained(loc, local_files_only=True)
        proc = transformers.AutoProcessor.from_pretrained(loc, local_files_only=True)
        # a video repo's processor (Sam2VideoProcessor) preprocesses a single image as Sam2Processor does
        return HFSamBundle(self._place(model, dtype=torch.float32), proc, family.removesuffix("_video"))

    def _load_grounding(self, loc: Path) -> HFBundle:
        return self._load_hf(loc, "AutoModelForZeroShotObjectDetection", "AutoProcessor")

    def _load_clipseg(self, loc: Path) -> HFBundle:
        return self._load_hf(loc, "CLIPSegForImageSegmentation", "CLIPSegProcessor")

    def _load_sam3(self, loc: Path) -> HFBundle:
        return self._load_hf(loc, "Sam3Model", "Sam3Processor")

    def _configure_pipeline(self, pipe: Any) -> Any:
        rt = self.runtime
        pipe.set_progress_bar_config(disable=True)
        if rt.offload == "model":
            pipe.enable_model_cpu_offload(device=rt.device)
        elif rt.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=rt.device)
        else:
            pipe.to(rt.device)
        if self.settings.runtime.vae_tiling:
            pipe.vae.enable_tiling()
        return pipe

    def _load_sd(self, loc: Path, use: str, role: str) -> Any:
        """The diffusers pipeline of ``loc``'s family (:mod:`pipeline.models.families`: SD 1.x, SD 2.x or
        SDXL, read from model_index.json and the UNet config) for ``use`` (``base`` or ``inpaint``),
        with every component that family needs (SDXL: both text encoders and tokenizers)."""
        import diffusers

        if not (loc / "model_index.json").is_file():
            raise ModelLoadError(role, str(loc), "not a diffusers pipeline folder: no model_index.json")
        try:
            family, index_cls, unet_cfg = family_of_dir(loc)
        except FileNotFoundError as e:
            raise ModelLoadError(role, str(loc), f"not a Stable Diffusion layout: {e.filename} is missing") from None
        index = json.loads((loc / "model_index.json").read_text())
        missing = [c for c in family.components if not (loc / c).is_dir()]
        if missing:
            raise ModelLoadError(role, str(loc), f"not a {family.title} layout: missing {', '.join(missing)}/")
        want_cls = getattr(family, use)
        in_ch = unet_cfg.get("in_channels")
        if use == "inpaint" and in_ch != 9:
            raise ModelLoadError(role, str(loc), f"{index_cls or family.title} has a {in_ch}-channel UNet; the "
                                 "inpaint role needs an inpainting checkpoint (9 input channels)")
        cls = getattr(diffusers, want_cls)
        # Only the family's components (what `pull` fetched); the others (safety checker, its
        # feature extractor, an image encoder) are passed as None so diffusers never looks for them.
        skip = {k: None for k, v in index.items() if isinstance(v, list) and k not in family.components}
        extra = {"requires_safety_checker": False} if not family.two_text_encoders else {}
        pipe = cls.from_pretrained(loc, dtype=self.runtime.diffusion_dtype, local_files_only=True, **skip, **extra)
        return self._configure_pipeline(pipe)

    def _load_base(self, loc: Path) -> Any:
        return self._load_sd(loc, "base", "base")

    def _load_inpaint(self, loc: Path) -> Any:
        return self._load_sd(loc, "inpaint", "inpaint")

    def family(self, role: str = "inpaint") -> Any:
        """The :class:`pipeline.models.families.Family` of a diffusers SD role (read from its files, not
        loaded). Raises ModelLoadError."""
        loc = self.locate(role)
        try:
            return family_of_dir(loc)[0]
        except (OSError, ValueError) as e:
            raise ModelLoadError(role, self.source(role).describe(), f"cannot read its model_index.json / "
                                 f"unet/config.json: {e}") from None

    def native_resolution(self, role: str = "inpaint") -> int:
        """The long side, px, the diffusers SD ``role`` (``inpaint`` or ``base``) works at natively
        (:func:`pipeline.models.families.native_resolution`: UNet ``sample_size`` x the VAE's
        downscale). Read from the loaded pipeline when the role is loaded (or was :meth:`put`),
        else from its files without loading it. Raises ModelLoadError."""
        obj = self._cache.get(role)
        if obj is not None and hasattr(obj, "unet") and hasattr(obj, "vae"):
            unet_cfg = dict(obj.unet.config)
            return native_resolution(unet_cfg, dict(obj.vae.config), family_of_config(unet_cfg, type(obj).__name__))
        loc = self.locate(role)
        try:
            fam, _, unet_cfg = family_of_dir(loc)
            vae_cfg = read_vae_config(loc)
        except (OSError, ValueError) as e:
            raise ModelLoadError(role, self.source(role).describe(), f"cannot read its model_index.json / "
                                 f"unet/config.json / vae/config.json: {e}") from None
        return native_resolution(unet_cfg, vae_cfg, fam)

    def work_resolution(self, setting: int | str, role: str = "inpaint") -> int:
        """The work size (long side, px) a ``resolution`` setting means
        (:data:`pipeline.settings.Resolution`): a number as given, ``auto`` the ``role``'s
        :meth:`native_resolution` (the files are read only then). Raises ModelLoadError."""
        if setting == AUTO_RESOLUTION:
            return self.native_resolution(role)
        return int(setting)

    def _inpaint_unet_config(self) -> tuple[dict[str, Any], str]:
        """(the inpaint role's UNet config, its source) read from disk without loading the role."""
        src = self.source("inpaint").describe()
        try:
            return read_unet_config(self.locate("inpaint")), src
        except (OSError, ValueError) as e:
            raise ModelLoadError("inpaint", src, f"cannot read unet/config.json: {e}") from None

    def _load_inpaint_fill(self, loc: Path) -> Any:
        """The LaMa TorchScript module (``torch.jit.load``, as IOPaint loads ``big-lama.pt``) on the
        runtime device, always float32: its Fourier convolutions run torch.fft, whose half-precision
        CUDA kernels only take power-of-two sizes, and the crops here are any multiple of 8."""
        import torch

        if loc.is_dir():
            cands = sorted(loc.glob("*.pt"))
            if len(cands) != 1:
                raise ModelLoadError("inpaint_fill", str(loc), f"expected one .pt TorchScript file in the folder, "
                                     f"found {len(cands)}")
            loc = cands[0]
        # map_location cpu first: a file traced on a GPU must still load on a CPU-only machine.
        # torch marks TorchScript deprecated, but the published checkpoint is TorchScript.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            module = torch.jit.load(str(loc), map_location="cpu")
        return module.to(device=self.runtime.device, dtype=torch.float32).eval()

    def _load_accel_lora(self, role: str, loc: Path) -> Any:
        """An acceleration LoRA role as a checked :class:`pipeline.models.lora_weights.LoraSpec` (weight 1;
        :func:`pipeline.models.samplers.sampling` sets the configured one). The file is loaded into the
        inpaint UNet by the registry's adapters when a sampler first uses it. A folder holds
        ``pytorch_lora_weights.safetensors`` (the lcm-lora / TCD repos' layout) or one .safetensors."""
        if loc.is_dir():
            cands = [loc / "pytorch_lora_weights.safetensors"]
            if not cands[0].is_file():
                cands = sorted(loc.glob("*.safetensors"))
            if len(cands) != 1:
                raise ModelLoadError(role, str(loc), f"expected one .safetensors LoRA file in the folder, "
                                     f"found {len(cands)}")
            loc = cands[0]
        spec = load_spec(loc, 1.0)
        # Made for the inpaint model's family? Refused here (and by `models verify`), not mid-image.
        unet_cfg, inpaint_src = self._inpaint_unet_config()
        why = check_lora(loc, unet_cfg, has_text_encoder_2=self.family("inpaint").two_text_encoders,
                         target=f"inpaint {inpaint_src}")
        if why:
            raise ModelLoadError(role, str(loc), why, f"use the {role} made for the inpaint model's family")
        return spec

    def _load_lcm_lora(self, loc: Path) -> Any:
        return self._load_accel_lora("lcm_lora", loc)

    def _load_tcd_lora(self, loc: Path) -> Any:
        return self._load_accel_lora("tcd_lora", loc)

    def _load_hyper_lora(self, loc: Path) -> Any:
        return self._load_accel_lora("hyper_lora", loc)

    def _load_controlnet_depth(self, loc: Path) -> Any:
        from diffusers import ControlNetModel

        # The ControlNet must fit the inpaint UNet it steers: checked from both configs before
        # anything is built, so a wrong pairing fails `models verify`, never in the middle of an image.
        try:
            cn_cfg = json.loads((loc / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError("controlnet_depth", str(loc), f"cannot read config.json: {e}") from None
        unet_cfg, inpaint_src = self._inpaint_unet_config()
        check_controlnet(cn_cfg, unet_cfg, source=self.source("controlnet_depth").describe(),
                         inpaint_source=inpaint_src)
        model = ControlNetModel.from_pretrained(loc, dtype=self.runtime.diffusion_dtype, local_files_only=True)
        # With CPU offload the pipeline that uses it moves it; otherwise it lives on the device.
        return model.eval() if self.runtime.offload != "off" else self._place(model, cast=False)

    def _load_hf(self, loc: Path, auto_model: str, auto_processor: str = "AutoImageProcessor",
                 dtype: "torch.dtype | None" = None) -> HFBundle:
        import transformers

        model = getattr(transformers, auto_model).from_pretrained(loc, local_files_only=True)
        proc = getattr(transformers, auto_processor).from_pretrained(loc, local_files_only=True)
        return HFBundle(self._place(model, dtype=dtype), proc)

    def _load_depth(self, loc: Path) -> HFBundle:
        return self._load_hf(loc, "AutoModelForDepthEstimation")

    def _load_upscaler(self, loc: Path) -> HFBundle:
        import torch

        # Swin2SR's residual arithmetic loses visible detail in fp16; it is small, keep fp32.
        return self._load_hf(loc, "AutoModelForImageToImage", dtype=torch.float32)

    def _load_captioner(self, loc: Path) -> HFBundle:
        return self._load_hf(loc, "AutoModelForImageTextToText", "AutoProcessor")

    def _load_matting(self, loc: Path) -> HFBundle:
        import torch

        # Small (25M parameters) and its alpha feeds an 8-bit composite: keep fp32.
        return self._load_hf(loc, "VitMatteForImageMatting", "VitMatteImageProcessor", dtype=torch.float32)

    def _load_novel_view(self, loc: Path) -> NovelViewComponents:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from pipeline.models.novel_view_layout import COMPONENTS, CCProjection

        missing = [c for c in COMPONENTS if not (loc / c).is_dir()]
        if missing:
            raise ModelLoadError("novel_view", str(loc), f"not a Zero123 layout: missing {', '.join(missing)}/")
        dt = self.runtime.diffusion_dtype
        kw = dict(local_files_only=True)
        return NovelViewComponents(
            vae=self._place(AutoencoderKL.from_pretrained(loc / "vae", dtype=dt, **kw), cast=False),
            image_encoder=self._place(CLIPVisionModelWithProjection.from_pretrained(loc / "image_encoder", **kw), dtype=dt),
            unet=self._place(UNet2DConditionModel.from_pretrained(loc / "unet", dtype=dt, **kw), cast=False),
            scheduler=DDIMScheduler.from_pretrained(loc / "scheduler", **kw),
            feature_extractor=CLIPImageProcessor.from_pretrained(loc / "feature_extractor", **kw),
            cc_projection=self._place(CCProjection.from_pretrained(loc / "cc_projection", dtype=dt, **kw), cast=False),
        )

    # ----------------------------------------------------------------------------------------
    def verify(self, role: str) -> dict[str, Any]:
        """Load the role (if not yet) and report what was loaded. Raises ModelLoadError."""
        obj = self.get(role)
        if ROLE_INFO[role][0] == "lora":  # a checked file, loaded into the inpaint UNet when used
            from safetensors import safe_open

            params, dtypes = 0, set()
            with safe_open(str(obj.path), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    params += math.prod(sl.get_shape())
                    dtypes.add(str(sl.get_dtype()).lower().replace("f32", "float32").replace("f16", "float16")
                               .replace("bf16", "bfloat16"))
            return {"role": role, "class": f"LoRA ({obj.format})", "parameters": params, "device": "cpu",
                    "dtype": ",".join(sorted(dtypes)), "sha256": obj.sha256,
                    "seconds": round(self.load_seconds.get(role, 0.0), 3)}
        params = 0
        for m in _modules_of(obj):
            params += sum(p.numel() for p in m.parameters())
        rt = self.runtime
        extra: dict[str, Any] = {}
        if role in ("inpaint", "base"):
            fam = self.family(role)
            extra["family"] = fam.name
            native = self.native_resolution(role)
            extra["native_resolution"] = native
            if role == "inpaint":
                # The sizes left at auto work at the native size; only explicit ones that differ
                # are worth a word.
                st = self.settings
                sizes = {"enhance.resolution": st.enhance.resolution,
                         "displace.fill.resolution": st.displace.fill.resolution,
                         "rotate.fill.resolution": st.rotate.fill.resolution,
                         "background.resolution": st.background.resolution}
                off = [f"{k} {v}" for k, v in sizes.items() if v != AUTO_RESOLUTION and v != native]
                if off:
                    extra["note"] = (f"{fam.title} checkpoint works natively at {native} px; set explicitly: "
                                     f"{', '.join(off)} (auto, the default, uses the native size)")
        return {**extra,
            "role": role,
            "class": type(getattr(obj, "model", obj)).__name__,
            "parameters": params,
            "device": str(rt.device),
            "dtype": self.role_dtype(role),
            "seconds": round(self.load_seconds.get(role, 0.0), 3),
        }


def _param_dtype(module: Any) -> str:
    """The dtype of ``module``'s first floating-point weight (torch.jit modules included)."""
    for prm in module.parameters():
        if prm.is_floating_point():
            return str(prm.dtype).replace("torch.", "")
    return "unknown"


def free_memory() -> None:
    """Collect garbage now (a dropped pipeline's modules form reference cycles) and hand the CUDA
    allocator's cached blocks back when torch runs on a GPU, so an unloaded model's memory is free."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def quiet_libraries() -> None:
    """Library progress bars would interleave with ours (rich) and flood daemon logs."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def _modules_of(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.nn.Module):
        return [obj]
    if hasattr(obj, "components"):  # diffusers pipeline
        return [c for c in obj.components.values() if isinstance(c, torch.nn.Module)]
    vals = vars(obj).values() if hasattr(obj, "__dict__") else []
    return [v for v in vals if isinstance(v, torch.nn.Module)]


def _torch_load_state(path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    # weights_only: a checkpoint is data; never let it run code.
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path.name} is not a state dict of tensors")
    return obj


def load_state_file(path: Path) -> dict[str, "torch.Tensor"]:
    """A state dict from ``.safetensors`` (preferred) or a pickled ``.pth``/``.bin`` (weights only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in {".pth", ".pt", ".bin"}:
        return _torch_load_state(path)
    raise ValueError(f"unsupported checkpoint format {path.suffix!r} (use .safetensors or .pth)")


def describe_cache_state(reg: ModelRegistry) -> list[RoleStatus]:
    return [reg.status(r) for r in ROLES]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
