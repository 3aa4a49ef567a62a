"""Intake: which files in the inbox are inputs, and when they are ready to be taken.

Events (watchdog, inotify or polling) and scans (at start, periodically, and of every directory that
is created or moved in) only *nominate* paths. A nominated regular file becomes a candidate; it is
taken once its signature (size, mtime, inode) stayed unchanged for ``settle`` seconds, hashed, and
checked once more (a file changed while hashing goes back to settling). Taken paths are remembered
with their signature (the in-flight set), so repeated events and rescans queue nothing twice; a
path whose signature changes later is considered again.

Never taken: junk (hidden names incl. ``.DS_Store``/``._*``/atomic-write temps, partial downloads
``.part``/``.crdownload``/``~``..., OS litter), symlinks and other non-regular files, and by default
files without an image suffix. Every file left alone is listed (:meth:`Intake.ignored_list`, shown
by ``status``) and logged once at WARNING with the reason: at once for symlinks and non-image
names, and for hidden and partial names (normally an upload in progress) only once they have sat
there for the stall grace period.

A stalled upload: a file that stopped changing for ``settle`` seconds but whose bytes end before
the image does (:func:`~pipeline.io.imageio.looks_incomplete`) waits while it was modified within
``stall_grace`` seconds; it is taken (and fails as truncated) only if it stays so, unchanged, past
that. Any change puts it back to settling.

The watchdog handler never raises: a handler exception would kill the observer thread and with it
every later event.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from daemon.logs import log_event
from pipeline.io.hashing import file_sha256
from pipeline.io.imageio import is_image_name, looks_incomplete

_JUNK_NAMES = {"thumbs.db", "desktop.ini", "icon\r", "ehthumbs.db"}
_JUNK_DIRS = {"@eadir", "#recycle", "$recycle.bin", "#snapshot", "lost+found"}
_PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".opdownload", ".filepart", ".tmp",
                     ".temp", ".swp", ".swx", ".!ut", ".!qb", ".aria2", ".unconfirmed")


def junk_reason(name: str) -> str | None:
    """Why a file or folder name is never an input, or None when it may be one."""
    low = name.lower()
    if name.startswith("."):
        return "hidden"
    if low in _JUNK_NAMES or low in _JUNK_DIRS:
        return "system file"
    if name.endswith("~") or name.startswith("~$"):
        return "temporary file"
    if low.endswith(_PARTIAL_SUFFIXES) or ".tmp-" in low:
        return "partial download"
    return None


class Sig(NamedTuple):
    size: int
    mtime_ns: int
    ino: int
    dev: int


def sig_of(st: os.stat_result) -> Sig:
    return Sig(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass
class _Candidate:
    sig: Sig
    since: float


@dataclass
class _Ignored:
    reason: str
    since: float          # intake clock
    warned: bool = False
    deferred: bool = False  # warn only if still there after the stall grace (uploads in progress)


_MAX_LISTED = 100


# on_stable(path, sig, sha256) -> True when handled (remember the signature), False to retry later.
StableCallback = Callable[[Path, Sig, str], bool]


@dataclass
class Intake:
    inbox: Path
    settle: float
    on_stable: StableCallback
    log: logging.Logger
    recursive: bool = True
    non_images: str = "ignore"
    stall_grace: float = 20.0
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time  # compared with file mtimes
    _nominated: "queue.SimpleQueue[tuple[str, str | None]]" = field(default_factory=queue.SimpleQueue)
    _candidates: dict[str, _Candidate] = field(default_factory=dict)
    _taken: dict[str, Sig] = field(default_factory=dict)
    _told: dict[str, tuple] = field(default_factory=dict)
    _ignored: dict[str, _Ignored] = field(default_factory=dict)
    wake: threading.Event = field(default_factory=threading.Event)

    # -- called from any thread ------------------------------------------------------------------
    def notify(self, path: str | os.PathLike) -> None:
        self._nominated.put(("path", os.fspath(path)))
        self.wake.set()

    def request_scan(self, directory: str | os.PathLike | None = None) -> None:
        """Walk ``directory`` (default: the whole inbox) on the intake thread."""
        self._nominated.put(("scan", os.fspath(directory) if directory is not None else None))
        self.wake.set()

    # -- intake thread only ----------------------------------------------------------------------
    @property
    def candidates(self) -> int:
        return len(self._candidates)

    def busy(self) -> bool:
        return bool(self._candidates) or not self._nominated.empty()

    def ignored_list(self) -> list[dict[str, str]]:
        """Files in the inbox left alone, ``[{"name", "reason"}]`` by name (at most 100). Any thread."""
        items = sorted(dict(self._ignored).items())[:_MAX_LISTED]
        return [{"name": self._rel(Path(k)), "reason": v.reason} for k, v in items]

    def tick(self) -> float:
        """Handle nominations, take the files that settled; return seconds until the next check."""
        while True:
            try:
                kind, p = self._nominated.get_nowait()
            except queue.Empty:
                break
            try:
                if kind == "scan":
                    self.scan(Path(p) if p else None)
                else:
                    self.consider(Path(p))
            except Exception:
                log_event(self.log, logging.ERROR, "intake_error", "intake error on %s", p, exc_info=True)
        now = self.clock()
        wait = 1.0
        for path, cand in list(self._candidates.items()):
            due = cand.since + self.settle - now
            if due <= 0:
                try:
                    self._settle_check(path, cand)
                except Exception:
                    # One unreadable file must not stall the others: back off and try again later.
                    log_event(self.log, logging.ERROR, "intake_error", "cannot take %s", path, exc_info=True)
                    cand.since = self.clock() + 5.0
                if path in self._candidates:
                    due = self._candidates[path].since + self.settle - self.clock()
            wait = min(wait, max(due, 0.02))
        for key, ig in list(self._ignored.items()):
            if ig.warned:
                continue
            due = ig.since + self.stall_grace - now
            if due <= 0:
                ig.warned = True
                if os.path.lexists(key):
                    log_event(self.log, logging.WARNING, "ignored", "ignored %s: %s (still there after %.0fs)",
                              self._rel(Path(key)), ig.reason, self.stall_grace, path=key, reason=ig.reason)
            else:
                wait = min(wait, due)
        return wait

    def scan(self, directory: Path | None = None) -> int:
        """Nominate every file below ``directory`` (default: the inbox). Returns how many were seen."""
        top = directory or self.inbox
        seen = 0
        stack = [top]
        while stack:
            d = stack.pop()
            if d != self.inbox and not self._inside_inbox(d):
                continue
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self._tell_once(str(d), ("scan", str(e)), logging.WARNING, "scan_error", f"cannot list {d}: {e}")
                continue
            for e in entries:
                p = Path(e.path)
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if self.recursive and junk_reason(e.name) is None:
                        stack.append(p)
                    continue
                seen += 1
                self.consider(p)
        self._forget_missing()
        return seen

    def consider(self, path: Path) -> None:
        key = str(path)
        reason = self._path_reason(path)
        if reason == "outside":
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(key)
            return
        if stat.S_ISDIR(st.st_mode):
            if reason is None and self.recursive:
                self.request_scan(path)
            return
        if reason is not None:
            # Hidden and partial names are what uploads in progress look like: told only if they stay.
            self._ignore(key, f"{reason} name", deferred=True)
            return
        sig = sig_of(st)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            self._ignore(key, f"{kind} (only regular files are taken)")
            return
        if not is_image_name(path) and self.non_images == "ignore":
            self._ignore(key, f"not an image name (suffix {path.suffix or 'none'}; --non-images fail fails such "
                              "files instead)")
            return
        self._ignored.pop(key, None)
        if self._taken.get(key) == sig:
            return
        cand = self._candidates.get(key)
        if cand is None or cand.sig != sig:
            self._candidates[key] = _Candidate(sig, self.clock())

    # -- internals -------------------------------------------------------------------------------
    def _settle_check(self, key: str, cand: _Candidate) -> None:
        path = Path(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(key)
            return
        if not stat.S_ISREG(st.st_mode):
            del self._candidates[key]
            self.consider(path)
            return
        sig = sig_of(st)
        if sig != cand.sig:
            cand.sig, cand.since = sig, self.clock()
            return
        if self.stall_grace > 0 and is_image_name(path):
            remaining = self.stall_grace - (self.wall() - st.st_mtime)
            if remaining > 0 and looks_incomplete(path):
                # An upload that paused: wait for the rest rather than fail half a photo.
                self._tell_once(key, ("stalled", sig), logging.INFO, "stalled",
                                f"waiting for {self._rel(path)}: it ends before the image does (upload paused?); "
                                f"taken when complete, or as it is if unchanged for {self.stall_grace:.0f}s")
                step = min(max(self.settle, 0.25), remaining)
                cand.since = self.clock() - self.settle + step
                return
        sha = file_sha256(path)
        try:
            after = sig_of(os.lstat(path))
        except FileNotFoundError:
            self._forget(key)
            return
        if after != sig:
            cand.sig, cand.since = after, self.clock()
            return
        if self.on_stable(path, sig, sha):
            del self._candidates[key]
            self._taken[key] = sig
        else:
            cand.since = self.clock()

    def _path_reason(self, path: Path) -> str | None:
        try:
            rel = path.relative_to(self.inbox)
        except ValueError:
            return "outside"
        parts = rel.parts
        if not parts:
            return "outside"
        if not self.recursive and len(parts) > 1:
            return "in a sub-folder (not recursive)"
        for part in parts:
            r = junk_reason(part)
            if r:
                return r
        return None

    def _inside_inbox(self, d: Path) -> bool:
        return self._path_reason(d) is None

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.inbox).as_posix()
        except ValueError:
            return str(path)

    def _ignore(self, key: str, reason: str, deferred: bool = False) -> None:
        prev = self._ignored.get(key)
        if prev is not None and prev.reason == reason:
            return
        ig = self._ignored[key] = _Ignored(reason, self.clock(), deferred=deferred)
        if not deferred:
            ig.warned = True
            log_event(self.log, logging.WARNING, "ignored", "ignored %s: %s", self._rel(Path(key)), reason, path=key,
                      reason=reason)

    def _tell_once(self, key: str, what: tuple, level: int, event: str, msg: str) -> None:
        if self._told.get(key) != what:
            self._told[key] = what
            log_event(self.log, level, event, msg, path=key)

    def _forget(self, key: str) -> None:
        self._candidates.pop(key, None)
        self._taken.pop(key, None)
        self._told.pop(key, None)
        self._ignored.pop(key, None)

    def _forget_missing(self) -> None:
        # Keeps the memory of taken / refused paths bounded by what is actually in the inbox.
        for d in (self._taken, self._told, self._ignored):
            for key in [k for k in d if not os.path.lexists(k)]:
                d.pop(key, None)


def make_handler(intake: Intake, log: logging.Logger):
    """A watchdog handler that nominates paths and never lets an exception reach the observer."""

    class _Handler(FileSystemEventHandler):
        def dispatch(self, event: FileSystemEvent) -> None:  # noqa: D401 - watchdog API
            try:
                kind = event.event_type
                if kind in ("opened", "closed_no_write", "deleted") and not event.is_directory:
                    if kind == "deleted":
                        intake.notify(_s(event.src_path))
                    return
                paths = [_s(event.src_path)]
                dest = getattr(event, "dest_path", None)
                if dest:
                    paths.append(_s(dest))
                if event.is_directory:
                    if kind in ("created", "moved"):
                        intake.request_scan(paths[-1])
                    return
                for p in paths:
                    intake.notify(p)
            except Exception:
                log_event(log, logging.ERROR, "handler_error", "event handler failed on %r", event, exc_info=True)

    return _Handler()


def _s(p: str | bytes) -> str:
    return os.fsdecode(p)
