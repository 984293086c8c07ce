"""Training loop: checkpoints, exact resume, best/ weights with a valid card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ai.train as train_mod
from ai.card import load_model
from ai.labels import Label
from ai.train import TrainConfig, augment, train

CFG = TrainConfig(steps=4, batch_size=2, crop=32, input_size=48, channels=(4, 8),
                  pool_subjects=1, slices_per_subject=4, val_subjects=1,
                  val_slices_per_subject=2, val_every=2, seed=3)


def _fake_pool(n_subjects: int, slices: int, seed_root: Any, card: Any, **_: Any) -> train_mod.Pool:
    rng = np.random.default_rng(list(seed_root))
    n = n_subjects * slices
    size = card.input_size[0]
    labels = np.zeros((n, size, size), np.uint8)
    labels[:, 10:30, 5:20] = Label.PSOAS_RIGHT
    labels[:, 10:30, 28:43] = Label.PSOAS_LEFT
    images = (labels > 0).astype(np.float16) + rng.normal(0, 0.1, labels.shape).astype(np.float16)
    return train_mod.Pool(images, labels)


@pytest.fixture(autouse=True)
def _no_phantom_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_mod, "phantom_pool", _fake_pool)
    torch.set_num_threads(1)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    train(CFG, tmp_path / "a", device=torch.device("cpu"))
    import dataclasses

    half = dataclasses.replace(CFG)
    train(half, tmp_path / "b", device=torch.device("cpu"), max_minutes=0.0)  # stops after step 1
    train(CFG, tmp_path / "b", device=torch.device("cpu"), resume=True)
    a = load_file(str(tmp_path / "a" / "last" / "seg.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "seg.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, card = load_model(tmp_path / "a" / "best")
    assert card.training["config"]["seed"] == 3
    assert "validation_mean_dice" in card.metrics


def test_fine_tune_card_records_the_stages_that_made_its_start(tmp_path: Path) -> None:
    import dataclasses

    train(CFG, tmp_path / "first", device=torch.device("cpu"))
    _, first = load_model(tmp_path / "first" / "best")
    second = dataclasses.replace(CFG, seed=4, init_from=str(tmp_path / "first" / "best"))
    train(second, tmp_path / "second", device=torch.device("cpu"))
    third = dataclasses.replace(CFG, seed=5, init_from=str(tmp_path / "second" / "best"))
    train(third, tmp_path / "third", device=torch.device("cpu"))
    _, s2 = load_model(tmp_path / "second" / "best")
    _, card = load_model(tmp_path / "third" / "best")
    stages = card.training["previous_stages"]
    assert [st["config"]["seed"] for st in stages] == [3, 4]  # oldest first
    assert stages[0]["weights_sha256"] == first.weights_sha256
    assert stages[1]["weights_sha256"] == s2.weights_sha256
    assert card.training["init_weights"]["weights_sha256"] == s2.weights_sha256
    assert card.training["config"]["seed"] == 5 and "calibration" not in stages[1]


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    import dataclasses

    train(CFG, tmp_path, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="another configuration"):
        train(dataclasses.replace(CFG, lr=1e-4), tmp_path, device=torch.device("cpu"), resume=True)


def test_augment_keeps_labels_aligned_and_never_mirrors() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros((4, 64, 64), dtype=torch.long)
    labels[:, 20:40, 8:24] = Label.PSOAS_RIGHT  # image left half
    labels[:, 20:40, 40:56] = Label.PSOAS_LEFT  # image right half
    images = (labels > 0).float()[:, None]
    x, y = augment(images, labels, 48, gen)
    assert x.shape == (4, 1, 48, 48) and y.shape == (4, 48, 48)
    for b in range(4):
        cols_l = torch.nonzero(y[b] == Label.PSOAS_LEFT)[:, 1].float()
        cols_r = torch.nonzero(y[b] == Label.PSOAS_RIGHT)[:, 1].float()
        if len(cols_l) and len(cols_r):
            assert cols_l.mean() > cols_r.mean()


def test_pool_sampling_options_validated_and_keyed() -> None:
    import dataclasses

    from ai.train import _pool_key

    assert set(_pool_key(CFG)) == {"pool_version", "seed", "pool_subjects", "slices_per_subject",
                                   "input_spacing_mm", "input_size"}  # old cached pools stay valid
    severe = dataclasses.replace(CFG, severe_fraction=0.4, randomised_fraction=0.6)
    assert _pool_key(severe)["severe_fraction"] == 0.4
    assert _pool_key(severe)["randomised_fraction"] == 0.6
    for bad in ({"severe_fraction": 1.5}, {"randomised_fraction": -0.1}, {"canal_weight": -1.0},
                {"disc_weight": -1.0}):
        with pytest.raises(ValueError):
            dataclasses.replace(CFG, **bad)  # type: ignore[arg-type]


def test_class_weights_of_the_loss() -> None:
    import dataclasses

    from ai.train import class_weights

    plain = class_weights(dataclasses.replace(CFG, small_structure_weight=5.0))
    assert plain[int(Label.VERTEBRAL_BODY)] == plain[int(Label.DURAL_SAC)] == 5.0
    assert plain[int(Label.DISC)] == plain[int(Label.PSOAS_LEFT)] == 1.0  # old runs unchanged
    tuned = class_weights(
        dataclasses.replace(CFG, small_structure_weight=5.0, canal_weight=8.0, disc_weight=5.0)
    )
    assert tuned[int(Label.DISC)] == tuned[int(Label.VERTEBRAL_BODY)] == 5.0
    assert tuned[int(Label.DURAL_SAC)] == tuned[int(Label.EPIDURAL_SPACE)] == 8.0
    assert tuned[int(Label.PSOAS_LEFT)] == 1.0


def test_augment_mirrors_with_the_sides_swapped() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros((4, 64, 64), dtype=torch.long)
    labels[:, 20:40, 8:24] = Label.PSOAS_RIGHT  # image left half
    labels[:, 20:40, 40:56] = Label.PSOAS_LEFT  # image right half
    labels[:, 44:50, 30:34] = Label.DURAL_SAC  # midline: keeps its label
    images = (labels == Label.PSOAS_RIGHT).float()[:, None]  # only the right psoas is bright
    x, y = augment(images, labels, 48, gen, mirror_fraction=1.0)
    for b in range(4):
        cols_l = torch.nonzero(y[b] == Label.PSOAS_LEFT)[:, 1].float()
        cols_r = torch.nonzero(y[b] == Label.PSOAS_RIGHT)[:, 1].float()
        assert len(cols_l) and len(cols_r) and (y[b] == Label.DURAL_SAC).any()
        # still anatomically sided (the right on the image's left), and the image follows
        # the labels: the bright muscle is now the left one
        assert cols_l.mean() > cols_r.mean()
        assert x[b, 0][y[b] == Label.PSOAS_LEFT].mean() > x[b, 0][y[b] == Label.PSOAS_RIGHT].mean() + 0.3
