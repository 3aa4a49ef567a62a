"""Test helpers: one action run directly, and one operation through the one runner as `edit OP`
does it (the processor with a mask file or detection, the QA gate and the output writer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.ops.actions import parse_action
from pipeline.ops.edits import Edit, EditContext
from pipeline.io.outputs import OutputFolder
from pipeline.run.process import Processor
from pipeline.run.rules import rules_from_dict


def run_action(op: str, image: Any, mask: Any, label: str, options: dict, settings: Any, registry: Any) -> Edit:
    """Parse ``options`` for ``op`` as a rule or flag would be, then run the operation."""
    action = parse_action(op, options, settings, bases=(None, getattr(settings, "base_dir", None)))
    return action.run(image, mask, label, EditContext(settings, registry, list(settings.detect.classes)))


@dataclass
class OpOutcome:
    status: str
    record: dict
    out_dir: Path
    stem: str

    @property
    def image_path(self) -> Path:
        return self.out_dir / f"{self.stem}.png"

    @property
    def mask_path(self) -> Path:
        return self.out_dir / f"{self.stem}.mask.png"

    @property
    def edit(self) -> dict:
        """The one action's own record."""
        return self.record["actions"][0]["record"]


def run_op(settings: Any, path: Path, op: str, *, label: str, out_dir: Path, options: dict | None = None,
           mask_path: Path | None = None, registry: Any = None) -> OpOutcome:
    """``product-studio edit OP PATH --class LABEL [--mask FILE]`` without the CLI."""
    action = parse_action(op, options or {}, settings, bases=(None, settings.base_dir))
    classes = [c.model_dump() for c in settings.detect.classes]
    if label not in {c["name"] for c in classes}:
        classes.append({"name": label})
    proc = Processor(settings, rules_from_dict({"classes": classes, "rules": []}, settings), registry=registry)
    stem = OutputFolder(out_dir).claim(path.name, op)
    rec = proc.process(path, out_dir, stem=stem, actions=[action], mask=mask_path, product_class=label)
    return OpOutcome(rec["status"], rec, out_dir, stem)
