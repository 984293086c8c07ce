"""Fresh domain-randomised training images, drawn from tissue maps for every batch.

A cached training pool holds a few hundred randomised slices, so the network sees only that
many contrasts however long it trains, and it learns them rather than shape. Following
SynthSeg (Billot et al. 2023), the pool also keeps each slice's *tissue* map on the model
grid (:func:`tissue_to_model`), and :func:`randomise_images` draws a new contrast for it at
every step: the same recipe as :func:`ai.phantom.synth.synth_randomised` (random mean and
spread per tissue, partial-volume blur, bias field, gamma, ghosting, motion, Rician noise),
made on the model grid in torch and then normalised as :func:`ai.inference.normalise` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from ai.card import Normalisation
from ai.inference import normalise
from ai.model_grid import SliceGrid, resample_to_model
from ai.phantom.tissues import NUM_TISSUES, T2_SIGNAL, TISSUE_TO_LABEL, Tissue

#: tissue-map value of model pixels outside the native field of view (zero padding)
OUTSIDE = 255


def tissue_to_model(tissue: np.ndarray, grid: SliceGrid) -> np.ndarray:
    """A native tissue map sampled (nearest) on the model grid, :data:`OUTSIDE` off the field of view."""
    sampled, inside = resample_to_model(tissue.astype(np.float32), grid, mode="nearest")
    out = np.rint(sampled).astype(np.uint8)
    out[~inside] = OUTSIDE
    return out


def labels_of_tissue(tissue: np.ndarray) -> np.ndarray:
    """The label map of a model-grid tissue map (padding -> background)."""
    return TISSUE_TO_LABEL[np.where(tissue == OUTSIDE, 0, tissue)]


def _uniform(lo: float, hi: float, gen: torch.Generator, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(H, W)`` image (replicate borders)."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    t = F.pad(img[None, None], (radius, radius, radius, radius), mode="replicate")
    t = F.conv2d(t, k.view(1, 1, 1, -1))
    t = F.conv2d(t, k.view(1, 1, -1, 1))
    return t[0, 0]


def _motion(img: torch.Tensor, strength: float, axis: int, gen: torch.Generator) -> torch.Tensor:
    """Phase errors on random phase-encode lines (about 15 % of them) along ``axis``."""
    k = torch.fft.fft2(img)
    n_lines = img.shape[axis]
    corrupt = torch.rand(n_lines, generator=gen) < 0.15
    phase = torch.where(corrupt, torch.randn(n_lines, generator=gen) * strength * math.pi, 0.0)
    shift = torch.polar(torch.ones_like(phase), phase)
    k = k * (shift[:, None] if axis == 0 else shift[None, :])
    return torch.fft.ifft2(k).abs()


def randomise_one(tissue: torch.Tensor, gen: torch.Generator, norm: Normalisation) -> torch.Tensor:
    """One normalised model-grid image ``(H, W)`` from a tissue map ``(H, W)`` (int64)."""
    valid = tissue != OUTSIDE
    t = torch.where(valid, tissue, 0)
    means = torch.rand(NUM_TISSUES, generator=gen)
    if float(torch.rand(1, generator=gen)) < 0.3:  # T2-like ordering part of the time
        means = (torch.from_numpy(T2_SIGNAL) + 0.12 * torch.randn(NUM_TISSUES, generator=gen)).clamp(0, 1)
    means[int(Tissue.AIR)] = float(_uniform(0.0, 0.05, gen))
    stds = _uniform(0.0, 0.06, gen, NUM_TISSUES)
    img = means[t] + stds[t] * torch.randn(t.shape, generator=gen)
    # acquisition coarser than the grid, plus the node's anti-aliasing: 0.25-1.0 model px
    img = _gaussian_blur(img, float(_uniform(0.25, 1.0, gen)))
    cells = int(torch.randint(3, 6, (1,), generator=gen))
    coarse = torch.randn(1, 1, cells, cells, generator=gen)
    field = F.interpolate(coarse, size=img.shape, mode="bilinear", align_corners=True)[0, 0]
    img = img.clamp(min=0.0) * torch.exp(float(_uniform(0.0, 0.5, gen)) * field)
    gamma = math.exp(0.25 * float(torch.randn(1, generator=gen)))
    peak = float(torch.quantile(img[valid][::3], 0.995)) if valid.any() else 1.0
    img = (img / (peak or 1.0)).clamp(min=0.0) ** gamma
    if float(torch.rand(1, generator=gen)) < 0.3:
        axis = int(torch.randint(0, 2, (1,), generator=gen))
        img = img + float(_uniform(0.03, 0.15, gen)) * torch.roll(img, img.shape[axis] // 2, dims=axis)
    if float(torch.rand(1, generator=gen)) < 0.25:
        axis = int(torch.randint(0, 2, (1,), generator=gen))
        img = _motion(img, float(_uniform(0.05, 0.5, gen)), axis, gen)
    sigma = float(_uniform(0.0, 0.06, gen))
    n1 = torch.randn(img.shape, generator=gen)
    n2 = torch.randn(img.shape, generator=gen)
    img = torch.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    # the node's own normalisation (padding excluded from the percentiles, then zeroed)
    return torch.from_numpy(normalise(img.numpy(), valid.numpy(), norm))


def randomise_images(tissues: torch.Tensor, gen: torch.Generator, norm: Normalisation) -> torch.Tensor:
    """A batch ``(b, 1, H, W)`` of normalised images from tissue maps ``(b, H, W)``."""
    return torch.stack([randomise_one(t.long(), gen, norm) for t in tissues])[:, None]
