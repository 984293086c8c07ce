"""Which complete series are analysed, and why the others are skipped.

Pure functions over header summaries (no database, no I/O), so every rule is easy to test.
A decision lists every rule that failed, so a skipped series says all of why in one line,
e.g. ``not axial: slice normal 89.1 deg from the patient axial axis (max 20.0); not lumbar:
BodyPartExamined 'BRAIN'``.

Rules (``[routing]`` in the configuration):

* modality in ``routing.modalities`` (default MR);
* axial: the normal of every slice (row cosine x column cosine of ImageOrientationPatient,
  PS3.3 C.7.6.2.1.1; for Enhanced MR the per-frame PlaneOrientationSequence) within
  ``routing.max_axial_tilt_deg`` of the patient's head-foot (z) axis;
* lumbar (when ``routing.require_lumbar``): BodyPartExamined in ``routing.body_parts``, or a
  keyword of ``routing.description_keywords`` in SeriesDescription / ProtocolName /
  StudyDescription. A body part that names something else (``BRAIN``) is a negative unless
  a description keyword says lumbar. With no body part and no keyword, the position along z
  is a weak cue: several angled axial blocks (one per disc) spread over at least
  :data:`MULTIBLOCK_MIN_EXTENT_MM` is accepted as the lumbar disc protocol;
* at least ``routing.min_slices`` slices (frames count for multi-frame instances).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: patient z axis (LPS: from feet to head)
_Z_AXIS = (0.0, 0.0, 1.0)
#: a multi-block axial series spanning at least this (mm along z) counts as a weak lumbar cue
MULTIBLOCK_MIN_EXTENT_MM = 60.0
#: orientation blocks of a multi-block protocol needed for the weak cue
MULTIBLOCK_MIN_BLOCKS = 2


class RoutingRules(Protocol):
    """The ``[routing]`` section as routing reads it (``node.config.RoutingSection``)."""

    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def max_axial_tilt_deg(self) -> float: ...
    @property
    def min_slices(self) -> int: ...
    @property
    def body_parts(self) -> tuple[str, ...]: ...
    @property
    def description_keywords(self) -> tuple[str, ...]: ...
    @property
    def require_lumbar(self) -> bool: ...


@dataclass(frozen=True)
class RoutingInput:
    """What routing needs to know about one echo group of a complete series.

    Attributes
    ----------
    modality
        (0008,0060) of the instances.
    orientations
        ImageOrientationPatient (6 direction cosines) of every slice (every frame).
    z_positions
        Patient z (mm) of every slice's ImagePositionPatient, same order.
    body_part
        BodyPartExamined (0018,0015), may be empty.
    descriptions
        SeriesDescription, ProtocolName, StudyDescription (any may be empty).
    blocks
        Number of orientation blocks found by assembly (angled blocks, one per disc).
    """

    modality: str
    orientations: Sequence[Sequence[float]]
    z_positions: Sequence[float] = ()
    body_part: str = ""
    descriptions: Sequence[str] = ()
    blocks: int = 1

    @property
    def n_slices(self) -> int:
        return len(self.orientations)


@dataclass(frozen=True)
class Decision:
    """The routing verdict for one echo group.

    ``reason`` is the joined list of failed rules when skipped, and the lumbar evidence
    when analysed; ``checks`` holds the measured values (tilt in degrees, slice count).
    """

    analyse: bool
    reason: str
    checks: dict[str, object] = field(default_factory=dict)


def slice_normal(iop: Sequence[float]) -> tuple[float, float, float]:
    """Unit normal of a slice from its ImageOrientationPatient (row x column cosines)."""
    if len(iop) != 6:
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(iop)}")
    r = [float(v) for v in iop[:3]]
    c = [float(v) for v in iop[3:]]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {list(iop)}")
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def axial_tilt_deg(iop: Sequence[float]) -> float:
    """Angle (degrees, 0-90) between a slice's normal and the patient z axis.

    0 is a true axial slice, 90 a sagittal or coronal one. The sign of the normal does not
    matter (feet-first and head-first give the same tilt).
    """
    n = slice_normal(iop)
    cos = abs(sum(a * b for a, b in zip(n, _Z_AXIS, strict=True)))
    return math.degrees(math.acos(min(1.0, cos)))


def plane_name(iop: Sequence[float]) -> str:
    """``axial``, ``coronal`` or ``sagittal``: the patient axis the slice normal is closest to."""
    n = slice_normal(iop)
    axis = max(range(3), key=lambda i: abs(n[i]))
    return ("sagittal", "coronal", "axial")[axis]


def check_modality(modality: str, allowed: Sequence[str]) -> str | None:
    """``None`` when ``modality`` is routed, else the reason."""
    if modality.strip().upper() in {m.upper() for m in allowed}:
        return None
    return f"modality {modality or '(none)'} not in {list(allowed)}"


def check_axial(
    orientations: Sequence[Sequence[float]], max_tilt_deg: float
) -> tuple[str | None, float]:
    """(reason or ``None``, worst tilt in degrees) for the axial rule over every slice."""
    if not orientations:
        return "no slice orientation", 90.0
    tilts = [axial_tilt_deg(iop) for iop in orientations]
    worst = max(tilts)
    if worst <= max_tilt_deg:
        return None, worst
    planes = sorted({plane_name(iop) for iop in orientations})
    return (
        f"not axial: slice normal {worst:.1f} deg from the patient axial axis "
        f"(max {max_tilt_deg:g}; {'/'.join(planes)})",
        worst,
    )


def lumbar_evidence(
    body_part: str,
    descriptions: Sequence[str],
    rules: RoutingRules,
    *,
    blocks: int = 1,
    z_extent_mm: float = 0.0,
) -> tuple[bool, str]:
    """Whether the headers say lumbar spine, and the evidence (or the counter-evidence).

    Returns
    -------
    (is_lumbar, text)
        ``text`` names the header and value that decided.
    """
    part = body_part.strip().upper()
    parts = {p.strip().upper() for p in rules.body_parts}
    if part and part in parts:
        return True, f"BodyPartExamined {part!r}"
    keywords = [k.lower() for k in rules.description_keywords if k.strip()]
    # A study called "lumbar spine" also holds its localisers and other regions: when the
    # series names another body part, only its own description/protocol may overrule it.
    candidates = list(descriptions)
    if part and len(candidates) > 2:
        candidates = candidates[:2]
    for text in candidates:
        low = text.lower()
        for kw in keywords:
            if kw in low:
                return True, f"description {text!r} contains {kw!r}"
    if part:
        return False, f"not lumbar: BodyPartExamined {part!r} and no lumbar keyword in descriptions"
    if blocks >= MULTIBLOCK_MIN_BLOCKS and z_extent_mm >= MULTIBLOCK_MIN_EXTENT_MM:
        return True, (
            f"weak cue: {blocks} angled axial blocks over {z_extent_mm:.0f} mm along z "
            "(no body part or keyword)"
        )
    return False, "not lumbar: no BodyPartExamined and no lumbar keyword in descriptions"


def decide(group: RoutingInput, rules: RoutingRules) -> Decision:
    """Analyse or skip one coherent echo group; every failed rule is named in ``reason``."""
    failures: list[str] = []
    checks: dict[str, object] = {"slices": group.n_slices}
    reason = check_modality(group.modality, rules.modalities)
    if reason:
        failures.append(reason)
    try:
        reason, tilt = check_axial(group.orientations, rules.max_axial_tilt_deg)
        checks["max_tilt_deg"] = round(tilt, 2)
    except ValueError as exc:
        reason = f"bad orientation: {exc}"
    if reason:
        failures.append(reason)
    z = list(group.z_positions)
    z_extent = (max(z) - min(z)) if z else 0.0
    is_lumbar, evidence = lumbar_evidence(
        group.body_part, group.descriptions, rules, blocks=group.blocks, z_extent_mm=z_extent
    )
    checks["lumbar"] = evidence
    if rules.require_lumbar and not is_lumbar:
        failures.append(evidence)
    if group.n_slices < rules.min_slices:
        failures.append(f"too few slices: {group.n_slices} < {rules.min_slices}")
    if failures:
        return Decision(False, "; ".join(failures), checks)
    return Decision(True, f"lumbar axial {group.modality}: {evidence}", checks)
