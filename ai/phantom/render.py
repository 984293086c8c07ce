"""``render_slice``: one axial slice of a subject as image, labels and exact truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ai.labels import MUSCLES, NUM_CLASSES, STRUCTURES
from ai.phantom.anatomy import Subject
from ai.phantom.raster import Canvas, draw_slice
from ai.phantom.synth import synth_randomised, synth_realistic
from ai.phantom.tissues import MUSCLE_TISSUES, TISSUE_TO_LABEL, Tissue

KINDS: tuple[str, ...] = ("disc", "mid")
MODES: tuple[str, ...] = ("realistic", "randomised")
DEFAULT_MATRIX: tuple[int, int] = (256, 256)
DEFAULT_SPACING_MM = 0.75
#: the field of view is centred this far behind the canal centre by default (mm)
DEFAULT_FOV_CENTRE_Y_MM = 8.0
#: smallest field of view the randomised mode draws (mm)
MIN_RANDOM_FOV_MM = 100.0
RANDOM_ROTATION_DEG = 15.0
#: DSCA cut-offs (mm2) of the quantitative grade (clinical spec section 0)
DSCA_RELATIVE_MM2 = 100.0
DSCA_ABSOLUTE_MM2 = 75.0
SEVERITY_OF_SCHIZAS: dict[str, str] = {"A": "normal/mild", "B": "moderate", "C": "severe", "D": "severe"}


@dataclass(frozen=True)
class PhantomSlice:
    """One synthetic slice with its exact ground truth.

    Attributes
    ----------
    image
        ``(rows, cols)`` float32 stored values (integer-valued, 0..65535).
    labels
        ``(rows, cols)`` uint8 values of :class:`ai.labels.Label` (exclusive).
    pixel_spacing
        ``(row, col)`` in mm.
    truth
        Level, kind, Schizas grade, DSCA (mm2), structure CSAs (mm2, from ``labels``),
        muscle fat fractions (%), posterior epidural fat, rootlets or cord... (see
        ``docs/phantom.md``).
    rootlet_mask
        Pixels of cauda equina rootlets; for Schizas C/D the whole (compressed) sac, where
        rootlets are present but not recognisable.
    canal_centre_px
        ``(row, col)`` of the canal centre (fractional pixels).
    tissue
        The fine tissue map (:class:`ai.phantom.tissues.Tissue`) the image was made from.
    cord_mask
        Pixels of the spinal cord / conus (empty at most levels).
    """

    image: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float]
    truth: dict[str, Any]
    rootlet_mask: np.ndarray
    canal_centre_px: tuple[float, float]
    tissue: np.ndarray = field(repr=False)
    cord_mask: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.image.shape != self.labels.shape:
            raise ValueError("image and labels must have the same shape")
        if self.labels.dtype != np.uint8:
            raise TypeError("labels must be uint8")


def structure_areas(labels: np.ndarray, pixel_area_mm2: float) -> dict[str, float]:
    """CSA (mm2) of every structure of :data:`ai.labels.STRUCTURES` in a label map."""
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    return {key: float(sum(int(counts[int(lab)]) for lab in labs) * pixel_area_mm2)
            for key, labs in STRUCTURES.items()}


def dsca_grade(dsca_mm2: float) -> str:
    """Quantitative DSCA grade: normal (>= 100), relative (75-100), absolute (< 75)."""
    if dsca_mm2 >= DSCA_RELATIVE_MM2:
        return "normal"
    if dsca_mm2 >= DSCA_ABSOLUTE_MM2:
        return "relative"
    return "absolute"


def render_slice(
    subject: Subject,
    level: str,
    kind: str = "disc",
    mode: str = "realistic",
    rng: np.random.Generator | None = None,
    *,
    pixel_spacing: float | tuple[float, float] | None = None,
    matrix: tuple[int, int] | None = None,
    rotation_deg: float | None = None,
    offset_mm: float = 0.0,
    fov_shift_mm: tuple[float, float] | None = None,
    contrast_seed: int | None = None,
) -> PhantomSlice:
    """Render one axial slice of ``subject`` at ``level``.

    Parameters
    ----------
    kind
        ``disc``: the slice through the disc centre (offset along the slice normal by
        ``offset_mm``; beyond half the disc height it shows the endplate / vertebral body);
        ``mid``: the mid-vertebral slice of the upper vertebra (L4 for L4-L5).
    mode
        ``realistic`` (T2 TSE-like) or ``randomised`` (domain randomisation).
    rng
        Noise, texture and (randomised mode) acquisition draws; ``None`` means a fixed seed 0.
    pixel_spacing
        mm (one value or ``(row, col)``); default 0.75, or random 0.3-1.2 in randomised mode.
    matrix
        ``(rows, cols)``, default 256 x 256.
    rotation_deg
        In-plane rotation of the patient; default 0, or random +-15 in randomised mode.
    fov_shift_mm
        Position ``(x, y)`` of the field-of-view centre relative to the canal centre in image
        axes; default ``(0, 8)``, random around it in randomised mode.
    contrast_seed
        Randomised mode: draw the contrast and artefact parameters from this seed (so the
        slices of one series share them) and only the noise from ``rng``.
    """
    if level not in subject.levels:
        raise ValueError(f"level {level!r} not in subject levels {subject.level_names}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    rows, cols = matrix if matrix is not None else DEFAULT_MATRIX
    randomised = mode == "randomised"
    if pixel_spacing is None:
        if randomised:
            lo = max(0.3, MIN_RANDOM_FOV_MM / max(rows, cols))
            sp = float(math.exp(rng.uniform(math.log(lo), math.log(1.2))))
            spacing = (sp, sp)
        else:
            spacing = (DEFAULT_SPACING_MM, DEFAULT_SPACING_MM)
    elif isinstance(pixel_spacing, tuple):
        spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    else:
        spacing = (float(pixel_spacing), float(pixel_spacing))
    if not (spacing[0] > 0 and spacing[1] > 0):
        raise ValueError(f"pixel_spacing must be positive, got {spacing}")
    if rotation_deg is None:
        rotation_deg = float(rng.uniform(-RANDOM_ROTATION_DEG, RANDOM_ROTATION_DEG)) if randomised else 0.0
    if fov_shift_mm is None:
        if randomised:
            half = 0.25 * min(rows * spacing[0], cols * spacing[1])
            fov_shift_mm = (float(rng.uniform(-half, half) * 0.6),
                            DEFAULT_FOV_CENTRE_Y_MM + float(rng.uniform(-half, half) * 0.6))
        else:
            fov_shift_mm = (0.0, DEFAULT_FOV_CENTRE_Y_MM)
    centre_px = ((rows - 1) / 2.0 - fov_shift_mm[1] / spacing[0],
                 (cols - 1) / 2.0 - fov_shift_mm[0] / spacing[1])
    cv = Canvas((rows, cols), spacing, centre_px, rotation_deg, subject.deformation)
    lv = subject.levels[level]
    geo = draw_slice(cv, subject, lv, kind, offset_mm, rng)
    tissue = cv.tissue
    labels = TISSUE_TO_LABEL[tissue]
    synth_params: dict[str, float] = {}
    if randomised:
        crng = np.random.default_rng(contrast_seed) if contrast_seed is not None else None
        image, synth_params = synth_randomised(tissue, spacing, rng, crng)
    else:
        image = synth_realistic(tissue, cv.y, 57.0 + subject.subcut_post_mm, spacing, rng,
                                {Tissue.NUCLEUS: lv.nucleus_signal})
    px_area = spacing[0] * spacing[1]
    tcounts = np.bincount(tissue.ravel(), minlength=len(Tissue))
    csa = structure_areas(labels, px_area)
    ff: dict[str, float] = {}
    for key in MUSCLES:
        lean, fat, _ = MUSCLE_TISSUES[key]
        total = int(tcounts[int(lean)] + tcounts[int(fat)])
        ff[key] = float(100.0 * tcounts[int(fat)] / total) if total else 0.0
    if geo.schizas in ("A", "B"):
        rootlet_mask = tissue == Tissue.ROOTLET
    else:
        rootlet_mask = tissue == Tissue.SAC_COMPRESSED
    cord_mask = tissue == Tissue.CORD
    pef = _posterior_epidural_fat_px(cv, geo.sac_cy, geo.sac_a)
    dsca = csa["dural_sac"]
    truth: dict[str, Any] = {
        "level": level,
        "kind": kind,
        "offset_mm": float(offset_mm),
        "mode": mode,
        "through_disc": geo.is_disc,
        "schizas": geo.schizas,
        "schizas_subgrade": geo.subgrade,
        "severity": SEVERITY_OF_SCHIZAS[geo.schizas],
        "dsca_mm2": dsca,
        "dsca_grade": dsca_grade(dsca),
        "canal_mm2": csa["spinal_canal"],
        "rootlets": "cord" if geo.has_cord else "rootlets",
        "n_rootlets": int(len((lv.stenosis if kind == "disc" else lv.mid).rootlets)),
        "posterior_epidural_fat": bool(pef > 0),
        "posterior_epidural_fat_mm2": float(pef * px_area),
        "csa_mm2": csa,
        "fat_fraction_pct": ff,
        "disc_degeneration": int(lv.degeneration),
        "pixel_spacing": [float(spacing[0]), float(spacing[1])],
        "rotation_deg": float(rotation_deg),
        "canal_centre_px": [float(centre_px[0]), float(centre_px[1])],
        "synthesis": synth_params,
    }
    return PhantomSlice(
        image=image.astype(np.float32, copy=False), labels=labels, pixel_spacing=spacing,
        truth=truth, rootlet_mask=rootlet_mask, canal_centre_px=(float(centre_px[0]), float(centre_px[1])),
        tissue=tissue, cord_mask=cord_mask,
    )


def _posterior_epidural_fat_px(cv: Canvas, sac_cy: float, sac_a: float) -> int:
    """Epidural fat pixels behind the sac centre and within the sac's width (midline)."""
    win = cv.window(-sac_a, sac_a, sac_cy, sac_cy + 25.0)
    if win is None:
        return 0
    m = ((cv.tissue[win] == Tissue.EPIDURAL_FAT) & (cv.y[win] > np.float32(sac_cy))
         & (np.abs(cv.x[win]) < np.float32(sac_a)))
    return int(m.sum())
