"""`detect` (SAM + CLIP over images) and `check` (compliance audit of any photo). Attach with
``register(app)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from cli.common import (EXIT_CONFIG, EXIT_INPUT, ConfigOption, Proposals, console, fail, load_settings_or_exit,
                        model_errors)


def register(app: typer.Typer) -> None:
    app.command("detect")(detect_cmd)
    app.command("check")(check_cmd)


# ------------------------------------------------------------------------------------------------
# detect


def _detect_table(outcomes) -> "Any":
    from rich.table import Table

    t = Table("input", "status", "detections", "best scores / error", "seconds")
    for o in outcomes:
        rec = o.record
        if o.status == "failed":
            t.add_row(o.source.name, "[red]failed[/]", "", rec["error"], "")
            continue
        det = rec["detect"]
        found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in det["detections"]) or "-"
        best = ", ".join(f"{k} {v:.2f}" for k, v in det["best_scores"].items())
        status = "[green]detected[/]" if o.status == "detected" else "[yellow]skipped[/]"
        t.add_row(o.source.name, status, found, best, f"{det['timings'].get('total', 0):.2f}")
    return t


def run_detection(settings, inputs: list[Path], out: Path, classes: Optional[str], proposals: Optional[str],
                  prefilter: Optional[bool]) -> list:
    """Detect over ``inputs`` writing to ``out``; prints progress and the table. Returns outcomes."""
    from pipeline.run.detect_run import detect_paths, expand_inputs, resolve_classes
    from pipeline.run.process import Processor
    from pipeline.run.rules import rules_from_dict

    files = expand_inputs(inputs)
    if not files:
        # An empty inbox is nothing to do, not an error (`make run` on a fresh checkout).
        console.print("no input images found: nothing to do")
        return []
    cls = resolve_classes(settings, [c.strip() for c in classes.split(",") if c.strip()] if classes else None)
    proc = Processor(settings, rules_from_dict({"classes": [c.model_dump() for c in cls], "rules": []}, settings))
    outcomes = []
    with model_errors():
        with console.status("detecting...") as st:
            for i, o in enumerate(detect_paths(files, proc, out, proposals=proposals, prefilter=prefilter), 1):
                st.update(f"detecting... {i}/{len(files)} {o.source.name}: {o.status}")
                outcomes.append(o)
    console.print(_detect_table(outcomes))
    return outcomes


def detect_cmd(
    images: List[Path] = typer.Argument(..., help="image files or folders (their images, not recursive)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names (default: all configured)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: <outbox>/detect)"),
    proposals: Optional[Proposals] = typer.Option(None, "--proposals", help="SAM proposals (default: settings)"),
    prefilter: Optional[bool] = typer.Option(None, "--prefilter/--no-prefilter", help="cheap CLIP skip before SAM"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Detect product classes with SAM + CLIP. Per image writes NAME.json (detections, or skipped
    with reason and best scores), NAME.maskN.LABEL.png per detection and NAME.overlay.png.

    Exit 0 when every input was processed (skipped counts as processed), 4 if any input failed."""
    s = load_settings_or_exit(config)
    out_dir = out or s.resolve_path(s.paths.outbox) / "detect"
    outcomes = run_detection(s, images, out_dir, classes, proposals.value if proposals else None, prefilter)
    console.print(f"outputs in {out_dir}")
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(EXIT_INPUT)


# ------------------------------------------------------------------------------------------------
# check (compliance audit of any photo)


def check_cmd(
    images: List[Path] = typer.Argument(..., help="image files or folders (their images)"),
    profile: List[str] = typer.Option(..., "--profile", help="profile to check against (repeatable), e.g. amazon-main"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="product mask file, or a folder of masks named like the images; default: detect"),
    class_name: Optional[str] = typer.Option(None, "--class", help="with detection: the product class (default: the best detection of any configured class)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Check photos against marketplace profiles: background (share of exactly-white pixels
    outside the product), product fill, size, format, colour space, borders. Prints the figures;
    exit 1 when any image fails any profile, 4 when an image cannot be read."""
    from rich.table import Table

    from pipeline.ops.compliance import measure, summary
    from pipeline.errors import BadInput
    from pipeline.io.imageio import find_mask, is_image_name, load_image, load_mask
    from pipeline.ops.profiles import get_profile

    s = load_settings_or_exit(config)
    try:
        profs = {n: get_profile(n, s) for n in profile}
    except BadInput as e:
        raise fail(str(e), EXIT_CONFIG) from None
    files: list[Path] = []
    for p in images:
        files.extend(sorted(f for f in p.iterdir() if f.is_file() and is_image_name(f)) if p.is_dir() else [p])
    detector = None
    t = Table("image", "profile", "result")
    failed = unreadable = 0
    for f in files:
        try:
            loaded = load_image(f, max_pixels=s.limits.max_pixels)
            if mask is not None:
                m = load_mask(find_mask(mask, f.name), loaded.size, s.limits.max_pixels)
            else:
                if detector is None:
                    from pipeline.detect.detector import Detector
                    from pipeline.models.registry import ModelRegistry

                    with model_errors():
                        detector = Detector(ModelRegistry(s), s.detect)
                classes = [c for c in s.detect.classes if class_name in (None, c.name)] or \
                    [s.detect.classes[0].model_copy(update={"name": class_name})]
                with model_errors():
                    res = detector.detect(loaded.image.convert("RGB"), classes)
                m = max(res.detections, key=lambda d: d.score).mask if res.detections else None
        except BadInput as e:
            unreadable += 1
            t.add_row(f.name, "", f"[red]cannot check[/]: {e}")
            continue
        for n, prof in profs.items():
            c = measure(f, m, prof.check)
            failed += not c["passed"]
            t.add_row(f.name, n, ("[green]" if c["passed"] else "[red]") + summary(c) + "[/]")
    console.print(t)
    if unreadable:
        raise typer.Exit(EXIT_INPUT)
    if failed:
        console.print(f"[red]{failed} check(s) failed[/]")
        raise typer.Exit(1)
