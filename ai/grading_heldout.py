"""Held-out phantom evaluation of level detection, naming and stenosis grades.

Builds axial series the way a lumbar protocol acquires them (one angled block of
parallel slices per disc, tilted with the disc, a few millimetres apart, the outer slices
through the endplates / vertebral bodies), from :mod:`ai.phantom` subjects whose seeds
are disjoint from the grader's training seeds, runs :func:`ai.levels.find_levels` and
:class:`ai.grading.StenosisGrader`, and scores them with
:func:`ai.evaluate_grades.evaluate_grades`.

The label maps come from the phantom truth by default (so the grades are judged apart
from segmentation error); pass ``segment`` to grade on a model's labels, or on truth
labels warped by :func:`jittered_labels` (a stand-in for segmentation error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ai.evaluate_grades import evaluate_grades
from ai.grading import StenosisGrader
from ai.levels import find_levels
from ai.results import LevelResult
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Base seed of held-out series (disjoint from ai.train_grader.TRAIN_SEED).
SERIES_SEED = 91_250_001
#: Level sets drawn per study, with weights: the usual L3-L4..L5-S1 protocol, the whole
#: lumbar spine, and an upper protocol without the lumbosacral level.
LEVEL_SETS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("L3-L4", "L4-L5", "L5-S1"), 0.5),
    (("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"), 0.25),
    (("L1-L2", "L2-L3", "L3-L4"), 0.125),
    (("L2-L3", "L3-L4", "L4-L5"), 0.125),
)
#: Share of series drawn as a continuous untilted stack instead of angled blocks.
CONTINUOUS_FRACTION = 0.25
#: Randomised mode: pixel spacing range (mm) and field of view (mm) of a series.
RANDOMISED_SPACING_MM = (0.45, 0.9)
RANDOMISED_FOV_MM = 260.0


@dataclass
class PhantomSeries:
    """One synthetic axial series with its truth (``truth`` as ``evaluate_grades`` reads it)."""

    volume: Volume
    labels: np.ndarray
    truth: dict[str, Any]


def phantom_series(
    index: int,
    *,
    seed: int = SERIES_SEED,
    mode: str = "realistic",
    levels: Sequence[str] | None = None,
    stenosis: str = "random",
    continuous: bool | None = None,
) -> PhantomSeries:
    """Draw subject ``index`` and render its axial series with the phantom study plans.

    The layout is one tilted block of 3-5 slices per disc (:func:`ai.phantom.study.plan_blocks`)
    or, for one series in four (or when ``continuous`` is set), a continuous untilted stack
    (:func:`ai.phantom.study.plan_continuous`), with the in-plane rotation and field-of-view
    shift that ``lumbar-node phantom`` draws.
    """
    from ai.phantom import render_slice, sample_subject
    from ai.phantom.study import plan_blocks, plan_continuous

    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if levels is None:
        weights = np.array([w for _, w in LEVEL_SETS])
        levels = LEVEL_SETS[int(rng.choice(len(LEVEL_SETS), p=weights / weights.sum()))][0]
    if continuous is None:
        continuous = bool(rng.random() < CONTINUOUS_FRACTION)
    subject = sample_subject(rng, stenosis=stenosis, levels=tuple(levels))
    per_block = int(rng.integers(3, 6))
    plan = plan_continuous(subject) if continuous else plan_blocks(subject, per_block)
    rotation = float(rng.normal(0.0, 2.0))
    fov_shift = (float(rng.normal(0.0, 3.0)), 8.0 + float(rng.normal(0.0, 3.0)))
    # One acquisition per series: in randomised mode, render_slice would otherwise draw
    # a new pixel spacing, field of view and contrast for every slice (no scanner does).
    grid: dict[str, Any] = {}
    if mode == "randomised":
        spacing_mm = float(rng.uniform(*RANDOMISED_SPACING_MM))
        side = int(np.ceil(RANDOMISED_FOV_MM / spacing_mm / 16.0)) * 16
        grid = {"pixel_spacing": spacing_mm, "matrix": (side, side),
                "contrast_seed": int(rng.integers(2**31))}
    images: list[np.ndarray] = []
    label_maps: list[np.ndarray] = []
    positions: list[tuple[float, float, float]] = []
    orientations: list[tuple[float, ...]] = []
    slice_truth: list[dict[str, Any]] = []
    spacing: tuple[float, float] = (1.0, 1.0)
    for ps in plan:
        sl = render_slice(subject, ps.level, ps.kind, mode, rng, rotation_deg=rotation,
                          offset_mm=ps.offset_mm, fov_shift_mm=fov_shift, **grid)
        spacing = (float(sl.pixel_spacing[0]), float(sl.pixel_spacing[1]))
        positions.append(ps.position_of_first_pixel(sl.canal_centre_px, spacing))
        orientations.append((*ps.row_dir, *ps.col_dir))
        images.append(sl.image)
        label_maps.append(sl.labels)
        slice_truth.append(sl.truth)
    truth_levels: list[dict[str, Any]] = []
    for name in subject.level_names:
        mine = [k for k, t in enumerate(slice_truth) if t["level"] == name and t["kind"] == "disc"]
        if not mine:
            continue
        mid = min(mine, key=lambda k: abs(slice_truth[k]["offset_mm"]))
        t = slice_truth[mid]
        truth_levels.append(
            {
                "level": name,
                "slice_indices": [k for k in mine if slice_truth[k]["through_disc"]] or [mid],
                "mid_slice": mid,
                "schizas": t["schizas"],
                "schizas_subgrade": t["schizas_subgrade"],
                "dsca_mm2": t["dsca_mm2"],
                "rootlets": t["rootlets"],
            }
        )
    n = len(images)
    volume = Volume(
        pixels=np.stack(images).astype(np.float32),
        pixel_spacing=spacing,
        positions=np.array(positions, dtype=float),
        orientations=np.array(orientations, dtype=float),
        slice_uids=tuple(f"2.25.{seed}.{index}.{i}" for i in range(n)),
        series_instance_uid=f"2.25.{seed}.{index}",
    )
    cues = {
        "pelvis": "L5-S1" in subject.levels,
        "cord": any(t["rootlets"] == "cord" for t in truth_levels),
    }
    truth = {
        "levels": truth_levels,
        "cues": cues,
        "layout": "continuous" if continuous else f"blocks of {per_block}",
    }
    return PhantomSeries(volume, np.stack(label_maps).astype(np.uint8), truth)


def jittered_labels(amplitude_px: float, seed: int = 0) -> Callable[[Volume, np.ndarray], np.ndarray]:
    """A stand-in for segmentation error: truth labels warped by a smooth random field.

    Each slice's label map is resampled (nearest neighbour) through a displacement field
    of about ``amplitude_px`` pixels that varies over ~10 pixels, so boundaries move by up
    to a pixel or two locally, as a good segmentation's would (Dice ~0.9 on the sac).
    """
    rng = np.random.default_rng(seed)

    def warp(volume: Volume, labels: np.ndarray) -> np.ndarray:
        out = np.empty_like(labels)
        rows, cols = labels.shape[1:]
        grid = np.mgrid[0:rows, 0:cols].astype(float)
        for k in range(labels.shape[0]):
            coarse = rng.normal(0.0, amplitude_px, size=(2, rows // 10 + 2, cols // 10 + 2))
            field = np.stack([ndimage.zoom(c, (rows / c.shape[0], cols / c.shape[1]), order=3)[:rows, :cols] for c in coarse])
            out[k] = ndimage.map_coordinates(labels[k], grid + field, order=0, mode="nearest")
        return out

    return warp


def analyse_series(
    series: PhantomSeries,
    grader: StenosisGrader,
    segment: Callable[[Volume, np.ndarray], np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Levels and grades of one series as level dicts (``evaluate_grades`` input).

    ``segment(volume, truth_labels)`` replaces the truth labels (a model, or
    :func:`jittered_labels`); default: the phantom truth.
    """
    labels = segment(series.volume, series.labels) if segment is not None else series.labels
    out: list[dict[str, Any]] = []
    for lv in find_levels(labels, series.volume):
        st = grader.grade(series.volume, labels, lv)
        res = LevelResult(lv.level, lv.position, lv.slice_indices, lv.confidence, stenosis=st)
        d = res.to_dict()
        d["mid_slice"] = lv.mid_slice
        out.append(d)
    return out


