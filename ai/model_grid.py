"""The model grid: where each native slice pixel lands on the network's input, and back.

One 2x2 affine per slice (:class:`SliceGrid`) maps the model grid (the card's pixel
spacing, in a canonical in-plane frame: columns toward the patient's left, rows toward
posterior, whatever the acquisition's orientation) onto the native pixel grid, so the
forward and backward resampling are exact inverses. :func:`covering_shape` sizes the
window for a series, :func:`resample_to_model` samples a native slice on it (anti-aliased
separable operators where the map is axis-aligned), :func:`labels_to_model` does the same
for training targets. :mod:`ai.inference` uses it for pre- and post-processing; the
refiners use :func:`canonical_axes` for their patches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ai.card import ModelCard
from ai.model import UNetConfig
from ai.volume import Volume

#: Native pixels per model pixel above which the slice is low-pass filtered first.
ANTIALIAS_FACTOR = 1.5
#: Widest field of view (mm) the model window grows to (:func:`covering_shape`): 512 px at
#: the card's 1 mm, a whole adult abdomen; beyond it the window stays centred and crops.
MAX_FIELD_MM = 512.0
#: Gaussian sigma (native pixels) per unit of down-sampling factor.
ANTIALIAS_SIGMA_PER_FACTOR = 0.4


@dataclass(frozen=True)
class SliceGrid:
    """Affine map between one slice's native pixel grid and the model grid.

    ``native_rc - native_centre = matrix @ (model_ij - model_centre)`` with ``(row, col)``
    ordering on both sides.
    """

    matrix: np.ndarray
    native_shape: tuple[int, int]
    model_shape: tuple[int, int]

    @property
    def native_centre(self) -> np.ndarray:
        return (np.asarray(self.native_shape, dtype=np.float64) - 1.0) / 2.0

    @property
    def model_centre(self) -> np.ndarray:
        return (np.asarray(self.model_shape, dtype=np.float64) - 1.0) / 2.0

    def model_to_native(self, ij: np.ndarray) -> np.ndarray:
        """``(..., 2)`` model (row, col) -> native (row, col)."""
        return (ij - self.model_centre) @ self.matrix.T + self.native_centre

    def native_to_model(self, rc: np.ndarray) -> np.ndarray:
        """``(..., 2)`` native (row, col) -> model (row, col)."""
        inv = np.linalg.inv(self.matrix)
        return (rc - self.native_centre) @ inv.T + self.model_centre

    @property
    def downsampling(self) -> tuple[float, float]:
        """Native pixels per model pixel along native rows and columns."""
        return (float(np.linalg.norm(self.matrix[0])), float(np.linalg.norm(self.matrix[1])))


def superior_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal of a slice plane (6 direction cosines), taken pointing superior (+z)."""
    normal = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64))
    normal /= np.linalg.norm(normal)
    return -normal if normal[2] < 0 else normal


