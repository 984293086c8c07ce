"""Disc-level detection and naming in a lumbar axial series.

Radiologists read a lumbar axial study level by level. This module finds the slices
through each intervertebral disc from the segmentation (disc label area against
vertebral-body area) and the slice geometry (angled blocks, gaps along the slice normal),
groups them into levels, picks the mid-disc slice of each level and names the levels
L1-L2 ... L5-S1 from anatomical evidence:

* a sagittal series of the same study (``sagittal_hint``: disc centres in patient
  coordinates, produced by the node; the strongest cue);
* the iliac wings / sacral ala lateral to the psoas at the lumbosacral level (bright
  marrow islands outside the labelled soft tissue, on the disc slices of L5-S1 only);
* the spinal cord / conus in the dural sac at the upper levels (a low-signal central
  blob in the bright CSF);
* distances between levels (a skipped level shows as a double gap).

Levels are numbered by ``position`` (1 = most caudal level found). A level gets a name
only when the evidence is consistent and its confidence reaches
:data:`NAMING_MIN_CONFIDENCE`; otherwise ``level`` is ``None`` and the report says
"level N from caudal, unlabelled". We never guess.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ai.labels import LEVEL_NAMES, Label
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Slices whose normals differ by more than this belong to different blocks (degrees).
BLOCK_ANGLE_TOL_DEG = 1.0
#: A step along the normal larger than this multiple of the block's usual step is a gap.
BLOCK_GAP_FACTOR = 1.6
#: Minimum disc area on a slice for it to count as a disc slice (mm2).
MIN_DISC_AREA_MM2 = 250.0
#: A disc slice must show at least this fraction of the largest disc area in the series.
MIN_DISC_FRACTION = 0.30
#: ... and more disc than vertebral body (ratio disc / vertebral body).
DISC_OVER_BODY_RATIO = 1.0
#: Disc runs whose centres are closer than this belong to the same disc (mm).
SAME_DISC_MAX_MM = 12.0
#: Nominal distance between consecutive lumbar disc centres (mm), used when the series
#: has only one level or implausible spacing.
NOMINAL_LEVEL_SPACING_MM = 38.0
#: A gap between neighbouring levels larger than this multiple of the typical spacing
#: means one or more levels were skipped (blocks over non-adjacent discs).
SKIPPED_LEVEL_FACTOR = 1.5
#: A sagittal disc centre matches an axial level when closer than this (mm).
SAGITTAL_MATCH_MM = 12.0
#: Below this confidence a level keeps its position but gets no name.
NAMING_MIN_CONFIDENCE = 0.6

#: Pelvis cue: bright marrow islands outside the labelled soft tissue, lateral to the
#: canal by at least this distance (mm), of at least this total area (mm2).
PELVIS_MIN_LATERAL_MM = 45.0
PELVIS_MIN_AREA_MM2 = 150.0
#: Pelvis islands must be brighter than this fraction of the subcutaneous-fat intensity.
PELVIS_FAT_FRACTION = 0.45
#: Cord cue: a dark blob in the sac of at least this area (mm2) and fraction of the sac.
CORD_MIN_AREA_MM2 = 25.0
CORD_MIN_SAC_FRACTION = 0.12
#: Dark = below this fraction of the bright (CSF) intensity of the sac.
CORD_DARK_FRACTION = 0.55

#: Confidence given to a name from each kind of anchor (before consistency penalties).
CONF_SAGITTAL = 0.97
CONF_PELVIS = 0.92
CONF_CORD = 0.70
#: Confidence lost per level of distance from the anchor (accumulating spacing doubt).
CONF_DECAY_PER_STEP = 0.03


@dataclass
class LevelAssignment:
    """One disc level found in the series.

    Attributes
    ----------
    level
        Name from :data:`ai.labels.LEVEL_NAMES`, or ``None`` when it cannot be named with
        confidence.
    position
        1 = most caudal level found in the series.
    slice_indices
        Indices (into the volume's caudal -> cranial order) of the slices through the disc.
    mid_slice
        The slice through the disc centre (largest disc area), where grades are read.
    confidence
        Confidence of the *name* in [0, 1]; 0 when unnamed for lack of evidence.
    evidence
        What the name rests on (cues per level, anchor, spacing), for the report and audit.
    """

    level: str | None
    position: int
    slice_indices: list[int]
    mid_slice: int
    confidence: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level is not None and self.level not in LEVEL_NAMES:
            raise ValueError(f"level must be one of {LEVEL_NAMES} or None, got {self.level!r}")
        if self.position < 1:
            raise ValueError(f"position must be >= 1, got {self.position}")
        if not self.slice_indices:
            raise ValueError("slice_indices must not be empty")
        if self.mid_slice not in self.slice_indices:
            raise ValueError(f"mid_slice {self.mid_slice} not in slice_indices {self.slice_indices}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")

    @property
    def display_name(self) -> str:
        """The level name, or the honest "level N from caudal, unlabelled"."""
        if self.level is not None:
            return self.level
        return f"level {self.position} from caudal, unlabelled"


# --------------------------------------------------------------------------- geometry


def split_blocks(volume: Volume) -> list[list[int]]:
    """Split the slices into geometric blocks (same orientation, regular spacing).

    A new block starts where the slice normal turns by more than
    :data:`BLOCK_ANGLE_TOL_DEG` or where the step along the normal exceeds
    :data:`BLOCK_GAP_FACTOR` times the usual step of the series.
    """
    n = volume.n_slices
    if n == 0:
        return []
    normals = volume.normals()
    centres = volume.centres()
    steps = np.array(
        [abs(float(np.dot(centres[i + 1] - centres[i], normals[i]))) for i in range(n - 1)]
    )
    angles = np.array(
        [
            float(np.degrees(np.arccos(np.clip(abs(np.dot(normals[i], normals[i + 1])), -1.0, 1.0))))
            for i in range(n - 1)
        ]
    )
    parallel = steps[angles <= BLOCK_ANGLE_TOL_DEG] if n > 1 else steps
    typical = float(np.median(parallel)) if parallel.size else 0.0
    blocks: list[list[int]] = [[0]]
    for i in range(n - 1):
        new_block = angles[i] > BLOCK_ANGLE_TOL_DEG or (
            typical > 0 and steps[i] > BLOCK_GAP_FACTOR * typical
        )
        if new_block:
            blocks.append([i + 1])
        else:
            blocks[-1].append(i + 1)
    return blocks


def slice_areas(labels: np.ndarray, volume: Volume, label: Label) -> np.ndarray:
    """Area (mm2) of one label on every slice."""
    return np.count_nonzero(labels == int(label), axis=(1, 2)).astype(float) * volume.pixel_area_mm2


def disc_slices(labels: np.ndarray, volume: Volume) -> np.ndarray:
    """Boolean mask of the slices that pass through a disc."""
    disc = slice_areas(labels, volume, Label.DISC)
    body = slice_areas(labels, volume, Label.VERTEBRAL_BODY)
    if disc.size == 0 or disc.max() <= 0:
        return np.zeros(disc.shape, dtype=bool)
    floor = max(MIN_DISC_AREA_MM2, MIN_DISC_FRACTION * float(disc.max()))
    return (disc >= floor) & (disc > DISC_OVER_BODY_RATIO * body)


def group_levels(labels: np.ndarray, volume: Volume) -> list[tuple[list[int], int]]:
    """Group disc slices into levels; return ``(slice_indices, mid_slice)`` caudal first.

    Runs of consecutive disc slices inside one block are one disc; runs in different
    blocks whose centres lie within :data:`SAME_DISC_MAX_MM` are merged (overlapping
    blocks over the same disc). The mid slice is the one with the largest disc area
    (ties: nearest to the run centre).
    """
    is_disc = disc_slices(labels, volume)
    disc_area = slice_areas(labels, volume, Label.DISC)
    centres = volume.centres()
    runs: list[list[int]] = []
    for block in split_blocks(volume):
        current: list[int] = []
        for i in block:
            if is_disc[i]:
                current.append(i)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
    merged: list[list[int]] = []
    for run in runs:
        if merged:
            prev = merged[-1]
            gap = float(np.linalg.norm(centres[run].mean(axis=0) - centres[prev].mean(axis=0)))
            if gap < SAME_DISC_MAX_MM:
                prev.extend(run)
                continue
        merged.append(list(run))
    out: list[tuple[list[int], int]] = []
    for run in merged:
        run = sorted(set(run))
        areas = disc_area[run]
        top = float(areas.max())
        candidates = [i for i, a in zip(run, areas, strict=True) if a >= 0.95 * top]
        centre = centres[run].mean(axis=0)
        mid = min(candidates, key=lambda i: float(np.linalg.norm(centres[i] - centre)))
        out.append((run, mid))
    out.sort(key=lambda item: float(centres[item[1]][2]))
    return out


# --------------------------------------------------------------------------- image cues


def _fat_reference(image: np.ndarray, labels_2d: np.ndarray) -> float | None:
    fat = image[labels_2d == int(Label.SUBCUTANEOUS_FAT)]
    if fat.size < 20:
        return None
    return float(np.median(fat))


def pelvis_score(image: np.ndarray, labels_2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Area (mm2) of bright bone-marrow islands lateral to the spine outside all labels.

    The iliac wings (and sacral ala) appear on axial slices at the lumbosacral junction as
    large islands of fatty marrow (bright on T2) lateral to the psoas and erector spinae.
    Higher lumbar levels have only unlabelled fat and bowel there, thin and irregular; we
    keep islands that are compact (opened by a 2 mm disc) and lateral to the canal.
    """
    canal = np.isin(labels_2d, (int(Label.DURAL_SAC), int(Label.EPIDURAL_SPACE)))
    if not canal.any():
        spine = np.isin(labels_2d, (int(Label.DISC), int(Label.VERTEBRAL_BODY)))
        if not spine.any():
            return 0.0
        centre_col = float(np.argwhere(spine)[:, 1].mean())
    else:
        centre_col = float(np.argwhere(canal)[:, 1].mean())
    ref = _fat_reference(image, labels_2d)
    body = image > 0
    if ref is None or ref <= 0:
        return 0.0
    bright = (image > PELVIS_FAT_FRACTION * ref) & (labels_2d == 0) & body
    rs, cs = pixel_spacing
    radius = max(1, int(round(2.0 / min(rs, cs))))
    structure = ndimage.generate_binary_structure(2, 1)
    bright = ndimage.binary_opening(bright, structure=structure, iterations=radius)
    cols = np.arange(image.shape[1])[None, :]
    lateral = np.abs(cols - centre_col) * cs >= PELVIS_MIN_LATERAL_MM
    bright &= lateral
    # Skin-side fat touching the image border or the subcutaneous rim is not bone.
    lab, n = ndimage.label(bright)
    if n == 0:
        return 0.0
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
    near_sc = ndimage.binary_dilation(
        labels_2d == int(Label.SUBCUTANEOUS_FAT), structure=structure, iterations=radius
    )
    touching = set(np.unique(lab[near_sc]).tolist())
    area = 0.0
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    for k, size in enumerate(sizes, start=1):
        if k in border or k in touching:
            continue
        area += float(size) * rs * cs
    return area


def cord_score(image: np.ndarray, labels_2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Fraction of the dural sac taken by one dark central blob (cord / conus), 0..1.

    On T2 the CSF is bright and the cauda equina rootlets are thin dark dots; the cord or
    conus is one round dark structure. Returns 0 when the blob is too small.
    """
    sac = labels_2d == int(Label.DURAL_SAC)
    n_sac = int(sac.sum())
    if n_sac < 10:
        return 0.0
    values = image[sac]
    bright = float(np.percentile(values, 95))
    if bright <= 0:
        return 0.0
    dark = sac & (image < CORD_DARK_FRACTION * bright)
    dark = ndimage.binary_opening(dark, structure=ndimage.generate_binary_structure(2, 1))
    lab, n = ndimage.label(dark)
    if n == 0:
        return 0.0
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    biggest = float(sizes.max())
    area = biggest * pixel_spacing[0] * pixel_spacing[1]
    if area < CORD_MIN_AREA_MM2:
        return 0.0
    frac = biggest / n_sac
    return frac if frac >= CORD_MIN_SAC_FRACTION else 0.0


# --------------------------------------------------------------------------- naming


@dataclass
class _Anchor:
    index: int  # into the caudal-first level list
    name_index: int  # into LEVEL_NAMES
    confidence: float
    kind: str


def _level_steps(z: np.ndarray) -> tuple[list[int], float]:
    """Anatomical steps between neighbouring levels (1, or more where levels are skipped)."""
    if z.size < 2:
        return [], NOMINAL_LEVEL_SPACING_MM
    d = np.diff(z)
    typical = float(np.median(d))
    small = d[d <= SKIPPED_LEVEL_FACTOR * min(typical, NOMINAL_LEVEL_SPACING_MM * 1.2)]
    if small.size:
        typical = float(np.median(small))
    if not (0.5 * NOMINAL_LEVEL_SPACING_MM <= typical <= 1.5 * NOMINAL_LEVEL_SPACING_MM):
        typical = NOMINAL_LEVEL_SPACING_MM
    steps = [max(1, int(round(float(x) / typical))) for x in d]
    return steps, typical


def _match_sagittal(
    centres: np.ndarray, hint: Mapping[str, Sequence[float]]
) -> list[_Anchor]:
    anchors: list[_Anchor] = []
    for name, point in hint.items():
        if name not in LEVEL_NAMES:
            raise ValueError(f"sagittal_hint names must be in {LEVEL_NAMES}, got {name!r}")
        p = np.asarray(point, dtype=float)
        if p.shape != (3,):
            raise ValueError(f"sagittal_hint[{name!r}] must be a 3D point (mm), got {p.shape}")
        dist = np.linalg.norm(centres - p[None, :], axis=1)
        k = int(np.argmin(dist))
        if float(dist[k]) <= SAGITTAL_MATCH_MM:
            anchors.append(_Anchor(k, LEVEL_NAMES.index(name), CONF_SAGITTAL, "sagittal"))
    return anchors


def find_levels(
    labels: np.ndarray,
    volume: Volume,
    *,
    sagittal_hint: Mapping[str, Sequence[float]] | None = None,
) -> list[LevelAssignment]:
    """Find, group and name the disc levels of an axial series.

    Parameters
    ----------
    labels
        Segmentation ``(n_slices, rows, cols)`` of :class:`ai.labels.Label` values on the
        volume's native grid, slices caudal -> cranial.
    volume
        The series (pixels for the image cues, per-slice geometry for grouping).
    sagittal_hint
        Optional disc centres from a sagittal series of the same study: level name ->
        patient LPS point (mm). The node fills it when the study has a sagittal series
        whose levels are known; it overrides the axial image cues.

    Returns
    -------
    list[LevelAssignment]
        Caudal first; ``position`` 1 is the most caudal level found.
    """
    if labels.shape != volume.pixels.shape:
        raise ValueError(f"labels shape {labels.shape} != volume shape {volume.pixels.shape}")
    groups = group_levels(labels, volume)
    if not groups:
        logger.info("series %s: no disc level found", volume.series_instance_uid)
        return []
    centres = volume.centres()
    mids = [mid for _, mid in groups]
    mid_centres = centres[mids]
    z = mid_centres[:, 2]
    steps, typical = _level_steps(z)
    # Cumulative anatomical offset of each level from the most caudal one.
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(int)

    pelvis: list[float] = []
    cord: list[float] = []
    for run, mid in groups:
        pel = max(
            pelvis_score(volume.pixels[i], labels[i], volume.pixel_spacing) for i in run
        )
        pelvis.append(pel)
        cord.append(cord_score(volume.pixels[mid], labels[mid], volume.pixel_spacing))

    anchors: list[_Anchor] = []
    if sagittal_hint:
        anchors = _match_sagittal(mid_centres, sagittal_hint)
    pelvis_levels = [k for k, a in enumerate(pelvis) if a >= PELVIS_MIN_AREA_MM2]
    if not anchors and pelvis_levels:
        # The iliac wings can show on the L4-L5 slices of a high pelvis too: the most
        # caudal level with the cue is L5-S1 only when the cue is strongest there.
        k = min(pelvis_levels)
        conf = CONF_PELVIS
        if k != int(np.argmax(pelvis)):
            conf -= 0.25
        anchors.append(_Anchor(k, LEVEL_NAMES.index("L5-S1"), conf, "iliac_wings"))
    cord_levels = [k for k, c in enumerate(cord) if c > 0]
    if not anchors and cord_levels:
        # The conus ends at L1-L2 in most adults: the most cranial level with a cord is
        # L1-L2 when the cord disappears below it (rootlets at the next caudal level).
        k = max(cord_levels)
        if k == len(groups) - 1 or cord[k + 1 :] == [0.0] * (len(groups) - k - 1):
            anchors.append(_Anchor(k, LEVEL_NAMES.index("L1-L2"), CONF_CORD, "conus"))

    names: list[str | None] = [None] * len(groups)
    confs = [0.0] * len(groups)
    anchor_info: dict[str, Any] = {}
    if anchors:
        best = max(anchors, key=lambda a: a.confidence)
        # Consistency: other anchors must agree with the best one's numbering.
        agree = all(
            (a.name_index - best.name_index) == -(offsets[a.index] - offsets[best.index])
            for a in anchors
        )
        base = best.confidence if agree else best.confidence - 0.3
        # Cord at a level named L3-L4 or lower contradicts the anchor.
        for k, c in enumerate(cord):
            name_index = best.name_index - (offsets[k] - offsets[best.index])
            if c > 0 and name_index >= LEVEL_NAMES.index("L3-L4"):
                base -= 0.3
        anchor_info = {"kind": best.kind, "position": best.index + 1, "agree": agree}
        for k in range(len(groups)):
            name_index = best.name_index - int(offsets[k] - offsets[best.index])
            distance = abs(int(offsets[k] - offsets[best.index]))
            conf = max(0.0, min(1.0, base - CONF_DECAY_PER_STEP * distance))
            if 0 <= name_index < len(LEVEL_NAMES) and conf >= NAMING_MIN_CONFIDENCE:
                names[k] = LEVEL_NAMES[name_index]
                confs[k] = conf
            else:
                confs[k] = 0.0 if not 0 <= name_index < len(LEVEL_NAMES) else conf
    out: list[LevelAssignment] = []
    for k, (run, mid) in enumerate(groups):
        evidence: dict[str, Any] = {
            "pelvis_area_mm2": round(pelvis[k], 1),
            "cord_fraction": round(cord[k], 3),
            "steps_from_caudal": int(offsets[k]),
            "level_spacing_mm": round(typical, 1),
            "anchor": anchor_info or None,
        }
        out.append(
            LevelAssignment(
                level=names[k],
                position=k + 1,
                slice_indices=list(run),
                mid_slice=mid,
                confidence=float(confs[k]) if names[k] is not None else 0.0,
                evidence=evidence,
            )
        )
    logger.info(
        "series %s: %d levels (%s)",
        volume.series_instance_uid,
        len(out),
        ", ".join(a.display_name for a in out),
    )
    return out
