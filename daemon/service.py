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
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from daemon.config import DaemonConfigError, DaemonPaths, DaemonSettings, check_paths
from daemon.intake import Intake, Sig, make_handler
from daemon.ledger import ACTIVE, Ledger, Row
from daemon.lock import DaemonLockedError, InboxLock
from daemon.logs import get_logger, log_event
from daemon.metrics import make_metrics
from daemon.status import StatusBoard
from daemon.worker import Worker, dispose_input
from pipeline import PIPELINE_VERSION
from pipeline.io.outputs import stem_for
from pipeline.settings import Settings

__all__ = ["Daemon", "DaemonConfigError", "DaemonLockedError", "Processor", "make_stem_base"]

EXIT_INTERRUPTED = 130
EXIT_FATAL = 3  # the CLI's EXIT_MODEL: a model that cannot be loaded stops the daemon
_TEMP_RE = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")


class Processor(Protocol):
    rules_hash: str

    def process(self, path: Path, outbox: Path, *, sha256: str, stem: str) -> dict: ...

    def reload_rules(self, path: Path) -> str: ...


def make_stem_base(name: str) -> str:
    """Output stem for an inbox-relative name: the one stem rule, :func:`pipeline.io.outputs.stem_for`."""
    return stem_for(name)


def _stems(base: str, sha256: str) -> Iterator[str]:
    yield base
    yield f"{base}-{sha256[:8]}"
    i = 2
    while True:
        yield f"{base}-{sha256[:8]}-{i}"
        i += 1


class _OverflowHook(logging.Handler):
    """watchdog only *logs* an inotify queue overflow; turn that log line into a full rescan."""

    def __init__(self, intake: Intake):
        super().__init__(logging.WARNING)
        self.intake = intake

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "overflow" in record.getMessage().lower():
                self.intake.request_scan()
        except Exception:
            pass


