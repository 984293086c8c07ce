"""The node's SQLite index: one file, WAL, synchronous=FULL, one connection per thread.

Each module that keeps state owns its tables and passes its DDL to
:meth:`Database.ensure_schema` at start-up (``CREATE TABLE IF NOT EXISTS ...``), so the
schema of a table lives next to the code that uses it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self.connection()
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
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

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
