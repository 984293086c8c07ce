"""Post-processing of native-grid label maps: connected components and laterality.

The third step of the pipeline (:mod:`ai.inference` does pre_process and predict):
:func:`clean_components` keeps the largest component of each single-part structure and
drops specks of the others; :func:`fix_laterality` swaps a left / right pair whose
centroids lie on the wrong sides of the anatomical midline, and flags (never hides)
what it cannot resolve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ai.labels import PAIRS, STRUCTURES, Label
from ai.model_grid import superior_normal
from ai.volume import Volume

#: Components smaller than this (mm2) are dropped for multi-part structures.
MIN_COMPONENT_MM2 = 4.0
#: Labels kept as the largest connected component only.
SINGLE_COMPONENT_LABELS: tuple[Label, ...] = (
    Label.VERTEBRAL_BODY,
    Label.DISC,
    Label.DURAL_SAC,
    Label.PSOAS_LEFT,
    Label.PSOAS_RIGHT,
    Label.ERECTOR_SPINAE_LEFT,
    Label.ERECTOR_SPINAE_RIGHT,
    Label.MULTIFIDUS_LEFT,
    Label.MULTIFIDUS_RIGHT,
)
#: Labels that can be in several pieces (lamina + spinous process, fat rim, epidural fat);
#: only components below :data:`MIN_COMPONENT_MM2` are dropped.
MULTI_COMPONENT_LABELS: tuple[Label, ...] = (
    Label.POSTERIOR_ELEMENTS,
    Label.EPIDURAL_SPACE,
    Label.SUBCUTANEOUS_FAT,
)
#: Lateral distance (mm) from the midline below which a centroid counts as "on the midline".
MIDLINE_TOLERANCE_MM = 2.0



def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """Mean ``(row, col)`` of a non-empty boolean mask, from its row and column sums
    (cheaper than index arrays over a whole slice)."""
    per_row = mask.sum(axis=1, dtype=np.int64)
    per_col = mask.sum(axis=0, dtype=np.int64)
    total = float(per_row.sum())
    return (
        float(per_row @ np.arange(mask.shape[0])) / total,
        float(per_col @ np.arange(mask.shape[1])) / total,
    )


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def _drop_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= min_pixels) + 1
    return np.isin(lab, keep)


def clean_components(
    labels: np.ndarray,
    pixel_area_mm2: float,
    boxes: Sequence[tuple[slice, slice] | None] | None = None,
) -> np.ndarray:
    """Largest connected component per single-part structure; tiny specks dropped for others.

    Removed pixels become background (the union of the kept structures is never grown).
    Each label is processed inside its bounding box only (speed on large matrices);
    ``boxes``: ``ndimage.find_objects(labels)`` when the caller has it.
    """
    out = labels.copy()
    min_px = max(1, int(round(MIN_COMPONENT_MM2 / pixel_area_mm2)))
    if boxes is None:
        boxes = ndimage.find_objects(labels)
    for lab in (*SINGLE_COMPONENT_LABELS, *MULTI_COMPONENT_LABELS):
        if lab > len(boxes) or boxes[lab - 1] is None:
            continue
        box = boxes[lab - 1]
        mask = labels[box] == lab
        keep = _keep_largest(mask) if lab in SINGLE_COMPONENT_LABELS else _drop_small(mask, min_px)
        sub = out[box]
        sub[mask & ~keep] = Label.BACKGROUND
    return out


def label_stats(
    labels: np.ndarray, boxes: Sequence[tuple[slice, slice] | None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count ``(NUM_CLASSES,)`` and centroid ``(NUM_CLASSES, 2)`` of every label.

    Each structure is summed inside its bounding box only (``boxes``: as
    ``ndimage.find_objects(labels)`` returns them, or any boxes that still contain every
    pixel of their label, e.g. those taken before :func:`clean_components` removed some).
    Background (0) gets its count; its centroid is NaN.
    """
    n = len(Label)
    if boxes is None:
        boxes = ndimage.find_objects(labels)
    if len(boxes) >= n:
        raise ValueError(f"label values must be below {n}")
    counts = np.zeros(n, dtype=np.float64)
    centroids = np.full((n, 2), np.nan)
    for index, box in enumerate(boxes):
        if box is None:
            continue
        mask = labels[box] == index + 1
        count = int(mask.sum())
        if count == 0:
            continue
        counts[index + 1] = count
        row, col = mask_centroid(mask)
        centroids[index + 1] = (box[0].start + row, box[1].start + col)
    counts[0] = labels.size - counts[1:].sum()
    return counts, centroids


