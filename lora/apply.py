"""Using trained LoRAs on the registry's shared pipelines, without leaving them changed.

The registry keeps one warm pipeline per role for the whole process, so a LoRA is active for one
call only. The adapter mechanics are enhance's (:class:`pipeline.models.lora_weights.LoraAdapters`:
files checked and hashed before any model runs, adapters named by content and kept loaded, exactly
the asked-for ones active, every LoRA layer disabled afterwards); this module adds one adapter
manager and lock per pipeline for the commands outside enhance (``generate``), and reads the
activation tag a trained LoRA carries (its manifest, or kohya metadata).
"""

from __future__ import annotations

import json
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.models.lora_weights import LoraAdapters, LoraError, LoraSpec, parse_lora

__all__ = ["LoraError", "LoraSpec", "applied_loras", "lora_tag", "manifest_for", "parse_lora"]

# One manager and one lock per pipeline object: adapter state is global to its UNet.
_managers: "weakref.WeakKeyDictionary[Any, tuple[LoraAdapters, threading.RLock]]" = weakref.WeakKeyDictionary()
_managers_guard = threading.Lock()


def _manager(pipe: Any) -> tuple[LoraAdapters, threading.RLock]:
    with _managers_guard:
        m = _managers.get(pipe)
        if m is None:
            m = _managers[pipe] = (LoraAdapters(pipe), threading.RLock())
        return m


@contextmanager
def applied_loras(pipe: Any, specs: Sequence[LoraSpec]) -> Iterator[list[dict[str, Any]]]:
    """Make exactly ``specs`` (from :func:`parse_lora`) active on ``pipe`` for the block.

    Yields one record per LoRA (file, sha256, weight, format, adapter; plus ``tag``). On exit, also
    on error, every LoRA layer of the pipeline is disabled again, so the next user of the shared
    pipeline computes exactly as without LoRAs. Holds the pipeline's lock for the whole block.
    Raises :class:`LoraError` for a file that does not fit the pipeline's model."""
    adapters, lock = _manager(pipe)
    with lock:
        try:
            records = adapters.activate(list(specs))
            yield [{**r, "tag": lora_tag(Path(r["file"]))} for r in records]
        finally:
            adapters.deactivate()


def manifest_for(path: Path) -> dict[str, Any] | None:
    """The training manifest beside a LoRA (``NAME.json`` for ``NAME.safetensors`` or
    ``NAME.kohya.safetensors``), or None."""
    path = Path(path)
    stem = path.name.removesuffix(".safetensors").removesuffix(".kohya")
    m = path.with_name(stem + ".json")
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lora_tag(path: Path) -> str | None:
    """Activation tag of a LoRA: from its manifest, else its ``ps_activation_tag`` or single-tag
    ``ss_tag_frequency`` metadata (kohya files), else None."""
    man = manifest_for(path)
    if man and isinstance(man.get("tag"), str):
        return man["tag"]
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a tag is a convenience; a bad file fails later, loudly
        return None
    if meta.get("ps_activation_tag"):
        return meta["ps_activation_tag"]
    try:
        freq = json.loads(meta.get("ss_tag_frequency", "{}"))
        tags = [t for d in freq.values() for t in d]
        return tags[0] if len(tags) == 1 else None
    except (ValueError, AttributeError, TypeError):
        return None
