"""Series-level disc decisions: an angled block with no disc slice gets one where the model's
disc evidence peaks, an even block's single disc slice moves to a far stronger evidence peak,
and in an odd block the disc run is made symmetric about the centre slice.

Why: the technologist plans each angled axial block through a disc, so a short block whose
slices are all labelled vertebral body means the per-slice decision failed, not that the
disc is absent. On contrasts where disc and vertebral body look alike (a degenerated
"black" disc, or an unusual sequence) a 2D model sometimes labels the whole disc-centre
slice vertebral body, and the level then vanishes from the report: no measurements, no
grade. The model's disc probability on that slice is still well above that of its
neighbours (``ai.inference.disc_evidence``), so the block's peak is relabelled disc and a
flag says so. Thresholds were set on phantom tuning studies (seeds 7701 / 7702), not on
the published held-out set; see ``docs/segmentation.md``.
"""

from __future__ import annotations

import logging

import numpy as np

from ai.labels import Label
from ai.levels import (
    KEEP_DISC_EVIDENCE,
    MIN_DISC_AREA_MM2,
    PLANNED_BLOCK_MAX_SLICES,
    disc_slices,
    slice_areas,
    split_blocks,
)
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Blocks shorter than this have no interior slice to assign.
MIN_BLOCK_SLICES = 3
#: Longer blocks are continuous stacks over several levels: "one disc per block" does not hold.
MAX_BLOCK_SLICES = 9
#: The peak slice's disc evidence must exceed every other slice's of the block by this factor ...
PEAK_RATIO = 1.5
#: ... and reach this absolute value (evidence is the disc share of the body, 0-1). It scales
#: with the model's confidence, so a model card may set its own
#: (``calibration.disc_evidence_floor``); this default is the shipped model's: 0.01 suited
#: segmentation 1.2.x, 1.3.x gives a black disc 0.0057 (tuning study 7701_025), so 0.003,
#: checked on the tuning studies 7701-7704.
MIN_EVIDENCE = 0.003
#: Longest odd block :func:`centre_disc_runs` applies to (the blocks it was tuned on).
CENTRED_MAX_SLICES = PLANNED_BLOCK_MAX_SLICES
#: :func:`move_even_block_discs`: the evidence peak must exceed the disc slice's by this factor.
#: Between the two tuning cases (7706_034: 3.1, the disc slice right; 7708_030: 40, the peak
#: right); docs/evaluation.md, twenty-first session.
EVEN_BLOCK_PEAK_RATIO = 10.0


def _relabel(out: np.ndarray, labels: np.ndarray, k: int, src: Label, dst: Label) -> np.ndarray:
    """Slice ``k``'s ``src`` pixels become ``dst`` (identity only; the column keeps its extent).

    ``out`` is copied from ``labels`` on the first change, so the input is never modified.
    """
    if out is labels:
        out = labels.copy()
    out[k][out[k] == int(src)] = int(dst)
    return out


def assign_block_discs(
    labels: np.ndarray, volume: Volume, evidence: np.ndarray, min_evidence: float = MIN_EVIDENCE
) -> tuple[np.ndarray, list[str]]:
    """Relabel the vertebral body of a disc-less block's evidence peak as disc.

    ``labels`` is the post-processed native label volume (caudal -> cranial, as
    ``volume``), ``evidence`` the per-slice :func:`ai.inference.disc_evidence`. A block
    (:func:`ai.levels.split_blocks`) of :data:`MIN_BLOCK_SLICES`-:data:`MAX_BLOCK_SLICES`
    slices qualifies when none of its slices is a disc slice by the level finder's own
    criteria (:func:`ai.levels.disc_slices`). Its peak must be an interior slice (a block
    is centred on its disc), beat every other slice of the block by :data:`PEAK_RATIO`,
    reach ``min_evidence`` (default :data:`MIN_EVIDENCE`) and show at least :data:`ai.levels.MIN_DISC_AREA_MM2` of
    vertebral body. Returns new labels (the input is not changed) and one flag per
    assignment.
    """
    if evidence.shape != (labels.shape[0],):
        raise ValueError(f"evidence must have one value per slice, got {evidence.shape}")
    out = labels
    flags: list[str] = []
    is_disc = disc_slices(labels, volume)
    body_area = slice_areas(labels, volume, Label.VERTEBRAL_BODY)
    for b, block in enumerate(split_blocks(volume)):
        if not MIN_BLOCK_SLICES <= len(block) <= MAX_BLOCK_SLICES or is_disc[block].any():
            continue
        interior = block[1:-1]
        peak = max(interior, key=lambda i: float(evidence[i]))
        others = max(float(evidence[i]) for i in block if i != peak)
        value = float(evidence[peak])
        if value < min_evidence or value < PEAK_RATIO * others or body_area[peak] < MIN_DISC_AREA_MM2:
            continue
        out = _relabel(out, labels, peak, Label.VERTEBRAL_BODY, Label.DISC)
        flags.append(
            f"slice {peak}: block {b + 1} had no disc slice; disc assigned where the model's "
            f"disc evidence peaks ({value:.3f} against at most {others:.3f} on the block's other slices)"
        )
        logger.info("disc assigned on slice %d (block %d, evidence %.3f vs %.3f)", peak, b + 1, value, others)
    return out, flags


