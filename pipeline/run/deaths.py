"""One policy for a process that died while it held an image, shared by both engines.

A *death* is the end of a worker process holding exactly one image: the daemon's isolated child
(:mod:`daemon.isolate`) or a Ray actor (:mod:`pipeline.engine.ray_engine`). It is counted against that
image, and the image fails after ``max_deaths`` of them with :func:`death_message` as the reason.
Stopping or killing the *daemon* is never a death of the image: only a process that held the image
alone, and died while nobody asked it to stop, is.

Plain data and stdlib only: imported by the daemon, the Ray coordinator and catalog runs alike.
"""

from __future__ import annotations

import signal

DEFAULT_MAX_DEATHS = 3


def describe_exit(returncode: int | None) -> tuple[str, str | None]:
    """``(text, signal name or None)`` for a child's ``returncode`` (negative: killed by that signal,
    as :class:`subprocess.Popen` reports it)."""
    if returncode is None:
        return "still running", None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}", name
    return f"exited with code {returncode} without a result", None


def death_message(deaths: int, last: str | None = None) -> str:
    """The reason recorded for an image that killed its worker ``deaths`` times (daemon and run);
    ``last`` says how the last one ended (e.g. ``killed by SIGKILL``)."""
    return f"worker process died {deaths} times on this image" + (f" (last: {last})" if last else "")


def exhausted(deaths: int, max_deaths: int) -> bool:
    """True when an image that killed its worker ``deaths`` times is given up."""
    return deaths >= max_deaths
