"""The node's SQLite index: one file, WAL, synchronous=FULL, one connection per thread.

Each module that keeps state owns its tables and passes its DDL to
:meth:`Database.ensure_schema` at start-up (``CREATE TABLE IF NOT EXISTS ...``), so the
schema of a table lives next to the code that uses it.

Writers of one process queue on a lock of their own instead of on SQLite's: a connection
that finds the database locked sleeps in SQLite's busy handler (1, 2, 5 ... 100 ms steps)
and is not woken when the lock frees, which gave 8 concurrent C-STORE handlers a p99 of
200-450 ms for a 2.5 ms store. Small writes that many threads make at once (the receiver's
index rows) share one transaction and one fsync (:meth:`Database.write_grouped`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from node.errors import NodeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Layout of the index this code reads and writes, kept in SQLite's ``PRAGMA user_version``.
#: Raise it with every change to a table, and teach :func:`check_index_version` the step
#: from the layout before (indexes of every earlier release must keep opening).
INDEX_VERSION = 1


class IndexVersionError(NodeError):
    """The index was written by a newer lumbar-node than this one."""


@dataclass
class _Write(Generic[T]):
    """One caller's work in a grouped transaction, and what came of it."""

    work: Callable[[sqlite3.Connection], T]
    result: T | None = None
    error: BaseException | None = None
    done: bool = False


class Database:
    """Thread-safe access to the index file.

    Every thread gets its own connection (SQLite connections must not be shared across
    threads). Writes go through :meth:`transaction`, which takes the write lock at the
    start (``BEGIN IMMEDIATE``) so concurrent writers queue instead of failing late.
    With ``synchronous=FULL`` in WAL mode a committed transaction is on disk when
    :meth:`transaction` returns: the receiver relies on this before acknowledging.
    """

    def __init__(self, path: Path | str, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: held by this process's writer for a whole transaction (see the module docstring)
        self._write_lock = threading.RLock()
        self._queue_lock = threading.Lock()
        self._queued: list[_Write[Any]] = []
        #: transactions :meth:`write_grouped` committed, and the writes they held
        self.grouped_transactions = 0
        self.grouped_writes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self.connection()
        _refuse_newer_layout(self)  # before WAL changes the file a newer node wrote
        conn.execute("PRAGMA journal_mode=WAL")

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (created on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_ms / 1000.0,
                isolation_level=None,  # explicit BEGIN/COMMIT only
                check_same_thread=True,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed (durably) on normal exit, rolled back on error."""
        conn = self.connection()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def write_grouped(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(conn)`` in a write transaction shared with concurrent callers.

        Group commit: the caller that gets the write lock commits every write queued by
        then in one transaction (one fsync), each inside its own savepoint, so a write that
        raises is rolled back alone and its caller gets the exception. Returns ``work``'s
        result once the transaction holding it is durable; a failed commit (disk full, I/O
        error) raises in every caller whose write it held. ``work`` runs on whichever
        thread commits: it must use only the connection it is given.
        """
        write: _Write[T] = _Write(work)
        with self._queue_lock:
            self._queued.append(write)
        with self._write_lock:
            if not write.done:
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._commit(batch)
        if write.error is not None:
            raise write.error
        return write.result  # type: ignore[return-value]

    def _commit(self, batch: list[_Write[Any]]) -> None:
        conn = self.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                conn.execute("SAVEPOINT grouped_write")
                try:
                    write.result = write.work(conn)
                except Exception as exc:  # noqa: BLE001 - handed to the write's own caller
                    write.error = exc
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (disk full, I/O error):
                        # the cause is every write's, so that each caller cleans up as its own
                        raise
                    conn.execute("ROLLBACK TO grouped_write")
                conn.execute("RELEASE grouped_write")
            conn.execute("COMMIT")
        except BaseException as exc:
            for write in batch:  # nothing of the batch is committed: no caller may see success
                if write.error is None:
                    write.result, write.error = None, exc
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback of a failed grouped transaction failed")
            if not isinstance(exc, Exception):
                raise
        finally:
            for write in batch:
                write.done = True
            self.grouped_transactions += 1
            self.grouped_writes += len(batch)

    def execute(
        self, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> sqlite3.Cursor:
        """Run one statement on this thread's connection (autocommit for writes)."""
        return self.connection().execute(sql, params)

    def ensure_schema(self, ddl: str) -> None:
        """Create the tables and indexes in ``ddl`` if they do not exist yet."""
        self.connection().executescript(ddl)

    def close(self) -> None:
        """Close every connection this object opened (call once, at shutdown)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.ProgrammingError:
                # A connection made in another thread cannot be closed from here;
                # it is released when that thread ends.
                continue
        self._local = threading.local()


def check_index_version(db: Database, *, stamp: bool = True) -> None:
    """Refuse an index of a newer layout; bring an older one to :data:`INDEX_VERSION`.

    Why: an index opened by an older node after an upgrade (a rollback) would be read with
    the wrong idea of its tables; refusing names the problem before anything is written.
    Layout 0 is a new file, or one written before layouts were numbered (the same tables as
    layout 1): it is stamped, unless ``stamp`` is False (a read-only reader: ``status``).
    Call it before any ``ensure_schema``.
    """
    found = _refuse_newer_layout(db)
    if found < INDEX_VERSION and stamp:
        with db.transaction() as conn:
            conn.execute(f"PRAGMA user_version = {INDEX_VERSION}")
        if found:
            logger.info("index %s: layout %d -> %d", db.path, found, INDEX_VERSION)


def _refuse_newer_layout(db: Database) -> int:
    """The index's layout; :class:`IndexVersionError` when a newer node wrote it."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > INDEX_VERSION:
        db.close()
        raise IndexVersionError(
            f"the index {db.path} was written by a newer lumbar-node (layout {found}; this one "
            f"reads up to {INDEX_VERSION}): run that version, or restore the state directory "
            "from before the upgrade"
        )
    return found
