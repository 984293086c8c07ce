"""Spool files without an index row: set aside at start-up, visible, and removed by retention.

Why: a received instance is acknowledged only once its file is durable *and* its index row
is committed (:meth:`node.receiver.Receiver.store`). A crash between the two leaves a
complete file that no sender was told is stored (the sender sends it again, or not); a crash
during retention, between its transaction and the file removals, leaves files whose rows
are gone. Nothing reads such files again, so without a sweep they fill the disk over months
unseen. They are *moved* (never deleted) to ``<state_dir>/orphans/<study>/<series>/``: an
index lost or replaced by hand would otherwise make the sweep delete every image, and a
moved file can be sent back into the node (``lumbar-node push``). Retention removes them
``[retention] keep_days`` after they were written, or as soon as their SOP Instance UID is
indexed again (the sender sent it again); ``lumbar-node check`` reports them.

The sweep runs before the DICOM port opens, so no C-STORE can be between its file and its
row while the spool is read.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from node.db import Database
from node.instances import instance_exists
from node.spool import (
    FILE_SUFFIX,
    SPOOL_DIR_NAME,
    Spool,
    ensure_private_dir,
    is_conformant_uid,
    write_durably,
)

logger = logging.getLogger(__name__)

ORPHANS_DIR_NAME = "orphans"
#: the sweep logs each file it moves up to this many, then a count
LOGGED_FILES = 20


@dataclass(frozen=True)
class OrphanFiles:
    """How many files (and bytes) are, or were just, set aside."""

    files: int = 0
    bytes: int = 0


def orphans_dir(state_dir: Path) -> Path:
    """Where set-aside files live: ``<state_dir>/orphans``."""
    return Path(state_dir) / ORPHANS_DIR_NAME


def _spool_files(spool: Spool) -> Iterator[str]:
    """Relative paths (``spool/<study>/<series>/<sop>.dcm``) of every instance file.

    Each folder is listed whole before the caller moves anything out of it.
    """
    for study in _entries(spool.root, directories=True):
        for series in _entries(spool.root / study, directories=True):
            for name in _entries(spool.root / study / series, directories=False):
                if name.endswith(FILE_SUFFIX) and not name.startswith("."):
                    yield f"{SPOOL_DIR_NAME}/{study}/{series}/{name}"


def _entries(folder: Path, *, directories: bool) -> list[str]:
    """Names of the sub-folders (or plain files) of ``folder``; none when it is gone."""
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if (e.is_dir if directories else e.is_file)(follow_symlinks=False)]
    except FileNotFoundError:
        return []


class _IndexedPaths:
    """Is a spool path the path of an indexed instance?

    The file name is the SOP Instance UID for every conformant UID, so one primary-key
    look-up answers for almost every file. Any other file (a hashed name, or no row under
    that UID) is checked against every indexed path, read once when first needed: a file is
    set aside only when no row names it.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._paths: set[str] | None = None

    def __contains__(self, relative_path: str) -> bool:
        stem = relative_path.rsplit("/", 1)[1][: -len(FILE_SUFFIX)]
        if is_conformant_uid(stem):
            row = self.db.execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (stem,)).fetchone()
            if row is not None and str(row[0]) == relative_path:
                return True
        if self._paths is None:
            self._paths = {str(r[0]) for r in self.db.execute("SELECT path FROM instances")}
        return relative_path in self._paths


def set_aside_orphans(db: Database, spool: Spool) -> OrphanFiles:
    """Move every spool file without an index row to ``orphans/``; what was moved.

    Call before the receiver starts (module docstring). Emptied series and study folders
    are removed.
    """
    indexed = _IndexedPaths(db)
    target_root = orphans_dir(spool.state_dir)
    files = size = 0
    for rel in _spool_files(spool):
        if rel in indexed:
            continue
        source = spool.absolute(rel)
        target = target_root / rel.split("/", 1)[1]
        ensure_private_dir(target.parent)
        size += source.stat().st_size
        _move(source, target)
        files += 1
        if files <= LOGGED_FILES:
            logger.warning("spool file without an index row set aside: %s -> %s", rel, target)
        spool.remove(rel)  # only the emptied folders: the file is gone already
    if files:
        logger.warning(
            "set aside %d spool files (%.1f MB) without index rows in %s: instances a crash left"
            " unacknowledged, or retention did not finish removing; send them again with"
            " 'lumbar-node push %s --to AE@host:port' or leave them to retention",
            files,
            size / 1e6,
            target_root,
            target_root,
        )
    return OrphanFiles(files, size)


def _move(source: Path, target: Path) -> None:
    """Rename (the bytes do not move); a spool on another file system (a symlink) is copied
    durably first, then unlinked."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_durably(target, source.read_bytes())
        source.unlink()


def count_orphans(state_dir: Path) -> OrphanFiles:
    """The files now set aside (for ``check`` and ``status``)."""
    files = size = 0
    for path in _files_under(orphans_dir(state_dir)):
        files += 1
        size += path.stat().st_size
    return OrphanFiles(files, size)


def remove_old_orphans(db: Database, state_dir: Path, cutoff: float) -> OrphanFiles:
    """Delete set-aside files written before ``cutoff`` (a Unix time), and those whose SOP
    Instance UID is indexed again (the sender sent it again: the index holds the copy it
    was told is stored); what went."""
    root = orphans_dir(state_dir)
    files = size = 0
    for path in _files_under(root):
        stat = path.stat()
        stem = path.name.removesuffix(FILE_SUFFIX)
        stored_again = is_conformant_uid(stem) and instance_exists(db, stem)
        if stat.st_mtime >= cutoff and not stored_again:
            continue
        path.unlink()
        files += 1
        size += stat.st_size
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root):
                break
            try:
                parent.rmdir()
            except OSError:
                break
    return OrphanFiles(files, size)


def _files_under(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for folder, _dirs, names in os.walk(root):
        for name in names:
            yield Path(folder) / name

