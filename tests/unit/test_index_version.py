"""The index carries its layout version: stamped when new, refused when newer than the code."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.cli import main
from node.db import INDEX_VERSION, Database, IndexVersionError, check_index_version


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_new_and_unversioned_indexes_are_stamped(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    db = Database(path)
    db.execute("CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY)")  # as before versions
    db.execute("INSERT INTO instances VALUES ('1.2.3')")
    check_index_version(db)
    check_index_version(db)  # idempotent
    db.close()
    assert _version(path) == INDEX_VERSION
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1  # data untouched
    conn.close()


def test_an_index_of_a_newer_node_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "index.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {INDEX_VERSION + 1}")
    conn.close()
    with pytest.raises(IndexVersionError, match=rf"newer lumbar-node \(layout {INDEX_VERSION + 1}; this one reads up to {INDEX_VERSION}\)"):
        Database(path)  # refused on opening, before anything (WAL included) changes the file
    for command in ("purge", "status"):  # the command line says so in one line
        assert main([command, "--state-dir", str(state)]) == 2, command
        assert f"lumbar-node {command}: error: the index" in capsys.readouterr().err
    assert _version(path) == INDEX_VERSION + 1
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0  # nothing created
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # as the newer node left it
    conn.close()
