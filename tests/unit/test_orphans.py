"""Spool files without an index row are set aside at start-up, reported, and expire."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from series_samples import STUDY, record

from node.commands import status
from node.commands.check import WARN, check_orphans
from node.config import load_config
from node.db import Database
from node.instances import ensure_schema, insert_instance
from node.orphans import count_orphans, orphans_dir, remove_old_orphans, set_aside_orphans
from node.spool import Spool

SERIES = "1.2.826.0.1.3680043.10.1.77"
ODD_SOP = "not a conformant uid \u00e9"  # stored under a hashed file name
DAY = 86400.0


class State:
    """A state directory with an index and a spool, as the receiver leaves them."""

    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.spool = Spool(self.state_dir)
        self.spool.ensure()
        self.db = Database(self.state_dir / "index.sqlite")
        ensure_schema(self.db)

    def receive(self, sop: str, *, indexed: bool = True, series: str = SERIES) -> str:
        """Write the file; index it unless a crash is to come between the two."""
        stored = self.spool.write(STUDY, series, sop, f"DICM {sop}".encode())
        if indexed:
            insert_instance(self.db, replace(record(sop, series=series), path=stored.relative_path))
        return stored.relative_path


def test_only_files_without_a_row_are_moved_with_their_folders(tmp_path: Path) -> None:
    state = State(tmp_path)
    kept = [state.receive(f"{SERIES}.{i}") for i in range(3)] + [state.receive(ODD_SOP)]
    orphan = state.receive(f"{SERIES}.9", indexed=False)
    odd_orphan = state.receive(ODD_SOP + " 2", indexed=False)
    lone = state.receive("1.2.3.4", indexed=False, series="1.2.3")  # its series folder empties
    # the same SOP UID indexed under another series: this file is not the indexed one
    elsewhere = state.spool.write(STUDY, "1.2.3.5", f"{SERIES}.0", b"DICM copy").relative_path
    (state.spool.root / STUDY / SERIES / "notes.txt").write_text("not an instance")

    moved = set_aside_orphans(state.db, state.spool)

    assert moved.files == 4 and moved.bytes > 0
    for rel in kept:
        assert state.spool.absolute(rel).is_file(), rel
    target = orphans_dir(state.state_dir)
    for rel in (orphan, odd_orphan, lone, elsewhere):
        assert not state.spool.absolute(rel).exists(), rel
        assert (target / rel.removeprefix("spool/")).read_bytes().startswith(b"DICM"), rel
    assert not (state.spool.root / STUDY / "1.2.3").exists(), "an emptied series folder stays"
    assert (state.spool.root / STUDY / SERIES / "notes.txt").is_file(), "only instance files are moved"
    assert count_orphans(state.state_dir) == moved
    assert set_aside_orphans(state.db, state.spool).files == 0, "a second sweep finds nothing"


def test_a_lost_index_sets_the_spool_aside_without_deleting_it(tmp_path: Path) -> None:
    state = State(tmp_path)
    files = [state.receive(f"{SERIES}.{i}") for i in range(5)]
    state.db.close()
    os.unlink(state.state_dir / "index.sqlite")  # replaced by hand, restored from an old backup...
    fresh = Database(state.state_dir / "index.sqlite")
    ensure_schema(fresh)
    assert set_aside_orphans(fresh, state.spool).files == 5
    for rel in files:
        assert (orphans_dir(state.state_dir) / rel.removeprefix("spool/")).is_file()


def test_retention_removes_set_aside_files_written_before_the_cutoff_or_stored_again(tmp_path: Path) -> None:
    state = State(tmp_path)
    old = state.receive(f"{SERIES}.1", indexed=False)
    new = state.receive(f"{SERIES}.2", indexed=False)
    long_ago = time.time() - 40 * DAY
    os.utime(state.spool.absolute(old), (long_ago, long_ago))  # the move keeps the write time
    set_aside_orphans(state.db, state.spool)
    target = orphans_dir(state.state_dir)
    resent = state.receive(f"{SERIES}.3", indexed=False)
    set_aside_orphans(state.db, state.spool)
    state.receive(f"{SERIES}.3")  # the sender sent it again: the index holds that copy
    gone = remove_old_orphans(state.db, state.state_dir, time.time() - 30 * DAY)
    assert gone.files == 2
    assert not (target / old.removeprefix("spool/")).exists()
    assert not (target / resent.removeprefix("spool/")).exists()
    assert (target / new.removeprefix("spool/")).is_file()
    assert state.spool.absolute(resent).is_file(), "the indexed copy stays"
    assert remove_old_orphans(state.db, state.state_dir, time.time() + 1).files == 1
    assert list(target.iterdir()) == [], "emptied folders stay"


def test_check_and_status_report_set_aside_files(tmp_path: Path) -> None:
    state = State(tmp_path)
    config = load_config(None, overrides={"node.state_dir": str(state.state_dir)})
    assert check_orphans(config).level == "ok"
    state.receive(f"{SERIES}.1", indexed=False)
    set_aside_orphans(state.db, state.spool)
    finding = check_orphans(config)
    assert finding.level == WARN and "1 file(s)" in finding.detail and "lumbar-node push" in finding.detail
    shown = status.collect(config)
    assert shown["storage"]["set_aside_files"] == 1
    assert "set aside: 1 spool files without index rows" in status.render_text(shown)


def test_a_spool_on_another_file_system_is_copied_then_unlinked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = State(tmp_path)
    orphan = state.receive(f"{SERIES}.9", indexed=False)
    data = state.spool.absolute(orphan).read_bytes()

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", cross_device)
    monkeypatch.setattr("node.orphans.write_durably", _plain_write)  # its own rename would fail too
    assert set_aside_orphans(state.db, state.spool).files == 1
    assert not state.spool.absolute(orphan).exists()
    assert (orphans_dir(state.state_dir) / orphan.removeprefix("spool/")).read_bytes() == data


def _plain_write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
