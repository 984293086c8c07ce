"""Disc-level detection and naming in a lumbar axial series.

Radiologists read a lumbar axial study level by level. This module finds the slices
through each intervertebral disc from the segmentation (disc label area against
vertebral-body area) and the slice geometry (angled blocks, gaps along the slice normal),
groups them into levels, picks the mid-disc slice of each level and names the levels
L1-L2 ... L5-S1 from anatomical evidence (cues per level and their joint posterior, see
:mod:`ai.level_naming`): iliac wings at L5-S1, cord / conus at the upper levels, the
caudal growth of psoas and multifidus against erector spinae, distances between levels
(a skipped level shows as a double gap) and, when the node supplies it, a sagittal
series of the same study (``sagittal_hint``).

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

from ai.labels import LEVEL_NAMES, Label
from ai.level_naming import measure_cues, name_posterior
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Slices whose normals differ by more than this belong to different blocks (degrees).
BLOCK_ANGLE_TOL_DEG = 1.0
#: A step along the normal larger than this multiple of the block's usual step is a gap.
BLOCK_GAP_FACTOR = 1.6
#: Minimum disc area on a slice for it to count as a disc slice (mm2).
MIN_DISC_AREA_MM2 = 250.0
#: Longest block planned through one disc (3-5 slices, :func:`ai.phantom.study.plan_blocks`):
#: the blocks the column refiner and the centring of disc runs were trained and tuned on.
PLANNED_BLOCK_MAX_SLICES = 5
#: A coarse disc slice whose disc evidence (:func:`ai.inference.disc_evidence`) reaches this
#: is kept disc: neither the column refiner nor the centring of disc runs
#: (:func:`ai.disc_assignment.centre_disc_runs`) overrules a near-certain coarse model.
#: Column refiner 2.1.0 reads the images more than the coarse labels and, on a block of
#: three clear disc slices from different levels (the shipped-model test series, evidence
#: 0.999), turned the outer two into body; on the tuning studies no vertebral-body slice the
#: refiner corrected had evidence above 0.93.
KEEP_DISC_EVIDENCE = 0.95
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
#: Below this posterior probability a level keeps its position but gets no name.
NAMING_MIN_CONFIDENCE = 0.8


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


def level_steps(z: np.ndarray) -> tuple[list[int], float]:
    """Anatomical steps between neighbouring levels (1, or more where levels are skipped).

    ``z`` are the positions (mm) of the level centres along the spine, ascending. The
    typical spacing is the median of the plausible gaps; a gap of about twice that means
    one level was skipped (blocks placed over non-adjacent discs).
    """
    if z.size < 2:
        return [], NOMINAL_LEVEL_SPACING_MM
    d = np.diff(z)
    plausible = d[(d >= 0.5 * NOMINAL_LEVEL_SPACING_MM) & (d <= SKIPPED_LEVEL_FACTOR * NOMINAL_LEVEL_SPACING_MM)]
    typical = float(np.median(plausible)) if plausible.size else NOMINAL_LEVEL_SPACING_MM
    steps = [max(1, int(round(float(x) / typical))) for x in d]
    return steps, typical


def _match_sagittal(centres: np.ndarray, hint: Mapping[str, Sequence[float]]) -> dict[int, int]:
    """Level index -> name index for sagittal disc centres close to a level's centre."""
    out: dict[int, int] = {}
    for name, point in hint.items():
        if name not in LEVEL_NAMES:
            raise ValueError(f"sagittal_hint names must be in {LEVEL_NAMES}, got {name!r}")
        p = np.asarray(point, dtype=float)
        if p.shape != (3,):
            raise ValueError(f"sagittal_hint[{name!r}] must be a 3D point (mm), got {p.shape}")
        dist = np.linalg.norm(centres - p[None, :], axis=1)
        k = int(np.argmin(dist))
        if float(dist[k]) <= SAGITTAL_MATCH_MM:
            out[k] = LEVEL_NAMES.index(name)
    return out


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
        patient LPS point (mm). The node may fill it when the study has a sagittal series
        whose levels are known (hook; not filled yet).

    Returns
    -------
    list[LevelAssignment]
        Caudal first; ``position`` 1 is the most caudal level found. ``level`` is set only
        where the name's posterior probability reaches :data:`NAMING_MIN_CONFIDENCE`.
    """
    if labels.shape != volume.pixels.shape:
        raise ValueError(f"labels shape {labels.shape} != volume shape {volume.pixels.shape}")
    groups = group_levels(labels, volume)
    if not groups:
        logger.info("series %s: no disc level found", volume.series_instance_uid)
        return []
    centres = volume.centres()
    mid_centres = centres[[mid for _, mid in groups]]
    # Distance along the spine: project on the mean slice normal (angled blocks differ
    # by tens of degrees at most, so this stays monotonic).
    axis = volume.normals().mean(axis=0)
    axis /= np.linalg.norm(axis)
    if axis[2] < 0:
        axis = -axis
    along = mid_centres @ axis
    steps, typical = level_steps(along)
    offsets = [0, *np.cumsum(steps).astype(int).tolist()]
    cues = [
        measure_cues(
            [volume.pixels[i] for i in run],
            [labels[i] for i in run],
            run.index(mid),
            volume.pixel_spacing,
        )
        for run, mid in groups
    ]
    sagittal = _match_sagittal(mid_centres, sagittal_hint) if sagittal_hint else {}
    hyps, post = name_posterior(offsets, cues, sagittal)
    best = int(np.argmax(post)) if post.size else -1
    out: list[LevelAssignment] = []
    for k, (run, mid) in enumerate(groups):
        name: str | None = None
        conf = 0.0
        if best >= 0:
            j = int(hyps[best] - offsets[k])
            # The confidence of this level's name: posterior mass of hypotheses naming it so.
            same = [n for n, h in enumerate(hyps) if int(h - offsets[k]) == j]
            conf = float(post[same].sum())
            if 0 <= j < len(LEVEL_NAMES) and conf >= NAMING_MIN_CONFIDENCE:
                name = LEVEL_NAMES[j]
        cue = cues[k]
        evidence: dict[str, Any] = {
            "pelvis_area_mm2": round(cue.pelvis_area_mm2, 1),
            "pelvis_observable": cue.pelvis_observable,
            "cord_observable": cue.cord_observable,
            "cord_fraction": round(cue.cord_fraction, 3),
            "muscle_log_ratios": [round(v, 3) for v in cue.muscle_log_ratios] if cue.muscle_log_ratios else None,
            "sagittal": LEVEL_NAMES[sagittal[k]] if k in sagittal else None,
            "steps_from_caudal": int(offsets[k]),
            "level_spacing_mm": round(typical, 1),
            "name_posterior": round(conf, 4),
        }
        out.append(
            LevelAssignment(
                level=name,
                position=k + 1,
                slice_indices=list(run),
                mid_slice=mid,
                confidence=round(conf, 4) if name is not None else 0.0,
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
