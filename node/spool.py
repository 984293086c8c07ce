"""Durable instance files: write to a temp file, fsync, rename, fsync the directory.

Layout: ``<state_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A UID that is not a conformant DICOM UID (digits and dots, at most 64 characters) is
replaced by ``h-<sha256 prefix>`` so that no received value can name a path outside the
spool. Directories are created with mode 0700, files with 0600.

When :meth:`Spool.write` returns, the bytes and the directory entry are on stable
storage: a crash afterwards leaves either no file or the complete file, never a partial
one under its final name. Temp files (``.*.tmp``) left by a crash are removed by
:meth:`Spool.remove_stale_temp_files` at start-up; complete files a crash left without
an index row are set aside by :func:`node.orphans.set_aside_orphans`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: a conformant UID: digit groups separated by dots, at most 64 characters (PS3.5 9.1)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LEN = 64
DIR_MODE = 0o700
FILE_MODE = 0o600
TEMP_SUFFIX = ".tmp"
FILE_SUFFIX = ".dcm"
BYTES_PER_MB = 1024 * 1024
SPOOL_DIR_NAME = "spool"


@dataclass(frozen=True)
class StoredFile:
    """A file written durably to the spool.

    Attributes
    ----------
    relative_path
        Path relative to the state directory (``spool/<study>/<series>/<sop>.dcm``).
    sha256
        Hex SHA-256 of the bytes.
    size_bytes
        Length of the file in bytes.
    """

    relative_path: str
    sha256: str
    size_bytes: int


def is_conformant_uid(uid: str) -> bool:
    """Digits and dots, at most 64 characters: usable as a path component as it is."""
    return bool(uid) and len(uid) <= UID_MAX_LEN and _UID_RE.match(uid) is not None


def safe_component(uid: str) -> str:
    """A path component for ``uid``: the UID itself when conformant, else a hash of it."""
    uid = uid.strip().rstrip("\x00")
    if is_conformant_uid(uid):
        return uid
    return "h-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created/renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700 and make each new entry durable."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # created concurrently by another association
        fsync_dir(directory.parent)


class Spool:
    """The instance file store under ``<state_dir>/spool``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / SPOOL_DIR_NAME

    def ensure(self) -> None:
        """Create the state and spool directories (0700) if needed."""
        ensure_private_dir(self.root)
        os.chmod(self.state_dir, DIR_MODE)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where an instance lives, relative to the state directory."""
        return "/".join(
            (
                SPOOL_DIR_NAME,
                safe_component(study_uid),
                safe_component(series_uid),
                safe_component(sop_uid) + FILE_SUFFIX,
            )
        )

    def absolute(self, relative_path: str) -> Path:
        """The absolute path of a stored relative path."""
        return self.state_dir / relative_path

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Store ``data`` durably under its final name and return where and what.

        An existing file of the same name is replaced atomically (the index decides
        whether an instance is new; a file without an index row is a crash leftover).
        """
        rel = self.relative_path(study_uid, series_uid, sop_uid)
        digest = hashlib.sha256(data).hexdigest()
        write_durably(self.absolute(rel), data)
        return StoredFile(relative_path=rel, sha256=digest, size_bytes=len(data))

    def read_checked(self, relative_path: str, sha256: str, size_bytes: int) -> tuple[bytes | None, str | None]:
        """``(bytes, None)`` when the file holds the bytes indexed at receipt, else ``(None, what differs)``.

        Why: the index's digest is what the node acknowledged; a file that no longer matches
        it (disk fault, a hand edit, another program) must fail its series visibly rather
        than be analysed as if it were the image that was sent. The bytes are returned so
        that the reader parses what it checked, without reading the file twice.
        """
        try:
            data = self.absolute(relative_path).read_bytes()
        except OSError as exc:
            return None, f"{relative_path}: {exc.strerror or exc}"
        if len(data) != size_bytes or hashlib.sha256(data).hexdigest() != sha256:
            return None, f"{relative_path}: {len(data)} bytes on disk, {size_bytes} received, SHA-256 differs"
        return data, None

    def remove(self, relative_path: str) -> None:
        """Delete a stored file (missing is fine) and empty parent directories."""
        path = self.absolute(relative_path)
        path.unlink(missing_ok=True)
        for parent in (path.parent, path.parent.parent):
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a crash left behind; return how many."""
        count = 0
        if not self.root.is_dir():
            return 0
        for tmp in self.root.rglob("*" + TEMP_SUFFIX):
            if tmp.name.startswith("."):
                tmp.unlink(missing_ok=True)
                count += 1
        if count:
            logger.info("removed %d incomplete temp files from the spool", count)
        return count

    def free_mb(self) -> float:
        """Free space (MB) available to this process on the spool's file system."""
        target = self.root if self.root.exists() else self.state_dir
        while not target.exists():
            target = target.parent
        return shutil.disk_usage(target).free / BYTES_PER_MB


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temp file, fsync, rename over, fsync the directory.

    After it returns the bytes survive a crash or power loss under their final name; a
    crash before that leaves at most a temp file (``TEMP_SUFFIX``) that start-up removes.
    Used for received instances (spool) and result instances (outbox) alike.
    """
    directory = path.parent
    ensure_private_dir(directory)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix="." + path.stem, suffix=TEMP_SUFFIX, dir=directory)
    except FileNotFoundError:
        # an emptied series folder removed between the two calls (``Spool.remove``, run by
        # retention): make it again; once the temp file is in it, no rmdir can take it
        ensure_private_dir(directory)
        fd, tmp_name = tempfile.mkstemp(prefix="." + path.stem, suffix=TEMP_SUFFIX, dir=directory)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
