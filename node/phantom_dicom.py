"""Write synthetic lumbar MR studies (from :mod:`ai.phantom`) as DICOM, with their truth.

Per subject one study folder ``<out>/PHANTOM_<seed>_<n>/``:

* ``ax/``: the axial T2 series "T2 TSE AX" (MR Image Storage, uint16), one tilted block of
  3-5 slices per disc level (each block with its own ImageOrientationPatient) or a continuous
  axial stack;
* ``sag/``: optionally a sagittal T2 series "T2 TSE SAG" of the same subject;
* ``other/``: optionally a non-lumbar distractor series "T2 AX BRAIN";
* ``truth.json``: per level the slice SOP Instance UIDs (caudal -> cranial), the mid-disc
  slice, structure CSAs (mm2), fat fractions (%), Schizas grade, DSCA, rootlets / cord;
* ``labels.npz``: the label map of every axial slice, keyed by SOP Instance UID.

Everything is deterministic for a seed (UIDs included). Patient names and IDs are fake
(``PHANTOM^<seed><n>``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from ai.phantom import sample_subject
from ai.phantom.anatomy import DEFAULT_LEVELS, Subject
from ai.phantom.study import (
    AXIAL_GAP_MM,
    AXIAL_THICKNESS_MM,
    COSINE_DECIMALS,
    MM_DECIMALS,
    render_axial_series,
    render_brain,
    render_sagittal,
)
from node import __version__

logger = logging.getLogger(__name__)

MANUFACTURER = "lumbar-node phantom"
AXIAL_DESCRIPTION = "T2 TSE AX"
SAGITTAL_DESCRIPTION = "T2 TSE SAG"
DISTRACTOR_DESCRIPTION = "T2 AX BRAIN"
STUDY_DATE = dt.date(2026, 1, 5)
SAGITTAL_MATRIX = (256, 256)
SAGITTAL_SPACING_MM = 1.1
SAGITTAL_SLICES_X_MM = (-8.0, -4.0, 0.0, 4.0, 8.0)


@dataclass(frozen=True)
class PhantomOptions:
    """Options of ``lumbar-node phantom`` (validated at construction)."""

    seed: int = 0
    subjects: int = 1
    levels: tuple[str, ...] = DEFAULT_LEVELS
    stenosis: str = "random"
    mode: str = "realistic"
    matrix: int = 320
    spacing: float = 0.7
    sagittal: bool = True
    distractor: bool = True
    continuous: bool = False
    slices_per_block: int | None = None  # None: 3..5 drawn per subject

    def __post_init__(self) -> None:
        if self.subjects < 1:
            raise ValueError(f"subjects must be >= 1, got {self.subjects}")
        if self.mode not in ("realistic", "randomised"):
            raise ValueError(f"mode must be realistic or randomised, got {self.mode!r}")
        if not 64 <= self.matrix <= 1024:
            raise ValueError(f"matrix must be 64..1024, got {self.matrix}")
        if not 0.2 <= self.spacing <= 2.0:
            raise ValueError(f"spacing must be 0.2..2.0 mm, got {self.spacing}")
        if self.slices_per_block is not None and not 3 <= self.slices_per_block <= 5:
            raise ValueError("slices_per_block must be 3..5")


@dataclass
class _StudyIds:
    seed: int
    index: int
    patient_name: str
    patient_id: str
    study_uid: str
    frame_uid: str
    date: str
    entropy: list[str] = field(default_factory=list)

    def uid(self, *parts: object) -> str:
        return str(generate_uid(entropy_srcs=[*self.entropy, *(str(p) for p in parts)]))


def _ids(seed: int, index: int) -> _StudyIds:
    tag = f"{seed:04d}{index + 1:03d}"
    entropy = ["lumbar-node-phantom", str(seed), str(index)]
    date = (STUDY_DATE + dt.timedelta(days=index)).strftime("%Y%m%d")
    return _StudyIds(
        seed,
        index,
        f"PHANTOM^{tag}",
        f"PHANTOM{tag}",
        str(generate_uid(entropy_srcs=[*entropy, "study"])),
        str(generate_uid(entropy_srcs=[*entropy, "frame"])),
        date,
        entropy,
    )


def _base_dataset(
    ids: _StudyIds,
    series_uid: str,
    series_number: int,
    description: str,
    sop_uid: str,
    body_part: str,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage  # type: ignore[assignment]
    meta.MediaStorageSOPInstanceUID = sop_uid  # type: ignore[assignment]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = ids.date
    ds.StudyTime = "090000"
    ds.SeriesTime = f"09{series_number:02d}00"
    ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = f"PHA{ids.seed:04d}{ids.index + 1:03d}"
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic"
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = "0"
    ds.InstitutionName = "Phantom Hospital"
    ds.StationName = "PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI LUMBAR SPINE (PHANTOM)"
    ds.SeriesDescription = description
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = ids.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "tse2d1_16"
    ds.RepetitionTime = 4000.0
    ds.EchoTime = 100.0
    ds.EchoTrainLength = 16
    ds.NumberOfAverages = 2.0
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = 1.5
    ds.FlipAngle = 150.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _set_pixels(ds: Dataset, image: np.ndarray) -> None:
    px = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    lo, hi = float(np.percentile(px, 1)), float(np.percentile(px, 99.5))
    ds.WindowCenter = f"{(lo + hi) / 2:.0f}"
    ds.WindowWidth = f"{max(hi - lo, 1.0):.0f}"
    ds.PixelData = px.tobytes()


def _set_plane(
    ds: Dataset,
    ipp: tuple[float, float, float],
    row_dir: tuple[float, ...],
    col_dir: tuple[float, ...],
    spacing: tuple[float, float],
    thickness: float,
    between: float,
) -> None:
    ds.ImagePositionPatient = [f"{v:.{MM_DECIMALS}f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.{COSINE_DECIMALS}f}" for v in (*row_dir, *col_dir)]
    ds.PixelSpacing = [f"{spacing[0]:.{MM_DECIMALS}f}", f"{spacing[1]:.{MM_DECIMALS}f}"]
    ds.SliceThickness = f"{thickness:.2f}"
    ds.SpacingBetweenSlices = f"{between:.2f}"
    normal = np.cross(np.asarray(row_dir), np.asarray(col_dir))
    ds.SliceLocation = f"{float(np.dot(normal, ipp)):.4f}"


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_study(
    out: Path, subject: Subject, ids: _StudyIds, opts: PhantomOptions, rng: np.random.Generator
) -> Path:
    """Write one subject's study folder; returns its path."""
    folder = out / f"PHANTOM_{ids.seed:04d}_{ids.index + 1:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    axials = render_axial_series(subject, opts.mode, opts.matrix, opts.spacing, rng,
                                 continuous=opts.continuous, slices_per_block=opts.slices_per_block)
    series_uid = ids.uid("series", "ax")
    labels: dict[str, np.ndarray] = {}
    slice_truth: list[dict[str, Any]] = []
    for k, axial in enumerate(axials):
        ps, s, ipp = axial.plan, axial.rendered, axial.position
        sop = ids.uid("ax", k)
        ds = _base_dataset(ids, series_uid, 2, AXIAL_DESCRIPTION, sop, "LSPINE")
        ds.InstanceNumber = k + 1
        _set_plane(
            ds,
            ipp,
            ps.row_dir,
            ps.col_dir,
            s.pixel_spacing,
            AXIAL_THICKNESS_MM,
            AXIAL_THICKNESS_MM + AXIAL_GAP_MM,
        )
        _set_pixels(ds, s.image)
        _write(ds, folder / "ax" / f"IM{k + 1:04d}.dcm")
        labels[sop] = s.labels
        t = dict(s.truth)
        t.update(
            sop_instance_uid=sop,
            index=k,
            instance_number=k + 1,
            block=ps.block,
            image_position_patient=list(ipp),
            image_orientation_patient=[*ps.row_dir, *ps.col_dir],
        )
        slice_truth.append(t)
    np.savez_compressed(folder / "labels.npz", **labels)  # type: ignore[arg-type]
    series: list[dict[str, Any]] = [
        {
            "series_instance_uid": series_uid,
            "description": AXIAL_DESCRIPTION,
            "role": "axial",
            "n_instances": len(axials),
        }
    ]
    if opts.sagittal:
        series.append(_write_sagittal(folder, subject, ids, rng))
    if opts.distractor:
        series.append(_write_distractor(folder, ids, rng))
    truth = {
        "schema": "lumbar-node-phantom/1",
        "seed": ids.seed,
        "subject_index": ids.index,
        "patient_name": ids.patient_name,
        "patient_id": ids.patient_id,
        "study_instance_uid": ids.study_uid,
        "mode": opts.mode,
        "layout": "continuous" if opts.continuous else "blocks",
        "series": series,
        "subject": {
            "habitus": subject.habitus,
            "atrophy": subject.atrophy,
            "scoliosis_deg": subject.scoliosis_deg,
            "subcutaneous_fat_posterior_mm": subject.subcut_post_mm,
        },
        "levels": _level_truth(subject, slice_truth),
        "slices": slice_truth,
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True))
    logger.info(
        "phantom study written: %s (%d axial slices, study %s)",
        folder.name,
        len(axials),
        ids.study_uid,
    )
    return folder


