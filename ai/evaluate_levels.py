"""Agreement of the per-level measurements (the numbers in ``results.json``) with the truth.

A reader of ``results.json`` gets, per disc level, each structure's CSA averaged over the
level's disc slices (:func:`ai.measure.measure_level`). Here the truth is measured with
the same function over the same slices of the true label map, so the difference is the
segmentation's error in those numbers. Which slices a level holds (and whether a level was
found and named at all) is the level detection's part, evaluated with the grades
(:mod:`ai.evaluate_grades`).

Per structure, over the reported levels where the structure is in the truth: CSA ICC(2,1)
with a 95 % bootstrap interval over cases, Bland-Altman bias and limits, the median
absolute percentage error, and for the muscles the fat fraction's mean absolute error.
``fp_levels`` counts levels where it is predicted but absent from the truth.

Why beside the per-slice table (:mod:`ai.evaluate`), not instead of it: the per-slice table
weighs every slice alike, including the outer slices of a thick disc where a whole slice can
take the vertebral body's identity; a level averages its slices as the report does.

Over the reported levels' slices a missed outer disc slice is never counted (it is not one
of them) while a false one always is; :func:`true_levels` gives the mirror figure, each true
level measured over the truth's own disc slices, where a missed slice counts and a false one
does not. The two together bound what the level detection does to the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ai.evaluate import (
    EvalCase,
    bland_altman,
    case_bootstrap,
    finite_or_none,
    format_interval,
    format_value,
    icc_2_1,
    markdown,
)
from ai.labels import MUSCLES, STRUCTURES
from ai.levels import group_levels
from ai.measure import measure_level
from ai.results import StructureMeasurement


class MeasuredLevel(Protocol):
    """What a level needs for the comparison (:class:`ai.results.LevelResult` is one)."""

    @property
    def slice_indices(self) -> Sequence[int]: ...

    @property
    def measurements(self) -> Mapping[str, StructureMeasurement]: ...


@dataclass(frozen=True)
class TrueLevel:
    """A true level's disc slices and the prediction's measurements over them."""

    slice_indices: list[int]
    measurements: Mapping[str, StructureMeasurement]


def true_levels(case: EvalCase, labels: np.ndarray) -> list[TrueLevel]:
    """Each level of the truth (:func:`ai.levels.group_levels` of the true label map), with the
    predicted ``labels`` measured over its disc slices, as :meth:`LevelAgreement.add_case`
    takes them."""
    spacing = case.volume.pixel_spacing
    return [
        TrueLevel(run, measure_level(case.volume.pixels, labels, run, spacing).measurements)
        for run, _ in group_levels(case.truth_labels, case.volume)
    ]


@dataclass
class _Pairs:
    pred: list[float] = field(default_factory=list)
    truth: list[float] = field(default_factory=list)
    case: list[int] = field(default_factory=list)
    ff_err: list[float] = field(default_factory=list)
    fp_levels: int = 0


class LevelAgreement:
    """Accumulates per-level predicted and true measurements over cases (split by mode)."""

    def __init__(self) -> None:
        self._pairs: dict[str, dict[str, _Pairs]] = {}
        self._case = 0

    def add_case(self, case: EvalCase, levels: Iterable[MeasuredLevel]) -> None:
        """Add one case's levels: those the pipeline reported, or :func:`true_levels`."""
        self._case += 1
        spacing = case.volume.pixel_spacing
        for level in levels:
            slices = [int(i) for i in level.slice_indices]
            if not slices:
                continue
            truth = measure_level(case.volume.pixels, case.truth_labels, slices, spacing).measurements
            for group in ("all", case.mode):
                self._add(group, level.measurements, truth)

    def _add(self, group: str, pred: Mapping[str, StructureMeasurement],
             truth: Mapping[str, StructureMeasurement]) -> None:
        for key in STRUCTURES:
            acc = self._pairs.setdefault(group, {}).setdefault(key, _Pairs())
            p, t = pred.get(key), truth.get(key)
            p_csa = p.csa_mm2 if p is not None else 0.0
            t_csa = t.csa_mm2 if t is not None else 0.0
            if t_csa <= 0:
                acc.fp_levels += int(p_csa > 0)
                continue
            acc.pred.append(p_csa)
            acc.truth.append(t_csa)
            acc.case.append(self._case)
            if key in MUSCLES and p is not None and t is not None:
                if p.fat_fraction_pct is not None and t.fat_fraction_pct is not None:
                    acc.ff_err.append(abs(p.fat_fraction_pct - t.fat_fraction_pct))

    def report(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{group: {structure: {n_levels, n_cases, csa_icc, csa_icc_ci95, csa_bias_mm2, ...}}}``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for group, per in self._pairs.items():
            out[group] = {}
            for key, a in per.items():
                pred, truth = np.asarray(a.pred, float), np.asarray(a.truth, float)
                ba = bland_altman(pred, truth)
                icc = icc_2_1(pred, truth)
                ape = np.abs(pred - truth) / truth * 100.0 if truth.size else np.array([])

                def icc_of(idx: np.ndarray, pred: np.ndarray = pred, truth: np.ndarray = truth) -> float:
                    return icc_2_1(pred[idx], truth[idx])

                out[group][key] = {
                    "n_levels": int(truth.size),
                    "n_cases": len(set(a.case)),
                    "csa_icc": finite_or_none(icc),
                    "csa_icc_ci95": case_bootstrap(a.case, icc_of),
                    "csa_bias_mm2": finite_or_none(ba["bias"]),
                    "csa_loa_low_mm2": finite_or_none(ba["loa_low"]),
                    "csa_loa_high_mm2": finite_or_none(ba["loa_high"]),
                    "csa_median_abs_pct_error": finite_or_none(float(np.median(ape))) if ape.size else None,
                    "fp_levels": a.fp_levels,
                    "fat_fraction_mae_pct": float(np.mean(a.ff_err)) if a.ff_err else None,
                }
        return out


def markdown_level_table(report: Mapping[str, Mapping[str, Mapping[str, Any]]], group: str = "all") -> str:
    """The per-level table of one group as Markdown."""
    f, ci = format_value, format_interval
    headers = ("structure", "cases", "levels", "CSA ICC(2,1)", "ICC 95 % CI", "BA bias mm2", "BA 95 % LoA mm2",
               "median abs error %", "FP levels", "FF MAE %")
    rows = [
        (key, m["n_cases"], m["n_levels"], f(m["csa_icc"]), ci(m["csa_icc_ci95"]), f(m["csa_bias_mm2"], 1),
         f"{f(m['csa_loa_low_mm2'], 1)} .. {f(m['csa_loa_high_mm2'], 1)}", f(m["csa_median_abs_pct_error"], 1),
         m["fp_levels"], f(m["fat_fraction_mae_pct"], 1))
        for key, m in report.get(group, {}).items()
    ]
    return markdown(headers, rows)
