"""DICOM files (classic MR and Enhanced MR multi-frame) -> :class:`ai.volume.Volume`.

Pixel data is decoded by pydicom (compressed transfer syntaxes through pylibjpeg / gdcm),
the Modality LUT (rescale slope / intercept) is applied, and the slices are sorted caudal
to cranial (ascending patient z of the slice centre). Geometry comes from the classic
Image Plane module (PS3.3 C.7.6.2) or, for multi-frame images, from the per-frame and
shared functional groups (PS3.3 C.7.6.16: Plane Position, Plane Orientation, Pixel
Measures, Pixel Value Transformation).

Anything that cannot make a coherent volume raises :class:`node.errors.InvalidInstance`
with the reason and the SOP Instance UID.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ai.volume import Volume
from node.errors import InvalidInstance

logger = logging.getLogger(__name__)

#: Tolerance on direction cosines being unit and orthogonal.
COSINE_TOLERANCE = 1e-3
#: Relative tolerance on pixel spacing agreeing across slices.
SPACING_TOLERANCE = 1e-3
#: Two slices closer than this (mm) along the normal, with the same orientation, are duplicates.
DUPLICATE_POSITION_MM = 1e-3


@dataclass
class _Frame:
    pixels: np.ndarray
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    thickness: float | None
    sop_uid: str
    frame_number: int
    dataset_index: int


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))


def _floats(value: object, n: int, what: str, ds: Dataset) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise InvalidInstance(f"{_uid(ds)}: {what} is not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InvalidInstance(f"{_uid(ds)}: {what} must be {n} finite numbers, got {value!r}")
    return arr


def _check_orientation(ori: np.ndarray, ds: Dataset) -> None:
    r, c = ori[:3], ori[3:]
    if (
        abs(np.linalg.norm(r) - 1) > COSINE_TOLERANCE
        or abs(np.linalg.norm(c) - 1) > COSINE_TOLERANCE
        or abs(float(np.dot(r, c))) > COSINE_TOLERANCE
    ):
        raise InvalidInstance(
            f"{_uid(ds)}: ImageOrientationPatient {ori.tolist()} is not two orthonormal vectors"
        )


def _spacing(seq_item: Dataset | None, ds: Dataset) -> tuple[tuple[float, float], float | None]:
    src = seq_item if seq_item is not None and "PixelSpacing" in seq_item else ds
    if "PixelSpacing" not in src:
        raise InvalidInstance(f"{_uid(ds)}: no PixelSpacing")
    sp = _floats(src.PixelSpacing, 2, "PixelSpacing", ds)
    if np.any(sp <= 0):
        raise InvalidInstance(f"{_uid(ds)}: PixelSpacing must be positive, got {sp.tolist()}")
    thick = src.get("SliceThickness", ds.get("SliceThickness"))
    thickness = float(thick) if thick not in (None, "") else None
    return (float(sp[0]), float(sp[1])), thickness


def _decode(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InvalidInstance(f"{_uid(ds)}: no pixel data")
    try:
        arr = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as exc:
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise InvalidInstance(f"{_uid(ds)}: cannot decode pixel data ({ts}): {exc}") from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidInstance(f"{_uid(ds)}: only monochrome images can be analysed")
    arr = np.asarray(arr, dtype=np.float32)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = arr.max() - arr
    if not np.all(np.isfinite(arr)):
        raise InvalidInstance(f"{_uid(ds)}: pixel data has non-finite values")
    return arr


def _rescale(item: Dataset | None, ds: Dataset) -> tuple[float, float]:
    src = item if item is not None and "RescaleSlope" in item else ds
    slope = float(src.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(src.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _group(
    ds: Dataset, per_frame: Dataset | None, shared: Dataset | None, name: str
) -> Dataset | None:
    for holder in (per_frame, shared):
        if holder is not None and name in holder and len(holder[name].value):
            item: Dataset = holder[name].value[0]
            return item
    return None


def _frames_of(ds: Dataset, index: int) -> list[_Frame]:
    pixels = _decode(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        if pixels.ndim == 2:
            pixels = pixels[None]
        per_frames = ds.PerFrameFunctionalGroupsSequence
        shared = (
            ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        )
        if len(per_frames) != n_frames or pixels.shape[0] != n_frames:
            raise InvalidInstance(
                f"{_uid(ds)}: {n_frames} frames but {len(per_frames)} per-frame groups"
            )
        out = []
        for f in range(n_frames):
            pf = per_frames[f]
            pos_item = _group(ds, pf, shared, "PlanePositionSequence")
            ori_item = _group(ds, pf, shared, "PlaneOrientationSequence")
            if pos_item is None or ori_item is None:
                raise InvalidInstance(
                    f"{_uid(ds)}: frame {f + 1} has no plane position/orientation"
                )
            pos = _floats(pos_item.ImagePositionPatient, 3, "ImagePositionPatient", ds)
            ori = _floats(ori_item.ImageOrientationPatient, 6, "ImageOrientationPatient", ds)
            _check_orientation(ori, ds)
            spacing, thick = _spacing(_group(ds, pf, shared, "PixelMeasuresSequence"), ds)
            slope, intercept = _rescale(
                _group(ds, pf, shared, "PixelValueTransformationSequence"), ds
            )
            out.append(
                _Frame(
                    pixels[f] * slope + intercept, pos, ori, spacing, thick, _uid(ds), f + 1, index
                )
            )
        return out
    if n_frames != 1 or pixels.ndim != 2:
        raise InvalidInstance(f"{_uid(ds)}: multi-frame image without functional groups")
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise InvalidInstance(f"{_uid(ds)}: no ImagePositionPatient / ImageOrientationPatient")
    pos = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", ds)
    ori = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", ds)
    _check_orientation(ori, ds)
    spacing, thick = _spacing(None, ds)
    slope, intercept = _rescale(None, ds)
    return [_Frame(pixels * slope + intercept, pos, ori, spacing, thick, _uid(ds), 1, index)]


def _centre(fr: _Frame) -> np.ndarray:
    rows, cols = fr.pixels.shape
    rs, cs = fr.spacing
    return (
        fr.position
        + fr.orientation[:3] * cs * (cols - 1) / 2.0
        + fr.orientation[3:] * rs * (rows - 1) / 2.0
    )


def read_datasets(
    paths: Sequence[Path | str], contents: Sequence[bytes | None] | None = None
) -> list[Dataset]:
    """Read DICOM files (pixel data included); unreadable files raise InvalidInstance.

    ``contents``: the files' bytes when the caller has read them already (the analyse stage
    checks them against the index first); ``paths`` then only name them in errors.
    """
    out: list[Dataset] = []
    for i, p in enumerate(paths):
        data = contents[i] if contents is not None else None
        try:
            out.append(pydicom.dcmread(io.BytesIO(data) if data is not None else str(p)))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise InvalidInstance(f"{p}: not a readable DICOM file: {exc}") from exc
    return out


def volume_from_datasets(datasets: Sequence[Dataset]) -> tuple[Volume, list[Dataset]]:
    """Build the volume of one series from its datasets (see :func:`load_volume`)."""
    if not datasets:
        raise InvalidInstance("no instances given")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1 or "" in series:
        raise InvalidInstance(f"instances must belong to one series, got {sorted(series)}")
    frames: list[_Frame] = []
    for i, ds in enumerate(datasets):
        frames.extend(_frames_of(ds, i))
    shapes = {fr.pixels.shape for fr in frames}
    if len(shapes) != 1:
        raise InvalidInstance(
            f"series {next(iter(series))}: slices differ in size {sorted(shapes)}"
        )
    sp0 = np.asarray(frames[0].spacing)
    for fr in frames:
        if np.any(np.abs(np.asarray(fr.spacing) - sp0) > SPACING_TOLERANCE * sp0):
            raise InvalidInstance(
                f"{fr.sop_uid}: PixelSpacing {fr.spacing} differs from {tuple(sp0)} in the series"
            )
    centres = np.stack([_centre(fr) for fr in frames])
    order = np.argsort(centres[:, 2], kind="stable")
    frames = [frames[k] for k in order]
    centres = centres[order]
    for a, b, ca, cb in zip(frames, frames[1:], centres, centres[1:], strict=False):
        normal = np.cross(a.orientation[:3], a.orientation[3:])
        same_plane = np.allclose(a.orientation, b.orientation, atol=COSINE_TOLERANCE)
        if (
            same_plane
            and np.linalg.norm(cb - ca) < DUPLICATE_POSITION_MM
            and abs(float(np.dot(cb - ca, normal))) < DUPLICATE_POSITION_MM
        ):
            raise InvalidInstance(
                f"{a.sop_uid} and {b.sop_uid}: two slices at the same position "
                "(several echoes or repeats in one series?)"
            )
    thicknesses = [fr.thickness for fr in frames if fr.thickness is not None]
    volume = Volume(
        pixels=np.stack([fr.pixels for fr in frames]).astype(np.float32),
        pixel_spacing=frames[0].spacing,
        positions=np.stack([fr.position for fr in frames]),
        orientations=np.stack([fr.orientation for fr in frames]),
        slice_uids=tuple(fr.sop_uid for fr in frames),
        series_instance_uid=next(iter(series)),
        slice_thickness=float(np.median(thicknesses)) if thicknesses else None,
        frame_numbers=tuple(fr.frame_number for fr in frames),
    )
    seen: list[int] = []
    for fr in frames:
        if fr.dataset_index not in seen:
            seen.append(fr.dataset_index)
    logger.debug(
        "series %s: %d slices from %d instances",
        volume.series_instance_uid,
        volume.n_slices,
        len(datasets),
    )
    return volume, [datasets[i] for i in seen]


def load_volume(
    paths: Sequence[Path | str], contents: Sequence[bytes | None] | None = None
) -> tuple[Volume, list[Dataset]]:
    """Read one series' files into a volume sorted caudal -> cranial.

    ``contents``: the files' bytes when already read (see :func:`read_datasets`).

    Returns
    -------
    volume
        Stored values after the Modality LUT, float32, with per-slice geometry;
        ``slice_uids``/``frame_numbers`` name each slice's source instance and frame.
    datasets
        The source instances (pixel data included), one per file, in the order of their
        first slice in the volume.

    Raises
    ------
    InvalidInstance
        Unreadable files, undecodable pixels, several series, inconsistent sizes or
        spacings, invalid orientation, or two slices at one position.
    """
    return volume_from_datasets(read_datasets(paths, contents))