class _StopNoise(logging.Filter):
    """watchdog's inotify emitter logs an ERROR when its thread is stopped while a read is in flight
    (``queue_events() called when the thread is inactive``): a race inside watchdog's own stop,
    harmless. Once this daemon stops its observer, such lines are demoted to DEBUG (shown only when
    watchdog logs at DEBUG), so a clean stop trips no log-based alert."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.stopping and record.levelno >= logging.ERROR and "thread is inactive" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("watchdog").isEnabledFor(logging.DEBUG)
        return True


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
        ``functools.partial`` of one). Without it, resumed images run in this process."""
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
        stall = self.ds.stall_grace_seconds
        self.intake = Intake(self.paths.inbox, self.ds.settle_seconds, self._on_stable, self.log,
                             recursive=self.ds.recursive, non_images=self.ds.non_images,
                             stall_grace=10 * self.ds.settle_seconds if stall is None else stall)
        self.worker = Worker(self)
        self.exit_code = 0
        self.stopped = threading.Event()
        self._stop_intake = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stopping = threading.Event()  # set first thing in stop(): supervisors stand down
        self._lock: InboxLock | None = None
        self._observer: Any = None
        self._observer_retry_at = 0.0
        self._overflow_hook = _OverflowHook(self.intake)
        self._stop_noise = _StopNoise()
        self.observer_mode = ""
        self._intake_thread: threading.Thread | None = None
        self._started = False
        self._first_signal_at: float | None = None
        self._rules_sig: tuple | None = None
        self._rules_seen: tuple | None = None

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
            # Stat before the factory reads the file, so an edit made meanwhile is still noticed.
            self._rules_sig = self._rules_seen = self._rules_stat()
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
            self._recover()
            self._start_observer()
        except BaseException:
            self._shutdown_resources()
            raise
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

    def stop(self, grace: float | None = None) -> bool:
        """Stop taking work, let the current image finish (up to ``grace`` seconds, default
        ``stop_grace_seconds``; after that it is requeued), release everything. Returns True when
        nothing had to be requeued. Safe to call twice."""
        with self._stop_lock:
            if not self._started:
                return True
            self._started = False
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
        self._stop_observer()
        self.worker.stop_requested.set()
        self.worker.wake.set()
        drain = getattr(self.processor, "drain", None)
        if callable(drain):
            drain()  # Ray engine: images still waiting for an actor are requeued, not started
        for current in self.worker.running_rows():
            log_event(self.log, logging.INFO, "stopping", "stopping: finishing %s (up to %.0fs)", current.name,
                      grace, stem=current.stem)
        self.worker.join(timeout=grace)
        clean = True
        if self.worker.alive():
            for row in self.worker.abandon_running():
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
        self.worker.stop_requested.set()
        self.request_stop()

    def _shutdown_resources(self) -> None:
        self._stop_observer()
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
        if not self.worker.alive():
            self.ledger.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------------------------------
    # observer

    def _start_observer(self) -> None:
        from watchdog.observers.polling import PollingObserver

        handler = make_handler(self.intake, self.log)
        if self.ds.poll_seconds:
            obs = PollingObserver(timeout=self.ds.poll_seconds)
            mode = f"polling every {self.ds.poll_seconds:g}s"
        else:
            from watchdog.observers import Observer

            obs, mode = Observer(), "inotify"
        try:
            obs.schedule(handler, str(self.paths.inbox), recursive=self.ds.recursive)
            obs.start()
        except OSError as e:
            # inotify watch limit reached, or a filesystem without inotify: polling still works.
            interval = self.ds.poll_seconds or 5.0
            log_event(self.log, logging.WARNING, "observer_fallback", "%s observer unavailable (%s); polling every "
                      "%.0fs instead", mode, e, interval)
            obs = PollingObserver(timeout=interval)
            obs.schedule(handler, str(self.paths.inbox), recursive=self.ds.recursive)
            obs.start()
            mode = f"polling every {interval:g}s (fallback)"
        self._observer = obs
        self.observer_mode = mode
        self.status.set_static(observer=mode)
        logging.getLogger("watchdog.observers").addHandler(self._overflow_hook)
        self._stop_noise.stopping = False
        inotify_log = logging.getLogger("watchdog.observers.inotify")
        if self._stop_noise not in inotify_log.filters:
            inotify_log.addFilter(self._stop_noise)

    def _stop_observer(self) -> None:
        logging.getLogger("watchdog.observers").removeHandler(self._overflow_hook)
        obs, self._observer = self._observer, None
        if obs is None:
            return
        self._stop_noise.stopping = True
        try:
            obs.stop()
            obs.join(timeout=5)
        except Exception:
            log_event(self.log, logging.WARNING, "observer_error", "observer did not stop cleanly", exc_info=True)

    def _check_observer(self) -> None:
        obs = self._observer
        if (obs is not None and obs.is_alive()) or self._stopping.is_set() or self._stop_intake.is_set():
            return
        if time.monotonic() < self._observer_retry_at:
            return
        log_event(self.log, logging.ERROR, "observer_restart", "the file observer died; restarting it and rescanning")
        self._stop_observer()
        try:
            self._start_observer()
        except Exception as e:
            # e.g. the inbox share is gone for now: rescans keep trying; no log flood meanwhile.
            self._observer_retry_at = time.monotonic() + 10.0
            log_event(self.log, logging.ERROR, "observer_error", "cannot watch %s: %s (retrying in 10 s)",
                      self.paths.inbox, e)
            return
        self.intake.request_scan()

    # ------------------------------------------------------------------------------------------
    # recovery

    def _recover(self) -> None:
        for row in self.ledger.recover():
            log_event(self.log, logging.WARNING, "resumed", "resuming %s (attempt %d was interrupted when the daemon "
                      "stopped or died; not counted against it)", row.name, row.attempts, stem=row.stem,
                      interruptions=row.interruptions + 1)
        for row in self.ledger.undisposed():
            outcome = {"done": "edited", "skipped": "skipped", "failed": "failed"}[row.state]
            src = Path(row.source)
            if os.path.lexists(src):
                from daemon.intake import hash_file

                try:
                    if hash_file(src) != row.sha256:
                        self.ledger.set_disposition(row.id, "gone")
                        continue
                except OSError:
                    continue
            try:
                what = dispose_input(src, row.name, row.sha256, outcome, self.ds.disposition, self.paths.archive)
            except OSError as e:
                log_event(self.log, logging.ERROR, "dispose_error", "cannot move %s out of the inbox: %s", row.name, e)
                continue
            if outcome == "failed":
                from daemon.worker import annotate_failure

                try:
                    annotate_failure(self.paths.outbox / "failed" / f"{row.stem}.json", row.sha256, row.source, what)
                except OSError:
                    pass
            self.ledger.set_disposition(row.id, what)
            log_event(self.log, logging.INFO, "recovered", "completed the disposition of %s (%s)", row.name, what)
        self._remove_stale_temps()
        self._refresh_counts()

    def _remove_stale_temps(self) -> None:
        # Hidden temp files of the atomic writers (`.NAME.tmp-XXXX`) left by a crash mid-write. The
        # lock guarantees no other daemon writes here now, so any such file is a leftover.
        seen: set[str] = set()
        for top in (self.paths.outbox, self.paths.archive, self.paths.status_file.parent):
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
                            log_event(self.log, logging.INFO, "temp_removed", "removed %s (partial write from "
                                      "an interrupted run)", path)
                        except OSError:
                            pass

    # ------------------------------------------------------------------------------------------
    # intake decisions (intake thread)

    def _on_stable(self, path: Path, sig: Sig, sha: str) -> bool:
        """A complete file: decide new / already queued / duplicate / retry. True when handled."""
        src = str(path)
        name = path.relative_to(self.paths.inbox).as_posix()
        led = self.ledger
        same = led.by_source(sha, src)
        # The very file a row stands for is still here (queued, being processed, left in place, or
        # not yet moved out because of a crash). Once a row's input was moved out, a file at the
        # same path is a new arrival and is judged below.
        if same is not None and (same.state in ACTIVE or same.disposition in (None, "left")):
            if same.state in ACTIVE or self.worker.is_running(same.id):
                return True
            if same.disposition is None and self.ds.disposition != "leave":
                outcome = {"done": "edited", "skipped": "skipped", "failed": "failed"}[same.state]
                led.set_disposition(same.id, dispose_input(path, name, sha, outcome, self.ds.disposition,
                                                           self.paths.archive))
            return True
        if led.duplicate_seen(src, sha):
            return True
        active = led.active_for(sha)
        if active is not None and not os.path.lexists(active.source):
            led.set_source(active.id, src, name)
            log_event(self.log, logging.INFO, "renamed", "%s is %s renamed; still queued", name, active.name,
                      stem=active.stem)
            return True
        rules_hash = self.rules_hash
        prev = active or led.latest_for_key(sha, rules_hash, PIPELINE_VERSION)
        if prev is not None and prev.state == "failed":
            self._clear_failure_record(prev)
            led.reset_for_retry(prev.id, src, name)
            log_event(self.log, logging.INFO, "retry_dropped", "%s: failed before (%s); dropped again, retrying",
                      name, prev.error, stem=prev.stem)
            self.worker.wake.set()
            self._refresh_counts()
            return True
        if prev is not None and self.ds.duplicates == "skip":
            what = dispose_input(path, name, sha, "edited", self.ds.disposition, self.paths.archive)
            led.add_duplicate(prev.id, src, sha, what)
            self.metrics.outcome("duplicate")
            log_event(self.log, logging.INFO, "duplicate", "%s: same content as %s (%s); not processed again",
                      name, prev.name, prev.state, stem=prev.stem, disposition=what)
            self._refresh_counts()
            return True
        row = led.add(sha256=sha, rules_hash=rules_hash, version=PIPELINE_VERSION, source=src, name=name,
                      size=sig.size, stem_candidates=_stems(make_stem_base(name), sha), stem_free=self._stem_free)
        log_event(self.log, logging.INFO, "queued", "queued %s", name, stem=row.stem, sha256=sha[:12])
        self.worker.wake.set()
        self._refresh_counts()
        return True

    @property
    def rules_hash(self) -> str:
        return str(self.processor.rules_hash or "none")

    def _stem_free(self, stem: str) -> bool:
        out = self.paths.outbox
        return not any((out / sub / f"{stem}.json").exists() for sub in ("", "skipped", "failed"))

    def _clear_failure_record(self, row: Row) -> None:
        # The retry will write its own outcome; a stale failed record would make two.
        try:
            (self.paths.outbox / "failed" / f"{row.stem}.json").unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------------------
    # the intake thread: events, settling, rescans, rules, status

    def _intake_loop(self) -> None:
        next_rescan = time.monotonic() + self.ds.rescan_seconds
        next_rules = time.monotonic() + self.ds.rules_poll_seconds
        next_status = last_status = 0.0
        while not self._stop_intake.is_set():
            wait = 0.5
            try:
                self.intake.wake.clear()
                wait = min(wait, self.intake.tick())
                now = time.monotonic()
                if now >= next_rescan:
                    self.intake.request_scan()
                    next_rescan = now + self.ds.rescan_seconds
                if now >= next_rules:
                    self._poll_rules()
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

    def count_outcome(self, outcome: str) -> None:
        self.metrics.outcome(outcome)
        self.status.update(processed=self.status.processed + 1)

    # ------------------------------------------------------------------------------------------
    # rules

    def _rules_stat(self) -> tuple | None:
        if self.paths.rules is None:
            return None
        try:
            st = os.stat(self.paths.rules)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def _poll_rules(self) -> None:
        # A change is acted on once the file looked the same on two polls in a row, so an editor
        # caught mid-write does not produce a spurious "refused".
        if self.paths.rules is None:
            return
        sig = self._rules_stat()
        if sig == self._rules_sig:
            self._rules_seen = sig
            return
        if sig != self._rules_seen:
            self._rules_seen = sig
            return
        self._rules_sig = sig
        self.worker.request_rules_reload()

    def reload_rules(self) -> None:
        """Validate and switch to the rule file's current content (worker thread, between images)."""
        old = self.rules_hash
        try:
            new = self.processor.reload_rules(self.paths.rules)
        except Exception as e:
            self.metrics.rules_reload("refused")
            self.status.update(rules={**self.status.rules, "last_error": str(e), "refused_at": time.time()})
            self._write_status()  # `status` shows it as soon as the log does
            log_event(self.log, logging.ERROR, "rules_refused", "rule file edit refused; the last good rules stay "
                      "in force (%s): %s", old[:12], e, rules=str(self.paths.rules), error=str(e))
            return
        self.metrics.rules_reload("accepted")
        self.status.update(rules={**self.status.rules, "hash": new, "last_error": None, "reloaded_at": time.time()})
        self._write_status()  # `status` shows it as soon as the log does
        log_event(self.log, logging.INFO, "rules_reloaded", "rules reloaded: %s -> %s", old[:12], str(new)[:12],
                  rules=str(self.paths.rules))

    # ------------------------------------------------------------------------------------------
    # helpers for tests and status

    def busy(self) -> bool:
        try:
            depth = self.ledger.queue_depth()
        except Exception:
            depth = 0
        return self.intake.busy() or self.worker.busy or depth > 0

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

