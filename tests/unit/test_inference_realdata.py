"""Real-data folder format (NIfTI pair): geometry, label alignment, training slices."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ai.card import ModelCard, label_map
from ai.labels import Label
from ai.model import UNetConfig
from ai.realdata import RealDataError, iter_cases, load_training_slices


def _write_case(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    data = np.zeros((40, 30, 3), np.float32)  # (i = columns, j = rows, k = slices)
    labels = np.zeros((40, 30, 3), np.uint8)
    data[25:35, 5:12, 1] = 500.0
    labels[25:35, 5:12, 1] = Label.MULTIFIDUS_LEFT
    affine = np.diag([-0.8, -0.6, 4.0, 1.0])  # RAS: i runs to the right... negated = LPS +x
    affine[:3, 3] = [10.0, 20.0, -30.0]
    nib.save(nib.Nifti1Image(data, affine), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / "labels.nii.gz"))
    return data, labels


def test_nifti_case_geometry_and_labels(tmp_path: Path) -> None:
    data, labels = _write_case(tmp_path / "case1")
    (case,) = list(iter_cases(tmp_path))
    vol = case.volume
    assert vol.pixels.shape == (3, 30, 40)  # rows = second array axis
    assert vol.pixel_spacing == pytest.approx((0.6, 0.8))
    # RAS -x is LPS +x: the first array axis runs to the patient's left, the second posterior
    assert np.allclose(vol.orientations[0], [1, 0, 0, 0, 1, 0])
    assert np.allclose(vol.positions[:, 2], [-30.0, -26.0, -22.0])
    assert np.array_equal(case.truth_labels[1], labels[:, :, 1].T)
    assert np.array_equal(vol.pixels[1] > 0, case.truth_labels[1] > 0)
    assert case.mode == "real"


def test_training_slices_only_from_labelled_slices(tmp_path: Path) -> None:
    _write_case(tmp_path / "case1")
    card = ModelCard(name="t", version="0", labels=label_map(), input_spacing_mm=1.0,
                     input_size=(32, 32), architecture=UNetConfig(channels=(4, 8)).to_dict())
    images, labels = load_training_slices(tmp_path, card)
    assert images.shape == (1, 32, 32) and labels.shape == (1, 32, 32)
    assert (labels == Label.MULTIFIDUS_LEFT).sum() > 20


def test_malformed_case_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), 40, np.uint8), np.eye(4)), str(folder / "labels.nii.gz"))
    with pytest.raises(RealDataError, match="label values"):
        list(iter_cases(tmp_path))
