"""node.db: writers queue in-process, and concurrent small writes share one durable commit."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from node.db import Database

DDL = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "index.sqlite3")
    database.ensure_schema(DDL)
    return database


def _insert(key: str, value: object) -> object:
    return lambda conn: conn.execute("INSERT OR IGNORE INTO t VALUES (?, ?)", (key, value)).rowcount == 1


def _rows(path: Path) -> dict[str, int]:
    """What another connection (another process, after a crash) reads from the file."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT k, v FROM t").fetchall())
    finally:
        conn.close()


def _queue_while_locked(db: Database, works: dict[str, object]) -> dict[str, object]:
    """Queue every work from its own thread while the write lock is held, so that all of them
    wait for one commit; return each caller's result or exception."""
    outcomes: dict[str, object] = {}
    with db.transaction():  # holds the write lock: every writer below has to queue
        threads = []
        for name, work in works.items():

            def call(name: str = name, work: object = work) -> None:
                try:
                    outcomes[name] = db.write_grouped(work)  # type: ignore[arg-type]
                except Exception as exc:  # noqa: BLE001 - what the caller would see
                    outcomes[name] = exc

            threads.append(threading.Thread(target=call))
            threads[-1].start()
        deadline = time.monotonic() + 5.0
        while len(db._queued) < len(works) and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.005)
        assert len(db._queued) == len(works)  # noqa: SLF001
    for thread in threads:
        thread.join(timeout=10.0)
    return outcomes


def test_a_grouped_write_is_committed_when_it_returns(db: Database) -> None:
    assert db.write_grouped(_insert("a", 1)) is True
    assert db.write_grouped(_insert("a", 2)) is False  # INSERT OR IGNORE: already there
    assert _rows(db.path) == {"a": 1}
    assert (db.grouped_transactions, db.grouped_writes) == (2, 2)


def test_queued_writes_share_one_transaction(db: Database) -> None:
    before = db.grouped_transactions
    outcomes = _queue_while_locked(db, {f"k{i}": _insert(f"k{i}", i) for i in range(6)})
    assert outcomes == {f"k{i}": True for i in range(6)}
    assert db.grouped_transactions == before + 1
    assert _rows(db.path) == {f"k{i}": i for i in range(6)}


def test_a_failing_write_is_rolled_back_alone_and_raises_in_its_own_caller(db: Database) -> None:
    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('half', 1)")
        conn.execute("INSERT INTO t VALUES ('bad', NULL)")  # NOT NULL

    outcomes = _queue_while_locked(db, {"x": _insert("x", 1), "bad": half_then_fail, "y": _insert("y", 2)})
    assert outcomes["x"] is True and outcomes["y"] is True
    assert isinstance(outcomes["bad"], sqlite3.IntegrityError)
    assert _rows(db.path) == {"x": 1, "y": 2}  # nothing of the failed write, not even its first row


def test_a_write_that_ends_the_transaction_fails_the_whole_batch_with_its_cause(db: Database) -> None:
    """SQLite rolls the whole transaction back on some errors (disk full, I/O error): every
    write of the batch failed for that cause, and each caller must see it (the receiver
    removes its file and answers out-of-resources only for a full disk)."""

    def disk_full(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('full', 1)")
        conn.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL
        raise sqlite3.OperationalError("database or disk is full")

    outcomes = _queue_while_locked(db, {"x": _insert("x", 1), "full": disk_full, "y": _insert("y", 2)})
    assert all(isinstance(o, sqlite3.OperationalError) and "disk is full" in str(o) for o in outcomes.values()), outcomes
    assert _rows(db.path) == {}
    assert db.write_grouped(_insert("z", 1)) is True  # the connection is usable again


def test_a_failed_commit_raises_in_every_caller_and_stores_nothing(db: Database) -> None:
    outside = sqlite3.connect(db.path, timeout=0.05)
    outside.execute("BEGIN EXCLUSIVE")  # another process holds the database
    db_fast = Database(db.path, busy_timeout_ms=50)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            db_fast.write_grouped(_insert("z", 1))
    finally:
        outside.execute("ROLLBACK")
        outside.close()
    assert _rows(db.path) == {}
    assert db_fast.write_grouped(_insert("z", 1)) is True  # and the next write goes through
    db_fast.close()


def test_concurrent_writers_lose_nothing(db: Database) -> None:
    def writer(t: int) -> None:
        for i in range(25):
            assert db.write_grouped(_insert(f"{t}-{i}", i)) is True

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_rows(db.path)) == 200
    assert db.grouped_writes == 200 and db.grouped_transactions <= 200
