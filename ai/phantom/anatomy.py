"""Parametric lumbar anatomy of one synthetic subject.

Every size and position is in millimetres in the *spine frame* of an axial slice: DICOM LPS
axes with the origin at the canal centre (+x = patient left, +y = posterior), as in
``clinical-spec.md`` section 3. Per-level tables hold the population means (L4-L5 from the
spec, other levels scaled from the literature cited there); :func:`sample_subject` draws one
subject around them: body habitus, atrophy with fat infiltration, left/right asymmetry,
scoliotic rotation, disc degeneration and per-level stenosis (see :mod:`ai.phantom.pathology`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ai.labels import LEVEL_NAMES
from ai.phantom.pathology import StenosisParams, grade_for, sample_stenosis

logger = logging.getLogger(__name__)

DEFAULT_LEVELS: tuple[str, ...] = ("L3-L4", "L4-L5", "L5-S1")
MUSCLE_KEYS: tuple[str, ...] = ("psoas", "erector_spinae", "multifidus")
SIDES: tuple[str, ...] = ("left", "right")

#: Nominal patient z (mm, superior +) of each disc centre and canal y (mm, posterior +):
#: a lordotic curve whose slope sets the disc tilt.
_DISC_Z: dict[str, float] = {"L1-L2": 80.0, "L2-L3": 45.0, "L3-L4": 10.0, "L4-L5": -25.0, "L5-S1": -60.0}
_CANAL_Y: dict[str, float] = {"L1-L2": 4.0, "L2-L3": -2.0, "L3-L4": -5.0, "L4-L5": -3.0, "L5-S1": 8.0}


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in the spine frame: centre (mm), semi-axes (mm), angle (degrees, x towards y)."""

    cx: float
    cy: float
    a: float
    b: float
    angle_deg: float = 0.0

    def __post_init__(self) -> None:
        if not (self.a > 0 and self.b > 0):
            raise ValueError(f"semi-axes must be positive, got a={self.a}, b={self.b}")

    @property
    def area_mm2(self) -> float:
        return math.pi * self.a * self.b

    def mirrored(self) -> Ellipse:
        """The same ellipse on the other side (x -> -x)."""
        return Ellipse(-self.cx, self.cy, self.a, self.b, -self.angle_deg)


@dataclass(frozen=True)
class _LevelBase:
    disc: tuple[float, float]  # semi-axes (LR, AP)
    psoas: tuple[float, float, float, float, float]  # cx, cy, a, b, angle (left side)
    es: tuple[float, float, float, float, float]
    mf: tuple[float, float, float, float, float]
    disc_height: float
    vb_height: float
    kidney: bool
    quadratus: bool
    iliac: bool
    vessels: str  # "aorta" | "bifurcation" | "iliac"
    cord_prob: float
    tp_length: float  # transverse process length beyond the pedicle (mm)


# Areas: ES 2200/2200/2000/1630/1000, MF 350/480/650/960/1100, psoas 350/750/1200/1500/1500 mm2.
_BASE: dict[str, _LevelBase] = {
    "L1-L2": _LevelBase((22.0, 16.0), (27, -22, 10, 11, 20), (43, 27, 23.5, 30, -10), (13, 28, 8, 14, 8),
                        9.0, 25.0, True, True, False, "aorta", 0.35, 18.0),
    "L2-L3": _LevelBase((23.5, 16.5), (32, -22, 14, 17, 25), (45, 28, 23.5, 30, -8), (14, 29, 9.5, 16, 8),
                        10.0, 26.0, True, True, False, "aorta", 0.04, 24.0),
    "L3-L4": _LevelBase((25.0, 17.5), (40, -21, 19, 20, 25), (46, 30, 22, 29, -5), (15, 31, 11, 19, 6),
                        10.5, 27.0, False, True, False, "bifurcation", 0.0, 27.0),
    "L4-L5": _LevelBase((26.0, 18.5), (46, -22, 22, 21.7, 20), (47, 32, 20, 26, -2), (16, 33, 13, 23.5, 4),
                        11.0, 27.0, False, False, False, "iliac", 0.0, 20.0),
    "L5-S1": _LevelBase((26.0, 18.0), (44, -36, 22, 21.7, 35), (40, 35, 16, 20, 5), (16, 34, 14, 25, 2),
                        10.0, 26.0, False, False, True, "iliac", 0.0, 14.0),
}


