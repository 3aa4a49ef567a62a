"""Structured logs: every daemon message carries an ``event`` name and key/value fields.

Plain format: ``2025-01-02T03:04:05Z INFO  processed a.jpg  event=processed stem=a outcome=edited``.
JSON format: one object per line: ``{"ts", "level", "event", "msg", ...fields}`` (``exc`` holds a
traceback when there is one).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

LOGGER_NAME = "product_studio.daemon"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def log_event(log: logging.Logger, level: int, event: str, msg: str, *args: Any, exc_info: Any = None,
              **fields: Any) -> None:
    log.log(level, msg, *args, exc_info=exc_info, extra={"event": event, "fields": fields})


def _ts(record: logging.LogRecord) -> str:
    t = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _plain_value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n\t')) else s


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), f"{record.levelname:<7}", record.getMessage()]
        fields = {"event": getattr(record, "event", None), **(getattr(record, "fields", None) or {})}
        kv = " ".join(f"{k}={_plain_value(v)}" for k, v in fields.items() if v is not None)
        line = " ".join(parts) + (f"  {kv}" if kv else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(),
                               "event": getattr(record, "event", None) or "log", "msg": record.getMessage()}
        for k, v in (getattr(record, "fields", None) or {}).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


_SAVED: dict[str, tuple[int, bool]] = {}


def configure_logging(fmt: str = "plain", level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send the daemon's log (and watchdog's warnings) to ``stream`` (stderr) in ``fmt``.
    :func:`reset_logging` undoes it (the CLI does, so in-process callers get their loggers back)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler._product_studio = True  # type: ignore[attr-defined]
    for name, lvl in ((LOGGER_NAME, level), ("watchdog", "WARNING")):
        lg = logging.getLogger(name)
        _SAVED.setdefault(name, (lg.level, lg.propagate))
        lg.handlers = [h for h in lg.handlers if not getattr(h, "_product_studio", False)]
        lg.addHandler(handler)
        lg.setLevel(lvl)
        lg.propagate = False
    return handler


def reset_logging() -> None:
    for name, (level, propagate) in list(_SAVED.items()):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_product_studio", False)]:
            lg.removeHandler(h)
            h.flush()
        lg.setLevel(level)
        lg.propagate = propagate
        del _SAVED[name]
