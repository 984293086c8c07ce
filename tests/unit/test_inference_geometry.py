"""Pre/post-processing geometry on synthetic arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ai.card import ModelCard, label_map
from ai.inference import autocast_dtype, normalise, pre_process, pre_process_slice, to_native
from ai.labels import NUM_CLASSES, Label
from ai.model import UNet, UNetConfig, fold_batchnorm
from ai.model_grid import (
    MAX_FIELD_MM,
    SliceGrid,
    antialias_sigma,
    covering_shape,
    labels_to_model,
    resample_to_model,
    slice_grid,
)
from ai.postprocess import clean_components, fix_laterality, label_stats
from ai.volume import Volume

AXIAL = np.array([1.0, 0, 0, 0, 1.0, 0])


def _card(spacing: float = 1.0, size: int = 64) -> ModelCard:
    return ModelCard(
        name="t", version="0", labels=label_map(), input_spacing_mm=spacing,
        input_size=(size, size), architecture=UNetConfig(channels=(4, 8)).to_dict(),
    )


def _phantom(shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Label map in mm around the image centre: canal, disc anterior, muscles left/right."""
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    y = (r - (shape[0] - 1) / 2) * spacing  # posterior +
    x = (c - (shape[1] - 1) / 2) * spacing  # patient left +
    lab = np.zeros(shape, np.uint8)
    lab[((x / 14) ** 2 + ((y + 16) / 8) ** 2) < 1] = Label.DISC
    lab[((x / 5) ** 2 + (y / 4) ** 2) < 1] = Label.DURAL_SAC
    lab[(((x - 12) / 5) ** 2 + ((y - 12) / 7) ** 2) < 1] = Label.MULTIFIDUS_LEFT
    lab[(((x + 12) / 5) ** 2 + ((y - 12) / 7) ** 2) < 1] = Label.MULTIFIDUS_RIGHT
    return lab


def _onehot_logits(model_labels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(model_labels.astype(np.int64)), NUM_CLASSES).permute(2, 0, 1).float()


def test_resampling_round_trip_recovers_native_labels() -> None:
    card = _card(spacing=1.0, size=64)
    for shape, spacing in [((120, 100), 0.5), ((48, 48), 1.2)]:
        native = _phantom(shape, spacing)
        grid = slice_grid(AXIAL, (spacing, spacing), shape, card)
        back = to_native(_onehot_logits(labels_to_model(native, grid)), grid)
        agree = (back == native)[native > 0].mean()
        assert agree > 0.9, (shape, agree)
        # exact geometry: the grid maps are inverses
        pts = np.array([[3.0, 7.0], [40.5, 20.25]])
        assert np.allclose(grid.native_to_model(grid.model_to_native(pts)), pts)


def test_model_grid_is_canonical_whatever_the_orientation() -> None:
    card = _card(spacing=1.0, size=64)
    shape, spacing = (80, 80), 0.8
    native = _phantom(shape, spacing)
    base = labels_to_model(native, slice_grid(AXIAL, (spacing, spacing), shape, card))
    # the same anatomy stored with rows running anterior (column direction -y): flip rows
    flipped_ori = np.array([1.0, 0, 0, 0, -1.0, 0])
    flipped = labels_to_model(native[::-1].copy(), slice_grid(flipped_ori, (spacing, spacing), shape, card))
    assert (flipped == base).mean() > 0.99
    # and stored transposed (rows run to the patient's left)
    transposed_ori = np.array([0, 1.0, 0, 1.0, 0, 0])
    transposed = labels_to_model(native.T.copy(), slice_grid(transposed_ori, (spacing, spacing), shape, card))
    assert (transposed == base).mean() > 0.99
    # in the canonical grid the patient's left muscle has the larger column index
    cols_left = np.nonzero(base == Label.MULTIFIDUS_LEFT)[1].mean()
    cols_right = np.nonzero(base == Label.MULTIFIDUS_RIGHT)[1].mean()
    assert cols_left > cols_right


