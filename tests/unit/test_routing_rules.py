"""Routing decisions: modality, axial tilt, lumbar evidence, slice count, enhanced MR frames."""

from __future__ import annotations

import math

import pytest
from series_samples import AXIAL, SAGITTAL, record, tilted

from node.config import RoutingSection
from node.routing import (
    RoutingInput,
    axial_tilt_deg,
    decide,
    lumbar_evidence,
    plane_name,
)
from node.series import assemble

RULES = RoutingSection()


def group(
    orientations: list[tuple[float, ...]] | None = None,
    *,
    modality: str = "MR",
    body_part: str = "LSPINE",
    descriptions: tuple[str, ...] = ("t2_tse_tra",),
    n: int = 10,
    blocks: int = 1,
    z: list[float] | None = None,
) -> RoutingInput:
    return RoutingInput(
        modality=modality,
        orientations=orientations if orientations is not None else [AXIAL] * n,
        z_positions=z if z is not None else [4.0 * i for i in range(n)],
        body_part=body_part,
        descriptions=descriptions,
        blocks=blocks,
    )


def test_tilt_of_axial_sagittal_and_angled_slices() -> None:
    assert axial_tilt_deg(AXIAL) == pytest.approx(0.0)
    assert axial_tilt_deg(SAGITTAL) == pytest.approx(90.0)
    assert axial_tilt_deg(tilted(19.0)) == pytest.approx(19.0)
    # feet-first (flipped normal) tilts the same
    assert axial_tilt_deg((1, 0, 0, 0, -math.cos(0.2), math.sin(0.2))) == pytest.approx(math.degrees(0.2))
    assert plane_name(SAGITTAL) == "sagittal"
    assert plane_name((1, 0, 0, 0, 0, -1)) == "coronal"


def test_axial_lumbar_mr_is_analysed() -> None:
    decision = decide(group(), RULES)
    assert decision.analyse, decision.reason
    assert "LSPINE" in decision.reason


def test_sagittal_is_skipped_with_the_tilt_in_the_reason() -> None:
    decision = decide(group([SAGITTAL] * 10), RULES)
    assert not decision.analyse
    assert "not axial" in decision.reason and "90.0 deg" in decision.reason
    assert "sagittal" in decision.reason


@pytest.mark.parametrize(("tilt", "analysed"), [(29.0, True), (31.0, False)])
def test_tilt_tolerance_is_thirty_degrees(tilt: float, analysed: bool) -> None:
    decision = decide(group([tilted(tilt)] * 10), RULES)
    assert decision.analyse is analysed, decision.reason
    assert decision.checks["max_tilt_deg"] == pytest.approx(tilt, abs=0.01)


def test_modality_other_than_mr_is_skipped() -> None:
    decision = decide(group(modality="CT"), RULES)
    assert not decision.analyse
    assert "modality CT" in decision.reason


def test_lumbar_by_body_part_or_keyword() -> None:
    assert lumbar_evidence("LSPINE", [], RULES)[0]
    assert lumbar_evidence("", ["T2 TSE LWS tra"], RULES)[0]
    assert lumbar_evidence("", ["", "Lumbar spine routine"], RULES)[0]
    ok, why = lumbar_evidence("BRAIN", ["pd+t2_tse_sag"], RULES)
    assert not ok and "BRAIN" in why
    # a mislabelled body part is overridden by an explicit lumbar description
    assert lumbar_evidence("BRAIN", ["L-SPINE axial"], RULES)[0]
    ok, why = lumbar_evidence("", ["t2 tra"], RULES)
    assert not ok and "no BodyPartExamined" in why


def test_multi_block_spread_along_z_is_a_weak_lumbar_cue() -> None:
    ok, why = lumbar_evidence("", ["t2 tra"], RULES, blocks=4, z_extent_mm=120.0)
    assert ok and "weak cue" in why
    assert not lumbar_evidence("", ["t2 tra"], RULES, blocks=1, z_extent_mm=120.0)[0]
    assert not lumbar_evidence("", ["t2 tra"], RULES, blocks=4, z_extent_mm=20.0)[0]


def test_not_lumbar_is_skipped_unless_lumbar_is_not_required() -> None:
    brain = group(body_part="BRAIN", descriptions=("t2 tra",))
    assert not decide(brain, RULES).analyse
    assert decide(brain, RoutingSection(require_lumbar=False)).analyse


def test_min_slices() -> None:
    decision = decide(group(n=2), RULES)
    assert not decision.analyse and "too few slices: 2 < 3" in decision.reason
    assert decide(group(n=3), RULES).analyse


def test_every_failed_rule_is_named() -> None:
    decision = decide(group([SAGITTAL] * 2, body_part="BRAIN", descriptions=("x",)), RULES)
    assert "not axial" in decision.reason
    assert "not lumbar" in decision.reason
    assert "too few slices" in decision.reason


def _enhanced(frames: list[dict[str, object]]) -> object:
    return record(
        "1.2.3.9", iop=None, ipp=None, NumberOfFrames=len(frames), frames=frames,
        SeriesDescription="t2_tse_tra lumbar",
    )


def test_enhanced_mr_is_routed_on_its_per_frame_orientations() -> None:
    axial = [{"iop": list(AXIAL), "ipp": [0.0, 0.0, 4.0 * i], "echo": 90.0} for i in range(5)]
    assembly = assemble([_enhanced(axial)], RULES)
    (only,) = assembly.groups
    assert only.coherent and len(only.slices) == 5
    assert only.decision is not None and only.decision.analyse, only.decision
    sagittal = [{"iop": list(SAGITTAL), "ipp": [4.0 * i, 0.0, 0.0], "echo": 90.0} for i in range(5)]
    (sag,) = assemble([_enhanced(sagittal)], RULES).groups
    assert sag.decision is not None and not sag.decision.analyse
    assert "not axial" in sag.decision.reason


def test_enhanced_mr_frames_count_as_slices() -> None:
    two = [{"iop": list(AXIAL), "ipp": [0.0, 0.0, 4.0 * i], "echo": 90.0} for i in range(2)]
    (g,) = assemble([_enhanced(two)], RULES).groups
    assert g.decision is not None and "too few slices: 2 < 3" in g.decision.reason


def test_lumbar_study_description_does_not_overrule_a_non_lumbar_body_part() -> None:
    # the phantom's brain distractor lives in a study called "MRI LUMBAR SPINE"
    ok, why = lumbar_evidence("BRAIN", ["T2 AX BRAIN", "", "MRI LUMBAR SPINE"], RULES)
    assert not ok
    assert "BRAIN" in why
    # ... while the series' own description may
    assert lumbar_evidence("BRAIN", ["T2 TSE LUMBAR", "", ""], RULES)[0]
