"""Encoder outputs for a phantom study: dciodvfy clean, dsrdump renders, exact read-back."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_synthetic import SyntheticSeries, phantom_series
from pydicom import config

from ai.results import InferenceSettings
from node.encode import EncodedOutputs, encode_series, kind_of
from node.outbox import PRODUCED_SOP_CLASS
from node.volume_io import volume_from_datasets

pytestmark = pytest.mark.integration

TOOL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSeries:
    # three tilted blocks; the most cranial level is reported as unlabelled
    return phantom_series(str(tmp_path_factory.mktemp("phantom")), levels="L3-L4,L4-L5,L5-S1",
                          unname=("L3-L4",), extra_args=["--no-sagittal", "--no-distractor"])


def _write(out: EncodedOutputs, folder: Path) -> dict[str, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {}
    for ds in out.all():
        path = folder / f"{kind_of(ds)}_{ds.InstanceNumber:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.setdefault(kind_of(ds), []).append(path)
    return paths


def _dciodvfy(path: Path) -> str:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)  # noqa: S603, S607
    return res.stdout + res.stderr


def test_outputs_pass_dciodvfy_and_read_back(phantom: SyntheticSeries, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert shutil.which("dciodvfy") and shutil.which("dsrdump"), "make test-peers"
    # with the segmentation model's Algorithm Parameters in the SEG and the SR, and a
    # plausibility warning (TID 1500 row 14 TEXT)
    settings = InferenceSettings(device="cpu", precision="bfloat16", mirror=True)
    result = dataclasses.replace(phantom.result, inference=settings,
                                 flags=["L4-L5: psoas_left outline has little contrast"])
    out = encode_series(phantom.datasets, phantom.volume, result)
    assert out.seg is not None
    assert "mirror=on" in out.seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    # the classes a destination must accept (lumbar-node check, docs/conformance.md)
    assert {(kind_of(ds), str(ds.SOPClassUID)) for ds in out.all()} == {
        (kind, uid) for kind, uid in PRODUCED_SOP_CLASS.items()}
    paths = _write(out, tmp_path)
    checked = [paths["seg"][0], paths["sr"][0], paths["overlay"][0], paths["overlay"][-1]]
    for path in checked:
        report = _dciodvfy(path)
        assert "Error" not in report, f"{path.name}:\n{report}"
    assert "Segmentation" in _dciodvfy(paths["seg"][0])

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    seg = hd.seg.segread(paths["seg"][0])
    numbers = [spec.number for spec in out.segments]
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(phantom.volume.slice_uids), segment_numbers=numbers
    )
    rebuilt = np.zeros_like(phantom.result.labels)
    for k, spec in enumerate(out.segments):
        rebuilt[arr[..., k] > 0] = int(spec.label)
    np.testing.assert_array_equal(rebuilt, phantom.result.labels)  # the truth label map, exactly
    texts = [spec.text for spec in out.segments]
    assert "Intervertebral disc L4-L5" in texts and "Intervertebral disc L5-S1" in texts
    assert "Intervertebral disc (level 3 from caudal, unlabelled)" in texts

    sr = hd.sr.srread(paths["sr"][0])
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    for lv in phantom.result.levels:
        name = lv.level or f"level {lv.position} from caudal, unlabelled"
        areas = {x.name.value: x.value for x in groups[f"{name} dural_sac"].get_measurements()}
        assert areas["42798000"] == pytest.approx(lv.measurements["dural_sac"].csa_mm2)

    dump = subprocess.run(["dsrdump", "+Pl", str(paths["sr"][0])], capture_output=True, text=True,  # noqa: S603, S607
                          timeout=TOOL_TIMEOUT_S)
    assert dump.returncode == 0, dump.stderr
    for needle in ("Imaging Measurement Report", "L4-L5 spinal canal", "level 3 from caudal, unlabelled",
                   "Schizas", "Level of L5/S1 intervertebral disc", "mm2", "Qualitative Evaluations",
                   '"Plausibility warning of the analysis")="L4-L5: psoas_left outline has little contrast"'):
        assert needle in dump.stdout, needle


def test_reanalysis_gives_the_same_identities(phantom: SyntheticSeries) -> None:
    a = encode_series(phantom.datasets, phantom.volume, phantom.result, include_overlay=False)
    b = encode_series(list(reversed(phantom.datasets)), phantom.volume, phantom.result, include_overlay=False)
    assert [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in a.all()] == [
        (d.SeriesInstanceUID, d.SOPInstanceUID) for d in b.all()
    ]


def test_enhanced_mr_source(phantom: SyntheticSeries, tmp_path: Path) -> None:
    """A multi-frame (legacy converted enhanced MR) source: frames referenced by number."""
    block = [ds for ds in phantom.datasets
             if str(ds.SOPInstanceUID) in {phantom.volume.slice_uids[i] for i in phantom.result.levels[0].slice_indices}]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=block, series_instance_uid=hd.UID(), series_number=7,
        sop_instance_uid=hd.UID(), instance_number=1,
    )
    enhanced = pydicom.dcmread(_save(enhanced, tmp_path / "enhanced.dcm"))
    volume, sources = volume_from_datasets([enhanced])
    index = {uid: i for i, uid in enumerate(phantom.volume.slice_uids)}
    order = [index[str(ds.SOPInstanceUID)] for ds in sorted(block, key=lambda d: index[str(d.SOPInstanceUID)])]
    from ai.results import SeriesResult
    result = SeriesResult(volume.series_instance_uid, "lumbar-unet", "1.0.0",
                          labels=phantom.result.labels[order], levels=[], flags=[])
    out = encode_series(sources, volume, result, include_overlay=False, include_summary=False)
    assert out.sr is None  # no level measured: nothing for TID 1500 to hold
    paths = _write(out, tmp_path / "out")
    report = _dciodvfy(paths["seg"][0])
    assert "Error" not in report, report
    seg = pydicom.dcmread(paths["seg"][0])
    refs = [item.DerivationImageSequence[0].SourceImageSequence[0] for item in seg.PerFrameFunctionalGroupsSequence]
    assert {r.ReferencedSOPInstanceUID for r in refs} == {enhanced.SOPInstanceUID}
    assert [int(r.ReferencedFrameNumber) for r in refs[: volume.n_slices]] == list(volume.frame_numbers)


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