def test_crop_and_pad_around_the_centre() -> None:
    card = _card(spacing=1.0, size=64)
    img = np.ones((200, 200), np.float32)  # 200 mm at 1 mm: cropped to the central 64 mm
    sampled, valid = resample_to_model(img, slice_grid(AXIAL, (1.0, 1.0), img.shape, card))
    assert valid.all() and np.allclose(sampled, 1.0)
    small = np.ones((32, 32), np.float32)  # 32 mm: padded
    sampled, valid = resample_to_model(small, slice_grid(AXIAL, (1.0, 1.0), small.shape, card))
    assert 0.2 < valid.mean() < 0.3
    assert np.allclose(sampled[32, 32], 1.0)
    # every model pixel inside the field reads the full value, up to its edge (a rim
    # interpolated towards the zero padding looked like the body's outline to the network)
    assert np.allclose(sampled[valid], 1.0) and np.allclose(sampled[~valid], 0.0)
    for shape, spacing in (((37, 41), 0.77), ((90, 70), 1.3)):
        field = np.ones(shape, np.float32)
        for orientation in (AXIAL, np.array([0.9848, 0.1736, 0, -0.1736, 0.9848, 0])):  # 10 degrees
            sampled, valid = resample_to_model(field, slice_grid(orientation, (spacing, spacing), shape, card))
            assert valid.any() and np.allclose(sampled[valid], 1.0, atol=1e-5)


def _volume(pixels: np.ndarray, spacing: float, orientation: np.ndarray = AXIAL) -> Volume:
    n = pixels.shape[0]
    return Volume(
        pixels=pixels.astype(np.float32), pixel_spacing=(spacing, spacing),
        positions=np.array([[0.0, 0.0, 4.0 * k] for k in range(n)]),
        orientations=np.tile(orientation, (n, 1)),
        slice_uids=tuple(f"1.2.{k}" for k in range(n)), series_instance_uid="1.2",
    )


def test_the_window_widens_to_the_whole_left_right_field() -> None:
    card = _card(spacing=1.0, size=64)  # divisor 2 for two levels
    assert covering_shape(_volume(np.ones((2, 50, 60)), 1.0), card) == (64, 64)  # smaller: card's
    # 100 rows x 150 columns of 0.8 mm: 120 x 120 mm; the columns run left-right
    wide = _volume(np.ones((2, 100, 150)), 0.8)
    assert covering_shape(wide, card) == (64, 120)
    # the same field stored transposed (rows run left-right): the width follows the patient
    transposed = _volume(np.ones((2, 150, 100)), 0.8, np.array([0, 1.0, 0, 1.0, 0, 0]))
    assert covering_shape(transposed, card) == (64, 120)
    # 45 degrees in-plane: the bounding box of the rotated field, rounded up to the divisor
    c = np.cos(np.pi / 4)
    rotated = _volume(np.ones((2, 100, 100)), 1.0, np.array([c, c, 0, -c, c, 0]))
    assert covering_shape(rotated, card) == (64, 142)  # 100 * sqrt(2) = 141.4
    huge = _volume(np.ones((1, 64, 1024)), 1.0)
    assert covering_shape(huge, card) == (64, int(MAX_FIELD_MM))


def test_a_wide_field_keeps_its_lateral_edges_and_the_centres_normalisation() -> None:
    card = _card(spacing=1.0, size=64)
    img = np.full((1, 64, 120), 100.0, np.float32)
    img[0, :, :30] = 1000.0  # bright lateral fat 30-60 mm right of the centre
    img[0, :, 28:34] = 50.0
    pre = pre_process(_volume(img, 1.0), card)
    assert pre.images.shape[-2:] == (64, 120) and pre.valid.all()
    model = pre.images[0, 0].numpy()
    # the lateral band (outside the card's central 64 mm) reaches the network ...
    assert model[:, :26].mean() > 1.0
    # ... and the central 64 mm is normalised by its own percentiles, as in training
    central, _, _ = pre_process_slice(img[0, :, 28:92], AXIAL, (1.0, 1.0), card)
    assert np.allclose(model[:, 28:92], central, atol=1e-4)


