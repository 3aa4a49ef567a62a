"""One daemon per inbox.

Two guards, both released by the kernel when the process dies (kill -9 included), so a crash never
leaves a stale lock behind:

- an ``fcntl.flock`` on ``LEDGER_DIR/.daemon-<inbox key>.lock`` holding the owner's pid (what
  ``status`` reads to tell whether a daemon is running, and what the error message names);
- on Linux, an abstract Unix socket named after the inbox, which catches a second daemon on the
  same host that was pointed at the same inbox with a different ledger (another lock folder).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from daemon.config import inbox_key


class DaemonLockedError(RuntimeError):
    """Another daemon already watches this inbox."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


def lock_holder(lock_file: Path) -> int | None:
    """Pid of the live daemon holding ``lock_file``, or None when nobody holds it."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        first = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        return int(first[0]) if first else None
    except (OSError, ValueError):
        return None


class InboxLock:
    def __init__(self, inbox: Path, lock_file: Path):
        self.inbox = inbox
        self.lock_file = lock_file
        self._fd: int | None = None
        self._sock: socket.socket | None = None

    def acquire(self) -> None:
        """Take both guards or raise :class:`DaemonLockedError` naming the holder's pid."""
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = _read_pid(fd)
            os.close(fd)
            raise DaemonLockedError(
                f"another product-studio daemon (pid {pid if pid else 'unknown'}) is already watching "
                f"{self.inbox} (lock file {self.lock_file})", pid) from None
        if sys.platform.startswith("linux"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind("\0product-studio-inbox-" + inbox_key(self.inbox))
            except OSError:
                sock.close()
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise DaemonLockedError(
                    f"another product-studio daemon on this host is already watching {self.inbox} "
                    "(with a different ledger folder; find it with: pgrep -af 'product-studio watch')") from None
            self._sock = sock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.inbox}\n".encode("utf-8", "surrogateescape"), 0)
        self._fd = fd

    def release(self) -> None:
        # The lock file itself stays: unlinking it would race with a newcomer that already opened it.
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
