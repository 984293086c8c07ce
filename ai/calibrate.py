"""Logit calibration of a trained segmentation model: per-class offsets that remove its area bias.

Why: a class weighted ``w`` in the training loss is predicted as if its prior were ``w``
times larger, which moves its boundary outward (the vertebral body, weighted 5: one native
pixel all round, +50 mm2 per slice). Subtracting an offset from that class's logit undoes
it (logit adjustment). The offsets belong to one set of weights, so every retrained model
needs its own: ``lumbar-node calibrate`` fits them on labelled studies and writes them into
the card (``calibration.logit_offsets``), where the Analyzer applies them.

The fit: the network runs once over the calibration studies and its logits are kept at
every :data:`STRIDE`-th pixel row and column, with the truth there. By default on the
native grid (``grid="native"``): the logits interpolated bilinearly onto the native pixels,
as :func:`ai.inference.to_native` does before its arg-max, so the fitted areas are the
native areas the measurements use. ``grid="model"`` keeps the model-grid logits and the
truth resampled to the model grid (the first version: see the limitation below). For each
fitted class, the offset at which the model
predicts as many pixels of that class as the truth holds, over all slices: in closed form
for a class outside the anterior column (it is predicted where its logit margin over the
best other class exceeds the offset), by bisection for the disc and the vertebral body,
whose offsets interact through the kept identity and whose confusions with each other are
left out of the count (see :class:`Counts`). Classes are fitted one after the other, and
the sweep repeats until no offset moves by more than the tolerance (neighbouring classes
compete for the same boundary pixels). Offsets are applied exactly as the Analyzer applies
them (:func:`ai.inference.calibrate_logits`: the disc / vertebral body identity stays raw).

Why the native grid: the measurements count native pixels, labelled from logits
interpolated onto a finer grid, so that is where the areas should match (for the shipped
model both grids give offsets within 0.04 except the disc's, ``docs/evaluation.md``). One
approximation remains: the pipeline keeps the disc / body identity
(:func:`ai.inference.keep_column_identity`) before interpolating, the fit after; the two
differ only where the identity changes between neighbouring model pixels.

Limitation: the fit sees the coarse model's output only. Later stages move areas too: the
canal refiner hands the canal pixels it removes to their nearest label, mostly posterior
elements (+13-18 mm2 per slice on the held-out phantoms), which a fitted posterior-element
offset cannot anticipate.

Not fitted by default: the dural sac and the epidural space, which the canal refiner
re-decides from the coarse masks (their coarse area is that stage's input, not an output),
and the background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ai.card import MAX_LOGIT_OFFSET, ModelCard
from ai.inference import calibrate_logits, pre_process, predict
from ai.labels import Label
from ai.model_grid import SliceGrid, covered_by_model, labels_to_model, normalised_grid
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: The fit reads every STRIDE-th row and column (a quarter of the pixels: the pixel counts
#: stay unbiased, and the native-grid logits of 1,500 slices fit in about 1.5 GB).
STRIDE = 2
#: Where the logits and the truth are compared (see the module docstring).
GRIDS = ("native", "model")
#: Classes :func:`fit_offsets` leaves alone unless asked (see the module docstring).
NOT_FITTED_BY_DEFAULT: tuple[Label, ...] = (Label.BACKGROUND, Label.DURAL_SAC, Label.EPIDURAL_SPACE)
#: Stop when no offset moved by more than this in a sweep (logit units).
TOLERANCE = 0.01
MAX_SWEEPS = 8
#: Bisection stops when the bracket is this narrow (logit units).
BISECTION_WIDTH = 0.002
#: Pixels per chunk when counting (bounds the float32 working copy of the logits).
CHUNK = 1 << 20
#: The anterior column's two classes: their offsets interact (the identity between them stays
#: raw), so they are fitted by bisection; every other class has a closed-form offset.
COLUMN = (Label.VERTEBRAL_BODY, Label.DISC)


@dataclass
class CalibrationSet:
    """The network's raw logits and the truth at the model-grid pixels inside the field of view.

    Attributes
    ----------
    logits
        ``(pixels, classes)`` float16 raw logits.
    truth
        ``(pixels,)`` int64 true labels.
    n_slices, n_cases
        Slices and studies (series) the pixels come from.
    """

    logits: torch.Tensor
    truth: torch.Tensor
    n_slices: int = 0
    n_cases: int = 0
    grid: str = "native"

    def subset(self, keep: torch.Tensor) -> CalibrationSet:
        return CalibrationSet(self.logits[keep], self.truth[keep], self.n_slices, self.n_cases, self.grid)


def native_samples(logits: torch.Tensor, grid: SliceGrid, stride: int = STRIDE) -> tuple[torch.Tensor, np.ndarray]:
    """One slice's model-grid logits ``(classes, H, W)`` interpolated onto its native grid.

    Returns ``(pixels, classes)`` float32 logits at every ``stride``-th native row and column
    that lies inside the model's field of view (bilinear, as :func:`ai.inference.to_native`),
    and the boolean ``(rows, cols)`` mask of those pixels on the strided native grid (outside
    it :func:`~ai.inference.to_native` gives background whatever the offsets).
    """
    nr, nc = grid.native_shape
    mr, mc = grid.model_shape
    rows, cols = np.meshgrid(np.arange(0, nr, stride), np.arange(0, nc, stride), indexing="ij")
    ij = grid.native_to_model(np.stack([rows, cols], axis=-1).astype(np.float64))
    inside, ij = covered_by_model(ij, grid.model_shape)
    points = normalised_grid(ij[inside], grid.model_shape).view(1, 1, -1, 2)
    sampled = torch.nn.functional.grid_sample(
        logits[None].float(), points, mode="bilinear", align_corners=True
    )
    return sampled[0, :, 0, :].T, inside


def collect(
    network: torch.nn.Module,
    card: ModelCard,
    cases: Iterable[tuple[Volume, np.ndarray]],
    device: torch.device,
    *,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    grid: str = "native",
) -> CalibrationSet:
    """Run the raw ``network`` once over ``(volume, truth labels)`` pairs (the truth on the native grid).

    ``grid``: ``"native"`` (the default) or ``"model"``, see the module docstring.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, not {grid!r}")
    logits: list[torch.Tensor] = []
    truths: list[torch.Tensor] = []
    n_cases = n_slices = 0
    for volume, truth_labels in cases:
        if truth_labels.shape != volume.pixels.shape:
            raise ValueError(f"truth {truth_labels.shape} differs from the volume {volume.pixels.shape}")
        pre = pre_process(volume, card)
        out = predict(network, pre.images, device, batch_size, dtype)
        for k, slice_grid in enumerate(pre.grids):
            if grid == "native":
                sampled, truth = _native_pixels(out[k], slice_grid, truth_labels[k])
            else:
                sampled, truth = _model_pixels(out[k], slice_grid, truth_labels[k], pre.valid[k])
            logits.append(sampled.to(torch.float16))
            truths.append(truth)
        n_cases += 1
        n_slices += volume.n_slices
        if progress is not None:
            progress(volume.n_slices)
    if not logits:
        raise ValueError("no calibration cases")
    return CalibrationSet(torch.cat(logits), torch.cat(truths), n_slices, n_cases, grid)


