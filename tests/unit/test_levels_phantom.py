"""Levels found and named on phantom series as ``lumbar-node phantom`` plans them."""

from __future__ import annotations

import pytest

from ai.grading_heldout import phantom_series
from ai.levels import find_levels

#: Fixed seed, disjoint from the held-out table's and the grader's training seeds.
SEED = 31_337


@pytest.mark.parametrize(
    ("levels", "continuous"),
    [(("L3-L4", "L4-L5", "L5-S1"), False), (("L4-L5", "L5-S1"), True)],
)
def test_phantom_series_levels_found_and_named(levels: tuple[str, ...], continuous: bool) -> None:
    s = phantom_series(0, seed=SEED, levels=levels, continuous=continuous)
    found = find_levels(s.labels, s.volume)
    truth = s.truth["levels"]
    assert [lv.level for lv in found] == [t["level"] for t in truth]
    for lv, t in zip(found, truth, strict=True):
        assert set(lv.slice_indices) <= set(t["slice_indices"]) | {t["mid_slice"]}
        assert lv.mid_slice in t["slice_indices"]
        assert lv.confidence >= 0.8
    assert found[0].evidence["pelvis_area_mm2"] >= 500
