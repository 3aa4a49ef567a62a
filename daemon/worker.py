"""The worker: claims ledger rows and runs the (warm) processor on each.

With the local processor one thread claims one row at a time. A processor that can take several
images at once (the Ray engine: ``processor.concurrency`` = its in-flight bound) gets that many
dispatcher threads, each running the same claim -> process -> finish loop, so every guarantee below
holds per row: a claim is one ledger transaction (no row is taken twice), every running row is
recorded before work starts (a crash resumes it), a stop waits for or requeues every running row,
and a rule-file reload still happens only between images: claims pause until no image is in flight,
the rules switch, and dispatch resumes.

Per image, whatever happens, the row ends terminal or is rescheduled, and the worker goes on:

- the processor returns a record: ``edited -> done``, ``skipped``, ``failed`` (bad input or
  parameters: the processor wrote ``outbox/failed/STEM.json``);
- it raises: *permanent* errors (:class:`~pipeline.io.imageio.ImageLoadError`,
  :class:`~pipeline.settings.SettingsError`, anything with ``permanent = True``) fail the image at
  once; anything else is *transient* (bugs, CUDA OOM, a busy disk): retried with capped exponential
  backoff up to ``max_attempts``, then failed. Either way the daemon writes
  ``outbox/failed/STEM.json`` itself, record last, atomically. GPU memory is released after every
  failure;
- a model that cannot be loaded (:class:`~pipeline.models.registry.ModelLoadError`) is *fatal*: the image
  is requeued and the daemon stops (exit 3), since every later image would fail the same way;
- the worker *process* died holding the image alone (a Ray actor, or the isolated child of
  :mod:`daemon.isolate`; an exception with ``worker_died``): a *death* is counted (ledger
  ``deaths``), not an attempt, and the image is retried after the backoff; after ``max_deaths``
  it fails with "worker process died N times on this image (last: killed by SIGSEGV)" and the
  exit signal in the record (:mod:`pipeline.run.deaths`, one policy for both engines). A death seen
  while the daemon is stopping is not counted (systemd signals every process of the service).

An image whose earlier attempt was interrupted by the daemon stopping or dying (ledger
``interruptions``) runs in an isolated child process (local engine), so that only a death of
*that* process can count against it; a stop or kill of the daemon never does.

Only then is the input disposed of (archived / deleted / left), and that is recorded last, so a
crash at any point is resumed correctly (see :mod:`daemon.ledger`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from daemon.intake import hash_file
from daemon.ledger import Row
from daemon.logs import log_event
from pipeline.errors import internal_error_message, is_bad_input
from pipeline.io.outputs import write_failure

if TYPE_CHECKING:
    from daemon.service import Daemon

OUTCOME_STATE = {"edited": "done", "skipped": "skipped", "failed": "failed"}
STATE_OUTCOME = {v: k for k, v in OUTCOME_STATE.items()}


# ------------------------------------------------------------------------------------------------
# Error classes


def is_permanent(exc: BaseException) -> bool:
    """Bad input (:class:`pipeline.errors.BadInput`, or anything marked ``permanent``): fail now."""
    return is_bad_input(exc)


def is_fatal(exc: BaseException) -> bool:
    if getattr(exc, "fatal", False) is True:  # e.g. daemon.isolate.ChildError for a ModelLoadError
        return True
    models = sys.modules.get("pipeline.models.registry")
    err = getattr(models, "ModelLoadError", None)
    return bool(err and isinstance(exc, err))


def free_gpu() -> None:
    """Release cached GPU memory after a failure (only if torch is already loaded: never import it)."""
    from pipeline.models.registry import free_memory

    try:
        free_memory()
    except Exception:  # noqa: BLE001 - best effort: a failed CUDA context may refuse even this
        pass


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------
# Disposition


def archive_target(archive: Path, name: str, sha256: str, same_content: Any = None) -> Path:
    """Where ``name`` (inbox-relative) goes in ``archive``: the same relative path, or with
    ``-<sha8>`` (then ``-N``) before the suffix when a *different* file already holds that name."""
    rel = Path(name)
    base = archive / rel

    def cands() -> Iterator[Path]:
        yield base
        yield base.with_name(f"{rel.stem}-{sha256[:8]}{rel.suffix}")
        for i in range(2, 1000):
            yield base.with_name(f"{rel.stem}-{sha256[:8]}-{i}{rel.suffix}")

    for c in cands():
        if not os.path.lexists(c):
            return c
        # A copy of this very content (an earlier crash mid-move) may be replaced.
        try:
            if c.is_file() and not c.is_symlink() and hash_file(c) == sha256:
                return c
        except OSError:
            continue
    raise OSError(f"no free name for {name} in {archive}")


def move_file(src: Path, dst: Path) -> None:
    """Atomic move into place; across filesystems: copy to a hidden temp beside ``dst``, fsync, rename,
    then remove the source (a crash in between leaves a full copy, never a partial one)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.unlink(src)


