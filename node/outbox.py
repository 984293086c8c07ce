"""Durable outbox: result instances on disk and one delivery row per (instance, destination).

Every encoded result (SEG, SR, overlay) is written to ``<state_dir>/outbox/<series>/<sop>.dcm``
(temp file, fsync, rename, fsync directory) *before* anything tries to send it, and the
``deliveries`` rows for it are written in one transaction afterwards. A crash before the
transaction leaves a file and no rows: the job's export stage runs again and re-adds the
same (deterministic) UIDs, which replaces the file. A crash after it leaves rows that
:class:`node.export.Exporter` works through.

Delivery states (one row per result SOP instance and destination)::

    held ──release_held──> pending ──claim──> sending ──> done
                              ^                  │
                              │                  ├──> failed (transient; next_attempt_at set)
                              └──── requeue ─────┴──> dead   (permanent, or horizon passed)

``held`` is shadow mode: the result is kept locally and shown by ``status`` but not sent.
``failed`` rows are retried at ``next_attempt_at``; ``pending`` and due ``failed`` rows are
what the exporter claims. ``sending`` rows found at start-up were interrupted by a crash and
go back to ``pending`` (:func:`recover_sending`); a peer that already received the instance
then receives the same SOP Instance UID again, which a PACS treats as the same object.

Re-adding an instance (re-analysis with deterministic UIDs) resets its rows and bumps
``generation``; the exporter only records an outcome for the generation it claimed, so a
decision about an older file never overwrites the state of a newer one.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.config import Destination, NodeConfig
from node.db import Database
from node.spool import safe_component, write_durably

logger = logging.getLogger(__name__)

#: how many dead letters :func:`delivery_summary` lists
DEAD_LETTERS_LISTED = 20


class Kind(StrEnum):
    """What a result instance is; destinations choose the kinds they receive."""

    SEG = "seg"
    SR = "sr"
    OVERLAY = "overlay"


class State(StrEnum):
    """Delivery state of one (instance, destination) row."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    HELD = "held"


#: SOP Class UID -> kind; the exporter negotiates exactly these classes
KIND_BY_SOP_CLASS: dict[str, Kind] = {
    "1.2.840.10008.5.1.4.1.1.66.4": Kind.SEG,  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.34": Kind.SR,  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.88.33": Kind.SR,  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.7": Kind.OVERLAY,  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4": Kind.OVERLAY,  # Multi-frame True Color SC Image Storage
}

#: the SOP class the node's encoders write for each kind (``node.encode``): what a
#: destination must accept (``lumbar-node check``); the other classes above are negotiated
#: too but not written by this version
PRODUCED_SOP_CLASS: dict[Kind, str] = {
    Kind.SEG: "1.2.840.10008.5.1.4.1.1.66.4",
    Kind.SR: "1.2.840.10008.5.1.4.1.1.88.34",
    Kind.OVERLAY: "1.2.840.10008.5.1.4.1.1.7",
}

DDL = f"""
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k.value) for k in Kind)})),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s.value) for s in State)})),
    attempts INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1,
    queued_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    done_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_series ON deliveries (series_uid);
"""


def kind_of(ds: Dataset) -> Kind:
    """The result kind of ``ds`` from its SOP Class UID.

    Raises
    ------
    ValueError
        The SOP class is not one the node writes (and negotiates for export).
    """
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    try:
        return KIND_BY_SOP_CLASS[sop_class]
    except KeyError:
        raise ValueError(
            f"SOP class {sop_class!r} is not a result class the node exports"
        ) from None


def wants(destination: Destination, kind: Kind, config: NodeConfig) -> bool:
    """Whether ``destination`` receives results of ``kind`` (kinds list + overlay switches)."""
    if kind.value not in destination.kinds:
        return False
    if kind is Kind.OVERLAY and not (config.export.overlay and destination.overlay):
        return False
    return True


def is_shadow(destination: Destination, config: NodeConfig) -> bool:
    """Shadow mode for ``destination``: global ``export.shadow`` or its own ``shadow``."""
    return config.export.shadow or destination.shadow


def ensure_schema(db: Database) -> None:
    """Create the ``deliveries`` table and its indexes if needed."""
    db.ensure_schema(DDL)


@dataclass(frozen=True)
class OutboxItem:
    """One result instance written to the outbox.

    Attributes
    ----------
    sop_instance_uid, sop_class_uid, kind
        What was written.
    path
        File path relative to the state directory.
    destinations
        Names of the destinations a delivery row was created (or reset) for.
    held
        The subset of ``destinations`` whose rows are ``held`` (shadow mode).
    """

    sop_instance_uid: str
    sop_class_uid: str
    kind: Kind
    path: str
    destinations: tuple[str, ...]
    held: tuple[str, ...]


