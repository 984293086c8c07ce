"""Phantom studies on disk: truth.json matches the label maps and the DICOM geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ai.labels import Label
from ai.phantom import structure_areas
from node.phantom_dicom import PhantomOptions, write_phantom_studies


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    opts = PhantomOptions(seed=11, subjects=1, matrix=192, spacing=0.9, slices_per_block=4)
    return write_phantom_studies(out, opts)[0]


def _axial(study: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted((study / "ax").glob("*.dcm"))]


def test_truth_areas_equal_label_maps(study: Path) -> None:
    truth = json.loads((study / "truth.json").read_text())
    labels = np.load(study / "labels.npz")
    assert len(truth["slices"]) == 12
    for st in truth["slices"]:
        lab = labels[st["sop_instance_uid"]]
        area = st["pixel_spacing"][0] * st["pixel_spacing"][1]
        assert st["csa_mm2"] == pytest.approx(structure_areas(lab, area))
        assert st["dsca_mm2"] == pytest.approx((lab == Label.DURAL_SAC).sum() * area)
    for lv in truth["levels"]:
        mid = next(s for s in truth["slices"] if s["sop_instance_uid"] == lv["mid_disc_uid"])
        assert mid["offset_mm"] == 0.0
        assert lv["dsca_mm2"] == mid["dsca_mm2"] and lv["schizas"] in "ABCD"
        assert len(lv["slice_uids"]) == 4


def test_levels_caudal_to_cranial_and_pixels_match(study: Path) -> None:
    truth = json.loads((study / "truth.json").read_text())
    names = [lv["level"] for lv in truth["levels"]]
    assert names == ["L5-S1", "L4-L5", "L3-L4"]
    ds_by_uid = {str(d.SOPInstanceUID): d for d in _axial(study)}
    labels = np.load(study / "labels.npz")
    for st in truth["slices"]:
        ds = ds_by_uid[st["sop_instance_uid"]]
        assert ds.pixel_array.shape == labels[st["sop_instance_uid"]].shape
        assert int(ds.InstanceNumber) == st["index"] + 1
        assert ds.PatientName == truth["patient_name"]


def test_block_geometry_parallel_and_spaced(study: Path) -> None:
    truth = json.loads((study / "truth.json").read_text())
    dss = {str(d.SOPInstanceUID): d for d in _axial(study)}
    centres_z = []
    for lv in truth["levels"]:
        block = [dss[u] for u in lv["slice_uids"]]
        iops = np.array([[float(v) for v in d.ImageOrientationPatient] for d in block])
        assert np.allclose(iops, iops[0], atol=1e-6)  # parallel within a block
        normal = np.cross(iops[0, :3], iops[0, 3:])
        pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in block])
        steps = np.diff(pos @ normal)
        assert np.allclose(steps, float(block[0].SpacingBetweenSlices), atol=1e-3)
        diffs = pos[1:] - pos[:-1]
        assert np.allclose(np.cross(diffs, normal), 0.0, atol=1e-3)  # stacked along the normal
        # the canal centre pixel maps to the level's disc centre on the mid-disc slice
        mid = dss[lv["mid_disc_uid"]]
        st = next(s for s in truth["slices"] if s["sop_instance_uid"] == lv["mid_disc_uid"])
        r0, c0 = st["canal_centre_px"]
        rs, cs = (float(v) for v in mid.PixelSpacing)
        p = np.array([float(v) for v in mid.ImagePositionPatient]) + c0 * cs * iops[0, :3] + r0 * rs * iops[0, 3:]
        assert np.allclose(p, lv["disc_centre_patient_mm"], atol=1e-3)
        centres_z.append(p[2])
    gaps = np.diff(centres_z)
    assert np.all(gaps > 25.0) and np.all(gaps < 45.0)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=5, subjects=1, matrix=96, spacing=1.5, sagittal=False,
                          distractor=False, slices_per_block=3, levels=("L4-L5",))
    a = write_phantom_studies(tmp_path / "a", opts)[0]
    b = write_phantom_studies(tmp_path / "b", opts)[0]
    assert (a / "truth.json").read_text() == (b / "truth.json").read_text()
    for fa, fb in zip(sorted((a / "ax").glob("*.dcm")), sorted((b / "ax").glob("*.dcm")), strict=True):
        assert fa.read_bytes() == fb.read_bytes()


def test_continuous_stack_is_axial_and_ascending(tmp_path: Path) -> None:
    opts = PhantomOptions(seed=2, subjects=1, matrix=96, spacing=1.5, sagittal=False,
                          distractor=False, continuous=True, levels=("L4-L5", "L5-S1"))
    study = write_phantom_studies(tmp_path, opts)[0]
    dss = _axial(study)
    z = [float(d.ImagePositionPatient[2]) for d in sorted(dss, key=lambda d: int(d.InstanceNumber))]
    assert np.all(np.diff(z) > 0)
    assert all([float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for d in dss)