def evaluate_heldout(
    n_series: int,
    grader: StenosisGrader,
    *,
    seed: int = SERIES_SEED,
    segment: Callable[[Volume, np.ndarray], np.ndarray] | None = None,
    mode: str = "realistic",
    label_source: str | None = None,
) -> dict[str, Any]:
    """Metrics over ``n_series`` held-out series, overall and by naming cue."""
    preds: list[list[dict[str, Any]]] = []
    truths: list[dict[str, Any]] = []
    for i in range(n_series):
        s = phantom_series(i, seed=seed, mode=mode)
        preds.append(analyse_series(s, grader, segment))
        truths.append(s.truth)
    out: dict[str, Any] = {
        "series": n_series,
        "seed": seed,
        "mode": mode,
        "labels": label_source or ("phantom truth" if segment is None else "segmentation"),
        "all": evaluate_grades(preds, truths),
    }
    with_cue = [k for k, t in enumerate(truths) if t["cues"]["pelvis"] or t["cues"]["cord"]]
    without = [k for k in range(n_series) if k not in with_cue]
    for key, idx in (("pelvis_or_cord_cue", with_cue), ("muscle_cue_only", without)):
        if idx:
            out[key] = evaluate_grades([preds[k] for k in idx], [truths[k] for k in idx])["naming"]
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The held-out table of ``docs/grading.md`` from :func:`evaluate_heldout` output."""
    a = result["all"]
    sch = a["schizas"]
    nm = a["naming"]
    d = a["dsca_abs_pct_error"]
    rows = [
        ("series / levels (truth)", f"{result['series']} / {a['levels']['truth']}"),
        ("label maps", result["labels"]),
        ("levels found (recall) / spurious", f"{a['levels']['recall']} / {a['levels']['spurious']}"),
        ("level naming accuracy (all levels)", f"{nm['accuracy']}"),
        ("levels named / precision of names", f"{nm['named']} / {nm['precision_of_named']}"),
    ]
    for key, label in (("pelvis_or_cord_cue", "naming, series with iliac or cord cue"),
                       ("muscle_cue_only", "naming, series with muscle cue only")):
        if key in result:
            rows.append((label, f"{result[key]['accuracy']} (n={result[key]['with_cues']})"))
    rows += [
        ("Schizas accuracy", f"{sch['accuracy']}"),
        ("Schizas macro-F1", f"{sch['macro_f1']}"),
        ("Cohen's kappa (unweighted / quadratic)", f"{sch['kappa']} / {sch['kappa_quadratic']}"),
        ("severity accuracy", f"{a['severity_accuracy']}"),
        ("rootlets vs cord accuracy (cord levels, recall)",
         f"{a['rootlets']['accuracy']} ({a['rootlets']['cord_levels']}, {a['rootlets']['cord_recall']})"),
        ("DSCA abs. error % (mean / p95 / max)", f"{d.get('mean')} / {d.get('p95')} / {d.get('max')}"),
        ("DSCA grade agreement", f"{a['dsca_grade_agreement']}"),
    ]
    lines = ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    m = sch["confusion"]
    lines += ["", "Schizas confusion (rows truth, columns prediction):", "",
              "| | A | B | C | D |", "|---|---|---|---|---|"]
    lines += [f"| {g} | " + " | ".join(str(x) for x in m[i]) + " |" for i, g in enumerate(sch["classes"])]
    return "\n".join(lines)
