"""Research outputs of an analysed series: ``results.json``, label maps, ``measurements.csv``
(per level) and ``slice_measurements.csv`` (per slice).

``results.json`` follows :data:`ai.results.RESULTS_SCHEMA_VERSION` (docs/results-schema.md).
Label maps go to ``labels.npz`` (``labels``: uint8 ``(slices, rows, cols)`` in the
volume's caudal -> cranial order; ``slice_uids`` / ``frame_numbers``: the source of each
slice, when given). Files are written to a temporary name and renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ai.labels import MUSCLES, PAIRS, STRUCTURES
from ai.results import SeriesResult, StructureMeasurement

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
LABELS_FILE = "labels.npz"
MEASUREMENTS_CSV = "measurements.csv"
SLICE_MEASUREMENTS_CSV = "slice_measurements.csv"

#: Measurement columns shared by both CSV files (:meth:`ai.results.StructureMeasurement.to_dict`).
MEASUREMENT_COLUMNS: tuple[str, ...] = (
    "csa_mm2", "fcsa_mm2", "fat_fraction_pct", "mean_si", "si_ratio_to_fat", "outline_contrast",
    "at_image_edge",
)

#: Columns of measurements.csv: one row per series, level and structure.
CSV_COLUMNS: tuple[str, ...] = (
    "series_instance_uid",
    "model_name",
    "model_version",
    "level",
    "position",
    "level_confidence",
    "slice_indices",
    "structure",
    *MEASUREMENT_COLUMNS,
    "asymmetry_pct",
    "kjaer_grade",
    "schizas",
    "dsca_mm2",
    "dsca_grade",
    "severity",
    "mirror_pass",
)

#: Columns of slice_measurements.csv: one row per series, slice and structure.
SLICE_CSV_COLUMNS: tuple[str, ...] = (
    "series_instance_uid",
    "model_name",
    "model_version",
    "slice_index",
    "sop_instance_uid",
    "frame_number",
    "level",
    "level_position",
    "structure",
    *MEASUREMENT_COLUMNS,
    "mirror_pass",
)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def results_dict(result: SeriesResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``results.json`` content (``extra`` keys are added at the top level)."""
    d = result.to_dict()
    d["labels_file"] = LABELS_FILE
    d["labels_shape"] = list(result.labels.shape)
    if extra:
        d.update(extra)
    return d


def write_results(
    result: SeriesResult,
    out_dir: Path,
    *,
    slice_uids: Sequence[str] = (),
    frame_numbers: Sequence[int] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``results.json`` and ``labels.npz`` into ``out_dir``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"labels": np.ascontiguousarray(result.labels, dtype=np.uint8)}
    if slice_uids:
        arrays["slice_uids"] = np.asarray(list(slice_uids), dtype=str)
    if frame_numbers:
        arrays["frame_numbers"] = np.asarray(list(frame_numbers), dtype=np.int32)
    tmp = out_dir / (LABELS_FILE + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(out_dir / LABELS_FILE)
    path = out_dir / RESULTS_FILE
    payload = json.dumps(results_dict(result, extra), indent=2)
    _atomic_write(path, (payload + "\n").encode())
    logger.info("results of series %s written to %s", result.series_instance_uid, out_dir)
    return path


def csv_rows(result: SeriesResult) -> list[dict[str, Any]]:
    """measurements.csv rows of one series (one per level and structure)."""
    rows = []
    pair_of = {k: p for p, keys in PAIRS.items() for k in keys}
    mirror_pass = _mirror_pass(result)
    for lv in result.levels:
        st = lv.stenosis
        for key in STRUCTURES:
            m = lv.measurements.get(key)
            if m is None:
                continue
            row: dict[str, Any] = {
                "series_instance_uid": result.series_instance_uid,
                "model_name": result.model_name,
                "model_version": result.model_version,
                "level": lv.level or "",
                "position": lv.position,
                "level_confidence": round(lv.level_confidence, 4),
                "slice_indices": " ".join(str(i) for i in lv.slice_indices),
                "structure": key,
                **measurement_cells(m),
                "asymmetry_pct": (
                    round(lv.asymmetry_pct[pair_of[key]], 2)
                    if key in MUSCLES and pair_of.get(key) in lv.asymmetry_pct
                    else ""
                ),
                "kjaer_grade": lv.kjaer_grade.get(key, ""),
                "schizas": st.schizas if st and key == "dural_sac" else "",
                "dsca_mm2": round(st.dsca_mm2, 2) if st and key == "dural_sac" else "",
                "dsca_grade": st.dsca_grade if st and key == "dural_sac" else "",
                "severity": st.severity if st and key == "dural_sac" else "",
                "mirror_pass": mirror_pass,
            }
            rows.append(row)
    return rows


def measurement_cells(m: StructureMeasurement) -> dict[str, Any]:
    """The :data:`MEASUREMENT_COLUMNS` cells of one measurement: empty where not measured,
    ``at_image_edge`` 1 or 0."""
    md = m.to_dict()
    cells: dict[str, Any] = {column: md.get(column, "") for column in MEASUREMENT_COLUMNS}
    cells["at_image_edge"] = int(m.at_image_edge)
    return cells


def _mirror_pass(result: SeriesResult) -> str:
    settings = result.inference
    return "" if settings is None else ("on" if settings.mirror else "off")


def slice_csv_rows(result: SeriesResult) -> list[dict[str, Any]]:
    """slice_measurements.csv rows of one series (one per slice and structure)."""
    rows = []
    mirror_pass = _mirror_pass(result)
    for sl in result.slices:
        for key in STRUCTURES:
            m = sl.measurements.get(key)
            if m is None:
                continue
            rows.append({
                "series_instance_uid": result.series_instance_uid,
                "model_name": result.model_name,
                "model_version": result.model_version,
                "slice_index": sl.index,
                "sop_instance_uid": sl.sop_instance_uid,
                "frame_number": sl.frame_number,
                "level": sl.level or "",
                "level_position": "" if sl.level_position is None else sl.level_position,
                "structure": key,
                **measurement_cells(m),
                "mirror_pass": mirror_pass,
            })
    return rows


def append_measurements_csv(result: SeriesResult, csv_path: Path) -> int:
    """Append the series' per-level rows to ``csv_path`` (header written once); returns rows
    written."""
    return _append_csv(csv_rows(result), CSV_COLUMNS, csv_path)


def append_slice_measurements_csv(result: SeriesResult, csv_path: Path) -> int:
    """Append the series' per-slice rows to ``csv_path`` (header written once)."""
    return _append_csv(slice_csv_rows(result), SLICE_CSV_COLUMNS, csv_path)


def _append_csv(rows: list[dict[str, Any]], columns: Sequence[str], csv_path: Path) -> int:
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def read_labels(out_dir: Path) -> np.ndarray:
    """The label maps written by :func:`write_results`."""
    with np.load(out_dir / LABELS_FILE) as z:
        return np.asarray(z["labels"])
