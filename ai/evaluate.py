"""Segmentation and measurement metrics against ground truth.

Per structure key of :data:`ai.labels.STRUCTURES`:

* **Dice** and **IoU**: mean over the slices where the structure is in the truth
  (per-slice overlap), plus the Dice pooled over all pixels of all slices;
  ``fp_slices`` counts slices where it is predicted but absent from the truth.
* **CSA agreement** over those slices: ICC(2,1) (two-way random effects, absolute
  agreement, single measurement; Shrout & Fleiss 1979 / McGraw & Wong 1996) and
  Bland-Altman bias and 95 % limits of agreement (prediction - truth, mm2).
* **Swapped slices** of the disc and the vertebral body: slices where more than half of the
  true structure is predicted as the other one (a whole-slice identity error, 1000-2000 mm2
  of CSA each; the CSA ICC of both is most sensitive to these).
* **Fat fraction** of the muscles, when the truth carries ``fat_fraction_pct`` per slice:
  mean absolute error (percentage points).
* **Contrast-stratified ICC** (``csa_icc_visible``): the CSA ICC over the slices where the
  true structure stands out from its surroundings (:func:`ai.measure.structure_contrast` at least
  :data:`ai.measure.LOW_CONTRAST`), and ``low_contrast_slices``, how many do not. Randomised
  phantom contrasts sometimes give a muscle the grey level of the tissue around it; no
  segmentation can draw an outline the image does not show, so this figure separates
  "missed where visible" from "guessed where invisible". It is a diagnostic beside the
  CSA ICC, never a replacement for it.
* **Per study** (:func:`case_summary`): each series' Dice per structure (pooled over its
  slices), its disc / vertebral body identity errors and its flag count, so a site
  evaluating on its own studies finds the ones that failed instead of reading a mean.
* **Sampling error**: a 95 % bootstrap interval of the mean Dice and of the ICC over
  *cases* (series), since slices of one series share a contrast and an anatomy and do not
  vary independently. With few cases (six random contrasts, say) the interval is wide,
  and the point values should not decide between two models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ai.labels import MUSCLES, STRUCTURES
from ai.measure import LOW_CONTRAST, measure_slice, structure_contrast
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Bootstrap resamples of the case-level intervals (fixed seed: reports are reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261122


@dataclass
class EvalCase:
    """One series with its ground truth.

    Attributes
    ----------
    name
        Case identifier for the report.
    volume
        The series as the node would read it.
    truth_labels
        ``(n_slices, rows, cols)`` label map in the volume's slice order.
    truth
        Optional truth dict (phantom ``truth.json`` of the series): per-slice entries under
        ``slices`` (with ``fat_fraction_pct``) and per-level entries under ``levels`` (grades).
    mode
        Image mode for the per-mode breakdown (``realistic`` / ``randomised`` / ``real``).
    """

    name: str
    volume: Volume
    truth_labels: np.ndarray
    truth: dict[str, Any] = field(default_factory=dict)
    mode: str = "unknown"

    def __post_init__(self) -> None:
        if self.truth_labels.shape != self.volume.pixels.shape:
            raise ValueError(
                f"{self.name}: truth labels {self.truth_labels.shape} differ from the volume "
                f"{self.volume.pixels.shape}"
            )


def icc_2_1(a: np.ndarray, b: np.ndarray) -> float:
    """ICC(2,1) of two raters (absolute agreement, single measures); NaN below 2 subjects."""
    y = np.stack([np.asarray(a, float), np.asarray(b, float)], axis=1)
    n, k = y.shape
    if n < 2:
        return float("nan")
    gm = y.mean()
    ssr = k * float(((y.mean(axis=1) - gm) ** 2).sum())
    ssc = n * float(((y.mean(axis=0) - gm) ** 2).sum())
    sst = float(((y - gm) ** 2).sum())
    sse = sst - ssr - ssc
    msr = ssr / (n - 1)
    msc = ssc / (k - 1)
    mse = sse / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    if denom <= 0:
        return float("nan")
    return float((msr - mse) / denom)


def bland_altman(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Bias and 95 % limits of agreement of ``pred - truth``."""
    d = np.asarray(pred, float) - np.asarray(truth, float)
    if d.size == 0:
        return {"bias": float("nan"), "loa_low": float("nan"), "loa_high": float("nan")}
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return {"bias": bias, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


#: Structures that can take each other's identity on a whole slice: structure -> the other one.
IDENTITY_PAIRS: dict[str, str] = {"disc": "vertebral_body", "vertebral_body": "disc"}


def identity_swapped(true: np.ndarray, predicted_other: np.ndarray) -> bool:
    """True when more than half of a true structure's mask is predicted as the other one."""
    return bool(int((true & predicted_other).sum()) * 2 > int(true.sum()) > 0)


@dataclass
class _Acc:
    dice: list[float] = field(default_factory=list)
    #: case index of every entry of ``dice`` / ``csa_*`` (for the case bootstrap)
    case: list[int] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    inter: int = 0
    total: int = 0
    fp_slices: int = 0
    swapped_slices: int = 0
    csa_truth: list[float] = field(default_factory=list)
    csa_pred: list[float] = field(default_factory=list)
    #: :func:`structure_contrast` of the true structure on each slice of ``csa_*``
    contrast: list[float] = field(default_factory=list)
    ff_err: list[float] = field(default_factory=list)


def _slice_truth(truth: Mapping[str, Any], k: int) -> Mapping[str, Any]:
    slices = truth.get("slices")
    if isinstance(slices, Sequence) and 0 <= k < len(slices) and isinstance(slices[k], Mapping):
        return slices[k]
    return {}


class SegmentationMetrics:
    """Accumulates per-structure metrics over cases (optionally split by mode)."""

    def __init__(self) -> None:
        self._acc: dict[str, dict[str, _Acc]] = {}
        self._case = 0

    def _get(self, group: str, key: str) -> _Acc:
        return self._acc.setdefault(group, {}).setdefault(key, _Acc())

    def add(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        image: np.ndarray,
        pixel_spacing: tuple[float, float],
        *,
        mode: str = "unknown",
        slice_truth: Mapping[str, Any] | None = None,
    ) -> None:
        """Add one slice (predicted and true label maps on the same grid)."""
        px = float(pixel_spacing[0] * pixel_spacing[1])
        ff_truth = (slice_truth or {}).get("fat_fraction_pct") or {}
        pred_ff: dict[str, float | None] = {}
        if ff_truth:
            meas = measure_slice(image, pred, pixel_spacing).values
            pred_ff = {k: meas[k].fat_fraction_pct for k in MUSCLES}
        contrast: dict[str, float] = {}  # computed once per structure, shared by both groups
        for group in ("all", mode):
            for key, labs in STRUCTURES.items():
                p = np.isin(pred, labs)
                t = np.isin(truth, labs)
                acc = self._get(group, key)
                np_, nt = int(p.sum()), int(t.sum())
                inter = int((p & t).sum())
                acc.inter += inter
                acc.total += np_ + nt
                if nt == 0:
                    if np_ > 0:
                        acc.fp_slices += 1
                    continue
                if key in IDENTITY_PAIRS and identity_swapped(t, np.isin(pred, STRUCTURES[IDENTITY_PAIRS[key]])):
                    acc.swapped_slices += 1
                acc.dice.append(2 * inter / (np_ + nt))
                acc.case.append(self._case)
                acc.iou.append(inter / (np_ + nt - inter))
                acc.csa_truth.append(nt * px)
                acc.csa_pred.append(np_ * px)
                if key not in contrast:
                    contrast[key] = structure_contrast(image, t, pixel_spacing)
                acc.contrast.append(contrast[key])
                if key in ff_truth and pred_ff.get(key) is not None:
                    acc.ff_err.append(abs(float(pred_ff[key]) - float(ff_truth[key])))  # type: ignore[arg-type]

    def add_case(self, case: EvalCase, pred_labels: np.ndarray) -> None:
        self.next_case()
        for k in range(case.volume.n_slices):
            self.add(
                pred_labels[k], case.truth_labels[k], case.volume.pixels[k],
                case.volume.pixel_spacing, mode=case.mode, slice_truth=_slice_truth(case.truth, k),
            )

    def next_case(self) -> None:
        """Slices added from now on belong to a new case (series)."""
        self._case += 1

    def report(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """``{group: {structure: {dice, iou, dice_pooled, icc, bias, loa_low, loa_high, ...}}}``."""
        out: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for group, per in self._acc.items():
            out[group] = {}
            for key, a in per.items():
                ba = bland_altman(np.array(a.csa_pred), np.array(a.csa_truth))
                visible = ~(np.asarray(a.contrast) < LOW_CONTRAST)
                out[group][key] = {
                    "n_slices": len(a.dice),
                    "dice": _mean(a.dice),
                    "iou": _mean(a.iou),
                    "dice_pooled": 2 * a.inter / a.total if a.total else None,
                    **_case_intervals(a),
                    "fp_slices": a.fp_slices,
                    "swapped_slices": a.swapped_slices if key in IDENTITY_PAIRS else None,
                    "csa_icc": finite_or_none(icc_2_1(np.array(a.csa_pred), np.array(a.csa_truth))),
                    "csa_bias_mm2": finite_or_none(ba["bias"]),
                    "csa_loa_low_mm2": finite_or_none(ba["loa_low"]),
                    "csa_loa_high_mm2": finite_or_none(ba["loa_high"]),
                    "low_contrast_slices": int((~visible).sum()),
                    "csa_icc_visible": finite_or_none(
                        icc_2_1(np.array(a.csa_pred)[visible], np.array(a.csa_truth)[visible])
                    ),
                    "fat_fraction_mae_pct": _mean(a.ff_err),
                }
        return out


def column_identity_errors(pred: np.ndarray, truth: np.ndarray) -> list[int]:
    """Slices where the true disc or vertebral body took the other's identity
    (:func:`identity_swapped`, as ``swapped_slices`` counts them)."""
    disc, body = STRUCTURES["disc"], STRUCTURES["vertebral_body"]
    return [
        k for k in range(len(truth))
        if identity_swapped(np.isin(truth[k], disc), np.isin(pred[k], body))
        or identity_swapped(np.isin(truth[k], body), np.isin(pred[k], disc))
    ]


def case_summary(case: EvalCase, pred_labels: np.ndarray, n_flags: int) -> dict[str, Any]:
    """One study's figures: Dice per structure pooled over its slices (None where the
    structure is in neither map), the mean of those, its column identity errors, flags."""
    dice: dict[str, float | None] = {}
    for key, labs in STRUCTURES.items():
        p, t = np.isin(pred_labels, labs), np.isin(case.truth_labels, labs)
        total = int(p.sum()) + int(t.sum())
        dice[key] = round(2 * int((p & t).sum()) / total, 4) if total else None
    present = [d for d in dice.values() if d is not None]
    return {
        "case": case.name,
        "mode": case.mode,
        "n_slices": case.volume.n_slices,
        "mean_dice": round(float(np.mean(present)), 4) if present else None,
        "dice": dice,
        "column_identity_errors": column_identity_errors(pred_labels, case.truth_labels),
        "flags": n_flags,
    }


def markdown_worst_cases(cases: Sequence[Mapping[str, Any]], n: int = 10) -> str:
    """The ``n`` studies with the lowest mean Dice, with their weakest structure."""
    ranked = sorted((c for c in cases if c.get("mean_dice") is not None), key=lambda c: c["mean_dice"])
    rows = []
    for c in ranked[:n]:
        scored = {k: v for k, v in c["dice"].items() if v is not None}
        weakest = min(scored, key=lambda k: scored[k]) if scored else "-"
        rows.append((c["case"], c["mode"], c["n_slices"], format_value(c["mean_dice"]),
                     f"{weakest} {format_value(scored.get(weakest))}",
                     " ".join(str(k) for k in c["column_identity_errors"]) or "-", c["flags"]))
    return markdown(("study", "mode", "slices", "mean Dice", "weakest structure",
                     "disc/body identity errors (slices)", "flags"), rows)


def _case_intervals(a: _Acc) -> dict[str, Any]:
    """Cases, and 95 % bootstrap intervals over cases of the mean Dice and the CSA ICC."""
    dice, pred, truth = np.asarray(a.dice), np.asarray(a.csa_pred), np.asarray(a.csa_truth)
    return {
        "n_cases": int(len(np.unique(np.asarray(a.case, dtype=int)))),
        "dice_ci95": case_bootstrap(a.case, lambda idx: float(dice[idx].mean())),
        "csa_icc_ci95": case_bootstrap(a.case, lambda idx: icc_2_1(pred[idx], truth[idx])),
    }


def case_bootstrap(case: Sequence[int], statistic: Callable[[np.ndarray], float]) -> list[float] | None:
    """95 % interval of ``statistic(row indices)`` over resamples of whole cases (None below 2 cases).

    ``case[i]`` is the case of row ``i``; a resample draws cases with replacement and takes
    all their rows. Non-finite values of the statistic are left out.
    """
    cases = np.unique(np.asarray(case, dtype=int))
    if len(cases) < 2:
        return None
    rows = [np.flatnonzero(np.asarray(case) == c) for c in cases]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    values = [
        statistic(np.concatenate([rows[i] for i in rng.integers(0, len(cases), len(cases))]))
        for _ in range(BOOTSTRAP_RESAMPLES)
    ]
    finite = np.asarray(values)[np.isfinite(values)]
    return [float(v) for v in np.percentile(finite, [2.5, 97.5])] if len(finite) else None


def _mean(xs: Iterable[float]) -> float | None:
    v = list(xs)
    return float(np.mean(v)) if v else None


def finite_or_none(x: float) -> float | None:
    """``x``, or None when it is NaN or infinite (JSON has neither)."""
    return None if not np.isfinite(x) else float(x)


#: Targets of the issue (held-out phantoms).
DICE_TARGETS: dict[str, float] = {
    "psoas_left": 0.90, "psoas_right": 0.90, "erector_spinae_left": 0.90,
    "erector_spinae_right": 0.90, "multifidus_left": 0.90, "multifidus_right": 0.90,
    "disc": 0.93, "dural_sac": 0.90,
}
ICC_TARGET = 0.95


def format_value(x: float | None, nd: int = 3) -> str:
    """A table cell: ``x`` with ``nd`` decimals, ``-`` when missing."""
    return "-" if x is None else f"{x:.{nd}f}"


def format_interval(x: Sequence[float] | None) -> str:
    """A table cell for a 95 % interval, ``-`` when missing."""
    return "-" if not x else f"{x[0]:.3f}-{x[1]:.3f}"


def markdown(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: a header row, its separator, one line per row."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def markdown_table(report: Mapping[str, Mapping[str, Mapping[str, Any]]], group: str = "all") -> str:
    """The per-structure table of one group as Markdown."""
    f, ci = format_value, format_interval
    headers = ("structure", "cases", "slices", "Dice", "Dice 95 % CI", "IoU", "pooled Dice", "FP slices",
               "CSA ICC(2,1)", "ICC 95 % CI", "BA bias mm2", "BA 95 % LoA mm2", "low-contrast slices",
               "ICC where visible", "FF MAE %", "target")
    rows = []
    for key, m in report.get(group, {}).items():
        target = DICE_TARGETS.get(key)
        rows.append((
            key, m.get("n_cases", "-"), m["n_slices"], f(m["dice"]), ci(m.get("dice_ci95")), f(m["iou"]),
            f(m["dice_pooled"]), m["fp_slices"], f(m["csa_icc"]), ci(m.get("csa_icc_ci95")),
            f(m["csa_bias_mm2"], 1), f"{f(m['csa_loa_low_mm2'], 1)} .. {f(m['csa_loa_high_mm2'], 1)}",
            m.get("low_contrast_slices", "-"), f(m.get("csa_icc_visible")), f(m["fat_fraction_mae_pct"], 1),
            f"Dice >= {target:.2f}, ICC >= 0.95" if target else "-",
        ))
    return markdown(headers, rows)
