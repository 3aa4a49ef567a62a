"""Detection over files and folders through the one runner: the core of `detect`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.io.imageio import is_image_name
from pipeline.io.outputs import OutputFolder
from pipeline.settings import ProductClass, Settings


def expand_inputs(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (by suffix, sorted, not recursive).
    Hidden and AppleDouble (``._x``) files are skipped."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir()
                              if f.is_file() and is_image_name(f) and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


def resolve_classes(settings: Settings, names: Sequence[str] | None) -> list[ProductClass]:
    """The configured classes, or the named subset. A name not in the settings becomes an ad-hoc
    class with default threshold (so `--classes mug` works without editing settings)."""
    if not names:
        return list(settings.detect.classes)
    known = {c.name: c for c in settings.detect.classes}
    return [known.get(n) or ProductClass(name=n) for n in names]


@dataclass
class Outcome:
    source: Path
    status: str  # detected | skipped | failed
    record: dict[str, Any]
    stem: str


def detect_paths(paths: Sequence[Path], processor: Any, out_dir: Path, *, proposals: str | None = None,
                 prefilter: bool | None = None) -> Iterable[Outcome]:
    """Detect over ``paths`` with the one runner (``processor.process(..., detect_only=True)``),
    yielding one :class:`Outcome` per input; a bad input is a ``failed`` outcome, never an
    exception. Records: ``out_dir/STEM.json`` (detected), ``out_dir/skipped/``,
    ``out_dir/failed/``; running again over the same files replaces their outputs, another file
    of the same name gets its own stem."""
    folder = OutputFolder(out_dir, "replace-own")
    opts = {k: v for k, v in (("proposals", proposals), ("prefilter", prefilter)) if v is not None}
    for path in paths:
        stem = folder.claim(path.name, source=str(path))
        rec = processor.process(path, out_dir, stem=stem, detect_only=True, detect_options=opts)
        yield Outcome(path, rec["status"], rec, stem)
