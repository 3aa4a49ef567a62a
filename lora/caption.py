"""`caption`: write BLIP captions (the ``captioner`` role) next to a dataset's images.

Writes ``STEM.txt`` (or another extension) beside each image the dataset scan finds (top level and
``N_name`` folders), skipping images that already have one unless ``overwrite``. The activation
tag is *not* written: training prepends it, so captions stay reusable under another tag. Images
go through the safe loader; an unreadable one is reported and the rest are still captioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora.dataset import DatasetError, flatten_on_white, scan_dataset
from pipeline.io.imageio import ImageLoadError, atomic_write_text, load_image

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry


@dataclass
class CaptionReport:
    written: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, caption)
    skipped: list[Path] = field(default_factory=list)  # caption existed
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, reason)
    empty: list[Path] = field(default_factory=list)  # model returned nothing: file written empty


def caption_images(registry: "ModelRegistry", images: list, *, prompt: str | None = None,
                   max_new_tokens: int = 40, num_beams: int = 3) -> list[str]:
    """BLIP captions for PIL RGB ``images`` (one batch). ``prompt`` is BLIP's conditional prefix
    (e.g. ``"a product photo of"``), kept in the caption. Returns one stripped string per image."""
    import torch

    bundle = registry.get("captioner")
    rt = registry.runtime
    kw = {"text": [prompt] * len(images)} if prompt else {}
    inputs = bundle.processor(images=images, return_tensors="pt", **kw)
    inputs = {k: (v.to(rt.device, rt.dtype) if v.is_floating_point() else v.to(rt.device)) for k, v in inputs.items()}
    with torch.no_grad():
        out = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return [" ".join(t.split()) for t in bundle.processor.batch_decode(out, skip_special_tokens=True)]


def caption_dataset(registry: "ModelRegistry", root: Path, *, overwrite: bool = False,
                    caption_extension: str = ".txt", prompt: str | None = None, batch_size: int = 8,
                    max_pixels: int = 64_000_000, max_new_tokens: int = 40,
                    on_item: Callable[[Path, str], None] | None = None) -> CaptionReport:
    """Caption every image of the dataset at ``root``; see the module docstring.

    ``on_item(image_path, status)`` is called per image (``written``, ``skipped``, ``failed``).
    Raises :class:`DatasetError` when there are no images or the dataset uses ``metadata.jsonl``
    (its captions live in that file, so ``.txt`` files would be ignored)."""
    scan = scan_dataset(root, caption_extension=caption_extension)
    if scan.layout == "metadata":
        raise DatasetError(f"{root} uses metadata.jsonl: captions are its \"text\" fields, and .txt files "
                           "beside the images would be ignored; remove metadata.jsonl to caption with .txt files")
    report = CaptionReport()
    todo = []
    for e in scan.entries:
        cap = e.path.with_suffix(caption_extension)
        if cap.exists() and not overwrite:
            report.skipped.append(cap)
            if on_item:
                on_item(e.path, "skipped")
            continue
        todo.append(e)

    def flush(batch):
        if not batch:
            return
        caps = caption_images(registry, [img for _, img in batch], prompt=prompt, max_new_tokens=max_new_tokens)
        for (e, _), text in zip(batch, caps):
            path = atomic_write_text(e.path.with_suffix(caption_extension), text + "\n")
            report.written.append((path, text))
            if not text:
                report.empty.append(path)
            if on_item:
                on_item(e.path, "written")

    batch = []
    for e in todo:
        try:
            img = flatten_on_white(load_image(e.path, max_pixels=max_pixels).image)
        except ImageLoadError as err:
            report.failed.append((e.path, err.reason))
            if on_item:
                on_item(e.path, "failed")
            continue
        batch.append((e, img))
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    flush(batch)
    return report
