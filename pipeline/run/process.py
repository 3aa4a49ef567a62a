"""`process`: the one runner for one input file, shared by rules runs, ``run --op``, catalog
rows, the daemon and the Ray actors.

load (safe loader) -> products (detection, SAM + CLIP with the cheap skip; or a mask file) ->
plan (rules, or the given actions) -> edits (in plan order, each on the result of the previous
and on where its product is *now*: every edit returns the product's new mask, and other products
lose the pixels an edit painted over) -> QA gate (:mod:`pipeline.run.qa`) -> outputs. Every input
ends as exactly one record (:func:`pipeline.io.outputs.write_record`, written last):

- ``edited``:  ``OUT/STEM.png`` (final image; PNG by default so untouched pixels stay bit-identical,
  else ``settings.output``'s format, written after the QA gate),
  ``OUT/STEM.mask.png`` (every pixel any edit may have changed), ``OUT/STEM.overlay.png``
  (detections), ``OUT/STEM.json`` with ``qa: {passed, checks}``; per marketplace profile
  (``profiles``, or a matching rule's) ``OUT/STEM.PROFILE.EXT``: the result, then the profile's
  ``frame`` and ``background`` (through the QA gate too), encoded with its ``output`` and
  measured by its compliance check (:mod:`pipeline.ops.compliance`), listed in ``profiles``.
- ``skipped``: ``OUT/skipped/STEM.json`` + overlay: no product, or no rule matched (reason and
  best scores recorded).
- ``failed``:  ``OUT/failed/STEM.json``: bad input, bad parameters, a refused edit or a failed QA
  check, with the error; no edited image is written.
- ``planned`` (dry run): detections, masks, overlay and the actions that would run; no diffusion.

Internal errors (bugs, out-of-memory) and unavailable models propagate: the caller decides (the
daemon retries internal errors, then fails the image with "internal error"; a model that cannot
load stops it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import PIPELINE_VERSION
from pipeline.ops.actions import Action
from pipeline.io.composite import bbox
from pipeline.detect.detector import DetectResult, Detection, Detector
from pipeline.ops.edits import EditContext, EditError
from pipeline.errors import BadInput, ParamsError, QAFailed
from pipeline.io.imageio import ImageLoadError, find_mask, load_image, load_mask, save_image
from pipeline.io.outputs import (draw_overlay, encode_image, input_record, now_iso, stem_for, write_detect_outputs,
                              write_failure, write_record)
from pipeline.run.qa import Step, check
from pipeline.run.rules import PlannedAction, RuleSet, default_rules, load_rules
from pipeline.settings import Settings
from pipeline.models.registry import ModelRegistry
from pipeline.io.samples import handbag
from pipeline.ops.profiles import file_suffix, get_profile, profile_actions
from pipeline.ops.compliance import measure


def record_base(settings: Settings, rules: RuleSet) -> dict[str, Any]:
    """The fields every record starts with. Shared with the Ray coordinator, which writes the
    ``failed`` record itself when an input cannot even be read to be sent to an actor."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "created": now_iso(),
        "settings_file": str(settings.source_file) if settings.source_file else None,
        "rules": {"file": str(rules.path) if rules.path else None, "sha256": rules.sha256},
    }


def mask_products(mask: np.ndarray, label: str, source: str) -> DetectResult:
    """A product given as a mask (HxW bool) instead of detected: one detection, score 1."""
    h, w = mask.shape
    box = bbox(mask)
    det = Detection(label=label, score=1.0, box=tuple(box), mask=mask, margin=1.0, source=source)
    return DetectResult(image_size=(w, h), detections=[det], best_scores={label: 1.0}, proposal_mode="mask file")


