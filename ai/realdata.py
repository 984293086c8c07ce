"""Real labelled data for site fine-tuning and evaluation: the documented folder format.

::

    DATA/
      <case-id>/                       one folder per axial series
        image.nii.gz  + labels.nii.gz  NIfTI pair: labels on the image grid, values of
                                       ai.labels.Label (0 background ... 12 subcutaneous fat)
      <case-id>/                       or DICOM:
        dicom/*.dcm                    the axial series (any transfer syntax)
        seg.dcm                        DICOM SEG (binary or fractional) referencing it; each
                                       segment's SegmentLabel is a Label name
                                       ("MULTIFIDUS_LEFT") or display name ("Multifidus left")

NIfTI volumes are read with nibabel; slices run along the third array axis, the slice
image is ``data[:, :, k].T`` (rows = second axis), and the geometry comes from the affine
(RAS+ converted to DICOM LPS). DICOM series are read by the node (``ai`` never imports
``node``): callers pass a ``volume_loader`` that turns a list of files into
``(Volume, datasets)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ai.card import ModelCard
from ai.errors import InputError
from ai.evaluate import EvalCase
from ai.inference import pre_process_slice
from ai.labels import DISPLAY_NAMES, NUM_CLASSES, Label
from ai.model_grid import labels_to_model
from ai.volume import Volume

logger = logging.getLogger(__name__)

NIFTI_IMAGE = ("image.nii.gz", "image.nii")
NIFTI_LABELS = ("labels.nii.gz", "labels.nii")
DICOM_DIR = "dicom"
SEG_FILE = "seg.dcm"
_LPS = np.diag([-1.0, -1.0, 1.0])

VolumeLoader = Callable[[list[Path]], tuple[Volume, list[Any]]]


class RealDataError(InputError):
    """A case folder does not follow the documented format (the message says why)."""


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def nifti_case(folder: Path) -> tuple[Volume, np.ndarray]:
    """Read a NIfTI image + label map pair into a Volume and a label array."""
    import nibabel as nib

    img_path, lab_path = _first(folder, NIFTI_IMAGE), _first(folder, NIFTI_LABELS)
    if img_path is None or lab_path is None:
        raise RealDataError(f"{folder}: needs image.nii[.gz] and labels.nii[.gz]")
    img = nib.load(str(img_path))
    lab = nib.load(str(lab_path))
    data = np.asarray(img.dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    labels = np.asarray(lab.dataobj)  # type: ignore[attr-defined]
    if data.ndim != 3 or data.shape != labels.shape:
        raise RealDataError(f"{folder}: image {data.shape} and labels {labels.shape} must be equal 3D")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise RealDataError(f"{folder}: label values must be 0..{NUM_CLASSES - 1}")
    affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    col_vec = _LPS @ affine[:3, 0]  # along the first array axis = image columns
    row_vec = _LPS @ affine[:3, 1]  # along the second array axis = image rows
    cs, rs = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    orientation = np.concatenate([col_vec / cs, row_vec / rs])
    n = data.shape[2]
    positions = np.stack([_LPS @ (affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]) for k in range(n)])
    pixels = np.stack([data[:, :, k].T for k in range(n)])
    lab3 = np.stack([labels[:, :, k].T for k in range(n)]).astype(np.uint8)
    order = np.argsort(positions[:, 2], kind="stable")
    vol = Volume(
        pixels=pixels[order],
        pixel_spacing=(rs, cs),
        positions=positions[order],
        orientations=np.tile(orientation, (n, 1)),
        slice_uids=tuple(f"{folder.name}.{int(k)}" for k in order),
        series_instance_uid=folder.name,
    )
    return vol, lab3[order]


def _segment_label(text: str) -> Label:
    key = text.strip().lower()
    for lab in Label:
        if lab.name.lower() == key or DISPLAY_NAMES.get(lab, "").lower() == key:
            return lab
    raise RealDataError(f"segment label {text!r} is not a Label name or display name")


def seg_to_labels(seg: Any, volume: Volume) -> np.ndarray:
    """Rasterise a DICOM SEG dataset onto a volume's slices (by referenced SOP + frame)."""
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    seg_type = str(seg.get("SegmentationType", "BINARY"))
    if seg_type == "FRACTIONAL":
        frames = frames >= (int(seg.get("MaximumFractionalValue", 255)) / 2)
    elif seg_type != "BINARY":
        raise RealDataError(f"SEG type {seg_type} is not supported (binary or fractional)")
    seg_labels = {int(s.SegmentNumber): _segment_label(str(s.SegmentLabel)) for s in seg.SegmentSequence}
    index = {(uid, fr): k for k, (uid, fr) in enumerate(zip(volume.slice_uids, volume.frame_numbers, strict=True))}
    out = np.zeros(volume.pixels.shape, dtype=np.uint8)
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    for i, pf in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = pf if "SegmentIdentificationSequence" in pf else shared
        if ident is None or "SegmentIdentificationSequence" not in ident:
            raise RealDataError(f"SEG frame {i + 1} has no segment identification")
        seg_no = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = pf.DerivationImageSequence[0].SourceImageSequence[0]
        uid = str(src.ReferencedSOPInstanceUID)
        frame = int(src.get("ReferencedFrameNumber", 1) or 1)
        k = index.get((uid, frame))
        if k is None:
            raise RealDataError(f"SEG frame {i + 1} references {uid} frame {frame}, not in the series")
        if frames[i].shape != out.shape[1:]:
            raise RealDataError("SEG frames must be on the source image grid")
        out[k][frames[i].astype(bool)] = seg_labels[seg_no]
    return out


def dicom_case(folder: Path, volume_loader: VolumeLoader) -> tuple[Volume, np.ndarray]:
    """Read a DICOM series + DICOM SEG case."""
    import pydicom

    files = sorted(p for p in (folder / DICOM_DIR).rglob("*") if p.is_file())
    if not files or not (folder / SEG_FILE).is_file():
        raise RealDataError(f"{folder}: needs {DICOM_DIR}/ with the series and {SEG_FILE}")
    volume, _ = volume_loader(files)
    seg = pydicom.dcmread(str(folder / SEG_FILE))
    return volume, seg_to_labels(seg, volume)


def iter_cases(root: Path, volume_loader: VolumeLoader | None = None) -> Iterator[EvalCase]:
    """Every case folder under ``root`` (NIfTI or, with a loader, DICOM + SEG)."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if _first(folder, NIFTI_IMAGE) is not None:
            vol, lab = nifti_case(folder)
        elif (folder / SEG_FILE).is_file():
            if volume_loader is None:
                raise RealDataError(f"{folder}: DICOM case but no volume loader given")
            vol, lab = dicom_case(folder, volume_loader)
        else:
            logger.info("skipping %s: neither NIfTI nor DICOM + SEG", folder)
            continue
        yield EvalCase(name=folder.name, volume=vol, truth_labels=lab, mode="real")


def load_training_slices(
    root: Path, card: ModelCard, volume_loader: VolumeLoader | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Model-grid training slices (images float16, labels uint8) of every labelled slice."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for case in iter_cases(root, volume_loader):
        vol = case.volume
        for k in range(vol.n_slices):
            if not case.truth_labels[k].any():
                continue
            img, _valid, grid = pre_process_slice(vol.pixels[k], vol.orientations[k], vol.pixel_spacing, card)
            images.append(img.astype(np.float16))
            labels.append(labels_to_model(case.truth_labels[k], grid))
    if not images:
        raise RealDataError(f"{root}: no labelled slices found")
    return np.stack(images), np.stack(labels)
