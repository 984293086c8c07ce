"""Fresh randomised contrasts from tissue maps (ai.domain_randomise) and their use in training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.card import ModelCard, Normalisation
from ai.domain_randomise import OUTSIDE, labels_of_tissue, randomise_images, tissue_to_model
from ai.labels import Label
from ai.model_grid import labels_to_model, slice_grid
from ai.phantom import render_slice, sample_subject
from ai.phantom.tissues import TISSUE_TO_LABEL, Tissue

NORM = Normalisation()
SHIPPED = Path(__file__).resolve().parents[2] / "ai" / "weights"


def _tissue_map() -> torch.Tensor:
    """Two tissues in a disc-like ring inside a field of view, padding on the right."""
    t = np.full((64, 64), int(Tissue.VISCERAL_FAT), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 30, xx - 26)
    t[r < 14] = int(Tissue.ANNULUS)
    t[r < 8] = int(Tissue.NUCLEUS)
    t[:, 56:] = OUTSIDE
    return torch.from_numpy(t)


def test_tissue_map_on_the_model_grid_matches_the_labels_and_marks_the_padding() -> None:
    rng = np.random.default_rng(5)
    subject = sample_subject(rng, levels=("L4-L5",))
    ph = render_slice(subject, "L4-L5", "disc", "realistic", rng, pixel_spacing=0.9,
                      matrix=(192, 192), rotation_deg=12.0)
    card = ModelCard.load(SHIPPED / "seg-card.json")
    grid = slice_grid(np.array([1.0, 0, 0, 0, 1.0, 0]), ph.pixel_spacing, ph.image.shape, card)
    tissue = tissue_to_model(ph.tissue, grid)
    labels = labels_to_model(ph.labels, grid)
    inside = tissue != OUTSIDE
    assert 0.05 < (~inside).mean() < 0.6  # a 173 mm field of view on a 224 mm grid
    assert np.array_equal(TISSUE_TO_LABEL[tissue[inside]], labels[inside])
    assert (labels[~inside] == 0).all()
    assert np.array_equal(labels_of_tissue(tissue), labels)  # what phantom_pool stores


def test_randomised_images_are_normalised_padded_and_reproducible() -> None:
    tissue = _tissue_map()
    batch = torch.stack([tissue] * 6)
    x = randomise_images(batch, torch.Generator().manual_seed(1), NORM)
    again = randomise_images(batch, torch.Generator().manual_seed(1), NORM)
    assert x.shape == (6, 1, 64, 64)
    assert torch.equal(x, again)
    valid = tissue != OUTSIDE
    assert (x[:, 0][:, ~valid] == 0).all()
    for img in x[:, 0]:
        v = img[valid]
        assert NORM.clip_low <= float(v.min()) and float(v.max()) <= NORM.clip_high
        lo, hi = torch.quantile(v, torch.tensor([0.01, 0.99]))
        assert abs(float(lo)) < 0.05 and abs(float(hi) - 1.0) < 0.05


def test_every_draw_is_a_new_contrast() -> None:
    tissue = _tissue_map()
    x = randomise_images(torch.stack([tissue] * 24), torch.Generator().manual_seed(2), NORM)[:, 0]
    nucleus = (tissue == int(Tissue.NUCLEUS)).numpy()
    annulus = ((tissue == int(Tissue.ANNULUS)).numpy()
               & (np.hypot(*np.mgrid[:64, :64] - np.array([30, 26])[:, None, None]) > 10))
    diff = np.array([float(img[nucleus].mean() - img[annulus].mean()) for img in x])
    assert (diff > 0.1).any() and (diff < -0.1).any()  # nucleus brighter in some, darker in others
    assert len(np.unique(np.round(diff, 3))) == len(diff)


def test_training_draws_fresh_images_for_phantom_slices_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ai.domain_randomise as dr
    import ai.train as train_mod

    def fake_pool(n_subjects: int, slices: int, seed_root: object, card: object,
                  with_tissue: bool = False, **_: object) -> train_mod.Pool:
        n = n_subjects * slices
        tissue = np.stack([_tissue_map().numpy()[8:56, 16:64]] * n)
        labels = labels_of_tissue(tissue)
        images = (labels == Label.DISC).astype(np.float16)
        return train_mod.Pool(images, labels, tissue if with_tissue else None)

    drawn: list[int] = []
    real_randomise = dr.randomise_images

    def spy(tissues: torch.Tensor, gen: torch.Generator, norm: Normalisation) -> torch.Tensor:
        drawn.append(len(tissues))
        assert int(tissues.max()) == OUTSIDE  # fresh images come from the pool's tissue maps
        return real_randomise(tissues, gen, norm)

    monkeypatch.setattr(train_mod, "phantom_pool", fake_pool)
    monkeypatch.setattr(dr, "randomise_images", spy)
    torch.set_num_threads(1)
    cfg = train_mod.TrainConfig(steps=3, batch_size=4, crop=32, input_size=48, channels=(4, 8),
                                pool_subjects=1, slices_per_subject=4, val_subjects=1,
                                val_slices_per_subject=2, val_every=3, synth_fraction=1.0)
    assert train_mod._pool_key(cfg)["tissue"] is True
    real = (np.zeros((2, 48, 48), np.float32), np.zeros((2, 48, 48), np.uint8))
    train_mod.train(cfg, tmp_path, device=torch.device("cpu"), real_slices=real)
    assert drawn and sum(drawn) <= 3 * 4
    with np.load(tmp_path / "pool.npz") as z:
        assert "tissues" in z.files
    with pytest.raises(ValueError):
        dataclasses.replace(cfg, synth_fraction=1.5)
