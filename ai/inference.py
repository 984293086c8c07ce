"""Segmentation inference in three steps: pre_process / predict / post_process.

* :func:`pre_process` resamples every slice onto the model's grid: a canonical in-plane
  frame (model columns run to the patient's left, model rows to posterior, whatever the
  acquisition's orientation), the card's pixel spacing, a window centred on the slice
  centre, the card's size (zero-padded or cropped) but widened to hold the whole
  left-right field of view (:func:`covering_shape`), then a robust percentile normalisation.
* :func:`predict` runs the network in batches (CUDA + AMP when present, CPU otherwise).
* :func:`to_native` maps the logits back onto each slice's native pixel grid
  (bilinear on logits, then arg-max); :func:`ai.postprocess.post_process` then cleans the
  label map and flags (never hides) implausible results.

The geometry is one 2x2 affine per slice (:class:`SliceGrid`), so the forward and
backward resampling are exact inverses of each other.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ai.card import ModelCard, Normalisation
from ai.labels import Label
from ai.model import UNet, UNetConfig
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Inference precisions accepted by :func:`autocast_dtype` (``[ai] precision``).
PRECISIONS = ("auto", "float32", "bfloat16")
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
    (patient left-right) to the native field's extent there (the rotated rectangle's
    bounding box), rounded up to the network's divisor and capped at :data:`MAX_FIELD_MM`.
    The rows (anterior-posterior) keep the card's size: grown there too, the window took
    in a wrap-around ghost of the spine at the edge of the field on 3 of 60 randomised
    tuning studies, and the post-processing kept the ghost as the spine (all structures
    lost). Lumbar structures lie within the card's 224 mm front to back.
    """
    divisor = UNetConfig.from_dict(card.architecture).divisor
    s = card.input_spacing_mm
    rs, cs = volume.pixel_spacing
    rows, cols = volume.pixels.shape[1:]
    need = float(card.input_size[1])
    for orientation in np.unique(np.round(volume.orientations, 6), axis=0):
        row_dir = np.asarray(orientation[:3], dtype=np.float64)
        col_dir = np.asarray(orientation[3:], dtype=np.float64)
        u, _v = canonical_axes(orientation)
        # native rows advance along col_dir, native columns along row_dir
        extent_u = abs(rows * rs * float(np.dot(col_dir, u))) + abs(cols * cs * float(np.dot(row_dir, u)))
        need = max(need, extent_u / s)
    cap = int(MAX_FIELD_MM / s) // divisor * divisor
    width = max(card.input_size[1], min(cap, int(np.ceil(need / divisor)) * divisor))
    return (card.input_size[0], width)


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
    out = F.grid_sample(t, g, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy(), inside.copy()


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
    """``(len(positions), n)`` linear interpolation at ``positions``; zero outside ``[0, n-1]``.

    What ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)`` does
    along one axis.
    """
    op = np.zeros((len(positions), n))
    lo = np.floor(positions).astype(np.int64)
    frac = positions - lo
    rows = np.arange(len(positions))
    for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < n)
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
    nr, nc = native_shape
    inside = (rc[..., 0] >= -0.5) & (rc[..., 0] <= nr - 0.5) & (rc[..., 1] >= -0.5) & (rc[..., 1] <= nc - 0.5)
    return normalised_grid(rc, native_shape)[None], inside


