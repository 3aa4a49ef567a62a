"""Daemon settings and the resolved set of folders the daemon works with.

:class:`DaemonSettings` holds the knobs of `product-studio watch` (built from CLI flags today; meant
to become the ``daemon:`` section of the settings file). :class:`DaemonPaths` is every path the
daemon touches, absolute, and :func:`check_paths` refuses layouts that would make output flow back
into the inbox (processed forever) before anything is started.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import BadInput
from pipeline.settings import Settings


class DaemonConfigError(BadInput):
    """A daemon configuration that cannot be run (bad folder layout, missing optional package)."""


class DaemonSettings(BaseModel):
    """How the inbox daemon watches, retries and disposes of inputs. Every field has a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    poll_seconds: float | None = Field(
        None, gt=0, description="use a polling observer with this interval (network shares); None: inotify")
    settle_seconds: float = Field(
        2.0, ge=0.0, description="a file is taken once its size and mtime stayed unchanged this long")
    rescan_seconds: float = Field(
        30.0, gt=0, description="full recursive rescan of the inbox (catches missed events)")
    recursive: bool = Field(True, description="watch and scan sub-folders of the inbox")
    non_images: Literal["ignore", "fail"] = Field(
        "ignore", description="files without an image suffix: ignore (left in place, logged once) or fail them")
    disposition: Literal["archive", "delete", "leave"] = Field(
        "archive", description="what happens to an input once it has an outcome")
    archive_dir: Path | None = Field(
        None, description="where `archive` moves inputs (and `delete` moves failed ones); default OUTBOX/archive")
    duplicates: Literal["skip", "reprocess"] = Field(
        "skip", description="content already edited/skipped under the same rules and pipeline version")
    max_attempts: int = Field(3, ge=1, le=100, description="tries per image for unexpected (transient) errors")
    max_deaths: int = Field(
        3, ge=1, le=100, description="deaths of the isolated worker process holding an image before it fails "
        "(the Ray engine uses its pool's max_deaths)")
    stall_grace_seconds: float | None = Field(
        None, ge=0.0, description="a file that looks cut off (upload stalled) waits while modified within this "
        "long; None: 10 x settle_seconds")
    signal_window_seconds: float = Field(
        2.0, ge=0.0, description="stop signals within this long of the first are one stop request")
    retry_backoff_seconds: float = Field(2.0, ge=0.0, description="first retry delay; doubles per attempt")
    retry_backoff_max_seconds: float = Field(300.0, ge=0.0, description="cap on the retry delay")
    stop_grace_seconds: float = Field(
        120.0, ge=0.0, description="on SIGINT/SIGTERM, wait this long for the current image, then requeue it")
    rules_poll_seconds: float = Field(2.0, gt=0, description="how often the rule file is checked for edits")
    status_interval_seconds: float = Field(2.0, gt=0, description="status file heartbeat")
    log_format: Literal["plain", "json"] = "plain"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics on this port")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds to")


def inbox_key(inbox: Path) -> str:
    """Short stable id of an inbox folder (its real path), used to name lock and status files."""
    return hashlib.sha256(os.path.realpath(inbox).encode("utf-8", "surrogateescape")).hexdigest()[:12]


@dataclass(frozen=True)
class DaemonPaths:
    inbox: Path
    outbox: Path
    ledger: Path
    rules: Path | None
    archive: Path
    lock_file: Path
    status_file: Path

    @classmethod
    def resolve(cls, settings: Settings, ds: DaemonSettings, rules: Path | None = None) -> "DaemonPaths":
        """Absolute paths from the settings (``paths.*``) and ``ds``; ``rules`` overrides ``paths.rules``."""
        inbox = Path(os.path.abspath(settings.resolve_path(settings.paths.inbox)))
        outbox = Path(os.path.abspath(settings.resolve_path(settings.paths.outbox)))
        ledger = Path(os.path.abspath(settings.resolve_path(settings.paths.ledger)))
        rules_path = rules if rules is not None else settings.resolve_path(settings.paths.rules)
        archive = Path(os.path.abspath(settings.resolve_path(ds.archive_dir))) if ds.archive_dir else outbox / "archive"
        key = inbox_key(inbox)
        return cls(
            inbox=inbox,
            outbox=outbox,
            ledger=ledger,
            rules=Path(os.path.abspath(rules_path)) if rules_path is not None else None,
            archive=archive,
            lock_file=ledger.parent / f".daemon-{key}.lock",
            status_file=ledger.parent / f".daemon-{key}.status.json",
        )


def _real(p: Path) -> Path:
    # realpath resolves symlinked folders (and tolerates a missing tail), so a layout cannot dodge
    # the checks below by pointing a link into the inbox.
    return Path(os.path.realpath(p))


def _within(child: Path, parent: Path) -> bool:
    c, p = _real(child), _real(parent)
    return c == p or p in c.parents


def check_paths(paths: DaemonPaths, ds: DaemonSettings) -> None:
    """Refuse layouts where outputs, archive or daemon state land inside the inbox (a loop), or the
    inbox lies inside a folder the daemon writes. Raises :class:`DaemonConfigError` listing all."""
    problems: list[str] = []
    if not paths.inbox.exists():
        problems.append(f"inbox {paths.inbox} does not exist (create it, or check --inbox / paths.inbox)")
    elif not paths.inbox.is_dir():
        problems.append(f"inbox {paths.inbox} is not a folder")
    why = "outputs written there would be picked up again as inputs"
    if _within(paths.outbox, paths.inbox):
        problems.append(f"outbox {paths.outbox} is inside the inbox {paths.inbox}: {why}")
    elif _within(paths.inbox, paths.outbox):
        problems.append(f"inbox {paths.inbox} is inside the outbox {paths.outbox}: {why}")
    if ds.disposition != "leave" or ds.archive_dir is not None:
        if _within(paths.archive, paths.inbox):
            problems.append(f"archive folder {paths.archive} is inside the inbox {paths.inbox}: "
                            "archived inputs would be processed again")
        elif _within(paths.inbox, paths.archive):
            problems.append(f"inbox {paths.inbox} is inside the archive folder {paths.archive}")
    if _within(paths.ledger, paths.inbox):
        problems.append(f"ledger {paths.ledger} is inside the inbox {paths.inbox}: the inbox is never written")
    if paths.rules is not None and _within(paths.rules, paths.inbox):
        problems.append(f"rule file {paths.rules} is inside the inbox {paths.inbox}")
    if problems:
        raise DaemonConfigError("cannot watch this layout:\n  " + "\n  ".join(problems))
