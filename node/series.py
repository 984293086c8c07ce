"""Series assembly: the ``series`` table, echo split and geometry coherence.

A series is *open* while instances arrive. The orchestrator (``node/orchestrator.py``) runs
the quiet-period timers; when a series has been quiet long enough it calls
:func:`assemble` on the series' indexed instances, which

1. splits the slices (frames, for multi-frame instances) into echo groups: by EchoNumbers
   for classic images, by EffectiveEchoTime for Enhanced MR frames; a single-echo series is
   one group with echo key ``0`` (the "whole series");
2. checks each group's geometry: one matrix (Rows x Columns) and one PixelSpacing;
   slices grouped into orientation blocks (same ImageOrientationPatient within
   :data:`ORIENTATION_TOLERANCE_DEG`); several blocks are accepted only when every block is
   axial within the routing tilt (the lumbar disc protocol angles one block per disc),
   so a series mixing sagittal and axial slices is incoherent; no two slices of one block
   at the same ImagePositionPatient (within :data:`POSITION_TOLERANCE_MM`).

The verdict per group (coherent or the reason why not) is stored as JSON in the series row;
routing (``node/routing.py``) then decides per coherent group. States of a series:

``open`` -> ``complete`` (at least one group goes to analysis) | ``skipped`` (routing said
no to every group) | ``incoherent`` (no coherent group, reason kept). A late instance
re-opens any of these; ``opened_seq`` counts openings so that a completion racing with a
late instance is discarded instead of overwriting the re-opened state.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.db import Database
from node.routing import (
    Decision,
    RoutingInput,
    RoutingRules,
    axial_tilt_deg,
    decide,
    plane_name,
    slice_normal,
)

#: two slices share an orientation block when both direction cosines differ by less (deg)
ORIENTATION_TOLERANCE_DEG = 1.0
#: two slices of one block at positions closer than this (mm) are duplicates
POSITION_TOLERANCE_MM = 0.01
#: pixel spacings closer than this (mm) are the same spacing
SPACING_TOLERANCE_MM = 1e-3
#: echo key of a series that is not split by echo
WHOLE_SERIES = 0

#: series states
OPEN, COMPLETE, SKIPPED, INCOHERENT = "open", "complete", "skipped", "incoherent"
SERIES_STATES: tuple[str, ...] = (OPEN, COMPLETE, SKIPPED, INCOHERENT)

SERIES_DDL = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    state               TEXT NOT NULL,
    reason              TEXT,
    calling_ae          TEXT,
    modality            TEXT,
    description         TEXT,
    instance_count      INTEGER NOT NULL DEFAULT 0,
    slice_count         INTEGER NOT NULL DEFAULT 0,
    quiet_seconds       REAL NOT NULL,
    first_received_at   REAL NOT NULL,
    last_received_at    REAL NOT NULL,
    completed_at        REAL,
    opened_seq          INTEGER NOT NULL DEFAULT 1,
    completions         INTEGER NOT NULL DEFAULT 0,
    geometry            TEXT,
    echo_groups         TEXT
);
CREATE INDEX IF NOT EXISTS series_state ON series (state);
CREATE INDEX IF NOT EXISTS series_last ON series (last_received_at);
"""


def ensure_schema(db: Database) -> None:
    """Create the ``series`` table if needed."""
    db.ensure_schema(SERIES_DDL)


# -- assembly (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """One 2D image: a single-frame instance, or one frame of a multi-frame instance."""

    sop_instance_uid: str
    frame: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    echo: float | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, ...] | None
    #: True when ``echo`` is an EffectiveEchoTime (ms, enhanced frames), not an echo number
    echo_is_time: bool = False


@dataclass
class EchoGroup:
    """The slices of one echo (or of the whole series), with the geometry verdict.

    ``echo`` is the job key: :data:`WHOLE_SERIES` (0) for a series not split by echo, else
    the echo number (classic: EchoNumbers; enhanced: rank of the EffectiveEchoTime, 1-based).
    """

    echo: int
    slices: list[Slice]
    sop_instance_uids: list[str]
    coherent: bool = True
    reason: str | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)
    decision: Decision | None = None

    @property
    def analyse(self) -> bool:
        return self.coherent and self.decision is not None and self.decision.analyse

    def summary(self) -> dict[str, Any]:
        """Plain data for the ``echo_groups`` JSON column and ``lumbar-node status``."""
        out: dict[str, Any] = {
            "echo": self.echo,
            "slices": len(self.slices),
            "instances": len(self.sop_instance_uids),
            "coherent": self.coherent,
            "blocks": self.blocks,
        }
        if not self.coherent:
            out["outcome"] = "incoherent"
            out["reason"] = self.reason
        elif self.decision is not None:
            out["outcome"] = "analyse" if self.decision.analyse else "skipped"
            out["reason"] = self.decision.reason
            out["checks"] = self.decision.checks
        return out


