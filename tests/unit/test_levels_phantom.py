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


def test_randomised_series_is_one_acquisition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slice of a randomised held-out series shares spacing, matrix and contrast
    (the volume has one pixel spacing; per-slice draws made level finding miss levels)."""
    import ai.phantom

    seen: list[tuple[object, object, object]] = []
    real = ai.phantom.render_slice

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((kwargs.get("pixel_spacing"), kwargs.get("matrix"), kwargs.get("contrast_seed")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ai.phantom, "render_slice", spy)
    s = phantom_series(1, seed=SEED, levels=("L4-L5", "L5-S1"), mode="randomised")
    assert len(seen) == s.volume.n_slices >= 4
    assert len(set(seen)) == 1 and None not in seen[0]
    assert s.volume.pixel_spacing == (seen[0][0], seen[0][0])
    found = find_levels(s.labels, s.volume)
    assert len(found) == 2
