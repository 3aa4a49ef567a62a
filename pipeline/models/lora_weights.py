"""LoRA files for enhance: parse ``FILE[:WEIGHT]``, check each file before any model runs, and keep
the adapters loaded in a diffusers pipeline so that switching classes never re-reads a file.

Files are ``.safetensors`` only (pickled ``.ckpt``/``.pt``/``.bin`` files can run code when
loaded). Both layouts load: diffusers/peft (``unet.down_blocks...lora_A.weight``, what
``StableDiffusionPipeline.save_lora_weights`` writes) and kohya/A1111
(``lora_unet_down_blocks_1_..._to_q.lora_down.weight`` + ``.lora_up.weight`` + ``.alpha``, plus
``lora_te_...`` text-encoder keys), which diffusers converts on load.

An adapter is named after the file's content (``lora_`` + the first 16 hex digits of its SHA-256),
so the same file under two paths is loaded once and a changed file under the same path is a new
adapter. :class:`LoraAdapters` activates exactly the adapters one call asks for, with their
weights, and disables every LoRA layer afterwards, so other users of the same UNet (the SD fill of
displace/rotate) never see a LoRA.

This module imports nothing heavy at the top: ``pipeline.settings`` uses :func:`split_spec` to
check LoRA entries when a settings file is read.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.errors import LoraError
from pipeline.settings import MAX_LORA_WEIGHT as MAX_WEIGHT, split_entry, split_spec
from pipeline.models.families import check_lora, family_of_config
from pipeline.io.hashing import cached_file_sha256

__all__ = ["LoraAdapters", "LoraError", "LoraSpec", "MAX_WEIGHT", "check_unique", "load_spec",
           "parse_lora", "split_entry", "split_spec"]

LORA_SUFFIX = ".safetensors"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: an existing ``.safetensors`` file, its weight and content hash.

    ``format``: ``"kohya"`` (``lora_unet_*`` / ``lora_te_*`` keys) or ``"diffusers"``;
    ``components``: which models it holds layers for (``"unet"``, ``"text_encoder"``).
    """

    path: Path
    weight: float
    sha256: str
    format: str = "diffusers"
    components: tuple[str, ...] = ("unet",)

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.sha256[:16]}"

    def to_record(self) -> dict[str, Any]:
        return {"file": str(self.path), "sha256": self.sha256, "weight": self.weight, "format": self.format,
                "components": list(self.components), "adapter": self.adapter_name}