def _meta(record: Any) -> Mapping[str, Any]:
    meta = getattr(record, "meta", None)
    if meta is None and isinstance(record, Mapping):
        meta = record.get("meta")
    if isinstance(meta, str):
        meta = json.loads(meta or "{}")
    return meta or {}


def _attr(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _vec(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        return int(float(value)) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def slices_of(records: Iterable[Any]) -> list[Slice]:
    """Every 2D slice of the instances (frames of multi-frame instances expanded)."""
    out: list[Slice] = []
    for rec in records:
        meta = _meta(rec)
        uid = str(_attr(rec, "sop_instance_uid"))
        rows, cols = _int_or_none(meta.get("Rows")), _int_or_none(meta.get("Columns"))
        spacing = _vec(meta.get("PixelSpacing"), 2)
        frames = meta.get("frames") or []
        if frames:
            for i, fr in enumerate(frames, start=1):
                echo = fr.get("echo")
                out.append(
                    Slice(
                        uid,
                        i,
                        _vec(fr.get("iop"), 6) or _vec(meta.get("ImageOrientationPatient"), 6),
                        _vec(fr.get("ipp"), 3),
                        float(echo) if echo is not None else None,
                        rows,
                        cols,
                        spacing,
                        echo_is_time=True,
                    )
                )
            continue
        n_frames = _int_or_none(meta.get("NumberOfFrames")) or 1
        echo_no = _int_or_none(meta.get("EchoNumbers"))
        for frame in range(1, n_frames + 1):
            # a classic multi-frame image without per-frame geometry cannot be placed:
            # its frames share one position and are caught as duplicates below
            out.append(
                Slice(
                    uid,
                    frame,
                    _vec(meta.get("ImageOrientationPatient"), 6),
                    _vec(meta.get("ImagePositionPatient"), 3),
                    float(echo_no) if echo_no is not None else None,
                    rows,
                    cols,
                    spacing,
                )
            )
    return out


def split_echoes(slices: Sequence[Slice]) -> dict[int, list[Slice]]:
    """Echo key -> slices; one :data:`WHOLE_SERIES` group when there is at most one echo.

    Classic images carry EchoNumbers (1, 2...), kept as the key; enhanced frames carry an
    EffectiveEchoTime, ranked (shortest = 1).
    """
    echoes = sorted({s.echo for s in slices if s.echo is not None})
    if len(echoes) <= 1:
        return {WHOLE_SERIES: list(slices)}
    integral = not any(s.echo_is_time for s in slices) and all(
        float(e).is_integer() and e > 0 for e in echoes
    )
    key_of = {e: (int(e) if integral else rank) for rank, e in enumerate(echoes, start=1)}
    groups: dict[int, list[Slice]] = {}
    missing = [s for s in slices if s.echo is None]
    for s in slices:
        if s.echo is not None:
            groups.setdefault(key_of[s.echo], []).append(s)
    if missing:
        # slices without an echo cannot be attributed; keep them visible as their own group
        groups[-1] = missing
    return dict(sorted(groups.items()))


def _angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb)))))


def _same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    return (
        _angle_deg(a[:3], b[:3]) < ORIENTATION_TOLERANCE_DEG
        and _angle_deg(a[3:], b[3:]) < ORIENTATION_TOLERANCE_DEG
    )


