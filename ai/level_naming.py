"""Naming disc levels from anatomical evidence: cues per level and their joint posterior.

The levels of one series are consecutive discs (or discs a known number of steps apart,
see :func:`ai.levels.level_steps`), so their names are fixed by one unknown: the name of
the most caudal level. Each level contributes the likelihood of its cues under each name,
and the posterior over the caudal name (uniform prior) gives every level's name and
confidence at once. Cues:

* **pelvis**: the iliac wings appear lateral to the spine only at L5-S1 (thin islands of
  intermediate marrow signal outside every labelled structure);
* **cord**: the cord / conus (one round dark structure filling part of the sac) is seen
  at L1-L2 in about a third of adults, rarely at L2-L3, never lower;
* **muscles**: psoas grows and erector spinae shrinks caudally, multifidus grows
  caudally (Fortin et al. via clinical spec section 3); the log area ratios psoas/ES and
  multifidus/ES on the disc slice are modelled as Gaussian per level;
* **sagittal**: a disc centre from a sagittal series of the same study (strongest).

A study with none of these cues gives a flat posterior, and its levels stay unnamed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ai.labels import LEVEL_NAMES, STRUCTURES, Label

logger = logging.getLogger(__name__)

N_NAMES = len(LEVEL_NAMES)

#: Pelvis evidence bins by iliac-marrow area (mm2): none < 250 <= weak < 500 <= strong.
PELVIS_BIN_EDGES_MM2 = (250.0, 500.0)
#: P(bin | level name index), rows L1-L2 .. L5-S1. On 64 phantom series (seeds 55000 and
#: 56000, 51 L5-S1 levels, ~170 others) every L5-S1 level had weak (2) or strong (49)
#: evidence and no other level had any; the table is smoothed towards what real pelves
#: do (a high-riding pelvis shows its wings at L4-L5 too).
P_PELVIS_BIN = np.array(
    [
        [0.97, 0.025, 0.005],
        [0.97, 0.025, 0.005],
        [0.95, 0.04, 0.01],
        [0.88, 0.08, 0.04],
        [0.03, 0.07, 0.90],
    ]
)
#: P(cord cue | level): L1-L2 0.35 (conus at or below L1-L2 in about a third), L2-L3 0.05.
P_CORD = np.array([0.35, 0.05, 0.003, 0.002, 0.002])
#: Muscle ratios vary between people as a whole: a subject-wide random offset with this
#: SD (shared by all levels of the series) on top of the per-level SD below.
MUSCLE_SUBJECT_SD = 0.25
#: Per-level means of (log psoas/ES, log multifidus/ES) on the disc slice (fitted on 120
#: phantom subjects, seed 777, which follow the literature trends of clinical spec section
#: 3) and the standard deviation used: the phantom spread is 0.19-0.26 with a correlation
#: of 0.6 between the two ratios, inflated here so that the two count as less than two
#: independent cues and real anatomy's wider spread is not over-trusted.
MUSCLE_LOG_RATIO_MEAN = np.array(
    [
        [-2.03, -1.90],
        [-1.14, -1.60],
        [-0.50, -1.19],
        [-0.02, -0.62],
        [0.53, 0.06],
    ]
)
MUSCLE_LOG_RATIO_SD = np.array([0.3, 0.3])
#: Muscle areas below this (mm2, both sides) make the ratio unreliable: cue unused.
MUSCLE_MIN_AREA_MM2 = 100.0
#: P(sagittal hint says name j | true name i): right with this probability.
P_SAGITTAL_RIGHT = 0.97

#: Pelvis cue: marrow islands lateral to the canal by at least this (mm) ...
PELVIS_MIN_LATERAL_MM = 40.0
#: ... each island at least this large (mm2), a thin band (half-width range, mm) ...
PELVIS_MIN_ISLAND_MM2 = 200.0
PELVIS_HALF_WIDTH_MM = (3.0, 7.0)
#: ... and long (major axis, mm), kidneys and fat lobules are thicker or shorter.
PELVIS_MIN_LENGTH_MM = 35.0
#: Marrow: between these fractions of the posterior subcutaneous-fat signal (wide,
#: because the posterior coil's signal falls off anteriorly).
PELVIS_MARROW_RANGE = (0.35, 0.75)
#: Cortex: the island's 1.5 mm rim is at most this fraction of the island's mean signal.
PELVIS_MAX_RIM_RATIO = 0.75
#: The iliac wings reach ~100 mm from the midline: a field of view narrower than this on
#: either side of the canal (mm) cannot show their absence.
PELVIS_MIN_FOV_HALF_MM = 85.0
#: ... within this band of rows around the canal (mm, anterior negative): the wings run
#: from beside the sacrum forwards, never to the anterior abdominal wall.
PELVIS_ROW_BAND_MM = (-60.0, 60.0)
#: Islands must lie mostly deeper than this under the body outline (mm): not skin.
PELVIS_MIN_SKIN_DEPTH_MM = 10.0
#: Pixels darker than this fraction of the fat signal are outside the body (air).
PELVIS_BODY_FRACTION = 0.15
#: Air regions cover at least this fraction of the image.
AIR_MIN_FRACTION = 0.003
#: Smoothing of the marrow mask: opening radius (mm).
PELVIS_OPENING_MM = 1.5

#: The pelvis and cord cues read T2 signal; their premises are checked on the level's own
#: labelled tissues first (a T1 or otherwise unusual contrast makes them no evidence,
#: instead of false evidence). Pelvis: subcutaneous fat at least this many times the
#: posterior muscles' median signal ...
T2_FAT_MUSCLE_MIN = 1.5
#: ... and the posterior elements (cortex and marrow) at this fraction of the fat, so that
#: bone marrow is where PELVIS_MARROW_RANGE looks for it. Cord: the CSF (95th percentile
#: of the sac) at least this many times the muscle. On phantoms of seeds 55000 / 56000
#: (not the evaluation seeds) the premises hold on 100 % / 96 % of realistic T2 slices
#: (the cord premise fails on compressed sacs, which show no cord anyway) and on 25 % /
#: 52 % of domain-randomised ones.
T2_ELEMENTS_FAT_RANGE = (0.15, 0.45)
T2_CSF_MUSCLE_MIN = 1.5
#: Fewest pixels of a reference tissue for the premise check.
T2_MIN_REFERENCE_PX = 20

#: Cord cue: a dark blob in the sac of at least this area (mm2) and fraction of the sac.
CORD_MIN_AREA_MM2 = 20.0
CORD_MIN_SAC_FRACTION = 0.10
#: Dark = below this fraction of the bright (CSF) intensity of the sac.
CORD_DARK_FRACTION = 0.55
#: Rootlets are at most this large (mm2); a larger dark blob is the cord.
ROOTLET_MAX_AREA_MM2 = 6.0


@dataclass(frozen=True)
class LevelCues:
    """Evidence measured on one level's slices (``None`` = not measurable)."""

    pelvis_area_mm2: float
    cord_fraction: float
    muscle_log_ratios: tuple[float, float] | None
    pelvis_observable: bool = True
    cord_observable: bool = True

    @property
    def pelvis_bin(self) -> int:
        """0 none, 1 weak, 2 strong iliac evidence."""
        return int(np.searchsorted(PELVIS_BIN_EDGES_MM2, self.pelvis_area_mm2, side="right"))

    @property
    def cord(self) -> bool:
        return self.cord_fraction > 0.0