def _inspect(path: Path) -> tuple[str, tuple[str, ...]]:
    """(format, components) from the file's key names; reads only the safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any reader failure means the same to the user
        raise LoraError(f"LoRA file {path}: not a readable safetensors file ({e})") from None
    if not any("lora" in k.lower() for k in keys):
        raise LoraError(f"LoRA file {path}: holds no LoRA weights ({len(keys)} tensors, none named '*lora*')")
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        fmt = "kohya"
        comps = {"unet" if k.startswith("lora_unet_") else "text_encoder_2" if k.startswith("lora_te2_")
                 else "text_encoder" for k in keys}
    else:
        fmt = "diffusers"
        comps = {"text_encoder_2" if k.startswith(("text_encoder_2.", "te2.")) else
                 "text_encoder" if k.startswith(("text_encoder.", "te.", "te1.")) else "unet" for k in keys}
    return fmt, tuple(sorted(comps, key=["unet", "text_encoder", "text_encoder_2"].index))


def load_spec(path: str | os.PathLike, weight: float = 1.0) -> LoraSpec:
    """Check a LoRA file (exists, ``.safetensors``, holds LoRA tensors) and hash it.

    Raises :class:`LoraError` naming the file and what is wrong. Reads the header and hashes the
    file; never builds a model.
    """
    p = Path(path).expanduser()
    if not math.isfinite(float(weight)) or abs(float(weight)) > MAX_WEIGHT:
        raise LoraError(f"LoRA {p}: weight {weight} is outside -{MAX_WEIGHT:g} .. {MAX_WEIGHT:g}")
    if not p.exists():
        raise LoraError(f"LoRA file not found: {p}")
    if not p.is_file():
        raise LoraError(f"LoRA path is not a file: {p}")
    if p.suffix.lower() != LORA_SUFFIX:
        raise LoraError(f"LoRA file {p}: only {LORA_SUFFIX} files are loaded (pickled .ckpt/.pt/.bin files can "
                        "run code when opened; convert it to safetensors)")
    fmt, comps = _inspect(p)
    return LoraSpec(p.resolve(), float(weight), cached_file_sha256(p), fmt, comps)


def parse_lora(text: Any, bases: Sequence[str | os.PathLike | None] = (None,)) -> LoraSpec:
    """``"FILE[:WEIGHT]"`` (or ``{path: FILE, weight: W}``, or an existing :class:`LoraSpec`,
    returned as is) -> a checked :class:`LoraSpec`.

    A relative FILE is looked up against each of ``bases`` in turn (``None`` = the working
    directory); the first that exists wins. Raises :class:`LoraError` (naming every place looked
    at) when none does, or when the file is not a usable LoRA.
    """
    if isinstance(text, LoraSpec):
        return text
    name, weight = split_entry(text)
    p = Path(name).expanduser()
    if p.is_absolute():
        return load_spec(p, weight)
    tried = []
    for base in bases:
        cand = p if base is None else Path(base) / p
        if cand.exists():
            return load_spec(cand, weight)
        tried.append(str(cand.absolute()))
    raise LoraError(f"LoRA file not found: {name} (looked at {', '.join(dict.fromkeys(tried))})")


def check_unique(specs: Iterable[LoraSpec]) -> list[LoraSpec]:
    """The specs as a list; the same file content twice is an error (give one weight instead)."""
    out: list[LoraSpec] = []
    seen: dict[str, LoraSpec] = {}
    for s in specs:
        if not isinstance(s, LoraSpec):
            raise LoraError(f"expected a LoraSpec (see pipeline.models.lora_weights.parse_lora), got {s!r}")
        if s.sha256 in seen:
            raise LoraError(f"LoRA {s.path} is given twice (same content as {seen[s.sha256].path}); "
                            "give it once with the combined weight")
        seen[s.sha256] = s
        out.append(s)
    return out


class LoraAdapters:
    """The LoRA adapters loaded into one diffusers SD pipeline's UNet and text encoder.

    Every pipeline built from the same components (the ControlNet inpaint pipeline shares the
    inpaint pipeline's UNet and text encoder) sees the same adapters. Not thread-safe on its own:
    the caller holds one lock around :meth:`activate`, the generation and :meth:`deactivate`,
    because adapter state is global to the shared UNet.

    ``max_loaded``: least recently used adapters beyond this many are deleted from the model.
    """

    def __init__(self, pipe: Any, max_loaded: int = 16):
        self.pipe = pipe
        self.max_loaded = max(1, int(max_loaded))
        self._loaded: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name, oldest first
        self.loads = 0  # files read into the model so far (tests check that switching does not reload)

    @property
    def loaded(self) -> list[str]:
        """Adapter names currently in the model, oldest use first."""
        return list(self._loaded.values())

    def _present(self) -> set[str]:
        try:
            lists = self.pipe.get_list_adapters()
        except ValueError:
            return set()
        return {a for names in lists.values() for a in names}

    def _check_family(self, spec: LoraSpec) -> None:
        """Refuse a LoRA made for another SD family (SD 1.x / 2.x / SDXL) before it is loaded."""
        unet = getattr(self.pipe, "unet", None)
        if unet is None:
            return
        cfg = dict(unet.config)
        fam = family_of_config(cfg, type(self.pipe).__name__)
        why = check_lora(spec.path, cfg, has_text_encoder_2=getattr(self.pipe, "text_encoder_2", None) is not None,
                         target=f"the {fam.title} pipeline ({type(self.pipe).__name__}), cross_attention_dim")
        if why:
            raise LoraError(f"LoRA file {spec.path} does not fit this model: {why}")

    def _load(self, spec: LoraSpec) -> None:
        name = spec.adapter_name
        self._check_family(spec)
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters is the design here.
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                # ... and, when a load fails, that it removed the half-made adapter.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                self.pipe.load_lora_weights(str(spec.path.parent), weight_name=spec.path.name, adapter_name=name,
                                            local_files_only=True)
        except Exception as e:  # noqa: BLE001 - diffusers/peft raise many types for a bad file
            self._drop(name)
            raise LoraError(f"LoRA file {spec.path} could not be loaded into the model ({type(e).__name__}: {e}); "
                            "is it made for this base model's family?") from e
        if name not in self._present():
            raise LoraError(f"LoRA file {spec.path} matched no layer of the model; is it made for this base "
                            "model's family?")
        self.loads += 1
        self._loaded[spec.sha256] = name

    def _drop(self, name: str) -> None:
        # A half-loaded adapter would otherwise be picked up by a later set_adapters.
        if name in self._present():
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                    self.pipe.delete_adapters([name])
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass

    def _evict(self, keep: set[str]) -> None:
        while len(self._loaded) > self.max_loaded:
            sha = next((k for k in self._loaded if k not in keep), None)
            if sha is None:
                return
            self._drop(self._loaded.pop(sha))

    def activate(self, specs: Sequence[LoraSpec]) -> list[dict[str, Any]]:
        """Make exactly ``specs`` active with their weights (all other adapters inactive; none
        loaded: every LoRA layer disabled). Loads files not yet in the model. Returns one record per
        spec (its :meth:`LoraSpec.to_record` plus ``cached`` and ``load_s``)."""
        specs = check_unique(specs)
        present = self._present()
        for sha, name in list(self._loaded.items()):
            if name not in present:  # deleted behind our back (another manager of this UNet)
                del self._loaded[sha]
        records = []
        for s in specs:
            t0 = time.perf_counter()
            cached = s.sha256 in self._loaded
            if cached:
                self._loaded.move_to_end(s.sha256)
            elif s.adapter_name in present:
                # Already in the model (another manager of the same UNet): the name is the
                # content hash, so it is this very file.
                self._loaded[s.sha256] = s.adapter_name
                cached = True
            else:
                self._load(s)
            records.append({**s.to_record(), "cached": cached, "load_s": round(time.perf_counter() - t0, 4)})
        self._evict({s.sha256 for s in specs})
        if specs:
            self._enable_layers(True)
            self.pipe.set_adapters([s.adapter_name for s in specs], [s.weight for s in specs])
        else:
            self.deactivate()
        return records

    def deactivate(self) -> None:
        """Disable every LoRA layer (the model then computes exactly as without adapters)."""
        self._enable_layers(False)

    def _enable_layers(self, enabled: bool) -> None:
        # Layer by layer rather than pipe.enable_lora()/disable_lora(): those raise for a UNet that
        # holds no adapter (a text-encoder-only LoRA), and a disabled layer is exactly the base layer.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, comp, None)
            if model is None or not getattr(model, "peft_config", None):
                continue
            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m.enable_adapters(enabled)