def canonical_axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane unit vectors (patient LPS) of the model's column and row directions.

    Model columns run toward the patient's left (+x projected into the plane), model rows
    toward posterior (the plane normal, taken pointing superior, crossed with that).
    Falls back to the native axes when the plane is (near) sagittal.
    """
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = superior_normal(orientation)
    x = np.array([1.0, 0.0, 0.0])
    u = x - normal * float(np.dot(x, normal))
    if np.linalg.norm(u) < 0.1:  # plane nearly perpendicular to patient x: keep native axes
        return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    return u, v


def slice_grid(
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    native_shape: tuple[int, int],
    card: ModelCard,
    model_shape: tuple[int, int] | None = None,
) -> SliceGrid:
    """The :class:`SliceGrid` of one slice for the card's spacing (size: ``model_shape`` or the card's)."""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    row_dir /= np.linalg.norm(row_dir)
    col_dir /= np.linalg.norm(col_dir)
    u, v = canonical_axes(orientation)
    rs, cs = pixel_spacing
    s = card.input_spacing_mm
    # one model step along rows moves s mm along v; along columns s mm along u.
    matrix = s * np.array(
        [
            [np.dot(v, col_dir) / rs, np.dot(u, col_dir) / rs],
            [np.dot(v, row_dir) / cs, np.dot(u, row_dir) / cs],
        ]
    )
    shape = card.input_size if model_shape is None else model_shape
    return SliceGrid(matrix=matrix, native_shape=native_shape, model_shape=shape)


def covering_shape(volume: Volume, card: ModelCard) -> tuple[int, int]:
    """Model-grid size whose columns hold every slice's whole left-right field of view.

    Why: the network is fully convolutional and was trained on the card's 224 mm window,
    so a wider field of view (448 x 0.55 mm = 246 mm) lost what lies left and right of the
    window: the lateral subcutaneous fat (-10 % of its area on such series), or a psoas
    of a spine off the image centre. The window therefore grows along the model columns
    (patient left-right) to the native field's extent there (the bounding box of its
    corners mapped by :func:`slice_grid`), rounded up to the network's divisor and capped
    at :data:`MAX_FIELD_MM`. The rows (anterior-posterior) keep the card's size: grown
    there too, the window took in a wrap-around ghost of the spine at the edge of the
    field on 3 of 60 randomised tuning studies, and the post-processing kept the ghost as
    the spine (all structures lost). Lumbar structures lie within the card's 224 mm front
    to back.
    """
    divisor = UNetConfig.from_dict(card.architecture).divisor
    rows, cols = volume.pixels.shape[1:]
    corners = np.array([[-0.5, -0.5], [-0.5, cols - 0.5], [rows - 0.5, -0.5], [rows - 0.5, cols - 0.5]])
    width = float(card.input_size[1])
    for orientation in np.unique(np.round(volume.orientations, 6), axis=0):
        model_cols = slice_grid(orientation, volume.pixel_spacing, (rows, cols), card).native_to_model(corners)[:, 1]
        width = max(width, float(model_cols.max() - model_cols.min()))
    cap = int(MAX_FIELD_MM / card.input_spacing_mm) // divisor * divisor
    rounded = int(np.ceil(width / divisor - 1e-6)) * divisor  # 1e-6: 150 x 0.8 mm is 120, not 122
    return (card.input_size[0], max(card.input_size[1], min(cap, rounded)))


def covered_along(positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Which positions along one axis of ``n`` pixels the pixels cover, and the positions
    clipped onto the pixel centres ``[0, n - 1]``.

    A pixel is the square around its centre, so the axis is covered over ``[-0.5, n - 0.5]``;
    a position in the outer half of an edge pixel takes that pixel's value. Counting only
    ``[0, n - 1]`` on the way back from the model grid lost the outermost native column on
    each side of a field exactly as wide as the window (320 x 0.7 mm in a 224 mm window), and
    with it the subcutaneous fat the field cuts there; interpolating towards the zero padding
    there on the way in darkened the field's last model pixel.
    """
    return (positions >= -0.5) & (positions <= n - 0.5), np.clip(positions, 0.0, n - 1.0)


