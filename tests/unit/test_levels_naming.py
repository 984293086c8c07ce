"""Level-naming cues on phantom slices, and the joint posterior over names."""

from __future__ import annotations

import numpy as np
import pytest

from ai.level_naming import (
    MUSCLE_LOG_RATIO_MEAN,
    LevelCues,
    cord_fraction,
    measure_cues,
    muscle_log_ratios,
    name_posterior,
    pelvis_area,
)
from ai.levels import NAMING_MIN_CONFIDENCE

SEED = 777_001


@pytest.fixture(scope="module")
def slices() -> dict[str, object]:
    from ai.phantom import render_slice, sample_subject

    rng = np.random.default_rng(SEED)
    subject = sample_subject(rng, stenosis="A", levels=("L1-L2", "L4-L5", "L5-S1"), cord=True)
    return {
        name: render_slice(subject, name, kind="disc", mode="realistic", rng=rng)
        for name in ("L1-L2", "L4-L5", "L5-S1")
    }


def test_iliac_wings_only_at_l5_s1(slices: dict[str, object]) -> None:
    areas = {k: pelvis_area(s.image, s.labels, s.pixel_spacing) for k, s in slices.items()}  # type: ignore[attr-defined]
    assert areas["L5-S1"] >= 500
    assert areas["L4-L5"] == 0 and areas["L1-L2"] == 0


def test_cord_seen_at_l1_l2_only(slices: dict[str, object]) -> None:
    fr = {k: cord_fraction(s.image, s.labels, s.pixel_spacing) for k, s in slices.items()}  # type: ignore[attr-defined]
    assert slices["L1-L2"].truth["rootlets"] == "cord"  # type: ignore[attr-defined]
    assert fr["L1-L2"] > 0.1
    assert fr["L4-L5"] == 0 and fr["L5-S1"] == 0


def test_absent_wings_count_only_where_the_csf_is_t2_bright(slices: dict[str, object]) -> None:
    """A random contrast can pass the fat / posterior-elements premise by chance while the
    iliac marrow lies at any signal: absent wings are evidence against L5-S1 only where
    the sac's CSF is T2-bright too. Wings that are seen count either way."""
    from ai.labels import Label

    def cues(name: str, dark_csf: bool):  # type: ignore[no-untyped-def]
        s = slices[name]
        image = s.image.copy()  # type: ignore[attr-defined]
        if dark_csf:
            muscle = np.isin(s.labels, [int(Label.MULTIFIDUS_LEFT), int(Label.MULTIFIDUS_RIGHT)])  # type: ignore[attr-defined]
            image[s.labels == int(Label.DURAL_SAC)] = np.median(image[muscle])  # type: ignore[attr-defined]
        return measure_cues([image], [s.labels], 0, s.pixel_spacing)  # type: ignore[attr-defined]

    assert cues("L4-L5", dark_csf=False).pelvis_observable
    assert not cues("L4-L5", dark_csf=True).pelvis_observable
    assert cues("L5-S1", dark_csf=True).pelvis_bin == 2


def test_muscle_ratios_increase_caudally(slices: dict[str, object]) -> None:
    r = {k: muscle_log_ratios(s.labels, s.pixel_spacing) for k, s in slices.items()}  # type: ignore[attr-defined]
    assert r["L1-L2"] is not None and r["L4-L5"] is not None and r["L5-S1"] is not None
    assert r["L1-L2"][0] < r["L4-L5"][0] < r["L5-S1"][0]
    assert muscle_log_ratios(np.zeros((10, 10), dtype=np.uint8), (1.0, 1.0)) is None


def _cues(pelvis: float = 0.0, cord: float = 0.0, muscles: tuple[float, float] | None = None,
          observable: bool = True) -> LevelCues:
    return LevelCues(pelvis, cord, muscles, pelvis_observable=observable)


def test_no_cues_give_no_confident_name() -> None:
    hyps, post = name_posterior([0, 1, 2], [_cues(observable=False)] * 3)
    assert list(hyps) == [2, 3, 4]
    assert post.max() < NAMING_MIN_CONFIDENCE


def test_strong_pelvis_names_the_caudal_level_l5_s1() -> None:
    hyps, post = name_posterior([0, 1, 2], [_cues(pelvis=1200.0), _cues(), _cues()])
    assert hyps[int(np.argmax(post))] == 4
    assert post.max() >= 0.9


def _muscle_series(names: tuple[int, ...], shift: float) -> list[LevelCues]:
    return [_cues(muscles=tuple(MUSCLE_LOG_RATIO_MEAN[j] + shift), observable=False) for j in names]  # type: ignore[arg-type]


def test_muscle_ratios_alone_name_a_typical_series() -> None:
    hyps, post = name_posterior([0, 1, 2], _muscle_series((4, 3, 2), 0.0))
    assert hyps[int(np.argmax(post))] == 4 and post.max() >= 0.9
    hyps, post = name_posterior([0, 1, 2], _muscle_series((3, 2, 1), 0.0))
    assert hyps[int(np.argmax(post))] == 3 and post.max() >= 0.9


@pytest.mark.parametrize("names", [(4, 3, 2), (3, 2, 1)])
def test_subject_wide_muscle_shift_never_gives_a_confident_wrong_name(names: tuple[int, ...]) -> None:
    # A whole subject with bigger or smaller psoas and multifidus: names may be withheld,
    # but a wrong name must not reach the naming threshold.
    for shift in (-0.4, -0.25, 0.25, 0.4):
        hyps, post = name_posterior([0, 1, 2], _muscle_series(names, shift))
        wrong = post[hyps != names[0]]
        assert wrong.max() < NAMING_MIN_CONFIDENCE, shift


def test_unobservable_pelvis_is_no_evidence_against_l5_s1() -> None:
    sag = {1: 3}  # the middle level is L4-L5 by a sagittal series
    _, post_small_fov = name_posterior([0, 1, 2], [_cues(observable=False)] * 3, sag)
    _, post_wide_fov = name_posterior([0, 1, 2], [_cues(observable=True)] * 3, sag)
    assert post_small_fov[-1] > 0.9 > post_wide_fov[-1]
