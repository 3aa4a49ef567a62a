"""Helpers shared by the tests (test-only: never shipped). ``tests/`` is on ``sys.path`` under
pytest (rootdir conftest), so tests import ``helpers``, ``helpers.processors`` and ``helpers.loras``."""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def png_bytes(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A small PNG whose pixels (and so bytes) differ per ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(cond: Callable[[], Any], timeout: float, message: str = "", interval: float = 0.05) -> Any:
    """Poll ``cond`` until truthy and return its value; fail (AssertionError) after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message or cond}")
        time.sleep(interval)


class TimeLimitExceeded(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with :class:`TimeLimitExceeded` if the block runs longer than ``seconds`` (SIGALRM; main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _alarm(signum: int, frame: Any) -> None:
        raise TimeLimitExceeded(f"test exceeded its {seconds:.0f}s time limit (hung thread?)")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome_records(outbox: Path) -> dict[str, list[Path]]:
    """Every JSON record in the outbox by outcome folder."""
    def records(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))

    return {"edited": records(outbox), "skipped": records(outbox / "skipped"), "failed": records(outbox / "failed")}