def covered_by_model(ij: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`covered_along` for points ``(..., 2)`` (row, col) on a grid of ``shape`` pixels."""
    rows_in, rows = covered_along(ij[..., 0], shape[0])
    cols_in, cols = covered_along(ij[..., 1], shape[1])
    return rows_in & cols_in, np.stack([rows, cols], axis=-1)


def normalised_grid(points_rc: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Pixel (row, col) -> grid_sample (x, y) in [-1, 1] (align_corners=True)."""
    rows, cols = shape
    x = points_rc[..., 1] / max(cols - 1, 1) * 2.0 - 1.0
    y = points_rc[..., 0] / max(rows - 1, 1) * 2.0 - 1.0
    return torch.from_numpy(np.stack([x, y], axis=-1).astype(np.float32))


def resample_to_model(
    image: np.ndarray, grid: SliceGrid, *, mode: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a native 2D array on the model grid.

    Returns the sampled array (float32) and a boolean mask of model pixels that fall
    inside the native field of view (the rest is zero padding).
    """
    img = np.asarray(image, dtype=np.float32)
    if mode == "bilinear":
        operators = _separable_operators(grid.matrix.tobytes(), grid.native_shape, grid.model_shape)
        if operators is not None:
            rows_op, cols_op = operators
            out_sep = rows_op @ torch.from_numpy(img) @ cols_op.T
            return out_sep.numpy(), _sampling_grid(
                grid.matrix.tobytes(), grid.native_shape, grid.model_shape
            )[1].copy()
        sigma = antialias_sigma(grid)
        if max(sigma) > 0.0:
            img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    g, inside = _sampling_grid(grid.matrix.tobytes(), grid.native_shape, grid.model_shape)
    t = torch.from_numpy(img)[None, None]
    # bilinear: edge pixels at full value inside the field (see _linear_operator), zero beyond
    padding = "border" if mode == "bilinear" else "zeros"
    sampled = F.grid_sample(t, g, mode=mode, padding_mode=padding, align_corners=True)[0, 0].numpy()
    return np.where(inside, sampled, np.float32(0.0)) if mode == "bilinear" else sampled, inside.copy()


def antialias_sigma(grid: SliceGrid) -> tuple[float, float]:
    """Gaussian sigma (native pixels) along native rows and columns before down-sampling."""
    f_r, f_c = grid.downsampling
    if max(f_r, f_c) <= ANTIALIAS_FACTOR:
        return 0.0, 0.0
    return (
        ANTIALIAS_SIGMA_PER_FACTOR * f_r if f_r > ANTIALIAS_FACTOR else 0.0,
        ANTIALIAS_SIGMA_PER_FACTOR * f_c if f_c > ANTIALIAS_FACTOR else 0.0,
    )


def _gaussian_operator(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix of ``scipy.ndimage.gaussian_filter1d(..., mode="nearest")``.

    Same kernel as scipy (radius ``int(4 sigma + 0.5)``, normalised); edge pixels repeat.
    """
    if sigma <= 0.0:
        return np.eye(n)
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    op = np.zeros((n, n))
    rows = np.arange(n)
    for t, w in zip(taps, kernel, strict=True):
        np.add.at(op, (rows, np.clip(rows + t, 0, n - 1)), w)
    return op


def _linear_operator(positions: np.ndarray, n: int) -> np.ndarray:
    """``(len(positions), n)`` linear interpolation at ``positions``; zero outside the field
    (:func:`covered_along`: the outer half of an edge pixel takes that pixel's whole value)."""
    in_field, positions = covered_along(positions, n)
    op = np.zeros((len(positions), n))
    lo = np.floor(positions).astype(np.int64)
    frac = positions - lo
    rows = np.arange(len(positions))
    for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = in_field & (idx < n)
        np.add.at(op, (rows[ok], idx[ok]), w[ok])
    return op


@functools.lru_cache(maxsize=8)
def _separable_operators(
    matrix_bytes: bytes, native_shape: tuple[int, int], model_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row and column operators ``R``, ``C`` with ``R @ image @ C.T`` = anti-alias + resample.

    Only for grids without in-plane rotation (the usual axial slice; ``None`` otherwise):
    there the Gaussian low-pass and the bilinear sampling act on rows and columns
    separately, so both fold into two small matrices and a slice costs two matrix
    products instead of a full-resolution filter and a ``grid_sample`` (same result up
    to float rounding). Cached per grid like :func:`_sampling_grid`.
    """
    matrix = np.frombuffer(matrix_bytes, dtype=np.float64).reshape(2, 2)
    if matrix[0, 1] != 0 or matrix[1, 0] != 0:
        return None
    grid = SliceGrid(matrix=matrix, native_shape=native_shape, model_shape=model_shape)
    sigma = antialias_sigma(grid)
    ops = []
    for axis in (0, 1):
        model_idx = np.arange(model_shape[axis], dtype=np.float64) - grid.model_centre[axis]
        positions = matrix[axis, axis] * model_idx + grid.native_centre[axis]
        op = _linear_operator(positions, native_shape[axis]) @ _gaussian_operator(
            native_shape[axis], sigma[axis]
        )
        ops.append(torch.from_numpy(op.astype(np.float32)))
    return ops[0], ops[1]


@functools.lru_cache(maxsize=8)
def _sampling_grid(
    matrix_bytes: bytes, native_shape: tuple[int, int], model_shape: tuple[int, int]
) -> tuple[torch.Tensor, np.ndarray]:
    """grid_sample coordinates of every model pixel and the in-field-of-view mask.

    Cached: the slices of one series nearly always share their grid (key: the
    :class:`SliceGrid` matrix's bytes and both shapes). Callers must not modify them.
    """
    grid = SliceGrid(
        matrix=np.frombuffer(matrix_bytes, dtype=np.float64).reshape(2, 2),
        native_shape=native_shape,
        model_shape=model_shape,
    )
    mr, mc = model_shape
    ii, jj = np.meshgrid(np.arange(mr, dtype=np.float64), np.arange(mc, dtype=np.float64), indexing="ij")
    rc = grid.model_to_native(np.stack([ii, jj], axis=-1))
    inside, _ = covered_by_model(rc, native_shape)  # the native field, by the same rule
    return normalised_grid(rc, native_shape)[None], inside


def labels_to_model(labels: np.ndarray, grid: SliceGrid) -> np.ndarray:
    """A native label map sampled (nearest) on the model grid (training targets)."""
    sampled, _ = resample_to_model(labels.astype(np.float32), grid, mode="nearest")
    return np.rint(sampled).astype(np.uint8)
