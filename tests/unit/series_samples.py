"""Synthetic ``instances`` rows for the series, routing and job tests (header summaries only)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node.config import NodeConfig, load_config
from node.instances import InstanceRecord

AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL: tuple[float, ...] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
STUDY = "1.2.826.0.1.3680043.10.1"
SERIES = "1.2.826.0.1.3680043.10.1.2"


def tilted(deg: float) -> tuple[float, ...]:
    """An axial slice rotated ``deg`` about the patient x axis (the disc-block angulation)."""
    a = math.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), -math.sin(a))


def record(
    sop: str,
    *,
    iop: tuple[float, ...] | None = AXIAL,
    ipp: tuple[float, ...] | None = (0.0, 0.0, 0.0),
    series: str = SERIES,
    modality: str = "MR",
    received_at: float | None = None,
    calling_ae: str = "SCANNER",
    **meta: Any,
) -> InstanceRecord:
    """An ``instances`` row as the ingest tests' receiver stores it (only the header summary matters)."""
    summary: dict[str, Any] = {
        "ImageOrientationPatient": list(iop) if iop is not None else None,
        "ImagePositionPatient": list(ipp) if ipp is not None else None,
        "PixelSpacing": [0.7, 0.7],
        "Rows": 320,
        "Columns": 320,
        "BodyPartExamined": "LSPINE",
        "SeriesDescription": "t2_tse_tra",
        "EchoNumbers": 1,
    }
    summary.update(meta)
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid=STUDY,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"spool/{STUDY}/{series}/{sop}.dcm",
        sha256="0" * 64,
        size_bytes=1000,
        calling_ae=calling_ae,
        peer_address="127.0.0.1",
        received_at=time.time() if received_at is None else received_at,
        modality=modality,
        meta=summary,
    )


def stack(
    n: int, *, iop: tuple[float, ...] = AXIAL, start: int = 0, z0: float = 0.0, step: float = 4.0,
    **meta: Any,
) -> list[InstanceRecord]:
    """``n`` parallel slices along the normal of ``iop``."""
    r, c = iop[:3], iop[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return [
        record(
            f"1.2.3.{start + i}", iop=iop,
            ipp=tuple(z0 * (k == 2) + (i * step) * normal[k] for k in range(3)), **meta,
        )
        for i in range(n)
    ]


DEADLINE_S = 15.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def make_config(tmp_path: Path, quiet: float = 0.3, extra: str = "") -> NodeConfig:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nstate_dir = "state"\n[series]\nquiet_seconds = {quiet}\n{extra}')
    return load_config(path)


def complete_series(db: Any, uid: str, records: list[InstanceRecord], at: float | None = None) -> list[int]:
    """Index ``records`` as series ``uid``, complete it as the orchestrator does (at ``at``,
    default now) and queue its jobs; the job ids. Needs the instances, series and jobs tables."""
    from node import jobs, series
    from node.instances import insert_instance

    now = time.time() if at is None else at
    records = [
        r.__class__(**{**r.__dict__, "series_instance_uid": uid, "sop_instance_uid": f"{uid}.{i}",
                       "path": f"spool/{STUDY}/{uid}/{uid}.{i}.dcm", "received_at": now})
        for i, r in enumerate(records)
    ]
    for rec in records:
        insert_instance(db, rec)
    seq, _ = series.open_series(db, series_uid=uid, study_uid=STUDY, calling_ae="SCANNER",
                                quiet_seconds=10.0, received_at=now)
    assembly = series.assemble(records, load_config(None).routing)
    modality, description = series.describe(records)
    with db.transaction() as conn:
        assert series.record_completion(conn, series_uid=uid, opened_seq=seq, assembly=assembly,
                                        modality=modality, description=description,
                                        last_received_at=now)
        return jobs.upsert_for_completion(conn, series_uid=uid, study_uid=STUDY,
                                          groups=assembly.groups, received_at=now, now=now)