def test_normalisation_is_robust_to_outliers() -> None:
    card = _card()
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (64, 64)).astype(np.float32)
    img[0, 0] = 1e6
    out = normalise(img, np.ones_like(img, bool), card.normalisation)
    assert out.max() <= card.normalisation.clip_high
    assert 0.3 < np.median(out) < 0.7
    img2, valid, _ = pre_process_slice(img * 7 + 3, AXIAL, (1.0, 1.0), card)
    img1, _, _ = pre_process_slice(img, AXIAL, (1.0, 1.0), card)
    assert np.allclose(img1, img2, atol=1e-4)  # invariant to linear intensity scaling


def test_largest_component_and_laterality_swap() -> None:
    native = _phantom((80, 80), 1.0)
    speck = native.copy()
    speck[2:4, 2:4] = Label.DURAL_SAC
    cleaned = clean_components(speck, 1.0)
    assert (cleaned == native).all()
    swapped = native.copy()
    swapped[native == Label.MULTIFIDUS_LEFT] = Label.MULTIFIDUS_RIGHT
    swapped[native == Label.MULTIFIDUS_RIGHT] = Label.MULTIFIDUS_LEFT
    fixed, notes = fix_laterality(swapped, AXIAL, (1.0, 1.0))
    assert (fixed == native).all()
    assert notes and "multifidus" in notes[0]
    same, none = fix_laterality(native, AXIAL, (1.0, 1.0))
    assert (same == native).all() and none == []
    # anatomy rotated by 180 degrees in the image (patient prone): left is decided by
    # anatomy (canal behind disc), not by the image side
    rotated = native[::-1, ::-1].copy()
    fixed_rot, notes_rot = fix_laterality(rotated, AXIAL, (1.0, 1.0))
    assert notes_rot == [] and (fixed_rot == rotated).all()


def _dense_bilinear_argmax(logits: torch.Tensor, grid: SliceGrid) -> np.ndarray:
    """Reference for to_native: every native pixel interpolated (slow, obviously right)."""
    nr, nc = grid.native_shape
    mr, mc = grid.model_shape
    rc = np.stack(np.meshgrid(np.arange(nr, dtype=float), np.arange(nc, dtype=float), indexing="ij"), -1)
    ij = grid.native_to_model(rc)
    # a model pixel covers the square around its centre: points in the outer half of an
    # edge pixel take its value, points further out are background
    inside = (ij[..., 0] >= -0.5) & (ij[..., 0] <= mr - 0.5) & (ij[..., 1] >= -0.5) & (ij[..., 1] <= mc - 0.5)
    ij = np.stack([np.clip(ij[..., 0], 0, mr - 1), np.clip(ij[..., 1], 0, mc - 1)], -1)
    g = torch.from_numpy(np.stack([ij[..., 1] / (mc - 1) * 2 - 1, ij[..., 0] / (mr - 1) * 2 - 1], -1)).float()
    up = torch.nn.functional.grid_sample(logits[None].float(), g[None], mode="bilinear", align_corners=True)[0]
    out = up.argmax(0).numpy().astype(np.uint8)
    out[~inside] = 0
    return out


def test_to_native_equals_dense_bilinear_argmax_with_and_without_rotation() -> None:
    card = _card(spacing=1.0, size=64)
    torch.manual_seed(3)
    logits = torch.nn.functional.avg_pool2d(torch.randn(1, NUM_CLASSES, 64, 64), 7, 1, 3)[0]
    turned = np.array([np.cos(0.4), np.sin(0.4), 0, -np.sin(0.4), np.cos(0.4), 0])
    for orientation, shape, spacing in [(AXIAL, (150, 130), 0.45), (turned, (150, 130), 0.45), (AXIAL, (40, 50), 1.3)]:
        grid = slice_grid(orientation, (spacing, spacing), shape, card)
        separable = grid.matrix[0, 1] == 0 and grid.matrix[1, 0] == 0
        assert separable == (orientation is AXIAL)
        got = to_native(logits, grid)
        want = _dense_bilinear_argmax(logits, grid)
        # float rounding may flip a pixel exactly on a tie; nothing more
        assert (got != want).mean() < 1e-3, (shape, float((got != want).mean()))


