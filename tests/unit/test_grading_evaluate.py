"""Metrics of ai.evaluate_grades against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from ai.evaluate_grades import cohen_kappa, confusion_matrix, evaluate_grades, macro_f1
from ai.results import LevelResult, SeriesResult, Stenosis


def test_confusion_f1_kappa_by_hand() -> None:
    truth = ["A", "A", "B", "B", "C", "D"]
    pred = ["A", "B", "B", "B", "C", "C"]
    m = confusion_matrix(truth, pred, ("A", "B", "C", "D"))
    assert m.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    # F1: A 2/3, B 4/5, C 2/3, D 0
    assert macro_f1(m) == pytest.approx((2 / 3 + 0.8 + 2 / 3 + 0.0) / 4)
    # po = 4/6; pe = (2*1 + 2*3 + 1*2 + 1*0) / 36 = 10/36
    assert cohen_kappa(m) == pytest.approx((4 / 6 - 10 / 36) / (1 - 10 / 36))
    perfect = confusion_matrix(truth, truth, ("A", "B", "C", "D"))
    assert cohen_kappa(perfect) == pytest.approx(1.0)
    assert cohen_kappa(perfect, "quadratic") == pytest.approx(1.0)
    assert cohen_kappa(m, "quadratic") > cohen_kappa(m)  # errors are all one grade apart
    with pytest.raises(ValueError):
        cohen_kappa(m, "linear-ish")


def _stenosis(grade: str, dsca: float, rootlets: str = "rootlets") -> Stenosis:
    sev = {"A": "normal/mild", "B": "moderate", "C": "severe", "D": "severe"}[grade]
    dg = "normal" if dsca >= 100 else "relative" if dsca >= 75 else "absolute"
    probs = {g: (1.0 if g == grade else 0.0) for g in "ABCD"}
    return Stenosis(grade, probs, dsca, dg, sev, rootlets, 0.9, 0.9)


def test_evaluate_matches_by_slices_not_names() -> None:
    pred = SeriesResult(
        series_instance_uid="1",
        model_name="m",
        model_version="1",
        labels=np.zeros((1, 1, 1), dtype=np.uint8),
        levels=[
            LevelResult("L5-S1", 1, [1, 2, 3], 0.9, stenosis=_stenosis("A", 150.0)),
            LevelResult("L3-L4", 2, [10, 11, 12], 0.9, stenosis=_stenosis("B", 90.0)),  # wrong name
            LevelResult(None, 3, [30, 31], 0.0, stenosis=_stenosis("C", 55.0, "cord")),
        ],
    )
    truth = {
        "levels": [
            {"level": "L5-S1", "slice_indices": [1, 2, 3], "mid_slice": 2, "schizas": "A2", "dsca_mm2": 140.0, "rootlets": "rootlets"},
            {"level": "L4-L5", "slice_indices": [9, 10, 11], "mid_slice": 10, "schizas": "B", "dsca_mm2": 100.0, "rootlets": "rootlets"},
            {"level": "L3-L4", "slice_indices": [20, 21], "mid_slice": 20, "schizas": "D", "dsca_mm2": 50.0, "rootlets": "rootlets"},
            {"level": "L2-L3", "slice_indices": [30, 31], "mid_slice": 30, "schizas": "C", "dsca_mm2": 50.0, "rootlets": "cord"},
        ]
    }
    out = evaluate_grades([pred.to_dict()], [truth])
    assert out["levels"] == {"truth": 4, "predicted": 3, "matched": 3, "recall": 0.75, "spurious": 0}
    assert out["naming"]["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["naming"]["named"] == 2
    assert out["naming"]["precision_of_named"] == 0.5
    assert out["schizas"]["accuracy"] == 1.0
    assert out["schizas"]["confusion"][0][0] == 1
    assert out["rootlets"]["accuracy"] == 1.0 and out["rootlets"]["cord_recall"] == 1.0
    errs = out["dsca_abs_pct_error"]
    assert errs["n"] == 3
    assert errs["max"] == pytest.approx(10.0)
    assert errs["within_target"] == 1.0
    # the SeriesResult object itself works the same as its dict form
    assert evaluate_grades([pred], [truth])["schizas"] == out["schizas"]


def test_levels_without_cues_count_as_unnamed_rate() -> None:
    pred = [[{"level": None, "slice_indices": [1], "stenosis": None}]]
    truth = [{"nameable": False, "levels": [{"level": "L4-L5", "slice_indices": [1]}]}]
    out = evaluate_grades(pred, truth)
    assert out["naming"]["with_cues"] == 0
    assert out["naming"]["unnamed_without_cues"] == 1.0
    with pytest.raises(ValueError):
        evaluate_grades(pred, [])
