"""Helpers every command shares: loading settings with clean errors, the console, exit codes."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, get_type_hints

import click
import typer
from rich.console import Console

# Piped output (logs, CI, tests) gets wide lines instead of rich's 80-column default, so paths
# and sources in tables are not truncated.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_INPUT = 4



# Choice flags: Typer validates them and lists the choices in --help. The values are the library's
# (tests/test_cli_thin.py checks them against pipeline.ops.actions.OPS, pipeline.models.samplers.SAMPLERS and
# pipeline.io.outputs' conflict policies); they are spelled out here because importing those modules
# would load numpy and PIL on the `--help` path.
class Op(str, Enum):
    enhance = "enhance"
    rotate = "rotate"
    displace = "displace"
    background = "background"
    frame = "frame"


class Sampler(str, Enum):
    default = "default"
    lcm = "lcm"
    tcd = "tcd"
    hyper = "hyper"


class OnConflict(str, Enum):
    suffix = "suffix"
    skip = "skip"
    overwrite = "overwrite"


class Proposals(str, Enum):
    guided = "guided"
    everything = "everything"
    grounded = "grounded"
    clipseg = "clipseg"
    sam3 = "sam3"


class Family(str, Enum):
    """Stable Diffusion families of the tiny sets (pipeline.models.tiny.FAMILY_NAMES, plus all)."""
    sd15 = "sd15"
    sd2 = "sd2"
    sdxl = "sdxl"
    all = "all"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


ConfigOption = typer.Option(
    None, "--config", "-c", envvar="PRODUCT_STUDIO_CONFIG", show_envvar=True,
    help="settings file (default: conf/settings.yaml, or built-in defaults when absent)",
)


# --engine and the Ray pool's flags, shared by `run` and `watch` (docs/ray.md).
EngineOption = typer.Option(Engine.local, "--engine", help="local (in this process) or ray (a pool of Ray actors; docs/ray.md)")
AddressOption = typer.Option(None, "--address", help="with --engine ray: Ray cluster to join (e.g. HOST:6379 or "
                             "'auto'); default: start a local Ray instance with this machine's CPUs")
ActorsOption = typer.Option(None, "--actors", help="with --engine ray: number of actors (default: one per GPU, "
                            "else CPUs / --cpus-per-actor)")
MaxInFlightOption = typer.Option(None, "--max-in-flight", help="with --engine ray: images read and in flight at "
                                 "most (default: 2 x actors)")
CpusPerActorOption = typer.Option(None, "--cpus-per-actor", help="with --engine ray: CPUs (torch threads) per actor "
                                  "(default: 1 with GPUs, else up to 4)")
GpusPerActorOption = typer.Option(None, "--gpus-per-actor", help="with --engine ray: GPUs per actor (default: 1 "
                                  "when the cluster has GPUs, else 0; 0.5 puts two actors on a GPU)")


@dataclasses.dataclass
class PoolFlags:
    """--engine and the Ray pool's flags as given (``run``, ``edit``, ``watch``; docs/ray.md)."""

    engine: Engine = EngineOption
    address: Optional[str] = AddressOption
    actors: Optional[int] = ActorsOption
    max_in_flight: Optional[int] = MaxInFlightOption
    cpus_per_actor: Optional[float] = CpusPerActorOption
    gpus_per_actor: Optional[float] = GpusPerActorOption


F = TypeVar("F", bound=Callable[..., Any])


def with_flags(name: str, group: type) -> Callable[[F], F]:
    """Give a command the options of ``group`` (a dataclass whose field defaults are Typer
    options), declared once for every command that takes them; the command receives them as one
    ``name=group(...)`` argument. Typer reads the command's signature, so the wrapper's signature
    is the command's own (without ``name``) plus the group's fields, keyword-only, at the end."""
    hints = get_type_hints(group)
    fields = dataclasses.fields(group)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
             for f in fields]

    def decorate(command: F) -> F:
        sig = inspect.signature(command, eval_str=True)

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields})
            return command(**kwargs)

        own = [p for p in sig.parameters.values() if p.name != name]
        wrapper.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def pool_options(flags: PoolFlags):
    """The Ray pool's options from the flags; None for the local engine. Exits 2 on bad values or
    Ray flags given without ``--engine ray``. Imports nothing of Ray (that happens at pool start)."""
    engine = Engine(flags.engine)  # Typer has checked the flag; this is for callers in code
    given = {"--address": flags.address, "--actors": flags.actors, "--max-in-flight": flags.max_in_flight,
             "--cpus-per-actor": flags.cpus_per_actor, "--gpus-per-actor": flags.gpus_per_actor}
    if engine is Engine.local:
        stray = [k for k, v in given.items() if v is not None]
        if stray:
            raise fail(f"{', '.join(stray)} go with --engine ray", EXIT_CONFIG)
        return None
    from pipeline.engine.ray_engine import EngineError, PoolOptions

    try:
        return PoolOptions(address=flags.address, actors=flags.actors, max_in_flight=flags.max_in_flight,
                           cpus_per_actor=flags.cpus_per_actor, gpus_per_actor=flags.gpus_per_actor)
    except EngineError as e:
        raise fail(str(e), EXIT_CONFIG) from None


def fail(message: str, code: int) -> "typer.Exit":
    # Messages are plain text (paths, install hints like 'product-studio[ray]'), never markup.
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
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
    from pipeline.models.registry import ModelLoadError

    try:
        yield
    except ModelLoadError as e:
        raise fail(str(e), EXIT_MODEL) from None


class LazyCommand(click.Command):
    """A command built on first use: ``load()`` returns the real click command. The group's
    ``--help`` lists it from ``help`` alone, so whatever ``load`` imports stays off that path."""

    def __init__(self, name: str, help: str, load):  # noqa: A002 - click's name for it
        super().__init__(name, help=help)
        self._load = load
        self._real: click.Command | None = None

    def real(self) -> click.Command:
        if self._real is None:
            self._real = self._load()
            self._real.name = self.name
        return self._real

    def make_context(self, info_name, args, parent=None, **extra):
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def get_params(self, ctx):
        return self.real().get_params(ctx)
