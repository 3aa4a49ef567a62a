"""The inbox daemon: intake -> ledger -> worker, with lifecycle, rule reloads and status.

Guarantees (each covered by tests/test_daemon*.py):

- Every image dropped into the inbox ends in exactly one outcome (``outbox/STEM.*`` edited,
  ``outbox/skipped/STEM.json``, ``outbox/failed/STEM.json``), once, across crashes and restarts:
  the ledger records each transition before the next step, outputs are written atomically with the
  record last, and unfinished work is resumed at start (stale temp files of the atomic writer in
  the outbox are removed then).
- The same content (same rules, same pipeline version) is not processed twice: later copies are
  recorded as duplicates (``duplicates: skip``, the default) and disposed of like the original.
  A failed input dropped again is retried.
- Files are taken only once complete (stable for ``settle_seconds``); junk, symlinks and
  non-regular files never are. Missed events (queue overflow, shares without inotify) are caught
  by the full scan at start and the periodic rescan; directories moved in are walked.
- Nothing the daemon writes lands in the inbox: layouts that would (outbox, archive, ledger inside
  the inbox, or the inbox inside them) are refused before start. The inbox is only written to move
  (or delete) inputs that have their outcome.
- One daemon per inbox (lock naming the holder's pid). SIGINT/SIGTERM: stop taking work, finish
  the current image(s) (or requeue them after ``stop_grace_seconds``), exit 0. Signals within
  ``signal_window_seconds`` (2 s) of the first are the same request (``make run`` and ``systemctl
  stop`` deliver one SIGTERM per process of the group, milliseconds apart); a signal after that
  window exits at once (exit 130; the image is resumed at the next start, not counted against it).
  A stop never logs at ERROR.
- An image whose earlier attempt was interrupted (the daemon died or was killed holding it) runs in
  an isolated child process; only that child's deaths count against it (:mod:`daemon.isolate`).
- A rule-file edit is validated by the processor before it is used; a bad edit is logged and
  refused, the last good rules stay in force.
- No exception from one file, one event or one image stops the observer, intake or worker; a dead
  observer is restarted.

The parts, each usable alone: :mod:`daemon.intake` (which files, when complete),
:mod:`daemon.policy` (what a complete file is, from the ledger: new, duplicate, retry, ...),
:mod:`daemon.ledger` (the queue and the memory), :mod:`daemon.worker` (claim, process, retry, record,
dispose; given a :class:`~daemon.worker.WorkerContext`), :mod:`daemon.outbox` (what the daemon
writes), :mod:`daemon.observer`, :mod:`daemon.recovery` and :mod:`daemon.rules_watch`. This module
wires them: lifecycle, signals, the intake thread, status.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from daemon.config import DaemonConfigError, DaemonPaths, DaemonSettings, check_paths
from daemon.intake import Intake, Sig
from daemon.isolate import Isolation
from daemon.ledger import Ledger
from daemon.lock import DaemonLockedError, InboxLock
from daemon.logs import get_logger, log_event
from daemon.metrics import make_metrics
from daemon.observer import ObserverSupervisor
from daemon.outbox import STATE_OUTCOME, OutboxWriter, make_stem_base, stem_candidates
from daemon.policy import Arrival, decide
from daemon.recovery import recover
from daemon.rules_watch import RuleFile, rules_hash_of
from daemon.status import StatusBoard
from daemon.worker import Processor, RetryPolicy, Worker, WorkerContext, WorkerEvents
from pipeline import PIPELINE_VERSION
from pipeline.settings import Settings

__all__ = ["Daemon", "DaemonConfigError", "DaemonLockedError", "Processor"]

EXIT_INTERRUPTED = 130
EXIT_FATAL = 3  # the CLI's EXIT_MODEL: a model that cannot be loaded stops the daemon


class Daemon:
    """Watch ``paths.inbox`` and process each image once. In-process use (tests)::

        d = Daemon(settings, lambda: make_processor(settings, rules), DaemonSettings(settle_seconds=0.3))
        d.start(); ...; d.stop()

    ``run_forever()`` adds signal handling and returns the exit code (the CLI's `watch`)."""

    def __init__(self, settings: Settings, processor_factory: Callable[[], Processor],
                 ds: DaemonSettings | None = None, *, rules_path: Path | None = None,
                 log: logging.Logger | None = None, child_factory: Callable[[Path | None], Processor] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """``child_factory(rules_path)`` builds the processor in an isolated child process
        (:mod:`daemon.isolate`); it must be picklable (a module-level function, or a
        ``functools.partial`` of one). Without it, resumed images run in this process. ``clock``
        (monotonic seconds) times signals, rescans, rule polls and observer restarts."""
        self.settings = settings
        self.ds = ds or DaemonSettings()
        self.paths = DaemonPaths.resolve(settings, self.ds, rules_path)
        self.processor_factory = processor_factory
        self.child_factory = child_factory
        self.clock = clock
        self.log = log or get_logger()
        self.status = StatusBoard(inbox=str(self.paths.inbox), outbox=str(self.paths.outbox),
                                  ledger=str(self.paths.ledger), archive=str(self.paths.archive),
                                  disposition=self.ds.disposition, pipeline_version=PIPELINE_VERSION)
        self.processor: Any = None
        self.ledger = Ledger(self.paths.ledger)
        self.metrics: Any = None
        self.writer = OutboxWriter(self.paths.outbox, self.paths.archive, self.ds.disposition)
        self.rules = RuleFile(self.paths.rules, self.log)
        stall = self.ds.stall_grace_seconds
        self.intake = Intake(self.paths.inbox, self.ds.settle_seconds, self._on_stable, self.log,
                             recursive=self.ds.recursive, non_images=self.ds.non_images,
                             stall_grace=10 * self.ds.settle_seconds if stall is None else stall, clock=clock)
        self.observer = ObserverSupervisor(self.paths.inbox, self.intake, self.log, recursive=self.ds.recursive,
                                           poll_seconds=self.ds.poll_seconds, clock=clock)
        self.worker: Worker | None = None  # built at start(), once the processor exists
        self.exit_code = 0
        self.stopped = threading.Event()
        self._stop_intake = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stopping = threading.Event()  # set first thing in stop(): supervisors stand down
        self._lock: InboxLock | None = None
        self._intake_thread: threading.Thread | None = None
        self._started = False
        self._first_signal_at: float | None = None

    @property
    def observer_mode(self) -> str:
        return self.observer.mode

    # ------------------------------------------------------------------------------------------
    # start / stop

    def start(self) -> None:
        """Check the layout, lock the inbox, open the ledger, build the processor, recover, and start
        the observer, intake and worker threads. Raises DaemonConfigError, DaemonLockedError, or what
        the processor factory raises (SettingsError for bad rules, ModelLoadError)."""
        check_paths(self.paths, self.ds)
        self.paths.outbox.mkdir(parents=True, exist_ok=True)
        self._lock = InboxLock(self.paths.inbox, self.paths.lock_file)
        self._lock.acquire()
        try:
            self.metrics = make_metrics(self.ds.metrics_port, self.ds.metrics_host)
            self.ledger.open()
            if self.ledger.journal_mode.lower() != "wal":
                log_event(self.log, logging.WARNING, "ledger_journal", "ledger %s is not in WAL mode (%s): status "
                          "reads may wait for the daemon", self.paths.ledger, self.ledger.journal_mode)
            self.rules.mark_loaded()
            self.processor = self.processor_factory()
            warm_up = getattr(self.processor, "warm_up", None)
            if callable(warm_up):
                # Load models now, so a missing one fails the start, not image 1 (and image 1 pays no
                # first-call set-up).
                secs = warm_up()
                if isinstance(secs, dict) and secs:
                    log_event(self.log, logging.INFO, "warm_up", "warmed up: %s",
                              ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
            describe = getattr(self.processor, "describe", None)
            if callable(describe):
                log_event(self.log, logging.INFO, "engine", "%s", describe())
            self.status.rules = {"path": str(self.paths.rules) if self.paths.rules else None,
                                 "hash": self.processor.rules_hash, "last_error": None, "reloaded_at": None}
            recover(self.ledger, self.writer, self.log,
                    (self.paths.outbox, self.paths.archive, self.paths.status_file.parent))
            self._refresh_counts()
            self.status.set_static(observer=self.observer.start())
        except BaseException:
            self._shutdown_resources()
            raise
        self.worker = Worker(self._worker_context())
        self._started = True
        self.status.update(state="running")
        self._intake_thread = threading.Thread(target=self._intake_loop, name="product-studio-intake", daemon=True)
        self.worker.start()
        self._intake_thread.start()
        self.intake.request_scan()
        log_event(self.log, logging.INFO, "started", "watching %s -> %s (%s, settle %.1fs, rescan %.0fs, %s)",
                  self.paths.inbox, self.paths.outbox, self.observer_mode, self.ds.settle_seconds,
                  self.ds.rescan_seconds, self.ds.disposition, pid=os.getpid(), ledger=str(self.paths.ledger),
                  rules=str(self.paths.rules), rules_hash=self.rules_hash,
                  metrics_port=getattr(self.metrics, "port", None))

    def _worker_context(self) -> WorkerContext:
        isolation = None
        if self.child_factory is not None:
            isolation = Isolation(self.child_factory, self.paths.rules, self.ds.log_format, self.ds.log_level)
        events = WorkerEvents(status=self.status, metrics=self.metrics, fatal=self.fatal,
                              reload_rules=self.reload_rules, input_changed=self.intake.notify)
        return WorkerContext(ledger=self.ledger, processor=self.processor, writer=self.writer, events=events,
                             retry=RetryPolicy.from_settings(self.ds), log=self.log, isolation=isolation)

    def stop(self, grace: float | None = None) -> bool:
        """Stop taking work, let the current image finish (up to ``grace`` seconds, default
        ``stop_grace_seconds``; after that it is requeued), release everything. Returns True when
        nothing had to be requeued. Safe to call twice."""
        with self._stop_lock:
            if not self._started:
                return True
            self._started = False
        worker = self.worker
        assert worker is not None  # built before _started is set
        self._stopping.set()
        grace = self.ds.stop_grace_seconds if grace is None else grace
        self.status.update(state="stopping")
        self._write_status()
        # Intake first, then the observer: the intake loop supervises the observer and would
        # otherwise see it gone and "restart" it.
        self._stop_intake.set()
        self.intake.wake.set()
        if self._intake_thread is not None:
            self._intake_thread.join(timeout=10)
        self.observer.stop()
        worker.request_stop()
        drain = getattr(self.processor, "drain", None)
        if callable(drain):
            drain()  # Ray engine: images still waiting for an actor are requeued, not started
        for current in worker.running_rows():
            log_event(self.log, logging.INFO, "stopping", "stopping: finishing %s (up to %.0fs)", current.name,
                      grace, stem=current.stem)
        worker.join(timeout=grace)
        clean = True
        if worker.alive():
            for row in worker.abandon_running():
                self.ledger.requeue(row.id)
                clean = False
                log_event(self.log, logging.WARNING, "requeued", "%s did not finish within %.0fs; requeued for the "
                          "next start", row.name, grace, stem=row.stem)
        self.status.update(state="stopped", current=None)
        self._refresh_counts()
        self._write_status()
        self._shutdown_resources()
        self.stopped.set()
        log_event(self.log, logging.INFO, "stopped", "stopped", clean=clean)
        return clean

    def run_forever(self) -> int:
        """``start()``, then serve until SIGINT/SIGTERM (or a fatal error); returns the exit code.
        Must run on the main thread (signal handlers)."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            self.start()
            while not self._stop_requested.wait(0.5):
                pass
            self.stop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self.exit_code

    def request_stop(self) -> None:
        self._stop_requested.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = self.clock()
        window = self.ds.signal_window_seconds
        if self._first_signal_at is None:
            self._first_signal_at = now
            log_event(self.log, logging.INFO, "signal", "%s: finishing the current image, then exiting "
                      "(send it again after %gs to exit at once)", name, window, signal=name)
            self.request_stop()
            return
        if now - self._first_signal_at <= window:
            # make forwards SIGTERM to its child and systemd signals the whole group: several
            # signals milliseconds apart are one request, not "exit now".
            log_event(self.log, logging.INFO, "signal", "%s again within %gs: the same stop request", name, window,
                      signal=name)
            return
        log_event(self.log, logging.WARNING, "signal", "%s again: exiting now; the current image is resumed at "
                  "the next start", name, signal=name)
        for h in self.log.handlers:
            try:
                h.flush()
            except Exception:
                pass
        # A second signal means "now": no joins, no cleanup. The kernel drops the lock and every
        # committed ledger state stays valid (a `running` row is resumed at the next start).
        os._exit(EXIT_INTERRUPTED)

    def fatal(self, exc: BaseException) -> None:
        """Stop the daemon because no image can succeed (e.g. a model cannot be loaded)."""
        log_event(self.log, logging.CRITICAL, "fatal", "stopping: %s", exc, error=str(exc))
        self.exit_code = EXIT_FATAL
        self.status.error("-", None, f"fatal: {exc}", final=True)
        if self.worker is not None:
            self.worker.request_stop()
        self.request_stop()

    def _shutdown_resources(self) -> None:
        self.observer.stop()
        if self.metrics is not None:
            try:
                self.metrics.close()
            except Exception:
                pass
        # A processor holding outside resources (the Ray engine's actors, and the local Ray instance
        # it started) lets them go; an abandoned thread waiting on an actor then gets an error and
        # records nothing (its row was requeued).
        close = getattr(self.processor, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log_event(self.log, logging.WARNING, "processor_close", "processor did not close cleanly",
                          exc_info=True)
        # The ledger stays usable for an abandoned worker thread until the process exits; it is
        # closed only when the worker is really gone.
        if self.worker is None or not self.worker.alive():
            self.ledger.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------------------------------
    # intake decisions (intake thread)

    def _on_stable(self, path: Path, sig: Sig, sha: str) -> bool:
        """A complete file: judge it (:func:`daemon.policy.decide`) and act on the decision. True
        when handled."""
        name = path.relative_to(self.paths.inbox).as_posix()
        arrival = Arrival(source=str(path), name=name, sha256=sha, rules_hash=self.rules_hash,
                          version=PIPELINE_VERSION)
        worker = self.worker
        is_running = worker.is_running if worker is not None else (lambda row_id: False)
        decision = decide(self.ledger, arrival, duplicates=self.ds.duplicates, disposition=self.ds.disposition,
                          is_running=is_running)
        led, prev = self.ledger, decision.row
        if decision.kind == "known":
            return True
        if decision.kind == "finish_disposal":
            assert prev is not None
            led.set_disposition(prev.id, self.writer.dispose(path, name, sha, STATE_OUTCOME[prev.state]))
            return True
        if decision.kind == "renamed":
            assert prev is not None
            led.set_source(prev.id, arrival.source, name)
            log_event(self.log, logging.INFO, "renamed", "%s is %s renamed; still queued", name, prev.name,
                      stem=prev.stem)
            return True
        if decision.kind == "retry":
            assert prev is not None
            self.writer.clear_failure(prev.stem)  # the retry writes its own outcome; a stale one would make two
            led.reset_for_retry(prev.id, arrival.source, name)
            log_event(self.log, logging.INFO, "retry_dropped", "%s: failed before (%s); dropped again, retrying",
                      name, prev.error, stem=prev.stem)
        elif decision.kind == "duplicate":
            assert prev is not None
            what = self.writer.dispose(path, name, sha, "edited")
            led.add_duplicate(prev.id, arrival.source, sha, what)
            self.metrics.outcome("duplicate")
            log_event(self.log, logging.INFO, "duplicate", "%s: same content as %s (%s); not processed again",
                      name, prev.name, prev.state, stem=prev.stem, disposition=what)
            self._refresh_counts()
            return True
        else:
            row = led.add(sha256=sha, rules_hash=arrival.rules_hash, version=PIPELINE_VERSION, source=arrival.source,
                          name=name, size=sig.size, stem_candidates=stem_candidates(make_stem_base(name), sha),
                          stem_free=self.writer.stem_free)
            log_event(self.log, logging.INFO, "queued", "queued %s", name, stem=row.stem, sha256=sha[:12])
        if worker is not None:
            worker.wake.set()
        self._refresh_counts()
        return True

    @property
    def rules_hash(self) -> str:
        return rules_hash_of(self.processor)

    # ------------------------------------------------------------------------------------------
    # the intake thread: events, settling, rescans, rules, observer, status

    def _intake_loop(self) -> None:
        now = self.clock()
        next_rescan = now + self.ds.rescan_seconds
        next_rules = now + self.ds.rules_poll_seconds
        next_status = last_status = 0.0
        while not self._stop_intake.is_set():
            wait = 0.5
            try:
                self.intake.wake.clear()
                wait = min(wait, self.intake.tick())
                now = self.clock()
                if now >= next_rescan:
                    self.intake.request_scan()
                    next_rescan = now + self.ds.rescan_seconds
                if now >= next_rules:
                    if self.rules.poll() and self.worker is not None:
                        self.worker.request_rules_reload()
                    next_rules = now + self.ds.rules_poll_seconds
                self._check_observer()
                # Changes are published at most every 0.25 s; otherwise as a heartbeat.
                if now >= next_status or (self.status.dirty and now - last_status >= 0.25):
                    self._refresh_counts()
                    self._write_status()
                    last_status, next_status = now, now + self.ds.status_interval_seconds
            except Exception:
                log_event(self.log, logging.ERROR, "intake_error", "intake loop error", exc_info=True)
            self.intake.wake.wait(wait)

    def _check_observer(self) -> None:
        if self._stopping.is_set() or self._stop_intake.is_set():
            return  # a stop is taking the observer down: not a death
        if self.observer.check():
            self.status.set_static(observer=self.observer.mode)

    def _refresh_counts(self) -> None:
        try:
            counts = self.ledger.counts()
        except Exception:
            return
        pending = self.intake.candidates
        self.status.update(counts=counts, queue_depth=counts["pending"], intake_pending=pending,
                           ignored=self.intake.ignored_list())
        if self.metrics is not None:
            self.metrics.queue_depth(counts["pending"])
            self.metrics.intake_pending(pending)

    def _write_status(self) -> None:
        try:
            self.status.write(self.paths.status_file)
        except OSError as e:
            log_event(self.log, logging.WARNING, "status_error", "cannot write %s: %s", self.paths.status_file, e)

    def reload_rules(self) -> None:
        """Validate and switch to the rule file's current content (worker thread, between images)."""
        self.rules.reload(self.processor, self.status, self.metrics, self._write_status)

    # ------------------------------------------------------------------------------------------
    # helpers for tests and status

    def busy(self) -> bool:
        try:
            depth = self.ledger.queue_depth()
        except Exception:
            depth = 0
        return self.intake.busy() or (self.worker is not None and self.worker.busy) or depth > 0

    def wait_idle(self, timeout: float, quiet: float | None = None) -> bool:
        """Block until nothing is settling, queued or running for ``quiet`` seconds (default: settle
        + 0.3 s). False on timeout."""
        quiet = self.ds.settle_seconds + 0.3 if quiet is None else quiet
        end = time.monotonic() + timeout
        idle_since = None
        while time.monotonic() < end:
            if self.busy():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= quiet:
                return True
            time.sleep(0.05)
        return False