def series_folder(config: NodeConfig, series_uid: str) -> Path:
    """The folder holding every result file of the analysed series ``series_uid``."""
    return config.outbox_dir / safe_component(series_uid)


def encode_file(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble + file meta), explicit VR LE unless set."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        ds.file_meta = meta if meta is not None else pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class Outbox:
    """Writes result instances durably and creates their delivery rows.

    Parameters
    ----------
    db
        The node's index; the ``deliveries`` table is created if missing.
    config
        Destinations, shadow and overlay switches, and the state directory.
    clock
        Seconds since the epoch (injectable for tests).
    on_added
        Called after rows were committed (the exporter's ``wake``), so delivery starts
        without waiting for the next poll.
    """

    def __init__(
        self,
        db: Database,
        config: NodeConfig,
        clock: Callable[[], float] = time.time,
        on_added: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.on_added = on_added
        ensure_schema(db)

    def relative_path(self, series_uid: str, sop_instance_uid: str) -> str:
        """Where an instance's file lives, relative to the state directory."""
        path = series_folder(self.config, series_uid) / f"{safe_component(sop_instance_uid)}.dcm"
        return path.relative_to(self.config.state_dir).as_posix()

    def add(self, series_uid: str, datasets: Iterable[Dataset]) -> list[OutboxItem]:
        """Store ``datasets`` (results of the analysed series ``series_uid``) for export.

        Files are durable before the delivery rows are committed; all rows of one call are
        written in one transaction. Re-adding an instance replaces its file and resets its
        rows (attempts 0, fresh retry horizon, new generation) instead of duplicating them.

        Raises
        ------
        ValueError
            A dataset lacks a SOP Instance UID or has a SOP class the node does not export
            (nothing is written to the index then).
        """
        prepared: list[tuple[Dataset, Kind, str]] = []
        for ds in datasets:
            kind = kind_of(ds)
            if not str(getattr(ds, "SOPInstanceUID", "")):
                raise ValueError("a result dataset has no SOPInstanceUID")
            prepared.append((ds, kind, self.relative_path(series_uid, str(ds.SOPInstanceUID))))
        for ds, _kind, rel in prepared:
            write_durably(self.config.state_dir / rel, encode_file(ds))
        now = self.clock()
        items: list[OutboxItem] = []
        with self.db.transaction() as conn:
            for ds, kind, rel in prepared:
                targets: list[str] = []
                held: list[str] = []
                for dest in self.config.destinations:
                    if not wants(dest, kind, self.config):
                        continue
                    state = State.HELD if is_shadow(dest, self.config) else State.PENDING
                    _upsert(conn, ds, series_uid, kind, dest.name, rel, state, now)
                    targets.append(dest.name)
                    if state is State.HELD:
                        held.append(dest.name)
                items.append(
                    OutboxItem(
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        kind=kind,
                        path=rel,
                        destinations=tuple(targets),
                        held=tuple(held),
                    )
                )
        logger.info(
            "outbox: %d result instances of series %s queued (%d deliveries, %d held)",
            len(items),
            series_uid,
            sum(len(i.destinations) for i in items),
            sum(len(i.held) for i in items),
        )
        if self.on_added is not None and any(i.destinations for i in items):
            self.on_added()
        return items


def _upsert(
    conn: sqlite3.Connection,
    ds: Dataset,
    series_uid: str,
    kind: Kind,
    destination: str,
    rel: str,
    state: State,
    now: float,
) -> None:
    conn.execute(
        """
        INSERT INTO deliveries (sop_instance_uid, sop_class_uid, series_uid, study_uid, kind,
            destination, path, state, attempts, generation, queued_at, next_attempt_at,
            last_error, created_at, updated_at, done_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 1, ?, ?, NULL, ?, ?, NULL)
        ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET
            sop_class_uid = excluded.sop_class_uid, series_uid = excluded.series_uid,
            study_uid = excluded.study_uid, kind = excluded.kind, path = excluded.path,
            state = excluded.state, attempts = 0, generation = deliveries.generation + 1,
            queued_at = excluded.queued_at, next_attempt_at = excluded.next_attempt_at,
            last_error = NULL, updated_at = excluded.updated_at, done_at = NULL
        """,
        (
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            series_uid,
            str(getattr(ds, "StudyInstanceUID", "")) or None,
            kind.value,
            destination,
            rel,
            state.value,
            now,
            now,
            now,
            now,
        ),
    )


# -- operations for the status / retry commands and the server -------------------------


def recover_sending(db: Database, clock: Callable[[], float] = time.time) -> int:
    """Put rows left in ``sending`` by a crash back to ``pending``; return how many.

    Call once at start-up, before the exporter claims anything.
    """
    ensure_schema(db)
    now = clock()
    with db.transaction() as conn:
        cur = conn.execute(
            "UPDATE deliveries SET state = ?, next_attempt_at = ?, updated_at = ?, "
            "last_error = COALESCE(last_error, 'interrupted while sending') WHERE state = ?",
            (State.PENDING.value, now, now, State.SENDING.value),
        )
    if cur.rowcount:
        logger.warning("%d deliveries were interrupted while sending; re-queued", cur.rowcount)
    return cur.rowcount


def _filtered_update(
    db: Database,
    from_states: Sequence[State],
    destination: str | None,
    series_uid: str | None,
    sop_instance_uid: str | None,
    clock: Callable[[], float],
    excluded_destinations: Sequence[str] = (),
) -> int:
    ensure_schema(db)
    where = [f"state IN ({', '.join('?' for _ in from_states)})"]
    params: list[Any] = [s.value for s in from_states]
    for column, value in (
        ("destination", destination),
        ("series_uid", series_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if excluded_destinations:
        where.append(f"destination NOT IN ({', '.join('?' for _ in excluded_destinations)})")
        params.extend(excluded_destinations)
    now = clock()
    with db.transaction() as conn:
        cur = conn.execute(
            "UPDATE deliveries SET state = ?, attempts = 0, queued_at = ?, next_attempt_at = ?, "
            f"updated_at = ? WHERE {' AND '.join(where)}",
            (State.PENDING.value, now, now, now, *params),
        )
    return cur.rowcount


def requeue_dead_letters(
    db: Database,
    destination: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    include_failed: bool = False,
    clock: Callable[[], float] = time.time,
) -> int:
    """Move dead-lettered deliveries back to ``pending`` with a fresh retry horizon.

    Parameters
    ----------
    destination, series_uid, sop_instance_uid
        Optional filters (``None`` = all).
    include_failed
        Also send ``failed`` rows (waiting for their next retry) now.

    Returns
    -------
    int
        How many rows were re-queued. The last error stays visible until the next attempt.
    """
    states = [State.DEAD, State.FAILED] if include_failed else [State.DEAD]
    count = _filtered_update(db, states, destination, series_uid, sop_instance_uid, clock)
    logger.info("re-queued %d dead-lettered deliveries", count)
    return count


def release_held(
    db: Database,
    destination: str | None = None,
    config: NodeConfig | None = None,
    series_uid: str | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Release results held in shadow mode: ``held`` -> ``pending``; return how many.

    With ``config``, rows of destinations that are still in shadow mode stay held (they
    would not be sent anyway): switch shadow off first, then release.
    """
    still_shadow: list[str] = []
    if config is not None:
        still_shadow = [d.name for d in config.destinations if is_shadow(d, config)]
    count = _filtered_update(
        db, [State.HELD], destination, series_uid, None, clock, excluded_destinations=still_shadow
    )
    logger.info("released %d held deliveries", count)
    return count


def delivery_counts(db: Database) -> dict[str, dict[str, int]]:
    """``{destination: {state: count}}`` with every state present (zero when none)."""
    ensure_schema(db)
    counts: dict[str, dict[str, int]] = {}
    for row in db.execute(
        "SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY destination, state"
    ):
        per = counts.setdefault(row["destination"], {s.value: 0 for s in State})
        per[row["state"]] = int(row["n"])
    return counts


def delivery_summary(db: Database, dead_letters: int = DEAD_LETTERS_LISTED) -> dict[str, Any]:
    """Deliveries for ``lumbar-node status``: counts per destination and recent dead letters.

    Returns
    -------
    dict
        ``{"destinations": {name: {state: n}}, "totals": {state: n},
        "dead_letters": [{sop_instance_uid, series_uid, kind, destination, attempts,
        last_error, updated_at}], "next_attempt_at": float | None}`` (times in epoch s).
    """
    per_destination = delivery_counts(db)
    totals = {s.value: 0 for s in State}
    for per in per_destination.values():
        for state, n in per.items():
            totals[state] += n
    dead = [
        dict(row)
        for row in db.execute(
            "SELECT sop_instance_uid, series_uid, kind, destination, attempts, last_error, "
            "updated_at FROM deliveries WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
            (State.DEAD.value, dead_letters),
        )
    ]
    row = db.execute(
        "SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE state IN (?, ?)",
        (State.PENDING.value, State.FAILED.value),
    ).fetchone()
    return {
        "destinations": per_destination,
        "totals": totals,
        "dead_letters": dead,
        "next_attempt_at": row["t"] if row is not None else None,
    }


def deliveries_for_series(db: Database, series_uid: str) -> list[dict[str, Any]]:
    """Every delivery row of the results of one analysed series (for status and tests)."""
    ensure_schema(db)
    return [
        dict(row)
        for row in db.execute(
            "SELECT * FROM deliveries WHERE series_uid = ? ORDER BY kind, sop_instance_uid, "
            "destination",
            (series_uid,),
        )
    ]
