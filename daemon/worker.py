"""The worker: claims ledger rows and runs the (warm) processor on each.

It is given a :class:`WorkerContext` and nothing else: the ledger (the queue), the processor, the
:class:`~daemon.outbox.OutboxWriter` (its own failure records and the inputs' disposition), the
:class:`WorkerEvents` (status board and metrics, plus three requests to its owner: stop for a fatal
error, reload the rules, nominate a changed input again), the :class:`RetryPolicy`, the log and,
optionally, the :class:`~daemon.isolate.Isolation` for images whose earlier attempt was interrupted.

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
- a model that cannot be loaded (:class:`~pipeline.errors.ModelLoadError`) is *fatal*: the image
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

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from daemon.classify import describe, is_fatal, is_permanent
from daemon.config import DaemonSettings
from daemon.isolate import ChildAbandoned, ChildDied, ChildRun, Isolation
from daemon.ledger import Ledger, Row
from daemon.logs import log_event
from daemon.outbox import OUTCOME_STATE, OutboxWriter
from daemon.rules_watch import rules_hash_of
from daemon.status import StatusBoard
from pipeline.run.deaths import death_message, exhausted
from pipeline.errors import internal_error_message
from pipeline.io.hashing import file_sha256
from pipeline.models.registry import free_memory

__all__ = ["Processor", "RetryPolicy", "Worker", "WorkerContext", "WorkerEvents"]


class Processor(Protocol):
    """What the daemon runs on each image (:class:`pipeline.run.process.Processor`, the Ray engine's
    ``RayProcessor``, the tests' pass-through). Optional: ``concurrency`` (images at once),
    ``isolates`` (it isolates images itself), ``max_deaths``, ``warm_up``, ``describe``, ``drain``,
    ``close``."""

    rules_hash: str

    def process(self, path: Path, outbox: Path, *, sha256: str, stem: str) -> dict: ...

    def reload_rules(self, path: Path) -> str: ...


def free_gpu() -> None:
    """Release cached GPU memory after a failure (only if torch is already loaded: never import it)."""
    try:
        free_memory()
    except Exception:  # noqa: BLE001 - best effort: a failed CUDA context may refuse even this
        pass


@dataclass(frozen=True)
class RetryPolicy:
    """How often an image is tried, and how long it waits in between."""

    max_attempts: int = 3            # tries for transient errors
    max_deaths: int = 3              # deaths of an isolated worker process (a processor may set its own)
    backoff: float = 2.0             # first delay, seconds; doubles per attempt (or death)
    backoff_max: float = 300.0       # cap on the delay
    rules_wait: float = 4.0          # an isolated child found the rule file changed: wait this long

    @classmethod
    def from_settings(cls, ds: DaemonSettings) -> "RetryPolicy":
        return cls(max_attempts=ds.max_attempts, max_deaths=ds.max_deaths, backoff=ds.retry_backoff_seconds,
                   backoff_max=ds.retry_backoff_max_seconds, rules_wait=max(2 * ds.rules_poll_seconds, 1.0))

    def delay(self, n: int) -> float:
        """Seconds before the next try after the ``n``-th failed attempt (or death), n >= 1."""
        return min(self.backoff * 2 ** (n - 1), self.backoff_max)


@dataclass
class WorkerEvents:
    """What the worker reports (status board, metrics) and the three things it asks of its owner."""

    status: StatusBoard
    metrics: Any                                   # daemon.metrics.NullMetrics or PrometheusMetrics
    fatal: Callable[[BaseException], None]         # no image can succeed: stop the daemon
    reload_rules: Callable[[], None]               # switch to the rule file's content (between images)
    input_changed: Callable[[str], None]           # an input changed after intake: nominate it again

    def in_flight(self, current: dict[str, Any] | None, n: int) -> None:
        """``current``: the longest-running image in flight (None when idle); ``n`` images in flight."""
        self.status.update(current=current, in_flight=n)
        self.metrics.in_progress(n)

    def current(self, current: dict[str, Any] | None) -> None:
        self.status.update(current=current)

    def observe(self, stage: str, seconds: float) -> None:
        self.metrics.observe(stage, seconds)

    def retrying(self, row: Row, error: str) -> None:
        self.metrics.outcome("retried")
        self.status.error(row.name, row.stem, error, final=False)

    def failed(self, row: Row, error: str) -> None:
        self.status.error(row.name, row.stem, error, final=True)

    def outcome(self, outcome: str) -> None:
        """An image has its outcome (edited | skipped | failed) and its input was disposed of."""
        self.metrics.outcome(outcome)
        self.status.update(processed=self.status.processed + 1)


@dataclass(frozen=True)
class WorkerContext:
    """Everything the worker works with; nothing else of the daemon is reachable from it."""

    ledger: Ledger
    processor: Any                 # a Processor (see above)
    writer: OutboxWriter
    events: WorkerEvents
    retry: RetryPolicy
    log: logging.Logger
    isolation: Isolation | None = None  # None: interrupted images run in this process (warned once)


# ------------------------------------------------------------------------------------------------
# The worker thread


class Worker:
    """Dispatcher threads (one, or the processor's ``concurrency``), each claiming a row, processing
    it and recording its outcome. ``start()``; ``request_stop()`` then ``join()``; a stop that gives up
    waiting calls ``abandon_running()`` and requeues what it returns."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.log = ctx.log
        self.wake = threading.Event()
        self.stop_requested = threading.Event()
        n = max(1, int(getattr(ctx.processor, "concurrency", 1) or 1))
        self.threads: list[threading.Thread] = [self._new_thread(i) for i in range(n)]
        self._cond = threading.Condition()
        self._running: dict[int, Row] = {}   # row id -> row, in the order they started
        self._info: dict[int, dict[str, Any]] = {}
        self._abandoned_ids: set[int] = set()  # rows a stop gave up waiting for (requeued)
        self._children: dict[int, ChildRun] = {}  # row id -> its isolated child
        self._warned_no_isolation = False
        self.rules_dirty = False

    def _new_thread(self, i: int) -> threading.Thread:
        name = "product-studio-worker" + (f"-{i}" if i else "")
        return threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def request_stop(self) -> None:
        """Claim nothing more; the images in flight finish (see ``join``)."""
        self.stop_requested.set()
        self.wake.set()

    @property
    def rules_hash(self) -> str:
        return rules_hash_of(self.ctx.processor)

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
                    due = self.ctx.ledger.next_due()
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
                        self.ctx.ledger.retry_later(row.id, describe(e), time.time() + 5.0)
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
                self.ctx.events.reload_rules()
            if self.stop_requested.is_set():
                return None
            row = self.ctx.ledger.claim(self.rules_hash)
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
        self.ctx.events.in_flight(current, n)

    # -- rules -----------------------------------------------------------------------------------
    def request_rules_reload(self) -> None:
        self.rules_dirty = True
        self.wake.set()

    # -- one image -------------------------------------------------------------------------------
    def _handle(self, row: Row) -> None:
        ctx, ev = self.ctx, self.ctx.events
        info = {"name": row.name, "stem": row.stem, "source": row.source, "attempt": row.attempts,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._cond:
            self._info[row.id] = info
            current = next(iter(self._info.values()))
            n = len(self._running)
        ev.in_flight(current, n)
        ev.observe("queue", max(0.0, time.time() - row.arrived))
        src = Path(row.source)
        if not os.path.lexists(src):
            # Removed or moved before its turn. If it was moved within the inbox, intake finds it
            # there and queues it again; if it was removed, there is no input left to account for.
            ctx.ledger.delete(row.id)
            log_event(self.log, logging.WARNING, "withdrawn", "%s left the inbox before it was processed",
                      row.name, stem=row.stem)
            return
        t = time.perf_counter()
        try:
            sha = file_sha256(src)
        except OSError as e:
            self._transient(row, e)
            return
        ev.observe("hash", time.perf_counter() - t)
        if sha != row.sha256:
            # Overwritten after intake: the content this row stands for is gone; the new content is
            # nominated again and gets its own row.
            ctx.ledger.delete(row.id)
            log_event(self.log, logging.WARNING, "changed", "%s changed after intake; taken again as new content",
                      row.name, stem=row.stem)
            ev.input_changed(str(src))
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
            if self._abandoned(row) or isinstance(e, ChildAbandoned):
                return
            ev.observe("process", seconds)
            if is_fatal(e):
                ctx.ledger.requeue(row.id)
                ev.fatal(e)
                return
            if getattr(e, "worker_died", False):
                self._worker_died(row, e, seconds)
                return
            if getattr(e, "requeue_later", False):
                # The isolated child found the rule file changed: wait for the reload, not counted.
                ctx.ledger.requeue(row.id, time.time() + ctx.retry.rules_wait)
                log_event(self.log, logging.WARNING, "requeued", "%s: %s; waiting for the rules to be reloaded",
                          row.name, e, stem=row.stem)
                return
            if getattr(e, "requeue", False):
                # Never started (the daemon is stopping and the image was still waiting for a Ray
                # actor): back to the queue for the next start, attempt not counted.
                ctx.ledger.requeue(row.id)
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
        ev.observe("process", seconds)
        for stage, s in (record.get("timings") or {}).items():
            if isinstance(s, (int, float)) and stage not in ("total", "queue", "hash", "process", "dispose"):
                ev.observe(stage, s)
        state = OUTCOME_STATE[status]
        error = record.get("error") if state == "failed" else None
        ctx.ledger.finish(row.id, state, error=error, record=ctx.writer.existing_record(row.stem, status),
                          seconds=seconds)
        if state == "failed":
            free_gpu()
            ev.failed(row, str(error))
        self._finish(row, status, seconds)

    def _abandoned(self, row: Row) -> bool:
        with self._cond:
            return row.id in self._abandoned_ids

    def _process(self, row: Row, src: Path, info: dict[str, Any]) -> dict:
        """``processor.process`` in this process, or, for an image whose earlier attempt was
        interrupted, in an isolated child (:mod:`daemon.isolate`)."""
        ctx = self.ctx
        processor, outbox = ctx.processor, ctx.writer.outbox
        if row.interruptions <= 0 or getattr(processor, "isolates", False):
            return processor.process(src, outbox, sha256=row.sha256, stem=row.stem)
        if ctx.isolation is None:
            if not self._warned_no_isolation:
                self._warned_no_isolation = True
                log_event(self.log, logging.WARNING, "no_isolation", "no child processor factory: images whose "
                          "earlier attempt was interrupted run in the daemon's own process")
            return processor.process(src, outbox, sha256=row.sha256, stem=row.stem)
        run = ChildRun(ctx.isolation.job(rules_hash=self.rules_hash, path=src, outbox=outbox, sha256=row.sha256,
                                         stem=row.stem))
        with self._cond:
            if row.id in self._abandoned_ids:
                raise ChildAbandoned()
            run.start()
            self._children[row.id] = run
        info.update(isolated=True, child_pid=run.pid)
        ctx.events.current(self.current_info())
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
        ctx = self.ctx
        if self.stop_requested.is_set():
            # systemd (KillMode=control-group) and shutdowns signal every process of the service;
            # a death now is the stop's doing, not the image's.
            ctx.ledger.requeue(row.id)
            log_event(self.log, logging.INFO, "requeued", "%s: worker process ended during the stop (%s); requeued, "
                      "not counted", row.name, exc, stem=row.stem)
            return
        detail = getattr(exc, "detail", None) or str(exc)
        deaths = ctx.ledger.died(row.id, detail)
        max_deaths = int(getattr(ctx.processor, "max_deaths", None) or ctx.retry.max_deaths)
        child = isinstance(exc, ChildDied)
        if exhausted(deaths, max_deaths):
            extra = {"deaths": deaths, "last_death": detail}
            if child:
                extra.update(exit_signal=exc.signal, exit_code=exc.returncode)
            self._fail(row, death_message(deaths, detail if child else None), seconds=seconds,
                       final_attempts=row.attempts, extra=extra)
            return
        delay = ctx.retry.delay(deaths)
        ctx.ledger.requeue(row.id, time.time() + delay)
        ctx.events.retrying(row, str(exc))
        log_event(self.log, logging.WARNING, "worker_died", "%s: worker process died (%s), death %d/%d; retrying in "
                  "%.1fs", row.name, detail, deaths, max_deaths, delay, stem=row.stem,
                  exit_signal=getattr(exc, "signal", None))

    def _transient(self, row: Row, exc: BaseException, seconds: float | None = None) -> None:
        ctx = self.ctx
        err = describe(exc)
        if row.attempts >= ctx.retry.max_attempts:
            log_event(self.log, logging.ERROR, "attempts_exhausted", "%s failed %d times, giving up: %s", row.name,
                      row.attempts, err, stem=row.stem, exc_info=exc)
            self._fail(row, internal_error_message(exc, row.attempts), seconds=seconds,
                       final_attempts=row.attempts, logged=True,
                       extra={"stage": "internal", "error_type": type(exc).__name__})
            return
        delay = ctx.retry.delay(row.attempts)
        ctx.ledger.retry_later(row.id, err, time.time() + delay)
        ctx.events.retrying(row, err)
        log_event(self.log, logging.WARNING, "retry", "%s: attempt %d/%d failed (%s); retrying in %.1fs", row.name,
                  row.attempts, ctx.retry.max_attempts, err, delay, stem=row.stem, exc_info=exc)

    def _fail(self, row: Row, error: str, *, seconds: float | None = None, final_attempts: int | None = None,
              logged: bool = False, extra: dict[str, Any] | None = None) -> None:
        """The daemon's own failure record (record last, atomic), then the ledger, then disposition."""
        ctx = self.ctx
        extra = {"sha256": row.sha256, "name": row.name, "attempts": final_attempts or row.attempts,
                 "rules": {"sha256": self.rules_hash}, "stage": "daemon", **(extra or {})}
        record = ctx.writer.write_failure(row.stem, row.source, error, extra)
        ctx.ledger.finish(row.id, "failed", error=error, record=str(record), seconds=seconds)
        ctx.events.failed(row, error)
        if not logged:
            log_event(self.log, logging.ERROR, "failed", "%s failed: %s", row.name, error, stem=row.stem)
        self._finish(row, "failed", seconds or 0.0, quiet=True)

    def _finish(self, row: Row, outcome: str, seconds: float, quiet: bool = False) -> None:
        ctx = self.ctx
        t = time.perf_counter()
        # Re-read: intake may have recorded a rename of the input while it was being processed.
        row = ctx.ledger.get(row.id) or row
        try:
            what = ctx.writer.dispose(Path(row.source), row.name, row.sha256, outcome)
        except OSError as e:
            what = None
            log_event(self.log, logging.ERROR, "dispose_error", "cannot move %s out of the inbox: %s (retried at "
                      "the next start)", row.name, e, stem=row.stem)
        if outcome == "failed":
            try:
                ctx.writer.annotate_failure(row.stem, row.sha256, row.source, what)
            except OSError as e:
                log_event(self.log, logging.WARNING, "record_error", "cannot complete the failure record of %s: %s",
                          row.name, e, stem=row.stem)
        if what is not None:
            ctx.ledger.set_disposition(row.id, what)
        ctx.events.observe("dispose", time.perf_counter() - t)
        ctx.events.outcome(outcome)
        if not quiet:
            level = logging.WARNING if outcome == "failed" else logging.INFO
            log_event(self.log, level, "processed", "%s: %s in %.2fs", row.name, outcome, seconds, stem=row.stem,
                      outcome=outcome, attempts=row.attempts, disposition=what)