def check_geometry(group: EchoGroup, max_axial_tilt_deg: float) -> None:
    """Fill ``group.coherent``, ``group.reason`` and ``group.blocks`` (see the module doc)."""
    slices = group.slices
    if not slices:
        group.coherent, group.reason = False, "no slices"
        return
    if group.echo < 0:
        group.coherent, group.reason = False, "slices without an echo number in a multi-echo series"
        return
    no_geometry = [s for s in slices if s.iop is None or s.ipp is None]
    if no_geometry:
        group.coherent = False
        group.reason = (
            f"no patient geometry (ImageOrientationPatient/ImagePositionPatient) on "
            f"{len(no_geometry)} of {len(slices)} slices"
        )
        return
    matrices = sorted({(s.rows, s.columns) for s in slices}, key=str)
    if len(matrices) > 1:
        group.coherent, group.reason = False, f"several matrices (rows x columns): {matrices}"
        return
    spacings = [s.pixel_spacing for s in slices]
    if any(sp is None for sp in spacings):
        group.coherent, group.reason = False, "PixelSpacing missing"
        return
    ref = spacings[0]
    assert ref is not None
    if any(
        max(abs(a - b) for a, b in zip(sp, ref, strict=True)) > SPACING_TOLERANCE_MM
        for sp in spacings
        if sp is not None
    ):
        distinct = sorted({tuple(round(v, 4) for v in sp) for sp in spacings if sp is not None})
        group.coherent, group.reason = False, f"several pixel spacings: {distinct}"
        return
    try:
        for s in slices:
            assert s.iop is not None
            slice_normal(s.iop)
    except ValueError as exc:
        group.coherent, group.reason = False, f"bad orientation: {exc}"
        return
    blocks: list[tuple[tuple[float, ...], list[Slice]]] = []
    for s in slices:
        assert s.iop is not None
        for iop, members in blocks:
            if _same_orientation(iop, s.iop):
                members.append(s)
                break
        else:
            blocks.append((s.iop, [s]))
    group.blocks = [
        {
            "plane": plane_name(iop),
            "tilt_deg": round(axial_tilt_deg(iop), 2),
            "slices": len(members),
            "iop": [round(v, 5) for v in iop],
        }
        for iop, members in blocks
    ]
    if len(blocks) > 1:
        off_axis = [b for b in group.blocks if b["tilt_deg"] > max_axial_tilt_deg]
        if off_axis:
            planes = sorted({b["plane"] for b in group.blocks})
            group.coherent = False
            group.reason = (
                f"mixed orientations: {len(blocks)} orientation blocks ({', '.join(planes)}); "
                f"several blocks are only accepted when all are axial within "
                f"{max_axial_tilt_deg:g} deg"
            )
            return
    for k, (_iop, members) in enumerate(blocks, start=1):
        seen: dict[tuple[int, ...], Slice] = {}
        for s in members:
            assert s.ipp is not None
            key = tuple(round(v / POSITION_TOLERANCE_MM) for v in s.ipp)
            other = seen.get(key)
            if other is not None:
                group.coherent = False
                group.reason = (
                    f"duplicate slice position {[round(v, 2) for v in s.ipp]} in orientation "
                    f"block {k} (SOP {other.sop_instance_uid} frame {other.frame} and "
                    f"SOP {s.sop_instance_uid} frame {s.frame})"
                )
                return
            seen[key] = s
    group.coherent, group.reason = True, None


def routing_input(group: EchoGroup, records: Sequence[Any]) -> RoutingInput:
    """The routing view of a coherent group (headers from its first instance)."""
    uids = set(group.sop_instance_uids)
    first = next((r for r in records if str(_attr(r, "sop_instance_uid")) in uids), None)
    meta = _meta(first) if first is not None else {}
    modality = str(_attr(first, "modality") or "") if first is not None else ""
    descriptions = [
        str(meta.get(k) or "") for k in ("SeriesDescription", "ProtocolName", "StudyDescription")
    ]
    return RoutingInput(
        modality=modality,
        orientations=[s.iop for s in group.slices if s.iop is not None],
        z_positions=[s.ipp[2] for s in group.slices if s.ipp is not None],
        body_part=str(meta.get("BodyPartExamined") or ""),
        # order matters: series-level texts first, the study description last
        descriptions=descriptions,
        blocks=max(1, len(group.blocks)),
    )


@dataclass
class Assembly:
    """The outcome of assembling one complete series."""

    groups: list[EchoGroup]
    instance_count: int

    @property
    def state(self) -> str:
        if any(g.analyse for g in self.groups):
            return COMPLETE
        if self.groups and all(not g.coherent for g in self.groups):
            return INCOHERENT
        return SKIPPED

    @property
    def reason(self) -> str | None:
        """Why nothing (or not everything) is analysed; ``None`` when every group is."""
        parts = []
        for g in self.groups:
            if g.analyse:
                continue
            why = g.reason if not g.coherent else (g.decision.reason if g.decision else "")
            label = "series" if g.echo == WHOLE_SERIES else f"echo {g.echo}"
            prefix = "incoherent geometry: " if not g.coherent else ""
            parts.append(f"{label}: {prefix}{why}")
        return " | ".join(parts) if parts else None

    @property
    def slice_count(self) -> int:
        return sum(len(g.slices) for g in self.groups)


def assemble(records: Sequence[Any], rules: RoutingRules) -> Assembly:
    """Split a complete series into echo groups, check geometry and route each group.

    ``records`` are ``node.instances.InstanceRecord`` (or mappings with the same keys).
    """
    slices = slices_of(records)
    groups: list[EchoGroup] = []
    for echo, members in split_echoes(slices).items():
        uids = sorted({s.sop_instance_uid for s in members})
        group = EchoGroup(echo=echo, slices=members, sop_instance_uids=uids)
        check_geometry(group, rules.max_axial_tilt_deg)
        if group.coherent:
            group.decision = decide(routing_input(group, records), rules)
        groups.append(group)
    return Assembly(groups=groups, instance_count=len(records))


