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
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.errors import BadInput
from pipeline.hashing import cached_file_sha256

__all__ = ["LoraAdapters", "LoraError", "LoraSpec", "MAX_WEIGHT", "check_unique", "load_spec",
           "parse_lora", "split_entry", "split_spec"]

LORA_SUFFIX = ".safetensors"
MAX_WEIGHT = 10.0
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# A weight is the text after the last ':' only when it is a plain decimal number, so Windows drive
# letters ("C:\\loras\\x.safetensors") and other colons stay part of the path.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class LoraError(BadInput):
    """A LoRA file or spec that cannot be used; ``str()`` names the file and the reason."""


def split_spec(text: str) -> tuple[str, float]:
    """``"FILE[:WEIGHT]"`` -> ``(FILE, WEIGHT)``; the weight defaults to 1.0.

    The weight is the part after the **last** colon, and only when it parses as a decimal number
    (``0.8``, ``-1``, ``1e-1``); otherwise the whole text is the file name. Raises
    :class:`LoraError` for an empty spec or a weight outside ``[-MAX_WEIGHT, MAX_WEIGHT]``.
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
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise LoraError(f"LoRA {path}: weight {weight:g} is outside -{MAX_WEIGHT:g} .. {MAX_WEIGHT:g}")
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
        if not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise LoraError(f"LoRA {path}: weight {w:g} is outside -{MAX_WEIGHT:g} .. {MAX_WEIGHT:g}")
        return path, float(w)
    return split_spec(item)


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
        comps = {"unet" if k.startswith("lora_unet_") else "text_encoder" for k in keys}
    else:
        fmt = "diffusers"
        comps = {"text_encoder" if k.startswith(("text_encoder.", "te.")) else "unet" for k in keys}
    return fmt, tuple(sorted(comps, key=["unet", "text_encoder"].index))


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
            raise LoraError(f"expected a LoraSpec (see pipeline.lora_weights.parse_lora), got {s!r}")
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

    def _load(self, spec: LoraSpec) -> None:
        name = spec.adapter_name
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
                            "is it made for this base model (SD 1.5)?") from e
        if name not in self._present():
            raise LoraError(f"LoRA file {spec.path} matched no layer of the model; is it made for this base "
                            "model (SD 1.5)?")
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

        for comp in ("unet", "text_encoder"):
            model = getattr(self.pipe, comp, None)
            if model is None or not getattr(model, "peft_config", None):
                continue
            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m.enable_adapters(enabled)