def _canal_col(labels_2d: np.ndarray) -> float | None:
    for group in ((Label.DURAL_SAC, Label.EPIDURAL_SPACE), (Label.DISC, Label.VERTEBRAL_BODY)):
        mask = np.isin(labels_2d, [int(g) for g in group])
        if mask.any():
            return float(np.nonzero(mask)[1].mean())
    return None


def _fat_reference(image: np.ndarray, labels_2d: np.ndarray) -> float | None:
    fat = image[labels_2d == int(Label.SUBCUTANEOUS_FAT)]
    if fat.size < 20:
        return None
    return float(np.median(fat))


def _canal_row(labels_2d: np.ndarray) -> float | None:
    mask = np.isin(labels_2d, (int(Label.DURAL_SAC), int(Label.EPIDURAL_SPACE)))
    return float(np.nonzero(mask)[0].mean()) if mask.any() else None


def pelvis_area(image: np.ndarray, labels_2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Area (mm2) of iliac-wing marrow lateral to the spine, outside every label.

    Iliac bone on T2: fatty marrow of intermediate signal (about half the fat signal) in
    thin long wings framed by dark cortex, lateral to the psoas and erector spinae. Bowel,
    kidneys and visceral fat are thicker, shorter or lack the dark frame.
    """
    ref = _fat_reference(image, labels_2d)
    col = _canal_col(labels_2d)
    if ref is None or ref <= 0 or col is None:
        return 0.0
    rs, cs = pixel_spacing
    lo, hi = PELVIS_MARROW_RANGE
    marrow = (image > lo * ref) & (image < hi * ref) & (labels_2d == 0)
    cols = np.arange(image.shape[1])[None, :]
    marrow &= np.abs(cols - col) * cs >= PELVIS_MIN_LATERAL_MM
    row = _canal_row(labels_2d)
    if row is not None:
        rows = (np.arange(image.shape[0])[:, None] - row) * rs
        marrow &= (rows >= PELVIS_ROW_BAND_MM[0]) & (rows <= PELVIS_ROW_BAND_MM[1])
    structure = ndimage.generate_binary_structure(2, 1)
    radius = max(1, int(round(PELVIS_OPENING_MM / min(rs, cs))))
    marrow = ndimage.binary_opening(marrow, structure=structure, iterations=radius)
    lab, n = ndimage.label(marrow)
    if n == 0:
        return 0.0
    depth = ndimage.distance_transform_edt(marrow, sampling=(rs, cs))
    # Skin and the fat under it run along the body outline: keep islands inside the body.
    inside = ndimage.distance_transform_edt(~_air(image, PELVIS_BODY_FRACTION * ref), sampling=(rs, cs))
    inside = inside >= PELVIS_MIN_SKIN_DEPTH_MM
    total = 0.0
    for k in range(1, n + 1):
        island = lab == k
        size = float(island.sum()) * rs * cs
        if size < PELVIS_MIN_ISLAND_MM2:
            continue
        half_width = float(depth[island].max())
        if not PELVIS_HALF_WIDTH_MM[0] <= half_width <= PELVIS_HALF_WIDTH_MM[1]:
            continue
        if _major_axis_mm(island, pixel_spacing) < PELVIS_MIN_LENGTH_MM:
            continue
        if float(inside[island].mean()) < 0.5:
            continue
        rim = ndimage.binary_dilation(island, structure=structure, iterations=radius) & ~island
        mean_island = float(image[island].mean())
        if mean_island > 0 and float(image[rim].mean()) <= PELVIS_MAX_RIM_RATIO * mean_island:
            total += size
    return total


def _air(image: np.ndarray, floor: float) -> np.ndarray:
    """Air around the body: large dark regions touching the image border.

    Dark bone or muscle cut by a small field of view also touches the border, but is
    small; air (behind the back, beside the flanks) is not.
    """
    dark = image <= floor
    lab, n = ndimage.label(dark)
    if n == 0:
        return dark
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(n + 1))
    keep = [k for k in edge if k > 0 and sizes[k] >= AIR_MIN_FRACTION * image.size]
    return np.isin(lab, keep)


def _major_axis_mm(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Length (mm) of the major axis of the ellipse with the same second moments."""
    r, c = np.nonzero(mask)
    if r.size < 3:
        return 0.0
    pts = np.stack([r * pixel_spacing[0], c * pixel_spacing[1]])
    eig = np.linalg.eigvalsh(np.cov(pts))
    return float(4.0 * np.sqrt(max(float(eig[-1]), 0.0)))


def cord_fraction(image: np.ndarray, labels_2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Fraction of the dural sac taken by one dark blob larger than a rootlet (cord), else 0."""
    sac = labels_2d == int(Label.DURAL_SAC)
    n_sac = int(sac.sum())
    if n_sac < 10:
        return 0.0
    bright = float(np.percentile(image[sac], 95))
    if bright <= 0:
        return 0.0
    dark = sac & (image < CORD_DARK_FRACTION * bright)
    lab, n = ndimage.label(dark)
    if n == 0:
        return 0.0
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    biggest = float(sizes.max())
    px = pixel_spacing[0] * pixel_spacing[1]
    if biggest * px < max(CORD_MIN_AREA_MM2, ROOTLET_MAX_AREA_MM2):
        return 0.0
    # A compressed sac (Schizas C/D) is uniformly dark: no bright CSF ring -> not a cord.
    if biggest / n_sac > 0.85:
        return 0.0
    frac = biggest / n_sac
    return frac if frac >= CORD_MIN_SAC_FRACTION else 0.0


def t2_premises(image: np.ndarray, labels_2d: np.ndarray) -> tuple[bool, bool]:
    """Whether the slice's contrast is what the (pelvis, cord) cues assume (T2-like).

    Measured on the segmented reference tissues of the slice itself: posterior muscles,
    subcutaneous fat, posterior elements and dural sac (thresholds above).
    """
    muscle_labels = [
        int(lab)
        for key in ("erector_spinae_left", "erector_spinae_right", "multifidus_left", "multifidus_right")
        for lab in STRUCTURES[key]
    ]
    muscle = image[np.isin(labels_2d, muscle_labels)]
    if muscle.size < T2_MIN_REFERENCE_PX:
        return False, False
    muscle_signal = float(np.median(muscle))
    if muscle_signal <= 0:
        return False, False
    fat = image[labels_2d == int(Label.SUBCUTANEOUS_FAT)]
    elements = image[labels_2d == int(Label.POSTERIOR_ELEMENTS)]
    pelvis_ok = False
    if fat.size >= T2_MIN_REFERENCE_PX and elements.size >= T2_MIN_REFERENCE_PX:
        fat_signal = float(np.median(fat))
        lo, hi = T2_ELEMENTS_FAT_RANGE
        pelvis_ok = (
            fat_signal >= T2_FAT_MUSCLE_MIN * muscle_signal
            and lo * fat_signal <= float(np.median(elements)) <= hi * fat_signal
        )
    sac = image[labels_2d == int(Label.DURAL_SAC)]
    cord_ok = sac.size >= T2_MIN_REFERENCE_PX and float(np.percentile(sac, 95)) >= T2_CSF_MUSCLE_MIN * muscle_signal
    return pelvis_ok, bool(cord_ok)


def muscle_log_ratios(labels_2d: np.ndarray, pixel_spacing: tuple[float, float]) -> tuple[float, float] | None:
    """``(log psoas/ES, log multifidus/ES)`` areas on one slice, both sides summed."""
    px = pixel_spacing[0] * pixel_spacing[1]

    def area(*keys: str) -> float:
        labs = [int(lab) for k in keys for lab in STRUCTURES[k]]
        return float(np.isin(labels_2d, labs).sum()) * px

    psoas = area("psoas_left", "psoas_right")
    es = area("erector_spinae_left", "erector_spinae_right")
    mf = area("multifidus_left", "multifidus_right")
    if min(psoas, es, mf) < MUSCLE_MIN_AREA_MM2:
        return None
    return float(np.log(psoas / es)), float(np.log(mf / es))


def measure_cues(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    mid: int,
    pixel_spacing: tuple[float, float],
) -> LevelCues:
    """Cues of one level from its disc slices (``mid`` indexes into the sequences).

    Where the contrast fails a cue's premise (:func:`t2_premises`), that cue is recorded
    as not observable: neither for nor against any name. Absent wings count against
    L5-S1 only where the CSF premise holds too: a random contrast passes the fat /
    elements premise by chance while its marrow lies at any signal.
    """
    pelvis_ok, cord_ok = t2_premises(images[mid], labels[mid])
    pel = 0.0
    if pelvis_ok:
        pel = max(
            (pelvis_area(i, lab, pixel_spacing) for i, lab in zip(images, labels, strict=True)),
            default=0.0,
        )
    col = _canal_col(labels[mid])
    width = images[mid].shape[1]
    observable = (
        pelvis_ok
        and cord_ok
        and col is not None
        and min(col, width - 1 - col) * pixel_spacing[1] >= PELVIS_MIN_FOV_HALF_MM
        and _fat_reference(images[mid], labels[mid]) is not None  # no reference, no verdict
    )
    return LevelCues(
        pelvis_area_mm2=pel,
        pelvis_observable=observable,
        cord_fraction=cord_fraction(images[mid], labels[mid], pixel_spacing) if cord_ok else 0.0,
        cord_observable=cord_ok,
        muscle_log_ratios=muscle_log_ratios(labels[mid], pixel_spacing),
    )


def _log_lik(cue: LevelCues, name_index: int) -> float:
    """Log-likelihood of one level's pelvis and cord cues if it is ``LEVEL_NAMES[name_index]``.

    Iliac wings outside a small field of view are not evidence against L5-S1: the pelvis
    cue then counts only when present.
    """
    observed = cue.pelvis_observable or cue.pelvis_bin > 0
    p_pel = float(P_PELVIS_BIN[name_index, cue.pelvis_bin]) if observed else 1.0
    p_cord = float(P_CORD[name_index])
    if not cue.cord_observable and not cue.cord:
        return float(np.log(p_pel))
    return float(np.log(p_pel) + np.log(p_cord if cue.cord else 1.0 - p_cord))


def _muscle_log_lik(cues: Sequence[LevelCues], names: Sequence[int]) -> float:
    """Joint log-likelihood of the muscle ratios of all levels under one naming.

    Per ratio, residuals from the level means are Gaussian with covariance
    ``sd**2 I + subject_sd**2 J`` (one subject-wide offset), so that a subject with a
    big psoas everywhere does not shift every level's name with full confidence.
    """
    idx = [k for k, c in enumerate(cues) if c.muscle_log_ratios is not None]
    if not idx:
        return 0.0
    total = 0.0
    n = len(idx)
    for r in range(2):
        resid = np.array(
            [cues[k].muscle_log_ratios[r] - MUSCLE_LOG_RATIO_MEAN[names[k], r] for k in idx]  # type: ignore[index]
        )
        cov = MUSCLE_LOG_RATIO_SD[r] ** 2 * np.eye(n) + MUSCLE_SUBJECT_SD**2 * np.ones((n, n))
        total += float(-0.5 * resid @ np.linalg.solve(cov, resid))
    return total


def name_posterior(
    offsets: Sequence[int],
    cues: Sequence[LevelCues],
    sagittal: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior over the name of the most caudal level.

    Parameters
    ----------
    offsets
        Anatomical steps of each level above the most caudal one (0 first, increasing).
    cues
        Cues of each level.
    sagittal
        Level index -> name index matched from a sagittal series.

    Returns
    -------
    hypotheses, posterior
        Candidate name indices of the caudal level and their posterior probabilities.
    """
    if len(offsets) != len(cues):
        raise ValueError("offsets and cues must have the same length")
    top = int(offsets[-1]) if offsets else 0
    hyps = np.array([h for h in range(N_NAMES) if h - top >= 0], dtype=int)
    if hyps.size == 0:
        return hyps, np.zeros(0)
    logp = np.zeros(hyps.size)
    for n, h in enumerate(hyps):
        names = [int(h - o) for o in offsets]
        logp[n] += _muscle_log_lik(cues, names)
        for k, cue in enumerate(cues):
            j = names[k]
            logp[n] += _log_lik(cue, j)
            if sagittal and k in sagittal:
                right = sagittal[k] == j
                logp[n] += np.log(P_SAGITTAL_RIGHT if right else (1 - P_SAGITTAL_RIGHT) / (N_NAMES - 1))
    logp -= logp.max()
    post = np.exp(logp)
    return hyps, post / post.sum()
