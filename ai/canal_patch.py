"""What the canal-centred networks (Schizas grader, canal refiner) share about their patch.

Both read a small patch around the spinal canal of one slice: it is centred by
:func:`canal_centre` and its image channel normalised by :func:`normalise_patch_image`.
One definition keeps the two models' inputs consistent.
"""

from __future__ import annotations

import numpy as np

from ai.labels import Label
from ai.postprocess import mask_centroid

#: Intensity percentiles mapped to 0 and 1 inside the patch (robust to outliers).
NORM_LOW_PCT = 1.0
NORM_HIGH_PCT = 99.0
#: Minimum dural-sac pixels for the sac centroid to centre the patch.
MIN_SAC_PX = 4


def canal_centre(labels_2d: np.ndarray) -> tuple[float, float] | None:
    """Centre ``(row, col)`` in pixels of the canal: dural sac, else sac + epidural space.

    The dural sac centroid is used when the sac has at least :data:`MIN_SAC_PX` pixels (it
    stays central even in severe stenosis); otherwise the whole canal; ``None`` when
    neither is segmented.
    """
    sac = labels_2d == int(Label.DURAL_SAC)
    if int(sac.sum()) >= MIN_SAC_PX:
        return mask_centroid(sac)
    canal = sac | (labels_2d == int(Label.EPIDURAL_SPACE))
    if canal.any():
        return mask_centroid(canal)
    return None



def normalise_patch_image(patch: np.ndarray) -> np.ndarray:
    """Map the patch's 1st..99th intensity percentiles to 0..1 (clipped to [-0.5, 1.5])."""
    lo, hi = np.percentile(patch, [NORM_LOW_PCT, NORM_HIGH_PCT])
    scale = float(hi - lo)
    if scale <= 1e-6:
        return np.zeros_like(patch, dtype=np.float32)
    return np.clip((patch - lo) / scale, -0.5, 1.5).astype(np.float32)