def _union_centroid(counts: np.ndarray, centroids: np.ndarray, labs: tuple[Label, ...]) -> np.ndarray | None:
    w = np.array([counts[int(lab)] for lab in labs])
    if w.sum() == 0:
        return None
    pts = np.stack([centroids[int(lab)] if counts[int(lab)] else np.zeros(2) for lab in labs])
    return (pts * w[:, None]).sum(axis=0) / w.sum()


def patient_left_direction(
    labels: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit in-plane direction toward the patient's left, in native (row, col) mm.

    Anatomy first: posterior is from the disc / vertebral body centroid to the canal
    centroid, and left = posterior x superior (DICOM LPS). Without both structures the
    slice orientation's projection of patient +x is used. Also returns the midline point
    (canal centroid, native pixels) or ``None``.
    """
    rs, cs = pixel_spacing
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = superior_normal(orientation)
    counts, centroids = stats if stats is not None else label_stats(labels)
    canal = _union_centroid(counts, centroids, (Label.DURAL_SAC, Label.EPIDURAL_SPACE))
    front = _union_centroid(counts, centroids, (Label.DISC, Label.VERTEBRAL_BODY))
    if canal is not None and front is not None and np.linalg.norm(canal - front) > 0:
        d = canal - front
        posterior = d[0] * rs * col_dir + d[1] * cs * row_dir
        left = np.cross(posterior, normal)
    else:
        left = np.array([1.0, 0.0, 0.0])
    vec = np.array([np.dot(left, col_dir), np.dot(left, row_dir)])  # (row, col) in mm
    norm = float(np.linalg.norm(vec))
    if norm < 1e-6:
        vec = np.array([0.0, 1.0])
        norm = 1.0
    return vec / norm, canal


def fix_laterality(
    labels: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    boxes: Sequence[tuple[slice, slice] | None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Swap a left/right pair whose centroids lie on the wrong sides of the midline.

    Returns the corrected labels and one message per swapped or inconsistent pair (both
    structures on one side is flagged, not changed). ``boxes``: see :func:`label_stats`.
    """
    counts, centroids = label_stats(labels, boxes)
    left_dir, midline = patient_left_direction(labels, orientation, pixel_spacing, (counts, centroids))
    if midline is None:
        return labels, []
    rs, cs = pixel_spacing
    out = labels.copy()
    notes: list[str] = []
    for pair, (left_key, right_key) in PAIRS.items():
        left_lab = STRUCTURES[left_key][0]
        right_lab = STRUCTURES[right_key][0]
        offsets: dict[Label, float] = {}
        for lab in (left_lab, right_lab):
            c = _union_centroid(counts, centroids, (lab,))
            if c is not None:
                d = (c - midline) * np.array([rs, cs])
                offsets[lab] = float(np.dot(d, left_dir))
        lo = offsets.get(left_lab)
        ro = offsets.get(right_lab)
        if lo is not None and ro is not None:
            if lo < -MIDLINE_TOLERANCE_MM and ro > MIDLINE_TOLERANCE_MM:
                out[labels == left_lab] = right_lab
                out[labels == right_lab] = left_lab
                notes.append(f"{pair}: left and right swapped (corrected)")
            elif (lo < -MIDLINE_TOLERANCE_MM and ro < -MIDLINE_TOLERANCE_MM) or (
                lo > MIDLINE_TOLERANCE_MM and ro > MIDLINE_TOLERANCE_MM
            ):
                notes.append(f"{pair}: both sides on the same side of the midline")
        elif lo is not None and lo < -MIDLINE_TOLERANCE_MM:
            out[labels == left_lab] = right_lab
            notes.append(f"{pair}: only a 'left' structure, on the right (relabelled)")
        elif ro is not None and ro > MIDLINE_TOLERANCE_MM:
            out[labels == right_lab] = left_lab
            notes.append(f"{pair}: only a 'right' structure, on the left (relabelled)")
    return out, notes


def post_process(
    labels: np.ndarray, volume: Volume
) -> tuple[np.ndarray, list[str]]:
    """Clean a native-grid label volume ``(n, rows, cols)``; returns labels and flags.

    Per slice: connected-component cleaning, then left/right consistency.
    """
    out = np.empty_like(labels)
    flags: list[str] = []
    for k in range(labels.shape[0]):
        boxes = ndimage.find_objects(labels[k])  # cleaning only removes: still valid after
        cleaned = clean_components(labels[k], volume.pixel_area_mm2, boxes)
        fixed, notes = fix_laterality(
            cleaned, volume.orientations[k], volume.pixel_spacing, boxes
        )
        out[k] = fixed
        flags.extend(f"slice {k}: {note}" for note in notes)
    return out, flags
