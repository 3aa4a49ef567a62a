"""`run` (the rules over images, folders or catalog CSVs), `edit OP` (one operation by hand) and
`demo`. Attach with ``register(app)``. The job loop, stems, manifest and report live in
:func:`pipeline.run.catalog.run_catalog`; here the options are parsed, the progress shown and the
summary printed. ``run --op OP`` is the old spelling of ``edit OP`` (see cli/main.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import typer

from cli.common import (EXIT_CONFIG, EXIT_INPUT, ConfigOption, OnConflict, Op, PoolFlags, Sampler, console, fail,
                        load_settings_or_exit, model_errors, pool_options, with_flags)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("edit")(edit_cmd)
    app.command("demo")(demo_cmd)


ProfileOption = typer.Option(None, "--profile", help="marketplace profile to write too (repeatable): "
                             "STEM.PROFILE.EXT with its compliance check (see docs/profiles.md)")
MaskOption = typer.Option(None, "--mask", help="product mask file, or a folder of masks named like the inputs "
                          "(white = product); skips detection")
DryRunOption = typer.Option(False, "--dry-run", help="detect and plan only: masks, overlays and the actions that would run")
OnConflictOption = typer.Option(OnConflict.suffix, "--on-conflict", help="existing outputs")
RecursiveOption = typer.Option(False, "--recursive", "-R", help="descend into sub-folders")
OutOption = typer.Option(None, "--out", "-o", help="output folder (default: the outbox)")
PathsArgument = typer.Argument(..., help="images, folders (their images) or catalog CSVs")


@dataclass
class OutputFlags:
    """Where and how `run` and `edit` write (one declaration for both commands)."""

    dry_run: bool = DryRunOption
    on_conflict: OnConflict = OnConflictOption
    recursive: bool = RecursiveOption
    out: Optional[Path] = OutOption


# ------------------------------------------------------------------------------------------------
# run (the rules)


@with_flags("pool", PoolFlags)
@with_flags("output", OutputFlags)
def run_cmd(
    paths: List[Path] = PathsArgument,
    profile: Optional[List[str]] = ProfileOption,
    class_name: Optional[str] = typer.Option(None, "--class", help="only this class of the rules; with --mask the "
                                             "class of the masks' products"),
    mask: Optional[Path] = MaskOption,
    rules: Optional[Path] = typer.Option(None, "--rules", help="rule file (default: paths.rules from the settings)"),
    config: Optional[Path] = ConfigOption,
    output: OutputFlags = None,  # type: ignore[assignment]  # given by with_flags
    pool: PoolFlags = None,  # type: ignore[assignment]
) -> None:
    """Run the rules over images, folders or a catalog CSV (path, optional class, action, sku
    columns). --mask gives the product instead of detecting it. --engine ray spreads the images
    over a pool of Ray actors (see docs/ray.md). One operation by hand: `edit OP` (the old
    spelling `run --op OP` still works this release, with a deprecation note).

    Writes per input STEM.png / STEM.mask.png / STEM.overlay.png / STEM.json (edited), with
    --profile also STEM.PROFILE.EXT per profile (checked; a failed check is reported, not an
    error), skipped/STEM.json or failed/STEM.json, plus OUT/manifest.jsonl and OUT/report.html
    (contact sheet). Exit 0 when every input was processed (skipped counts), 4 if any failed."""
    s = load_settings_or_exit(config)
    _catalog(s, paths, output, rules=rules, class_name=class_name, mask=mask, profiles=profile,
             pool=pool_options(pool))


# ------------------------------------------------------------------------------------------------
# edit OP (one operation by hand)

# Op parameter -> the flag that sets it (error messages name the flag).
OP_FLAGS = {"x": "--x", "y": "--y", "fill": "--fill", "loras": "--lora", "prompt": "--prompt", "tag": "--tag",
            "seed": "--seed", "azimuth": "--azimuth", "polar": "--polar", "sampler": "--sampler",
            "fill.sampler": "--sampler"}


@with_flags("pool", PoolFlags)
@with_flags("output", OutputFlags)
def edit_cmd(
    op: Op = typer.Argument(..., help="the operation"),
    paths: List[Path] = PathsArgument,
    class_name: str = typer.Option(..., "--class", help="the product class to edit (with --mask: the class of "
                                   "the masks' products)"),
    mask: Optional[Path] = MaskOption,
    profile: Optional[List[str]] = ProfileOption,
    x: Optional[str] = typer.Option(None, "--x", help="displace: horizontal offset, pixels (162, -40) or fraction (0.1, -10%)"),
    y: Optional[str] = typer.Option(None, "--y", help="displace: vertical offset, pixels or fraction of the height"),
    fill_backend: Optional[str] = typer.Option(None, "--fill", help="displace/rotate hole fill: lama | sd | classical, "
                                               "or a fallback order such as lama,sd,classical"),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="enhance: LoRA FILE[:WEIGHT] (repeatable)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="enhance: prompt (default: the class template)"),
    tag: Optional[str] = typer.Option(None, "--tag", help="enhance: LoRA activation tag for the prompt's {tag}"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (default: settings)"),
    azimuth: Optional[float] = typer.Option(None, "--azimuth", help="rotate: degrees, -180..180"),
    polar: Optional[float] = typer.Option(None, "--polar", help="rotate: degrees"),
    sampler: Optional[Sampler] = typer.Option(None, "--sampler", help="enhance, background generate, and the sd fill "
                                              "of displace/rotate: few-step LoRA samplers (default: settings)"),
    param: Optional[List[str]] = typer.Option(None, "--param", help="any other parameter of OP (its own or its "
                                              "settings section's) as KEY=VALUE (repeatable), e.g. mode=blur, "
                                              "shadow=contact, aspect=4:5"),
    config: Optional[Path] = ConfigOption,
    output: OutputFlags = None,  # type: ignore[assignment]  # given by with_flags
    pool: PoolFlags = None,  # type: ignore[assignment]
) -> None:
    """One operation by hand on the --class product of each input: enhance, rotate, displace,
    background or frame. Each flag sets one parameter of the operation (an unknown one for OP is
    an error naming the flag); --param KEY=VALUE sets any other, of the operation or of its
    settings section. --mask gives the product instead of detecting it.

    Writes per input STEM-OP.png / STEM-OP.mask.png / STEM-OP.overlay.png / STEM-OP.json, with
    --profile also STEM-OP.PROFILE.EXT, skipped/ and failed/ records, OUT/manifest.jsonl and
    OUT/report.html. Exit 0 when every input was processed (skipped counts), 4 if any failed."""
    # --fill lama,sd,classical is a fallback order (a list); one name stays a name
    fill_spec = None if fill_backend is None else [f.strip() for f in fill_backend.split(",")] if "," in fill_backend \
        else fill_backend
    given = {"x": x, "y": y, "fill": fill_spec, "loras": lora or None, "prompt": prompt, "tag": tag, "seed": seed,
             "azimuth": azimuth, "polar": polar,
             # displace/rotate: --sampler is their sd fill's (fill.sampler)
             ("fill.sampler" if op in (Op.displace, Op.rotate) else "sampler"): sampler.value if sampler else None}
    given = {k: v for k, v in given.items() if v is not None}
    flags = dict(OP_FLAGS)
    for kv in param or []:
        if "=" not in kv:
            raise fail(f"--param {kv!r} is not KEY=VALUE", EXIT_CONFIG)
        from pipeline.ops.actions import _value

        k, v = kv.split("=", 1)
        given[k.strip()] = _value(v.strip())
        flags.setdefault(k.strip(), f"--param {k.strip()}")
    s = load_settings_or_exit(config)
    from pipeline.ops.actions import parse_action
    from pipeline.errors import ParamsError

    try:
        actions = [parse_action(op.value, given, s, bases=(None, s.base_dir))]
    except ParamsError as e:
        where = "; ".join(f"{flags.get(f, flags.get(f.split('.')[0], f)) if f else 'edit'}: {r}"
                          for f, r in e.problems)
        raise fail(f"edit {op.value}: {where}", EXIT_CONFIG) from None
    _catalog(s, paths, output, actions=actions, tag=op.value, class_name=class_name, mask=mask, profiles=profile,
             pool=pool_options(pool))


# ------------------------------------------------------------------------------------------------
# the catalog run behind run, edit and demo


def _make_processor(s: Any, ruleset: Any, pool: Any) -> tuple[Any, int]:
    """The processor for a catalog run and how many images it takes at once: the local one (1), or
    a Ray pool (its in-flight bound). Exits 2 when Ray is missing or cannot start, 3 when a model
    cannot be loaded (on an actor's warm-up too)."""
    if pool is None:
        from pipeline.run.process import Processor

        return Processor(s, ruleset), 1
    from pipeline.engine.ray_engine import EngineError, RayProcessor

    try:
        with model_errors(), console.status("starting the Ray pool (actors load their models)..."):
            proc = RayProcessor(s, ruleset, pool)
    except EngineError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    console.print(proc.describe())
    for note in proc.sizing.notes:
        console.print(f"[yellow]note[/]: {note}")
    return proc, proc.concurrency


def _catalog(s: Any, paths: List[Path], output: OutputFlags, *, rules: Optional[Path] = None, actions: Any = None,
             tag: str = "", class_name: Optional[str] = None, mask: Optional[Path] = None,
             profiles: Optional[List[str]] = None, extra_items: Any = (), pool: Any = None, note: str = "") -> None:
    """Plan, run (with a progress bar) and summarise one catalog run; exits 2/3/4 as documented."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pipeline.run.catalog import plan_catalog, run_catalog
    from pipeline.errors import BadInput
    from pipeline.settings import SettingsError

    recursive, out, on_conflict, dry_run = output.recursive, output.out, output.on_conflict.value, output.dry_run
    try:
        ruleset, items = plan_catalog(s, paths, rules=rules, actions=actions, tag=tag, class_name=class_name,
                                      mask=mask, profiles=profiles, recursive=recursive, extra_items=extra_items)
    except SettingsError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except (BadInput, OSError) as e:
        raise fail(str(e), EXIT_INPUT) from None
    if not items:
        console.print("no input images found: nothing to do")
        return
    out_dir = out or s.resolve_path(s.paths.outbox)
    proc, concurrency = _make_processor(s, ruleset, pool)
    try:
        with model_errors(), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False) as prog:
            task = prog.add_task("run" + (" (dry run)" if dry_run else ""), total=len(items), rate="")
            t_start, done = time.perf_counter(), [0]

            def on_entry(name: str, ent: dict) -> None:
                done[0] += 1
                rate = done[0] / max(time.perf_counter() - t_start, 1e-9)
                prog.update(task, advance=1, description=f"{name[:30]}: {ent['status']}", rate=f"{rate:.2f} img/s")

            summary = run_catalog(proc, items, out_dir, on_conflict=on_conflict, dry_run=dry_run,
                                  concurrency=concurrency, max_deaths=getattr(proc, "max_deaths", 3), note=note,
                                  on_entry=on_entry)
    finally:
        close = getattr(proc, "close", None)
        if callable(close):
            close()
    _print_summary(summary, None if actions is not None else ruleset)
    inbox = s.resolve_path(s.paths.inbox)
    if any(Path(item.path).resolve().is_relative_to(inbox) for item in items) and out_dir.resolve().is_relative_to(inbox):
        console.print("[yellow]warning[/]: the output folder is inside the inbox")
    if summary.failed:
        raise typer.Exit(EXIT_INPUT)


def _print_summary(summary: Any, ruleset: Any) -> None:
    from rich.table import Table

    t = Table("outcome", "images")
    for k in ("edited", "planned", "skipped", "failed", "exists"):
        if summary.counts.get(k):
            t.add_row(k, str(summary.counts[k]))
    console.print(t)
    for note in summary.notes:
        console.print(f"[yellow]warning[/]: {note}")
    for ent in summary.entries:
        if ent["status"] in ("failed", "skipped"):
            console.print(f"[{'red' if ent['status'] == 'failed' else 'yellow'}]{ent['status']}[/] "
                          f"{Path(ent['input']).name}: {ent.get('error') or ent.get('reason')}")
    for ent in summary.entries:
        for name, c in (ent.get("checks") or {}).items():
            if not c["passed"]:
                console.print(f"[red]check failed[/] {Path(ent['input']).name} {name}: {'; '.join(c['failures'])}")
    if summary.stage_seconds:
        console.print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary.stage_seconds.items()))
    console.print(f"outputs in {summary.out_dir}; contact sheet {summary.report}"
                  + (f"; rules {ruleset.path} ({ruleset.sha256[:12]})" if ruleset is not None else ""))


# ------------------------------------------------------------------------------------------------
# demo


def demo_cmd(
    directory: Optional[Path] = typer.Option(None, "--dir", help="where to put models/, inbox/, outbox/ (default: a new temp folder)"),
) -> None:
    """Offline demo, no weights needed: builds a tiny random model set, drops generated sample photos
    into an inbox and runs the pipeline over them. Tiny random models make noise, not quality."""
    import tempfile

    from pipeline.io.samples import write_samples
    from pipeline.models.tiny import make_tiny_set

    root = directory or Path(tempfile.mkdtemp(prefix="product-studio-demo-"))
    console.print(f"[bold]demo folder[/] {root}")
    console.print("1. building a tiny random-weight model set (real layouts, random weights)...")
    cfg = make_tiny_set(root / "models")
    inbox, outbox = root / "inbox", root / "outbox"
    console.print("2. writing sample photos into the inbox...")
    write_samples(inbox)
    console.print("3. shop outputs for two sample photos with known masks (no model needed): background white, "
                  "amazon-main profile...")
    from pipeline.ops.actions import parse_action
    from pipeline.run.catalog import CatalogItem
    from pipeline.io.samples import write_shop_samples

    settings = load_settings_or_exit(cfg)
    shots, masks = write_shop_samples(root / "shop")
    white = [parse_action("background", {"mode": "color", "color": "#FFFFFF"}, settings)]
    shop = [CatalogItem(p, actions=white, mask=masks, product_class=c, tag="shop", profiles=["amazon-main"])
            for p, c in shots]
    console.print("4. running the pipeline over the inbox: detect (SAM + CLIP), then the tiny set's rules...")
    _catalog(settings, [inbox], OutputFlags(dry_run=False, on_conflict=OnConflict.suffix, recursive=False, out=outbox),
             rules=root / "models" / "rules.yaml", extra_items=shop,
             note="Rows named *-shop: generated sample photos with their known masks, put on white and framed by "
                  "the amazon-main profile (no model involved: this is what the shop outputs look like). All other "
                  "rows: detection and edits by tiny RANDOM-weight models, so their labels, masks and edits are noise.")
    console.print(f"\n[bold]outputs[/]: {outbox}  (per image: .png result, .mask.png, .overlay.png, .json record;"
                  " skipped/ and failed/ hold the others)")
    console.print(f"[bold]contact sheet[/]: {outbox / 'report.html'}")
    console.print("[yellow]These are tiny random models: labels, masks and scores are noise, not quality.[/] "
                  "Run with real models: `make run`.")
