"""`product-studio` / `python -m cli`: the command tree. Heavy libraries load inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from cli.common import (EXIT_CONFIG, EXIT_INPUT, EXIT_MODEL, ActorsOption, AddressOption, ConfigOption, CpusPerActorOption,
                        EngineOption, GpusPerActorOption, MaxInFlightOption, console, err_console, fail,
                        load_settings_or_exit,
                        model_errors, pool_options)

app = typer.Typer(
    name="product-studio",
    help="Batch product-image filter and enhancement: detect products, enhance / rotate / displace them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Model roles: list, download, verify, and make tiny offline sets.", no_args_is_help=True)
config_app = typer.Typer(help="Settings file: check and show.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

RoleOption = typer.Option(None, "--role", "-r", help="only this role (repeatable)")


def _roles(selected: Optional[List[str]]) -> list[str]:
    from pipeline.settings import ROLES

    if not selected:
        return list(ROLES)
    bad = [r for r in selected if r not in ROLES]
    if bad:
        raise fail(f"unknown role(s) {', '.join(bad)}; roles are {', '.join(ROLES)}", EXIT_CONFIG)
    return selected


# ------------------------------------------------------------------------------------------------
# config


@config_app.command("check")
def config_check(config: Optional[Path] = ConfigOption) -> None:
    """Validate the settings file; print where it is and what it sets. Exit 2 if invalid."""
    s = load_settings_or_exit(config)
    console.print(f"[green]ok[/] {s.source_file or 'built-in defaults (no settings file found)'}")
    console.print(f"  paths resolve against {s.base_dir}")
    console.print(f"  inbox {s.resolve_path(s.paths.inbox)}  outbox {s.resolve_path(s.paths.outbox)}")
    console.print(f"  device {s.runtime.device}  dtype {s.runtime.dtype}  offline {s.offline}")
    console.print(f"  classes: {', '.join(c.name for c in s.detect.classes)}")


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption) -> None:
    """Print the effective settings (file merged over defaults) as YAML."""
    from pipeline.settings import dump_settings

    s = load_settings_or_exit(config)
    typer.echo(dump_settings(s), nl=False)


# ------------------------------------------------------------------------------------------------
# models


@models_app.command("list")
def models_list(config: Optional[Path] = ConfigOption) -> None:
    """Roles, their sources, whether they are available locally, and licence notes."""
    from rich.table import Table

    from pipeline.models import ROLE_INFO, ModelRegistry

    s = load_settings_or_exit(config)
    reg = ModelRegistry(s)
    t = Table("role", "what", "source", "local", "licence", "commercial use")
    for r in _roles(None):
        st = reg.status(r)
        local = f"[green]yes[/] {st.location}" if st.available else f"[yellow]no[/] {st.detail}"
        commercial = {True: "[green]cleared[/]", False: "[red]no[/]", None: "not confirmed"}[reg.source(r).commercial]
        if s.commercial_use and reg.source(r).commercial is False:
            commercial += " (refused: commercial_use is on)"
        t.add_row(r, ROLE_INFO[r][1], st.source, local, st.licence, commercial)
    console.print(t)


@models_app.command("pull")
def models_pull(config: Optional[Path] = ConfigOption, role: Optional[List[str]] = RoleOption,
                dry_run: bool = typer.Option(False, "--dry-run", help="list each role's files and sizes, and the "
                                             "total to download; download nothing")) -> None:
    """Download the files each role's loader reads into the HF cache, at the commit the models lock
    names (else the settings' revision; the resolved commit, sizes and SHA-256 go into the lock).
    Offline, cached roles are taken from the cache. SAM .pth is also converted to safetensors.
    A role that fails does not stop the others; any failure exits 3."""
    from rich.markup import escape
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    from rich.table import Table

    from pipeline.hub import human_bytes
    from pipeline.models import ModelLoadError, ModelRegistry

    s = load_settings_or_exit(config)
    reg = ModelRegistry(s, quiet=False)  # nothing is loaded here
    results, failures = [], []
    progress = Progress(TextColumn("{task.description:17}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err_console, transient=False)
    with progress:
        for r in _roles(role):
            task: list[Any] = []

            def on_plan(plan, r=r, task=task):
                if plan.to_download:
                    task.append(progress.add_task(r, total=plan.to_download))

            def on_bytes(n, task=task):
                if task:
                    progress.advance(task[0], n)

            try:
                results.append(reg.pull(r, dry_run=dry_run, on_plan=on_plan, on_bytes=on_bytes))
            except ModelLoadError as e:
                failures.append(e)
                # One line per failed role: role, source, what happened, what to do.
                progress.console.print(f"[red]fail[/] {r}: {escape(e.source)}: {escape(e.reason)}"
                                       + (f"; {escape(e.hint)}" if e.hint else ""), soft_wrap=True)
    if dry_run:
        t = Table("role", "file", "size", "cached", title=None)
        for res in results:
            for f in res.files:
                t.add_row(res.role, f.path, f"{f.size:,}", "yes" if f.cached else "no")
            if res.status == "local":
                t.add_row(res.role, str(res.location), f"{res.size:,}", "local")
        console.print(t)
    t = Table("role", "files", "size", "status", "commit")
    for res in results:
        status = {"downloaded": f"[green]downloaded[/] {human_bytes(res.downloaded)}", "cached": "[green]cached[/]",
                  "local": "[green]local[/]",
                  "plan": f"to download {human_bytes(res.downloaded)}" if res.downloaded else "cached"}[res.status]
        t.add_row(res.role, str(len(res.files) or 1), human_bytes(res.size), status, (res.commit or "")[:12])
    for e in failures:
        t.add_row(e.role, "", "", "[red]failed[/]", "")
    console.print(t)
    total = sum(res.downloaded for res in results)
    console.print(f"{'to download' if dry_run else 'downloaded'}: {human_bytes(total)} ({total:,} bytes)"
                  + ("" if dry_run else f"; lock: {reg.lock_path}"))
    if failures:
        raise fail(f"{len(failures)} role(s) could not be pulled: {', '.join(e.role for e in failures)}", EXIT_MODEL)


@models_app.command("verify")
def models_verify(config: Optional[Path] = ConfigOption, role: Optional[List[str]] = RoleOption,
                  hashes: bool = typer.Option(True, "--hashes/--no-hashes", help="check every file's SHA-256 "
                                              "against the models lock (and the SAM checkpoint's published one)")) -> None:
    """Load each role through the registry and report class, size, device, dtype and load time;
    check the files' SHA-256 against the models lock."""
    from rich.table import Table

    from pipeline.models import ModelLoadError, ModelRegistry

    s = load_settings_or_exit(config)
    reg = ModelRegistry(s)
    t = Table("role", "status", "class", "parameters", "device", "dtype", "load s", "files")
    failures = []
    for r in _roles(role):
        files = ""
        if hashes:
            problems = reg.check_files(r)
            hard = [p for p in problems if "hashes not checked" not in p]
            files = "[red]bad[/]" if hard else ("[yellow]unlocked[/]" if problems else "[green]sha256 ok[/]")
            if reg.source(r).path is not None:
                files = "local"
            failures += [f"model role '{r}': {p}" for p in hard]
        try:
            v = reg.verify(r)
            t.add_row(r, "[green]ok[/]", v["class"], f"{v['parameters']:,}", v["device"], v["dtype"],
                      f"{v['seconds']:.2f}", files)
        except ModelLoadError as e:
            failures.append(str(e))
            t.add_row(r, "[red]failed[/]", "", "", "", "", "", files)
    console.print(t)
    for f in failures:
        console.print(f"[red]{f}[/]", soft_wrap=True)
    if failures:
        raise typer.Exit(EXIT_MODEL)


@models_app.command("make-tiny")
def models_make_tiny(
    directory: Path = typer.Argument(..., help="folder to write the tiny set and its settings.yaml into"),
    role: Optional[List[str]] = RoleOption,
) -> None:
    """Write tiny random-weight models for every role, in the real checkpoints' layouts, plus settings.yaml.

    The set runs the whole product offline in seconds; its outputs are noise, not quality.
    """
    from pipeline.tiny import make_tiny_set

    path = make_tiny_set(directory, _roles(role))
    console.print(f"[green]tiny model set written[/]: {directory}")
    console.print(f"use it with: product-studio models verify --config {path}")


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


# detect.proposals values (pipeline.settings.DetectSettings.proposals), kept here so --help imports nothing heavy.
PROPOSAL_MODES = ("guided", "everything", "grounded", "clipseg", "sam3")


def run_detection(settings, inputs: list[Path], out: Path, classes: Optional[str], proposals: Optional[str],
                  prefilter: Optional[bool]) -> list:
    """Detect over ``inputs`` writing to ``out``; prints progress and the table. Returns outcomes."""
    from pipeline.detect_run import detect_paths, expand_inputs, resolve_classes
    from pipeline.process import Processor
    from pipeline.rules import rules_from_dict

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


@app.command("detect")
def detect_cmd(
    images: List[Path] = typer.Argument(..., help="image files or folders (their images, not recursive)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names (default: all configured)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: <outbox>/detect)"),
    proposals: Optional[str] = typer.Option(None, "--proposals", help="guided | everything | grounded | clipseg | sam3 (default: settings)"),
    prefilter: Optional[bool] = typer.Option(None, "--prefilter/--no-prefilter", help="cheap CLIP skip before SAM"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Detect product classes with SAM + CLIP. Per image writes NAME.json (detections, or skipped
    with reason and best scores), NAME.maskN.LABEL.png per detection and NAME.overlay.png.

    Exit 0 when every input was processed (skipped counts as processed), 4 if any input failed."""
    if proposals not in (None, *PROPOSAL_MODES):
        raise fail(f"--proposals must be one of {', '.join(PROPOSAL_MODES)}, not {proposals!r}", EXIT_CONFIG)
    s = load_settings_or_exit(config)
    out_dir = out or s.resolve_path(s.paths.outbox) / "detect"
    outcomes = run_detection(s, images, out_dir, classes, proposals, prefilter)
    console.print(f"outputs in {out_dir}")
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(EXIT_INPUT)


# ------------------------------------------------------------------------------------------------
# run (one operation by hand)


OP_FLAGS = {"x": "--x", "y": "--y", "fill": "--fill", "loras": "--lora", "prompt": "--prompt", "tag": "--tag",
            "seed": "--seed", "azimuth": "--azimuth", "polar": "--polar", "sampler": "--sampler",
            "fill_sampler": "--sampler"}


@app.command("run")
def run_cmd(
    paths: List[Path] = typer.Argument(..., help="images, folders (their images) or catalog CSVs"),
    op: Optional[str] = typer.Option(None, "--op", help="one operation by hand (displace | enhance | rotate | background | frame) instead of the rules"),
    profile: Optional[List[str]] = typer.Option(None, "--profile", help="marketplace profile to write too (repeatable): STEM.PROFILE.EXT with its compliance check (see docs/profiles.md)"),
    class_name: Optional[str] = typer.Option(None, "--class", help="the product class: the one --op edits, or the class of --mask's products"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="product mask file, or a folder of masks named like the inputs (white = product); skips detection"),
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
    sampler: Optional[str] = typer.Option(None, "--sampler", help="enhance, background generate, and the sd fill of "
                                          "displace/rotate: default | lcm | tcd | hyper (few-step LoRA samplers)"),
    param: Optional[List[str]] = typer.Option(None, "--param", help="any other parameter of --op as KEY=VALUE (repeatable), e.g. mode=blur, shadow=contact, aspect=4:5"),
    rules: Optional[Path] = typer.Option(None, "--rules", help="rule file (default: paths.rules from the settings)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="detect and plan only: masks, overlays and the actions that would run"),
    on_conflict: str = typer.Option("suffix", "--on-conflict", help="existing outputs: suffix | skip | overwrite"),
    recursive: bool = typer.Option(False, "--recursive", "-R", help="descend into sub-folders"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: the outbox)"),
    engine: str = EngineOption,
    address: Optional[str] = AddressOption,
    actors: Optional[int] = ActorsOption,
    max_in_flight: Optional[int] = MaxInFlightOption,
    cpus_per_actor: Optional[float] = CpusPerActorOption,
    gpus_per_actor: Optional[float] = GpusPerActorOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run the rules over images, folders or a catalog CSV (path, optional class, action, sku
    columns), or with --op one operation by hand. --mask gives the product instead of detecting
    it. --engine ray spreads the images over a pool of Ray actors (see docs/ray.md).

    Writes per input STEM.png / STEM.mask.png / STEM.overlay.png / STEM.json (edited; --op:
    STEM-OP.png ...), with --profile also STEM.PROFILE.EXT per profile (checked; a failed check
    is reported, not an error), skipped/STEM.json or failed/STEM.json, plus OUT/manifest.jsonl and
    OUT/report.html (contact sheet). Exit 0 when every input was processed (skipped counts), 4 if
    any failed."""
    # --fill lama,sd,classical is a fallback order (a list); one name stays a name
    fill_spec = None if fill_backend is None else [f.strip() for f in fill_backend.split(",")] if "," in fill_backend \
        else fill_backend
    given = {"x": x, "y": y, "fill": fill_spec, "loras": lora or None, "prompt": prompt, "tag": tag, "seed": seed,
             "azimuth": azimuth, "polar": polar,
             # rotate's own steps are the novel view's; its sd fill's sampler is fill_sampler
             ("fill_sampler" if op == "rotate" else "sampler"): sampler}
    given = {k: v for k, v in given.items() if v is not None}
    for kv in param or []:
        if "=" not in kv:
            raise fail(f"--param {kv!r} is not KEY=VALUE", EXIT_CONFIG)
        from pipeline.actions import _value

        k, v = kv.split("=", 1)
        given[k.strip()] = _value(v.strip())
        OP_FLAGS.setdefault(k.strip(), f"--param {k.strip()}")
    if op is None and given:
        raise fail("operation options (--x, --lora, --azimuth, ...) go with --op; rules mode takes them from the rule file",
                   EXIT_CONFIG)
    if op is not None and class_name is None:
        raise fail("--op needs --class NAME (the product class to edit)", EXIT_CONFIG)
    s = load_settings_or_exit(config)
    actions = None
    if op is not None:
        from pipeline.actions import parse_action
        from pipeline.errors import ParamsError

        try:
            actions = [parse_action(op, given, s, bases=(None, s.base_dir))]
        except ParamsError as e:
            where = "; ".join(f"{OP_FLAGS.get(f.split('.')[0], f) if f else '--op'}: {r}" for f, r in e.problems)
            raise fail(f"--op {op}: {where}", EXIT_CONFIG) from None
    opts = pool_options(engine, address, actors, max_in_flight, cpus_per_actor, gpus_per_actor)
    _run_jobs(s, paths, rules, dry_run, on_conflict, recursive, out, pool=opts, actions=actions,
              op=op, mask=mask, class_name=class_name, profiles=profile)


def _make_processor(s: Any, ruleset: Any, pool: Any) -> tuple[Any, int]:
    """The processor for a catalog run and how many images it takes at once: the local one (1), or
    a Ray pool (its in-flight bound). Exits 2 when Ray is missing or cannot start, 3 when a model
    cannot be loaded (on an actor's warm-up too)."""
    if pool is None:
        from pipeline.process import Processor

        return Processor(s, ruleset), 1
    from pipeline.ray_engine import EngineError, RayProcessor

    try:
        with model_errors(), console.status("starting the Ray pool (actors load their models)..."):
            proc = RayProcessor(s, ruleset, pool)
    except EngineError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    console.print(proc.describe())
    for note in proc.sizing.notes:
        console.print(f"[yellow]note[/]: {note}")
    return proc, proc.concurrency


def _run_jobs(s: Any, paths: List[Path], rules: Optional[Path], dry_run: bool, on_conflict: str, recursive: bool,
              out: Optional[Path], *, pool: Any = None, actions: Any = None,
              op: Optional[str] = None, mask: Optional[Path] = None, class_name: Optional[str] = None,
              profiles: Optional[List[str]] = None, extra_items: Optional[list] = None, note: str = "") -> None:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from pipeline.catalog import CatalogJob, Manifest, collect_items, manifest_entry, plan_jobs, process_jobs, write_report
    from pipeline.errors import BadInput
    from pipeline.outputs import OutputFolder
    from pipeline.rules import load_rules, rules_from_dict
    from pipeline.settings import SettingsError

    if on_conflict not in ("suffix", "skip", "overwrite"):
        raise fail(f"--on-conflict must be suffix, skip or overwrite, not {on_conflict!r}", EXIT_CONFIG)
    if mask is not None and not mask.exists():
        raise fail(f"--mask {mask}: no such file or folder", EXIT_INPUT)
    try:
        if op is not None:
            # One operation by hand: the settings' classes (and --class, if it is not one of them)
            # are scored, so a neighbour that looks more like another class is not taken for it.
            classes = [c.model_dump() for c in s.detect.classes]
            if class_name not in {c["name"] for c in classes}:
                classes.append({"name": class_name})
            ruleset = rules_from_dict({"classes": classes, "rules": []}, s)
        else:
            ruleset = load_rules(rules or s.resolve_path(s.paths.rules), s)
            if class_name is not None and class_name not in {c.name for c in ruleset.classes}:
                raise fail(f"--class {class_name!r} is not a class of the rules ({', '.join(c.name for c in ruleset.classes)})",
                           EXIT_CONFIG)
        items = collect_items(paths, s, recursive)
        if profiles:
            from pipeline.profiles import get_profile

            for n in profiles:
                get_profile(n, s)
    except SettingsError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except (BadInput, OSError) as e:
        raise fail(str(e), EXIT_INPUT) from None
    items.extend(extra_items or [])
    if not items:
        console.print("no input images found: nothing to do")
        return
    for item in items:
        if actions is not None:
            item.actions, item.tag = actions, op or ""
        if class_name is not None:
            item.product_class = class_name
            if mask is None and op is None:
                item.classes = [class_name]
        if mask is not None:
            item.mask = mask
        if profiles:
            item.profiles = list(profiles)
    out_dir = out or s.resolve_path(s.paths.outbox)
    inbox = s.resolve_path(s.paths.inbox)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc, concurrency = _make_processor(s, ruleset, pool)
    manifest = Manifest(out_dir / "manifest.jsonl")
    jobs: list[CatalogJob] = []
    order: dict[int, int] = {}  # job index -> input position (the report lists inputs in order)
    entries: list[tuple[int, dict]] = []
    stage: dict[str, float] = {}
    notes: list[str] = []
    try:
        with model_errors(), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False) as prog:
            task = prog.add_task("run" + (" (dry run)" if dry_run else ""), total=len(items), rate="")
            t_start = time.perf_counter()

            def finished(pos: int, name: str, ent: dict, rec: Optional[dict] = None) -> None:
                for a in (rec or {}).get("actions") or []:
                    r, who = a.get("record") or {}, f"{name}: {a.get('op')} on {a.get('label')}"
                    fill = r.get("fill") or {}
                    if fill.get("fallback"):
                        notes.append(f"{who}: {fill.get('used')} fill used as fallback: {fill.get('fallback_reason')}")
                    notes.extend(f"{who}: {w}" for w in [fill.get("warning"), *(r.get("warnings") or [])] if w)
                manifest.add(ent)
                entries.append((pos, ent))
                rate = len(entries) / max(time.perf_counter() - t_start, 1e-9)
                prog.update(task, advance=1, description=f"{name[:30]}: {ent['status']}", rate=f"{rate:.2f} img/s")

            for pos, item, stem in plan_jobs(items, OutputFolder(out_dir, on_conflict)):
                if stem is None:
                    finished(pos, item.path.name, manifest_entry(item, None, None, 0.0, status="exists"))
                    continue
                order[len(jobs)] = pos
                jobs.append(CatalogJob(len(jobs), item, stem))
            for job, rec, seconds in process_jobs(proc, jobs, out_dir, dry_run=dry_run, concurrency=concurrency,
                                                  max_deaths=getattr(proc, "max_deaths", 3)):
                for k, v in (rec.get("timings") or {}).items():
                    if k != "total":
                        stage[k] = stage.get(k, 0.0) + v
                finished(order[job.index], job.item.path.name, manifest_entry(job.item, job.stem, rec, seconds), rec)
    finally:
        manifest.close()
        close = getattr(proc, "close", None)
        if callable(close):
            close()
    entries_in_order = [ent for _, ent in sorted(entries, key=lambda e: e[0])]
    report = write_report(out_dir, entries_in_order, note=note)
    counts: dict[str, int] = {}
    for ent in entries_in_order:
        counts[ent["status"]] = counts.get(ent["status"], 0) + 1
    t = Table("outcome", "images")
    for k in ("edited", "planned", "skipped", "failed", "exists"):
        if counts.get(k):
            t.add_row(k, str(counts[k]))
    console.print(t)
    for note in notes:
        console.print(f"[yellow]warning[/]: {note}")
    for ent in entries_in_order:
        if ent["status"] in ("failed", "skipped"):
            console.print(f"[{'red' if ent['status'] == 'failed' else 'yellow'}]{ent['status']}[/] "
                          f"{Path(ent['input']).name}: {ent.get('error') or ent.get('reason')}")
    for ent in entries_in_order:
        for name, c in (ent.get("checks") or {}).items():
            if not c["passed"]:
                console.print(f"[red]check failed[/] {Path(ent['input']).name} {name}: {'; '.join(c['failures'])}")
    if stage:
        console.print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in stage.items()))
    console.print(f"outputs in {out_dir}; contact sheet {report}"
                  + (f"; rules {ruleset.path} ({ruleset.sha256[:12]})" if op is None else ""))
    if any(Path(item.path).resolve().is_relative_to(inbox) for item in items) and out_dir.resolve().is_relative_to(inbox):
        console.print("[yellow]warning[/]: the output folder is inside the inbox")
    if counts.get("failed"):
        raise typer.Exit(EXIT_INPUT)


