"""SEG encoder: layout, codes, colours, read-back with pydicom (strict) and highdicom."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_synthetic import make_series
from pydicom import config
from pydicom.dataset import Dataset

from ai.labels import COLORS, Label
from node.encode import codes
from node.encode.seg import build_seg, plan_segments, rgb_to_dicom_lab, slice_presence
from node.encode.uids import OutputIdentity


@pytest.fixture(autouse=True)
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _build(**kwargs: object) -> tuple[object, Dataset]:
    s = make_series(**kwargs)  # type: ignore[arg-type]
    ident = OutputIdentity.of(s.volume.series_instance_uid, s.volume.slice_uids, s.result.model_version)
    return s, build_seg(s.datasets, s.volume, s.result, ident)


def test_masks_read_back_exactly_with_highdicom() -> None:
    s, seg = _build(levels=("L4-L5", "L3-L4"))
    back = hd.seg.Segmentation.from_dataset(_roundtrip(seg))
    specs = plan_segments(s.result)  # type: ignore[attr-defined]
    numbers = [spec.number for spec in specs]
    arr = back.get_pixels_by_source_instance(
        source_sop_instance_uids=list(s.volume.slice_uids), segment_numbers=numbers  # type: ignore[attr-defined]
    )
    for k, spec in enumerate(specs):
        np.testing.assert_array_equal(arr[..., k] > 0, spec.mask(s.result.labels), err_msg=spec.text)  # type: ignore[attr-defined]
    # the union of the segments is the label map again
    rebuilt = np.zeros_like(s.result.labels)  # type: ignore[attr-defined]
    for k, spec in enumerate(specs):
        rebuilt[arr[..., k] > 0] = int(spec.label)
    np.testing.assert_array_equal(rebuilt, s.result.labels)  # type: ignore[attr-defined]


def test_every_slice_has_a_frame_per_segment_with_its_own_geometry() -> None:
    s, seg = _build(levels=("L4-L5", "L3-L4"))
    ds = _roundtrip(seg)
    n = s.volume.n_slices  # type: ignore[attr-defined]
    n_segments = len(ds.SegmentSequence)
    assert ds.NumberOfFrames == n * n_segments  # empty frames are kept (highdicom #214)
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == n * n_segments
    for f, item in enumerate(frames):
        i = f % n
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == s.volume.slice_uids[i]  # type: ignore[attr-defined]
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], s.volume.positions[i], atol=1e-4  # type: ignore[attr-defined]
        )
        # angled blocks: orientation per frame, not shared
        np.testing.assert_allclose(
            [float(v) for v in item.PlaneOrientationSequence[0].ImageOrientationPatient],
            s.volume.orientations[i], atol=1e-6,  # type: ignore[attr-defined]
        )
        assert item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == f // n + 1
    assert "PlaneOrientationSequence" not in ds.SharedFunctionalGroupsSequence[0]
    refs = ds.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == s.volume.series_instance_uid  # type: ignore[attr-defined]
    assert [r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence] == list(s.volume.slice_uids)  # type: ignore[attr-defined]


def test_single_orientation_is_shared() -> None:
    _, seg = _build(blocks=((0.0, 5.0, 4),), levels=("L5-S1",))
    ds = _roundtrip(seg)
    assert "PlaneOrientationSequence" in ds.SharedFunctionalGroupsSequence[0]
    assert "PlaneOrientationSequence" not in ds.PerFrameFunctionalGroupsSequence[0]


def test_segment_codes_laterality_colours_and_algorithm() -> None:
    s, seg = _build(levels=("L4-L5", None))
    ds = _roundtrip(seg)
    by_label = {str(item.SegmentLabel): item for item in ds.SegmentSequence}
    disc = by_label["Intervertebral disc L4-L5"]
    assert disc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "84020006"
    unnamed = by_label["Intervertebral disc (level 2 from caudal, unlabelled)"]
    assert unnamed.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == codes.PRIVATE_SCHEME
    left = by_label["Multifidus left"].SegmentedPropertyTypeCodeSequence[0]
    assert left.CodeValue == "5709001"
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    right = by_label["Psoas major right"].SegmentedPropertyTypeCodeSequence[0]
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert by_label["Dural sac"].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    for item in ds.SegmentSequence:
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lumbar-unet", "1.0.0")
    lab = list(by_label["Dural sac"].RecommendedDisplayCIELabValue)
    assert lab == rgb_to_dicom_lab(COLORS[Label.DURAL_SAC])
    assert ds.SeriesDescription == "AI Lumbar SEG"
    assert ds.PatientID == s.datasets[0].PatientID  # type: ignore[attr-defined]
    assert ds.StudyInstanceUID == s.datasets[0].StudyInstanceUID  # type: ignore[attr-defined]


def test_cielab_matches_known_values() -> None:
    # white and pure red in D65 CIELab (as dcmjs converts them back in OHIF)
    white = rgb_to_dicom_lab((255, 255, 255))
    assert max(abs(a - b) for a, b in zip(white, [65535, 32896, 32896], strict=True)) <= 8
    lab_red = rgb_to_dicom_lab((255, 0, 0))
    assert abs(lab_red[0] * 100 / 65535 - 53.24) < 0.1


def test_slice_presence_is_exact() -> None:
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, 1, 1] = 4
    labels[2, 0, 0] = 12
    labels[2, 3, 3] = 2
    assert list(slice_presence(labels)) == [1 | 1 << 4, 1, 1 | 1 << 12 | 1 << 2]


def test_empty_label_map_is_refused() -> None:
    s = make_series()
    s.result.labels[:] = 0
    ident = OutputIdentity.of(s.volume.series_instance_uid, s.volume.slice_uids, "1")
    with pytest.raises(ValueError, match="empty"):
        build_seg(s.datasets, s.volume, s.result, ident)


def test_missing_source_is_refused() -> None:
    s = make_series()
    ident = OutputIdentity.of(s.volume.series_instance_uid, s.volume.slice_uids, "1")
    with pytest.raises(ValueError, match="no source dataset"):
        build_seg(s.datasets[1:], s.volume, s.result, ident)


def test_odd_frame_size_packs_bits_across_frames() -> None:
    s, seg = _build(rows=30, cols=30, spacing=6.0, blocks=((0.0, 0.0, 3),), levels=("L4-L5",))
    back = hd.seg.Segmentation.from_dataset(_roundtrip(seg))
    specs = plan_segments(s.result)  # type: ignore[attr-defined]
    arr = back.get_pixels_by_source_instance(
        source_sop_instance_uids=list(s.volume.slice_uids), segment_numbers=[sp.number for sp in specs]  # type: ignore[attr-defined]
    )
    for k, spec in enumerate(specs):
        np.testing.assert_array_equal(arr[..., k] > 0, spec.mask(s.result.labels))  # type: ignore[attr-defined]
