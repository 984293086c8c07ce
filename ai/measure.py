"""Measurements of the clinical spec (sections 0 and 2): CSA, FCSA, fat fraction, SI, asymmetry.

Per slice, :func:`measure_slice` gives every structure's cross-sectional area (mm2) and,
for the muscles, the functional (lean) area, fat fraction and mean signal; the analysis
measures every slice (``results.json`` ``slices``). Per disc level, :func:`level_of_slices`
(:func:`measure_level` from images) averages the slice values over the level's disc slices
and adds the asymmetry and the multifidus Kjaer grade.

Fat fraction method (documented in docs/segmentation.md and in the SR): inside each
muscle ROI, the Otsu threshold of the ROI's histogram separates lean from fat pixels. The
threshold is bounded by references on the same slice: it is never closer to the lean level
(median of the ROI's lean Otsu class) than 30 % of the way to the subcutaneous-fat
reference (median SI of the subcutaneous fat), and never beyond the fat reference. (30 %
was chosen on phantom studies, where it gives a fat-fraction bias of -0.3 points; plain
mid-way thresholding under-counted partial-volume fat by 5 points.)
The lower bound keeps a purely lean muscle (unimodal histogram, where plain Otsu would
split the noise) from being called half fat. FCSA = area of ROI pixels below the threshold;
fat fraction % = (CSA - FCSA) / CSA * 100.

Outline support (:func:`structure_contrast`, psoas only): where the psoas has the grey level
of the fat around it (an unusual contrast), the model still draws a psoas of about the right
place and shape, but its area is a guess, not a reading of the image. The level then gets
a flag (:func:`plausibility_flags`), so a reader knows which areas to distrust.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ai.labels import MUSCLES, PAIRS, STRUCTURES, Label
from ai.results import StructureMeasurement

logger = logging.getLogger(__name__)

#: Kjaer grade upper bounds on the fat fraction (%): grade 0 below 10, 1 up to 50, 2 above.
KJAER_BOUNDS_PCT: tuple[float, float] = (10.0, 50.0)
#: Histogram bins for Otsu.
OTSU_BINS = 128
#: Fraction of the way from the lean level to the fat reference below which a pixel is
#: never called fat.
FAT_THRESHOLD_MIN_FRACTION = 0.3
#: Fewest ROI pixels for an intensity analysis.
MIN_ROI_PIXELS = 10
#: Width of the ring :func:`structure_contrast` compares a structure with (mm).
CONTRAST_RING_MM = 4.0
#: A structure this close to the edge of the image counts as cut by the field of view
#: (``at_image_edge``): within its outermost 2 pixels, or 1 mm where pixels are finer. The
#: network's outline of a cut structure can stop a pixel short of the edge: on 10 realistic
#: studies (0.7 mm) cropped to their central 60 %, 20 of the 40 cut discs, canals and
#: muscles came within 0 and 20 within 1 pixel; on 48 phantom studies with 154 mm fields
#: (0.6 mm: tuning 7710 / 7712, geometry sets 9106 / 9107) all 17 within 1 pixel, and 10
#: structures the field did not cut came as close.
EDGE_MARGIN_PX = 2
EDGE_MARGIN_MM = 1.0
#: Structures whose outline support is measured: set off from their surroundings (fat,
#: retroperitoneum) by their grey level. Muscles that abut a muscle of the same signal across
#: a thin fascia (multifidus, erector spinae) would read as unsupported on most slices.
CONTRAST_STRUCTURES: tuple[str, ...] = ("psoas_left", "psoas_right")
#: Outline contrast (:func:`structure_contrast`) below which a structure has "little contrast
#: to its surroundings": a level whose psoas contrast (mean over its slices) is below it is
#: flagged, and :mod:`ai.evaluate` counts a true structure below it as not visible. Chosen on
#: phantom tuning studies (docs/evaluation.md, twenty-first session): on randomised contrasts
#: it flags about 1 psoas level measurement in 9 and catches 39 of the 43 more than 20 % off;
#: on realistic images none of 180.
LOW_CONTRAST = 0.35


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = np.divide(m, w0, out=np.zeros_like(m), where=w0 > 0)
    mu1 = np.divide(m[-1] - m, w1, out=np.zeros_like(m), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return float(edges[k + 1])


def fat_reference(image: np.ndarray, labels: np.ndarray) -> float | None:
    """Median SI of the subcutaneous fat on one slice, or None when there is none."""
    fat = labels == Label.SUBCUTANEOUS_FAT
    if int(fat.sum()) < MIN_ROI_PIXELS:
        return None
    return float(np.median(image[fat]))


def fat_threshold(roi_values: np.ndarray, fat_ref: float | None) -> tuple[float, bool]:
    """The lean/fat threshold of one muscle ROI and whether fat is the *bright* side.

    T2 fat is brighter than muscle; a sequence where the subcutaneous-fat reference is
    darker than the ROI's median is handled symmetrically (fat = the dark side).
    """
    t = otsu_threshold(roi_values)
    if fat_ref is None:
        return t, True
    bright = fat_ref >= float(np.median(roi_values))
    lean_class = roi_values[roi_values <= t] if bright else roi_values[roi_values > t]
    lean = float(np.median(lean_class)) if lean_class.size else float(np.median(roi_values))
    if fat_ref == lean:
        return t, bright
    bound = lean + FAT_THRESHOLD_MIN_FRACTION * (fat_ref - lean)
    lo, hi = sorted((bound, fat_ref))
    return float(np.clip(t, lo, hi)), bright


def kjaer_grade(fat_fraction_pct: float) -> int:
    """Kjaer grade of a multifidus from its fat fraction: 0 (<10 %), 1 (10-50 %), 2 (>50 %)."""
    if fat_fraction_pct < KJAER_BOUNDS_PCT[0]:
        return 0
    if fat_fraction_pct <= KJAER_BOUNDS_PCT[1]:
        return 1
    return 2


def asymmetry_pct(a: float, b: float) -> float:
    """(largest - smallest) / largest * 100; 0 when both are zero."""
    big, small = max(a, b), min(a, b)
    if big <= 0:
        return 0.0
    return (big - small) / big * 100.0


def _ring_px(pixel_spacing: tuple[float, float]) -> int:
    """Width of :func:`structure_contrast`'s ring in pixels."""
    return max(1, int(round(CONTRAST_RING_MM / float(min(pixel_spacing)))))