def dispose_input(src: Path, name: str, sha256: str, outcome: str, mode: str, archive: Path) -> str:
    """Apply the disposition to an input that has its outcome. Returns what was done:
    ``archived:PATH``, ``deleted``, ``left`` or ``gone`` (nothing there any more).

    ``delete`` never deletes a failed input: it is archived, so it can be fixed and dropped again."""
    if not os.path.lexists(src):
        return "gone"
    if mode == "leave":
        return "left"
    if mode == "delete" and outcome != "failed":
        os.unlink(src)
        return "deleted"
    target = archive_target(archive, name, sha256)
    move_file(src, target)
    return f"archived:{target}"


def annotate_failure(record: Path, sha256: str, source: str, disposition: str | None) -> None:
    """Complete a failed record once its input has been disposed of: ``input.sha256`` and where the
    input is now (``input.now_at``: the archive path, or the inbox path when left; None when it
    is gone), plus ``input.disposition``. Atomic rewrite; a missing or unreadable record is left."""
    import json

    from pipeline.io.imageio import atomic_write_text

    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(rec, dict):
        return
    inp = rec.get("input") if isinstance(rec.get("input"), dict) else {}
    what = disposition or ""
    now_at = what.partition(":")[2] if what.startswith("archived:") else (source if what == "left" else None)
    rec["input"] = {**inp, "sha256": sha256, "disposition": what.partition(":")[0] or None, "now_at": now_at}
    atomic_write_text(record, json.dumps(rec, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------
# The worker thread


class Worker:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.log = daemon.log
        self.wake = threading.Event()
        self.stop_requested = threading.Event()
        # The first dispatcher thread exists from the start (callers may join or poll it); more are
        # added at start() when the processor takes several images at once.
        self.threads: list[threading.Thread] = [self._new_thread(0)]
        self._cond = threading.Condition()
        self._running: dict[int, Row] = {}   # row id -> row, in the order they started
        self._info: dict[int, dict[str, Any]] = {}
        self._abandoned_ids: set[int] = set()  # rows a stop gave up waiting for (requeued)
        self._children: dict[int, Any] = {}    # row id -> its isolated child (daemon.isolate.ChildRun)
        self._warned_no_isolation = False
        self.rules_dirty = False

    def _new_thread(self, i: int) -> threading.Thread:
        name = "product-studio-worker" + (f"-{i}" if i else "")
        return threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        n = max(1, int(getattr(self.d.processor, "concurrency", 1) or 1))
        self.threads += [self._new_thread(i) for i in range(len(self.threads), n)]
        for t in self.threads:
            t.start()

    @property
    def thread(self) -> threading.Thread:
        """The first dispatcher thread (the only one with the local processor)."""
        return self.threads[0]

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.0, end - time.monotonic()))

    @property
    def current(self) -> Row | None:
        """The longest-running image in flight, or None when idle."""
        with self._cond:
            return next(iter(self._running.values()), None)

    def running_rows(self) -> list[Row]:
        with self._cond:
            return list(self._running.values())

    def is_running(self, row_id: int) -> bool:
        with self._cond:
            return row_id in self._running

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._running)

    def abandon_running(self) -> list[Row]:
        """For a stop that gave up waiting: mark every running row abandoned (its thread will record
        nothing more) and return them, for the caller to requeue."""
        with self._cond:
            rows = list(self._running.values())
            self._abandoned_ids.update(r.id for r in rows)
            children = [self._children[r.id] for r in rows if r.id in self._children]
        for child in children:
            child.kill()  # it must not write an outcome for a row that is being requeued
        return rows

    def _run(self) -> None:
        while not self.stop_requested.is_set():
            row = None
            try:
                self.wake.clear()
                row = self._claim()
                if row is None:
                    if self.stop_requested.is_set():
                        break
                    due = self.d.ledger.next_due()
                    wait = 1.0 if due is None else min(1.0, max(0.01, due - time.time()))
                    self.wake.wait(wait)
                    continue
                self._handle(row)
            except Exception as e:
                # Bookkeeping errors (ledger, disk full, ...) must not end the worker. The image is
                # tried again later; if even that cannot be recorded, the next start resumes it.
                log_event(self.log, logging.ERROR, "worker_error", "worker error", exc_info=True)
                if row is not None and not self._abandoned(row):
                    try:
                        self.d.ledger.retry_later(row.id, describe(e), time.time() + 5.0)
                    except Exception:
                        pass
                self.stop_requested.wait(1.0)
            finally:
                if row is not None:
                    self._release(row)

    def _claim(self) -> Row | None:
        """Reload the rules if asked (only when no image is in flight), then claim the oldest due row
        and record it as running, all under one lock, so no image starts under rules it was not
        claimed with."""
        with self._cond:
            if self.rules_dirty:
                while self._running and not self.stop_requested.is_set():
                    self._cond.wait(0.5)
                if self.stop_requested.is_set():
                    return None
                self.rules_dirty = False
                self.d.reload_rules()
            if self.stop_requested.is_set():
                return None
            row = self.d.ledger.claim(self.d.rules_hash)
            if row is not None:
                self._running[row.id] = row
            return row

    def _release(self, row: Row) -> None:
        with self._cond:
            self._running.pop(row.id, None)
            self._info.pop(row.id, None)
            self._abandoned_ids.discard(row.id)
            current = next(iter(self._info.values()), None)
            n = len(self._running)
            self._cond.notify_all()
        self.d.status.update(current=current, in_flight=n)
        self.d.metrics.in_progress(n)

    # -- rules -----------------------------------------------------------------------------------
    def request_rules_reload(self) -> None:
        self.rules_dirty = True
        self.wake.set()

    # -- one image -------------------------------------------------------------------------------
    def _handle(self, row: Row) -> None:
        d = self.d
        info = {"name": row.name, "stem": row.stem, "source": row.source, "attempt": row.attempts,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._cond:
            self._info[row.id] = info
            current = next(iter(self._info.values()))
            n = len(self._running)
        d.metrics.in_progress(n)
        d.status.update(current=current, in_flight=n)
        d.metrics.observe("queue", max(0.0, time.time() - row.arrived))
        src = Path(row.source)
        if not os.path.lexists(src):
            # Removed or moved before its turn. If it was moved within the inbox, intake finds it
            # there and queues it again; if it was removed, there is no input left to account for.
            d.ledger.delete(row.id)
            log_event(self.log, logging.WARNING, "withdrawn", "%s left the inbox before it was processed",
                      row.name, stem=row.stem)
            return
        t = time.perf_counter()
        try:
            sha = hash_file(src)
        except OSError as e:
            self._transient(row, e)
            return
        d.metrics.observe("hash", time.perf_counter() - t)
        if sha != row.sha256:
            # Overwritten after intake: the content this row stands for is gone; the new content is
            # nominated again and gets its own row.
            d.ledger.delete(row.id)
            log_event(self.log, logging.WARNING, "changed", "%s changed after intake; taken again as new content",
                      row.name, stem=row.stem)
            d.intake.notify(src)
            return

        t = time.perf_counter()
        try:
            record = self._process(row, src, info)
            status = record.get("status") if isinstance(record, dict) else None
            if status not in OUTCOME_STATE:
                raise RuntimeError(f"processor returned a record with status {status!r} "
                                   "(expected edited, skipped or failed)")
        except Exception as e:
            seconds = time.perf_counter() - t
            free_gpu()
            if self._abandoned(row) or type(e).__name__ == "ChildAbandoned":
                return
            d.metrics.observe("process", seconds)
            if is_fatal(e):
                d.ledger.requeue(row.id)
                d.fatal(e)
                return
            if getattr(e, "worker_died", False):
                self._worker_died(row, e, seconds)
                return
            if getattr(e, "requeue_later", False):
                # The isolated child found the rule file changed: wait for the reload, not counted.
                d.ledger.requeue(row.id, time.time() + max(2 * d.ds.rules_poll_seconds, 1.0))
                log_event(self.log, logging.WARNING, "requeued", "%s: %s; waiting for the rules to be reloaded",
                          row.name, e, stem=row.stem)
                return
            if getattr(e, "requeue", False):
                # Never started (the daemon is stopping and the image was still waiting for a Ray
                # actor): back to the queue for the next start, attempt not counted.
                d.ledger.requeue(row.id)
                log_event(self.log, logging.INFO, "requeued", "%s: not started before the stop; requeued for the "
                          "next start", row.name, stem=row.stem)
                return
            if is_permanent(e):
                self._fail(row, describe(e), seconds=seconds)
            else:
                self._transient(row, e, seconds=seconds)
            return
        seconds = time.perf_counter() - t
        if self._abandoned(row):
            return
        d.metrics.observe("process", seconds)
        for stage, s in (record.get("timings") or {}).items():
            if isinstance(s, (int, float)) and stage not in ("total", "queue", "hash", "process", "dispose"):
                d.metrics.observe(stage, s)
        state = OUTCOME_STATE[status]
        error = record.get("error") if state == "failed" else None
        d.ledger.finish(row.id, state, error=error, record=self._record_path(row.stem, status), seconds=seconds)
        if state == "failed":
            free_gpu()
            d.status.error(row.name, row.stem, str(error), final=True)
        self._finish(row, status, seconds)

    def _abandoned(self, row: Row) -> bool:
        with self._cond:
            return row.id in self._abandoned_ids

    def _process(self, row: Row, src: Path, info: dict[str, Any]) -> dict:
        """``processor.process`` in this process, or, for an image whose earlier attempt was
        interrupted, in an isolated child (:mod:`daemon.isolate`)."""
        d = self.d
        if row.interruptions <= 0 or getattr(d.processor, "isolates", False):
            return d.processor.process(src, d.paths.outbox, sha256=row.sha256, stem=row.stem)
        if d.child_factory is None:
            if not self._warned_no_isolation:
                self._warned_no_isolation = True
                log_event(self.log, logging.WARNING, "no_isolation", "no child processor factory: images whose "
                          "earlier attempt was interrupted run in the daemon's own process")
            return d.processor.process(src, d.paths.outbox, sha256=row.sha256, stem=row.stem)
        from daemon.isolate import ChildAbandoned, ChildJob, ChildRun

        rules = d.paths.rules if d.paths.rules is not None and d.paths.rules.exists() else None
        run = ChildRun(ChildJob(factory=d.child_factory, rules_path=rules, rules_hash=d.rules_hash, path=src,
                                outbox=d.paths.outbox, sha256=row.sha256, stem=row.stem, parent_pid=os.getpid(),
                                log_format=d.ds.log_format, log_level=d.ds.log_level))
        with self._cond:
            if row.id in self._abandoned_ids:
                raise ChildAbandoned()
            run.start()
            self._children[row.id] = run
        info.update(isolated=True, child_pid=run.pid)
        d.status.update(current=self.current_info())
        log_event(self.log, logging.INFO, "isolated", "%s: interrupted %d time(s) before; processing it in "
                  "child process %d", row.name, row.interruptions, run.pid, stem=row.stem, pid=run.pid)
        try:
            return run.wait(lambda: self._abandoned(row))
        finally:
            with self._cond:
                self._children.pop(row.id, None)

    def current_info(self) -> dict[str, Any] | None:
        with self._cond:
            return next(iter(self._info.values()), None)

    def _worker_died(self, row: Row, exc: BaseException, seconds: float) -> None:
        """The process holding the image alone died: count a death (not an attempt); fail the image
        after ``max_deaths`` with the reason and exit signal; else retry it after the backoff."""
        from daemon.isolate import ChildDied
        from pipeline.run.deaths import death_message, exhausted

        d = self.d
        if self.stop_requested.is_set():
            # systemd (KillMode=control-group) and shutdowns signal every process of the service;
            # a death now is the stop's doing, not the image's.
            d.ledger.requeue(row.id)
            log_event(self.log, logging.INFO, "requeued", "%s: worker process ended during the stop (%s); requeued, "
                      "not counted", row.name, exc, stem=row.stem)
            return
        detail = getattr(exc, "detail", None) or str(exc)
        deaths = d.ledger.died(row.id, detail)
        max_deaths = int(getattr(d.processor, "max_deaths", None) or d.ds.max_deaths)
        child = isinstance(exc, ChildDied)
        if exhausted(deaths, max_deaths):
            extra = {"deaths": deaths, "last_death": detail}
            if child:
                extra.update(exit_signal=exc.signal, exit_code=exc.returncode)
            self._fail(row, death_message(deaths, detail if child else None), seconds=seconds,
                       final_attempts=row.attempts, extra=extra)
            return
        delay = min(d.ds.retry_backoff_seconds * 2 ** (deaths - 1), d.ds.retry_backoff_max_seconds)
        d.ledger.requeue(row.id, time.time() + delay)
        d.metrics.outcome("retried")
        d.status.error(row.name, row.stem, str(exc), final=False)
        log_event(self.log, logging.WARNING, "worker_died", "%s: worker process died (%s), death %d/%d; retrying in "
                  "%.1fs", row.name, detail, deaths, max_deaths, delay, stem=row.stem,
                  exit_signal=getattr(exc, "signal", None))

    def _record_path(self, stem: str, status: str) -> str | None:
        folder = {"edited": "", "skipped": "skipped", "failed": "failed"}[status]
        p = self.d.paths.outbox / folder / f"{stem}.json"
        return str(p) if p.exists() else None

    def _transient(self, row: Row, exc: BaseException, seconds: float | None = None) -> None:
        d = self.d
        err = describe(exc)
        if row.attempts >= d.ds.max_attempts:
            log_event(self.log, logging.ERROR, "attempts_exhausted", "%s failed %d times, giving up: %s", row.name,
                      row.attempts, err, stem=row.stem, exc_info=exc)
            self._fail(row, internal_error_message(exc, row.attempts), seconds=seconds,
                       final_attempts=row.attempts, logged=True,
                       extra={"stage": "internal", "error_type": type(exc).__name__})
            return
        delay = min(d.ds.retry_backoff_seconds * 2 ** (row.attempts - 1), d.ds.retry_backoff_max_seconds)
        d.ledger.retry_later(row.id, err, time.time() + delay)
        d.metrics.outcome("retried")
        d.status.error(row.name, row.stem, err, final=False)
        log_event(self.log, logging.WARNING, "retry", "%s: attempt %d/%d failed (%s); retrying in %.1fs", row.name,
                  row.attempts, d.ds.max_attempts, err, delay, stem=row.stem, exc_info=exc)

    def _fail(self, row: Row, error: str, *, seconds: float | None = None, final_attempts: int | None = None,
              logged: bool = False, extra: dict[str, Any] | None = None) -> None:
        """The daemon's own failure record (record last, atomic), then the ledger, then disposition."""
        d = self.d
        extra = {"sha256": row.sha256, "name": row.name, "attempts": final_attempts or row.attempts,
                 "rules": {"sha256": d.rules_hash}, "stage": "daemon", **(extra or {})}
        write_failure(d.paths.outbox, row.stem, row.source, error, extra)
        d.ledger.finish(row.id, "failed", error=error, record=str(d.paths.outbox / "failed" / f"{row.stem}.json"),
                        seconds=seconds)
        d.status.error(row.name, row.stem, error, final=True)
        if not logged:
            log_event(self.log, logging.ERROR, "failed", "%s failed: %s", row.name, error, stem=row.stem)
        self._finish(row, "failed", seconds or 0.0, quiet=True)

    def _finish(self, row: Row, outcome: str, seconds: float, quiet: bool = False) -> None:
        d = self.d
        t = time.perf_counter()
        # Re-read: intake may have recorded a rename of the input while it was being processed.
        row = d.ledger.get(row.id) or row
        try:
            what = dispose_input(Path(row.source), row.name, row.sha256, outcome, d.ds.disposition, d.paths.archive)
        except OSError as e:
            what = None
            log_event(self.log, logging.ERROR, "dispose_error", "cannot move %s out of the inbox: %s (retried at "
                      "the next start)", row.name, e, stem=row.stem)
        if outcome == "failed":
            try:
                annotate_failure(d.paths.outbox / "failed" / f"{row.stem}.json", row.sha256, row.source, what)
            except OSError as e:
                log_event(self.log, logging.WARNING, "record_error", "cannot complete the failure record of %s: %s",
                          row.name, e, stem=row.stem)
        if what is not None:
            d.ledger.set_disposition(row.id, what)
        d.metrics.observe("dispose", time.perf_counter() - t)
        d.count_outcome(outcome)
        if not quiet:
            level = logging.WARNING if outcome == "failed" else logging.INFO
            log_event(self.log, level, "processed", "%s: %s in %.2fs", row.name, outcome, seconds, stem=row.stem,
                      outcome=outcome, attempts=row.attempts, disposition=what)
