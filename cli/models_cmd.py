"""`models list|pull|verify|make-tiny`: the model roles. Attach with ``register(app)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from cli.common import (EXIT_CONFIG, EXIT_MODEL, ConfigOption, Family, console, err_console, fail,
                        load_settings_or_exit)

models_app = typer.Typer(help="Model roles: list, download, verify, and make tiny offline sets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


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
# models


@models_app.command("list")
def models_list(config: Optional[Path] = ConfigOption) -> None:
    """Roles, their sources, whether they are available locally, and licence notes."""
    from rich.table import Table

    from pipeline.models.registry import ROLE_INFO, ModelRegistry

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

    from pipeline.models.hub import human_bytes
    from pipeline.models.registry import ModelLoadError, ModelRegistry

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

    from pipeline.models.registry import ModelLoadError, ModelRegistry

    s = load_settings_or_exit(config)
    reg = ModelRegistry(s)
    t = Table("role", "status", "class", "parameters", "device", "dtype", "load s", "files")
    failures = []
    notes: list[str] = []
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
            if v.get("note"):
                notes.append(f"{r}: {v['note']}")
        except ModelLoadError as e:
            failures.append(str(e))
            t.add_row(r, "[red]failed[/]", "", "", "", "", "", files)
    console.print(t)
    for n in notes:
        console.print(f"[yellow]note[/]: {n}", soft_wrap=True)
    for f in failures:
        console.print(f"[red]{f}[/]", soft_wrap=True)
    if failures:
        raise typer.Exit(EXIT_MODEL)


@models_app.command("make-tiny")
def models_make_tiny(
    directory: Path = typer.Argument(..., help="folder to write the tiny set and its settings.yaml into"),
    role: Optional[List[str]] = RoleOption,
    family: Family = typer.Option(Family.sd15, "--family", help="Stable Diffusion family of the diffusion roles "
                                  "(all: sd15 in settings.yaml plus settings-sd2.yaml and settings-sdxl.yaml)"),
) -> None:
    """Write tiny random-weight models for every role, in the real checkpoints' layouts, plus settings.yaml.

    The set runs the whole product offline in seconds; its outputs are noise, not quality.
    """
    from pipeline.models.tiny import make_tiny_set

    path = make_tiny_set(directory, _roles(role), family=family.value)
    console.print(f"[green]tiny model set written[/]: {directory} (family: {family.value})")
    for p in sorted(path.parent.glob("settings*.yaml")):
        console.print(f"use it with: product-studio models verify --config {p}")
