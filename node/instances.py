"""The ``instances`` table and the header summary kept for every received instance.

The receiver writes one row per SOP Instance UID (the first copy wins: a second copy of
the same UID is answered with success and not stored again). ``meta`` is a JSON summary
of the header, extracted at receipt without decoding pixel data, that series assembly
and routing use instead of re-reading files:

=========================  =================================================================
key                        value
=========================  =================================================================
ImageOrientationPatient    6 floats (row then column direction cosines) or null
ImagePositionPatient       3 floats (mm, LPS) or null
PixelSpacing               2 floats (row, column spacing in mm) or null
SliceThickness             float (mm) or null
EchoNumbers, EchoTime      first echo number (int), echo time (ms) or null
AcquisitionNumber, SeriesNumber, InstanceNumber, Rows, Columns, NumberOfFrames,
BitsAllocated              int or null
BodyPartExamined, SeriesDescription, ProtocolName, StudyDescription, Manufacturer
                           str or null
ImageType                  list of str
frames                     enhanced (multi-frame) images only: one object per frame,
                           ``{"iop": [6], "ipp": [3], "echo": EffectiveEchoTime ms,
                           "stack_id": str, "in_stack_position": int}`` from the
                           Shared/Per-Frame Functional Groups (PS3.3 C.7.6.16)
=========================  =================================================================

For enhanced images the top-level ``PixelSpacing``, ``SliceThickness`` and
``ImageOrientationPatient`` fall back to the Shared Functional Groups when absent at the top
level. No patient-identifying attribute is ever copied into ``meta``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.db import Database

logger = logging.getLogger(__name__)

INSTANCES_DDL = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    sha256              TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    calling_ae          TEXT,
    peer_address        TEXT,
    received_at         REAL NOT NULL,
    modality            TEXT,
    meta                TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE INDEX IF NOT EXISTS instances_received ON instances (received_at);
"""

_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "transfer_syntax_uid",
    "path",
    "sha256",
    "size_bytes",
    "calling_ae",
    "peer_address",
    "received_at",
    "modality",
    "meta",
)
#: the C-STORE handler's one write, built once
_INSERT_SQL = (
    f"INSERT OR IGNORE INTO instances ({','.join(_COLUMNS)}) "  # noqa: S608 - fixed column names
    f"VALUES ({','.join('?' for _ in _COLUMNS)})"
)

_INT_KEYS = (
    "AcquisitionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
)
_STR_KEYS = (
    "BodyPartExamined",
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "Manufacturer",
)


@dataclass(frozen=True)
class InstanceRecord:
    """One row of ``instances``, with ``meta`` parsed (see the module docstring).

    ``path`` is relative to the state directory; ``received_at`` is a Unix time (s).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str
    sha256: str
    size_bytes: int
    calling_ae: str | None
    peer_address: str | None
    received_at: float
    modality: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_orientation(self) -> list[float] | None:
        """ImageOrientationPatient (6 direction cosines) or None."""
        value = self.meta.get("ImageOrientationPatient")
        return list(value) if value is not None else None

    @property
    def image_position(self) -> list[float] | None:
        """ImagePositionPatient (mm) or None."""
        value = self.meta.get("ImagePositionPatient")
        return list(value) if value is not None else None

    @property
    def pixel_spacing(self) -> list[float] | None:
        """PixelSpacing (row, column) in mm, or None."""
        value = self.meta.get("PixelSpacing")
        return list(value) if value is not None else None

    @property
    def echo_number(self) -> int | None:
        """First EchoNumbers value, or None."""
        value = self.meta.get("EchoNumbers")
        return int(value) if value is not None else None

    @property
    def number_of_frames(self) -> int:
        """NumberOfFrames (1 for single-frame images)."""
        value = self.meta.get("NumberOfFrames")
        return int(value) if value else 1

    @property
    def frames(self) -> list[dict[str, Any]]:
        """Per-frame geometry of an enhanced image (empty for single-frame images)."""
        return list(self.meta.get("frames") or [])

    def to_row(self) -> tuple[object, ...]:
        """Column values in table order (``meta`` as JSON text)."""
        values = [getattr(self, c) for c in _COLUMNS[:-1]]
        return (*values, json.dumps(self.meta, separators=(",", ":"), allow_nan=False))


#: the name the series assembly code uses for a stored row
InstanceRow = InstanceRecord


def ensure_schema(db: Database) -> None:
    """Create the ``instances`` table and its indexes if needed."""
    db.ensure_schema(INSTANCES_DDL)


# -- header summary --------------------------------------------------------------------


def _floats(value: object, count: int) -> list[float] | None:
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        floats = [float(v) for v in items]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if len(floats) != count or not all(math.isfinite(f) for f in floats):
        return None
    return floats


def _float(value: object) -> float | None:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: object) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _str(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _get(ds: Dataset, keyword: str) -> object:
    """A top-level value, or None when absent or unreadable."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        logger.debug("cannot read %s: %s", keyword, exc)
        return None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = _get(ds, keyword)
    if isinstance(seq, Sequence) and len(seq) > 0 and isinstance(seq[0], Dataset):
        return seq[0]
    return None


def _frame_value(
    frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str
) -> object:
    for group in (frame, shared):
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return _get(item, keyword)
    return None


