"""Anterior-column refinement: disc or vertebral body, decided with the block's neighbouring slices.

Why: on some contrasts the disc and the vertebral body look alike on one axial slice (both an
oval of similar signal), and the 2D segmentation network then labels a whole disc-centre
slice vertebral body, or an endplate slice disc. The slices above and below settle it: in a
block planned through a disc, the disc slices sit between endplates and vertebral bodies whose
appearance differs from theirs. This stage re-reads, on every slice with a coarse anterior
column (disc + vertebral body), a column-centred patch of the slice and of its two neighbours
in the same geometric block (:func:`ai.levels.split_blocks`), with the coarse labels of all
three, and predicts {other, disc, vertebral body} per pixel.

It only changes *identity*: a pixel the coarse stage called disc or vertebral body becomes
the other of the two only where the refiner gives that one more than ``min_share`` (0.8) of
their joint probability, so a hesitant refiner leaves the coarse decision alone; no pixel enters or leaves the column,
and no other structure is touched. The patch is laid out in the canonical frame of
:mod:`ai.inference` (rows toward posterior, columns toward the patient's left).

Input channels (:func:`in_channels`): the images of slices k-c .. k+c, ``c`` =
:attr:`ColumnConfig.context` (normalised together by the 1st-99th percentiles of slice k's
patch; a missing neighbour is zeros), their coarse column labels as +1 disc / -1 vertebral
body / 0 other, and one constant plane per neighbour saying whether it exists. Version 1
read one neighbour each side (8 channels); version 2 reads two (14 channels), which sees a
whole 5-slice block: an endplate slice next to the disc centre is told from the disc by
comparing it with the vertebral body beyond it.
Weights and card: ``ai/weights/column.safetensors`` + ``column-card.json`` (name
:data:`MODEL_NAME`), checked (schema, geometry, SHA-256) at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ai.canal_refine import patch_box, patch_coords, patch_matrix, probs_to_native
from ai.labels import Label
from ai.levels import KEEP_DISC_EVIDENCE as KEEP_DISC_EVIDENCE
from ai.levels import PLANNED_BLOCK_MAX_SLICES, split_blocks
from ai.model import UNetConfig
from ai.postprocess import mask_centroid
from ai.refiner import SHIPPED_WEIGHTS_DIR as SHIPPED_WEIGHTS_DIR
from ai.refiner import PatchRefiner, RefinerCardError, check_card
from ai.volume import Volume

logger = logging.getLogger(__name__)

MODEL_NAME = "lumbar-column-refiner"
WEIGHTS_FILE = "column.safetensors"
CARD_FILE = "column-card.json"
#: Refiner classes, in output-channel order.
CLASSES: tuple[str, ...] = ("other", "disc", "vertebral_body")
#: Fewer coarse column pixels than this on a slice: no column to refine.
MIN_COLUMN_PX = 20
#: Intensity percentiles of slice k's patch mapped to 0 and 1 (all the block images read).
NORM_PCT = (1.0, 99.0)
#: A slice whose column changes identity over more than this share gets a flag.
FLAG_SHARE = 0.5
#: Longest block (slices) the refiner runs on: it was trained on blocks planned through one
#: disc (3-5 slices, :func:`ai.phantom.study.plan_blocks`). On a continuous stack (one long
#: block through discs and vertebral bodies alike) it turned vertebral-body slices into discs
#: and the level finder saw discs that are not there (all 22 continuous series of the 60
#: held-out grading series, ``docs/grading.md``), so longer blocks keep the coarse column.
MAX_BLOCK_SLICES = PLANNED_BLOCK_MAX_SLICES
DISC = int(Label.DISC)
BODY = int(Label.VERTEBRAL_BODY)


class ColumnRefinerError(RefinerCardError):
    """The column refiner card is invalid or does not match its weights."""


@dataclass(frozen=True)
class ColumnConfig:
    """Patch geometry and network (recorded in the card)."""

    patch_mm: float = 76.8
    patch_px: int = 48
    channels: tuple[int, ...] = (12, 24, 48, 64)
    #: neighbouring slices read on each side (1: k-1, k+1; 2: k-2 .. k+2)
    context: int = 1
    #: a coarse pixel changes identity only where the refiner gives the other of the two
    #: classes more than this share of P(disc) + P(body) (0.8: chosen on tuning studies)
    min_share: float = 0.8

    def __post_init__(self) -> None:
        if not 30.0 <= self.patch_mm <= 160.0:
            raise ColumnRefinerError(f"patch_mm {self.patch_mm} outside 30-160 mm")
        if self.patch_px < 16 or self.patch_px % self.unet_config.divisor:
            raise ColumnRefinerError(
                f"patch_px must be >= 16 and a multiple of {self.unet_config.divisor}"
            )
        if not 0.5 <= self.min_share < 1.0:
            raise ColumnRefinerError(f"min_share {self.min_share} outside 0.5-1")
        if self.context not in (1, 2):
            raise ColumnRefinerError(f"context must be 1 or 2 slices, got {self.context}")

    @property
    def mm_per_px(self) -> float:
        return self.patch_mm / self.patch_px

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=in_channels(self.context), num_classes=len(CLASSES),
                          channels=self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {"patch_mm": self.patch_mm, "patch_px": self.patch_px,
                "mm_per_px": round(self.mm_per_px, 5), "channels": list(self.channels),
                "context": self.context, "min_share": self.min_share}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColumnConfig:
        try:
            return cls(patch_mm=float(d["patch_mm"]), patch_px=int(d["patch_px"]),
                       channels=tuple(int(c) for c in d["channels"]),
                       context=int(d.get("context", 1)),  # version 1 cards predate the field
                       min_share=float(d.get("min_share", 0.8)))
        except (KeyError, TypeError) as exc:
            raise ColumnRefinerError(f"column refiner config is malformed: {exc}") from exc


def validate_card(card: dict[str, Any]) -> ColumnConfig:
    """Raise :class:`ColumnRefinerError` naming the first missing or malformed card field."""
    check_card(card, ("name", "version", "config", "classes", "weights_sha256", "training",
                      "evaluation", "intended_use"),
               MODEL_NAME, CLASSES, ColumnRefinerError, "column refiner")
    return ColumnConfig.from_dict(card["config"])


# --------------------------------------------------------------------------- inputs


def column_mask(labels_2d: np.ndarray) -> np.ndarray:
    """Disc + vertebral body pixels of a label slice."""
    return (labels_2d == DISC) | (labels_2d == BODY)


def column_centre(labels_2d: np.ndarray, column: np.ndarray | None = None) -> tuple[float, float] | None:
    """Centroid ``(row, col)`` of the coarse disc + vertebral body, or None when too small.

    ``column``: :func:`column_mask` of the slice when the caller has it already.
    """
    column = column_mask(labels_2d) if column is None else column
    if int(column.sum()) < MIN_COLUMN_PX:
        return None
    return mask_centroid(column)


def sample_planes(planes: np.ndarray, coords: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """``(m, h, w)`` native planes sampled at patch ``coords`` ``(2, n, n)`` -> ``(m, n, n)``.

    Bilinear sampling repeats the edge outside the slice; nearest sampling gives 0 there.
    """
    h, w = planes.shape[-2:]
    gx = coords[1] / max(w - 1, 1) * 2.0 - 1.0
    gy = coords[0] / max(h - 1, 1) * 2.0 - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
    t = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None]
    padding = "zeros" if mode == "nearest" else "border"
    return F.grid_sample(t, grid, mode=mode, padding_mode=padding, align_corners=True)[0].numpy()


def signed_column(labels_2d: np.ndarray) -> np.ndarray:
    """+1 on disc, -1 on vertebral body, 0 elsewhere (float32)."""
    return (labels_2d == DISC).astype(np.float32) - (labels_2d == BODY).astype(np.float32)


def image_planes(context: int) -> int:
    """Slices read for ``context`` neighbours each side: the first this many input channels are images."""
    return 2 * context + 1


def in_channels(context: int) -> int:
    """Input channels for ``context`` neighbours each side: images, coarse labels, presence planes."""
    return 2 * image_planes(context) + 2 * context


def block_input(images: np.ndarray, labels: np.ndarray, k: int, coords: np.ndarray,
                context: int = 1) -> np.ndarray:
    """Network input ``(in_channels(context), n, n)`` for slice ``k`` of one block's ``images`` / ``labels``."""
    n_slices = len(images)
    idx = tuple(range(k - context, k + context + 1))
    present = [0 <= i < n_slices for i in idx]
    box = patch_box(coords, images.shape)
    if box is not None:
        (rows, cols), coords = box
        images, labels = images[:, rows, cols], labels[:, rows, cols]
    img = sample_planes(np.stack([images[i] if p else images[k] for i, p in zip(idx, present, strict=True)]), coords)
    lo, hi = np.percentile(img[context], NORM_PCT)
    img = np.clip((img - lo) / max(float(hi - lo), 1e-6), -0.5, 1.5)
    masks = sample_planes(
        np.stack([signed_column(labels[i]) if p else np.zeros(labels[k].shape, np.float32)
                  for i, p in zip(idx, present, strict=True)]),
        coords,
    )
    n = coords.shape[-1]
    for j, p in enumerate(present):
        if not p:
            img[j] = 0.0
    flags = np.stack([np.full((n, n), float(p), np.float32)
                      for j, p in enumerate(present) if j != context])
    return np.concatenate([img, masks, flags]).astype(np.float32)


