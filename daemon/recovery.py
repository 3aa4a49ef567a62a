"""Recovery at start: finish what a crash (or kill -9) left half done, before anything new is taken.

- rows left ``running`` go back to ``pending``; their ``interruptions`` count goes up, so the
  worker runs them in an isolated child (:mod:`daemon.isolate`), and the attempt is not counted;
- rows with an outcome whose input was not yet disposed of are disposed of now (unless the file at
  that path is no longer the same content: then it is a new arrival, and the row's input is
  ``gone``); a failed record is completed with where the input is now;
- hidden temp files of the atomic writers (``.NAME.tmp-XXXX``) in the folders the daemon writes
  are partial writes: removed. The inbox lock guarantees no other daemon writes there now.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

from daemon.ledger import Ledger
from daemon.logs import log_event
from daemon.outbox import STATE_OUTCOME, OutboxWriter
from pipeline.io.hashing import file_sha256

__all__ = ["recover", "remove_stale_temps"]

_TEMP_RE = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")


def recover(ledger: Ledger, writer: OutboxWriter, log: logging.Logger, temp_folders: Iterable[Path]) -> None:
    """Resume interrupted rows, complete unfinished dispositions, remove partial writes below
    ``temp_folders`` (see the module docstring). The ledger must be open."""
    for row in ledger.recover():
        log_event(log, logging.WARNING, "resumed", "resuming %s (attempt %d was interrupted when the daemon "
                  "stopped or died; not counted against it)", row.name, row.attempts, stem=row.stem,
                  interruptions=row.interruptions + 1)
    for row in ledger.undisposed():
        outcome = STATE_OUTCOME[row.state]
        src = Path(row.source)
        if os.path.lexists(src):
            try:
                if file_sha256(src) != row.sha256:
                    ledger.set_disposition(row.id, "gone")
                    continue
            except OSError:
                continue
        try:
            what = writer.dispose(src, row.name, row.sha256, outcome)
        except OSError as e:
            log_event(log, logging.ERROR, "dispose_error", "cannot move %s out of the inbox: %s", row.name, e)
            continue
        if outcome == "failed":
            try:
                writer.annotate_failure(row.stem, row.sha256, row.source, what)
            except OSError:
                pass
        ledger.set_disposition(row.id, what)
        log_event(log, logging.INFO, "recovered", "completed the disposition of %s (%s)", row.name, what)
    remove_stale_temps(temp_folders, log)


def remove_stale_temps(folders: Iterable[Path], log: logging.Logger) -> list[str]:
    """Remove the atomic writers' hidden temp files (``.NAME.tmp-XXXX``) below ``folders``; returns
    their paths. Only for folders no one else writes (the daemon holds the inbox lock)."""
    removed: list[str] = []
    seen: set[str] = set()
    for top in folders:
        for folder, dirs, files in os.walk(top):
            if folder in seen:
                dirs[:] = []
                continue
            seen.add(folder)
            for name in files:
                if _TEMP_RE.match(name):
                    path = os.path.join(folder, name)
                    try:
                        os.unlink(path)
                    except OSError:
                        continue
                    removed.append(path)
                    log_event(log, logging.INFO, "temp_removed", "removed %s (partial write from an interrupted "
                              "run)", path)
    return removed