def normalise(
    image: np.ndarray, valid: np.ndarray, norm: Normalisation, stats_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Robust percentile normalisation (see :class:`ai.card.Normalisation`).

    ``stats_size``: take the percentiles from the central window of that size only (the
    card's), so a window grown by :func:`covering_shape` maps the centre's intensities as
    training did; the lateral fat of a wide field would otherwise shift them.
    """
    region = valid
    if stats_size is not None and tuple(stats_size) != image.shape:
        r0 = max(0, (image.shape[0] - stats_size[0]) // 2)
        c0 = max(0, (image.shape[1] - stats_size[1]) // 2)
        central = np.zeros_like(valid)
        central[r0 : r0 + stats_size[0], c0 : c0 + stats_size[1]] = True
        region = valid & central if (valid & central).any() else valid
    values = image[region] if region.any() else image.ravel()
    lo, hi = np.percentile(values, [norm.low_pct, norm.high_pct])
    scale = float(hi - lo) if hi > lo else 1.0
    out = (image - lo) / scale
    out = np.clip(out, norm.clip_low, norm.clip_high)
    out[~valid] = 0.0
    return out.astype(np.float32)


@dataclass
class PreProcessed:
    """Model-grid input of a whole volume: ``images`` ``(n, 1, H, W)`` float32."""

    images: torch.Tensor
    grids: list[SliceGrid]
    valid: np.ndarray


def pre_process_slice(
    image: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    card: ModelCard,
    model_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, SliceGrid]:
    """One native slice -> (normalised model-grid image, valid mask, grid); size as :func:`slice_grid`."""
    grid = slice_grid(orientation, pixel_spacing, image.shape[:2], card, model_shape)  # type: ignore[arg-type]
    sampled, valid = resample_to_model(image, grid)
    return normalise(sampled, valid, card.normalisation, card.input_size), valid, grid


def pre_process(volume: Volume, card: ModelCard) -> PreProcessed:
    """Resample and normalise every slice of ``volume`` onto one model grid, widened to the
    whole left-right field of view (:func:`covering_shape`)."""
    images = []
    grids = []
    valids = []
    shape = covering_shape(volume, card)
    for k in range(volume.n_slices):
        img, valid, grid = pre_process_slice(
            volume.pixels[k], volume.orientations[k], volume.pixel_spacing, card, shape
        )
        images.append(img)
        valids.append(valid)
        grids.append(grid)
    stacked = torch.from_numpy(np.stack(images)[:, None])
    return PreProcessed(images=stacked, grids=grids, valid=np.stack(valids))


def native_bfloat16_cpu() -> bool:
    """True when this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16).

    Elsewhere oneDNN emulates bfloat16 and it is slower than float32.
    """
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of :func:`predict` for ``precision`` on ``device`` (None: float32).

    ``auto`` is float16 on CUDA, bfloat16 on CPUs with native bfloat16 (about 2.5x faster
    than float32 here, held-out Dice within 0.002 of float32: see
    ``docs/performance.md``), else float32. ``float32`` and ``bfloat16`` force one.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and native_bfloat16_cpu() else None


def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits ``(n, classes, H, W)`` float32 on the CPU, computed in batches.

    Channels-last tensors; under autocast to ``dtype`` when given (see
    :func:`autocast_dtype`), in float32 otherwise.
    """
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                logits = model(batch)
            outputs.append(logits.float().cpu())
    if not outputs:
        return torch.zeros((0, 1, *images.shape[-2:]))
    return torch.cat(outputs)


#: The anterior column's two classes, whose mutual decision the logit calibration keeps raw.
_BODY, _DISC = int(Label.VERTEBRAL_BODY), int(Label.DISC)


def calibrate_logits(logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, classes, H, W)`` minus per-class ``offsets``, the disc / body identity kept raw.

    Why: the network was trained with the vertebral body weighted 5 times in the
    cross-entropy, which moves its boundary outward by about one native pixel (+50 mm2 per
    slice, all of it on the ring just outside the true body). Subtracting log(5) from its
    logit undoes that prior (logit adjustment). It must move the anterior column (disc +
    vertebral body) against its surroundings only: between the two, the column refiner and
    the series disc assignment decide, both tuned on the raw decision, and on randomised
    contrast an offset there turned vertebral-body slices into disc. So the column's score
    is the larger of the two offset logits and the raw difference decides which one it is;
    both stay continuous, so :func:`to_native`'s interpolation keeps its meaning.
    """
    shifted = logits - offsets.to(logits.dtype).view(1, -1, 1, 1)
    return keep_column_identity(shifted, float(offsets[_BODY] - offsets[_DISC]))


def keep_column_identity(shifted: torch.Tensor, margin_shift: float) -> torch.Tensor:
    """In place on offset logits: the column scores as its better class, the raw margin picks which.

    ``margin_shift`` is the body offset minus the disc offset: adding it back to the offset
    margin gives the raw one. With equal offsets this changes nothing.
    """
    if margin_shift == 0:
        return shifted
    raw_margin = shifted[:, _BODY] - shifted[:, _DISC] + margin_shift
    column = torch.maximum(shifted[:, _BODY], shifted[:, _DISC])
    shifted[:, _BODY] = column - torch.relu(-raw_margin)
    shifted[:, _DISC] = column - torch.relu(raw_margin)
    return shifted


class CalibratedNetwork(torch.nn.Module):
    """A U-Net whose output is :func:`calibrate_logits` of its logits, at almost no cost.

    The offsets are folded into the bias of the network's last (1x1) convolution, which
    is exactly a per-class logit offset; only the two column channels are then re-mixed.
    Takes ownership of ``network`` (its head's bias is changed): pass an inference copy.
    """

    def __init__(self, network: UNet, offsets: torch.Tensor) -> None:
        super().__init__()
        bias = network.head.bias
        if bias is None:
            raise ValueError("the network's head has no bias to fold logit offsets into")
        with torch.no_grad():
            bias -= offsets.to(bias)
        self.network = network
        self.margin_shift = float(offsets[_BODY] - offsets[_DISC])
        self.offsets = offsets.float().clone()  # as the card gives them (already folded into the head)

    @property
    def calibrated(self) -> bool:
        """Whether any offset is non-zero (an uncalibrated card gives the raw logits)."""
        return bool(self.offsets.abs().sum() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.network(x)
        return keep_column_identity(logits, self.margin_shift)


#: Model-grid pixels count as "body" (disc or vertebral body) for :func:`disc_evidence`
#: where the two classes together hold more than this probability.
BODY_PROBABILITY = 0.5
#: :func:`disc_evidence` reads every n-th model-grid row and column.
EVIDENCE_STRIDE = 2


def disc_evidence(logits: torch.Tensor) -> np.ndarray:
    """Per slice, the model's share of disc in the body: sum P(disc) / sum (P(disc) + P(body)).

    Summed over the model-grid pixels that are disc or vertebral body with probability
    above :data:`BODY_PROBABILITY`; 0 where there are none. Unlike the argmax label it
    keeps sub-threshold evidence, which :mod:`ai.disc_assignment` compares between the
    slices of a block. Every other row and column is enough for a ratio of sums over a
    body of thousands of pixels (1.3 ms per slice on two cores, 2.0 ms at full resolution).
    """
    prob = torch.softmax(logits[:, :, ::EVIDENCE_STRIDE, ::EVIDENCE_STRIDE].float(), dim=1)
    disc = prob[:, int(Label.DISC)]
    body = prob[:, int(Label.VERTEBRAL_BODY)]
    total = disc + body
    region = total > BODY_PROBABILITY
    num = (disc * region).sum(dim=(1, 2))
    den = (total * region).sum(dim=(1, 2)).clamp_min(1e-6)
    return (num / den).numpy().astype(np.float64)


@dataclass
class NativePrediction:
    """Native-grid labels ``(n, rows, cols)`` uint8 and per-slice :func:`disc_evidence`."""

    labels: np.ndarray
    disc_evidence: np.ndarray


def predict_native(
    model: torch.nn.Module,
    pre: PreProcessed,
    device: torch.device,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> NativePrediction:
    """:func:`predict` then :func:`to_native` (and :func:`disc_evidence`), one batch at a time.

    Only one batch of logits exists at a time (13 float32 maps of 224 x 224 per slice are
    2.6 MB: 260 MB for a 100-slice series if all were kept), which keeps the analysis
    worker's peak memory flat in the number of slices.
    """
    n = pre.images.shape[0]
    if n == 0:
        return NativePrediction(np.zeros((0, 0, 0), dtype=np.uint8), np.zeros(0))
    out = np.zeros((n, *pre.grids[0].native_shape), dtype=np.uint8)
    evidence = np.zeros(n)
    for start in range(0, n, batch_size):
        logits = predict(model, pre.images[start : start + batch_size], device, batch_size, dtype)
        evidence[start : start + logits.shape[0]] = disc_evidence(logits)
        # the model-grid arg-max of the whole batch at once: torch spreads it over the
        # threads, numpy's arg-max over a 13-long last axis runs row by row (2-3 ms a slice)
        model_labels = logits.argmax(dim=1).to(torch.uint8).numpy()
        for k in range(logits.shape[0]):
            out[start + k] = to_native(logits[k], pre.grids[start + k], model_labels[k])
    return NativePrediction(out, evidence)


def to_native(
    logits: torch.Tensor, grid: SliceGrid, model_labels: np.ndarray | None = None
) -> np.ndarray:
    """Model-grid logits ``(classes, H, W)`` of one slice -> native label map (uint8).

    Equivalent to bilinear interpolation of the logits followed by arg-max, computed
    cheaply: where the four model pixels around a native pixel share one arg-max label,
    any convex combination of their logits has that arg-max too, so only native pixels
    near a label boundary are interpolated. Native pixels outside the model's field of
    view are background. Grids without in-plane rotation (the usual axial slice) take a
    separable path: model row and column follow from native row and column alone.
    ``model_labels`` is the logits' arg-max over classes when the caller has it already.
    """
    nr, nc = grid.native_shape
    mr, mc = grid.model_shape
    inv = np.linalg.inv(grid.matrix).astype(np.float32)
    rc0, mc0 = grid.native_centre.astype(np.float32), grid.model_centre.astype(np.float32)
    dr = np.arange(nr, dtype=np.float32) - rc0[0]
    dc = np.arange(nc, dtype=np.float32) - rc0[1]
    out = np.zeros((nr, nc), dtype=np.uint8)
    # (H, W, classes): free for the model's channels-last output, and both the arg-max
    # and the gathers below then read each pixel's class scores contiguously.
    lg = logits.float().permute(1, 2, 0).contiguous().numpy()
    if model_labels is None:
        model_labels = lg.argmax(axis=-1).astype(np.uint8)
    # uniform[i, j]: the 2x2 block with top-left (i, j) has one label
    lab_p = np.pad(model_labels, ((0, 1), (0, 1)), mode="edge")
    uniform = (
        (lab_p[:-1, :-1] == lab_p[1:, :-1])
        & (lab_p[:-1, :-1] == lab_p[:-1, 1:])
        & (lab_p[:-1, :-1] == lab_p[1:, 1:])
    )
    if inv[0, 1] == 0 and inv[1, 0] == 0:
        fi = inv[0, 0] * dr + mc0[0]
        fj = inv[1, 1] * dc + mc0[1]
        rows = np.flatnonzero((fi >= 0) & (fi <= mr - 1))
        cols = np.flatnonzero((fj >= 0) & (fj <= mc - 1))
        if rows.size == 0 or cols.size == 0:
            return out
        pi, pj = fi[rows], fj[cols]
        i0 = np.clip(np.floor(pi).astype(np.int64), 0, mr - 1)
        j0 = np.clip(np.floor(pj).astype(np.int64), 0, mc - 1)
        # rows and cols are contiguous runs (fi, fj are linear): plain slices, and
        # take() along one axis at a time is much cheaper than fancy np.ix_ indexing.
        labels = model_labels.take(i0, axis=0).take(j0, axis=1)
        mixed_r, mixed_c = np.nonzero(uniform.take(i0, axis=0).take(j0, axis=1) == 0)
        if mixed_r.size:
            labels[mixed_r, mixed_c] = _interpolated_argmax(
                lg, i0[mixed_r], j0[mixed_c], pi[mixed_r], pj[mixed_c]
            )
        out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = labels
        return out
    fi = inv[0, 0] * dr[:, None] + inv[0, 1] * dc[None, :] + mc0[0]
    fj = inv[1, 0] * dr[:, None] + inv[1, 1] * dc[None, :] + mc0[1]
    inside = (fi >= 0) & (fi <= mr - 1) & (fj >= 0) & (fj <= mc - 1)
    if not inside.any():
        return out
    pi, pj = fi[inside], fj[inside]
    i0 = np.clip(np.floor(pi).astype(np.int64), 0, mr - 1)
    j0 = np.clip(np.floor(pj).astype(np.int64), 0, mc - 1)
    flat = model_labels[i0, j0]
    mixed = ~uniform[i0, j0]
    if mixed.any():
        flat[mixed] = _interpolated_argmax(lg, i0[mixed], j0[mixed], pi[mixed], pj[mixed])
    out[inside] = flat
    return out


def _interpolated_argmax(
    lg: np.ndarray, i0: np.ndarray, j0: np.ndarray, pi: np.ndarray, pj: np.ndarray
) -> np.ndarray:
    """Arg-max of the logits ``lg`` ``(H, W, classes)`` bilinearly interpolated at model
    points ``(pi, pj)`` (``i0``, ``j0``: their floors)."""
    mr, mc = lg.shape[:2]
    di = (pi - i0).astype(np.float32)[:, None]
    dj = (pj - j0).astype(np.float32)[:, None]
    i1 = np.minimum(i0 + 1, mr - 1)
    j1 = np.minimum(j0 + 1, mc - 1)
    # rows of the (H * W, classes) view by flat index: take() is ~5x cheaper than lg[i, j]
    flat = lg.reshape(mr * mc, -1)
    val = (
        flat.take(i0 * mc + j0, axis=0) * ((1 - di) * (1 - dj))
        + flat.take(i1 * mc + j0, axis=0) * (di * (1 - dj))
        + flat.take(i0 * mc + j1, axis=0) * ((1 - di) * dj)
        + flat.take(i1 * mc + j1, axis=0) * (di * dj)
    )
    return val.argmax(axis=1).astype(np.uint8)


def labels_to_model(labels: np.ndarray, grid: SliceGrid) -> np.ndarray:
    """A native label map sampled (nearest) on the model grid (training targets)."""
    sampled, _ = resample_to_model(labels.astype(np.float32), grid, mode="nearest")
    return np.rint(sampled).astype(np.uint8)
