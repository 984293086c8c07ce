"""Phantom API: shapes, label values, truth exactness, Schizas construction, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ai.labels import NUM_CLASSES, Label
from ai.phantom import Tissue, render_slice, sample_subject, structure_areas


def _slice(seed: int, grade: str, level: str = "L4-L5", kind: str = "disc", mode: str = "realistic"):
    rng = np.random.default_rng(seed)
    subject = sample_subject(rng, stenosis=grade, levels=(level,))
    return render_slice(subject, level, kind, mode, rng)


def test_shapes_dtypes_and_label_values() -> None:
    s = _slice(0, "random")
    assert s.image.dtype == np.float32 and s.image.shape == (256, 256)
    assert s.labels.dtype == np.uint8 and s.labels.shape == s.image.shape
    assert s.labels.max() < NUM_CLASSES
    assert s.rootlet_mask.dtype == bool
    for lab in (Label.DISC, Label.POSTERIOR_ELEMENTS, Label.DURAL_SAC, Label.PSOAS_LEFT,
                Label.MULTIFIDUS_RIGHT, Label.ERECTOR_SPINAE_LEFT, Label.SUBCUTANEOUS_FAT):
        assert (s.labels == lab).any(), lab.name
    assert not (s.labels == Label.VERTEBRAL_BODY).any()  # disc slice: no vertebral body
    assert np.all(s.image >= 0) and s.image.max() < 65536


def test_mid_slice_shows_vertebral_body_not_disc() -> None:
    s = _slice(1, "A", kind="mid")
    assert (s.labels == Label.VERTEBRAL_BODY).sum() > 500
    assert not (s.labels == Label.DISC).any()


@pytest.mark.parametrize("mode", ["realistic", "randomised"])
def test_truth_areas_equal_label_map(mode: str) -> None:
    s = _slice(2, "random", mode=mode)
    area = s.pixel_spacing[0] * s.pixel_spacing[1]
    assert s.truth["csa_mm2"] == structure_areas(s.labels, area)
    assert s.truth["dsca_mm2"] == pytest.approx((s.labels == Label.DURAL_SAC).sum() * area)
    canal = np.isin(s.labels, [Label.DURAL_SAC, Label.EPIDURAL_SPACE]).sum() * area
    assert s.truth["canal_mm2"] == pytest.approx(canal)


def test_canal_centre_lies_in_the_sac() -> None:
    s = _slice(3, "A")
    r, c = (int(round(v)) for v in s.canal_centre_px)
    assert s.labels[r, c] in (Label.DURAL_SAC, Label.EPIDURAL_SPACE)


@pytest.mark.parametrize("seed", range(4))
def test_schizas_a_has_separate_rootlets_in_csf(seed: int) -> None:
    s = _slice(10 + seed, "A")
    assert s.truth["schizas"] == "A"
    n_comp = ndimage.label(s.rootlet_mask, structure=np.ones((3, 3)))[1]
    assert n_comp >= 5
    assert n_comp == pytest.approx(s.truth["n_rootlets"], abs=1)
    assert (s.tissue == Tissue.CSF).sum() > (s.tissue == Tissue.ROOTLET).sum()


@pytest.mark.parametrize("seed", range(3))
def test_schizas_b_rootlets_fill_sac_with_some_csf(seed: int) -> None:
    s = _slice(20 + seed, "B")
    assert s.truth["schizas"] == "B"
    assert (s.tissue == Tissue.CSF).any()
    assert ndimage.label(s.rootlet_mask)[1] >= 8


@pytest.mark.parametrize("seed", range(4))
def test_schizas_c_and_d_posterior_epidural_fat(seed: int) -> None:
    c = _slice(30 + seed, "C")
    d = _slice(40 + seed, "D")
    for s in (c, d):
        assert not (s.tissue == Tissue.CSF).any()
        assert not (s.tissue == Tissue.ROOTLET).any()
    assert c.truth["posterior_epidural_fat"] and c.truth["posterior_epidural_fat_mm2"] >= 2.0
    assert not d.truth["posterior_epidural_fat"] and d.truth["posterior_epidural_fat_mm2"] == 0.0


def test_dsca_follows_grade_on_average() -> None:
    means = {}
    for g in "ABCD":
        means[g] = np.mean([_slice(100 + i, g).truth["dsca_mm2"] for i in range(4)])
    assert means["A"] > means["B"] > means["C"] > means["D"]


@pytest.mark.parametrize("mode", ["realistic", "randomised"])
def test_deterministic_per_seed(mode: str) -> None:
    a = _slice(7, "random", mode=mode)
    b = _slice(7, "random", mode=mode)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.truth == b.truth


def test_fat_fraction_truth_matches_tissue_map() -> None:
    rng = np.random.default_rng(5)
    subject = sample_subject(rng, stenosis="none", levels=("L4-L5",), fat_fraction=40.0)
    s = render_slice(subject, "L4-L5", "disc", "realistic", rng)
    ff = s.truth["fat_fraction_pct"]
    lean = (s.tissue == Tissue.MF_L).sum()
    fat = (s.tissue == Tissue.MF_L_FAT).sum()
    assert ff["multifidus_left"] == pytest.approx(100.0 * fat / (lean + fat))
    assert 20.0 < ff["multifidus_left"] <= 60.5


def test_invalid_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        sample_subject(rng, stenosis="terrible")
    subject = sample_subject(rng, levels=("L4-L5",))
    with pytest.raises(ValueError):
        render_slice(subject, "L1-L2")
    with pytest.raises(ValueError):
        render_slice(subject, "L4-L5", kind="pedicle")
