"""Regression guard: the shipped model on a fixed phantom series keeps a loose Dice floor."""

from __future__ import annotations

import numpy as np
import pytest

from ai.evaluate import SegmentationMetrics
from ai.phantom import render_slice, sample_subject
from ai.pipeline import Analyzer
from ai.volume import Volume

#: Loose floors (the held-out table in docs/evaluation.md is the real measure).
FLOORS = {
    "disc": 0.80,
    "dural_sac": 0.70,
    "psoas_left": 0.75,
    "psoas_right": 0.75,
    "erector_spinae_left": 0.75,
    "erector_spinae_right": 0.75,
    "multifidus_left": 0.75,
    "multifidus_right": 0.75,
}


def _series() -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(20261122)
    subject = sample_subject(rng, levels=("L3-L4", "L4-L5"))
    plan = [("L3-L4", "disc", "realistic"), ("L4-L5", "disc", "randomised"),
            ("L4-L5", "disc", "realistic"), ("L4-L5", "mid", "realistic")]
    images, labels = [], []
    for level, kind, mode in plan:
        s = render_slice(subject, level, kind, mode, rng, pixel_spacing=0.75, matrix=(288, 288))
        images.append(s.image)
        labels.append(s.labels)
    n = len(plan)
    vol = Volume(
        pixels=np.stack(images).astype(np.float32), pixel_spacing=(0.75, 0.75),
        positions=np.array([[0.0, 0.0, 10.0 * k] for k in range(n)]),
        orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)),
        slice_uids=tuple(f"1.2.3.{k}" for k in range(n)), series_instance_uid="1.2.3",
    )
    return vol, np.stack(labels)


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(device="cpu", batch_size=4)


def test_shipped_model_reaches_the_dice_floor(analyzer: Analyzer) -> None:
    vol, truth = _series()
    labels, _flags, timings = analyzer.segment(vol)
    assert labels.shape == truth.shape and labels.dtype == np.uint8
    metrics = SegmentationMetrics()
    for k in range(vol.n_slices):
        metrics.add(labels[k], truth[k], vol.pixels[k], vol.pixel_spacing)
    report = metrics.report()["all"]
    low = {k: report[k]["dice_pooled"] for k, floor in FLOORS.items()
           if (report[k]["dice_pooled"] or 0.0) < floor}
    assert not low, f"Dice below floor: {low}"
    assert set(timings) == {"pre_process", "predict", "post_process", "column_refine", "refine"}


def test_segmentation_is_deterministic(analyzer: Analyzer) -> None:
    vol, _ = _series()
    a, _, _ = analyzer.segment(vol)
    b, _, _ = analyzer.segment(vol)
    assert np.array_equal(a, b)


def test_the_column_refiner_keeps_a_disc_the_coarse_model_is_near_certain_of(analyzer: Analyzer) -> None:
    """Three clear disc slices in one block: the refiner alone turns the outer ones body,
    the coarse model's disc evidence (0.999 there) keeps them disc."""
    from ai.column_refine import KEEP_DISC_EVIDENCE
    from ai.inference import pre_process, predict_native
    from ai.labels import Label
    from ai.postprocess import post_process

    vol, truth = _series()
    raw = predict_native(analyzer.model, pre_process(vol, analyzer.card), analyzer.device,
                         analyzer.batch_size, analyzer.autocast)
    coarse, _ = post_process(raw.labels, vol)
    disc_slices = [k for k in range(vol.n_slices) if np.any(truth[k] == Label.DISC)]
    assert all(raw.disc_evidence[k] >= KEEP_DISC_EVIDENCE for k in disc_slices)
    assert analyzer.column_refiner is not None
    alone, _ = analyzer.column_refiner.refine(coarse, vol)
    kept, flags = analyzer.column_refiner.refine(coarse, vol, raw.disc_evidence)
    assert any(not np.any(alone[k] == Label.DISC) for k in disc_slices)  # what the guard is for
    for k in disc_slices:
        assert np.array_equal(kept[k] == Label.DISC, coarse[k] == Label.DISC)
    assert not any("changed" in f for f in flags)


def test_every_slice_is_measured_and_levels_are_their_disc_slices_means(analyzer: Analyzer) -> None:
    from ai.measure import measure_slice

    vol, _ = _series()
    result = analyzer.analyze(vol)
    assert [sl.index for sl in result.slices] == list(range(vol.n_slices))
    assert [sl.sop_instance_uid for sl in result.slices] == list(vol.slice_uids)
    assert result.levels, "the phantom series has disc levels"
    for lv in result.levels:
        members = [sl for sl in result.slices if sl.level_position == lv.position]
        assert [sl.index for sl in members] == lv.slice_indices
        assert {sl.level for sl in members} == {lv.level}
        for key, m in lv.measurements.items():
            assert m.csa_mm2 == pytest.approx(np.mean([sl.measurements[key].csa_mm2 for sl in members]))
    outside = [sl for sl in result.slices if sl.level_position is None]
    assert outside, "the mid-vertebral slice belongs to no level"
    for sl in outside:
        assert sl.level is None
        # the figures are the slice's own, not a copy of a level's
        own = measure_slice(vol.pixels[sl.index], result.labels[sl.index], vol.pixel_spacing).values
        assert {k: m.csa_mm2 for k, m in sl.measurements.items()} == {k: m.csa_mm2 for k, m in own.items()}
    d = result.to_dict()
    assert d["schema_version"] == "1.4" and len(d["slices"]) == vol.n_slices


def test_a_field_of_view_that_cuts_the_muscles_is_flagged(analyzer: Analyzer) -> None:
    """The same series with its lateral fifths cut off (a tight field of view): the outer
    muscles reach the image edge, their areas are lower bounds, and the result says so."""
    import dataclasses

    vol, _ = _series()
    full = analyzer.analyze(vol)
    assert not [f for f in full.flags if "edge of the image" in f]
    n = vol.pixels.shape[2]
    c0, c1 = n // 5, n - n // 5
    moved = vol.positions + vol.orientations[:, :3] * (c0 * vol.pixel_spacing[1])
    cropped = dataclasses.replace(vol, pixels=np.ascontiguousarray(vol.pixels[:, :, c0:c1]), positions=moved)
    result = analyzer.analyze(cropped)
    cut = [f for f in result.flags if "edge of the image" in f]
    assert cut, result.flags
    edge = {k for lv in result.levels for k, m in lv.measurements.items() if m.at_image_edge}
    assert edge & {"erector_spinae_left", "erector_spinae_right", "psoas_left", "psoas_right"}
    from ai.measure import PLAUSIBLE_CSA_MM2  # the structures the flag names

    assert all(any(k in f for f in cut) for k in edge & set(PLAUSIBLE_CSA_MM2))
