"""Canal refiner (ai.canal_refine): patch geometry, merge rules, weights and card, shipped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.canal_refine import (
    CARD_FILE,
    SHIPPED_WEIGHTS_DIR,
    WEIGHTS_FILE,
    CanalRefiner,
    RefinerConfig,
    RefinerError,
    canal_centre,
    merge_refined,
    patch_coords,
    patch_input,
    patch_matrix,
    probs_to_native,
)
from ai.labels import Label
from ai.volume import Volume

SAC = int(Label.DURAL_SAC)
EPI = int(Label.EPIDURAL_SPACE)
IDENTITY = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius_px: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius_px**2


def _canal_slice(spacing: float = 0.7, n: int = 160) -> np.ndarray:
    """Disc behind, posterior elements around, an epidural ring and a round sac."""
    labels = np.full((n, n), int(Label.POSTERIOR_ELEMENTS), dtype=np.uint8)
    labels[:, : n // 8] = int(Label.ERECTOR_SPINAE_RIGHT)
    labels[: n // 2 - int(9.0 / spacing), :] = int(Label.DISC)  # touches the canal
    c = (n / 2, n / 2)
    labels[_disc(labels.shape, c, 9.0 / spacing)] = EPI
    labels[_disc(labels.shape, c, 7.0 / spacing)] = SAC
    return labels


@pytest.mark.parametrize("spacing", [0.35, 0.7, 1.1])
def test_patch_round_trip_keeps_sac_area(spacing: float) -> None:
    labels = _canal_slice(spacing, n=int(60 / spacing))
    cfg = RefinerConfig()
    centre = canal_centre(labels)
    assert centre is not None
    matrix = patch_matrix((spacing, spacing), cfg.mm_per_px, IDENTITY)
    x = patch_input(np.zeros(labels.shape, np.float32), labels, patch_coords(centre, matrix, cfg.patch_px))
    sac_p = torch.from_numpy(x[1])
    probs = torch.stack([1.0 - sac_p - torch.from_numpy(x[2]), sac_p, torch.from_numpy(x[2])])
    box, sampled, inside = probs_to_native(probs, labels.shape, centre, matrix)  # type: ignore[arg-type]
    back = np.zeros(labels.shape, dtype=bool)
    back[box] = (sampled.argmax(0) == 1) & inside
    true_area = float((labels == SAC).sum()) * spacing**2
    assert abs(float(back.sum()) * spacing**2 - true_area) / true_area < 0.02
    assert abs(true_area - np.pi * 7.0**2) / (np.pi * 7.0**2) < 0.05


def test_patch_frame_follows_the_patient_axes() -> None:
    """A transposed acquisition (rows along x) gives the same patch, transposed back."""
    labels = _canal_slice(0.7)
    labels[60:70, 85:95] = SAC  # an asymmetric bump on the patient's left
    cfg = RefinerConfig()
    m_std = patch_matrix((0.7, 0.7), cfg.mm_per_px, IDENTITY)
    m_tr = patch_matrix((0.7, 0.7), cfg.mm_per_px, np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
    c = canal_centre(labels)
    assert c is not None
    p_std = patch_input(np.zeros(labels.shape, np.float32), labels, patch_coords(c, m_std, cfg.patch_px))
    lt = labels.T.copy()
    ct = canal_centre(lt)
    assert ct is not None
    p_tr = patch_input(np.zeros(lt.shape, np.float32), lt, patch_coords(ct, m_tr, cfg.patch_px))
    np.testing.assert_allclose(p_std[1], p_tr[1], atol=1e-5)


def _fake_refined(labels: np.ndarray, cls: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    box = (slice(0, labels.shape[0]), slice(0, labels.shape[1]))
    return box, np.full(labels.shape, cls, dtype=np.int64), np.ones(labels.shape, dtype=bool)


def test_labels_outside_the_band_never_change() -> None:
    from scipy import ndimage

    labels = _canal_slice(0.7)
    labels[:, -12:] = int(Label.MULTIFIDUS_LEFT)
    labels[_disc(labels.shape, (80, 80), 9.0 / 0.7 + 3)] = EPI  # the canal now touches the muscle
    labels[_disc(labels.shape, (80, 80), 7.0 / 0.7)] = SAC
    canal = np.isin(labels, (SAC, EPI))
    dist = ndimage.distance_transform_edt(~canal, sampling=(0.7, 0.7))
    far = dist > 3.0
    muscle = np.isin(labels, (int(Label.ERECTOR_SPINAE_RIGHT), int(Label.MULTIFIDUS_LEFT)))
    for cls in (1, 2):  # the "refiner" calls everything dural sac, then epidural space
        box, refined, inside = _fake_refined(labels, cls)
        out = merge_refined(labels, refined, box, inside, (0.7, 0.7), band_mm=3.0, sac_band_mm=1.0)
        assert np.array_equal(out[far], labels[far])
        assert np.array_equal(out[muscle], labels[muscle])  # never, even inside the band
    near = (dist > 0) & (dist <= 3.0) & ~muscle
    assert (out[near] == EPI).all()
    # the sac grows only within sac_band_mm of the coarse sac
    box, refined, inside = _fake_refined(labels, 1)
    out = merge_refined(labels, refined, box, inside, (0.7, 0.7), band_mm=3.0, sac_band_mm=1.0)
    sac_dist = ndimage.distance_transform_edt(labels != SAC, sampling=(0.7, 0.7))
    assert (out[(out == SAC)] == SAC).all() and (sac_dist[out == SAC] <= 1.0).all()
    assert (out[(sac_dist > 0) & (sac_dist <= 1.0)] == SAC).all()


def test_removed_canal_pixels_take_the_nearest_coarse_label() -> None:
    labels = _canal_slice(0.7)
    box, refined, inside = _fake_refined(labels, 0)  # the "refiner" removes the whole canal
    out = merge_refined(labels, refined, box, inside, (0.7, 0.7))
    assert not np.isin(out, (SAC, EPI)).any()
    canal = np.isin(labels, (SAC, EPI))
    assert set(np.unique(out[canal]).tolist()) <= {int(Label.DISC), int(Label.POSTERIOR_ELEMENTS)}
    # the front of the canal borders the disc, its back the posterior elements
    n = labels.shape[0]
    assert out[n // 2 - int(9.0 / 0.7) + 2, n // 2] == int(Label.DISC)
    assert out[n // 2 + int(9.0 / 0.7) - 2, n // 2] == int(Label.POSTERIOR_ELEMENTS)


def test_one_dural_sac_after_merge() -> None:
    labels = _canal_slice(0.7)
    box, refined, inside = _fake_refined(labels, 0)
    refined = refined.copy()
    refined[labels == SAC] = 1
    refined[labels == EPI] = 2
    refined[80 - 12, 80] = 1  # a stray sac pixel in the epidural ring, apart from the sac
    out = merge_refined(labels, refined, box, inside, (0.7, 0.7), sac_band_mm=3.0)
    assert labels[80 - 12, 80] == EPI and refined[80 - 11, 80] == 2
    assert out[80 - 12, 80] == EPI
    from scipy import ndimage

    assert ndimage.label(out == SAC)[1] == 1


def test_missing_weights_flag_and_coarse_labels(tmp_path: Path) -> None:
    from ai.pipeline import Analyzer

    analyzer = Analyzer(device="cpu", batch_size=2, refiner_dir=tmp_path)
    assert analyzer.refiner is None
    assert any("canal refiner not loaded" in f for f in analyzer._setup_flags)
    with pytest.raises(FileNotFoundError):
        CanalRefiner.load(tmp_path)


def test_card_checksum_and_fields_checked(tmp_path: Path) -> None:
    shutil.copy(SHIPPED_WEIGHTS_DIR / WEIGHTS_FILE, tmp_path / WEIGHTS_FILE)
    card = json.loads((SHIPPED_WEIGHTS_DIR / CARD_FILE).read_text())
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    assert CanalRefiner.load(tmp_path).version == card["version"]
    (tmp_path / CARD_FILE).write_text(json.dumps({**card, "weights_sha256": "0" * 64}))
    with pytest.raises(RefinerError, match="checksum"):
        CanalRefiner.load(tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({**card, "classes": ["other", "dural_sac"]}))
    with pytest.raises(RefinerError, match="classes"):
        CanalRefiner.load(tmp_path)
    bad = {k: v for k, v in card.items() if k != "label_map"}
    (tmp_path / CARD_FILE).write_text(json.dumps(bad))
    with pytest.raises(RefinerError, match="label_map"):
        CanalRefiner.load(tmp_path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_shipped_refiner_keeps_or_improves_sac_dice() -> None:
    """Fixed phantom slices (realistic, 0.7 mm, three levels incl. a stenotic one)."""
    from ai.phantom import render_slice, sample_subject
    from ai.pipeline import Analyzer

    analyzer = Analyzer(device="cpu", batch_size=4, refine=False)
    refiner = CanalRefiner.load()
    rng = np.random.default_rng(np.random.SeedSequence([424242, 0]))
    subject = sample_subject(rng, stenosis="random", levels=("L3-L4", "L4-L5", "L5-S1"),
                             grade_probs={"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0})
    coarse_d: list[float] = []
    refined_d: list[float] = []
    for level in ("L3-L4", "L4-L5", "L5-S1"):
        sl = render_slice(subject, level, "disc", "realistic", rng, pixel_spacing=0.7, matrix=(320, 320))
        image = np.asarray(sl.image, np.float32)
        vol = Volume(pixels=image[None], pixel_spacing=(0.7, 0.7), positions=np.zeros((1, 3)),
                     orientations=IDENTITY[None], slice_uids=("t",), series_instance_uid="t")
        coarse = analyzer.segment(vol)[0]
        refined, n = refiner.refine(coarse, vol)
        assert n == 1
        truth = np.asarray(sl.labels) == SAC
        coarse_d.append(_dice(coarse[0] == SAC, truth))
        refined_d.append(_dice(refined[0] == SAC, truth))
        changed = coarse[0] != refined[0]
        assert np.isin(refined[0][changed], (SAC, EPI, *np.unique(coarse[0]).tolist())).all()
    assert np.mean(refined_d) >= np.mean(coarse_d) - 0.005, (coarse_d, refined_d)
    assert np.mean(refined_d) > 0.85
