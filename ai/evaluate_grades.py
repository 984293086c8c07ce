"""Agreement of predicted disc levels and stenosis grades with ground truth.

``lumbar-node evaluate`` calls :func:`evaluate_grades` with the analysis results of a set
of series and the phantom truth of each. Predicted levels are matched to true levels by
their slices (never by name, since naming is itself evaluated). Reported:

* detection: true levels found, spurious levels;
* naming: accuracy over true levels whose study holds the anatomical cues, plus how
  often a level was left unnamed and how often a given name was right (precision);
* Schizas: accuracy, macro-F1, Cohen's kappa (unweighted and quadratic), confusion
  matrix (rows truth, columns prediction, order A-D);
* severity and rootlets/cord accuracy, DSCA grade agreement;
* DSCA absolute percentage error (mean, median, 95th percentile, max, share <= 10 %).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ai.results import SCHIZAS_GRADES

logger = logging.getLogger(__name__)

#: The DSCA target: absolute percentage error at most this.
DSCA_TARGET_PCT = 10.0


@dataclass(frozen=True)
class _Pred:
    level: str | None
    slices: tuple[int, ...]
    mid: int | None
    schizas: str | None
    dsca: float | None
    rootlets: str | None
    severity: str | None


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _pred_levels(result: Any) -> list[_Pred]:
    """Levels of a ``SeriesResult``, its ``to_dict()`` form, or a list of level dicts."""
    levels = result if isinstance(result, list | tuple) else _get(result, "levels", [])
    out: list[_Pred] = []
    for lv in levels:
        st = _get(lv, "stenosis")
        slices = tuple(int(i) for i in (_get(lv, "slice_indices") or ()))
        mid = _get(lv, "mid_slice")
        out.append(
            _Pred(
                level=_get(lv, "level"),
                slices=slices,
                mid=int(mid) if mid is not None else None,
                schizas=_get(st, "schizas") if st is not None else None,
                dsca=float(_get(st, "dsca_mm2")) if st is not None else None,
                rootlets=_get(st, "rootlets") if st is not None else None,
                severity=_get(st, "severity") if st is not None else None,
            )
        )
    return out


def _truth_levels(truth: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    levels = truth.get("levels", [])
    if not isinstance(levels, list):
        raise ValueError("truth['levels'] must be a list of level dicts")
    return levels


def _truth_slices(tl: Mapping[str, Any]) -> set[int]:
    return {int(i) for i in (tl.get("slice_indices") or ())}


def _truth_mid(tl: Mapping[str, Any]) -> int | None:
    for key in ("mid_slice", "mid_disc_index", "mid_disc_slice", "mid_slice_index"):
        if tl.get(key) is not None:
            return int(tl[key])
    return None


def _match(preds: list[_Pred], truths: list[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """Greedy one-to-one matching by slice overlap (then mid-slice distance)."""
    scores: list[tuple[float, int, int]] = []
    for ti, tl in enumerate(truths):
        tset = _truth_slices(tl)
        tmid = _truth_mid(tl)
        for pi, p in enumerate(preds):
            overlap = len(tset & set(p.slices))
            if p.mid is not None and p.mid in tset:
                overlap += 1
            if overlap == 0 and tmid is not None and tmid in p.slices:
                overlap = 1
            if overlap > 0:
                dist = abs((p.mid if p.mid is not None else -999) - (tmid if tmid is not None else 999))
                scores.append((overlap - 1e-3 * dist, ti, pi))
    scores.sort(reverse=True)
    used_t: set[int] = set()
    used_p: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for _, ti, pi in scores:
        if ti in used_t or pi in used_p:
            continue
        used_t.add(ti)
        used_p.add(pi)
        pairs.append((ti, pi))
    return pairs


def confusion_matrix(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Counts ``(len(classes), len(classes))``, rows truth, columns prediction."""
    idx = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(truth, pred, strict=True):
        m[idx[t], idx[p]] += 1
    return m