class Processor:
    """Holds warm models (via one registry), the detector and the rules in force."""

    def __init__(self, settings: Settings, rules: RuleSet | Path | str | None = None, registry: Any = None,
                 detector: Any = None):
        self.settings = settings
        self.registry = registry if registry is not None else ModelRegistry(settings)
        if detector is None:
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
        end (no prefilter skip), on a generated 640x480 product photo (:mod:`pipeline.io.samples`).
        Called by the daemon and the Ray actors at start: a missing model fails the start instead
        of image 1, and image 1 no longer pays the first-call set-up (class text embeddings, kernel
        creation, heap growth), which costs ~6 s on a CPU (``python -m bench warm``). Returns
        seconds per step."""
        t0 = time.perf_counter()
        for role in self._detect_roles(prefilter=False):
            self.registry.get(role)
        t1 = time.perf_counter()
        self.detector.detect(handbag(640, 480), self.rules.classes, prefilter=False)
        return {"load": round(t1 - t0, 3), "detect": round(time.perf_counter() - t1, 3)}

    def _detect_roles(self, **options: Any) -> tuple[str, ...]:
        """The registry roles detection uses with ``options`` (its ``proposals`` mode); a detector
        that does not say (an injected one) is taken to use CLIP and SAM, the default mode's."""
        roles = getattr(self.detector, "model_roles", None)
        if roles is None:
            return ("clip", "sam")
        return roles(**{k: v for k, v in options.items() if k in ("proposals", "prefilter")})

    def reload_rules(self, path: Path) -> str:
        """Validate and switch to the rules in ``path``; on error raise and keep the current ones."""
        new = load_rules(path, self.settings)
        self.rules = new
        return new.sha256

    # ------------------------------------------------------------------------------------------
    def _base(self, sha256: str | None) -> dict[str, Any]:
        return record_base(self.settings, self.rules)

    def process(self, path: Path, outbox: Path, *, sha256: str | None = None, stem: str | None = None,
                dry_run: bool = False, classes: list[str] | None = None, actions: Sequence[Action] | None = None,
                mask: Path | str | None = None, product_class: str | None = None, detect_only: bool = False,
                detect_options: dict[str, Any] | None = None, profiles: Sequence[str] | None = None) -> dict[str, Any]:
        """Run the pipeline on ``path``; write outputs under ``outbox``; return the record.

        ``classes`` narrows detection to those class names; ``actions`` replaces the rules' plan
        with these actions on the best detection (catalog rows, ``run --op``). ``mask``: a mask
        file, or a folder holding one with the input's stem (white = product): detection is
        skipped and the product is that mask, of class ``product_class`` (default: the first of
        ``classes``, else the rules' first class). ``product_class`` with ``actions``: they apply
        to the best detection of that class (every class is still scored, so a neighbour that
        looks more like another class is not taken for this one); none found: ``skipped``.
        ``detect_only`` (the ``detect`` command): stop after detection with a ``detected`` (or
        ``skipped``) record; ``detect_options``: passed to the detector (``proposals``,
        ``prefilter``). ``profiles``: marketplace profiles (:mod:`pipeline.ops.profiles`) to write
        after the plan, ``STEM.PROFILE.EXT`` each, with their compliance check (added to those
        the matching rules name)."""
        t0 = time.perf_counter()
        path = Path(path)
        stem = stem or stem_for(path.name)
        base = self._base(sha256)
        try:
            loaded = load_image(path, max_pixels=self.settings.limits.max_pixels)
        except ImageLoadError as e:
            return write_failure(outbox, stem, str(path), str(e), {**base, "stage": "load"})
        if sha256 and loaded.sha256 != sha256:
            base["note"] = "file changed between intake and processing; hashed again"
        ctx: dict[str, Any] = {"base": base, "loaded": loaded, "stage": "detect"}
        try:
            return self._process(path, outbox, stem, loaded, ctx, t0, dry_run=dry_run, classes=classes,
                                 actions=actions, mask=mask, product_class=product_class, detect_only=detect_only,
                                 detect_options=detect_options or {}, profiles=list(profiles or []))
        except BadInput as e:
            rec = {**base, "stage": ctx["stage"], "input": input_record(loaded), **ctx.get("extra", {})}
            return write_failure(outbox, stem, str(path), ctx.get("prefix", "") + str(e), rec)

    def _process(self, path: Path, outbox: Path, stem: str, loaded: Any, ctx: dict[str, Any], t0: float, *,
                 dry_run: bool, classes: list[str] | None, actions: Sequence[Action] | None,
                 mask: Path | str | None, product_class: str | None, detect_only: bool,
                 detect_options: dict[str, Any], profiles: list[str]) -> dict[str, Any]:
        base = ctx["base"]
        image = loaded.image.convert("RGB")
        cls = self.rules.classes
        if classes:
            known = {c.name: c for c in cls}
            unknown = [c for c in classes if c not in known]
            if unknown:
                ctx["stage"] = "plan"
                raise BadInput(f"unknown class {', '.join(unknown)} (rules classes: {', '.join(known)})")
            cls = [known[c] for c in classes]
        if mask is not None:
            ctx["stage"] = "mask"
            mask_file = find_mask(mask, path.name)
            label = product_class or (cls[0].name if cls else "product")
            result = mask_products(load_mask(mask_file, image.size, self.settings.limits.max_pixels), label,
                                   f"mask file {mask_file}")
            base["product_mask"] = {"file": str(mask_file), "class": label}
            timings: dict[str, float] = {"detect": 0.0}
        else:
            result = self.detector.detect(image, cls, **detect_options)
            timings = {"detect": result.timings.get("total", 0.0)}
        if detect_only:
            return write_detect_outputs(outbox, stem, loaded, result, {
                **base, "timings": timings, "classes": [c.model_dump() for c in cls],
                "models": [self.registry.provenance(r) for r in self._detect_roles(**detect_options)]
                if mask is None else []})
        if result.skipped:
            return write_detect_outputs(outbox, stem, loaded, result, {**base, "timings": timings})

        if actions is not None:
            cand = [i for i, d in enumerate(result.detections) if product_class in (None, d.label)]
            if not cand:
                found = ", ".join(sorted({d.label for d in result.detections}))
                result.skipped, result.reason = True, f"no {product_class!r} found (found: {found})"
                return write_detect_outputs(outbox, stem, loaded, result, {**base, "timings": timings})
            best = max(cand, key=lambda i: result.detections[i].score)
            label = result.detections[best].label
            plan = [PlannedAction(a, -1, "given actions", best, label) for a in actions]
            matches = [{"detection": best, "label": label, "rules": None, "override": True}]
        else:
            plan, matches = self.rules.plan(result.detections, image.size)
        for m in matches:
            profiles += [n for n in m.get("profiles") or [] if n not in profiles]
        ctx["stage"] = "plan"
        profile_plans = self._profile_plans(profiles)
        planned = [p.to_record() for p in plan]
        if dry_run:
            return write_detect_outputs(outbox, stem, loaded, result,
                                        {**base, "matches": matches, "plan": planned, "profiles": profiles,
                                         "no_match": self.rules.no_match if not plan else None, "timings": timings},
                                        status="planned")
        if not plan and self.rules.no_match == "skip":
            labels = ", ".join(f"{d.label} {d.score:.2f}" for d in result.detections)
            result.skipped, result.reason = True, f"no rule matched the detections ({labels})"
            return write_detect_outputs(outbox, stem, loaded, result, {**base, "matches": matches, "timings": timings})
        # no plan and no_match: copy -> the input, unchanged, as the output

        # -- the edits, each on the current image and its product's current mask ---------------------
        dets = result.detections
        products = [d.mask.copy() for d in dets]
        source = np.asarray(image)
        ectx = EditContext(self.settings, self.registry, list(self.rules.classes))
        done: list[dict[str, Any]] = []
        ctx["extra"] = {"detect": result.to_record(), "matches": matches, "plan": planned, "actions": done}
        chain = _Chain(image, products)
        for p in plan:
            ctx["stage"], ctx["prefix"] = p.op, f"{p.op} on {p.label}: "
            rec = chain.run(p.action, p.op, p.detection_index, p.label, ectx, timings)
            done.append({**p.to_record(), "record": rec, "product": _product_record(chain.products[p.detection_index])})
        ctx["prefix"] = ""
        current, products, edit_mask, steps = chain.image, chain.products, chain.edit_mask, chain.steps

        # -- the QA gate, before anything is written -------------------------------------------------
        t = time.perf_counter()
        qa = check(source, np.asarray(current), steps, products, [d.label for d in dets])
        timings["qa"] = time.perf_counter() - t
        ctx["extra"]["qa"] = qa.to_record()
        if not qa.passed:
            ctx["stage"] = "qa"
            raise QAFailed("QA failed: " + "; ".join(qa.failures()), qa.checks)

        # -- profiles: background + frame on the edited product, each through the QA gate too ------
        branches = []
        target = plan[-1].detection_index if plan else max(range(len(dets)), key=lambda i: dets[i].score)
        for name, prof, actions in profile_plans:
            ctx["stage"], ctx["prefix"] = f"profile {name}", f"profile {name}: "
            branch = chain.fork()
            recs = [{"op": a.op, **a.to_record(), "record": branch.run(a, a.op, target, dets[target].label, ectx,
                                                                       timings)} for a in actions]
            pqa = check(source, np.asarray(branch.image), branch.steps, branch.products, [d.label for d in dets])
            if not pqa.passed:
                ctx["stage"] = "qa"
                raise QAFailed(f"QA failed (profile {name}): " + "; ".join(pqa.failures()), pqa.checks)
            branches.append((name, prof, branch, recs, pqa))
        ctx["prefix"] = ""

        outbox.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        out_fmt = self.settings.output
        out_img, out_mask, overlay = f"{stem}.{file_suffix(out_fmt.format)}", f"{stem}.mask.png", f"{stem}.overlay.png"
        written = encode_image(current, chain.alpha, outbox, out_img, out_fmt, loaded.icc_profile)
        save_image(edit_mask, outbox / out_mask)
        save_image(draw_overlay(image, dets), outbox / overlay)
        profile_records = []
        ctx["stage"] = "write"
        for name, prof, branch, recs, pqa in branches:
            fname = f"{stem}.{stem_for(name)}.{file_suffix(prof.output.format)}"
            enc = encode_image(branch.image, branch.alpha, outbox, fname, prof.output, loaded.icc_profile)
            comp = measure(outbox / fname, branch.products[target], prof.check)
            profile_records.append({"name": name, "file": fname, "output": enc, "actions": recs, "qa": pqa.to_record(),
                                    "product": _product_record(branch.products[target]), "check": comp})
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        record = {
            **base,
            "status": "edited",
            "input": input_record(loaded),
            **ctx["extra"],
            "copied": not plan,
            "products": [{"label": d.label, **_product_record(m)} for d, m in zip(dets, products)],
            "outputs": {"image": out_img, "edit_mask": out_mask, "overlay": overlay,
                        **({"profiles": [p["file"] for p in profile_records]} if profile_records else {})},
            "output": written,
            "lossy": written["lossy"],
            "profiles": profile_records,
            "checks_passed": all(p["check"]["passed"] for p in profile_records) if profile_records else None,
            "edit_pixels": int(edit_mask.sum()),
            "models": [self.registry.provenance(r) for r in self._detect_roles(**detect_options)]
            if mask is None else [],
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        return write_record(outbox, stem, record)

    def _profile_plans(self, names: Sequence[str]) -> list[tuple[str, Any, list[Action]]]:
        """``(name, profile, its background/frame actions)`` per profile; BadInput for an unknown
        name or a bad override."""
        out = []
        for n in names:
            try:
                out.append((n, get_profile(n, self.settings), profile_actions(n, self.settings)))
            except ParamsError as e:
                raise BadInput(f"profile {n}: {e}") from None
        return out


class _Chain:
    """The edits applied so far to one image: the current image, each product's mask (tracked
    through every edit, size changes included), the union of the edit masks, the alpha channel
    (None = opaque) and the QA steps. :meth:`fork` starts a profile's branch from here."""

    def __init__(self, image: Any, products: list[np.ndarray]):
        self.image = image
        self.products = products
        self.edit_mask = np.zeros((image.height, image.width), bool)
        self.alpha: np.ndarray | None = None
        self.steps: list[Step] = []

    def fork(self) -> "_Chain":
        c = _Chain.__new__(_Chain)
        c.image, c.products, c.edit_mask = self.image, list(self.products), self.edit_mask.copy()
        c.alpha = None if self.alpha is None else self.alpha.copy()
        c.steps = list(self.steps)
        return c

    def run(self, action: Action, op: str, i: int, label: str, ectx: EditContext, timings: dict[str, float]) -> dict:
        """Apply ``action`` to product ``i``; returns the edit's record."""
        import dataclasses

        if not self.products[i].any():
            raise EditError("the product is no longer in the image (an earlier edit moved it out of the frame "
                            "or painted over it)")
        t = time.perf_counter()
        edit = action.run(self.image, self.products[i], label, ectx)
        timings[op] = timings.get(op, 0.0) + time.perf_counter() - t
        self.steps.append(Step(op, label, i, np.asarray(self.image), edit))
        tr = edit.transform
        for j in range(len(self.products)):
            if j != i:
                moved = tr.mask(self.products[j]) if tr is not None else self.products[j]
                self.products[j] = moved & ~edit.edit_mask
        self.products[i] = edit.product_mask
        if tr is not None:
            self.edit_mask = tr.reach(self.edit_mask)
            if self.alpha is not None:
                # Padding around a transparent product is transparent.
                self.alpha = dataclasses.replace(tr, fill=(0, 0, 0)).apply(self.alpha)
        if edit.alpha is not None:
            self.alpha = edit.alpha
        elif op == "background":
            self.alpha = None
        self.edit_mask |= edit.edit_mask
        self.image = edit.image
        return edit.record


def _product_record(mask: np.ndarray) -> dict[str, Any]:
    box = bbox(mask)
    return {"pixels": int(mask.sum()), "box": list(box) if box else None}


def make_processor(settings: Settings, rules_path: Path | None) -> Processor:
    """The daemon's factory. ``rules_path`` None: no rules (detect, then skip every image);
    a path that does not exist or does not validate raises SettingsError."""
    return Processor(settings, Path(rules_path) if rules_path else None)
