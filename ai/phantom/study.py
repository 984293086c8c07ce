"""Whole-study geometry of a phantom subject (patient LPS, mm): slice plans and a sagittal view.

This module only computes arrays and positions; ``node/phantom_dicom.py`` writes them as DICOM.
Axial slices are planned either as one block per disc, tilted like the disc (the usual lumbar
protocol), or as a continuous axial stack. The sagittal image is a coarse midline model whose
disc and canal positions match the axial geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ai.labels import LEVEL_NAMES
from ai.phantom.anatomy import _CANAL_Y, _DISC_Z, Subject
from ai.phantom.fastnoise import smooth_noise
from ai.phantom.render import PhantomSlice, render_slice
from ai.phantom.tissues import T2_SIGNAL, Tissue

AXIAL_THICKNESS_MM = 4.0
AXIAL_GAP_MM = 0.4
#: Decimals of the DICOM decimal strings the phantom writes: positions and spacings (mm),
#: direction cosines. A study used in memory is rounded alike, so it equals the one on disk.
MM_DECIMALS = 4
COSINE_DECIMALS = 6


@dataclass(frozen=True)
class PlannedSlice:
    """One axial slice to render: which anatomy, and where it lies in the patient.

    ``centre`` is the canal centre's patient position in the slice plane; ``row_dir`` /
    ``col_dir`` are the DICOM ImageOrientationPatient cosines (row direction first).
    """

    level: str
    kind: str
    offset_mm: float
    centre: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    block: int

    def position_of_first_pixel(
        self, canal_centre_px: tuple[float, float], spacing: tuple[float, float]
    ) -> tuple[float, float, float]:
        """ImagePositionPatient: the centre of pixel (0, 0)."""
        r0, c0 = canal_centre_px
        rs, cs = spacing
        c = np.asarray(self.centre)
        p = c - c0 * cs * np.asarray(self.row_dir) - r0 * rs * np.asarray(self.col_dir)
        return (float(p[0]), float(p[1]), float(p[2]))


def _disc_frame(subject: Subject, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lv = subject.levels[level]
    t = math.radians(lv.tilt_deg)
    centre = np.array([lv.canal_x_mm, lv.canal_y_mm, lv.z_mm])
    col_dir = np.array([0.0, math.cos(t), math.sin(t)])
    normal = np.array([0.0, -math.sin(t), math.cos(t)])
    return centre, col_dir, normal


def plan_blocks(subject: Subject, slices_per_block: int) -> list[PlannedSlice]:
    """One tilted block of ``slices_per_block`` (3-5) slices per level, caudal -> cranial.

    The block always contains the mid-disc slice (offset 0).
    """
    if not 3 <= slices_per_block <= 5:
        raise ValueError(f"slices_per_block must be 3..5, got {slices_per_block}")
    step = AXIAL_THICKNESS_MM + AXIAL_GAP_MM
    first = -((slices_per_block - 1) // 2)
    offsets = [step * (first + k) for k in range(slices_per_block)]
    out: list[PlannedSlice] = []
    for b, level in enumerate(subject.level_names):
        centre, col_dir, normal = _disc_frame(subject, level)
        for off in offsets:
            c = centre + off * normal
            out.append(PlannedSlice(level, "disc", off, (float(c[0]), float(c[1]), float(c[2])),
                                    (1.0, 0.0, 0.0), tuple(float(v) for v in col_dir),  # type: ignore[arg-type]
                                    b))
    return out


def plan_continuous(subject: Subject, step_mm: float = AXIAL_THICKNESS_MM + AXIAL_GAP_MM) -> list[PlannedSlice]:
    """A continuous, untilted axial stack from below the lowest to above the highest level."""
    names = subject.level_names
    zs = np.array([subject.levels[n].z_mm for n in names])
    xs = np.array([subject.levels[n].canal_x_mm for n in names])
    ys = np.array([subject.levels[n].canal_y_mm for n in names])
    z = float(zs[0] - 18.0)
    out: list[PlannedSlice] = []
    while z <= zs[-1] + 18.0:
        i = int(np.argmin(np.abs(zs - z)))
        lv = subject.levels[names[i]]
        d = z - float(zs[i])
        if abs(d) <= lv.disc_height_mm / 2.0 + 6.0:
            level, kind, off = names[i], "disc", d
        else:
            level, kind, off = names[i], "mid", 0.0
        c = (float(np.interp(z, zs, xs)), float(np.interp(z, zs, ys)), z)
        out.append(PlannedSlice(level, kind, off, c, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), 0))
        z += step_mm
    return out


@dataclass(frozen=True)
class AxialSlice:
    """One rendered slice of an axial series, with its plan and ImagePositionPatient."""

    plan: PlannedSlice
    rendered: PhantomSlice
    position: tuple[float, float, float]


def render_axial_series(
    subject: Subject,
    mode: str,
    matrix: int,
    spacing: float,
    rng: np.random.Generator,
    *,
    continuous: bool = False,
    slices_per_block: int | None = None,
) -> list[AxialSlice]:
    """Render a subject's axial series, caudal -> cranial in plan order.

    One acquisition: a field-of-view rotation and shift, and (randomised mode) one
    contrast shared by all slices. ``slices_per_block`` None draws 3-5. The draws from
    ``rng`` are the ones ``lumbar-node phantom`` has always made, so a seed gives the same
    study whether it is written as DICOM (``node/phantom_dicom.py``) or used in memory by
    a training command.
    """
    per_block = slices_per_block or int(rng.integers(3, 6))
    plan = plan_continuous(subject) if continuous else plan_blocks(subject, per_block)
    rotation = float(rng.normal(0.0, 2.0))
    fov_shift = (float(rng.normal(0.0, 3.0)), 8.0 + float(rng.normal(0.0, 3.0)))
    contrast_seed = int(rng.integers(0, 2**31))
    out: list[AxialSlice] = []
    for ps in plan:
        s = render_slice(subject, ps.level, ps.kind, mode, rng, pixel_spacing=spacing,
                         matrix=(matrix, matrix), rotation_deg=rotation, offset_mm=ps.offset_mm,
                         fov_shift_mm=fov_shift, contrast_seed=contrast_seed)
        out.append(AxialSlice(ps, s, ps.position_of_first_pixel(s.canal_centre_px, s.pixel_spacing)))
    return out


def _all_discs(subject: Subject) -> list[tuple[float, float, float, float, float]]:
    """(z, canal_y, tilt_deg, disc_height, vb_height) for L1-L2..L5-S1, extrapolating levels
    the subject does not model from the nearest modelled one."""
    names = subject.level_names
    ref = subject.levels[names[0]]
    out = []
    for name in LEVEL_NAMES:
        if name in subject.levels:
            lv = subject.levels[name]
            out.append((lv.z_mm, lv.canal_y_mm, lv.tilt_deg, lv.disc_height_mm, lv.vb_height_mm))
            continue
        near = min(names, key=lambda n: abs(LEVEL_NAMES.index(n) - LEVEL_NAMES.index(name)))
        nl = subject.levels[near]
        z = nl.z_mm + (_DISC_Z[name] - _DISC_Z[near])
        y = nl.canal_y_mm + (_CANAL_Y[name] - _CANAL_Y[near])
        out.append((z, y, nl.tilt_deg, ref.disc_height_mm, ref.vb_height_mm))
    return sorted(out)


def render_sagittal(
    subject: Subject,
    x_mm: float,
    matrix: tuple[int, int],
    spacing: float,
    centre_yz: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Coarse T2 sagittal image at patient ``x_mm`` (rows: superior -> inferior, columns:
    anterior -> posterior). Returns the image (stored values) and ImagePositionPatient."""
    rows, cols = matrix
    y = centre_yz[0] + (np.arange(cols) - (cols - 1) / 2.0)[None, :] * spacing
    z = centre_yz[1] - (np.arange(rows) - (rows - 1) / 2.0)[:, None] * spacing
    y = np.broadcast_to(y, (rows, cols))
    z = np.broadcast_to(z, (rows, cols))
    discs = _all_discs(subject)
    dz = np.array([d[0] for d in discs])
    dy = np.array([d[1] for d in discs])
    yc = np.interp(z, dz, dy, left=None, right=None)
    rel = y - yc  # + posterior of the canal centre
    t = np.full((rows, cols), int(Tissue.AIR), dtype=np.uint8)
    post = 57.0 + subject.subcut_post_mm
    body = (rel <= post) & (rel >= -subject.body_anterior_mm)
    t[body] = Tissue.SUBCUT_FAT
    t[body & (rel <= post - 2.0) & (rel >= -subject.body_anterior_mm + 2.0)] = Tissue.SUBCUT_FAT
    t[(rel > 8.0) & (rel < post - subject.subcut_post_mm)] = Tissue.ES_L
    t[(rel > post - 2.0) & body] = Tissue.SKIN
    t[(rel < -40.0) & (rel > -subject.body_anterior_mm + subject.subcut_ant_mm)] = Tissue.BOWEL
    t[(rel <= -40.0) & (rel > -48.0)] = Tissue.VISCERAL_FAT
    ry = 18.0
    for k, (zc, ycan, tilt, h, vbh) in enumerate(discs):
        th = math.radians(tilt)
        # local disc frame: p along AP (tilted), q along the disc normal
        cy = ycan - 9.0 - ry
        p = (y - cy) * math.cos(th) + (z - zc) * math.sin(th)
        q = -(y - cy) * math.sin(th) + (z - zc) * math.cos(th)
        inside = np.abs(p) <= ry
        t[inside & (np.abs(q) <= h / 2.0)] = Tissue.ANNULUS
        t[(np.abs(p) <= 0.55 * ry) & (np.abs(q) <= 0.3 * h)] = Tissue.NUCLEUS
        top = h / 2.0 + (vbh if k < len(discs) - 1 else vbh * 0.9)
        vb = inside & (q > h / 2.0) & (q <= top)
        t[vb] = Tissue.VB_CORTEX
        t[vb & (np.abs(p) <= ry - 1.5) & (q > h / 2.0 + 1.5) & (q <= top - 1.5)] = Tissue.VB_MARROW
        if k == 0:  # sacrum below L5-S1
            sac = inside & (q < -h / 2.0) & (q > -h / 2.0 - 45.0)
            t[sac] = Tissue.VB_MARROW
        # spinous process of the vertebra above this disc
        sp = (rel > 12.0) & (rel < 40.0) & (q > h / 2.0 + 2.0) & (q < h / 2.0 + vbh * 0.75)
        t[sp] = Tissue.PE_MARROW
    canal = np.abs(rel) <= 9.0
    t[canal] = Tissue.EPIDURAL_FAT
    t[np.abs(rel) <= 6.5 - 0.15 * abs(x_mm)] = Tissue.CSF
    img = T2_SIGNAL[t] * (1.0 + 0.05 * smooth_noise(rng, (rows, cols), 20))
    img = np.sqrt((img + 0.02 * rng.standard_normal(img.shape)) ** 2 + (0.02 * rng.standard_normal(img.shape)) ** 2)
    img = np.rint(np.clip(img * 1000.0, 0, 65535)).astype(np.float32)
    ipp = (float(x_mm), float(y[0, 0]), float(z[0, 0]))
    return img, ipp


def render_brain(matrix: tuple[int, int], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """A non-lumbar distractor: a crude axial T2 head (skull, grey matter, ventricles)."""
    rows, cols = matrix
    yy = (np.arange(rows) - (rows - 1) / 2.0)[:, None] * spacing
    xx = (np.arange(cols) - (cols - 1) / 2.0)[None, :] * spacing
    r = np.sqrt((xx / 70.0) ** 2 + (yy / 88.0) ** 2)
    img = np.zeros((rows, cols), dtype=np.float32)
    img[r <= 1.0] = 0.8
    img[r <= 0.93] = 0.05
    img[r <= 0.88] = 0.55
    img[r <= 0.7] = 0.42
    vent = ((np.abs(xx) - 9.0) / 5.0) ** 2 + (yy / 22.0) ** 2 <= 1.0
    img[vent] = 1.0
    textured = img * (1.0 + 0.05 * smooth_noise(rng, (rows, cols), 16))
    noisy = np.abs(textured + 0.02 * rng.standard_normal(img.shape).astype(np.float32))
    return np.rint(noisy * 1000.0).astype(np.float32)