def test_a_field_as_wide_as_the_window_keeps_its_edge_pixels() -> None:
    """320 x 0.7 mm is the card's 224 mm: the outermost native pixel centres lie 0.15 model
    pixels beyond the outermost model pixel centres, inside those pixels' squares."""
    card = _card(spacing=1.0, size=224)
    grid = slice_grid(AXIAL, (0.7, 0.7), (320, 320), card)
    edge = grid.native_to_model(np.array([[0.0, 0.0], [319.0, 319.0]]))
    assert np.allclose(edge, [[-0.15, -0.15], [223.15, 223.15]])
    fat = torch.zeros(NUM_CLASSES, 224, 224)
    fat[Label.SUBCUTANEOUS_FAT] = 1.0
    assert (to_native(fat, grid) == Label.SUBCUTANEOUS_FAT).all()
    # a field wider than the window: only the pixels it covers are labelled
    wide = slice_grid(AXIAL, (0.7, 0.7), (400, 400), card)
    got = to_native(fat, wide)
    covered = np.zeros(got.shape, bool)
    covered[40:360, 40:360] = True  # (k - 199.5) * 0.7 + 111.5 within [-0.5, 223.5]
    assert (got[covered] == Label.SUBCUTANEOUS_FAT).all() and (got[~covered] == 0).all()


def test_folded_batchnorm_gives_the_same_logits() -> None:
    model = UNet(UNetConfig(channels=(4, 8, 16)))
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4)


def test_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "float32") is None
    assert autocast_dtype(cpu, "bfloat16") is torch.bfloat16
    assert autocast_dtype(cuda, "auto") is torch.float16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert autocast_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert autocast_dtype(cpu, "auto") is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(cpu, "int8")


def _filter_then_grid_sample(image: np.ndarray, grid: SliceGrid) -> np.ndarray:
    """The reference pre-processing: scipy Gaussian low-pass, then bilinear grid_sample
    (edge values held out to the field's border, zero beyond it)."""
    from scipy import ndimage

    sigma = antialias_sigma(grid)
    img = image.astype(np.float32)
    if max(sigma) > 0:
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    rc = grid.model_to_native(
        np.stack(np.meshgrid(np.arange(grid.model_shape[0]), np.arange(grid.model_shape[1]), indexing="ij"), -1).astype(float)
    )
    gx = rc[..., 1] / (grid.native_shape[1] - 1) * 2 - 1
    gy = rc[..., 0] / (grid.native_shape[0] - 1) * 2 - 1
    g = torch.from_numpy(np.stack([gx, gy], -1).astype(np.float32))[None]
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(img)[None, None], g, mode="bilinear", padding_mode="border", align_corners=True
    )
    rows, cols = grid.native_shape
    inside = (rc[..., 0] >= -0.5) & (rc[..., 0] <= rows - 0.5) & (rc[..., 1] >= -0.5) & (rc[..., 1] <= cols - 0.5)
    return np.where(inside, out[0, 0].numpy(), 0.0)


@pytest.mark.parametrize(
    ("orientation", "shape", "spacing"),
    [
        (AXIAL, (200, 180), 0.4),  # down-sampled 2.5x: anti-aliased
        (np.array([-1.0, 0, 0, 0, -1.0, 0]), (90, 110), 0.7),  # flipped axes
        (np.array([1.0, 0, 0, 0, 0.9, -0.43589]), (120, 100), 0.5),  # tilted block
        (AXIAL, (40, 30), 1.3),  # up-sampled, field of view smaller than the model grid
    ],
)
def test_separable_resampling_equals_filter_then_grid_sample(
    orientation: np.ndarray, shape: tuple[int, int], spacing: float
) -> None:
    card = _card(spacing=1.0, size=64)
    grid = slice_grid(orientation, (spacing, spacing * 1.1), shape, card)
    assert grid.matrix[0, 1] == 0 and grid.matrix[1, 0] == 0
    image = np.random.default_rng(5).random(shape).astype(np.float32) * 1000
    got, inside = resample_to_model(image, grid)
    want = _filter_then_grid_sample(image, grid)
    assert np.abs(got - want).max() < 0.05  # float32 rounding on values up to 1000
    assert inside.shape == got.shape and inside.any()