# ------------------------------------------------------------------------------------------------
# check (compliance audit of any photo)


@app.command("check")
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

    from pipeline.compliance import measure, summary
    from pipeline.errors import BadInput
    from pipeline.imageio import find_mask, is_image_name, load_image, load_mask
    from pipeline.profiles import get_profile

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
                    from pipeline.detect import Detector
                    from pipeline.models import ModelRegistry

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


# ------------------------------------------------------------------------------------------------
# rules

rules_app = typer.Typer(help="Rule files: class -> action routing.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


@rules_app.command("check")
def rules_check(
    file: Optional[Path] = typer.Argument(None, help="rule file (default: paths.rules from the settings)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Validate a rule file and print what each class will get. Exit 2 (with file, line, field
    and reason) when it is invalid."""
    from pipeline.rules import load_rules
    from pipeline.settings import SettingsError

    s = load_settings_or_exit(config)
    path = file or s.resolve_path(s.paths.rules)
    try:
        rs = load_rules(path, s)
    except SettingsError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    console.print(f"[green]ok[/] {path}  (sha256 {rs.sha256[:12]}, {len(rs.file.rules)} rules, no match: {rs.no_match})")
    for cls, lines in rs.describe():
        console.print(f"[bold]{cls}[/]")
        for line in lines:
            console.print(f"  {line}", soft_wrap=True)


# ------------------------------------------------------------------------------------------------
# demo


@app.command("demo")
def demo_cmd(
    directory: Optional[Path] = typer.Option(None, "--dir", help="where to put models/, inbox/, outbox/ (default: a new temp folder)"),
) -> None:
    """Offline demo, no weights needed: builds a tiny random model set, drops generated sample photos
    into an inbox and runs the pipeline over them. Tiny random models make noise, not quality."""
    import tempfile

    from pipeline.samples import write_samples
    from pipeline.tiny import make_tiny_set

    root = directory or Path(tempfile.mkdtemp(prefix="product-studio-demo-"))
    console.print(f"[bold]demo folder[/] {root}")
    console.print("1. building a tiny random-weight model set (real layouts, random weights)...")
    cfg = make_tiny_set(root / "models")
    inbox, outbox = root / "inbox", root / "outbox"
    console.print("2. writing sample photos into the inbox...")
    write_samples(inbox)
    console.print("3. shop outputs for two sample photos with known masks (no model needed): background white, "
                  "amazon-main profile...")
    from pipeline.actions import parse_action
    from pipeline.catalog import CatalogItem
    from pipeline.samples import write_shop_samples

    settings = load_settings_or_exit(cfg)
    shots, masks = write_shop_samples(root / "shop")
    white = [parse_action("background", {"mode": "color", "color": "#FFFFFF"}, settings)]
    shop = [CatalogItem(p, actions=white, mask=masks, product_class=c, tag="shop", profiles=["amazon-main"])
            for p, c in shots]
    console.print("4. running the pipeline over the inbox: detect (SAM + CLIP), then the tiny set's rules...")
    _run_jobs(settings, [inbox], root / "models" / "rules.yaml", False, "suffix", False, outbox, extra_items=shop,
              note="Rows named *-shop: generated sample photos with their known masks, put on white and framed by "
                   "the amazon-main profile (no model involved: this is what the shop outputs look like). All other "
                   "rows: detection and edits by tiny RANDOM-weight models, so their labels, masks and edits are noise.")
    console.print(f"\n[bold]outputs[/]: {outbox}  (per image: .png result, .mask.png, .overlay.png, .json record;"
                  " skipped/ and failed/ hold the others)")
    console.print(f"[bold]contact sheet[/]: {outbox / 'report.html'}")
    console.print("[yellow]These are tiny random models: labels, masks and scores are noise, not quality.[/] "
                  "Run with real models: `make run`.")


# Command groups kept in their own modules (they import nothing heavy at import time).
from cli import daemon_cmd, lora_cmd  # noqa: E402

lora_cmd.register(app)
daemon_cmd.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
