"""Per-level measurement agreement: the truth measured like the report, over the same slices."""

from __future__ import annotations

import numpy as np
import pytest

from ai.evaluate import EvalCase
from ai.evaluate_levels import LevelAgreement, markdown_level_table, true_levels
from ai.labels import Label
from ai.measure import measure_level
from ai.results import LevelResult
from ai.volume import Volume


def _case(disc_sides: list[int], mode: str = "randomised") -> EvalCase:
    """One series of square discs (side ``disc_sides[k]`` px, 1 mm2 px) with a left psoas."""
    n = len(disc_sides)
    truth = np.zeros((n, 40, 40), np.uint8)
    for k, side in enumerate(disc_sides):
        truth[k, 2 : 2 + side, 2 : 2 + side] = Label.DISC
        truth[k, 30:38, 30:38] = Label.PSOAS_LEFT
    volume = Volume(
        pixels=np.full(truth.shape, 100.0, np.float32), pixel_spacing=(1.0, 1.0),
        positions=np.array([[0.0, 0.0, 4.0 * k] for k in range(n)]),
        orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)),
        slice_uids=tuple(f"1.2.{k}" for k in range(n)), series_instance_uid="1.2",
    )
    return EvalCase(name="c", volume=volume, truth_labels=truth, mode=mode)


def _level(case: EvalCase, labels: np.ndarray, slices: list[int]) -> LevelResult:
    m = measure_level(case.volume.pixels, labels, slices, case.volume.pixel_spacing)
    return LevelResult(level=None, position=1, slice_indices=slices, level_confidence=1.0,
                       measurements=m.measurements)


def test_levels_compare_the_reported_average_with_the_truth_over_the_same_slices() -> None:
    agreement = LevelAgreement()
    for sides in ([10, 12, 14, 16], [20, 22, 24, 26], [14, 16, 18, 20]):
        case = _case(sides)
        pred = case.truth_labels.copy()
        pred[0][pred[0] == Label.DISC] = Label.VERTEBRAL_BODY  # slice 0 took the body's identity
        pred[:, 30:38, 30:38] = 0  # the left psoas is never found
        agreement.add_case(case, [_level(case, pred, [0, 1]), _level(case, pred, [2, 3])])
    report = agreement.report()
    assert set(report) == {"all", "randomised"}
    disc = report["all"]["disc"]
    assert disc["n_levels"] == 6 and disc["n_cases"] == 3
    # levels over slices 2-3 are exact; over 0-1 the reported disc misses half the slice-0
    # area (slice 0 reads 0): sides 10, 12 -> reported 144 / 2 = 72, true (100 + 144) / 2 = 122
    errors = [-(10**2) / 2, -(20**2) / 2, -(14**2) / 2, 0.0, 0.0, 0.0]
    assert disc["csa_bias_mm2"] == pytest.approx(np.mean(errors))
    assert 0.0 < disc["csa_icc"] < 1.0
    assert disc["fp_levels"] == 0
    body = report["all"]["vertebral_body"]
    assert body["n_levels"] == 0 and body["fp_levels"] == 3  # predicted where the truth has none
    psoas = report["all"]["psoas_left"]
    assert psoas["csa_median_abs_pct_error"] == pytest.approx(100.0)
    assert report["all"]["multifidus_left"]["n_levels"] == 0
    table = markdown_level_table(report)
    assert "| disc | 3 | 6 |" in table


def test_a_perfect_segmentation_agrees_exactly() -> None:
    agreement = LevelAgreement()
    for sides in ([10, 12], [20, 24], [14, 18]):
        case = _case(sides, mode="realistic")
        agreement.add_case(case, [_level(case, case.truth_labels, [0, 1])])
    disc = agreement.report()["realistic"]["disc"]
    assert disc["csa_icc"] == pytest.approx(1.0)
    assert disc["csa_bias_mm2"] == 0.0 and disc["csa_median_abs_pct_error"] == 0.0
    lo, hi = disc["csa_icc_ci95"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_true_levels_measure_the_prediction_over_the_truths_own_disc_slices() -> None:
    case = _case([20, 22, 24, 26])  # every slice a disc slice (>= 250 mm2)
    pred = case.truth_labels.copy()
    pred[0][pred[0] == Label.DISC] = Label.VERTEBRAL_BODY  # a missed outer disc slice
    (level,) = true_levels(case, pred)
    assert level.slice_indices == [0, 1, 2, 3], "the truth's run, not the prediction's"
    assert level.measurements["disc"].csa_mm2 == pytest.approx((22**2 + 24**2 + 26**2) / 4)
    agreement = LevelAgreement()
    for sides in ([20, 22, 24, 26], [22, 23, 24, 25], [20, 21, 22, 23]):
        case = _case(sides)
        pred = case.truth_labels.copy()
        pred[0][pred[0] == Label.DISC] = Label.VERTEBRAL_BODY
        agreement.add_case(case, true_levels(case, pred))
    disc = agreement.report()["all"]["disc"]
    assert disc["n_levels"] == 3
    assert disc["csa_bias_mm2"] == pytest.approx(-np.mean([20**2, 22**2, 20**2]) / 4)