def _native_pixels(logits: torch.Tensor, grid: SliceGrid, truth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels, classes)`` logits interpolated onto the strided native grid, and the truth there."""
    sampled, inside = native_samples(logits, grid)
    return sampled, torch.from_numpy(truth[::STRIDE, ::STRIDE][inside].astype(np.int64))


def _model_pixels(
    logits: torch.Tensor, grid: SliceGrid, truth: np.ndarray, valid: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels, classes)`` logits on the strided model grid inside the field of view, and the
    truth resampled there."""
    inside = torch.from_numpy(valid[::STRIDE, ::STRIDE].copy())
    model_truth = labels_to_model(truth, grid)[::STRIDE, ::STRIDE].astype(np.int64)
    return logits[:, ::STRIDE, ::STRIDE].permute(1, 2, 0)[inside], torch.from_numpy(model_truth)[inside]


def _chunks(data: CalibrationSet, offsets: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(calibrated logits (n, classes), truth (n,))`` chunk by chunk."""
    for start in range(0, data.truth.shape[0], CHUNK):
        logits = data.logits[start : start + CHUNK].float()
        shifted = calibrate_logits(logits.T[None, :, None, :], offsets)[0, :, 0, :].T
        yield shifted, data.truth[start : start + CHUNK]


@dataclass
class Counts:
    """Pixel counts per class over some calibration pixels (additive over disjoint pixel sets).

    ``swapped[c]``, for the two column classes: pixels predicted ``c`` whose truth is the
    other one. Those are identity errors, which the column refiner and the series disc
    assignment re-decide downstream (the calibration keeps the identity raw), so the area
    bias of a column class (:meth:`excess`) leaves them out on both sides.
    """

    pred: np.ndarray
    true: np.ndarray
    inter: np.ndarray
    swapped: np.ndarray

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.pred + other.pred, self.true + other.true, self.inter + other.inter,
                      self.swapped + other.swapped)

    def excess(self, cls: int) -> int:
        """Predicted minus true pixels of ``cls`` (for a column class, without the identity errors)."""
        out = int(self.pred[cls]) - int(self.true[cls])
        if cls in _OTHER_COLUMN:
            out += int(self.swapped[_OTHER_COLUMN[cls]]) - int(self.swapped[cls])
        return out

    def bias_pct(self, cls: int) -> float:
        return 100.0 * self.excess(cls) / max(int(self.true[cls]), 1)

    def dice(self, cls: int) -> float:
        return 2.0 * float(self.inter[cls]) / max(int(self.pred[cls] + self.true[cls]), 1)


#: Column class -> the other one (whose confusions with it :meth:`Counts.excess` leaves out).
_OTHER_COLUMN = {int(c): int(other) for c, other in zip(COLUMN, reversed(COLUMN), strict=True)}


def counts(data: CalibrationSet, offsets: torch.Tensor) -> Counts:
    """:class:`Counts` of ``data`` with these offsets."""
    n_classes = data.logits.shape[1]
    pred_n = torch.zeros(n_classes, dtype=torch.int64)
    inter = torch.zeros(n_classes, dtype=torch.int64)
    swapped = torch.zeros(n_classes, dtype=torch.int64)
    for shifted, truth in _chunks(data, offsets):
        pred = shifted.argmax(dim=1)
        pred_n += torch.bincount(pred, minlength=n_classes)
        inter += torch.bincount(pred[pred == truth], minlength=n_classes)
        for c, other in _OTHER_COLUMN.items():
            swapped[c] += int(((pred == c) & (truth == other)).sum())
    true_n = torch.bincount(data.truth, minlength=n_classes)
    return Counts(pred_n.numpy(), true_n.numpy(), inter.numpy(), swapped.numpy())


@dataclass
class CalibrationFit:
    """Fitted offsets (label name -> logit units) and what they did on the calibration slices."""

    offsets: dict[str, float]
    #: label name -> {true_px, bias_pct_before, bias_pct_after, dice_before, dice_after, offset}
    table: dict[str, dict[str, float]] = field(default_factory=dict)
    sweeps: int = 0
    n_slices: int = 0
    n_cases: int = 0
    grid: str = "native"

    def to_dict(self) -> dict[str, Any]:
        return {"offsets": self.offsets, "table": self.table, "sweeps": self.sweeps,
                "n_slices": self.n_slices, "n_cases": self.n_cases, "grid": self.grid, "stride": STRIDE}


def _margins(data: CalibrationSet, offsets: torch.Tensor, cls: int) -> torch.Tensor:
    """Per pixel, ``cls``'s calibrated logit minus the best other one, with ``cls``'s offset at 0."""
    trial = offsets.clone()
    trial[cls] = 0.0
    out = []
    for shifted, _ in _chunks(data, trial):
        own = shifted[:, cls].clone()
        shifted[:, cls] = -torch.inf
        out.append(own - shifted.max(dim=1).values)
    return torch.cat(out)


def _clamped(cls: int, value: float) -> float:
    if abs(value) > MAX_LOGIT_OFFSET:
        value = float(np.clip(value, -MAX_LOGIT_OFFSET, MAX_LOGIT_OFFSET))
        logger.warning("%s: no offset within +-%g matches its true area; clamped to %g",
                       Label(cls).name, MAX_LOGIT_OFFSET, value)
    return value


def _closed_form(data: CalibrationSet, offsets: torch.Tensor, cls: int, target: int) -> float:
    """Offset of a class outside the column: it is predicted where its margin exceeds the offset,
    so the offset that predicts ``target`` pixels lies between the target-th and the next margin."""
    margins = torch.sort(_margins(data, offsets, cls), descending=True).values
    if target <= 0:
        return _clamped(cls, float(margins[0]) + 1e-3)
    if target >= margins.numel():
        return _clamped(cls, float(margins[-1]) - 1e-3)
    return _clamped(cls, 0.5 * float(margins[target - 1] + margins[target]))


def _bisect(data: CalibrationSet, offsets: torch.Tensor, cls: int) -> float:
    """Offset of a column class (others fixed) at which its :meth:`Counts.excess` is zero.

    Only pixels whose raw margin lies within twice the offset bound can change (every
    calibrated logit stays within the bound of its raw value): the others are counted once.
    """
    in_play = _margins(data, torch.zeros_like(offsets), cls).abs() <= 2 * MAX_LOGIT_OFFSET + 1e-3
    fixed = counts(data.subset(~in_play), offsets)
    play = data.subset(in_play)
    lo, hi = -MAX_LOGIT_OFFSET, MAX_LOGIT_OFFSET

    def excess(value: float) -> int:
        trial = offsets.clone()
        trial[cls] = value
        return (fixed + counts(play, trial)).excess(cls)

    if excess(lo) < 0:
        return _clamped(cls, lo - 1.0)
    if excess(hi) > 0:
        return _clamped(cls, hi + 1.0)
    # the excess falls with the offset; where it is zero over a range, take the range's middle
    first_zero_or_less = _first(lambda v: excess(v) <= 0, lo, hi)
    last_zero_or_more = _first(lambda v: excess(v) < 0, lo, hi)
    return 0.5 * (first_zero_or_less + last_zero_or_more)


def _first(condition: Callable[[float], bool], lo: float, hi: float) -> float:
    """The smallest value in ``[lo, hi]`` where a monotone ``condition`` holds (``hi`` if never)."""
    if condition(lo):
        return lo
    while hi - lo > BISECTION_WIDTH:
        mid = 0.5 * (lo + hi)
        if condition(mid):
            hi = mid
        else:
            lo = mid
    return hi


def fit_offsets(
    data: CalibrationSet,
    classes: Iterable[Label] | None = None,
    start: torch.Tensor | None = None,
    *,
    tolerance: float = TOLERANCE,
    max_sweeps: int = MAX_SWEEPS,
) -> CalibrationFit:
    """Offsets of ``classes`` (default: all but :data:`NOT_FITTED_BY_DEFAULT`) that zero their area bias.

    ``start``: offsets of every class before the fit (default zeros); classes not fitted keep
    theirs. A class absent from the truth cannot be fitted and raises ``ValueError``.
    """
    n_classes = data.logits.shape[1]
    fitted = list(classes) if classes is not None else [c for c in Label if c not in NOT_FITTED_BY_DEFAULT]
    offsets = start.clone().float() if start is not None else torch.zeros(n_classes)
    for c in fitted:
        offsets[int(c)] = 0.0
    before = counts(data, offsets)
    missing = [c.name for c in fitted if before.true[int(c)] == 0]
    if missing:
        raise ValueError(f"the calibration studies hold no {', '.join(missing)}: cannot fit")
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        moved = 0.0
        for c in fitted:
            if c in COLUMN:
                value = _bisect(data, offsets, int(c))
            else:
                value = _closed_form(data, offsets, int(c), int(before.true[int(c)]))
            moved = max(moved, abs(value - float(offsets[int(c)])))
            offsets[int(c)] = value
        logger.info("calibration sweep %d: largest change %.3f", sweeps, moved)
        if moved <= tolerance:
            break
    else:
        logger.warning("calibration did not settle within %d sweeps (last change %.3f)", max_sweeps, moved)
    after = counts(data, offsets)
    table = {
        c.name: {
            "true_px": int(before.true[int(c)]),
            "bias_pct_before": round(before.bias_pct(int(c)), 2),
            "bias_pct_after": round(after.bias_pct(int(c)), 2),
            "dice_before": round(before.dice(int(c)), 4),
            "dice_after": round(after.dice(int(c)), 4),
            "offset": round(float(offsets[int(c)]), 3),
        }
        for c in fitted
    }
    return CalibrationFit(
        offsets={c.name: round(float(offsets[int(c)]), 3) for c in fitted},
        table=table, sweeps=sweeps, n_slices=data.n_slices, n_cases=data.n_cases, grid=data.grid,
    )
