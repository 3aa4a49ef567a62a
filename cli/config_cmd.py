"""`config check|show` and `rules check`: the settings and rule files. Attach with ``register(app)``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import EXIT_CONFIG, ConfigOption, console, fail, load_settings_or_exit

config_app = typer.Typer(help="Settings file: check and show.", no_args_is_help=True)
rules_app = typer.Typer(help="Rule files: class -> action routing.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
    app.add_typer(rules_app, name="rules")


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
# rules



@rules_app.command("check")
def rules_check(
    file: Optional[Path] = typer.Argument(None, help="rule file (default: paths.rules from the settings)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Validate a rule file and print what each class will get. Exit 2 (with file, line, field
    and reason) when it is invalid."""
    from pipeline.run.rules import load_rules
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
