"""Crash isolation: one image processed in a child process of its own.

The daemon runs an image here when an earlier attempt on it was interrupted (the ledger's
``interruptions``): the daemon died or was killed while it held that image, and nobody can tell
whether the image did it (a segfault in a decoder, memory blown by one photo) or the operator,
the host's OOM killer or a power cut did. In a child of its own, the question has an answer:
only a death of the child counts against the image (:mod:`pipeline.run.deaths`); a stop or kill of
the daemon never does (the ledger row stays ``running`` and is resumed, uncounted, at the next
start).

The child is ``python -m daemon.isolate JOB``: ``JOB`` is a pickled :class:`ChildJob` (the
processor factory, a picklable callable taking the rule file path, plus the image). It builds its
own processor (models load in the child: the price of isolation, paid only for these images),
runs ``processor.process`` into the real outbox (the processor writes its outputs atomically,
record last, as in the daemon) and leaves a pickled result next to the job. It runs in its own
session (a signal to the daemon's process group does not reach it), ignores SIGINT/SIGTERM (an
operator's stop lets the image finish, like in the daemon) and dies with the daemon
(``PR_SET_PDEATHSIG``, and a watch on its parent pid).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from daemon.classify import is_fatal, is_permanent
from daemon.logs import configure_logging, get_logger
from pipeline.io.imageio import atomic_write_bytes
from pipeline.run.deaths import describe_exit

__all__ = ["ChildAbandoned", "ChildDied", "ChildError", "ChildJob", "ChildRun", "Isolation", "RulesChanged"]


@dataclass(frozen=True)
class ChildJob:
    factory: Callable[[Path | None], Any]  # picklable: builds the processor from the rule file
    rules_path: Path | None
    rules_hash: str                        # the rules in force in the daemon (checked in the child)
    path: Path
    outbox: Path
    sha256: str
    stem: str
    parent_pid: int
    log_format: str = "plain"
    log_level: str = "INFO"


@dataclass(frozen=True)
class Isolation:
    """How the worker builds a :class:`ChildJob`: the picklable processor factory, the rule file (read
    by the child if it exists when the job starts) and the daemon's logging set-up."""

    factory: Callable[[Path | None], Any]
    rules_path: Path | None
    log_format: str = "plain"
    log_level: str = "INFO"

    def job(self, *, rules_hash: str, path: Path, outbox: Path, sha256: str, stem: str) -> ChildJob:
        rules = self.rules_path if self.rules_path is not None and self.rules_path.exists() else None
        return ChildJob(factory=self.factory, rules_path=rules, rules_hash=rules_hash, path=path, outbox=outbox,
                        sha256=sha256, stem=stem, parent_pid=os.getpid(), log_format=self.log_format,
                        log_level=self.log_level)


class ChildDied(RuntimeError):
    """The isolated child died while it held the image (signal, OOM kill, segfault, exit without a
    result). ``worker_died`` lets the worker treat it like a Ray actor's death (one policy)."""

    worker_died = True

    def __init__(self, name: str, returncode: int | None):
        self.detail, self.signal = describe_exit(returncode)
        self.returncode = returncode
        super().__init__(f"isolated worker process died while processing {name}: {self.detail}")


class ChildError(RuntimeError):
    """An exception raised in the child that could not be sent back as itself (not picklable).
    Carries the classification the worker needs."""

    def __init__(self, message: str, *, permanent: bool = False, fatal: bool = False):
        super().__init__(message)
        self.permanent = permanent
        self.fatal = fatal


class RulesChanged(RuntimeError):
    """The rule file no longer holds the rules in force in the daemon (an edit not yet reloaded,
    or refused): the child did not start the image. Not the image's fault; it waits."""

    requeue_later = True


class ChildRun:
    """One child process for one image. ``start()``, then ``wait(abandoned)``, which returns the
    record or raises what the processor raised, :class:`ChildDied` or :class:`RulesChanged`."""

    def __init__(self, job: ChildJob):
        self.job = job
        self.dir = Path(tempfile.mkdtemp(prefix="product-studio-child-"))
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        with open(self.dir / "job.pickle", "wb") as fh:
            pickle.dump(self.job, fh)
        # The child unpickles the daemon's processor factory: it must import what this process
        # imports, so it gets this process's module search path.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.isolate", str(self.dir)],
                                     stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True, env=env)

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, should_abandon: Callable[[], bool] = lambda: False, poll: float = 0.1) -> dict:
        assert self.proc is not None
        try:
            while True:
                try:
                    rc = self.proc.wait(poll)
                    break
                except subprocess.TimeoutExpired:
                    if should_abandon():
                        self.kill()
                        raise ChildAbandoned() from None
            result = self._result()
            if result is None:
                raise ChildDied(self.job.path.name, rc)
            kind = result["kind"]
            if kind == "record":
                return result["record"]
            if kind == "rules_changed":
                raise RulesChanged(result["message"])
            exc = result.get("exc")
            if isinstance(exc, BaseException):
                raise exc
            raise ChildError(result["message"], permanent=result["permanent"], fatal=result["fatal"])
        finally:
            if self.proc.poll() is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _result(self) -> dict | None:
        try:
            with open(self.dir / "result.pickle", "rb") as fh:
                return pickle.load(fh)
        except FileNotFoundError:
            return None
        except Exception as e:  # an exception class that cannot be unpickled here
            return {"kind": "error", "message": f"unreadable result from the isolated worker: {e}",
                    "permanent": False, "fatal": False}


class ChildAbandoned(Exception):
    """The daemon gave up waiting (stop grace over): the child was killed; nothing is recorded."""


# ------------------------------------------------------------------------------------------------
# The child


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass

    # PDEATHSIG follows the parent *thread*, and is Linux only: watch the parent pid as well.
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.2)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _write_result(folder: Path, result: dict) -> None:
    try:
        data = pickle.dumps(result)
    except Exception:
        result = {k: v for k, v in result.items() if k != "exc"}
        data = pickle.dumps(result)
    atomic_write_bytes(folder / "result.pickle", data)


def child_main(folder: Path) -> int:
    with open(folder / "job.pickle", "rb") as fh:
        job: ChildJob = pickle.load(fh)
    _die_with_parent(job.parent_pid)
    # The daemon decides about stopping; the image in hand is finished (or the daemon kills us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(job.log_format, job.log_level)
    log = get_logger()
    try:
        processor = job.factory(job.rules_path)
        have = str(getattr(processor, "rules_hash", None) or "none")
        if have != job.rules_hash:
            _write_result(folder, {"kind": "rules_changed", "message": f"the rule file holds rules {have[:12]}, the "
                                   f"daemon runs {job.rules_hash[:12]}"})
            return 0
        record = processor.process(job.path, job.outbox, sha256=job.sha256, stem=job.stem)
        _write_result(folder, {"kind": "record", "record": record})
    except Exception as e:
        log.debug("isolated worker: %s", e, exc_info=True)
        _write_result(folder, {"kind": "error", "exc": e, "message": f"{type(e).__name__}: {e}",
                               "permanent": is_permanent(e), "fatal": is_fatal(e),
                               "traceback": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(child_main(Path(sys.argv[1])))