@dataclass(frozen=True)
class LevelAnatomy:
    """Everything needed to draw the slices of one disc level (spine frame, mm).

    ``z_mm`` / ``canal_y_mm`` / ``canal_x_mm`` place the disc centre in patient LPS; ``tilt_deg``
    is the disc plane's rotation about the patient x axis (normal ``(0, -sin t, cos t)``).
    ``mid`` describes the mid-vertebral slice of the upper vertebra (L4 for L4-L5).
    """

    name: str
    z_mm: float
    canal_x_mm: float
    canal_y_mm: float
    tilt_deg: float
    disc_height_mm: float
    vb_height_mm: float
    disc_rx: float
    disc_ry: float
    degeneration: int
    nucleus_signal: float
    canal_w: float
    canal_h: float
    canal_cy: float
    muscles: dict[str, Ellipse]
    stenosis: StenosisParams
    mid: StenosisParams
    kidney: bool
    quadratus: bool
    iliac: bool
    vessels: str
    tp_length: float
    facet_angle_deg: float
    fat_fraction_pct: dict[str, float]

    @property
    def disc_posterior_y(self) -> float:
        """The disc's posterior margin (mm, spine frame), the canal's anterior wall."""
        return self.canal_cy - self.canal_h + 0.5

    @property
    def disc_cy(self) -> float:
        return self.disc_posterior_y - self.disc_ry


@dataclass(frozen=True)
class Subject:
    """One synthetic subject: global habitus plus per-level anatomy and pathology."""

    habitus: float
    subcut_post_mm: float
    subcut_lat_mm: float
    subcut_ant_mm: float
    body_half_width_mm: float
    body_anterior_mm: float
    atrophy: float
    scoliosis_deg: float
    lateral_shift_mm: float
    levels: dict[str, LevelAnatomy]
    deformation: np.ndarray = field(repr=False)  # (K, 5): amp_x, amp_y, kx, ky, phase
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a subject needs at least one level")
        for name in self.levels:
            if name not in LEVEL_NAMES:
                raise ValueError(f"unknown level {name!r}; expected one of {LEVEL_NAMES}")

    @property
    def level_names(self) -> tuple[str, ...]:
        """Levels in caudal -> cranial order."""
        return tuple(sorted(self.levels, key=lambda n: self.levels[n].z_mm))


def _muscles(
    rng: np.random.Generator, base: _LevelBase, scale: dict[str, float]
) -> dict[str, Ellipse]:
    out: dict[str, Ellipse] = {}
    for key, (cx, cy, a, b, ang) in (("psoas", base.psoas), ("erector_spinae", base.es),
                                     ("multifidus", base.mf)):
        for side in SIDES:
            s = math.sqrt(scale[f"{key}_{side}"])
            jitter = rng.normal(0.0, 1.5, size=2)
            aspect = float(np.exp(rng.normal(0.0, 0.06)))
            sa, sb = a * s * aspect, b * s / aspect
            # Keep the medial border roughly in place when a muscle shrinks (atrophy).
            ccx = cx - (a - sa) * (0.6 if key != "psoas" else 0.8) + jitter[0]
            ccy = cy + jitter[1] - (b - sb) * (0.3 if key != "psoas" else 0.0)
            if key == "multifidus":
                ccx = sa + 2.5 + float(jitter[0]) * 0.3  # medial border against the spinous process
            e = Ellipse(ccx, ccy, sa, sb, ang + float(rng.normal(0, 4)))
            out[f"{key}_{side}"] = e if side == "left" else e.mirrored()
    return out