def test_label_stats_equal_their_plain_numpy_definition() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(2)
    labels = rng.integers(0, NUM_CLASSES, (70, 90)).astype(np.uint8)
    labels[labels == int(Label.DISC)] = 0  # an absent label: count 0, centroid NaN
    counts, centroids = label_stats(labels)
    for lab in range(NUM_CLASSES):
        r, c = np.nonzero(labels == lab)
        assert counts[lab] == r.size
        if lab == 0:
            assert np.isnan(centroids[0]).all()  # background: count only
        elif r.size:
            assert np.allclose(centroids[lab], [r.mean(), c.mean()])
        else:
            assert np.isnan(centroids[lab]).all()
    # boxes taken before pixels were removed still give the same statistics
    boxes = ndimage.find_objects(labels)
    trimmed = labels.copy()
    trimmed[::3] = 0
    want = label_stats(trimmed)
    got = label_stats(trimmed, boxes)
    assert np.array_equal(got[0], want[0]) and np.allclose(got[1], want[1], equal_nan=True)
    with pytest.raises(ValueError, match="below"):
        label_stats(np.full((3, 3), NUM_CLASSES, dtype=np.uint8))


def test_canal_centre_is_the_centroid_of_the_sac_else_the_canal() -> None:
    from ai.canal_patch import canal_centre

    labels = np.zeros((60, 70), np.uint8)
    assert canal_centre(labels) is None
    labels[10:13, 20:30] = Label.EPIDURAL_SPACE
    labels[40, 50] = Label.DURAL_SAC  # below MIN_SAC_PX: the whole canal is used
    r, c = np.nonzero(np.isin(labels, [Label.DURAL_SAC, Label.EPIDURAL_SPACE]))
    assert np.allclose(canal_centre(labels), (r.mean(), c.mean()))
    labels[30:34, 5:9] = Label.DURAL_SAC
    r, c = np.nonzero(labels == Label.DURAL_SAC)
    assert np.allclose(canal_centre(labels), (r.mean(), c.mean()))


def test_mirrored_labels_swap_sides_and_keep_the_midline() -> None:
    from ai.labels import MIRRORED, PAIRS, STRUCTURES

    assert all(MIRRORED[MIRRORED[k]] == k for k in range(len(MIRRORED)))
    for left, right in PAIRS.values():
        assert MIRRORED[STRUCTURES[left][0]] == STRUCTURES[right][0]
    for lab in (Label.BACKGROUND, Label.DISC, Label.DURAL_SAC, Label.SUBCUTANEOUS_FAT):
        assert MIRRORED[lab] == lab


class _LeftPsoasDetector(torch.nn.Module):
    """Calls every bright pixel left psoas (and disc), whatever side it is on: not
    mirror-symmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], len(Label), *x.shape[-2:]))
        out[:, Label.PSOAS_LEFT] = x[:, 0]
        out[:, Label.DISC] = x[:, 0]
        return out


def test_mirrored_prediction_averages_with_the_sides_swapped() -> None:
    from ai.inference import predict, unmirror_logits

    images = torch.zeros((3, 1, 16, 24))
    images[:, 0, 4:8, 2:6] = 1.0  # on the image's left (the patient's right)
    plain = predict(_LeftPsoasDetector(), images, torch.device("cpu"), batch_size=2)
    both = predict(_LeftPsoasDetector(), images, torch.device("cpu"), batch_size=2, mirror=True)
    assert torch.equal(plain[:, Label.PSOAS_LEFT], images[:, 0])
    # the mirror pass saw the blob on the other side and called it left psoas there: mapped
    # back, that is right psoas at the blob's true place; the average holds half of each
    assert torch.allclose(both[:, Label.PSOAS_LEFT], 0.5 * images[:, 0])
    assert torch.allclose(both[:, Label.PSOAS_RIGHT], 0.5 * images[:, 0])
    # the anterior column's logits stay the first pass's (not averaged)
    assert torch.equal(both[:, Label.DISC], plain[:, Label.DISC])
    assert torch.equal(unmirror_logits(unmirror_logits(plain)), plain)
