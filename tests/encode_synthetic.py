"""Small synthetic inputs for the encoder tests: MR series, Volume, label map, SeriesResult.

Geometry is consistent: each block is a stack of parallel axial slices, tilted about the
patient x axis by its own angle (one block per disc, as in lumbar protocols). Labels are
ellipses at the phantom layout positions of the clinical spec (section 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ai.labels import Label
from ai.results import LevelResult, SeriesResult, Stenosis, StructureMeasurement
from ai.volume import Volume

UID_PREFIX = "1.2.826.0.1.3680043.8.498."

#: label -> (centre x mm, centre y mm, semi-axis x, semi-axis y); LPS, origin at canal centre.
_ELLIPSES: dict[Label, tuple[float, float, float, float]] = {
    Label.DISC: (0.0, -27.0, 27.0, 19.0),
    Label.DURAL_SAC: (0.0, 0.0, 8.0, 6.0),
    Label.MULTIFIDUS_LEFT: (16.0, 33.0, 10.0, 18.0),
    Label.MULTIFIDUS_RIGHT: (-16.0, 33.0, 10.0, 18.0),
    Label.ERECTOR_SPINAE_LEFT: (48.0, 30.0, 14.0, 22.0),
    Label.ERECTOR_SPINAE_RIGHT: (-48.0, 30.0, 14.0, 22.0),
    Label.PSOAS_LEFT: (50.0, -22.0, 18.0, 16.0),
    Label.PSOAS_RIGHT: (-50.0, -22.0, 18.0, 16.0),
}


@dataclass
class SyntheticSeries:
    """A synthetic MR series with everything the encoder needs."""

    datasets: list[Dataset]
    volume: Volume
    result: SeriesResult


def _rotation_x(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]]
    )


def make_series(
    *,
    rows: int = 64,
    cols: int = 64,
    spacing: float = 3.0,
    blocks: Sequence[tuple[float, float, int]] = ((-40.0, 8.0, 3), (0.0, 0.0, 3)),
    levels: Sequence[str | None] = ("L4-L5", "L3-L4"),
    slice_gap: float = 4.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    with_pixels: bool = True,
) -> SyntheticSeries:
    """Build classic single-frame MR images, the volume and a hand-made result.

    Parameters
    ----------
    blocks
        ``(centre z in mm, tilt about x in degrees, number of slices)`` per block, caudal
        block first.
    levels
        Level name (or ``None``) per block; one ``LevelResult`` per block.
    """
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid(prefix=UID_PREFIX, entropy_srcs=[f"study{seed}"])
    series_uid = series_uid or generate_uid(prefix=UID_PREFIX, entropy_srcs=[f"series{seed}"])
    frame_uid = generate_uid(prefix=UID_PREFIX, entropy_srcs=[f"for{seed}"])
    datasets: list[Dataset] = []
    positions: list[np.ndarray] = []
    orientations: list[np.ndarray] = []
    label_slices: list[np.ndarray] = []
    pixel_slices: list[np.ndarray] = []
    level_slices: list[list[int]] = []
    jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
    index = 0
    for centre_z, tilt, n in blocks:
        rot = _rotation_x(tilt)
        row_dir = rot @ np.array([1.0, 0.0, 0.0])
        col_dir = rot @ np.array([0.0, 1.0, 0.0])
        normal = np.cross(row_dir, col_dir)
        indices = []
        for k in range(n):
            offset = (k - (n - 1) / 2.0) * slice_gap
            centre = np.array([0.0, 0.0, centre_z]) + normal * offset
            origin = centre - row_dir * spacing * (cols - 1) / 2 - col_dir * spacing * (rows - 1) / 2
            # in-plane mm coordinates of each pixel (x along rows' direction, y along columns')
            x = (jj - (cols - 1) / 2) * spacing
            y = (ii - (rows - 1) / 2) * spacing
            lab = np.zeros((rows, cols), np.uint8)
            for label, (cx, cy, ax, ay) in _ELLIPSES.items():
                lab[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0] = int(label)
            img = (200 + 300 * (lab > 0) + rng.normal(0, 20, lab.shape)).clip(0, 4000)
            label_slices.append(lab)
            pixel_slices.append(img.astype(np.float32))
            positions.append(origin)
            orientations.append(np.concatenate([row_dir, col_dir]))
            indices.append(index)
            index += 1
        level_slices.append(indices)
    for i, (pos, ori, img) in enumerate(zip(positions, orientations, pixel_slices, strict=True)):
        datasets.append(
            _mr_dataset(
                i, pos, ori, img, rows, cols, spacing, study_uid, series_uid, frame_uid,
                with_pixels=with_pixels,
            )
        )
    volume = Volume(
        pixels=np.stack(pixel_slices),
        pixel_spacing=(spacing, spacing),
        positions=np.array(positions),
        orientations=np.array(orientations),
        slice_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        series_instance_uid=series_uid,
        slice_thickness=3.0,
    )
    result = make_result(series_uid, np.stack(label_slices), level_slices, levels)
    return SyntheticSeries(datasets, volume, result)


def _mr_dataset(
    i: int,
    pos: np.ndarray,
    ori: np.ndarray,
    img: np.ndarray,
    rows: int,
    cols: int,
    spacing: float,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    *,
    with_pixels: bool,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    sop_uid = generate_uid(prefix=UID_PREFIX, entropy_srcs=[series_uid, str(i)])
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "Phantom^Lumbar"
    ds.PatientID = "PH0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 5
    ds.SeriesDescription = "T2 TSE AX"
    ds.Manufacturer = "Synthetic"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = i + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 100
    ds.RepetitionTime = 4000
    ds.EchoTrainLength = 16
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = 3.0
    ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
    ds.ImageOrientationPatient = [round(float(v), 8) for v in ori]
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if with_pixels:
        ds.PixelData = img.astype(np.uint16).tobytes()
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    return ds


def make_result(
    series_uid: str,
    labels: np.ndarray,
    level_slices: Sequence[Sequence[int]],
    levels: Sequence[str | None],
) -> SeriesResult:
    """A plausible :class:`SeriesResult` with one level per slice group."""
    out: list[LevelResult] = []
    for position, (indices, name) in enumerate(zip(level_slices, levels, strict=True), start=1):
        measurements = {
            "disc": StructureMeasurement(csa_mm2=1600.0 + position),
            "dural_sac": StructureMeasurement(csa_mm2=120.5 - 30 * position),
            "spinal_canal": StructureMeasurement(csa_mm2=210.25),
        }
        for k, muscle in enumerate(
            ("psoas_left", "psoas_right", "multifidus_left", "multifidus_right",
             "erector_spinae_left", "erector_spinae_right")
        ):
            csa = 900.0 + 50 * k + position
            measurements[muscle] = StructureMeasurement(
                csa_mm2=csa,
                fcsa_mm2=csa * 0.8,
                fat_fraction_pct=20.0,
                mean_si=410.5 + k,
                si_ratio_to_fat=0.45,
                outline_contrast=0.8 if muscle.startswith("psoas") else None,
            )
        grade = ("A", "B", "C", "D")[(position - 1) % 4]
        severity = {"A": "normal/mild", "B": "moderate"}.get(grade, "severe")
        dsca = 120.5 - 30 * position
        out.append(
            LevelResult(
                level=name,
                position=position,
                slice_indices=list(indices),
                level_confidence=0.9 if name else 0.3,
                measurements=measurements,
                asymmetry_pct={"psoas": 5.3, "multifidus": 5.0, "erector_spinae": 4.5},
                kjaer_grade={"multifidus_left": 1, "multifidus_right": 1},
                stenosis=Stenosis(
                    schizas=grade,
                    schizas_probabilities={g: 0.25 for g in "ABCD"},
                    dsca_mm2=dsca,
                    dsca_grade="normal" if dsca >= 100 else ("relative" if dsca >= 75 else "absolute"),
                    severity=severity,
                    rootlets="rootlets",
                    rootlets_probability=0.93,
                    confidence=0.81,
                ),
            )
        )
    return SeriesResult(
        series_instance_uid=series_uid,
        model_name="lumbar-unet",
        model_version="1.0.0",
        labels=labels,
        levels=out,
        flags=["synthetic input"],
    )


def write_series(series: SyntheticSeries, folder: str) -> list[str]:
    """Write the source images as files; returns the paths."""
    paths = []
    for ds in series.datasets:
        path = f"{folder}/{ds.SOPInstanceUID}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_series(
    out: str,
    *,
    seed: int = 4,
    matrix: int = 128,
    spacing: float = 1.4,
    levels: str = "L4-L5,L5-S1",
    unname: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> SyntheticSeries:
    """A phantom study from ``lumbar-node phantom`` with its truth as the SeriesResult.

    ``unname`` lists level names reported as unlabelled (``level=None``) in the result.
    """
    import json
    from pathlib import Path

    from node.cli import main
    from node.volume_io import load_volume

    rc = main(["phantom", "--out", out, "--seed", str(seed), "--subjects", "1",
               "--matrix", str(matrix), "--spacing", str(spacing), "--levels", levels, *extra_args])
    if rc != 0:
        raise RuntimeError(f"lumbar-node phantom failed with {rc}")
    study = next(Path(out).glob("PHANTOM_*"))
    volume, datasets = load_volume(sorted((study / "ax").glob("*.dcm")))
    npz = np.load(study / "labels.npz")
    labels = np.stack([npz[uid] for uid in volume.slice_uids]).astype(np.uint8)
    truth = json.loads((study / "truth.json").read_text())
    index = {uid: i for i, uid in enumerate(volume.slice_uids)}
    out_levels: list[LevelResult] = []
    by_z = sorted(truth["levels"], key=lambda t: min(index[u] for u in t["slice_uids"]))
    for position, t in enumerate(by_z, start=1):
        measurements = {}
        for key, csa in t["csa_mm2"].items():
            if csa <= 0:
                continue
            ff = t.get("fat_fraction_pct", {}).get(key)
            measurements[key] = StructureMeasurement(
                csa_mm2=float(csa),
                fcsa_mm2=float(csa) * (1 - ff / 100) if ff is not None else None,
                fat_fraction_pct=ff,
                mean_si=300.0 + position if ff is not None else None,
                si_ratio_to_fat=0.4 if ff is not None else None,
                outline_contrast=0.7 if key.startswith("psoas") else None,
            )
        dsca = float(t["dsca_mm2"])
        out_levels.append(
            LevelResult(
                level=None if t["level"] in unname else t["level"],
                position=position,
                slice_indices=sorted(index[u] for u in t["slice_uids"]),
                level_confidence=0.95,
                measurements=measurements,
                asymmetry_pct={"multifidus": 12.5},
                kjaer_grade={"multifidus_left": 1, "multifidus_right": 1},
                stenosis=Stenosis(
                    schizas=t["schizas"],
                    schizas_probabilities={g: (1.0 if g == t["schizas"] else 0.0) for g in "ABCD"},
                    dsca_mm2=dsca,
                    dsca_grade=t["dsca_grade"],
                    severity=t["severity"],
                    rootlets=t["rootlets"],
                    rootlets_probability=0.9,
                    confidence=0.8,
                ),
            )
        )
    result = SeriesResult(
        series_instance_uid=volume.series_instance_uid,
        model_name="lumbar-unet",
        model_version="1.0.0",
        labels=labels,
        levels=out_levels,
        flags=[],
    )
    return SyntheticSeries(datasets, volume, result)
