"""Measurement formulas against hand-computed values on synthetic masks."""

from __future__ import annotations

import numpy as np
import pytest

from ai.evaluate import bland_altman, icc_2_1
from ai.labels import Label
from ai.measure import (
    asymmetry_pct,
    fat_threshold,
    kjaer_grade,
    measure_level,
    measure_slice,
    otsu_threshold,
    plausibility_flags,
)

LEAN_SI = 100.0
FAT_SI = 1000.0


def _slice(fat_rows_in_mf_left: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64x64 slice: rectangles with known pixel counts."""
    labels = np.zeros((64, 64), np.uint8)
    image = np.full((64, 64), 5.0)
    labels[0:10, 0:20] = Label.MULTIFIDUS_LEFT  # 200 px
    labels[0:10, 30:40] = Label.MULTIFIDUS_RIGHT  # 100 px
    labels[20:25, 0:8] = Label.DURAL_SAC  # 40 px
    labels[20:25, 8:12] = Label.EPIDURAL_SPACE  # 20 px
    labels[40:50, 0:64] = Label.SUBCUTANEOUS_FAT  # 640 px
    image[labels == Label.MULTIFIDUS_LEFT] = LEAN_SI
    image[labels == Label.MULTIFIDUS_RIGHT] = LEAN_SI
    image[labels == Label.SUBCUTANEOUS_FAT] = FAT_SI
    image[0:fat_rows_in_mf_left, 0:20] = FAT_SI * 0.95
    return image, labels


def test_csa_matches_pixel_counts_times_pixel_area() -> None:
    image, labels = _slice()
    m = measure_slice(image, labels, (0.5, 0.8)).values
    px = 0.5 * 0.8
    assert m["multifidus_left"].csa_mm2 == pytest.approx(200 * px)
    assert m["multifidus_right"].csa_mm2 == pytest.approx(100 * px)
    assert m["dural_sac"].csa_mm2 == pytest.approx(40 * px)
    assert m["spinal_canal"].csa_mm2 == pytest.approx(60 * px)  # dural sac + epidural space
    assert m["disc"].csa_mm2 == 0.0


def test_fat_fraction_of_a_constructed_muscle() -> None:
    # 3 of 10 rows of the left multifidus are fat: 30 % fat, FCSA = 70 % of CSA.
    image, labels = _slice(fat_rows_in_mf_left=3)
    rng = np.random.default_rng(0)
    image = image + rng.normal(0, 5, image.shape)
    m = measure_slice(image, labels, (1.0, 1.0)).values["multifidus_left"]
    assert m.fat_fraction_pct == pytest.approx(30.0, abs=0.01)
    assert m.fcsa_mm2 == pytest.approx(140.0, abs=0.01)
    assert m.si_ratio_to_fat == pytest.approx(m.mean_si / np.median(image[labels == Label.SUBCUTANEOUS_FAT]))


def test_pure_lean_muscle_is_not_split_by_otsu() -> None:
    rng = np.random.default_rng(1)
    image, labels = _slice()
    image = image + rng.normal(0, 8, image.shape)
    m = measure_slice(image, labels, (1.0, 1.0)).values["multifidus_right"]
    assert m.fat_fraction_pct == pytest.approx(0.0, abs=1.0)


def test_otsu_separates_two_modes_and_threshold_is_bounded() -> None:
    values = np.concatenate([np.full(50, 10.0), np.full(50, 90.0)])
    t = otsu_threshold(values)
    assert 10.0 < t < 90.0
    # bounded to at least 30 % of the way from lean (10) to the fat reference (200)
    assert fat_threshold(values, 200.0) == (pytest.approx(67.0), True)
    assert fat_threshold(values, None) == (pytest.approx(t), True)
    # fat darker than muscle (e.g. a fat-suppressed sequence): the threshold mirrors
    thr, bright = fat_threshold(values, -100.0)
    assert not bright and -100.0 <= thr <= 90.0 - 0.3 * 190.0


@pytest.mark.parametrize(
    ("ff", "grade"), [(0.0, 0), (9.99, 0), (10.0, 1), (50.0, 1), (50.01, 2), (90.0, 2)]
)
def test_kjaer_grade_thresholds(ff: float, grade: int) -> None:
    assert kjaer_grade(ff) == grade


def test_asymmetry_uses_largest_fcsa() -> None:
    assert asymmetry_pct(1000.0, 800.0) == pytest.approx(20.0)
    assert asymmetry_pct(800.0, 1000.0) == pytest.approx(20.0)
    assert asymmetry_pct(0.0, 0.0) == 0.0


def test_level_averages_slices_and_grades_multifidus() -> None:
    a_img, a_lab = _slice(fat_rows_in_mf_left=2)  # 20 % fat
    b_img, b_lab = _slice(fat_rows_in_mf_left=4)  # 40 % fat
    lm = measure_level(np.stack([a_img, b_img]), np.stack([a_lab, b_lab]), [0, 1], (1.0, 1.0))
    assert lm.measurements["multifidus_left"].fat_fraction_pct == pytest.approx(30.0, abs=0.01)
    assert lm.kjaer_grade == {"multifidus_left": 1, "multifidus_right": 0}
    # FCSA left 140 mm2 (mean of 160 and 120), right 100 mm2
    assert lm.asymmetry_pct["multifidus"] == pytest.approx((140 - 100) / 140 * 100, abs=0.01)
    flags = plausibility_flags("L4-L5", lm)
    assert any("disc not found" in f for f in flags)


def test_icc_and_bland_altman_known_values() -> None:
    truth = np.array([100.0, 200.0, 300.0, 400.0])
    assert icc_2_1(truth, truth) == pytest.approx(1.0)
    assert icc_2_1(truth + 10, truth) < 1.0
    ba = bland_altman(truth + 10, truth)
    assert ba["bias"] == pytest.approx(10.0)
    assert ba["loa_low"] == pytest.approx(10.0)
    # Shrout & Fleiss (1979) Table 2 data, judges 1 and 2: ICC(2,1) computed by hand.
    j1 = np.array([9, 6, 8, 7, 10, 6], float)
    j2 = np.array([2, 1, 4, 1, 5, 2], float)
    y = np.stack([j1, j2], 1)
    n, k = y.shape
    gm = y.mean()
    msr = k * ((y.mean(1) - gm) ** 2).sum() / (n - 1)
    msc = n * ((y.mean(0) - gm) ** 2).sum() / (k - 1)
    mse = (((y - gm) ** 2).sum() - msr * (n - 1) - msc * (k - 1)) / ((n - 1) * (k - 1))
    expected = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    assert icc_2_1(j1, j2) == pytest.approx(expected)


def test_case_bootstrap_interval_is_wide_for_few_cases_and_narrows_with_more() -> None:
    """The Dice interval resamples whole cases: slices of one case do not count as independent."""
    from ai.evaluate import SegmentationMetrics

    def report(n_cases: int, slices: int) -> dict:
        m = SegmentationMetrics()
        truth = np.zeros((20, 20), np.uint8)
        truth[5:15, 5:15] = 2  # disc, 100 px
        for c in range(n_cases):
            m.next_case()
            pred = np.zeros_like(truth)
            pred[5:15, 5 : 15 - (c % 2) * 5] = 2  # even cases exact (Dice 1), odd ones Dice 2/3
            for _ in range(slices):
                m.add(pred, truth, truth.astype(np.float32), (1.0, 1.0))
        return m.report()["all"]["disc"]

    few, many = report(4, 10), report(40, 10)
    assert few["n_cases"] == 4 and few["n_slices"] == 40
    assert few["dice"] == pytest.approx(5 / 6)
    lo, hi = few["dice_ci95"]
    assert lo < 0.75 and hi > 0.9  # 4 cases: the mean may be anywhere between 2/3 and 1
    lo_m, hi_m = many["dice_ci95"]
    assert lo_m <= 5 / 6 <= hi_m and hi_m - lo_m < 0.5 * (hi - lo)
    assert report(1, 5)["dice_ci95"] is None


def test_evaluation_counts_slices_whose_disc_or_body_took_the_other_identity() -> None:
    from ai.evaluate import SegmentationMetrics

    m = SegmentationMetrics()
    disc, body = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    disc[5:15, 5:15], body[5:15, 5:15] = 2, 1
    m.add(body, disc, disc.astype(np.float32), (1.0, 1.0))  # a disc slice called body: swapped
    half = body.copy()
    half[5:10, 5:15] = 2
    m.add(half, body, body.astype(np.float32), (1.0, 1.0))  # half of a body slice called disc: not
    m.add(body, body, body.astype(np.float32), (1.0, 1.0))
    r = m.report()["all"]
    assert r["disc"]["swapped_slices"] == 1 and r["vertebral_body"]["swapped_slices"] == 0
    assert r["psoas_left"]["swapped_slices"] is None


def test_structure_contrast_is_the_distance_between_the_grey_levels_inside_and_around() -> None:
    from ai.measure import structure_contrast

    rng = np.random.default_rng(0)
    mask = np.zeros((60, 60), bool)
    mask[20:40, 20:40] = True
    noise = rng.normal(0.0, 10.0, mask.shape)
    assert structure_contrast(100.0 + noise, mask, (1.0, 1.0)) < 0.15  # iso-intense: invisible
    step = 100.0 + noise + 20.0 * mask  # two noise SDs brighter: KS of N(0,1) vs N(2,1) = 0.68
    assert structure_contrast(step, mask, (1.0, 1.0)) == pytest.approx(0.68, abs=0.08)
    # the ring is 4 mm: at 0.5 mm pixels it is 8 pixels wide; a brighter frame further out is not read
    far = step + 50.0 * ~np.pad(np.ones((56, 56), bool), 2)
    assert structure_contrast(far, mask, (0.5, 0.5)) == pytest.approx(structure_contrast(step, mask, (0.5, 0.5)))
    assert structure_contrast(np.full(mask.shape, 5.0), mask, (1.0, 1.0)) == 0.0
    # a fat-speckled inside whose mean equals the surroundings' still differs in distribution
    speckled = np.where(mask & (rng.random(mask.shape) < 0.5), 80.0, 120.0) * mask + 100.0 * ~mask + noise / 5
    assert abs(speckled[mask].mean() - 100.0) < 2.0
    assert structure_contrast(speckled, mask, (1.0, 1.0)) == pytest.approx(0.5, abs=0.03)  # two halves apart
    assert np.isnan(structure_contrast(step, np.zeros_like(mask), (1.0, 1.0)))


def test_icc_where_visible_leaves_out_the_slices_whose_structure_has_no_contrast() -> None:
    from ai.evaluate import SegmentationMetrics

    rng = np.random.default_rng(1)
    m = SegmentationMetrics()
    for k in range(12):
        truth = np.zeros((64, 64), np.uint8)
        side = 14 + k
        truth[10 : 10 + side, 10 : 10 + side] = 6  # psoas left, growing
        image = rng.normal(100.0, 5.0, truth.shape)
        visible = k % 3 != 0
        if visible:
            image[truth == 6] += 30.0
        pred = truth.copy()
        if not visible:  # guessed badly where nothing shows
            pred[:] = 0
            pred[10:20, 10:20] = 6
        m.add(pred, truth, image, (1.0, 1.0))
    r = m.report()["all"]["psoas_left"]
    assert r["low_contrast_slices"] == 4
    assert r["csa_icc_visible"] == pytest.approx(1.0)
    assert r["csa_icc"] < 0.9


def test_a_psoas_without_contrast_to_its_surroundings_is_measured_and_flagged() -> None:
    from ai.measure import LOW_CONTRAST, measure_level, plausibility_flags

    rng = np.random.default_rng(2)
    labels = np.zeros((2, 80, 80), np.uint8)
    labels[:, 20:50, 10:35] = Label.PSOAS_LEFT
    labels[:, 20:50, 45:70] = Label.PSOAS_RIGHT
    images = rng.normal(100.0, 8.0, labels.shape)
    images[labels == Label.PSOAS_RIGHT] += 40.0  # the right psoas stands out, the left does not
    lm = measure_level(images, labels, [0, 1], (1.0, 1.0))
    left, right = lm.measurements["psoas_left"], lm.measurements["psoas_right"]
    assert left.outline_contrast is not None and left.outline_contrast < LOW_CONTRAST
    assert right.outline_contrast is not None and right.outline_contrast > 0.9
    assert lm.measurements["multifidus_left"].outline_contrast is None  # not a contrast structure
    assert "outline_contrast" in left.to_dict()
    flags = [f for f in plausibility_flags("L4-L5", lm) if "outline" in f]
    assert len(flags) == 1 and flags[0].startswith("L4-L5: psoas_left outline has little contrast")
    assert f"< {LOW_CONTRAST}" in flags[0]
    images[labels == Label.PSOAS_RIGHT] -= 40.0  # both sides invisible: one flag for the level
    both = measure_level(images, labels, [0, 1], (1.0, 1.0))
    flags = [f for f in plausibility_flags("L4-L5", both) if "outline" in f]
    assert flags == [flags[0]] and flags[0].startswith("L4-L5: psoas_left and psoas_right outlines have")


def test_per_study_summary_gives_known_dice_and_identity_errors() -> None:
    from ai.evaluate import EvalCase, case_summary, markdown_worst_cases
    from ai.volume import Volume

    n = 3
    truth = np.zeros((n, 20, 20), np.uint8)
    truth[:, 2:12, 2:12] = Label.VERTEBRAL_BODY
    truth[1, 2:12, 2:12] = Label.DISC  # slice 1 is the disc
    truth[:, 14:18, 2:6] = Label.PSOAS_LEFT  # 16 px per slice
    pred = truth.copy()
    pred[2, 2:12, 2:12] = Label.DISC  # slice 2: body called disc
    pred[:, 14:18, 2:5] = 0  # three quarters of the psoas missed: Dice 2*4/(4+16)
    vol = Volume(pixels=np.zeros((n, 20, 20), np.float32), pixel_spacing=(1.0, 1.0),
                 positions=np.array([[0.0, 0.0, 4.0 * k] for k in range(n)]),
                 orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)),
                 slice_uids=tuple(f"1.2.{k}" for k in range(n)), series_instance_uid="1.2")
    s = case_summary(EvalCase("study-1", vol, truth, mode="realistic"), pred, n_flags=2)
    assert s["dice"]["psoas_left"] == pytest.approx(2 * 4 / 20, abs=1e-4)
    assert s["dice"]["disc"] == pytest.approx(2 * 100 / 300, abs=1e-4)  # 100 true, 200 predicted
    assert s["dice"]["vertebral_body"] == pytest.approx(2 * 100 / 300, abs=1e-4)
    assert s["dice"]["dural_sac"] is None  # in neither map: not scored
    assert s["column_identity_errors"] == [2]
    assert s["flags"] == 2 and s["n_slices"] == 3
    table = markdown_worst_cases([s, {**s, "case": "study-2", "mean_dice": 0.99}], n=1)
    assert "study-1" in table and "study-2" not in table and "psoas_left 0.400" in table


def test_a_structure_cut_by_the_field_of_view_is_marked_and_flagged() -> None:
    labels = np.zeros((2, 40, 40), np.uint8)
    labels[:, 10:20, 10:20] = Label.DURAL_SAC  # inside on both slices
    labels[0, 22:30, 2:12] = Label.ERECTOR_SPINAE_LEFT  # 2 pixels from the edge on slice 0 ...
    labels[1, 22:30, 1:12] = Label.ERECTOR_SPINAE_LEFT  # ... 1 on slice 1: at it (EDGE_MARGIN_PX)
    labels[:, 35:40, :] = Label.SUBCUTANEOUS_FAT  # always cut: not flagged
    images = np.full(labels.shape, 100.0)
    per_slice = [measure_slice(images[k], labels[k], (1.0, 1.0)).values for k in range(2)]
    assert [s["erector_spinae_left"].at_image_edge for s in per_slice] == [False, True]
    assert not per_slice[1]["dural_sac"].at_image_edge and per_slice[1]["subcutaneous_fat"].at_image_edge
    assert not per_slice[0]["psoas_left"].at_image_edge  # absent: not at the edge
    lm = measure_level(images, labels, [0, 1], (1.0, 1.0))
    assert lm.measurements["erector_spinae_left"].at_image_edge  # any of the level's slices
    assert lm.measurements["erector_spinae_left"].to_dict()["at_image_edge"] is True
    assert "at_image_edge" not in lm.measurements["dural_sac"].to_dict()
    cut = [f for f in plausibility_flags("L4-L5", lm) if "edge of the image" in f]
    assert cut == ["L4-L5: erector_spinae_left reaches the edge of the image: the field of view may cut it, "
                   "and its CSA would then leave out what lies outside it; check on the overlay"]
    labels[1, 10:20, 37:40] = Label.PSOAS_RIGHT  # three structures: listed with commas
    labels[1, 0:2, 20:30] = Label.MULTIFIDUS_LEFT
    cut = [f for f in plausibility_flags("L4-L5", measure_level(images, labels, [0, 1], (1.0, 1.0)))
           if "edge of the image" in f]
    assert cut[0].startswith("L4-L5: psoas_right, erector_spinae_left and multifidus_left reach the edge")
