"""Central canal stenosis with a Schizas grade decided by construction.

The dural sac is drawn with an explicit shape and the structures around it (disc bulge,
ligamentum flavum, posterior epidural fat pad) are built to reach it, so the grade follows the
definitions in ``clinical-spec.md`` section 1 exactly:

* **A**: CSF around separate rootlets (sub-grades A1 dorsal < half, A2 dorsal horseshoe along
  the dura, A3 dorsal > half, A4 central); gaps between rootlets >= 1.15 mm.
* **B**: rootlets fill the whole sac but stay separate (gaps >= 0.9 mm), CSF between them.
* **C**: no CSF and no recognisable rootlets (homogeneous compressed sac), posterior epidural
  fat present (a midline fat pad between the ligamenta flava).
* **D**: as C, and the ligamentum flavum reaches the sac everywhere behind it: no posterior
  epidural fat.

All lengths in mm, in the spine frame (origin at the canal centre, +x left, +y posterior).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

SCHIZAS: tuple[str, ...] = ("A", "B", "C", "D")
STENOSIS_CHOICES: tuple[str, ...] = ("none", "mild", "moderate", "severe", "random")
DEFAULT_GRADE_PROBS: dict[str, float] = {"A": 0.4, "B": 0.25, "C": 0.2, "D": 0.15}

#: target dural sac area (mm2) per grade, and the sac's LR/AP aspect ratio range
DSCA_RANGE: dict[str, tuple[float, float]] = {
    "A": (100.0, 220.0), "B": (70.0, 110.0), "C": (40.0, 80.0), "D": (20.0, 55.0),
}
_MILD_A_RANGE = (92.0, 135.0)
_NONE_A_RANGE = (120.0, 220.0)
ASPECT_RANGE: dict[str, tuple[float, float]] = {
    "A": (1.2, 1.55), "B": (1.4, 1.9), "C": (1.8, 2.6), "D": (2.0, 3.2),
}
#: minimum gap (mm) between neighbouring rootlets: > one pixel diagonal at 0.75 mm spacing
ROOTLET_GAP_MM: dict[str, float] = {"A": 1.15, "B": 0.9}
#: minimum depth (mm) of the posterior epidural fat pad in grade C
MIN_FAT_PAD_MM = 2.0


@dataclass(frozen=True)
class StenosisParams:
    """The canal contents at one slice kind of one level.

    Attributes
    ----------
    schizas, subgrade
        Grade by construction (``A``..``D``; sub-grade ``A1``..``A4`` for A, else the grade).
    sac_a, sac_b, sac_cy
        Dural sac ellipse: LR and AP semi-axes and centre y (centre x = 0).
    bulge_apex_y
        Posterior apex of the disc bulge (spine frame y); the bulge is drawn only where it lies
        posterior to the disc margin.
    bulge_w
        Half-width of the bulge.
    lf_mm
        Ligamentum flavum thickness; ``lf_hug`` means it fills the canal behind the sac centre.
    fat_pad
        ``(half_width, depth)`` of the posterior midline epidural fat pad, or ``None``.
    rootlets
        ``(N, 3)`` array of rootlet centres ``x, y`` relative to the sac centre and radius.
    cord
        ``(cx, cy, a, b)`` of the cord / conus relative to the sac centre, or ``None``.
    """

    schizas: str
    subgrade: str
    sac_a: float
    sac_b: float
    sac_cy: float
    bulge_apex_y: float
    bulge_w: float
    lf_mm: float
    lf_hug: bool
    fat_pad: tuple[float, float] | None
    rootlets: np.ndarray = field(repr=False)
    cord: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.schizas not in SCHIZAS:
            raise ValueError(f"schizas must be one of {SCHIZAS}, got {self.schizas!r}")
        if not (self.sac_a > 0 and self.sac_b > 0):
            raise ValueError("sac semi-axes must be positive")
        if self.rootlets.ndim != 2 or self.rootlets.shape[1] != 3:
            raise ValueError("rootlets must be an (N, 3) array")
        if self.schizas == "D" and self.fat_pad is not None:
            raise ValueError("a Schizas D sac has no posterior epidural fat")
        if self.schizas == "C" and self.fat_pad is None:
            raise ValueError("a Schizas C sac needs posterior epidural fat")

    @property
    def has_csf(self) -> bool:
        return self.schizas in ("A", "B")


def grade_for(
    stenosis: str, rng: np.random.Generator, grade_probs: Mapping[str, float] | None = None
) -> str:
    """The Schizas grade (with an A sub-range tag) for a ``--stenosis`` choice.

    Returns ``"A"``, ``"A-none"`` (large sac) or ``"A-mild"`` (small A sac), ``"B"``, ``"C"``
    or ``"D"``.
    """
    s = stenosis.strip()
    if s.upper() in SCHIZAS:
        return s.upper()
    s = s.lower()
    if s == "none":
        return "A-none"
    if s == "mild":
        return "A-mild"
    if s == "moderate":
        return "B"
    if s == "severe":
        return "C" if rng.random() < 0.5 else "D"
    if s == "random":
        probs = dict(grade_probs or DEFAULT_GRADE_PROBS)
        keys = [k for k in SCHIZAS if probs.get(k, 0.0) > 0]
        if not keys:
            raise ValueError("grade_probs gives no grade a positive weight")
        w = np.array([probs[k] for k in keys], dtype=float)
        return str(keys[int(rng.choice(len(keys), p=w / w.sum()))])
    raise ValueError(f"stenosis must be one of {STENOSIS_CHOICES} or A-D, got {stenosis!r}")


def _place_rootlets(
    rng: np.random.Generator, a: float, b: float, region: str, n_target: int, gap: float,
    r_range: tuple[float, float], keep_out: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Rejection-sample non-touching rootlet discs inside the sac ellipse ``a x b``."""
    placed: list[tuple[float, float, float]] = []
    tries = 0
    while len(placed) < n_target and tries < 60 * n_target:
        tries += 1
        r = float(rng.uniform(*r_range))
        ea, eb = a - r - 0.35, b - r - 0.35
        if ea <= 0.2 or eb <= 0.2:
            break
        ang = float(rng.uniform(0, 2 * math.pi))
        rad = math.sqrt(float(rng.uniform(0, 1)))
        if region == "horseshoe":
            rad = float(rng.uniform(0.55, 1.0))
            ang = float(rng.uniform(0.05 * math.pi, 0.95 * math.pi))
        x, y = rad * math.cos(ang) * ea, rad * math.sin(ang) * eb
        v = y / b
        if region == "dorsal_small" and v < 0.3:
            continue
        if region == "dorsal_large" and v < -0.15:
            continue
        if region == "central" and rad > 0.75:
            continue
        if keep_out is not None:
            kx, ky, ka, kb = keep_out
            if ((x - kx) / (ka + r + gap)) ** 2 + ((y - ky) / (kb + r + gap)) ** 2 < 1.0:
                continue
        if all(math.hypot(x - px, y - py) >= r + pr + gap for px, py, pr in placed):
            placed.append((x, y, r))
    return np.array(placed, dtype=np.float64).reshape(-1, 3)


