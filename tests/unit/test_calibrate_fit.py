"""`lumbar-node calibrate`: offsets that remove a known area bias, and the card it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.calibrate import STRIDE, CalibrationSet, counts, fit_offsets, native_samples
from ai.card import CARD_FILE, load_model
from ai.inference import to_native
from ai.labels import NUM_CLASSES, Label
from ai.model_grid import SliceGrid
from node.commands.calibrate import next_version, parse_classes

BG, BODY, DISC, PSOAS = (int(Label.BACKGROUND), int(Label.VERTEBRAL_BODY), int(Label.DISC),
                         int(Label.PSOAS_LEFT))


def _ramp_set(shift: float, *, cls: int = BODY, slope: float = 0.1, width: int = 100) -> CalibrationSet:
    """Body truly in columns 0-49 of every row; its logit crosses the background's at 49.5 + shift/slope.

    So the model predicts ``shift / slope`` columns too many of it, and an offset of exactly
    ``shift`` puts the boundary back.
    """
    x = torch.arange(width, dtype=torch.float32)
    logits = torch.full((3, NUM_CLASSES, 8, width), -20.0)
    logits[:, BG] = 0.0
    logits[:, cls] = -(x - 49.5) * slope + shift
    truth = torch.zeros((3, 8, width), dtype=torch.int64)
    truth[:, :, :50] = cls
    inside = torch.ones((3, 8, width), dtype=torch.bool)
    inside[:, 0, :] = False  # one row outside the field of view: not collected
    flat = logits.permute(0, 2, 3, 1)[inside].to(torch.float16)
    return CalibrationSet(flat, truth[inside], n_slices=3, n_cases=3)


@pytest.mark.parametrize("label", [Label.VERTEBRAL_BODY, Label.PSOAS_LEFT])  # bisection / closed form
def test_fit_finds_the_offset_that_removes_a_known_prior_shift(label: Label) -> None:
    cls = int(label)
    data = _ramp_set(shift=1.0, cls=cls)
    raw = counts(data, torch.zeros(NUM_CLASSES))
    assert raw.true[cls] == 3 * 7 * 50 and raw.pred[cls] == 3 * 7 * 60  # 10 columns too many
    fit = fit_offsets(data, [label])
    assert fit.offsets[label.name] == pytest.approx(1.0, abs=0.06)
    row = fit.table[label.name]
    assert row["bias_pct_before"] == pytest.approx(20.0)
    assert row["bias_pct_after"] == 0.0 and row["dice_after"] == 1.0
    # an under-predicted class gets a negative offset
    assert fit_offsets(_ramp_set(shift=-0.7, cls=cls), [label]).offsets[label.name] == pytest.approx(-0.7, abs=0.06)


def test_disc_body_identity_errors_do_not_pull_the_column_offsets() -> None:
    """Body predicted on true disc is the column refiner's business: the body's offset ignores it."""
    data = _ramp_set(shift=1.0)
    logits, truth = data.logits.clone(), data.truth.clone()
    swapped = torch.arange(truth.shape[0]) % 7 == 0  # every 7th pixel: true disc, confidently called body
    truth[swapped] = DISC
    logits[swapped] = -20.0
    logits[swapped, BODY] = 8.0
    data = CalibrationSet(logits, truth, n_slices=3, n_cases=3)
    raw = counts(data, torch.zeros(NUM_CLASSES))
    assert raw.swapped[BODY] == int(swapped.sum()) and raw.swapped[DISC] == 0
    column = torch.arange(truth.shape[0]) % 100
    # the ring of 10 columns too many, less the ring pixels that are now true disc (identity errors)
    assert raw.excess(BODY) == 3 * 7 * 10 - int((swapped & (column >= 50) & (column < 60)).sum())
    fit = fit_offsets(data, [Label.VERTEBRAL_BODY, Label.DISC])
    assert fit.offsets["VERTEBRAL_BODY"] == pytest.approx(1.0, abs=0.1)
    assert fit.offsets["DISC"] == pytest.approx(0.0, abs=0.01)  # nothing of it can move: left alone


def test_classes_not_fitted_keep_their_start_offsets_and_absent_classes_are_refused() -> None:
    data = _ramp_set(shift=1.0)
    start = torch.zeros(NUM_CLASSES)
    start[PSOAS] = -0.3
    fit = fit_offsets(data, [Label.VERTEBRAL_BODY], start=start)
    assert set(fit.offsets) == {"VERTEBRAL_BODY"}
    with pytest.raises(ValueError, match="PSOAS_LEFT"):
        fit_offsets(data, [Label.PSOAS_LEFT])


@pytest.mark.parametrize("angle_deg", [0.0, 17.0])
def test_native_samples_give_the_labels_the_pipeline_gives_on_the_native_grid(angle_deg: float) -> None:
    """The fit must count the pixels :func:`to_native` labels: same interpolation, same field of view."""
    gen = torch.Generator().manual_seed(3)
    coarse = torch.randn(NUM_CLASSES, 12, 12, generator=gen) * 4
    logits = torch.nn.functional.interpolate(coarse[None], size=(64, 64), mode="bilinear")[0]
    a = np.deg2rad(angle_deg)
    # 1.67 native pixels per model pixel (native finer), rotated, field of view cropped on one side
    matrix = 1.0 / 0.6 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    grid = SliceGrid(matrix=matrix, native_shape=(90, 120), model_shape=(64, 64))
    native = to_native(logits, grid)
    sampled, inside = native_samples(logits, grid)
    strided = native[::STRIDE, ::STRIDE]
    assert inside.shape == strided.shape and 0 < inside.sum() < inside.size
    assert (strided[~inside] == 0).all(), "outside the model's field the pipeline gives background"
    agree = (sampled.argmax(dim=1).numpy() == strided[inside]).mean()
    assert agree > 0.999, f"only {agree:.4f} of the native pixels agree with to_native"


def test_version_and_class_arguments() -> None:
    assert next_version("1.2.1") == "1.2.2"
    assert next_version("2.0.9") == "2.0.10"
    with pytest.raises(ValueError, match="--version"):
        next_version("beta")
    assert parse_classes(None) is None
    assert parse_classes("vertebral_body, PSOAS_LEFT") == [Label.VERTEBRAL_BODY, Label.PSOAS_LEFT]
    with pytest.raises(ValueError, match="NOT_A_LABEL"):
        parse_classes("VERTEBRAL_BODY,NOT_A_LABEL")


def test_calibrate_command_writes_a_loadable_card_with_the_fitted_offsets(tmp_path: Path) -> None:
    """End to end on one small phantom study: the card loads, carries the fit, keeps the rest."""
    from node.phantom_dicom import PhantomOptions, write_phantom_studies

    data = tmp_path / "studies"
    write_phantom_studies(data, PhantomOptions(seed=5107, subjects=1, mode="realistic", matrix=192,
                                               spacing=1.2, sagittal=False, distractor=False))
    out = tmp_path / "calibrated"
    cmd = [sys.executable, "-m", "node.cli", "calibrate", "--data", str(data), "--out", str(out),
           "--classes", "VERTEBRAL_BODY", "--threads", "1", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, shipped = load_model(None)
    model, card = load_model(out)  # checksum and card validated
    assert card.version == next_version(shipped.version)
    offsets = card.calibration["logit_offsets"]
    fitted = card.calibration["fit"]["offsets"]["VERTEBRAL_BODY"]
    assert offsets["VERTEBRAL_BODY"] == fitted and abs(fitted) < 5.0
    assert abs(card.calibration["fit"]["table"]["VERTEBRAL_BODY"]["bias_pct_after"]) < 1.0
    assert card.calibration["fit"]["grid"] == "native"
    for name in ("POSTERIOR_ELEMENTS", "PSOAS_LEFT", "PSOAS_RIGHT"):  # not fitted: kept from the input card
        assert offsets[name] == shipped.calibration["logit_offsets"][name]
    assert card.calibration["previous"]["version"] == shipped.version
    # calibration settings the fit does not own are kept (the series disc assignment's floor)
    assert card.disc_evidence_floor() == shipped.disc_evidence_floor() is not None
    assert "note" not in card.calibration  # the input's note described the input's fit
    assert card.weights_sha256 == shipped.weights_sha256
    assert "VERTEBRAL_BODY" in done.stdout
    # a folder without labelled studies is a clear error, not an empty card
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run([*cmd[:5], str(empty), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no calibration cases" in bad.stderr
    assert not (tmp_path / "x" / CARD_FILE).exists()
