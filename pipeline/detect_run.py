"""Run detection over files and folders and write the outputs: the shared core of `detect` and `demo`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.imageio import ImageLoadError, is_image_name, load_image
from pipeline.outputs import OutputFolder, write_detect_outputs, write_failure
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


def detect_paths(paths: Sequence[Path], detector: Any, settings: Settings, out_dir: Path,
                 classes: Sequence[ProductClass], *, proposals: str | None = None,
                 prefilter: bool | None = None, provenance: list[dict] | None = None) -> Iterable[Outcome]:
    """Yield one :class:`Outcome` per input; a bad input is a ``failed`` outcome, never an exception.
    Records: ``out_dir/STEM.json`` (detected), ``out_dir/skipped/``, ``out_dir/failed/``; running
    again over the same files replaces their outputs, another file of the same name gets its own."""
    folder = OutputFolder(out_dir, "replace-own")
    extra = {"models": provenance or [], "settings_file": str(settings.source_file) if settings.source_file else None,
             "classes": [c.model_dump() for c in classes]}
    for path in paths:
        stem = folder.claim(path.name, source=str(path))
        try:
            loaded = load_image(path, max_pixels=settings.limits.max_pixels)
        except ImageLoadError as e:
            yield Outcome(path, "failed", write_failure(out_dir, stem, str(path), str(e), extra), stem)
            continue
        result = detector.detect(loaded.image, classes, proposals=proposals, prefilter=prefilter)
        rec = write_detect_outputs(out_dir, stem, loaded, result, extra)
        yield Outcome(path, rec["status"], rec, stem)