def _level_truth(subject: Subject, slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level (caudal -> cranial): its slices and the truth of its mid-disc slice."""
    out = []
    for name in subject.level_names:
        mine = [s for s in slices if s["level"] == name and s["kind"] == "disc"]
        if not mine:
            continue
        mid = min(mine, key=lambda s: abs(s["offset_mm"]))
        lv = subject.levels[name]
        out.append(
            {
                "level": name,
                "slice_uids": [s["sop_instance_uid"] for s in mine],
                "slice_indices": [s["index"] for s in mine],
                "mid_disc_uid": mid["sop_instance_uid"],
                "mid_disc_index": mid["index"],
                "schizas": mid["schizas"],
                "schizas_subgrade": mid["schizas_subgrade"],
                "severity": mid["severity"],
                "dsca_mm2": mid["dsca_mm2"],
                "dsca_grade": mid["dsca_grade"],
                "canal_mm2": mid["canal_mm2"],
                "rootlets": mid["rootlets"],
                "posterior_epidural_fat": mid["posterior_epidural_fat"],
                "csa_mm2": mid["csa_mm2"],
                "fat_fraction_pct": mid["fat_fraction_pct"],
                "disc_degeneration": mid["disc_degeneration"],
                "tilt_deg": lv.tilt_deg,
                "disc_centre_patient_mm": [lv.canal_x_mm, lv.canal_y_mm, lv.z_mm],
            }
        )
    return out


def _write_sagittal(
    folder: Path, subject: Subject, ids: _StudyIds, rng: np.random.Generator
) -> dict[str, Any]:
    uid = ids.uid("series", "sag")
    zs = [lv.z_mm for lv in subject.levels.values()]
    ys = [lv.canal_y_mm for lv in subject.levels.values()]
    centre = (float(np.mean(ys)) + 10.0, float(np.mean(zs)))
    row_dir, col_dir = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
    for k, x in enumerate(SAGITTAL_SLICES_X_MM):
        img, ipp = render_sagittal(subject, x, SAGITTAL_MATRIX, SAGITTAL_SPACING_MM, centre, rng)
        ds = _base_dataset(ids, uid, 1, SAGITTAL_DESCRIPTION, ids.uid("sag", k), "LSPINE")
        ds.InstanceNumber = k + 1
        _set_plane(ds, ipp, row_dir, col_dir, (SAGITTAL_SPACING_MM, SAGITTAL_SPACING_MM), 3.5, 4.0)
        _set_pixels(ds, img)
        _write(ds, folder / "sag" / f"IM{k + 1:04d}.dcm")
    return {
        "series_instance_uid": uid,
        "description": SAGITTAL_DESCRIPTION,
        "role": "sagittal",
        "n_instances": len(SAGITTAL_SLICES_X_MM),
    }


def _write_distractor(folder: Path, ids: _StudyIds, rng: np.random.Generator) -> dict[str, Any]:
    uid = ids.uid("series", "brain")
    n = 3
    for k in range(n):
        img = render_brain((192, 192), 1.2, rng)
        ds = _base_dataset(ids, uid, 9, DISTRACTOR_DESCRIPTION, ids.uid("brain", k), "BRAIN")
        ds.InstanceNumber = k + 1
        z = 700.0 + 5.0 * k
        _set_plane(ds, (-114.6, -114.6, z), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.2, 1.2), 5.0, 5.0)
        _set_pixels(ds, img)
        _write(ds, folder / "other" / f"IM{k + 1:04d}.dcm")
    return {
        "series_instance_uid": uid,
        "description": DISTRACTOR_DESCRIPTION,
        "role": "distractor",
        "n_instances": n,
    }


def write_phantom_studies(out: Path, opts: PhantomOptions) -> list[Path]:
    """Write ``opts.subjects`` studies under ``out``; deterministic for ``opts.seed``."""
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for i in range(opts.subjects):
        rng = np.random.default_rng([opts.seed, i])
        subject = sample_subject(rng, stenosis=opts.stenosis, levels=opts.levels)
        folders.append(write_study(out, subject, _ids(opts.seed, i), opts, rng))
    return folders
