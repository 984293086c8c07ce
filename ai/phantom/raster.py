"""Rasterise one axial slice of a subject into a fine tissue map (painter's algorithm).

A :class:`Canvas` holds, for every pixel, its coordinates in the spine frame (mm, origin at
the canal centre, +x patient left, +y posterior) after the in-plane rotation and a smooth
random deformation. Shapes are evaluated only inside their bounding window, so a 256 x 256
slice with ~60 shapes costs a few milliseconds. Later shapes overwrite earlier ones; the order
in :func:`draw_slice` encodes which tissue wins where structures touch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ai.phantom.anatomy import Ellipse, LevelAnatomy, Subject
from ai.phantom.fastnoise import smooth_noise, upsample
from ai.phantom.pathology import StenosisParams
from ai.phantom.tissues import MUSCLE_TISSUES, NUM_TISSUES, Tissue

Window = tuple[slice, slice]

_SOFT = (Tissue.VISCERAL_FAT, Tissue.BOWEL, Tissue.BOWEL_GAS, Tissue.INTERMUSC_FAT)
#: extra mm around a shape's window to cover the deformation
_WINDOW_MARGIN_MM = 1.5


class Canvas:
    """Tissue map plus per-pixel spine-frame coordinates for one slice.

    Parameters
    ----------
    shape
        ``(rows, cols)``.
    spacing
        ``(row_spacing, col_spacing)`` in mm.
    centre_px
        Pixel ``(row, col)`` (fractional) where the canal centre lies.
    rotation_deg
        In-plane rotation of the anatomy (positive turns +x towards +y).
    deformation
        ``(K, 5)`` rows ``amp_x, amp_y, kx, ky, phase`` of a smooth displacement (mm).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        spacing: tuple[float, float],
        centre_px: tuple[float, float],
        rotation_deg: float,
        deformation: np.ndarray,
    ) -> None:
        rows, cols = shape
        if rows < 8 or cols < 8:
            raise ValueError(f"matrix too small: {shape}")
        self.shape = (rows, cols)
        self.rs, self.cs = float(spacing[0]), float(spacing[1])
        self.r0, self.c0 = float(centre_px[0]), float(centre_px[1])
        th = math.radians(rotation_deg)
        self.ct, self.st = math.cos(th), math.sin(th)
        ys_img = ((np.arange(rows, dtype=np.float32) - self.r0) * self.rs)[:, None]
        xs_img = ((np.arange(cols, dtype=np.float32) - self.c0) * self.cs)[None, :]
        x = self.ct * xs_img + self.st * ys_img
        y = -self.st * xs_img + self.ct * ys_img
        self.margin = _WINDOW_MARGIN_MM
        if len(deformation):
            # The displacement is smooth (wavelength >= ~35 mm): evaluate it on a coarse grid
            # and upsample bilinearly.
            step = 8
            cr, cc = (rows - 1) // step + 2, (cols - 1) // step + 2
            kr = np.linspace(0, rows - 1, cr)
            kc = np.linspace(0, cols - 1, cc)
            yk = ((kr - self.r0) * self.rs)[:, None]
            xk = ((kc - self.c0) * self.cs)[None, :]
            xg = self.ct * xk + self.st * yk
            yg = -self.st * xk + self.ct * yk
            dx = np.zeros_like(xg)
            dy = np.zeros_like(yg)
            for ax, ay, kx, ky, ph in deformation:
                arg = kx * xg + ky * yg + ph
                dx += ax * np.sin(arg)
                dy += ay * np.cos(arg)
                dx -= ax * math.sin(ph)  # keep the canal centre fixed
                dy -= ay * math.cos(ph)
            x = x + upsample(dx, (rows, cols))
            y = y + upsample(dy, (rows, cols))
            self.margin += float(np.abs(deformation[:, :2]).sum()) * 2.0
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.ascontiguousarray(y, dtype=np.float32)
        self.tissue = np.zeros((rows, cols), dtype=np.uint8)

    # -- geometry ---------------------------------------------------------------------------
    def window(self, x0: float, x1: float, y0: float, y1: float) -> Window | None:
        """Pixel window covering the spine-frame box ``[x0, x1] x [y0, y1]`` (or None)."""
        m = self.margin
        ct, st = self.ct, self.st
        cols = [(ct * px - st * py) / self.cs + self.c0
                for px in (x0 - m, x1 + m) for py in (y0 - m, y1 + m)]
        rows = [(st * px + ct * py) / self.rs + self.r0
                for px in (x0 - m, x1 + m) for py in (y0 - m, y1 + m)]
        r_lo = max(int(math.floor(min(rows))), 0)
        r_hi = min(int(math.ceil(max(rows))) + 1, self.shape[0])
        c_lo = max(int(math.floor(min(cols))), 0)
        c_hi = min(int(math.ceil(max(cols))) + 1, self.shape[1])
        if r_lo >= r_hi or c_lo >= c_hi:
            return None
        return (slice(r_lo, r_hi), slice(c_lo, c_hi))

    def ellipse(
        self, cx: float, cy: float, a: float, b: float, angle_deg: float = 0.0
    ) -> tuple[Window, np.ndarray] | None:
        """Window and inside-mask of an ellipse (semi-axis ``a`` along the rotated x)."""
        r = max(a, b)
        win = self.window(cx - r, cx + r, cy - r, cy + r)
        if win is None:
            return None
        dx = self.x[win] - np.float32(cx)
        dy = self.y[win] - np.float32(cy)
        if angle_deg:
            ang = math.radians(angle_deg)
            ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
            u = dx * ca + dy * sa
            v = dy * ca - dx * sa
        else:
            u, v = dx, dy
        return win, (u * np.float32(1.0 / a)) ** 2 + (v * np.float32(1.0 / b)) ** 2 <= 1.0

    def capsule(
        self, x0: float, y0: float, x1: float, y1: float, radius: float
    ) -> tuple[Window, np.ndarray] | None:
        """Window and mask of the points within ``radius`` of the segment (x0,y0)-(x1,y1)."""
        win = self.window(min(x0, x1) - radius, max(x0, x1) + radius,
                          min(y0, y1) - radius, max(y0, y1) + radius)
        if win is None:
            return None
        vx, vy = x1 - x0, y1 - y0
        ll = vx * vx + vy * vy
        px = self.x[win] - np.float32(x0)
        py = self.y[win] - np.float32(y0)
        if ll > 0:
            t = np.clip((px * np.float32(vx) + py * np.float32(vy)) * np.float32(1.0 / ll), 0.0, 1.0)
            px = px - t * np.float32(vx)
            py = py - t * np.float32(vy)
        return win, px * px + py * py <= radius * radius

    def body_ellipse_rows(
        self, cx: float, cy: float, a: float, b: float, angle_deg: float, v_max: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row column spans ``[lo, hi]`` of an undeformed ellipse cut at ``v <= v_max``.

        ``v`` is the coordinate along the ellipse's rotated y axis, relative to its centre.
        Used for the large body layers, where per-pixel evaluation would dominate the cost.
        """
        rows = np.arange(self.shape[0], dtype=np.float64)
        ct, st, cs, rs = self.ct, self.st, self.cs, self.rs
        # spine-frame coordinates as affine functions of the column index c, per row
        dxs = ct * cs
        dys = -st * cs
        xs0 = -ct * cs * self.c0 + st * rs * (rows - self.r0)
        ys0 = st * cs * self.c0 + ct * rs * (rows - self.r0)
        ph = math.radians(angle_deg)
        cp, sp = math.cos(ph), math.sin(ph)
        au = cp * dxs + sp * dys
        av = -sp * dxs + cp * dys
        bu = cp * (xs0 - cx) + sp * (ys0 - cy)
        bv = -sp * (xs0 - cx) + cp * (ys0 - cy)
        ia2, ib2 = 1.0 / (a * a), 1.0 / (b * b)
        pq = au * au * ia2 + av * av * ib2
        qq = 2.0 * (au * bu * ia2 + av * bv * ib2)
        rr = bu * bu * ia2 + bv * bv * ib2 - 1.0
        disc = qq * qq - 4.0 * pq * rr
        root = np.sqrt(np.clip(disc, 0.0, None))
        lo = (-qq - root) / (2.0 * pq)
        hi = (-qq + root) / (2.0 * pq)
        empty = disc < 0
        if abs(av) > 1e-12:
            lim = (v_max - bv) / av
            if av > 0:
                hi = np.minimum(hi, lim)
            else:
                lo = np.maximum(lo, lim)
        else:
            empty |= bv > v_max
        lo = np.where(empty, np.inf, lo)
        return lo, hi

    def paint_rows(self, tissue: Tissue, spans: tuple[np.ndarray, np.ndarray],
                   only: tuple[Tissue, ...] | None = None) -> None:
        """Paint the pixels whose column index lies in each row's ``[lo, hi]``."""
        lo, hi = spans
        cols = np.arange(self.shape[1], dtype=np.float64)[None, :]
        mask = (cols >= lo[:, None]) & (cols <= hi[:, None])
        if only is not None:
            allowed = np.zeros(NUM_TISSUES, dtype=bool)
            allowed[list(only)] = True
            mask &= allowed[self.tissue]
        self.tissue[mask] = tissue

    # -- painting ---------------------------------------------------------------------------
    def paint(
        self,
        tissue: Tissue,
        shape: tuple[Window, np.ndarray] | None,
        only: tuple[Tissue, ...] | None = None,
        extra: np.ndarray | None = None,
    ) -> None:
        """Set ``tissue`` inside the shape, optionally only over the tissues in ``only``."""
        if shape is None:
            return
        win, mask = shape
        view = self.tissue[win]
        if extra is not None:
            mask = mask & extra
        if only is not None:
            allowed = np.zeros(NUM_TISSUES, dtype=bool)
            allowed[list(only)] = True
            mask = mask & allowed[view]
        view[mask] = tissue

    def paint_ellipse(self, tissue: Tissue, e: Ellipse, grow: float = 0.0,
                      only: tuple[Tissue, ...] | None = None) -> None:
        self.paint(tissue, self.ellipse(e.cx, e.cy, e.a + grow, e.b + grow, e.angle_deg), only)

    def paint_bone_capsule(self, x0: float, y0: float, x1: float, y1: float, r: float,
                           cortex: Tissue = Tissue.PE_CORTEX,
                           marrow: Tissue = Tissue.PE_MARROW) -> None:
        self.paint(cortex, self.capsule(x0, y0, x1, y1, r))
        if r > 1.8:
            self.paint(marrow, self.capsule(x0, y0, x1, y1, r - 1.2))


@dataclass(frozen=True)
class SliceGeometry:
    """What the truth needs from the drawing: the sac's ellipse and the canal kind."""

    sac_cy: float
    sac_a: float
    sac_b: float
    schizas: str
    subgrade: str
    is_disc: bool
    has_cord: bool


def draw_slice(
    cv: Canvas, subject: Subject, lv: LevelAnatomy, kind: str, offset_mm: float,
    rng: np.random.Generator,
) -> SliceGeometry:
    """Paint the whole slice into ``cv.tissue``; returns the canal geometry used."""
    hd = lv.disc_height_mm / 2.0
    through_disc = kind == "disc" and abs(offset_mm) <= hd
    disc_like_posterior = kind == "disc"
    sten = lv.stenosis if kind == "disc" else lv.mid
    _draw_body(cv, subject, lv, rng)
    _draw_muscles(cv, lv)
    if disc_like_posterior:
        _draw_foramina(cv, lv)
    _draw_anterior_column(cv, lv, kind, offset_mm, through_disc)
    _draw_posterior_elements(cv, lv, disc_like_posterior)
    _draw_canal(cv, lv, sten, disc_like_posterior, through_disc)
    _infiltrate_fat(cv, lv, rng)
    return SliceGeometry(sten.sac_cy, sten.sac_a, sten.sac_b, sten.schizas, sten.subgrade,
                         through_disc, sten.cord is not None)


def _draw_body(cv: Canvas, s: Subject, lv: LevelAnatomy, rng: np.random.Generator) -> None:
    """Skin, subcutaneous fat, abdominal wall, visceral fat with bowel, kidneys, vessels."""
    phi = -s.scoliosis_deg
    post = 57.0 + s.subcut_post_mm
    ant = -s.body_anterior_mm
    w = s.body_half_width_mm * (1.08 if lv.iliac else 1.0)
    bx = -s.lateral_shift_mm
    over = 14.0  # the ellipse runs past the flat back; the cut at `post` rounds the corners

    def body(inset_lat: float, inset_ant: float, inset_post: float) -> tuple[np.ndarray, np.ndarray]:
        top = post + over - inset_post
        bottom = ant + inset_ant
        cy = (top + bottom) / 2.0
        # the cut yb <= post - inset_post, in the ellipse's own v (relative to its centre)
        return cv.body_ellipse_rows(bx, cy, w - inset_lat, (top - bottom) / 2.0, phi,
                                    post - inset_post - cy)

    skin = 2.0
    cv.paint_rows(Tissue.SKIN, body(0.0, 0.0, 0.0))
    cv.paint_rows(Tissue.SUBCUT_FAT, body(skin, skin, skin))
    # Posterior subcutaneous fat (label 12): behind the coronal plane of the canal centre.
    # (a huge circle tangent to that plane stands in for the half-plane)
    big = 1.0e6
    ph = math.radians(phi)
    cv.paint_rows(Tissue.SUBCUT_FAT_POST,
                  cv.body_ellipse_rows(bx - math.sin(ph) * big, math.cos(ph) * big, big, big, phi, big),
                  only=(Tissue.SUBCUT_FAT,))
    cv.paint_rows(Tissue.MUSCLE_OTHER, body(s.subcut_lat_mm, s.subcut_ant_mm, s.subcut_post_mm))
    wall = 9.0 + 4.0 * (1.0 - s.atrophy)
    cv.paint_rows(Tissue.VISCERAL_FAT, body(s.subcut_lat_mm + wall, s.subcut_ant_mm + wall, s.subcut_post_mm))
    # Bowel: thresholded smooth noise in the visceral fat anterior to the spine.
    front = lv.disc_cy - lv.disc_ry - 6.0
    win = cv.window(-w, w, ant, front)
    if win is not None:
        rows = win[0].stop - win[0].start
        cols = win[1].stop - win[1].start
        field = smooth_noise(rng, (rows, cols), (max(rows // 12, 2), max(cols // 12, 2)))
        view = cv.tissue[win]
        inside = (view == Tissue.VISCERAL_FAT) & (cv.y[win] < front)
        view[inside & (field > -0.1)] = Tissue.BOWEL
        view[inside & (field > 1.1)] = Tissue.BOWEL_GAS
    if lv.kidney:
        for sign in (1.0, -1.0):
            cv.paint(Tissue.KIDNEY, cv.ellipse(sign * 64.0, -6.0, 20.0, 30.0, sign * 25.0), _SOFT)
    if lv.quadratus:
        for sign in (1.0, -1.0):
            cv.paint(Tissue.MUSCLE_OTHER, cv.ellipse(sign * 66.0, 10.0, 17.0, 9.0, sign * 18.0), _SOFT)
    if lv.iliac:
        for sign in (1.0, -1.0):
            cv.paint(Tissue.MUSCLE_OTHER, cv.ellipse(sign * 78.0, -18.0, 13.0, 26.0, sign * 30.0),
                     _SOFT + (Tissue.MUSCLE_OTHER,))
            cv.paint(Tissue.MUSCLE_OTHER, cv.ellipse(sign * 104.0, 5.0, 16.0, 34.0, sign * 10.0),
                     _SOFT + (Tissue.MUSCLE_OTHER,))
            pts = ((sign * 56.0, 44.0), (sign * 78.0, 14.0), (sign * 96.0, -30.0))
            for (xa, ya), (xb, yb2) in zip(pts[:-1], pts[1:], strict=True):
                cv.paint_bone_capsule(xa, ya, xb, yb2, 6.0, Tissue.ILIAC_CORTEX, Tissue.ILIAC_MARROW)
    _draw_vessels(cv, lv)


def _draw_vessels(cv: Canvas, lv: LevelAnatomy) -> None:
    front = lv.disc_cy - lv.disc_ry
    allowed = _SOFT + (Tissue.MUSCLE_OTHER,)
    if lv.vessels == "aorta":
        cv.paint(Tissue.ARTERY, cv.ellipse(12.0, front - 11.0, 10.0, 10.0), allowed)
        cv.paint(Tissue.VEIN, cv.ellipse(-18.0, front - 7.0, 12.0, 7.0, -10.0), allowed)
    elif lv.vessels == "bifurcation":
        for x in (3.0, 17.0):
            cv.paint(Tissue.ARTERY, cv.ellipse(x, front - 10.0, 6.5, 6.5), allowed)
        cv.paint(Tissue.VEIN, cv.ellipse(-17.0, front - 6.0, 11.0, 6.5, -10.0), allowed)
    else:
        psoas_l = lv.muscles["psoas_left"]
        for sign in (1.0, -1.0):
            if lv.name == "L4-L5":
                ax, ay = sign * 14.0, front - 9.0
            else:
                ax, ay = sign * (psoas_l.cx - psoas_l.a * 0.75), psoas_l.cy - psoas_l.b * 0.8
            cv.paint(Tissue.ARTERY, cv.ellipse(ax, ay, 5.5, 5.5), allowed)
            if lv.name != "L4-L5":
                cv.paint(Tissue.VEIN, cv.ellipse(ax - sign * 3.0, ay + 8.0, 6.0, 5.0), allowed)
        if lv.name == "L4-L5":
            cv.paint(Tissue.VEIN, cv.ellipse(-4.0, front - 4.5, 15.0, 5.0), allowed)


def _draw_muscles(cv: Canvas, lv: LevelAnatomy) -> None:
    m = lv.muscles
    for side, lean in (("left", Tissue.PSOAS_L), ("right", Tissue.PSOAS_R)):
        cv.paint_ellipse(lean, m[f"psoas_{side}"])
    for side in ("left", "right"):
        cv.paint_ellipse(Tissue.FASCIA, m[f"erector_spinae_{side}"], grow=1.2)
    for side in ("left", "right"):
        cv.paint_ellipse(Tissue.FASCIA, m[f"multifidus_{side}"], grow=1.2)
    for side, lean in (("left", Tissue.ES_L), ("right", Tissue.ES_R)):
        cv.paint_ellipse(lean, m[f"erector_spinae_{side}"])
    for side in ("left", "right"):
        cv.paint_ellipse(Tissue.FASCIA, m[f"multifidus_{side}"], grow=0.9)
    for side, lean in (("left", Tissue.MF_L), ("right", Tissue.MF_R)):
        e = m[f"multifidus_{side}"]
        cv.paint_ellipse(lean, e)
        # the deep lobe fills the groove between lamina and spinous process
        sign = 1.0 if e.cx > 0 else -1.0
        lobe = Ellipse(sign * max(e.a * 0.55, 4.5), e.cy - e.b * 0.55, e.a * 0.6, e.b * 0.45)
        cv.paint_ellipse(lean, lobe)


def _draw_foramina(cv: Canvas, lv: LevelAnatomy) -> None:
    y = lv.canal_cy - lv.canal_h + 4.0
    for sign in (1.0, -1.0):
        cv.paint(Tissue.FORAMEN_FAT, cv.ellipse(sign * (lv.canal_w + 4.0), y, 5.0, 5.5))
        cv.paint(Tissue.EXITING_ROOT, cv.ellipse(sign * (lv.canal_w + 5.0), y - 0.5, 2.3, 2.3))


def _draw_anterior_column(cv: Canvas, lv: LevelAnatomy, kind: str, offset_mm: float,
                          through_disc: bool) -> None:
    cy = lv.disc_cy
    if through_disc:
        hd = lv.disc_height_mm / 2.0
        f = math.sqrt(max(1.0 - 0.12 * (offset_mm / hd) ** 2, 0.5))
        cv.paint(Tissue.ANNULUS, cv.ellipse(0.0, cy, lv.disc_rx * f, lv.disc_ry * f))
        shrink = (0.6, 0.55, 0.45, 0.35)[lv.degeneration] * math.sqrt(max(1.0 - (offset_mm / hd) ** 2, 0.1))
        cv.paint(Tissue.NUCLEUS, cv.ellipse(0.0, cy + 0.1 * lv.disc_ry, lv.disc_rx * shrink,
                                             lv.disc_ry * shrink * 0.9))
        return
    scale = 0.93 if kind == "mid" else 0.98
    rx, ry = lv.disc_rx * scale, lv.disc_ry * 0.96
    cv.paint(Tissue.VB_CORTEX, cv.ellipse(0.0, cy, rx, ry))
    endplate = kind == "disc" and abs(offset_mm) - lv.disc_height_mm / 2.0 < 1.5
    if not endplate:
        cv.paint(Tissue.VB_MARROW, cv.ellipse(0.0, cy, rx - 1.4, ry - 1.4))
        if kind == "mid":
            cv.paint(Tissue.BASIVERTEBRAL_VEIN, cv.ellipse(0.0, cy + ry - 3.0, 2.8, 2.0))


def _draw_posterior_elements(cv: Canvas, lv: LevelAnatomy, disc_level: bool) -> None:
    cw, ch, ccy = lv.canal_w, lv.canal_h, lv.canal_cy
    roof = ccy + ch  # posterior canal wall in the midline
    # interspinous / supraspinous ligament in the midline (dark, posterior elements)
    cv.paint(Tissue.LIG_FLAVUM, cv.capsule(0.0, roof - 1.0, 0.0, roof + 26.0, 2.2))
    if disc_level:
        alpha = math.radians(lv.facet_angle_deg)
        for sign in (1.0, -1.0):
            jx, jy = sign * (cw + 3.5), ccy + 5.0
            nx, ny = sign * math.cos(alpha), -math.sin(alpha)  # towards anterolateral
            sap = Ellipse(jx + nx * 3.6, jy + ny * 3.6, 3.6, 8.0, -sign * lv.facet_angle_deg)
            iap = Ellipse(jx - nx * 3.4, jy - ny * 3.4 + 1.5, 3.4, 7.5, -sign * lv.facet_angle_deg)
            cv.paint_ellipse(Tissue.PE_CORTEX, sap)
            cv.paint_ellipse(Tissue.PE_MARROW, sap, grow=-1.2)
            cv.paint_ellipse(Tissue.FACET_FLUID, iap, grow=0.8)
            cv.paint_ellipse(Tissue.PE_CORTEX, iap)
            cv.paint_ellipse(Tissue.PE_MARROW, iap, grow=-1.2)
            cv.paint_bone_capsule(iap.cx - sign * 1.0, iap.cy + 3.0, 0.0, roof + 2.5, 2.4)
        cv.paint_bone_capsule(0.0, roof + 2.5, 0.0, roof + 20.0, 2.8)
        return
    for sign in (1.0, -1.0):
        px0, py0 = sign * (cw - 1.0), lv.disc_posterior_y - 3.0
        px1, py1 = sign * (cw + 3.0), ccy + 2.0
        cv.paint_bone_capsule(px0, py0, px1, py1, 4.3)
        tpr = 5.0 if lv.name == "L5-S1" else 3.3
        cv.paint_bone_capsule(px1, py1, sign * (cw + 3.0 + lv.tp_length), ccy - 2.0, tpr)
        cv.paint_bone_capsule(px1, py1 + 1.0, 0.0, roof + 4.5, 3.2)
    cv.paint_bone_capsule(0.0, roof + 4.0, 0.0, roof + 30.0, 3.5)


def _draw_canal(cv: Canvas, lv: LevelAnatomy, st: StenosisParams, disc_level: bool,
                through_disc: bool) -> None:
    canal = cv.ellipse(0.0, lv.canal_cy, lv.canal_w, lv.canal_h)
    if canal is None:
        return
    cwin, cmask = canal
    cv.paint(Tissue.EPIDURAL_FAT, canal)
    a, b, scy = st.sac_a, st.sac_b, st.sac_cy
    dpost = lv.disc_posterior_y
    for sign in (1.0, -1.0):
        cv.paint(Tissue.EPIDURAL_VEIN, cv.ellipse(sign * a * 0.55, dpost + 1.0, 2.2, 1.3), extra=None,
                 only=(Tissue.EPIDURAL_FAT,))
        if disc_level:
            cv.paint(Tissue.NERVE_ROOT, cv.ellipse(sign * (a + 1.9), scy - 0.25 * b, 1.6, 1.6),
                     only=(Tissue.EPIDURAL_FAT, Tissue.EPIDURAL_VEIN))
    x, y = cv.x[cwin], cv.y[cwin]
    if disc_level:
        if st.lf_hug:
            lf = cmask & (y > np.float32(scy))
        else:
            inner = ((x * np.float32(1.0 / (lv.canal_w - st.lf_mm))) ** 2
                     + ((y - np.float32(lv.canal_cy - 0.4 * st.lf_mm)) * np.float32(1.0 / (lv.canal_h - 0.8 * st.lf_mm))) ** 2) <= 1.0
            lf = cmask & ~inner & (y > np.float32(lv.canal_cy - 0.3 * lv.canal_h))
        cv.tissue[cwin][lf] = Tissue.LIG_FLAVUM
    if st.fat_pad is not None:
        w, depth = st.fat_pad
        pad = cv.ellipse(0.0, scy + b + depth / 2.0, w, depth / 2.0 + 0.6)
        if pad is not None:
            pwin, pmask = pad
            inside = ((cv.x[pwin] * np.float32(1.0 / lv.canal_w)) ** 2
                      + ((cv.y[pwin] - np.float32(lv.canal_cy)) * np.float32(1.0 / lv.canal_h)) ** 2) <= 1.0
            cv.paint(Tissue.EPIDURAL_FAT, (pwin, pmask & inside))
    sac_tissue = Tissue.CSF if st.has_csf else Tissue.SAC_COMPRESSED
    sac = cv.ellipse(0.0, scy, a, b)
    cv.paint(sac_tissue, sac)
    if through_disc and st.bulge_apex_y > dpost + 0.2:
        cv.paint(Tissue.ANNULUS, cv.ellipse(0.0, dpost, st.bulge_w, st.bulge_apex_y - dpost))
    if disc_level and st.schizas in ("C", "D"):
        for sign in (1.0, -1.0):
            bite = cv.ellipse(sign * a * 0.8, scy + b * 0.95, a * 0.42, b * 0.55)
            cv.paint(Tissue.LIG_FLAVUM, bite, only=(sac_tissue,))
    if sac is None:
        return
    swin, smask = sac
    if st.cord is not None:
        ccx, ccy, ca, cb = st.cord
        cv.paint(Tissue.CORD, cv.ellipse(ccx, scy + ccy, ca, cb), only=(Tissue.CSF,))
    if len(st.rootlets):
        sx = cv.x[swin][smask]
        sy = cv.y[swin][smask] - np.float32(scy)
        rt = st.rootlets.astype(np.float32)
        d2 = (sx[:, None] - rt[None, :, 0]) ** 2 + (sy[:, None] - rt[None, :, 1]) ** 2
        hit = (d2 <= rt[None, :, 2] ** 2).any(axis=1)
        view = cv.tissue[swin]
        sub = view[smask]
        sub[hit & (sub == Tissue.CSF)] = Tissue.ROOTLET
        view[smask] = sub


def _infiltrate_fat(cv: Canvas, lv: LevelAnatomy, rng: np.random.Generator) -> None:
    """Turn the brightest fraction of a smooth noise field inside each muscle into fat.

    The fraction is the muscle's fat fraction, so the truth (fat pixels / muscle pixels) is
    exact up to one pixel of quantile ties.
    """
    rows, cols = cv.shape
    field: np.ndarray | None = None
    for key, (lean, fat, _label) in MUSCLE_TISSUES.items():
        ff = lv.fat_fraction_pct[key] / 100.0
        if ff <= 0.0:
            continue
        e = lv.muscles[key]
        r = max(e.a, e.b) + 1.0
        win = cv.window(e.cx - r, e.cx + r, e.cy - r, e.cy + r)
        if win is None:
            continue
        view = cv.tissue[win]
        mask = view == lean
        n = int(mask.sum())
        if n == 0:
            continue
        if field is None:
            field = smooth_noise(rng, (rows, cols), (max(rows // 4, 4), max(cols // 4, 4)))
        vals = field[win][mask]
        k = int(round(ff * n))
        if k <= 0:
            continue
        order = np.argpartition(-vals, k - 1)[:k] if k < n else np.arange(n)
        idx = np.flatnonzero(mask)[order]
        flat = view.reshape(-1) if view.flags.c_contiguous else None
        if flat is not None:
            flat[idx] = fat
        else:
            rr, cc = np.unravel_index(idx, mask.shape)
            view[rr, cc] = fat
