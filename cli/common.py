"""Helpers every command shares: loading settings with clean errors, the console, exit codes."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console

# Piped output (logs, CI, tests) gets wide lines instead of rich's 80-column default, so paths
# and sources in tables are not truncated.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_INPUT = 4

ConfigOption = typer.Option(
    None, "--config", "-c", envvar="PRODUCT_STUDIO_CONFIG", show_envvar=True,
    help="settings file (default: conf/settings.yaml, or built-in defaults when absent)",
)


def fail(message: str, code: int) -> "typer.Exit":
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def load_settings_or_exit(path: Path | None):
    from pipeline.settings import SettingsError, load_settings

    try:
        return load_settings(path)
    except SettingsError as e:
        raise fail(str(e), EXIT_CONFIG) from None


@contextmanager
def model_errors() -> Iterator[None]:
    """Turn a ModelLoadError into a clear message and exit code 3."""
    from pipeline.models import ModelLoadError

    try:
        yield
    except ModelLoadError as e:
        raise fail(str(e), EXIT_MODEL) from None
