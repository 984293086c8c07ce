"""One node per state directory: an exclusive lock held while the node runs.

Why: two nodes started on one state directory (the service, and ``make run`` or a second
``serve --port`` by hand) would share the spool, the index and the outbox: each would delete
the other's in-flight temp files at start-up, both would run and deliver the same jobs, and
one instance arriving at both at once could leave a file holding one copy's bytes and an
index row holding the other's digest. The lock is ``flock`` on ``<state_dir>/node.lock``:
the kernel drops it when the process ends, SIGKILL included, so a crash never leaves a stale
lock behind, and the analysis worker (a spawned process) does not inherit it. The file holds
the owner's process id, for the message a second node prints. Read-only commands
(``status``) and the short index writes of ``retry`` / ``purge`` do not take it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE_NAME = "node.lock"


class StateDirectoryInUse(OSError):
    """Another running node holds the state directory (the message names its process id)."""


class StateLock:
    """The held lock; :meth:`release` (or process exit) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """Lock ``state_dir`` (which must exist) or raise :class:`StateDirectoryInUse` at once."""
        path = Path(state_dir) / LOCK_FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_owner(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise StateDirectoryInUse(
                f"state directory {Path(state_dir)} is in use by another lumbar-node"
                f"{f' (pid {owner})' if owner else ''}; stop it or give this one its own "
                "node.state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the last descriptor releases the flock


def running_node(state_dir: Path) -> str | None:
    """The process id (text, "" when unknown) of the node holding ``state_dir``, or None.

    For ``lumbar-node check``: it tests the lock with a shared, non-blocking ``flock`` and
    lets go at once, so it never writes the lock file and never keeps a node from starting
    (a node starting in that instant would be refused once and say so).
    """
    path = Path(state_dir) / LOCK_FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_owner(fd)
        return None
    finally:
        os.close(fd)  # also drops the shared lock if it was taken


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
