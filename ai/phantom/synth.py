"""MR image synthesis from a tissue map: a realistic T2 mode and a randomised mode.

* ``realistic``: turbo-spin-echo T2 contrast (fat and CSF bright, muscle dark, nucleus bright
  unless degenerated, cortical bone and ligaments dark), mild tissue texture, partial-volume
  blur, the sensitivity fall-off of a posterior spine coil and Rician noise.
* ``randomised``: domain randomisation after SynthSeg (Billot et al. 2023): a random mean and
  spread per tissue, a smooth multiplicative bias field, random blur (resolution), gamma,
  Rician noise, ghosting and motion streaks, and a random scanner-like stored-value range.

Both return float32 images in stored-value units (non-negative, integer-valued, below 65536),
so a writer can cast to uint16 without rescaling.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

from ai.phantom.fastnoise import smooth_noise, upsample
from ai.phantom.tissues import NUM_TISSUES, T2_SIGNAL, T2_TEXTURE, Tissue

#: stored value of signal 1.0 in the realistic mode (scanner-like)
REALISTIC_SCALE = 1000.0
REALISTIC_NOISE = 0.022
#: posterior coil sensitivity length (mm): signal falls off anteriorly
COIL_LENGTH_MM = 120.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with about ``cells`` blobs across the image."""
    return smooth_noise(rng, shape, cells + 1)


def _blur3(img: np.ndarray, w: float) -> np.ndarray:
    """Separable 3-tap blur ``[w, 1-2w, w]`` (partial volume of about half a pixel)."""
    out = img * np.float32(1.0 - 2.0 * w)
    out[1:, :] += np.float32(w) * img[:-1, :]
    out[:-1, :] += np.float32(w) * img[1:, :]
    out[0, :] += np.float32(w) * img[0, :]
    out[-1, :] += np.float32(w) * img[-1, :]
    tmp = out
    out = tmp * np.float32(1.0 - 2.0 * w)
    out[:, 1:] += np.float32(w) * tmp[:, :-1]
    out[:, :-1] += np.float32(w) * tmp[:, 1:]
    out[:, 0] += np.float32(w) * tmp[:, 0]
    out[:, -1] += np.float32(w) * tmp[:, -1]
    return out


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    # The imaginary channel reuses the draws in reversed pixel order: independent per pixel
    # and half the cost of a second draw.
    n2 = n1[::-1, ::-1]
    s = np.float32(sigma)
    return np.sqrt((img + s * n1) ** 2 + (s * n2) ** 2)


def synth_realistic(
    tissue: np.ndarray,
    y_mm: np.ndarray,
    posterior_skin_mm: float,
    spacing: tuple[float, float],
    rng: np.random.Generator,
    overrides: dict[Tissue, float] | None = None,
) -> np.ndarray:
    """Realistic T2 image of a tissue map (``y_mm``: spine-frame y of each pixel)."""
    lut = T2_SIGNAL.copy()
    for t, v in (overrides or {}).items():
        lut[int(t)] = v
    base = lut[tissue]
    tex = T2_TEXTURE[tissue] * _smooth_noise(rng, tissue.shape, 24)
    img = base * (1.0 + tex)
    img = _blur3(img, 0.18)
    depth = np.clip(np.float32(posterior_skin_mm) - y_mm[::8, ::8], 0.0, None)
    coil = 0.35 + 0.65 * np.exp(-depth * np.float32(1.0 / COIL_LENGTH_MM))
    img = img * upsample(coil.astype(np.float32), img.shape)
    img = _rician(img.astype(np.float32), REALISTIC_NOISE, rng)
    return np.rint(np.clip(img * np.float32(REALISTIC_SCALE), 0, 65535)).astype(np.float32)


def synth_randomised(
    tissue: np.ndarray,
    spacing: tuple[float, float],
    rng: np.random.Generator,
    contrast_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Domain-randomised image; returns the image and the parameters drawn (for the truth).

    ``contrast_rng`` (default ``rng``) draws the contrast and artefact parameters, ``rng`` the
    noise: a series can share one contrast across its slices.
    """
    shape = tissue.shape
    crng = contrast_rng if contrast_rng is not None else rng
    means = crng.uniform(0.0, 1.0, NUM_TISSUES).astype(np.float32)
    # Keep T2-like ordering some of the time so realistic contrast is in the distribution.
    if crng.random() < 0.3:
        means = np.clip(T2_SIGNAL + crng.normal(0, 0.12, NUM_TISSUES), 0, 1).astype(np.float32)
    means[int(Tissue.AIR)] = float(crng.uniform(0.0, 0.05))
    stds = crng.uniform(0.0, 0.06, NUM_TISSUES).astype(np.float32)
    img = means[tissue] + stds[tissue] * rng.standard_normal(shape, dtype=np.float32)
    # Acquisition resolution coarser than the output grid -> partial-volume blur.
    acq = crng.uniform(0.3, 1.2, 2)
    sig = [max(float(acq[i]) / spacing[i], 0.3) * 0.6 for i in range(2)]
    img = ndimage.gaussian_filter(img, sig, mode="nearest")
    bias_strength = float(crng.uniform(0.0, 0.5))
    bias = np.exp(bias_strength * _smooth_noise(crng, shape, int(crng.integers(2, 5))))
    img = np.clip(img, 0, None) * bias.astype(np.float32)
    gamma = float(np.exp(crng.normal(0, 0.25)))
    peak = float(np.percentile(img[::3, ::3], 99.5)) or 1.0
    img = (np.clip(img / peak, 0, None) ** gamma).astype(np.float32)
    ghost = 0.0
    if crng.random() < 0.3:
        ghost = float(crng.uniform(0.03, 0.15))
        axis = int(crng.integers(0, 2))
        img = img + np.float32(ghost) * np.roll(img, shape[axis] // 2, axis=axis)
    motion = 0.0
    if crng.random() < 0.25:
        motion = float(crng.uniform(0.05, 0.5))
        axis = int(crng.integers(0, 2))
        # Phase errors on random phase-encode lines (the rfft keeps the full first axis, so
        # the corrupted lines run along axis 0 of k-space; transpose for the other axis).
        if axis == 1:
            img = np.ascontiguousarray(img.T)
        k = sp_fft.rfft2(img, workers=1)
        n_lines = k.shape[0]
        corrupt = rng.random(n_lines) < 0.15
        phase = np.where(corrupt, rng.normal(0, motion * math.pi, n_lines), 0.0)
        k = k * np.exp(1j * phase).astype(np.complex64)[:, None]
        img = np.abs(sp_fft.irfft2(k, s=img.shape, workers=1)).astype(np.float32)
        if axis == 1:
            img = np.ascontiguousarray(img.T)
    noise = float(crng.uniform(0.0, 0.06))
    img = _rician(img, noise, rng)
    scale = float(np.exp(crng.uniform(math.log(300.0), math.log(4000.0))))
    out = np.rint(np.clip(img * np.float32(scale), 0, 65535)).astype(np.float32)
    params = {"gamma": gamma, "bias": bias_strength, "noise": noise, "ghost": ghost,
              "motion": motion, "scale": scale, "acq_row_mm": float(acq[0]),
              "acq_col_mm": float(acq[1])}
    return out, params