def sample_subject(
    rng: np.random.Generator,
    *,
    stenosis: str = "random",
    levels: Sequence[str] = DEFAULT_LEVELS,
    **options: Any,
) -> Subject:
    """Draw one subject's anatomy and pathology.

    Parameters
    ----------
    rng
        Source of randomness; the same generator state gives the same subject.
    stenosis
        ``none | mild | moderate | severe | random`` or a Schizas grade ``A``..``D``, applied
        to every level (``random`` draws each level independently).
    levels
        Disc levels to model (names from :data:`ai.labels.LEVEL_NAMES`).
    options
        ``fat_fraction`` (force mean muscle fat fraction, %), ``atrophy`` (0..1),
        ``habitus`` (0 thin .. 1 obese), ``scoliosis_deg``, ``cord`` (bool: force a cord at
        the upper levels), ``grade_probs`` (dict grade -> weight for ``random``).
    """
    if not levels:
        raise ValueError("levels must not be empty")
    for name in levels:
        if name not in LEVEL_NAMES:
            raise ValueError(f"unknown level {name!r}; expected one of {LEVEL_NAMES}")
    habitus = float(options.get("habitus", rng.beta(2.0, 2.5)))
    atrophy = float(options.get("atrophy", rng.beta(1.6, 2.6)))
    if not (0.0 <= habitus <= 1.0 and 0.0 <= atrophy <= 1.0):
        raise ValueError("habitus and atrophy must lie in [0, 1]")
    subcut_post = 6.0 + 34.0 * habitus + rng.normal(0, 3)
    subcut_post = float(np.clip(subcut_post, 4.0, 50.0))
    mean_ff = float(options.get("fat_fraction", np.clip(3.0 + 45.0 * atrophy + rng.normal(0, 4), 0.5, 58.0)))
    if not 0.0 <= mean_ff <= 60.0:
        raise ValueError("fat_fraction must lie in [0, 60] %")
    scol = float(options.get("scoliosis_deg", rng.normal(0, 3.0) if rng.random() < 0.7 else rng.normal(0, 8.0)))
    # Per-muscle size factors: atrophy shrinks paraspinals most; asymmetry up to ~20 %.
    scale: dict[str, float] = {}
    ff_base: dict[str, float] = {}
    for key in MUSCLE_KEYS:
        shrink = {"psoas": 0.25, "erector_spinae": 0.35, "multifidus": 0.45}[key] * atrophy
        common = float(np.exp(rng.normal(0.0, 0.12))) * (1.0 - shrink)
        asym = float(rng.normal(0.0, 0.06))
        scale[f"{key}_left"] = common * (1.0 + asym)
        scale[f"{key}_right"] = common * (1.0 - asym)
        rel = {"psoas": 0.35, "erector_spinae": 0.95, "multifidus": 1.35}[key]
        for side in SIDES:
            ff_base[f"{key}_{side}"] = float(np.clip(mean_ff * rel + rng.normal(0, 2.5), 0.5, 60.0))
    deformation = np.column_stack([
        rng.normal(0, 1.2, 4), rng.normal(0, 1.2, 4),
        rng.uniform(-1, 1, 4) * 2 * math.pi / 70.0, rng.uniform(-1, 1, 4) * 2 * math.pi / 70.0,
        rng.uniform(0, 2 * math.pi, 4),
    ]).astype(np.float64)
    age_degen = atrophy  # older subjects: more atrophy and more degenerate discs
    level_map: dict[str, LevelAnatomy] = {}
    z_shift = float(rng.normal(0, 8))
    spacing_scale = float(rng.uniform(0.92, 1.08))
    for name in levels:
        base = _BASE[name]
        lv_scale = dict(scale)
        z = _DISC_Z[name] * spacing_scale + z_shift
        y = _CANAL_Y[name] + float(rng.normal(0, 1.5))
        idx = LEVEL_NAMES.index(name)
        lower = 0.25 * idx  # degeneration more frequent caudally
        degeneration = int(np.clip(round(rng.normal(0.8 + 2.0 * age_degen + lower, 0.8)), 0, 3))
        disc_h = base.disc_height * (1.0 - 0.12 * degeneration) * float(rng.uniform(0.9, 1.1))
        nucleus = float(np.clip((0.8, 0.6, 0.38, 0.22)[degeneration] + rng.normal(0, 0.04), 0.12, 0.9))
        grade = grade_for(stenosis, rng, options.get("grade_probs"))
        cord = bool(options.get("cord", rng.random() < base.cord_prob)) and idx <= 1
        if cord and grade[0] in ("C", "D"):
            grade = "B"
        canal_w = float(rng.uniform(10.5, 13.0))
        canal_h = float(rng.uniform(8.0, 10.0))
        canal_cy = float(rng.uniform(0.3, 1.5))
        sten = sample_stenosis(rng, grade, canal_w=canal_w, canal_h=canal_h, canal_cy=canal_cy,
                               cord=cord, disc_kind=True)
        mid_grade = {"A": "A", "B": "A", "C": "B", "D": "B"}[grade[0]]
        mid = sample_stenosis(rng, mid_grade, canal_w=canal_w, canal_h=canal_h,
                              canal_cy=canal_cy, cord=cord, disc_kind=False)
        ff = {k: float(np.clip(v * (0.8 + 0.1 * idx) + rng.normal(0, 1.0), 0.5, 60.0))
              for k, v in ff_base.items()}
        dr = float(np.exp(rng.normal(0, 0.05)))
        level_map[name] = LevelAnatomy(
            name=name, z_mm=z, canal_x_mm=float(rng.normal(0, 2.0)), canal_y_mm=y,
            # Operators angle each block parallel to the disc but within what the scanner
            # and the routing rule (20 deg off axial) accept.
            tilt_deg=float(np.clip(_nominal_tilt(name) + rng.normal(0, 2.0), -MAX_BLOCK_TILT_DEG,
                                   MAX_BLOCK_TILT_DEG)),
            disc_height_mm=disc_h, vb_height_mm=base.vb_height * float(rng.uniform(0.92, 1.08)),
            disc_rx=base.disc[0] * dr * (1.0 + 0.03 * degeneration),
            disc_ry=base.disc[1] * dr, degeneration=degeneration, nucleus_signal=nucleus,
            canal_w=canal_w, canal_h=canal_h, canal_cy=canal_cy,
            muscles=_muscles(rng, base, lv_scale), stenosis=sten, mid=mid, kidney=base.kidney,
            quadratus=base.quadratus, iliac=base.iliac, vessels=base.vessels,
            tp_length=base.tp_length * float(rng.uniform(0.8, 1.2)),
            facet_angle_deg=float(rng.uniform(30, 55)) if idx < 4 else float(rng.uniform(40, 65)),
            fat_fraction_pct=ff,
        )
    subject = Subject(
        habitus=habitus, subcut_post_mm=subcut_post,
        subcut_lat_mm=float(subcut_post * rng.uniform(0.6, 1.1)),
        subcut_ant_mm=float(subcut_post * rng.uniform(0.7, 1.4)),
        body_half_width_mm=float(135 + 70 * habitus + rng.normal(0, 8)),
        body_anterior_mm=float(95 + 80 * habitus + rng.normal(0, 8)),
        atrophy=atrophy, scoliosis_deg=scol, lateral_shift_mm=float(rng.normal(0, 2)),
        levels=level_map, deformation=deformation, options=dict(options),
    )
    logger.debug("sampled phantom subject: levels=%s grades=%s", subject.level_names,
                 {k: v.stenosis.schizas for k, v in level_map.items()})
    return subject


#: largest block angulation (degrees from axial) the phantom plans, below routing's 20 deg
MAX_BLOCK_TILT_DEG = 18.0


def _nominal_tilt(name: str) -> float:
    """Disc tilt (degrees) from the slope of the nominal lordotic curve through the canal."""
    zs = np.array([_DISC_Z[n] for n in LEVEL_NAMES])
    ys = np.array([_CANAL_Y[n] for n in LEVEL_NAMES])
    slope = np.gradient(ys, zs)  # dy/dz
    tilt = math.degrees(math.atan(-float(slope[LEVEL_NAMES.index(name)])))
    return tilt + (6.0 if name == "L5-S1" else 0.0)
