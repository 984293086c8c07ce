"""node.instances.summarize: the header summary kept per instance (classic and enhanced MR)."""

from __future__ import annotations

import json

import pytest
from conftest import SAGITTAL_IOP, make_mr_dataset
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.instances import InstanceRecord, summarize

STUDY = "1.2.826.0.1.3680043.99.7"


def classic_series(n: int = 4, **options: object) -> list[Dataset]:
    series = generate_uid()
    datasets = [make_mr_dataset(study_uid=STUDY, series_uid=series, index=i, **options) for i in range(n)]  # type: ignore[arg-type]
    for ds in datasets:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return datasets


def test_classic_mr_summary() -> None:
    ds = classic_series(3, orientation=SAGITTAL_IOP, echo_number=2)[2]
    meta = summarize(ds)
    assert meta["ImageOrientationPatient"] == list(SAGITTAL_IOP)
    assert meta["ImagePositionPatient"] == pytest.approx([-20.8, -12.8, 0.0])  # 2 slices of 4 mm along the normal (-x)
    assert meta["PixelSpacing"] == [0.8, 0.8]
    assert meta["SliceThickness"] == 4.0
    assert meta["EchoNumbers"] == 2
    assert (meta["Rows"], meta["Columns"], meta["BitsAllocated"]) == (32, 32, 16)
    assert meta["NumberOfFrames"] is None
    assert meta["InstanceNumber"] == 3
    assert meta["ImageType"] == ["ORIGINAL", "PRIMARY", "OTHER"]
    assert meta["BodyPartExamined"] == "LSPINE"
    assert "frames" not in meta
    text = json.dumps(meta)  # JSON-safe, no patient data
    assert "Test^Lumbar" not in text and "TEST0001" not in text and "19700101" not in text


def test_bad_values_become_null_instead_of_failing() -> None:
    ds = classic_series(1)[0]
    ds.ImageOrientationPatient = [1, 0, 0]  # wrong count
    tag = 0x00280030  # PixelSpacing as received: an invalid DS value
    ds[tag] = RawDataElement(Tag(tag), "DS", 6, b"abc\\1 ", 0, False, True)  # type: ignore[assignment]
    del ds.EchoNumbers
    meta = summarize(ds)
    assert meta["ImageOrientationPatient"] is None
    assert meta["PixelSpacing"] is None
    assert meta["EchoNumbers"] is None


def test_enhanced_mr_frames_from_functional_groups() -> None:
    sources = classic_series(4)
    enhanced = LegacyConvertedEnhancedMRImage(
        legacy_datasets=sources,
        series_instance_uid=generate_uid(),
        series_number=10,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    meta = summarize(enhanced)
    assert meta["NumberOfFrames"] == 4
    frames = meta["frames"]
    assert len(frames) == 4
    assert all(f["iop"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] for f in frames)
    assert sorted(f["ipp"][2] for f in frames) == pytest.approx([0.0, 4.0, 8.0, 12.0])
    assert meta["PixelSpacing"] == [0.8, 0.8]  # from the shared Pixel Measures
    assert meta["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    record = InstanceRecord("1", "2", "3", "4", "5", "p", "h", 1, None, None, 0.0, "MR", meta)
    assert record.number_of_frames == 4 and len(record.frames) == 4


def test_enhanced_mr_echo_per_frame() -> None:
    ds = Dataset()
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 3.0
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i, te in enumerate((10.0, 90.0, 10.0, 90.0)):
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0, 0, float(i // 2) * 3.0]
        frame.PlanePositionSequence = Sequence([position])
        echo = Dataset()
        echo.EffectiveEchoTime = te
        frame.MREchoSequence = Sequence([echo])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = i // 2 + 1
        frame.FrameContentSequence = Sequence([content])
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = 4
    meta = summarize(ds)
    assert [f["echo"] for f in meta["frames"]] == [10.0, 90.0, 10.0, 90.0]
    assert [f["in_stack_position"] for f in meta["frames"]] == [1, 1, 2, 2]
    assert meta["frames"][3]["ipp"] == [0.0, 0.0, 3.0]
    assert meta["frames"][0]["iop"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert (meta["PixelSpacing"], meta["SliceThickness"]) == ([0.5, 0.5], 3.0)
