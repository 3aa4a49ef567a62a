"""The rule file while the daemon runs: noticing an edit, and switching to it only if it is valid.

An edit is noticed by polling the file's (size, mtime, inode, device); it is acted on once the file
looked the same on two polls in a row, so an editor caught mid-write does not produce a spurious
"refused". The worker then reloads between images (:meth:`daemon.worker.Worker.request_rules_reload`):
the processor validates the new rules before using them; a bad edit is logged and refused, and the
last good rules stay in force. Either way the status file shows it before the log line is written.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from daemon.logs import log_event
from daemon.status import StatusBoard

__all__ = ["RuleFile", "rules_hash_of"]


def rules_hash_of(processor: Any) -> str:
    """The hash of the rules in force in ``processor`` (``"none"`` without rules)."""
    return str(processor.rules_hash or "none")


class RuleFile:
    """``path``: the rule file (None: no rule file, nothing to watch)."""

    def __init__(self, path: Path | None, log: logging.Logger):
        self.path = path
        self.log = log
        self._sig: tuple | None = None   # what the rules in force were read from
        self._seen: tuple | None = None  # what the last poll saw

    def stat(self) -> tuple | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def mark_loaded(self) -> None:
        """Call *before* the processor reads the file, so an edit made meanwhile is still noticed."""
        self._sig = self._seen = self.stat()

    def poll(self) -> bool:
        """True when the file changed since the rules in force were read and looked the same as on
        the previous poll (the edit is complete): time to reload."""
        if self.path is None:
            return False
        sig = self.stat()
        if sig == self._sig:
            self._seen = sig
            return False
        if sig != self._seen:
            self._seen = sig
            return False
        self._sig = sig
        return True

    def reload(self, processor: Any, status: StatusBoard, metrics: Any, publish: Callable[[], None]) -> bool:
        """Validate and switch ``processor`` to the file's current content (worker thread, between
        images). Records the result on ``status`` and ``metrics``, calls ``publish()`` (writes the
        status file), then logs. True when the new rules are in force."""
        old = rules_hash_of(processor)
        try:
            new = processor.reload_rules(self.path)
        except Exception as e:
            metrics.rules_reload("refused")
            status.update(rules={**status.rules, "last_error": str(e), "refused_at": time.time()})
            publish()
            log_event(self.log, logging.ERROR, "rules_refused", "rule file edit refused; the last good rules stay "
                      "in force (%s): %s", old[:12], e, rules=str(self.path), error=str(e))
            return False
        metrics.rules_reload("accepted")
        status.update(rules={**status.rules, "hash": new, "last_error": None, "reloaded_at": time.time()})
        publish()
        log_event(self.log, logging.INFO, "rules_reloaded", "rules reloaded: %s -> %s", old[:12], str(new)[:12],
                  rules=str(self.path))
        return True
