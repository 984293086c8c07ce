"""``lumbar-node evaluate`` end to end on one small phantom study with the shipped models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_evaluate_reports_slices_levels_and_grades(tmp_path: Path) -> None:
    from node.phantom_dicom import PhantomOptions, write_phantom_studies

    data = tmp_path / "studies"
    write_phantom_studies(data, PhantomOptions(seed=5108, subjects=1, mode="realistic", matrix=192,
                                               spacing=1.2, sagittal=False, distractor=False))
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "node.cli", "evaluate", "--data", str(data), "--threads", "1",
           "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert len(report["cases"]) == 1 and report["n_slices"] > 0
    assert report["segmentation"]["all"]["disc"]["dice"] > 0.8
    levels = report["level_measurements"]["realistic"]
    assert levels["disc"]["n_levels"] >= 3, "every reported level is compared"
    assert levels["psoas_left"]["csa_median_abs_pct_error"] < 15.0
    assert report["grades"]["levels"]["truth"] >= 3
    assert "per-level measurements (results.json vs truth on the same slices)" in done.stdout
    assert "| disc | 1 |" in done.stdout
    assert "per true level (prediction vs truth over the truth's disc slices)" in done.stdout
    assert report["level_measurements_true_slices"]["realistic"]["disc"]["n_levels"] >= 3
    (case,) = report["per_case"]  # per study: find the studies that failed
    assert case["case"] == report["cases"][0] and case["mode"] == "realistic"
    assert case["dice"]["disc"] > 0.8 and case["mean_dice"] > 0.8
    assert "studies with the lowest mean Dice" in done.stdout and case["case"] in done.stdout
    # a folder without labelled studies is a clear error
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run([*cmd[:5], str(empty)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no cases found" in bad.stderr
