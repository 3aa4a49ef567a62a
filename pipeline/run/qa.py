"""The one QA gate: proves the guarantees on the combined result of every edit of one image,
after the edits and before anything is written.

Checks (each recorded with its figures; any failure makes the image ``failed``, nothing written):

- ``outside_edits_unchanged``: every pixel outside the union of the edit masks equals the input,
  bit for bit;
- ``each_edit_within_its_mask``: each edit changed pixels only inside its own edit mask (so a
  later edit's mask cannot hide an earlier edit's stray pixel);
- ``moved_product_identical``: for every edit that moved a product (displace), the product's
  pixels at their new place equal the source's, pixel for pixel, wherever they are in the frame;
- ``geometry``: for every edit that changed the size (``frame``), its result equals
  ``transform.apply(image before)`` outside its edit mask, bit for bit (so a product scaled 1:1
  is copied exactly, and padding is exactly the padding colour); from there on the input and the
  edit masks are compared through the transform (:mod:`pipeline.ops.geometry`);
- ``products_kept``: no product was lost: each product's final mask is non-empty, and a moved
  product kept in the frame at least the share its edit allowed (all of it unless clipping
  was asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.ops.edits import Edit


@dataclass
class Step:
    """One applied edit: ``before`` the image it worked on (HxWx3 uint8, RGB), ``edit`` its result,
    ``product`` the index of the product it edited, ``op`` and ``label`` for the record."""

    op: str
    label: str
    product: int
    before: np.ndarray
    edit: Edit


@dataclass
class QAReport:
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def failures(self) -> list[str]:
        return [c["reason"] for c in self.checks if not c["passed"]]

    def to_record(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": self.checks}

    def add(self, name: str, passed: bool, reason: str = "", **figures: Any) -> None:
        self.checks.append({"name": name, "passed": bool(passed), **({"reason": reason} if not passed else {}),
                            **figures})


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


def check(source: np.ndarray, result: np.ndarray, steps: Sequence[Step], products: Sequence[np.ndarray],
          labels: Sequence[str]) -> QAReport:
    """Run every check. ``source``/``result``: HxWx3 uint8 RGB, the input and the final image
    (of another size when an edit carries a transform);
    ``steps``: the edits in the order applied; ``products``: each product's final HxW bool mask
    (as the processor tracked it), ``labels`` their classes."""
    report = QAReport()
    # `reference`: the input carried through every size change so far; `union`: every pixel any
    # edit may have changed, in the current image's coordinates.
    reference = source
    union = np.zeros(source.shape[:2], bool)
    stray: list[dict[str, Any]] = []
    geometry: list[dict[str, Any]] = []
    for i, st in enumerate(steps):
        tr = st.edit.transform
        before = st.before
        after = np.asarray(st.edit.image)
        if tr is not None:
            before = tr.apply(before)
            reference = tr.apply(reference)
            union = tr.reach(union)
            geometry.append({"step": i, "op": st.op, "label": st.label, **tr.to_record()})
        union |= st.edit.edit_mask
        n = int((_changed(before, after) & ~st.edit.edit_mask).sum()) if before.shape == after.shape \
            else int(after.shape[0] * after.shape[1])
        if n:
            stray.append({"step": i, "op": st.op, "label": st.label, "pixels": n})
    H, W = reference.shape[:2]
    if result.shape != reference.shape:
        outside = int(H * W)
    else:
        outside = int((_changed(reference, result) & ~union).sum())
    report.add("outside_edits_unchanged", outside == 0,
               f"{outside} pixel(s) outside the edits differ from the input" + (" (through the size changes)"
                                                                              if geometry else ""),
               changed_outside=outside, edit_pixels=int(union.sum()))
    report.add("each_edit_within_its_mask", not stray,
               "; ".join(f"{s['op']} on {s['label']} changed {s['pixels']} pixel(s) outside its edit mask" for s in stray),
               steps=len(steps), stray=stray)
    if geometry:
        bad = [x for x in stray if steps[x["step"]].edit.transform is not None]
        report.add("geometry", not bad, "; ".join(f"{x['op']} on {x['label']}: {x['pixels']} pixel(s) differ from "
                                                  "its transform of the image before" for x in bad),
                   transforms=geometry)

    moved: list[dict[str, Any]] = []
    bad_moves: list[str] = []
    kept_share: dict[int, tuple[float, float]] = {}
    for i, st in enumerate(steps):
        mv = st.edit.moved
        if mv is None:
            continue
        ys, xs = np.nonzero(mv.source_mask)
        ny, nx = ys + mv.dy, xs + mv.dx
        H, W = st.before.shape[:2]
        inside = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        img = np.asarray(st.edit.image)
        diff = int((img[ny[inside], nx[inside]] != st.before[ys[inside], xs[inside]]).any(axis=-1).sum())
        total = int(len(ys))
        share_out = 1.0 - int(inside.sum()) / total if total else 0.0
        moved.append({"step": i, "op": st.op, "label": st.label, "pixels": total, "differing": diff,
                      "share_outside": round(share_out, 4), "allowed_outside": mv.allowed_outside})
        if diff:
            bad_moves.append(f"{st.op} on {st.label}: {diff} of {total} moved product pixel(s) differ from the source")
        if share_out > mv.allowed_outside + 1e-9:
            kept_share[st.product] = (share_out, mv.allowed_outside)
    report.add("moved_product_identical", not bad_moves, "; ".join(bad_moves), moves=moved)

    lost = []
    for i, (m, label) in enumerate(zip(products, labels)):
        if not m.any():
            lost.append(f"product {i} ({label}) is gone: no pixel of it is left in the result")
        elif i in kept_share:
            out, allowed = kept_share[i]
            lost.append(f"product {i} ({label}): {out:.0%} of it left the frame, {allowed:.0%} allowed")
    report.add("products_kept", not lost, "; ".join(lost),
               pixels=[int(m.sum()) for m in products])
    return report
