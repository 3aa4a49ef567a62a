"""`process`: the whole pipeline for one input file, shared by the daemon and catalog runs.

load (safe loader) -> detect (SAM + CLIP, cheap skip) -> rules (plan) -> edits (enhance | rotate |
displace, in rule order, each on the result of the previous) -> outputs. Every input ends as
exactly one record:

- ``edited``:  ``OUT/STEM.png`` (final image, PNG so untouched pixels stay bit-identical),
  ``OUT/STEM.mask.png`` (every pixel any edit may have changed), ``OUT/STEM.overlay.png``
  (detections), ``OUT/STEM.json`` (written last).
- ``skipped``: ``OUT/skipped/STEM.json`` + overlay: no product, or no rule matched (reason and
  best scores recorded).
- ``failed``:  ``OUT/failed/STEM.json``: bad input or bad parameters, with the error.
- ``planned`` (dry run): detections, masks, overlay and the actions that would run; no diffusion.

Unexpected exceptions (bugs, out-of-memory) propagate: the caller decides whether to retry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import PIPELINE_VERSION
from pipeline.imageio import ImageLoadError, atomic_write_text, load_image, save_image
from pipeline.outputs import draw_overlay, input_record, now_iso, write_detect_outputs, write_failure
from pipeline.rules import PlannedAction, RuleSet, default_rules, load_rules
from pipeline.settings import Settings


def _lora_option(loras: Any) -> Any:
    # Rule files give {path, weight}; the op handlers take the CLI's "FILE[:WEIGHT]" strings.
    if not isinstance(loras, list):
        return loras
    return [f"{l['path']}:{l.get('weight', 1.0)}" if isinstance(l, dict) else l for l in loras]


def record_base(settings: Settings, rules: RuleSet) -> dict[str, Any]:
    """The fields every record starts with. Shared with the Ray coordinator, which writes the
    ``failed`` record itself when an input cannot even be read to be sent to an actor."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "created": now_iso(),
        "settings_file": str(settings.source_file) if settings.source_file else None,
        "rules": {"file": str(rules.path) if rules.path else None, "sha256": rules.sha256},
    }