def sample_stenosis(
    rng: np.random.Generator,
    grade: str,
    *,
    canal_w: float,
    canal_h: float,
    canal_cy: float,
    cord: bool,
    disc_kind: bool,
) -> StenosisParams:
    """Draw the canal contents for a grade (from :func:`grade_for`) inside a canal ellipse.

    ``canal_w`` / ``canal_h`` are the semi-axes of the bony canal (ligamentum flavum
    included) centred at ``(0, canal_cy)``.
    """
    tag = grade
    grade = grade[0]
    lo, hi = DSCA_RANGE[grade]
    if tag == "A-mild":
        lo, hi = _MILD_A_RANGE
    elif tag == "A-none":
        lo, hi = _NONE_A_RANGE
    if not disc_kind:
        lo, hi = lo * 1.05, hi * 1.1
    area = float(rng.uniform(lo, hi))
    asp = float(rng.uniform(*ASPECT_RANGE[grade]))
    a = math.sqrt(area * asp / math.pi)
    b = area / (math.pi * a)
    # The sac must fit in the canal with room for epidural fat behind it.
    a = min(a, canal_w - 1.0)
    b = min(b, canal_h - 2.2)
    canal_post = canal_cy + canal_h
    canal_ant = canal_cy - canal_h
    if grade in ("A", "B"):
        sac_cy = float(rng.uniform(-0.8, 0.6))
    else:
        sac_cy = float(rng.uniform(-0.5, 1.5))
    sac_cy = min(sac_cy, canal_post - b - 2.6)
    sac_cy = max(sac_cy, canal_ant + b + 0.3)
    sac_ant = sac_cy - b
    disc_post = canal_ant + 0.5
    if grade == "A":
        apex = disc_post + float(rng.uniform(0.0, max(0.0, min(1.5, sac_ant - disc_post - 0.8))))
        lf = float(rng.uniform(1.8, 3.5))
    elif grade == "B":
        apex = sac_ant + float(rng.uniform(0.3, 1.2))
        lf = float(rng.uniform(3.5, 5.5))
    else:
        apex = sac_ant + 1.0
        lf = float(rng.uniform(4.5, 7.0))
    if not disc_kind:
        apex = disc_post  # no bulge at the mid-vertebral slice
    lf_hug = grade in ("C", "D")
    fat_pad: tuple[float, float] | None
    room = canal_post - (sac_cy + b)
    if grade == "D":
        fat_pad = None
    elif grade == "C":
        fat_pad = (float(rng.uniform(2.5, 4.5)), max(MIN_FAT_PAD_MM, room - float(rng.uniform(0.0, 1.0))))
    else:
        fat_pad = (float(rng.uniform(2.5, 5.0)), room) if rng.random() < 0.9 else None
    cord_e: tuple[float, float, float, float] | None = None
    if cord:
        cord_e = (0.0, float(-0.15 * b), min(4.6, a - 2.0) * float(rng.uniform(0.85, 1.0)),
                  min(3.6, b - 1.6) * float(rng.uniform(0.85, 1.0)))
    if grade == "A":
        sub = str(rng.choice(["A1", "A2", "A3", "A4"], p=[0.3, 0.25, 0.3, 0.15]))
        if cord_e is not None:
            sub = "A1"
        region = {"A1": "dorsal_small", "A2": "horseshoe", "A3": "dorsal_large", "A4": "central"}[sub]
        n = int(rng.integers(9, 17)) if sub != "A2" else int(rng.integers(10, 18))
        roots = _place_rootlets(rng, a, b, region, n, ROOTLET_GAP_MM["A"], (0.55, 0.9), cord_e)
    elif grade == "B":
        sub = "B"
        n = int(rng.integers(14, 30))
        roots = _place_rootlets(rng, a, b, "all", n, ROOTLET_GAP_MM["B"], (0.6, 0.95), cord_e)
    else:
        sub = grade
        roots = np.zeros((0, 3))
    return StenosisParams(
        schizas=grade, subgrade=sub, sac_a=a, sac_b=b, sac_cy=sac_cy, bulge_apex_y=apex,
        bulge_w=float(max(a * rng.uniform(0.9, 1.4), 6.0)), lf_mm=lf, lf_hug=lf_hug,
        fat_pad=fat_pad, rootlets=roots, cord=cord_e,
    )
