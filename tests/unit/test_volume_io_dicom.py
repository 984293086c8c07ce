"""node.volume_io: classic, enhanced multi-frame and compressed MR give the same volume."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from ai.labels import Label
from ai.realdata import iter_cases
from node.errors import InvalidInstance
from node.volume_io import load_volume

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
N, ROWS, COLS = 4, 24, 20
SPACING = (0.7, 0.9)
ORIENT = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, size=(N, ROWS, COLS), dtype=np.uint16)


def _base(sop_class: str, series: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series
    ds.Modality = "MR"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "TEST", "TEST^VOLUME", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _z(k: int) -> float:
    return -20.0 + 5.0 * k


def write_classic(folder: Path, *, rle: bool = False, shuffle: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    px = _pixels()
    series = "1.2.3.4"
    order = [2, 0, 3, 1] if shuffle else list(range(N))
    paths = []
    for k in order:
        ds = _base(MR, series)
        ds.ImagePositionPatient = [-10.0, -12.0, _z(k)]
        ds.ImageOrientationPatient = ORIENT
        ds.PixelSpacing = list(SPACING)
        ds.SliceThickness = 4.0
        ds.RescaleSlope, ds.RescaleIntercept = 2.0, -5.0
        ds.PixelData = px[k].tobytes()
        if rle:
            ds.compress(RLELossless)
        p = folder / f"{k}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_enhanced(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    px = _pixels()
    ds = _base(ENHANCED_MR, "1.2.3.4")
    ds.NumberOfFrames = N
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = list(SPACING)
    pm.SliceThickness = 4.0
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = ORIENT
    shared.PlaneOrientationSequence = Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    order = [3, 1, 0, 2]  # frames stored out of anatomical order
    for k in order:
        f = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-10.0, -12.0, _z(k)]
        f.PlanePositionSequence = Sequence([pp])
        pv = Dataset()
        pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 2.0, -5.0, "US"
        f.PixelValueTransformationSequence = Sequence([pv])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = px[order].tobytes()
    p = folder / "enhanced.dcm"
    ds.save_as(p, enforce_file_format=True)
    return [p]


def test_classic_series_sorted_caudal_to_cranial_with_rescale(tmp_path: Path) -> None:
    vol, datasets = load_volume(write_classic(tmp_path / "c"))
    assert vol.pixels.shape == (N, ROWS, COLS)
    assert np.all(np.diff(vol.positions[:, 2]) > 0)
    assert np.allclose(vol.pixels, _pixels().astype(np.float32) * 2.0 - 5.0)
    assert vol.pixel_spacing == SPACING
    assert vol.slice_thickness == 4.0
    assert len(datasets) == N and datasets[0].SOPInstanceUID == vol.slice_uids[0]


def test_enhanced_and_compressed_give_the_same_volume(tmp_path: Path) -> None:
    classic, _ = load_volume(write_classic(tmp_path / "c"))
    enhanced, ds_e = load_volume(write_enhanced(tmp_path / "e"))
    rle, _ = load_volume(write_classic(tmp_path / "r", rle=True))
    for other in (enhanced, rle):
        assert np.array_equal(other.pixels, classic.pixels)
        assert np.allclose(other.positions, classic.positions)
        assert np.allclose(other.orientations, classic.orientations)
        assert other.pixel_spacing == classic.pixel_spacing
    assert len(ds_e) == 1
    assert enhanced.frame_numbers == (3, 2, 4, 1)  # frame k of the file holds slice order[k-1]


def test_bad_geometry_is_refused_with_a_reason(tmp_path: Path) -> None:
    paths = write_classic(tmp_path / "c", shuffle=False)
    import pydicom

    ds = pydicom.dcmread(paths[1])
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # not orthogonal
    ds.save_as(paths[1])
    with pytest.raises(InvalidInstance, match="orthonormal"):
        load_volume(paths)
    ds.ImageOrientationPatient = ORIENT
    ds.ImagePositionPatient = [-10.0, -12.0, _z(0)]  # same position as slice 0
    ds.save_as(paths[1])
    with pytest.raises(InvalidInstance, match="same position"):
        load_volume(paths)
    ds.ImagePositionPatient = [-10.0, -12.0, _z(1)]
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(paths[1])
    with pytest.raises(InvalidInstance, match="PixelSpacing"):
        load_volume(paths)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(InvalidInstance, match="not a readable DICOM"):
        load_volume([tmp_path / "junk.dcm"])


def test_dicom_series_with_seg_is_read_as_a_case(tmp_path: Path) -> None:
    case = tmp_path / "case1"
    paths = write_classic(case / "dicom")  # shuffled file order
    sources = [pydicom.dcmread(p) for p in paths]
    mask = np.zeros((len(sources), ROWS, COLS), dtype=bool)
    marked = {}
    for i, ds in enumerate(sources):
        mask[i, 2 + i : 6 + i, 3:9] = True  # a different box per source image
        marked[str(ds.SOPInstanceUID)] = mask[i].copy()
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Multifidus left",
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Muscle,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )
    seg.save_as(case / "seg.dcm")
    (got,) = list(iter_cases(tmp_path, volume_loader=lambda p: load_volume(p)))
    assert got.truth_labels.shape == (N, ROWS, COLS)
    for k, uid in enumerate(got.volume.slice_uids):
        expected = np.where(marked[uid], int(Label.MULTIFIDUS_LEFT), 0)
        assert np.array_equal(got.truth_labels[k], expected)
