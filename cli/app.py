"""`product-studio` / `python -m cli`: the command tree. Heavy libraries load inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.common import EXIT_CONFIG, EXIT_MODEL, ConfigOption, console, fail, load_settings_or_exit, model_errors

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
    t = Table("role", "what", "source", "local", "licence")
    for r in _roles(None):
        st = reg.status(r)
        local = f"[green]yes[/] {st.location}" if st.available else f"[yellow]no[/] {st.detail}"
        t.add_row(r, ROLE_INFO[r][1], st.source, local, st.licence)
    console.print(t)


@models_app.command("pull")
def models_pull(config: Optional[Path] = ConfigOption, role: Optional[List[str]] = RoleOption) -> None:
    """Download every role the settings name into the HF cache (SAM .pth also converted to safetensors)."""
    from pipeline.models import ModelLoadError, ModelRegistry

    s = load_settings_or_exit(config)
    reg = ModelRegistry(s)
    failed = 0
    for r in _roles(role):
        try:
            loc = reg.pull(r)
            console.print(f"[green]ok[/]   {r:17} {loc}")
        except ModelLoadError as e:
            failed += 1
            console.print(f"[red]fail[/] {r:17} {e}")
    if failed:
        raise fail(f"{failed} role(s) could not be pulled", EXIT_MODEL)


@models_app.command("verify")
def models_verify(config: Optional[Path] = ConfigOption, role: Optional[List[str]] = RoleOption) -> None:
    """Load each role through the registry and report class, size, device, dtype and load time."""
    from rich.table import Table

    from pipeline.models import ModelLoadError, ModelRegistry

    s = load_settings_or_exit(config)
    reg = ModelRegistry(s)
    t = Table("role", "status", "class", "parameters", "device", "dtype", "load s")
    failures = []
    for r in _roles(role):
        try:
            v = reg.verify(r)
            t.add_row(r, "[green]ok[/]", v["class"], f"{v['parameters']:,}", v["device"], v["dtype"], f"{v['seconds']:.2f}")
        except ModelLoadError as e:
            failures.append(str(e))
            t.add_row(r, "[red]failed[/]", "", "", "", "", "")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
