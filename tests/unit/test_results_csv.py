"""measurements.csv (per level) and slice_measurements.csv (per slice): rows and columns."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ai.labels import STRUCTURES
from ai.results import (
    InferenceSettings,
    LevelResult,
    SeriesResult,
    SliceResult,
    StructureMeasurement,
)
from node.results_io import (
    CSV_COLUMNS,
    SLICE_CSV_COLUMNS,
    append_measurements_csv,
    append_slice_measurements_csv,
)


def _result(uid: str) -> SeriesResult:
    psoas = StructureMeasurement(1200.0, 1100.0, 8.3333, 300.0, 0.3, outline_contrast=0.8123,
                                 at_image_edge=True)
    slices = [
        SliceResult(index=k, sop_instance_uid=f"{uid}.{k}", frame_number=1,
                    level_position=1 if k == 1 else None, level="L4-L5" if k == 1 else None,
                    measurements={"disc": StructureMeasurement(1500.0 if k == 1 else 0.0),
                                  "psoas_left": psoas})
        for k in range(3)
    ]
    level = LevelResult("L4-L5", 1, [1], 0.9, measurements=dict(slices[1].measurements))
    return SeriesResult(uid, "lumbar-seg-unet", "1.4.0", labels=np.zeros((3, 4, 4), np.uint8),
                        levels=[level], slices=slices,
                        inference=InferenceSettings("cpu", "bfloat16", mirror=False))


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_slice_rows_one_per_slice_and_structure_with_their_level(tmp_path: Path) -> None:
    path = tmp_path / "slice_measurements.csv"
    assert append_slice_measurements_csv(_result("1.2.3"), path) == 6
    assert append_slice_measurements_csv(_result("1.2.4"), path) == 6  # appended, one header
    header, rows = _read(path)
    assert header == list(SLICE_CSV_COLUMNS)
    assert len(rows) == 12
    first = [r for r in rows if r["series_instance_uid"] == "1.2.3"]
    assert [(r["slice_index"], r["structure"]) for r in first] == [
        (str(k), key) for k in range(3) for key in STRUCTURES if key in ("disc", "psoas_left")
    ]
    disc = {r["slice_index"]: r for r in first if r["structure"] == "disc"}
    assert disc["1"]["level"] == "L4-L5" and disc["1"]["level_position"] == "1"
    assert disc["0"]["level"] == "" and disc["0"]["level_position"] == ""
    assert disc["1"]["csa_mm2"] == "1500.0" and disc["1"]["fcsa_mm2"] == ""
    psoas = next(r for r in first if r["structure"] == "psoas_left")
    assert psoas["outline_contrast"] == "0.812" and psoas["fat_fraction_pct"] == "8.333"
    assert psoas["sop_instance_uid"] == "1.2.3.0" and psoas["mirror_pass"] == "off"
    assert psoas["at_image_edge"] == "1" and disc["1"]["at_image_edge"] == "0"


def test_level_rows_unchanged_by_the_slice_file(tmp_path: Path) -> None:
    path = tmp_path / "measurements.csv"
    assert append_measurements_csv(_result("1.2.3"), path) == 2
    header, rows = _read(path)
    assert header == list(CSV_COLUMNS)
    assert [(r["level"], r["slice_indices"], r["structure"]) for r in rows] == [
        ("L4-L5", "1", "disc"), ("L4-L5", "1", "psoas_left")
    ]