def move_even_block_discs(
    labels: np.ndarray, volume: Volume, evidence: np.ndarray, min_evidence: float = MIN_EVIDENCE
) -> tuple[np.ndarray, list[str]]:
    """In an even block with one disc slice, move the disc to the interior slice where the
    coarse model's disc evidence is far higher.

    Why: an even block has no centre slice, so nothing in the plan says which of its two
    middle slices holds the disc, and the column refiner sometimes picks the other one
    (tuning study 7708_030: the refiner's disc slice had evidence 0.011, its neighbour 0.445;
    the level was then measured and graded on an endplate). The disc moves when the peak is
    an interior slice, reaches ``min_evidence`` and is at least :data:`EVEN_BLOCK_PEAK_RATIO`
    times the disc slice's evidence; identity only (the disc slice's disc becomes vertebral
    body, the peak's vertebral body disc), one flag per move. Even blocks up to
    :data:`ai.levels.PLANNED_BLOCK_MAX_SLICES` (the planned blocks: 4 slices). Returns new
    labels and flags.
    """
    out = labels
    flags: list[str] = []
    is_disc = disc_slices(labels, volume)
    for b, block in enumerate(split_blocks(volume)):
        n = len(block)
        if n % 2 or not MIN_BLOCK_SLICES <= n <= PLANNED_BLOCK_MAX_SLICES:
            continue
        run = [k for k in block if is_disc[k]]
        if len(run) != 1:
            continue
        old, peak = run[0], max(block[1:-1], key=lambda i: float(evidence[i]))
        value, was = float(evidence[peak]), float(evidence[old])
        if peak == old or value < min_evidence or value < EVEN_BLOCK_PEAK_RATIO * was:
            continue
        out = _relabel(out, labels, old, Label.DISC, Label.VERTEBRAL_BODY)
        out = _relabel(out, labels, peak, Label.VERTEBRAL_BODY, Label.DISC)
        flags.append(
            f"slice {peak}: block {b + 1}'s disc moved here from slice {old}, where the model's disc "
            f"evidence was far lower ({value:.3f} against {was:.3f})"
        )
        logger.info("block %d: disc moved from slice %d to %d (evidence %.3f vs %.3f)", b + 1, old, peak, value, was)
    return out, flags


def centre_disc_runs(
    labels: np.ndarray, volume: Volume, evidence: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """In an odd block whose centre slice is disc, keep the disc run symmetric about it.

    Why: the technologist plans an angled block centred on its disc, so the disc's slices
    lie symmetric about the block's centre slice: one slice, or three, not two. A run of
    two is an endplate next to a one-slice disc called disc (it joins the level and its
    measurements) or one lost outer slice of a three-slice disc; the first is the more
    common and the more harmful, so the run is cut to its symmetric part and the slices
    cut get their disc relabelled vertebral body, with a flag. Applies to blocks of 3 or
    :data:`CENTRED_MAX_SLICES` slices (an even block has no centre slice); disc slices not
    joined to the centre's run are left alone. Chosen on 280 tuning studies
    (``docs/evaluation.md``, twentieth session).

    ``evidence`` (the coarse model's per-slice :func:`ai.inference.disc_evidence`): when
    every slice the cut would remove is near-certain disc (at least
    :data:`ai.levels.KEEP_DISC_EVIDENCE`, the same guard the column refiner keeps),
    the run is made symmetric the other way: the mirror slices across the centre get their
    vertebral body relabelled disc (a three-slice disc whose third slice the refiner lost;
    twenty-first session, ``docs/evaluation.md``). Returns new labels and one flag per slice.
    """
    out = labels
    flags: list[str] = []
    is_disc = disc_slices(labels, volume)
    for b, block in enumerate(split_blocks(volume)):
        n = len(block)
        if n % 2 == 0 or not MIN_BLOCK_SLICES <= n <= CENTRED_MAX_SLICES or not is_disc[block[n // 2]]:
            continue
        c = first = last = n // 2
        while first > 0 and is_disc[block[first - 1]]:
            first -= 1
        while last < n - 1 and is_disc[block[last + 1]]:
            last += 1
        half = min(c - first, last - c)
        extra = [j for j in range(first, last + 1) if abs(j - c) > half]
        if evidence is not None and extra and all(evidence[block[j]] >= KEEP_DISC_EVIDENCE for j in extra):
            for j in extra:
                k = block[2 * c - j]
                out = _relabel(out, labels, k, Label.VERTEBRAL_BODY, Label.DISC)
                flags.append(f"slice {k}: block {b + 1}'s disc slices were not symmetric about its "
                             "centre slice and the far side is near-certain disc; this one relabelled disc")
                logger.info("slice %d: disc run of block %d extended to be symmetric", k, b + 1)
            continue
        for j in extra:
            k = block[j]
            out = _relabel(out, labels, k, Label.DISC, Label.VERTEBRAL_BODY)
            flags.append(f"slice {k}: block {b + 1}'s disc slices were not symmetric about its centre "
                         "slice; this one relabelled vertebral body")
            logger.info("slice %d: disc run of block %d cut to the centre's symmetric part", k, b + 1)
    return out, flags