def macro_f1(m: np.ndarray) -> float:
    """Mean F1 over the classes present in truth or prediction."""
    f1s: list[float] = []
    for k in range(m.shape[0]):
        tp = float(m[k, k])
        fp = float(m[:, k].sum() - tp)
        fn = float(m[k, :].sum() - tp)
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def cohen_kappa(m: np.ndarray, weights: str | None = None) -> float:
    """Cohen's kappa of a confusion matrix; ``weights`` None or ``"quadratic"``."""
    n = float(m.sum())
    if n == 0:
        return float("nan")
    k = m.shape[0]
    if weights is None:
        w = 1.0 - np.eye(k)
    elif weights == "quadratic":
        i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        w = ((i - j) / max(k - 1, 1)) ** 2
    else:
        raise ValueError(f"weights must be None or 'quadratic', got {weights!r}")
    observed = m / n
    expected = np.outer(m.sum(axis=1), m.sum(axis=0)) / (n * n)
    denom = float((w * expected).sum())
    if denom == 0:
        return 1.0 if float((w * observed).sum()) == 0 else 0.0
    return float(1.0 - (w * observed).sum() / denom)


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    return {
        "n": int(a.size),
        "mean": round(float(a.mean()), 3),
        "median": round(float(np.median(a)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "max": round(float(a.max()), 3),
        "within_target": round(float(np.mean(a <= DSCA_TARGET_PCT)), 4),
    }


def _has_cues(truth: Mapping[str, Any], tl: Mapping[str, Any]) -> bool:
    for source in (tl, truth):
        for key in ("nameable", "has_level_cues", "level_cues"):
            if key in source:
                value = source[key]
                return bool(value) if not isinstance(value, Mapping) else any(value.values())
    return True


def evaluate_grades(predicted: Sequence[Any], truths: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Compare predicted levels/grades with truth, series by series.

    Parameters
    ----------
    predicted
        One entry per series: a :class:`ai.results.SeriesResult`, its ``to_dict()`` form,
        or a list of level objects/dicts. Levels need ``level``, ``slice_indices`` and
        ``stenosis`` (``schizas``, ``dsca_mm2``, ``rootlets``, ``severity``); ``mid_slice``
        is used when present.
    truths
        One dict per series with ``levels``: a list of dicts with ``level``,
        ``slice_indices``, optionally ``mid_slice``, and ``schizas``, ``dsca_mm2``,
        ``rootlets``. A ``nameable: false`` (per level or per series) marks studies
        without anatomical level cues: they count only for "left unnamed".

    Returns
    -------
    dict
        JSON-ready metrics (see module docstring).
    """
    if len(predicted) != len(truths):
        raise ValueError(f"{len(predicted)} predictions for {len(truths)} truths")
    n_truth = n_pred = n_matched = 0
    name_total = name_correct = name_given = name_given_correct = 0
    no_cue_total = no_cue_unnamed = 0
    sch_t: list[str] = []
    sch_p: list[str] = []
    sev_ok: list[bool] = []
    root_ok: list[bool] = []
    cord_truth = cord_found = 0
    dsca_err: list[float] = []
    dsca_grade_ok: list[bool] = []
    from ai.grading import dsca_grade, severity_from_schizas

    for result, truth in zip(predicted, truths, strict=True):
        preds = _pred_levels(result)
        tlevels = _truth_levels(truth)
        n_truth += len(tlevels)
        n_pred += len(preds)
        for ti, pi in _match(preds, tlevels):
            n_matched += 1
            tl, p = tlevels[ti], preds[pi]
            if _has_cues(truth, tl):
                name_total += 1
                name_correct += int(p.level == tl.get("level"))
                if p.level is not None:
                    name_given += 1
                    name_given_correct += int(p.level == tl.get("level"))
            else:
                no_cue_total += 1
                no_cue_unnamed += int(p.level is None)
            t_sch = tl.get("schizas")
            if t_sch is not None and p.schizas is not None:
                sch_t.append(str(t_sch)[:1])
                sch_p.append(p.schizas)
                sev_ok.append(p.severity == severity_from_schizas(str(t_sch)))
            t_root = tl.get("rootlets")
            if t_root is not None and p.rootlets is not None:
                root_ok.append(p.rootlets == t_root)
                if t_root == "cord":
                    cord_truth += 1
                    cord_found += int(p.rootlets == "cord")
            t_dsca = tl.get("dsca_mm2")
            if t_dsca is not None and p.dsca is not None and float(t_dsca) > 0:
                dsca_err.append(abs(p.dsca - float(t_dsca)) / float(t_dsca) * 100.0)
                dsca_grade_ok.append(dsca_grade(p.dsca) == dsca_grade(float(t_dsca)))
    m = confusion_matrix(sch_t, sch_p, SCHIZAS_GRADES)
    n_sch = int(m.sum())
    out: dict[str, Any] = {
        "levels": {
            "truth": n_truth,
            "predicted": n_pred,
            "matched": n_matched,
            "recall": round(n_matched / n_truth, 4) if n_truth else None,
            "spurious": n_pred - n_matched,
        },
        "naming": {
            "with_cues": name_total,
            "accuracy": round(name_correct / name_total, 4) if name_total else None,
            "named": name_given,
            "precision_of_named": round(name_given_correct / name_given, 4) if name_given else None,
            "without_cues": no_cue_total,
            "unnamed_without_cues": round(no_cue_unnamed / no_cue_total, 4) if no_cue_total else None,
        },
        "schizas": {
            "n": n_sch,
            "accuracy": round(float(np.trace(m)) / n_sch, 4) if n_sch else None,
            "macro_f1": round(macro_f1(m), 4) if n_sch else None,
            "kappa": round(cohen_kappa(m), 4) if n_sch else None,
            "kappa_quadratic": round(cohen_kappa(m, "quadratic"), 4) if n_sch else None,
            "classes": list(SCHIZAS_GRADES),
            "confusion": m.tolist(),
        },
        "severity_accuracy": round(float(np.mean(sev_ok)), 4) if sev_ok else None,
        "rootlets": {
            "n": len(root_ok),
            "accuracy": round(float(np.mean(root_ok)), 4) if root_ok else None,
            "cord_levels": cord_truth,
            "cord_recall": round(cord_found / cord_truth, 4) if cord_truth else None,
        },
        "dsca_abs_pct_error": _summary(dsca_err),
        "dsca_grade_agreement": round(float(np.mean(dsca_grade_ok)), 4) if dsca_grade_ok else None,
    }
    return out