class Processor:
    """Holds warm models (via one registry), the detector and the rules in force."""

    def __init__(self, settings: Settings, rules: RuleSet | Path | str | None = None, registry: Any = None,
                 detector: Any = None):
        from pipeline.models import ModelRegistry

        self.settings = settings
        self.registry = registry if registry is not None else ModelRegistry(settings)
        if detector is None:
            from pipeline.detect import Detector

            detector = Detector(self.registry, settings.detect)
        self.detector = detector
        if isinstance(rules, RuleSet):
            self.rules = rules
        elif rules is not None:
            self.rules = load_rules(rules, settings)
        else:
            self.rules = default_rules(settings)

    @property
    def rules_hash(self) -> str:
        return self.rules.sha256

    def warm_up(self) -> dict[str, float]:
        """Load detection's models (CLIP, SAM) and run one detection of the rules' classes, to the
        end (no prefilter skip), on a generated 640x480 product photo (:mod:`pipeline.samples`).
        Called by the daemon and the Ray actors at start: a missing model fails the start instead
        of image 1, and image 1 no longer pays the first-call set-up (class text embeddings, kernel
        creation, heap growth), which costs ~6 s on a CPU (``python -m bench warm``). Returns
        seconds per step."""
        from pipeline.samples import handbag

        t0 = time.perf_counter()
        self.registry.get("clip")
        self.registry.get("sam")
        t1 = time.perf_counter()
        self.detector.detect(handbag(640, 480), self.rules.classes, prefilter=False)
        return {"load": round(t1 - t0, 3), "detect": round(time.perf_counter() - t1, 3)}

    def reload_rules(self, path: Path) -> str:
        """Validate and switch to the rules in ``path``; on error raise and keep the current ones."""
        new = load_rules(path, self.settings)
        self.rules = new
        return new.sha256

    # ------------------------------------------------------------------------------------------
    def _base(self, sha256: str | None) -> dict[str, Any]:
        return record_base(self.settings, self.rules)

    def process(self, path: Path, outbox: Path, *, sha256: str | None = None, stem: str | None = None,
                dry_run: bool = False, classes: list[str] | None = None,
                actions: list[tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
        """Run the pipeline on ``path``; write outputs under ``outbox``; return the record.

        ``classes`` narrows detection to those class names; ``actions`` replaces the rules' plan
        with ``[(op, params)]`` applied to the best detection (catalog per-row overrides)."""
        from pipeline.edits import EditError
        from pipeline.outputs import safe_stem

        t0 = time.perf_counter()
        stem = stem or safe_stem(path.name)
        base = self._base(sha256)
        try:
            loaded = load_image(path, max_pixels=self.settings.limits.max_pixels)
        except ImageLoadError as e:
            return write_failure(outbox / "failed", stem, str(path), str(e), {**base, "stage": "load"})
        if sha256 and loaded.sha256 != sha256:
            base["note"] = "file changed between intake and processing; hashed again"
        image = loaded.image.convert("RGB")
        cls = self.rules.classes
        if classes:
            known = {c.name: c for c in cls}
            unknown = [c for c in classes if c not in known]
            if unknown:
                rec = {**base, "stage": "plan", "input": input_record(loaded)}
                return write_failure(outbox / "failed", stem, str(path),
                                     f"unknown class {', '.join(unknown)} (rules classes: {', '.join(known)})", rec)
            cls = [known[c] for c in classes]
        result = self.detector.detect(image, cls)
        timings = {"detect": result.timings.get("total", 0.0)}
        if result.skipped:
            return write_detect_outputs(outbox / "skipped", stem, loaded, result, {**base, "timings": timings})

        if actions is not None:
            best = max(range(len(result.detections)), key=lambda i: result.detections[i].score)
            plan = [PlannedAction(op, p, -1, "catalog override", best, result.detections[best].label) for op, p in actions]
            matches = [{"detection": best, "label": result.detections[best].label, "rules": None, "override": True}]
        else:
            plan, matches = self.rules.plan(result.detections, image.size)
        planned = [p.to_record() for p in plan]
        if dry_run:
            return write_detect_outputs(outbox, stem, loaded, result,
                                        {**base, "status": "planned", "matches": matches, "plan": planned,
                                         "no_match": self.rules.no_match if not plan else None, "timings": timings})
        if not plan:
            if self.rules.no_match == "skip":
                labels = ", ".join(f"{d.label} {d.score:.2f}" for d in result.detections)
                result.skipped, result.reason = True, f"no rule matched the detections ({labels})"
                return write_detect_outputs(outbox / "skipped", stem, loaded, result,
                                            {**base, "matches": matches, "timings": timings})
            # no_match: copy -> the input, unchanged, as the output
        current = image
        edit_mask = np.zeros((image.height, image.width), bool)
        done: list[dict[str, Any]] = []
        from pipeline.run_edit import op_handler

        for p in plan:
            det = result.detections[p.detection_index]
            t = time.perf_counter()
            params = dict(p.params)
            if "loras" in params:
                params["loras"] = _lora_option(params["loras"])
            try:
                edit = op_handler(p.op)(current, det.mask, det.label, params, self.settings, self.registry)
            except (EditError, ValueError) as e:
                rec = {**base, "stage": p.op, "input": input_record(loaded), "detect": result.to_record(),
                       "matches": matches, "plan": planned, "actions": done}
                return write_failure(outbox / "failed", stem, str(path), f"{p.op} on {det.label}: {e}", rec)
            timings[p.op] = timings.get(p.op, 0.0) + time.perf_counter() - t
            current = edit.image
            edit_mask |= edit.edit_mask
            done.append({**p.to_record(), "record": edit.record})

        outbox.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        out_img, out_mask, overlay = f"{stem}.png", f"{stem}.mask.png", f"{stem}.overlay.png"
        save_image(current, outbox / out_img, icc_profile=loaded.icc_profile)
        save_image(edit_mask, outbox / out_mask)
        save_image(draw_overlay(image, result.detections), outbox / overlay)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        record = {
            **base,
            "status": "edited",
            "input": input_record(loaded),
            "detect": result.to_record(),
            "matches": matches,
            "actions": done,
            "copied": not plan,
            "outputs": {"image": out_img, "edit_mask": out_mask, "overlay": overlay},
            "edit_pixels": int(edit_mask.sum()),
            "models": [self.registry.provenance(r) for r in ("clip", "sam")],
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        import json

        atomic_write_text(outbox / f"{stem}.json", json.dumps(record, indent=2, default=str) + "\n")
        return record


def make_processor(settings: Settings, rules_path: Path | None) -> Processor:
    """The daemon's factory. ``rules_path`` None: no rules (detect, then skip every image);
    a path that does not exist or does not validate raises SettingsError."""
    return Processor(settings, Path(rules_path) if rules_path else None)
