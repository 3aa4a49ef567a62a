"""`product-studio` / `python -m cli`: assembles the command tree from the command modules.

Each ``cli/*_cmd.py`` module holds one group of commands and a ``register(app)``; they import only
the shared helpers in cli/common.py (never each other, never this module), and load heavy
libraries inside the commands so ``product-studio --help`` stays instant.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from cli import config_cmd, daemon_cmd, detect_cmd, lora_cmd, models_cmd, run_cmd
from cli.common import LazyCommand


class _Commands(TyperGroup):
    """The top-level group: the Typer commands plus `train-lora`, built on first use; also turns
    the deprecated ``run --op OP ...`` into ``edit OP ...``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "train-lora" not in self.commands:
            self.add_command(LazyCommand("train-lora", lora_cmd.TRAIN_LORA_HELP, lora_cmd.train_lora_command))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, deprecated_spellings(args))


def deprecated_spellings(args: list[str]) -> list[str]:
    """``run ... --op OP ...`` (or ``--op=OP``) -> ``edit OP ...``, with a deprecation note on
    stderr; any other command line unchanged. Kept one release (issue 21)."""
    if not args or args[0] != "run":
        return args
    rest = list(args[1:])
    for i, a in enumerate(rest):
        if a == "--":
            break
        if a == "--op" and i + 1 < len(rest):
            op = rest[i + 1]
            del rest[i:i + 2]
        elif a.startswith("--op="):
            op = a.split("=", 1)[1]
            del rest[i]
        else:
            continue
        typer.echo(f"note: `run --op {op}` is deprecated and goes away in the next release; "
                   f"use `edit {op} ...` (same options)", err=True)
        return ["edit", op, *rest]
    return args


app = typer.Typer(
    name="product-studio",
    cls=_Commands,
    help="Batch product-image filter and enhancement: detect products, enhance / rotate / displace them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (models_cmd, config_cmd, detect_cmd, run_cmd, daemon_cmd, lora_cmd):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
