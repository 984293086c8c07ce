"""Segmentation inference in three steps: pre_process / predict / post_process.

* :func:`pre_process` resamples every slice onto the model's grid (:mod:`ai.model_grid`: a
  canonical in-plane frame, the card's pixel spacing, a window centred on the slice centre,
  the card's size but widened to the whole left-right field of view), then a robust
  percentile normalisation.
* :func:`predict` runs the network in batches (CUDA + AMP when present, CPU otherwise),
  optionally averaging each slice's logits with those of its mirror image (``mirror``).
* :func:`to_native` maps the logits back onto each slice's native pixel grid
  (bilinear on logits, then arg-max); :func:`ai.postprocess.post_process` then cleans the
  label map and flags (never hides) implausible results.

The geometry is one 2x2 affine per slice (:class:`ai.model_grid.SliceGrid`), so the forward
and backward resampling are exact inverses of each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ai.card import ModelCard, Normalisation
from ai.labels import MIRRORED, Label
from ai.model import UNet
from ai.model_grid import (
    SliceGrid,
    covered_along,
    covered_by_model,
    covering_shape,
    resample_to_model,
    slice_grid,
)
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Inference precisions accepted by :func:`autocast_dtype` (``[ai] precision``).
PRECISIONS = ("auto", "float32", "bfloat16")


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
    mirror: bool = False,
) -> torch.Tensor:
    """Logits ``(n, classes, H, W)`` float32 on the CPU, computed in batches.

    Channels-last tensors; under autocast to ``dtype`` when given (see
    :func:`autocast_dtype`), in float32 otherwise. ``mirror``: each batch runs together
    with its left-right mirror image and the two answers are averaged
    (:func:`unmirror_logits` maps the mirror's back), a second opinion that costs one
    more forward pass. The anterior column's two logits (vertebral body, disc) stay those
    of the first pass: which of the two a slice shows is the decision the column refiner
    and the series disc assignment were tuned on (averaged, it moved whole realistic disc
    slices to vertebral body), as the logit calibration keeps it raw.
    """
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            if mirror:
                batch = torch.cat([batch, torch.flip(batch, dims=[-1])])
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                logits = model(batch).float()
            if mirror:
                n = logits.shape[0] // 2
                plain = logits[:n]
                logits = 0.5 * (plain + unmirror_logits(logits[n:]))
                logits[:, _COLUMN] = plain[:, _COLUMN]
            outputs.append(logits.cpu())
    if not outputs:
        return torch.zeros((0, 1, *images.shape[-2:]))
    return torch.cat(outputs)


def unmirror_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, classes, H, W)`` of mirrored images, as the unmirrored images' logits:
    flipped back along the columns (the patient's left-right axis on the model grid) and
    each left class exchanged with its right (:data:`ai.labels.MIRRORED`)."""
    return torch.flip(logits, dims=[-1])[:, list(MIRRORED)]


#: The anterior column's two classes, whose mutual decision the logit calibration keeps raw.
_BODY, _DISC = int(Label.VERTEBRAL_BODY), int(Label.DISC)
_COLUMN = [_BODY, _DISC]


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
    mirror: bool = False,
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
        logits = predict(
            model, pre.images[start : start + batch_size], device, batch_size, dtype, mirror
        )
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
    near a label boundary are interpolated. Native pixels the model grid does not cover
    (:func:`~ai.model_grid.covered_along`) are background. Grids without in-plane rotation
    (the usual axial slice) take a separable path: model row and column follow from native row and column alone.
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
        row_in, fi = covered_along(fi, mr)
        col_in, fj = covered_along(fj, mc)
        rows, cols = np.flatnonzero(row_in), np.flatnonzero(col_in)
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
    inside, ij = covered_by_model(np.stack([fi, fj], axis=-1), (mr, mc))
    if not inside.any():
        return out
    pi, pj = ij[inside, 0], ij[inside, 1]
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