def structure_contrast(image: np.ndarray, mask: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """How far a structure's outline is supported by the image: the two-sample
    Kolmogorov-Smirnov distance between the grey levels inside the mask (boundary pixels left
    out, they mix both) and in a ring :data:`CONTRAST_RING_MM` wide around it. 0 when the
    structure has the grey-level distribution of its surroundings, 1 when the two do not
    overlap. A distance between distributions, not between means, so a fat-speckled muscle
    whose mean matches the fat around it still reads as distinct. NaN for an empty mask."""
    from scipy import stats

    if not mask.any():
        return float("nan")
    r = _ring_px(pixel_spacing)
    rows, cols = np.nonzero(mask)
    r0, r1 = max(int(rows.min()) - r - 1, 0), int(rows.max()) + r + 2
    c0, c1 = max(int(cols.min()) - r - 1, 0), int(cols.max()) + r + 2
    m = mask[r0:r1, c0:c1]
    img = image[r0:r1, c0:c1]
    ring = ndimage.binary_dilation(m, iterations=r) & ~m
    inner = ndimage.binary_erosion(m)
    if not inner.any():
        inner = m
    if not ring.any():
        return float("nan")
    return float(stats.ks_2samp(img[inner], img[ring], method="asymp").statistic)


@dataclass(frozen=True)
class SliceMeasurements:
    """All structure measurements of one slice (areas mm2, fractions %, SI stored units)."""

    values: dict[str, StructureMeasurement]


def measure_slice(
    image: np.ndarray, labels: np.ndarray, pixel_spacing: tuple[float, float]
) -> SliceMeasurements:
    """Measure every structure of ``ai.labels.STRUCTURES`` on one slice."""
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    px = float(pixel_spacing[0] * pixel_spacing[1])
    rows, cols = labels.shape
    # within the margin: the outermost EDGE_MARGIN_PX pixels, or EDGE_MARGIN_MM on a fine grid
    m_rows, m_cols = (max(EDGE_MARGIN_PX, math.ceil(EDGE_MARGIN_MM / float(sp))) for sp in pixel_spacing)
    # every structure is read inside its labels' bounding box, not over the whole slice:
    # every slice of a series is measured, most structures are small
    boxes = ndimage.find_objects(labels, max_label=max(int(lab) for lab in Label))
    fat_box = _box(boxes, (Label.SUBCUTANEOUS_FAT,))
    fat_ref = fat_reference(image[fat_box], labels[fat_box]) if fat_box else None
    out: dict[str, StructureMeasurement] = {}
    for key, labs in STRUCTURES.items():
        box = _box(boxes, labs)
        if box is None:
            out[key] = StructureMeasurement(0.0, 0.0, None, None, None) if key in MUSCLES else StructureMeasurement(0.0)
            continue
        mask = np.isin(labels[box], labs)
        roi = image[box]
        n = int(mask.sum())
        csa = n * px
        # the labels' box comes within the margin only where one of their pixels does
        edge = (box[0].start < m_rows or box[1].start < m_cols
                or box[0].stop > rows - m_rows or box[1].stop > cols - m_cols)
        if key in MUSCLES:
            if n >= MIN_ROI_PIXELS:
                vals = roi[mask].astype(np.float64)
                t, fat_bright = fat_threshold(vals, fat_ref)
                lean = int((vals <= t).sum()) if fat_bright else int((vals >= t).sum())
                fcsa = lean * px
                ff = (n - lean) / n * 100.0
                mean_si = float(vals.mean())
                ratio = mean_si / fat_ref if fat_ref else None
                contrast = None
                if key in CONTRAST_STRUCTURES:  # the box grown by the ring: all it reads
                    grown = _grow(box, _ring_px(pixel_spacing) + 1, labels.shape)
                    contrast = structure_contrast(image[grown], np.isin(labels[grown], labs), pixel_spacing)
                out[key] = StructureMeasurement(csa, fcsa, ff, mean_si, ratio, contrast, at_image_edge=edge)
            else:
                out[key] = StructureMeasurement(csa, csa, None, None, None, at_image_edge=edge)
        elif key == "subcutaneous_fat" and n:
            out[key] = StructureMeasurement(csa, mean_si=float(roi[mask].mean()), at_image_edge=edge)
        else:
            out[key] = StructureMeasurement(csa, at_image_edge=edge)
    return SliceMeasurements(out)


def _box(boxes: list[tuple[slice, slice] | None], labs: Sequence[int]) -> tuple[slice, slice] | None:
    """The bounding box of every pixel with one of ``labs`` (``ndimage.find_objects``
    boxes), None when the slice has none."""
    found = [box for lab in labs if int(lab) - 1 < len(boxes) and (box := boxes[int(lab) - 1]) is not None]
    if not found:
        return None
    rows = slice(min(b[0].start for b in found), max(b[0].stop for b in found))
    cols = slice(min(b[1].start for b in found), max(b[1].stop for b in found))
    return rows, cols


def _grow(box: tuple[slice, slice], margin: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """``box`` widened by ``margin`` pixels on every side, within ``shape``."""
    rows, cols = box
    return (slice(max(rows.start - margin, 0), min(rows.stop + margin, shape[0])),
            slice(max(cols.start - margin, 0), min(cols.stop + margin, shape[1])))


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def average(slices: list[SliceMeasurements]) -> dict[str, StructureMeasurement]:
    """Average per-slice measurements (None values are left out of each mean)."""
    if not slices:
        return {}
    out: dict[str, StructureMeasurement] = {}
    for key in STRUCTURES:
        ms = [s.values[key] for s in slices if key in s.values]
        out[key] = StructureMeasurement(
            csa_mm2=float(np.mean([m.csa_mm2 for m in ms])),
            fcsa_mm2=_mean([m.fcsa_mm2 for m in ms]),
            fat_fraction_pct=_mean([m.fat_fraction_pct for m in ms]),
            mean_si=_mean([m.mean_si for m in ms]),
            si_ratio_to_fat=_mean([m.si_ratio_to_fat for m in ms]),
            outline_contrast=_mean([m.outline_contrast for m in ms]),
            at_image_edge=any(m.at_image_edge for m in ms),
        )
    return out


@dataclass(frozen=True)
class LevelMeasurements:
    """A disc level's averaged measurements, asymmetry per pair and Kjaer grades."""

    measurements: dict[str, StructureMeasurement]
    asymmetry_pct: dict[str, float]
    kjaer_grade: dict[str, int]


def measure_level(
    images: np.ndarray, labels: np.ndarray, slice_indices: list[int], pixel_spacing: tuple[float, float]
) -> LevelMeasurements:
    """Measurements of one level averaged over ``slice_indices`` of a volume."""
    return level_of_slices([measure_slice(images[k], labels[k], pixel_spacing) for k in slice_indices])


def level_of_slices(per_slice: list[SliceMeasurements]) -> LevelMeasurements:
    """A level's measurements from its disc slices' (already measured) ones: the means,
    the asymmetry of the mean areas and the Kjaer grades of the mean fat fractions."""
    m = average(per_slice)
    asym: dict[str, float] = {}
    for pair, (left, right) in PAIRS.items():
        lm, rm = m.get(left), m.get(right)
        if lm is None or rm is None:
            continue
        lf = lm.fcsa_mm2 if lm.fcsa_mm2 is not None else lm.csa_mm2
        rf = rm.fcsa_mm2 if rm.fcsa_mm2 is not None else rm.csa_mm2
        if lf > 0 or rf > 0:
            asym[pair] = asymmetry_pct(lf, rf)
    kjaer: dict[str, int] = {}
    for key in ("multifidus_left", "multifidus_right"):
        ff = m[key].fat_fraction_pct if key in m else None
        if ff is not None:
            kjaer[key] = kjaer_grade(ff)
    return LevelMeasurements(m, asym, kjaer)


#: Plausible CSA ranges (mm2) at a disc level; values outside are flagged, not hidden.
PLAUSIBLE_CSA_MM2: dict[str, tuple[float, float]] = {
    "disc": (400.0, 4000.0),
    "dural_sac": (10.0, 450.0),
    "spinal_canal": (30.0, 700.0),
    "psoas_left": (100.0, 4000.0),
    "psoas_right": (100.0, 4000.0),
    "erector_spinae_left": (300.0, 5000.0),
    "erector_spinae_right": (300.0, 5000.0),
    "multifidus_left": (100.0, 2500.0),
    "multifidus_right": (100.0, 2500.0),
}
#: Asymmetry above this (%) is flagged.
ASYMMETRY_FLAG_PCT = 50.0


def low_contrast(m: StructureMeasurement | None) -> float | None:
    """The outline contrast of a measurement when it is below :data:`LOW_CONTRAST`, else None."""
    if m is None or m.outline_contrast is None or not m.outline_contrast < LOW_CONTRAST:
        return None
    return m.outline_contrast


def _names(keys: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"


def plausibility_flags(level_name: str, lm: LevelMeasurements) -> list[str]:
    """Human-readable warnings for implausible measurements at one level."""
    flags: list[str] = []
    for key, (lo, hi) in PLAUSIBLE_CSA_MM2.items():
        m = lm.measurements.get(key)
        if m is None:
            continue
        if m.csa_mm2 == 0:
            flags.append(f"{level_name}: {key} not found")
        elif not lo <= m.csa_mm2 <= hi:
            flags.append(f"{level_name}: {key} CSA {m.csa_mm2:.0f} mm2 outside plausible {lo:.0f}-{hi:.0f}")
    low = {key: c for key in CONTRAST_STRUCTURES if (c := low_contrast(lm.measurements.get(key))) is not None}
    if low:
        values = ", ".join(f"{c:.2f}" for c in low.values())
        one = len(low) == 1
        flags.append(
            f"{level_name}: {_names(list(low))} {'outline has' if one else 'outlines have'} little contrast to "
            f"{'its' if one else 'their'} surroundings ({values} < {LOW_CONTRAST}): "
            f"{'its CSA' if one else 'their CSAs'} may be the model's guess; check on the overlay"
        )
    cut = [key for key in PLAUSIBLE_CSA_MM2 if (m := lm.measurements.get(key)) is not None and m.at_image_edge]
    if cut:
        one = len(cut) == 1
        flags.append(
            f"{level_name}: {_names(cut)} {'reaches' if one else 'reach'} the edge of the image: "
            f"the field of view may cut {'it' if one else 'them'}, and {'its CSA' if one else 'their CSAs'} "
            "would then leave out what lies outside it; check on the overlay"
        )
    for pair, pct in lm.asymmetry_pct.items():
        if pct > ASYMMETRY_FLAG_PCT:
            flags.append(f"{level_name}: {pair} asymmetry {pct:.0f} % above {ASYMMETRY_FLAG_PCT:.0f} %")
    return flags
