"""The file observer (watchdog, inotify or polling) that nominates inbox paths to the intake, and its
supervision: an inotify queue overflow becomes a full rescan, an observer that cannot start falls
back to polling, and a dead observer is restarted (at most every ``retry_seconds`` while it keeps
failing, e.g. while the inbox share is gone). Events only *nominate* paths
(:func:`daemon.intake.make_handler`); what is taken, and when, is the intake's business."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.intake import Intake, make_handler
from daemon.logs import log_event

__all__ = ["ObserverSupervisor"]


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


class ObserverSupervisor:
    """Owns the observer of ``inbox``. ``start()`` / ``stop()`` on the daemon's thread, ``check()``
    on the intake thread. ``poll_seconds``: use a polling observer (None: inotify). The observer
    classes are injectable for tests (``make_inotify``, ``make_polling(timeout)``)."""

    retry_seconds = 10.0

    def __init__(self, inbox: Path, intake: Intake, log: logging.Logger, *, recursive: bool = True,
                 poll_seconds: float | None = None, clock: Callable[[], float] = time.monotonic,
                 make_inotify: Callable[[], BaseObserver] = Observer,
                 make_polling: Callable[[float], BaseObserver] = lambda timeout: PollingObserver(timeout=timeout)):
        self.inbox = inbox
        self.intake = intake
        self.log = log
        self.recursive = recursive
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.make_inotify = make_inotify
        self.make_polling = make_polling
        self.current: Any = None   # the running observer (a watchdog BaseObserver), None when stopped
        self.mode = ""
        self._retry_at = 0.0
        self._overflow_hook = _OverflowHook(intake)
        self._stop_noise = _StopNoise()

    def start(self) -> str:
        """Start watching; returns the mode (``inotify``, ``polling every Ns``, or the fallback).
        Raises OSError when not even polling can watch the inbox."""
        handler = make_handler(self.intake, self.log)
        if self.poll_seconds:
            obs = self.make_polling(self.poll_seconds)
            mode = f"polling every {self.poll_seconds:g}s"
        else:
            obs, mode = self.make_inotify(), "inotify"
        try:
            obs.schedule(handler, str(self.inbox), recursive=self.recursive)
            obs.start()
        except OSError as e:
            # inotify watch limit reached, or a filesystem without inotify: polling still works.
            interval = self.poll_seconds or 5.0
            log_event(self.log, logging.WARNING, "observer_fallback", "%s observer unavailable (%s); polling every "
                      "%.0fs instead", mode, e, interval)
            obs = self.make_polling(interval)
            obs.schedule(handler, str(self.inbox), recursive=self.recursive)
            obs.start()
            mode = f"polling every {interval:g}s (fallback)"
        self.current = obs
        self.mode = mode
        logging.getLogger("watchdog.observers").addHandler(self._overflow_hook)
        self._stop_noise.stopping = False
        inotify_log = logging.getLogger("watchdog.observers.inotify")
        if self._stop_noise not in inotify_log.filters:
            inotify_log.addFilter(self._stop_noise)
        return mode

    def stop(self) -> None:
        logging.getLogger("watchdog.observers").removeHandler(self._overflow_hook)
        obs, self.current = self.current, None
        if obs is None:
            return
        self._stop_noise.stopping = True
        try:
            obs.stop()
            obs.join(timeout=5)
        except Exception:
            log_event(self.log, logging.WARNING, "observer_error", "observer did not stop cleanly", exc_info=True)

    def check(self) -> bool:
        """Restart a dead observer (then rescan the inbox: events were lost meanwhile). After a failed
        restart, the next try waits ``retry_seconds`` (no log flood). True when it restarted one."""
        obs = self.current
        if obs is not None and obs.is_alive():
            return False
        if self.clock() < self._retry_at:
            return False
        log_event(self.log, logging.ERROR, "observer_restart", "the file observer died; restarting it and rescanning")
        self.stop()
        try:
            self.start()
        except Exception as e:
            # e.g. the inbox share is gone for now: rescans keep trying meanwhile.
            self._retry_at = self.clock() + self.retry_seconds
            log_event(self.log, logging.ERROR, "observer_error", "cannot watch %s: %s (retrying in %.0f s)",
                      self.inbox, e, self.retry_seconds)
            return False
        self.intake.request_scan()
        return True
