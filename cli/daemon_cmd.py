"""`watch` (the inbox daemon) and `status`. Attach with ``register(app)``; heavy imports stay inside
the commands so ``product-studio --help`` remains instant.

Also runnable on its own: ``python -m cli.daemon_cmd watch ...`` (used by the subprocess tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from cli.common import (EXIT_CONFIG, EXIT_MODEL, ConfigOption, PoolFlags, console, fail, load_settings_or_exit,
                        pool_options, with_flags)

EXIT_LOCKED = 5  # another daemon already watches this inbox

# DaemonSettings field -> the flag that sets it (for error messages).
_FLAGS = {
    "poll_seconds": "--poll", "settle_seconds": "--settle", "rescan_seconds": "--rescan",
    "disposition": "--disposition", "archive_dir": "--archive", "duplicates": "--duplicates",
    "max_attempts": "--max-attempts", "non_images": "--non-images", "stop_grace_seconds": "--stop-grace",
    "log_format": "--log-format", "log_level": "--log-level", "metrics_port": "--metrics-port",
    "metrics_host": "--metrics-host", "retry_backoff_seconds": "--retry-backoff",
}


def _apply_paths(s: Any, inbox: Optional[Path], outbox: Optional[Path], ledger: Optional[Path]) -> None:
    """Flags override the settings file's paths; the ledger follows --outbox unless set explicitly."""
    ledger_set = "ledger" in s.paths.model_fields_set
    if inbox is not None:
        s.paths.inbox = inbox.expanduser().resolve()
    if outbox is not None:
        s.paths.outbox = outbox.expanduser().resolve()
        if ledger is None and not ledger_set:
            s.paths.ledger = s.paths.outbox / ".ledger.sqlite3"
    if ledger is not None:
        s.paths.ledger = ledger.expanduser().resolve()