# --------------------------------------------------------------------------- the refiner


class ColumnRefiner(PatchRefiner):
    """The loaded network; :meth:`refine` applies it to a label volume."""

    STAGE = "column refiner"
    WHAT = "column refiner"
    WEIGHTS_FILE = WEIGHTS_FILE
    CARD_FILE = CARD_FILE
    ERROR = ColumnRefinerError
    BATCH = 32
    config: ColumnConfig

    @staticmethod
    def validate_card(card: dict[str, Any]) -> ColumnConfig:
        return validate_card(card)

    def refine(
        self, labels: np.ndarray, volume: Volume, disc_evidence: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Labels ``(n, rows, cols)`` with the column's identity re-decided, and flags.

        ``disc_evidence`` (the coarse model's, one value per slice): a slice at or above
        :data:`ai.levels.KEEP_DISC_EVIDENCE` keeps its coarse disc.

        A flag names each slice where more than :data:`FLAG_SHARE` of the column changed
        between disc and vertebral body, so a reader sees that the two stages disagreed.
        Blocks longer than :data:`MAX_BLOCK_SLICES` are left as they are.
        """
        if labels.shape != volume.pixels.shape:
            raise ValueError(f"labels {labels.shape} and volume {volume.pixels.shape} differ")
        todo: list[tuple[int, tuple[float, float], np.ndarray, int]] = []
        inputs: list[np.ndarray] = []
        for block in split_blocks(volume):
            if len(block) > MAX_BLOCK_SLICES:
                continue
            images = volume.pixels[block]
            block_labels = labels[block]
            for j, k in enumerate(block):
                column = column_mask(labels[k])  # whole-slice: once per slice, for the centre and the flag
                centre = column_centre(labels[k], column)
                if centre is None:
                    continue
                matrix = patch_matrix(volume.pixel_spacing, self.config.mm_per_px, volume.orientations[k])
                coords = patch_coords(centre, matrix, self.config.patch_px)
                inputs.append(block_input(images, block_labels, j, coords, self.config.context))
                todo.append((k, centre, matrix, int(column.sum())))
        out = labels.copy()
        flags: list[str] = []
        if not todo:
            return out, flags
        probs = self.predict_patches(np.stack(inputs))
        for (k, centre, matrix, n_column), p in zip(todo, probs, strict=True):
            box, sampled, inside = probs_to_native(p, labels[k].shape, centre, matrix)
            if sampled.size == 0:
                continue
            sub = out[k][box]
            column = inside & ((sub == DISC) | (sub == BODY))
            share = sampled[1] / np.maximum(sampled[1] + sampled[2], 1e-6)
            to_disc = column & (sub == BODY) & (share > self.config.min_share)
            to_body = column & (sub == DISC) & (share < 1.0 - self.config.min_share)
            if disc_evidence is not None and disc_evidence[k] >= KEEP_DISC_EVIDENCE:
                to_body[:] = False
            changed = to_disc | to_body
            sub[to_disc] = DISC
            sub[to_body] = BODY
            if changed.sum() > FLAG_SHARE * n_column:
                flags.append(
                    f"slice {k}: the column refiner changed {int(changed.sum())} of {n_column} "
                    "disc / vertebral body pixels (the 2D model and its neighbours disagreed)"
                )
        return out, flags
