"""Cheap smooth random fields: coarse Gaussian noise upsampled by bilinear matrix products.

``scipy.ndimage.zoom`` costs a few ms per 256 x 256 field; two small matrix products cost tens
of microseconds, which keeps slice generation above 50 slices/s on one core.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation weights from ``n_in`` knots spanning ``n_out``."""
    if n_in < 2:
        return np.ones((n_out, 1), dtype=np.float32)
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def upsample(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a small 2D array to ``shape``."""
    ry = interp_matrix(shape[0], coarse.shape[0])
    rx = interp_matrix(shape[1], coarse.shape[1])
    return (ry @ coarse.astype(np.float32) @ rx.T).astype(np.float32, copy=False)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int] | int) -> np.ndarray:
    """Unit-variance-ish smooth noise with about ``cells`` knots along each axis."""
    cr, cc = (cells, cells) if isinstance(cells, int) else cells
    coarse = rng.standard_normal((max(cr, 2), max(cc, 2)), dtype=np.float32)
    return upsample(coarse, shape)