def _daemon_settings(values: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from daemon.config import DaemonSettings
    from pipeline.settings import error_fields

    try:
        return DaemonSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        msgs = [f"{_FLAGS.get(field.split('.')[0], field)}: {reason}" for field, reason in error_fields(e)]
        raise fail("; ".join(msgs), EXIT_CONFIG) from None


@with_flags("pool_flags", PoolFlags)
def watch_cmd(
    inbox: Optional[Path] = typer.Option(None, "--inbox", help="folder to watch (default: paths.inbox)"),
    outbox: Optional[Path] = typer.Option(None, "--outbox", help="results folder (default: paths.outbox)"),
    rules: Optional[Path] = typer.Option(None, "--rules", help="rule file, reloaded when edited (default: paths.rules)"),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="ledger database (default: paths.ledger; "
                                          "follows --outbox when the settings file does not set it)"),
    poll: Optional[float] = typer.Option(None, "--poll", metavar="SECONDS",
                                         help="poll the folder every SECONDS instead of inotify (network shares)"),
    settle: Optional[float] = typer.Option(None, "--settle", metavar="SECONDS",
                                           help="take a file once unchanged this long (default: 2)"),
    rescan: Optional[float] = typer.Option(None, "--rescan", metavar="SECONDS",
                                           help="full rescan interval, catches missed events (default: 30)"),
    disposition: Optional[str] = typer.Option(None, "--disposition",
                                              help="inputs after their outcome: archive | delete | leave (default: archive)"),
    archive: Optional[Path] = typer.Option(None, "--archive", help="archive folder (default: OUTBOX/archive)"),
    duplicates: Optional[str] = typer.Option(None, "--duplicates",
                                             help="content seen before: skip | reprocess (default: skip)"),
    max_attempts: Optional[int] = typer.Option(None, "--max-attempts", help="tries per image on unexpected errors (default: 3)"),
    retry_backoff: Optional[float] = typer.Option(None, "--retry-backoff", metavar="SECONDS",
                                                  help="first retry delay, doubling per attempt (default: 2)"),
    non_images: Optional[str] = typer.Option(None, "--non-images",
                                             help="files without an image suffix: ignore | fail (default: ignore)"),
    stop_grace: Optional[float] = typer.Option(None, "--stop-grace", metavar="SECONDS",
                                               help="on SIGINT/SIGTERM wait this long for the current image, then requeue it (default: 120)"),
    log_format: Optional[str] = typer.Option(None, "--log-format", help="plain | json (one object per line) (default: plain)"),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="DEBUG | INFO | WARNING | ERROR (default: INFO)"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="serve Prometheus metrics on this port "
                                               "(needs prometheus_client)"),
    metrics_host: Optional[str] = typer.Option(None, "--metrics-host", help="metrics bind address (default: 127.0.0.1)"),
    config: Optional[Path] = ConfigOption,
    pool_flags: PoolFlags = None,  # type: ignore[assignment]  # given by with_flags
) -> None:
    """Watch the inbox and process every image once: edited -> OUTBOX/STEM.*, skipped ->
    OUTBOX/skipped/STEM.json, failed -> OUTBOX/failed/STEM.json; inputs are then archived.

    Files are taken once complete (unchanged for --settle); the SQLite ledger makes each input count
    once across crashes and restarts (same content again = duplicate, not reprocessed). Rule file
    edits apply while running (a bad edit is refused, the old rules stay). SIGINT/SIGTERM finish
    the current image and exit 0 (signals within 2 s of the first are the same request); a signal
    after that exits at once (130). An image whose attempt was interrupted by a crash or kill of
    the daemon runs next in a child process of its own; only that child dying counts against it. --engine ray processes up to
    --max-in-flight images at once on a pool of Ray actors (docs/ray.md); the ledger, intake and
    outputs stay here.

    Exit 2: bad settings, rules or folder layout (e.g. outbox inside the inbox); 3: a model cannot
    be loaded; 5: another daemon already watches this inbox."""
    from daemon.config import DaemonConfigError
    from daemon.lock import DaemonLockedError
    from daemon.logs import configure_logging, reset_logging
    from daemon.service import Daemon
    from pipeline.settings import SettingsError

    pool = pool_options(pool_flags)
    s = load_settings_or_exit(config)
    _apply_paths(s, inbox, outbox, ledger)
    ds = _daemon_settings({
        "poll_seconds": poll, "settle_seconds": settle, "rescan_seconds": rescan, "disposition": disposition,
        "archive_dir": archive.expanduser().resolve() if archive else None, "duplicates": duplicates,
        "max_attempts": max_attempts, "retry_backoff_seconds": retry_backoff, "non_images": non_images,
        "stop_grace_seconds": stop_grace, "log_format": log_format,
        "log_level": log_level.upper() if log_level else None, "metrics_port": metrics_port,
        "metrics_host": metrics_host,
    })
    rules_path = rules.expanduser().resolve() if rules else s.resolve_path(s.paths.rules)
    explicit = rules is not None or "rules" in s.paths.model_fields_set
    # The built-in default rule path may simply not exist yet: run without rules (the processor's
    # default) and pick the file up when it appears. A rule file the user named must exist.
    factory_rules = rules_path if (explicit or rules_path.exists()) else None
    child_factory = None
    if pool is not None:
        from pipeline.engine.ray_engine import RayProcessor

        def make() -> Any:
            # The coordinator validates and ships the rules; the actors load the models.
            return RayProcessor(s, factory_rules, pool)
    else:
        from pipeline.run.process import make_processor as factory

        def make() -> Any:
            return factory(s, factory_rules)

        import functools

        # Resumed images run in a child process built by this (picklable) factory: daemon.isolate.
        child_factory = functools.partial(factory, s)
    configure_logging(ds.log_format, ds.log_level)
    daemon = Daemon(s, make, ds, rules_path=rules_path, child_factory=child_factory)
    from cli.common import model_errors
    from pipeline.engine.ray_engine import EngineError

    try:
        with model_errors():
            code = daemon.run_forever()
    except EngineError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except DaemonConfigError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except DaemonLockedError as e:
        raise fail(str(e), EXIT_LOCKED) from None
    except SettingsError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    finally:
        reset_logging()
    if code == EXIT_MODEL:
        raise fail("stopped: a model could not be loaded (see the log above)", EXIT_MODEL)
    raise typer.Exit(code)