# -- the table -------------------------------------------------------------------------


def describe(records: Sequence[Any]) -> tuple[str | None, str | None]:
    """(modality, SeriesDescription) of a series, from its first instance."""
    if not records:
        return None, None
    first = records[0]
    meta = _meta(first)
    modality = _attr(first, "modality")
    return (str(modality) if modality else None), (meta.get("SeriesDescription") or None)


def open_series(
    db: Database,
    *,
    series_uid: str,
    study_uid: str,
    calling_ae: str | None,
    quiet_seconds: float,
    received_at: float,
) -> tuple[int, bool]:
    """Record an instance arriving for a series not known to be open: insert or re-open.

    Returns
    -------
    (opened_seq, reopened)
        ``reopened`` is True when the series had already been completed, skipped or found
        incoherent (a late instance).
    """
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT state, opened_seq FROM series WHERE series_instance_uid = ?", (series_uid,)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, state, calling_ae,"
                " quiet_seconds, first_received_at, last_received_at, instance_count)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                (series_uid, study_uid, OPEN, calling_ae, quiet_seconds, received_at, received_at),
            )
            return 1, False
        seq = int(row["opened_seq"]) + 1
        conn.execute(
            "UPDATE series SET state = ?, reason = NULL, opened_seq = ?, calling_ae = ?,"
            " quiet_seconds = ?, last_received_at = MAX(last_received_at, ?)"
            " WHERE series_instance_uid = ?",
            (OPEN, seq, calling_ae, quiet_seconds, received_at, series_uid),
        )
        return seq, row["state"] != OPEN


def touch_series(db: Database, series_uid: str, last_received_at: float, count: int) -> None:
    """Write the in-memory receipt summary of an open series (best effort, for status)."""
    with db.transaction() as conn:
        conn.execute(
            "UPDATE series SET last_received_at = MAX(last_received_at, ?), instance_count = ?"
            " WHERE series_instance_uid = ? AND state = ?",
            (last_received_at, count, series_uid, OPEN),
        )


def get_series(db: Database, series_uid: str) -> dict[str, Any] | None:
    """The row of one series as a dict (JSON columns parsed), or None."""
    row = db.execute("SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,)).fetchone()
    if row is None:
        return None
    out = dict(row)
    for key in ("geometry", "echo_groups"):
        out[key] = json.loads(out[key]) if out[key] else None
    return out


def list_open(db: Database) -> list[dict[str, Any]]:
    """Every open series (for re-arming timers at start-up)."""
    rows = db.execute(
        "SELECT series_instance_uid, study_instance_uid, calling_ae, quiet_seconds,"
        " last_received_at, opened_seq, instance_count FROM series WHERE state = ?",
        (OPEN,),
    ).fetchall()
    return [dict(r) for r in rows]


def record_completion(
    conn: Any,
    *,
    series_uid: str,
    opened_seq: int,
    assembly: Assembly,
    modality: str | None,
    description: str | None,
    last_received_at: float,
    now: float | None = None,
) -> bool:
    """Store the verdict inside the caller's transaction; False if the series re-opened.

    The update only applies while the series is still open with the same ``opened_seq``:
    a late instance that arrived during assembly wins, and its own timer completes later.
    """
    now = time.time() if now is None else now
    geometry = {
        "groups": len(assembly.groups),
        "coherent": all(g.coherent for g in assembly.groups),
        "slices": assembly.slice_count,
    }
    cursor = conn.execute(
        "UPDATE series SET state = ?, reason = ?, modality = ?, description = ?,"
        " instance_count = ?, slice_count = ?, completed_at = ?, completions = completions + 1,"
        " last_received_at = MAX(last_received_at, ?), geometry = ?, echo_groups = ?"
        " WHERE series_instance_uid = ? AND state = ? AND opened_seq = ?",
        (
            assembly.state,
            assembly.reason,
            modality,
            description,
            assembly.instance_count,
            assembly.slice_count,
            now,
            last_received_at,
            json.dumps(geometry),
            json.dumps([g.summary() for g in assembly.groups]),
            series_uid,
            OPEN,
            opened_seq,
        ),
    )
    return bool(cursor.rowcount == 1)


def series_counts(db: Database) -> dict[str, int]:
    """Number of series per state (for ``/metrics`` and ``lumbar-node status``)."""
    counts = dict.fromkeys(SERIES_STATES, 0)
    for row in db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall():
        counts[row[0]] = int(row[1])
    return counts