def _frames(ds: Dataset) -> list[dict[str, Any]] | None:
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if not isinstance(per_frame, Sequence) or len(per_frame) == 0:
        return None
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    frames: list[dict[str, Any]] = []
    for frame in per_frame:
        frames.append(
            {
                "iop": _floats(
                    _frame_value(
                        frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
                    ),
                    6,
                ),
                "ipp": _floats(
                    _frame_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                "echo": _float(_frame_value(frame, shared, "MREchoSequence", "EffectiveEchoTime")),
                "stack_id": _str(_frame_value(frame, shared, "FrameContentSequence", "StackID")),
                "in_stack_position": _int(
                    _frame_value(frame, shared, "FrameContentSequence", "InStackPositionNumber")
                ),
            }
        )
    return frames


def summarize(ds: Dataset) -> dict[str, Any]:
    """The ``meta`` summary of a header (see the module docstring); never raises on bad values."""
    meta: dict[str, Any] = {
        "ImageOrientationPatient": _floats(_get(ds, "ImageOrientationPatient"), 6),
        "ImagePositionPatient": _floats(_get(ds, "ImagePositionPatient"), 3),
        "PixelSpacing": _floats(_get(ds, "PixelSpacing"), 2),
        "SliceThickness": _float(_get(ds, "SliceThickness")),
        "EchoNumbers": _int(_get(ds, "EchoNumbers")),
        "EchoTime": _float(_get(ds, "EchoTime")),
    }
    for key in _INT_KEYS:
        meta[key] = _int(_get(ds, key))
    for key in _STR_KEYS:
        meta[key] = _str(_get(ds, key))
    image_type = _get(ds, "ImageType")
    if isinstance(image_type, MultiValue | list | tuple):
        meta["ImageType"] = [str(v) for v in image_type]
    elif image_type:
        meta["ImageType"] = [str(image_type)]
    else:
        meta["ImageType"] = []
    frames = _frames(ds)
    if frames is not None:
        meta["frames"] = frames
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        first = _first_item(ds, "PerFrameFunctionalGroupsSequence")
        if meta["PixelSpacing"] is None:
            meta["PixelSpacing"] = _floats(
                _frame_value(first, shared, "PixelMeasuresSequence", "PixelSpacing"), 2
            )
        if meta["SliceThickness"] is None:
            meta["SliceThickness"] = _float(
                _frame_value(first, shared, "PixelMeasuresSequence", "SliceThickness")
            )
        if meta["ImageOrientationPatient"] is None:
            meta["ImageOrientationPatient"] = frames[0]["iop"]
    return meta


# -- table access ----------------------------------------------------------------------


def _record(row: Any) -> InstanceRecord:
    values = {c: row[c] for c in _COLUMNS}
    values["meta"] = json.loads(values["meta"] or "{}")
    return InstanceRecord(**values)


def insert_instance(db: Database, record: InstanceRecord) -> bool:
    """Index ``record`` durably (committed together with concurrent receivers' rows:
    :meth:`~node.db.Database.write_grouped`); False if the UID was already there."""
    row = record.to_row()
    return db.write_grouped(lambda conn: conn.execute(_INSERT_SQL, row).rowcount == 1)


def get_instance(db: Database, sop_instance_uid: str) -> InstanceRecord | None:
    """The row of one SOP Instance UID, or None."""
    row = db.execute(
        f"SELECT {','.join(_COLUMNS)} FROM instances WHERE sop_instance_uid = ?",  # noqa: S608
        (sop_instance_uid,),
    ).fetchone()
    return _record(row) if row is not None else None


def instance_exists(db: Database, sop_instance_uid: str) -> bool:
    """True when the SOP Instance UID is indexed."""
    row = db.execute(
        "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
    ).fetchone()
    return row is not None


def instances_of_series(db: Database, series_instance_uid: str) -> list[InstanceRecord]:
    """Every indexed instance of a series, oldest receipt first."""
    rows = db.execute(
        f"SELECT {','.join(_COLUMNS)} FROM instances WHERE series_instance_uid = ? "  # noqa: S608
        "ORDER BY received_at, sop_instance_uid",
        (series_instance_uid,),
    ).fetchall()
    return [_record(r) for r in rows]


def count_series_instances(db: Database, series_instance_uid: str) -> int:
    """How many instances of a series are indexed."""
    row = db.execute(
        "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", (series_instance_uid,)
    ).fetchone()
    return int(row[0])


@dataclass(frozen=True)
class SeriesActivity:
    """Per-series receipt summary (for re-arming quiet-period timers at start-up)."""

    study_instance_uid: str
    series_instance_uid: str
    instance_count: int
    first_received_at: float
    last_received_at: float
    calling_ae: str | None


def series_activity(db: Database, since: float = 0.0) -> list[SeriesActivity]:
    """Every series with an instance received at or after ``since`` (Unix s), newest last."""
    rows = db.execute(
        "SELECT study_instance_uid, series_instance_uid, COUNT(*) AS n, "
        "MIN(received_at) AS first_at, MAX(received_at) AS last_at, MAX(calling_ae) AS ae "
        "FROM instances GROUP BY study_instance_uid, series_instance_uid "
        "HAVING MAX(received_at) >= ? ORDER BY last_at",
        (since,),
    ).fetchall()
    return [SeriesActivity(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), r[5]) for r in rows]


def delete_instances(db: Database, sop_instance_uids: Sequence[str]) -> int:
    """Remove index rows (not files: see :meth:`node.spool.Spool.remove`); return the count."""
    with db.transaction() as conn:
        count = 0
        for uid in sop_instance_uids:
            count += conn.execute(
                "DELETE FROM instances WHERE sop_instance_uid = ?", (uid,)
            ).rowcount
        return count
