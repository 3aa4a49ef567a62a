"""The ledger: one SQLite row per input, keyed by content (SHA-256 + rules hash + pipeline version).

States: ``pending -> running -> done | skipped | failed``. The ledger *is* the work queue: intake
inserts ``pending`` rows, the worker claims the oldest due one (``running``, attempt counted) and
finishes it. Because every transition is a committed transaction, a crash loses nothing:
:meth:`Ledger.recover` turns rows left ``running`` back into ``pending`` at the next start. The
interrupted attempt does not count (the daemon was stopped or killed: not the image's fault); it
is counted in ``interruptions``, and such an image then runs in an isolated child process, whose
own deaths (``deaths``, ``last_death``) are what count against it (:mod:`pipeline.run.deaths`).

``disposition`` stays NULL until the input has been archived / deleted / left; a terminal row with
a NULL disposition after a crash is completed at start without processing the image again.

``arrivals`` logs every time content entered the inbox: ``new``, ``duplicate`` (same content
already handled: not processed again), ``retry`` (a failed input dropped again) or ``renamed``.

WAL mode lets ``product-studio status`` read while the daemon writes. One connection serves the
daemon's threads, serialised by a lock.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

STATES = ("pending", "running", "done", "skipped", "failed")
ACTIVE = ("pending", "running")
TERMINAL = ("done", "skipped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id               INTEGER PRIMARY KEY,
    sha256           TEXT NOT NULL,
    rules_hash       TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    source           TEXT NOT NULL,
    name             TEXT NOT NULL,
    stem             TEXT NOT NULL UNIQUE,
    size             INTEGER,
    state            TEXT NOT NULL CHECK (state IN ('pending','running','done','skipped','failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    record           TEXT,
    disposition      TEXT,
    arrived          REAL NOT NULL,
    started          REAL,
    finished         REAL,
    seconds          REAL,
    next_attempt     REAL NOT NULL DEFAULT 0,
    updated          REAL NOT NULL,
    interruptions    INTEGER NOT NULL DEFAULT 0,
    deaths           INTEGER NOT NULL DEFAULT 0,
    last_death       TEXT
);
CREATE INDEX IF NOT EXISTS items_queue ON items (state, next_attempt, id);
CREATE INDEX IF NOT EXISTS items_key ON items (sha256, rules_hash, pipeline_version);
CREATE TABLE IF NOT EXISTS arrivals (
    id          INTEGER PRIMARY KEY,
    item_id     INTEGER,
    kind        TEXT NOT NULL CHECK (kind IN ('new','duplicate','retry','renamed')),
    path        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    at          REAL NOT NULL,
    disposition TEXT
);
CREATE INDEX IF NOT EXISTS arrivals_item ON arrivals (item_id);
"""
SCHEMA_VERSION = 2
# Columns added after version 1, with their definitions (ALTER TABLE on an older ledger).
_ADDED_COLUMNS = {
    "interruptions": "INTEGER NOT NULL DEFAULT 0",
    "deaths": "INTEGER NOT NULL DEFAULT 0",
    "last_death": "TEXT",
}


@dataclass(frozen=True)
class Row:
    id: int
    sha256: str
    rules_hash: str
    pipeline_version: str
    source: str
    name: str
    stem: str
    size: int | None
    state: str
    attempts: int
    error: str | None
    record: str | None
    disposition: str | None
    arrived: float
    started: float | None
    finished: float | None
    seconds: float | None
    next_attempt: float
    updated: float
    interruptions: int = 0   # attempts ended by the daemon stopping or dying (never counted)
    deaths: int = 0          # deaths of a worker process holding this image alone (counted)
    last_death: str | None = None

    @property
    def key(self) -> str:
        return f"{self.sha256}:{self.rules_hash}:{self.pipeline_version}"