def status_cmd(
    inbox: Optional[Path] = typer.Option(None, "--inbox", help="only the daemon watching this folder"),
    outbox: Optional[Path] = typer.Option(None, "--outbox", help="as given to watch (locates the ledger)"),
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="ledger database (default: paths.ledger)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    errors: int = typer.Option(5, "--errors", help="how many recent errors to show"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Show the daemon's state: counts by state, queue depth, current image, recent errors, rules.
    Safe while the daemon runs (reads the WAL ledger and the status file the daemon keeps)."""
    import json
    import time

    from daemon.status import gather_status

    s = load_settings_or_exit(config)
    _apply_paths(s, inbox, outbox, ledger)
    led = s.resolve_path(s.paths.ledger)
    info = gather_status(led, s.resolve_path(s.paths.inbox) if inbox is not None else None, errors)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.table import Table

    if not info["ledger_exists"]:
        console.print(f"no ledger at {led} yet: the daemon has not run with these settings")
        return
    console.print(f"[bold]ledger[/] {led}")
    daemons = info["daemons"]
    if not daemons:
        console.print("daemon: [yellow]no status file[/] (never started with this ledger)")
    for dmn in daemons:
        if dmn.get("alive"):
            console.print(f"daemon: [green]running[/] pid {dmn.get('pid')} on {dmn.get('host')} since "
                          f"{dmn.get('started_at')}, watching {dmn.get('inbox')} ({dmn.get('observer')})")
        else:
            console.print(f"daemon: [yellow]not running[/] (last: {dmn.get('state')} at {dmn.get('updated_at')}, "
                          f"inbox {dmn.get('inbox')})")
        cur = dmn.get("current") if dmn.get("alive") else None
        if cur:
            iso = f", isolated in pid {cur['child_pid']}" if cur.get("child_pid") else ""
            console.print(f"  current: {cur['name']} (attempt {cur['attempt']}, since {cur['started_at']}{iso})")
            if (dmn.get("in_flight") or 0) > 1:  # the Ray engine works on several at once
                console.print(f"  in flight: {dmn['in_flight']} images")
        elif dmn.get("alive"):
            console.print("  current: idle")
        if dmn.get("alive"):
            console.print(f"  settling in the inbox: {dmn.get('intake_pending', 0)}")
            for ig in dmn.get("ignored") or []:
                console.print(f"  ignored: {ig['name']} ({ig['reason']})", soft_wrap=True, markup=False)
        rules = dmn.get("rules") or {}
        if rules:
            h = rules.get("hash")
            line = f"  rules: {rules.get('path')} " + ("(no rule file loaded)" if h in (None, "none") else f"({h[:12]})")
            if rules.get("last_error"):
                line += f"  [red]last edit refused[/]: {rules['last_error']}"
            console.print(line, soft_wrap=True)
    c = info["counts"]
    t = Table("pending (queue)", "running", "done", "skipped", "failed", "duplicates")
    t.add_row(*(str(c[k]) for k in ("pending", "running", "done", "skipped", "failed", "duplicates")))
    console.print(t)
    if info["last_errors"]:
        console.print("[bold]recent errors[/]")
        for e in info["last_errors"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["updated"]))
            console.print(f"  {when} {e['name']} ({e['state']}, attempt {e['attempts']}): {e['error']}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `watch` and `status` to ``app`` (idempotent)."""
    names = {c.name for c in app.registered_commands}
    if "watch" not in names:
        app.command("watch")(watch_cmd)
    if "status" not in names:
        app.command("status")(status_cmd)


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(_app)
    _app()
