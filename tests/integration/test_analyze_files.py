"""``lumbar-node analyze`` on a phantom study written as DICOM: schema and plausibility."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ai.labels import MUSCLES, STRUCTURES
from node.phantom_dicom import PhantomOptions, write_phantom_studies

pytestmark = pytest.mark.integration


def test_analyze_writes_documented_results(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=31337, subjects=1, levels=("L4-L5", "L5-S1"), matrix=256,
                          spacing=0.8, sagittal=True, distractor=False, slices_per_block=3)
    (study,) = write_phantom_studies(tmp_path / "in", opts)
    truth = json.loads((study / "truth.json").read_text())
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", str(study), "--out", str(out),
         "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    axial_uid = next(s["series_instance_uid"] for s in truth["series"] if s["role"] == "axial")
    sag_uid = next(s["series_instance_uid"] for s in truth["series"] if s["role"] != "axial")
    assert not (out / sag_uid).exists(), "the sagittal series must be skipped"
    result = json.loads((out / axial_uid / "results.json").read_text())
    assert result["schema_version"] == "1.4"
    assert result["series_instance_uid"] == axial_uid
    assert result["model"]["name"] and result["model"]["version"]
    # provenance: every model that contributed, the segmentation first
    assert [m["role"] for m in result["models"]] == [
        "segmentation", "column refinement", "canal refinement", "stenosis grading"
    ]
    assert result["models"][0] == {"role": "segmentation", **result["model"]}
    assert all(m["name"] and m["version"] for m in result["models"])
    # how the network ran: CPU was asked for, one pass by default
    assert result["inference"]["device"] == "cpu"
    assert result["inference"]["precision"] in ("float32", "bfloat16")
    assert result["inference"]["mirror"] is False
    assert isinstance(result["flags"], list)
    assert len(result["levels"]) == len(truth["levels"])
    for pos, lv in enumerate(result["levels"], start=1):
        assert lv["position"] == pos
        assert lv["level"] is None or lv["level"] in ("L4-L5", "L5-S1")
        assert lv["slice_indices"]
        assert set(lv["measurements"]) == set(STRUCTURES)
        for key in MUSCLES:
            assert {"csa_mm2", "fcsa_mm2", "fat_fraction_pct", "mean_si"} <= set(lv["measurements"][key])
        assert "stenosis" in lv
    # measured areas near the truth averaged over the same slices
    with np.load(out / axial_uid / "labels.npz") as z:
        slice_uids = [str(u) for u in z["slice_uids"]]
    by_uid = {t["sop_instance_uid"]: t for t in truth["slices"]}
    # relative tolerance, or mm2 for the small dural sac (its held-out Bland-Altman 95 %
    # limits on realistic phantoms are about +-45 mm2, docs/evaluation.md)
    tolerance = {"disc": (0.25, 0.0), "dural_sac": (0.0, 45.0), "multifidus_left": (0.15, 0.0),
                 "psoas_right": (0.15, 0.0)}
    for lv in result["levels"]:
        for key, (rel, absolute) in tolerance.items():
            want = float(np.mean([by_uid[slice_uids[i]]["csa_mm2"][key] for i in lv["slice_indices"]]))
            got = lv["measurements"][key]["csa_mm2"]
            assert abs(got - want) <= max(rel * want, absolute), (lv["level"], key, got, want)
    with np.load(out / axial_uid / "labels.npz") as z:
        assert z["labels"].shape == tuple(result["labels_shape"])
        assert z["labels"].dtype == np.uint8
        assert len(z["slice_uids"]) == result["labels_shape"][0]
    with (out / "measurements.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["levels"]) * len(STRUCTURES)
    assert {r["series_instance_uid"] for r in rows} == {axial_uid}
    assert {r["mirror_pass"] for r in rows} == {"off"}
    # every slice measured (schema 1.4): its own areas near the truth, levels their means
    assert [sl["index"] for sl in result["slices"]] == list(range(result["labels_shape"][0]))
    assert [sl["sop_instance_uid"] for sl in result["slices"]] == slice_uids
    for sl in result["slices"]:
        truth_areas = by_uid[sl["sop_instance_uid"]]["csa_mm2"]
        for key in ("psoas_right", "erector_spinae_left"):
            want, got = truth_areas[key], sl["measurements"][key]["csa_mm2"]
            assert abs(got - want) <= 0.15 * want, (sl["index"], key, got, want)
    for lv in result["levels"]:
        members = [sl for sl in result["slices"] if sl["level_position"] == lv["position"]]
        assert [sl["index"] for sl in members] == lv["slice_indices"]
        mean = np.mean([sl["measurements"]["psoas_right"]["csa_mm2"] for sl in members])
        assert lv["measurements"]["psoas_right"]["csa_mm2"] == pytest.approx(mean, abs=0.01)
    with (out / "slice_measurements.csv").open() as f:
        slice_rows = list(csv.DictReader(f))
    assert len(slice_rows) == result["labels_shape"][0] * len(STRUCTURES)
    assert {r["sop_instance_uid"] for r in slice_rows} == set(slice_uids)