def connect(path: Path, *, timeout: float = 30.0) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    return conn


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self.journal_mode = ""

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> "Ledger":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        # WAL: readers (status) never block the writer. Some network filesystems cannot do WAL;
        # SQLite then keeps the old journal and everything still works, only readers may wait.
        self.journal_mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        # NORMAL in WAL mode survives a process crash; only an OS crash may lose the last commits,
        # which at worst re-processes an image (outputs are overwritten atomically, never doubled).
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(f"ledger {self.path} has schema version {version}; this version knows "
                               f"{SCHEMA_VERSION} (a newer product-studio wrote it)")
        if version < SCHEMA_VERSION:
            have = {r[1] for r in conn.execute("PRAGMA table_info(items)")}
            for col, decl in _ADDED_COLUMNS.items():
                if col not in have:
                    conn.execute(f"ALTER TABLE items ADD COLUMN {col} {decl}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._conn = conn
        return self

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("ledger is closed")
        return self._conn

    def _tx(self) -> "_Tx":
        return _Tx(self)

    def _one(self, sql: str, args: tuple = ()) -> Row | None:
        with self._lock:
            r = self.conn.execute(sql, args).fetchone()
        return _row(r) if r is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[Row]:
        with self._lock:
            return [_row(r) for r in self.conn.execute(sql, args).fetchall()]

    # -- start-up --------------------------------------------------------------------------------
    def recover(self) -> list[Row]:
        """Rows left ``running`` by a crash or kill of the daemon go back to ``pending``, the attempt
        not counted and ``interruptions`` + 1 (so the next attempt runs isolated); returns them (as
        they were)."""
        with self._tx() as c:
            rows = [_row(r) for r in c.execute("SELECT * FROM items WHERE state = 'running'").fetchall()]
            c.execute("UPDATE items SET state = 'pending', attempts = MAX(attempts - 1, 0), "
                      "interruptions = interruptions + 1, next_attempt = 0, updated = ? WHERE state = 'running'",
                      (time.time(),))
        return rows

    def undisposed(self) -> list[Row]:
        """Terminal rows whose input was never archived / deleted / left (crash in between)."""
        return self._all("SELECT * FROM items WHERE state IN ('done','skipped','failed') AND disposition IS NULL "
                         "ORDER BY id")

    # -- lookups ---------------------------------------------------------------------------------
    def get(self, item_id: int) -> Row | None:
        return self._one("SELECT * FROM items WHERE id = ?", (item_id,))

    def by_source(self, sha256: str, source: str) -> Row | None:
        return self._one("SELECT * FROM items WHERE sha256 = ? AND source = ? ORDER BY id DESC LIMIT 1",
                         (sha256, source))

    def active_for(self, sha256: str) -> Row | None:
        return self._one("SELECT * FROM items WHERE sha256 = ? AND state IN ('pending','running') "
                         "ORDER BY id LIMIT 1", (sha256,))

    def latest_for_key(self, sha256: str, rules_hash: str, version: str) -> Row | None:
        return self._one("SELECT * FROM items WHERE sha256 = ? AND rules_hash = ? AND pipeline_version = ? "
                         "ORDER BY id DESC LIMIT 1", (sha256, rules_hash, version))

    def stem_taken(self, stem: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM items WHERE stem = ?", (stem,)).fetchone() is not None

    # -- transitions -----------------------------------------------------------------------------
    def add(self, *, sha256: str, rules_hash: str, version: str, source: str, name: str, size: int | None,
            stem_candidates: Iterator[str], stem_free: Callable[[str], bool] = lambda s: True) -> Row:
        """Insert a ``pending`` row with the first stem not used by any row and accepted by ``stem_free``."""
        now = time.time()
        with self._tx() as c:
            for stem in stem_candidates:
                if c.execute("SELECT 1 FROM items WHERE stem = ?", (stem,)).fetchone() is None and stem_free(stem):
                    break
            cur = c.execute(
                "INSERT INTO items (sha256, rules_hash, pipeline_version, source, name, stem, size, state, "
                "arrived, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (sha256, rules_hash, version, source, name, stem, size, now, now))
            item_id = cur.lastrowid
            c.execute("INSERT INTO arrivals (item_id, kind, path, sha256, at) VALUES (?, 'new', ?, ?, ?)",
                      (item_id, source, sha256, now))
        row = self.get(item_id)
        assert row is not None
        return row

    def claim(self, rules_hash: str, now: float | None = None) -> Row | None:
        """Oldest due ``pending`` row -> ``running`` (attempts + 1, keyed to the rules in force)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            r = c.execute("SELECT id FROM items WHERE state = 'pending' AND next_attempt <= ? ORDER BY id LIMIT 1",
                          (now,)).fetchone()
            if r is None:
                return None
            c.execute("UPDATE items SET state = 'running', attempts = attempts + 1, started = ?, rules_hash = ?, "
                      "updated = ? WHERE id = ?", (now, rules_hash, now, r["id"]))
        return self.get(r["id"])

    def next_due(self) -> float | None:
        with self._lock:
            r = self.conn.execute("SELECT MIN(next_attempt) FROM items WHERE state = 'pending'").fetchone()
        return r[0]

    def finish(self, item_id: int, state: str, *, error: str | None = None, record: str | None = None,
               seconds: float | None = None) -> None:
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        now = time.time()
        with self._tx() as c:
            c.execute("UPDATE items SET state = ?, error = ?, record = ?, seconds = ?, finished = ?, updated = ? "
                      "WHERE id = ?", (state, error, record, seconds, now, now, item_id))

    def retry_later(self, item_id: int, error: str, next_attempt: float) -> None:
        """``running -> pending`` due at ``next_attempt`` (the attempt counts); no-op on other states."""
        with self._tx() as c:
            c.execute("UPDATE items SET state = 'pending', error = ?, next_attempt = ?, updated = ? "
                      "WHERE id = ? AND state = 'running'", (error, next_attempt, time.time(), item_id))

    def requeue(self, item_id: int, next_attempt: float = 0.0) -> None:
        """``running -> pending`` without counting the attempt (a clean stop interrupted it, or a
        worker process died: deaths are counted apart, :meth:`died`)."""
        with self._tx() as c:
            c.execute("UPDATE items SET state = 'pending', attempts = MAX(attempts - 1, 0), next_attempt = ?, "
                      "updated = ? WHERE id = ? AND state = 'running'", (next_attempt, time.time(), item_id))

    def died(self, item_id: int, detail: str) -> int:
        """Count a death of the worker process that held this image alone; returns the deaths so far."""
        with self._tx() as c:
            c.execute("UPDATE items SET deaths = deaths + 1, last_death = ?, error = ?, updated = ? WHERE id = ?",
                      (detail, detail, time.time(), item_id))
            return c.execute("SELECT deaths FROM items WHERE id = ?", (item_id,)).fetchone()[0]

    def set_disposition(self, item_id: int, disposition: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE items SET disposition = ?, updated = ? WHERE id = ?",
                      (disposition, time.time(), item_id))

    def set_source(self, item_id: int, source: str, name: str, kind: str = "renamed") -> None:
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT sha256 FROM items WHERE id = ?", (item_id,)).fetchone()
            c.execute("UPDATE items SET source = ?, name = ?, updated = ? WHERE id = ?", (source, name, now, item_id))
            c.execute("INSERT INTO arrivals (item_id, kind, path, sha256, at) VALUES (?, ?, ?, ?, ?)",
                      (item_id, kind, source, row["sha256"], now))

    def reset_for_retry(self, item_id: int, source: str, name: str) -> None:
        """A failed input dropped again: back to ``pending`` with fresh attempts, at its new place."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT sha256 FROM items WHERE id = ?", (item_id,)).fetchone()
            c.execute("UPDATE items SET state = 'pending', attempts = 0, next_attempt = 0, disposition = NULL, "
                      "record = NULL, deaths = 0, interruptions = 0, last_death = NULL, source = ?, name = ?, "
                      "updated = ? WHERE id = ? AND state = 'failed'",
                      (source, name, now, item_id))
            c.execute("INSERT INTO arrivals (item_id, kind, path, sha256, at) VALUES (?, 'retry', ?, ?, ?)",
                      (item_id, source, row["sha256"], now))

    def add_duplicate(self, item_id: int, path: str, sha256: str, disposition: str | None) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO arrivals (item_id, kind, path, sha256, at, disposition) "
                      "VALUES (?, 'duplicate', ?, ?, ?, ?)", (item_id, path, sha256, time.time(), disposition))

    def duplicate_seen(self, path: str, sha256: str) -> bool:
        """True when this very file (path + content) was already recorded as a duplicate (and left)."""
        with self._lock:
            return self.conn.execute("SELECT 1 FROM arrivals WHERE kind = 'duplicate' AND path = ? AND sha256 = ?",
                                     (path, sha256)).fetchone() is not None

    def delete(self, item_id: int) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM arrivals WHERE item_id = ?", (item_id,))
            c.execute("DELETE FROM items WHERE id = ?", (item_id,))

    # -- reporting -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return ledger_counts(self.conn, self._lock)

    def queue_depth(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT COUNT(*) FROM items WHERE state = 'pending'").fetchone()[0]

    def rows(self) -> list[Row]:
        return self._all("SELECT * FROM items ORDER BY id")


class _Tx:
    """``with ledger._tx() as conn``: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), under the lock."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def __enter__(self) -> sqlite3.Connection:
        self.ledger._lock.acquire()
        try:
            self.ledger.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.ledger._lock.release()
            raise
        return self.ledger.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.ledger.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.ledger._lock.release()


def _row(r: sqlite3.Row) -> Row:
    return Row(**{k: r[k] for k in r.keys()})


def ledger_counts(conn: sqlite3.Connection, lock: Any = None) -> dict[str, int]:
    """Rows per state (every state present, 0 when none) plus ``duplicates`` (arrivals not processed)."""
    with lock or contextlib.nullcontext():
        out = {s: 0 for s in STATES}
        for state, n in conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state"):
            out[state] = n
        out["duplicates"] = conn.execute("SELECT COUNT(*) FROM arrivals WHERE kind = 'duplicate'").fetchone()[0]
    return out


def read_summary(path: Path, n_errors: int = 5) -> dict[str, Any]:
    """What ``status`` shows from the ledger, read through a separate (query-only) connection."""
    conn = connect(path, timeout=5.0)
    try:
        conn.execute("PRAGMA query_only = 1")
        counts = ledger_counts(conn)
        errors = [dict(r) for r in conn.execute(
            "SELECT name, stem, state, attempts, error, updated FROM items WHERE error IS NOT NULL "
            "ORDER BY updated DESC LIMIT ?", (n_errors,))]
        running = [dict(r) for r in conn.execute(
            "SELECT * FROM items WHERE state = 'running' ORDER BY started")]
        keep = ("name", "stem", "attempts", "started", "interruptions", "deaths")
        running = [{k: r.get(k) for k in keep} for r in running]
        last = conn.execute("SELECT MAX(finished) FROM items").fetchone()[0]
        return {"counts": counts, "queue_depth": counts["pending"], "running": running, "last_errors": errors,
                "last_finished": last}
    finally:
        conn.close()
