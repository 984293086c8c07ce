"""node.spool: durable, atomic, private instance files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from node import spool as spool_module
from node.spool import Spool, safe_component

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_write_is_exact_private_and_leaves_no_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    spool.ensure()
    data = os.urandom(10_000)
    stored = spool.write(STUDY, SERIES, SOP, data)
    assert stored.relative_path == f"spool/{STUDY}/{SERIES}/{SOP}.dcm"
    path = spool.absolute(stored.relative_path)
    assert path.read_bytes() == data
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (spool.state_dir, spool.root, path.parent, path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [f"{SOP}.dcm"]


def test_failed_write_leaves_neither_final_nor_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "state")
    spool.ensure()

    real_fsync = os.fsync

    def broken_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # directories sync fine, the file does not
            raise OSError(5, "simulated I/O error")
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="simulated"):
        spool.write(STUDY, SERIES, SOP, b"x" * 100)
    monkeypatch.undo()
    series_dir = spool.root / STUDY / SERIES
    assert list(series_dir.iterdir()) == []


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    first = spool.write(STUDY, SERIES, SOP, b"first")
    second = spool.write(STUDY, SERIES, SOP, b"second")
    assert first.relative_path == second.relative_path
    assert spool.absolute(second.relative_path).read_bytes() == b"second"


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/../../x", "", "a" * 65, "1.2.\x00"])
def test_unsafe_uids_become_hashed_components(uid: str, tmp_path: Path) -> None:
    component = safe_component(uid)
    assert component.startswith("h-") and "/" not in component and ".." not in component
    spool = Spool(tmp_path / "state")
    stored = spool.write(uid, uid, uid, b"data")
    assert spool.absolute(stored.relative_path).resolve().is_relative_to(spool.root.resolve())


def test_stale_temp_files_are_removed_and_remove_cleans_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    stored = spool.write(STUDY, SERIES, SOP, b"data")
    leftover = spool.absolute(stored.relative_path).parent / ".1.2.3abc.tmp"
    leftover.write_bytes(b"partial")
    assert spool.remove_stale_temp_files() == 1
    assert not leftover.exists()
    spool.remove(stored.relative_path)
    assert not (spool.root / STUDY).exists()
    assert spool.free_mb() > 0


def test_a_series_folder_removed_under_a_write_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention's Spool.remove can rmdir an emptied series folder just after a C-STORE of a
    late instance made sure it exists; the write makes it again instead of failing."""
    spool = Spool(tmp_path / "state")
    spool.ensure()
    first = spool.write(STUDY, SERIES, SOP, b"old")
    ensure = spool_module.ensure_private_dir
    calls: list[Path] = []

    def ensure_then_lose(path: Path) -> None:
        ensure(path)
        calls.append(path)
        if len(calls) == 1:
            spool.remove(first.relative_path)  # the last file goes, and its folders with it
            assert not path.exists()

    monkeypatch.setattr(spool_module, "ensure_private_dir", ensure_then_lose)
    stored = spool.write(STUDY, SERIES, SOP + ".6", b"late")
    assert spool.absolute(stored.relative_path).read_bytes() == b"late" and len(calls) == 2
