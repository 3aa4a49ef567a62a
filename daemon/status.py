"""What the daemon is doing, for `product-studio status` (which may run while the daemon does).

The daemon keeps a :class:`StatusBoard` and writes it atomically (temp + rename) to
``LEDGER_DIR/.daemon-<inbox key>.status.json`` on every change and as a heartbeat. ``status``
combines that file with a read of the ledger (WAL: never blocks the daemon) and the lock (is the
writing daemon still alive?).
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from daemon.config import inbox_key
from daemon.ledger import read_summary
from daemon.lock import lock_holder
from pipeline.io.imageio import atomic_write_text


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StatusBoard:
    def __init__(self, **static: Any):
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._static = dict(static)
        self.state = "starting"
        self.current: dict[str, Any] | None = None
        self.in_flight = 0  # images being processed now (more than one with the Ray engine)
        self.last_errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.rules: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.queue_depth = 0
        self.intake_pending = 0
        self.ignored: list[dict[str, Any]] = []  # files intake leaves alone, with the reason
        self.processed = 0
        self.started_at = time.time()
        self.dirty = True

    def update(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)
            self.dirty = True

    def set_static(self, **kw: Any) -> None:
        with self._lock:
            self._static.update(kw)
            self.dirty = True

    def error(self, name: str, stem: str | None, error: str, final: bool) -> None:
        with self._lock:
            self.last_errors.appendleft({"at": _iso(time.time()), "name": name, "stem": stem, "error": error,
                                         "final": final})
            self.dirty = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._static,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "state": self.state,
                "started_at": _iso(self.started_at),
                "updated_at": _iso(time.time()),
                "updated_ts": time.time(),
                "current": self.current,
                "in_flight": self.in_flight,
                "queue_depth": self.queue_depth,
                "intake_pending": self.intake_pending,
                "ignored": list(self.ignored),
                "processed_since_start": self.processed,
                "counts": dict(self.counts),
                "rules": dict(self.rules),
                "last_errors": list(self.last_errors),
            }

    def write(self, path: Path) -> None:
        """Temp file + rename: readers never see a partial file. Not fsynced: it is rewritten every
        few seconds and only advisory, and an fsync per update would slow the daemon down. Writers
        (the periodic one and an immediate one after a rules reload) take turns, snapshot and rename
        together, so an older snapshot can never replace a newer file."""
        with self._write_lock:
            self._write(path)

    def _write(self, path: Path) -> None:
        snap = self.snapshot()
        with self._lock:
            self.dirty = False
        atomic_write_text(path, json.dumps(snap, indent=2, default=str) + "\n")


def read_status_files(ledger: Path, inbox: Path | None = None) -> list[dict[str, Any]]:
    """Status files next to ``ledger`` (only the one for ``inbox`` when given), each with
    ``alive`` (a daemon holds the matching lock) added."""
    folder = ledger.parent
    pattern = f".daemon-{inbox_key(inbox)}.status.json" if inbox is not None else ".daemon-*.status.json"
    out = []
    for f in sorted(folder.glob(pattern)):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if inbox is None and data.get("ledger") and os.path.realpath(data["ledger"]) != os.path.realpath(ledger):
            continue
        lock = f.with_name(f.name.replace(".status.json", ".lock"))
        holder = lock_holder(lock)
        data["alive"] = holder is not None
        data["status_file"] = str(f)
        out.append(data)
    return out


def gather_status(ledger: Path, inbox: Path | None = None, n_errors: int = 5) -> dict[str, Any]:
    """Everything `status` prints: ledger counts and errors, and each daemon's live state."""
    info: dict[str, Any] = {"ledger": str(ledger), "ledger_exists": ledger.exists()}
    if ledger.exists():
        info.update(read_summary(ledger, n_errors))
    info["daemons"] = read_status_files(ledger, inbox)
    return info
