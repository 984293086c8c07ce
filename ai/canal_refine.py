"""Canal refinement: a second, high-resolution cascade stage for the dural sac and epidural space.

The coarse segmentation network sees 1.0 mm pixels, so half a pixel of boundary error on a
150 mm2 dural sac is ~20 % of its area. The refiner re-reads, on every slice where the
coarse stage found a canal, a canal-centred patch of :data:`PATCH_MM` mm at
:data:`PATCH_PX` px (about 0.32 mm per pixel) with three channels: the normalised image and
the coarse dural-sac and epidural-space masks. A small U-Net predicts {other, dural sac,
epidural space} on the patch; its probabilities are resampled bilinearly onto the native
pixels inside the patch, where they replace the coarse canal labels:

* only pixels within :data:`BAND_MM` of the coarse canal may change (the vertebral body,
  disc or muscles far from the canal are never touched), and the dural sac only within
  :data:`SAC_BAND_MM` of the coarse sac (no coarse sac: no sac is added);
* a pixel the refiner adds to the canal must carry a label that borders the canal
  (:data:`ADDABLE_LABELS`: background, disc, vertebral body, posterior elements);
* a pixel it takes out of the canal gets the nearest non-canal coarse label;
* the refined sac is kept as its largest connected component (other sac pieces become
  epidural space).

The patch is laid out in the canonical frame of :mod:`ai.inference` (rows toward
posterior, columns toward the patient's left, whatever the acquisition's orientation).
Weights and card: ``ai/weights/canal.safetensors`` + ``canal-card.json`` (name
:data:`MODEL_NAME`), checked (schema, geometry, label map, SHA-256) at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ai.canal_patch import canal_centre, normalise_patch_image
from ai.labels import STRUCTURES, Label
from ai.model import UNet, UNetConfig
from ai.model_grid import canonical_axes
from ai.refiner import SHIPPED_WEIGHTS_DIR as SHIPPED_WEIGHTS_DIR
from ai.refiner import PatchRefiner, RefinerCardError, check_card
from ai.volume import Volume

logger = logging.getLogger(__name__)

MODEL_NAME = "lumbar-canal-refiner"
WEIGHTS_FILE = "canal.safetensors"
CARD_FILE = "canal-card.json"
#: Side of the square patch around the canal centre (mm).
PATCH_MM = 36.0
#: Side of the patch (pixels): 0.321 mm per pixel.
PATCH_PX = 112
#: Refiner classes, in output-channel order.
CLASSES: tuple[str, ...] = ("other", "dural_sac", "epidural_space")
#: Refiner class -> segmentation label (``other`` has none).
CLASS_LABELS: tuple[int | None, ...] = (None, int(Label.DURAL_SAC), int(Label.EPIDURAL_SPACE))
#: Changes are allowed only this close (mm) to the coarse canal (dural sac + epidural space).
BAND_MM = 3.0
#: The refined dural sac stays this close (mm) to the coarse sac: the refiner moves the sac's
#: boundary, it does not invent or inflate a sac (a compressed, Schizas D sac in unusual
#: contrast is where the first, unconstrained refiner over-reached). 1.0 mm was chosen for
#: refiner 1.0.0; for the better-trained 1.3.0 weights 2.0 mm gave a higher sac Dice, ICC and
#: lower DSCA error on the 120 tuning studies (1 / 1.5 / 2 / 3 mm and none compared,
#: ``docs/evaluation.md``), shipped as 1.4.0.
SAC_BAND_MM = 2.0
#: Coarse labels that may become canal (the canal's neighbours); muscles and fat never do.
ADDABLE_LABELS: tuple[int, ...] = (
    int(Label.BACKGROUND),
    int(Label.DISC),
    int(Label.VERTEBRAL_BODY),
    int(Label.POSTERIOR_ELEMENTS),
    int(Label.DURAL_SAC),
    int(Label.EPIDURAL_SPACE),
)
CANAL_LABELS = tuple(int(label) for label in STRUCTURES["spinal_canal"])


class RefinerError(RefinerCardError):
    """The refiner card is invalid or does not match its weights."""


@dataclass(frozen=True)
class RefinerConfig:
    """Patch geometry and network (recorded in the card)."""

    patch_mm: float = PATCH_MM
    patch_px: int = PATCH_PX
    channels: tuple[int, ...] = (12, 24, 48, 64)
    band_mm: float = BAND_MM
    sac_band_mm: float = SAC_BAND_MM

    def __post_init__(self) -> None:
        if not 10.0 <= self.patch_mm <= 80.0:
            raise RefinerError(f"patch_mm {self.patch_mm} outside 10-80 mm")
        if self.patch_px < 16:
            raise RefinerError("patch_px must be >= 16")
        if self.band_mm <= 0 or self.sac_band_mm < 0:
            raise RefinerError("band_mm must be > 0 and sac_band_mm >= 0")
        if self.patch_px % self.unet_config.divisor:
            raise RefinerError(f"patch_px must be a multiple of {self.unet_config.divisor}")

    @property
    def mm_per_px(self) -> float:
        return self.patch_mm / self.patch_px

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=3, num_classes=len(CLASSES), channels=self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch_mm": self.patch_mm,
            "patch_px": self.patch_px,
            "mm_per_px": round(self.mm_per_px, 5),
            "channels": list(self.channels),
            "band_mm": self.band_mm,
            "sac_band_mm": self.sac_band_mm,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefinerConfig:
        try:
            return cls(
                patch_mm=float(d["patch_mm"]),
                patch_px=int(d["patch_px"]),
                channels=tuple(int(c) for c in d["channels"]),
                band_mm=float(d.get("band_mm", BAND_MM)),
                sac_band_mm=float(d.get("sac_band_mm", SAC_BAND_MM)),
            )
        except (KeyError, TypeError) as exc:
            raise RefinerError(f"refiner config is malformed: {exc}") from exc


# --------------------------------------------------------------------------- patch geometry


def patch_matrix(
    pixel_spacing: tuple[float, float],
    mm_per_px: float,
    orientation: np.ndarray | None = None,
    *,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    flip_lr: bool = False,
) -> np.ndarray:
    """2x2 matrix: native ``(row, col)`` pixel offset per patch ``(row, col)`` pixel step.

    With ``orientation`` (the slice's 6 direction cosines) the patch rows run toward
    posterior and its columns toward the patient's left (:func:`ai.model_grid.canonical_axes`);
    without it, along the native rows and columns. ``rotation_deg``, ``scale`` and
    ``flip_lr`` are training augmentations.
    """
    rs, cs = pixel_spacing
    step = mm_per_px * scale
    if orientation is None:
        # patch row step: +1 native row; patch column step: +1 native column (in mm)
        axes_mm = np.eye(2)
    else:
        ori = np.asarray(orientation, dtype=np.float64).reshape(6)
        row_dir = ori[:3] / np.linalg.norm(ori[:3])  # direction of increasing column index
        col_dir = ori[3:] / np.linalg.norm(ori[3:])  # direction of increasing row index
        u, v = canonical_axes(ori)
        # columns of axes_mm: native (row, col) mm displacement of one patch row / column step
        axes_mm = np.array([[np.dot(v, col_dir), np.dot(u, col_dir)],
                            [np.dot(v, row_dir), np.dot(u, row_dir)]])
    theta = np.radians(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    flip = np.diag([1.0, -1.0 if flip_lr else 1.0])
    to_px = np.diag([1.0 / rs, 1.0 / cs])
    return step * to_px @ axes_mm @ rot @ flip  # type: ignore[no-any-return]


def patch_coords(
    centre_px: tuple[float, float], matrix: np.ndarray, patch_px: int
) -> np.ndarray:
    """Native ``(2, n, n)`` (row, col) coordinates of every patch pixel."""
    half = (patch_px - 1) / 2.0
    offs = np.arange(patch_px, dtype=np.float64) - half
    ii, jj = np.meshgrid(offs, offs, indexing="ij")
    rows = centre_px[0] + matrix[0, 0] * ii + matrix[0, 1] * jj
    cols = centre_px[1] + matrix[1, 0] * ii + matrix[1, 1] * jj
    return np.stack([rows, cols])


def native_to_patch(
    rows: np.ndarray, cols: np.ndarray, centre_px: tuple[float, float], matrix: np.ndarray,
    patch_px: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Continuous patch ``(i, j)`` of native pixels ``(rows, cols)`` (inverse of :func:`patch_coords`)."""
    inv = np.linalg.inv(matrix)
    dr = rows - centre_px[0]
    dc = cols - centre_px[1]
    half = (patch_px - 1) / 2.0
    return inv[0, 0] * dr + inv[0, 1] * dc + half, inv[1, 0] * dr + inv[1, 1] * dc + half


def patch_box(coords: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The native box that patch ``coords`` read from, and the coords relative to it.

    Bilinear and nearest sampling at a coordinate only touch the pixels around it, and a
    coordinate outside the box is outside the slice on that side too, so sampling the box
    gives the patch of the whole slice (edge repeat and zero padding alike) for a tenth of
    the work on a 512 x 512 slice. None when the patch misses the slice entirely.
    """
    h, w = shape[-2:]
    r0, r1 = max(int(np.floor(coords[0].min())), 0), min(int(np.ceil(coords[0].max())), h - 1)
    c0, c1 = max(int(np.floor(coords[1].min())), 0), min(int(np.ceil(coords[1].max())), w - 1)
    if r1 < r0 or c1 < c0:
        return None
    shifted = coords - np.array([r0, c0], dtype=coords.dtype)[:, None, None]
    return (slice(r0, r1 + 1), slice(c0, c1 + 1)), shifted


def patch_input(
    image: np.ndarray, labels_2d: np.ndarray, coords: np.ndarray
) -> np.ndarray:
    """Network input ``(3, n, n)`` float32: normalised image, sac mask, epidural-space mask.

    Bilinear sampling of the image and of each binary mask at ``coords``
    (:func:`patch_coords`); outside the slice the image repeats its edge, the masks are 0.
    Only the box of the slice that ``coords`` read is sampled (:func:`patch_box`).
    """
    box = patch_box(coords, image.shape)
    if box is not None:
        (rows, cols), coords = box
        image, labels_2d = image[rows, cols], labels_2d[rows, cols]
    lab = labels_2d
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    masks = torch.from_numpy(
        np.stack([lab == int(Label.DURAL_SAC), lab == int(Label.EPIDURAL_SPACE)]).astype(np.float32)
    )
    h, w = lab.shape
    # grid_sample (align_corners=True): x = col / (w - 1) * 2 - 1; a 1-pixel crop maps to 0
    gx = coords[1] / max(w - 1, 1) * 2.0 - 1.0
    gy = coords[0] / max(h - 1, 1) * 2.0 - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
    img_p = F.grid_sample(img[None, None], grid, mode="bilinear", padding_mode="border",
                          align_corners=True)[0, 0].numpy()
    mask_p = F.grid_sample(masks[None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)[0].numpy()
    return np.concatenate([normalise_patch_image(img_p)[None], mask_p]).astype(np.float32)


def probs_to_native(
    probs: torch.Tensor, shape: tuple[int, int], centre_px: tuple[float, float],
    matrix: np.ndarray,
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Bilinear patch probabilities ``(C, n, n)`` on the native pixels the patch covers.

    Returns the native bounding box, the sampled probabilities ``(C, h, w)`` in it and a
    boolean ``(h, w)`` mask of the pixels inside the patch.
    """
    n = int(probs.shape[-1])
    corners = patch_coords(centre_px, matrix, n)[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    r0 = max(0, int(np.floor(corners[0].min())))
    r1 = min(shape[0], int(np.ceil(corners[0].max())) + 1)
    c0 = max(0, int(np.floor(corners[1].min())))
    c1 = min(shape[1], int(np.ceil(corners[1].max())) + 1)
    box = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
    rr, cc = np.meshgrid(np.arange(r0, max(r0, r1), dtype=np.float64),
                         np.arange(c0, max(c0, c1), dtype=np.float64), indexing="ij")
    pi, pj = native_to_patch(rr, cc, centre_px, matrix, n)
    inside = (pi >= 0) & (pi <= n - 1) & (pj >= 0) & (pj <= n - 1)
    grid = np.stack([pj / (n - 1) * 2.0 - 1.0, pi / (n - 1) * 2.0 - 1.0], axis=-1)
    sampled = F.grid_sample(
        probs[None].float(), torch.from_numpy(grid.astype(np.float32))[None],
        mode="bilinear", padding_mode="border", align_corners=True,
    )[0]
    return box, sampled.numpy(), inside


# --------------------------------------------------------------------------- label merge


def merge_refined(
    labels_2d: np.ndarray,
    refined_class: np.ndarray,
    box: tuple[slice, slice],
    inside: np.ndarray,
    pixel_spacing: tuple[float, float],
    band_mm: float = BAND_MM,
    sac_band_mm: float = SAC_BAND_MM,
) -> np.ndarray:
    """Coarse labels with the refiner's canal classes written in (rules: module docstring).

    ``refined_class`` ``(h, w)`` holds refiner class indices (:data:`CLASSES`) on the
    native box ``box``; only pixels in ``inside`` and within ``band_mm`` of the coarse
    canal may change, and pixels become dural sac only within ``sac_band_mm`` of the
    coarse sac.
    """
    out = labels_2d.copy()
    canal = np.isin(labels_2d, CANAL_LABELS)
    if not canal.any():
        return out
    sub = labels_2d[box]
    dist = ndimage.distance_transform_edt(~canal[box], sampling=pixel_spacing)
    allowed = inside & (dist <= band_mm)
    new = sub.copy()
    coarse_sac = sub == int(Label.DURAL_SAC)
    if coarse_sac.any():
        sac_ok = ndimage.distance_transform_edt(~coarse_sac, sampling=pixel_spacing) <= sac_band_mm
    else:
        sac_ok = np.zeros(sub.shape, dtype=bool)
    sac_new = allowed & (refined_class == 1) & np.isin(sub, ADDABLE_LABELS) & sac_ok
    epi_new = allowed & (refined_class == 2) & np.isin(sub, ADDABLE_LABELS)
    new[sac_new] = int(Label.DURAL_SAC)
    new[epi_new] = int(Label.EPIDURAL_SPACE)
    removed = allowed & (refined_class == 0) & np.isin(sub, CANAL_LABELS)
    canal_box = canal[box]
    if removed.any():
        if canal_box.all():  # no non-canal pixel in the box: nothing to borrow a label from
            removed[:] = False
        else:
            _, idx = ndimage.distance_transform_edt(canal_box, return_indices=True)
            rr, cc = np.nonzero(removed)
            new[rr, cc] = sub[idx[0][rr, cc], idx[1][rr, cc]]
    # one dural sac: other sac pieces become epidural space
    sac = new == int(Label.DURAL_SAC)
    lab, n = ndimage.label(sac)
    if n > 1:
        sizes = ndimage.sum_labels(sac, lab, index=np.arange(1, n + 1))
        new[sac & (lab != int(np.argmax(sizes)) + 1)] = int(Label.EPIDURAL_SPACE)
    out[box] = new
    return out


# --------------------------------------------------------------------------- the refiner


def validate_card(card: dict[str, Any]) -> RefinerConfig:
    """Raise :class:`RefinerError` naming the first missing or malformed card field."""
    check_card(card, ("name", "version", "config", "classes", "label_map", "weights_sha256",
                      "training", "evaluation", "intended_use"),
               MODEL_NAME, CLASSES, RefinerError, "refiner")
    expected = label_map_of_classes()
    if card["label_map"] != expected:
        raise RefinerError(f"refiner card label map {card['label_map']} != {expected}")
    return RefinerConfig.from_dict(card["config"])


def label_map_of_classes() -> dict[str, str | None]:
    """Refiner class -> segmentation label name (card field ``label_map``)."""
    return {c: (Label(v).name if v is not None else None) for c, v in zip(CLASSES, CLASS_LABELS, strict=True)}


def save_refiner(model: UNet, card: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``canal.safetensors`` and ``canal-card.json`` (with the weights' SHA-256)."""
    return CanalRefiner.save(model, card, out_dir)


class CanalRefiner(PatchRefiner):
    """The loaded refinement network; :meth:`refine` applies it to a label volume."""

    STAGE = "canal refiner"
    WHAT = "refiner"
    WEIGHTS_FILE = WEIGHTS_FILE
    CARD_FILE = CARD_FILE
    ERROR = RefinerError
    config: RefinerConfig

    @staticmethod
    def validate_card(card: dict[str, Any]) -> RefinerConfig:
        return validate_card(card)

    def refine(self, labels: np.ndarray, volume: Volume) -> tuple[np.ndarray, int]:
        """Refined copy of ``labels`` ``(n, rows, cols)`` and the number of slices refined."""
        if labels.shape != volume.pixels.shape:
            raise ValueError(f"labels {labels.shape} and volume {volume.pixels.shape} differ")
        out = labels.copy()
        todo: list[tuple[int, tuple[float, float], np.ndarray]] = []
        inputs: list[np.ndarray] = []
        for k in range(volume.n_slices):
            centre = canal_centre(labels[k])
            if centre is None:
                continue
            matrix = patch_matrix(volume.pixel_spacing, self.config.mm_per_px, volume.orientations[k])
            coords = patch_coords(centre, matrix, self.config.patch_px)
            inputs.append(patch_input(volume.pixels[k], labels[k], coords))
            todo.append((k, centre, matrix))
        if not todo:
            return out, 0
        probs = self.predict_patches(np.stack(inputs))
        for (k, centre, matrix), p in zip(todo, probs, strict=True):
            out[k] = refine_slice_from_probs(
                labels[k], p, centre, matrix, volume.pixel_spacing, self.config.band_mm,
                self.config.sac_band_mm,
            )
        return out, len(todo)


def refine_slice_from_probs(
    labels_2d: np.ndarray,
    probs: torch.Tensor,
    centre_px: tuple[float, float],
    matrix: np.ndarray,
    pixel_spacing: tuple[float, float],
    band_mm: float = BAND_MM,
    sac_band_mm: float = SAC_BAND_MM,
) -> np.ndarray:
    """Merge one slice's patch probabilities ``(3, n, n)`` into its coarse labels."""
    box, sampled, inside = probs_to_native(probs, labels_2d.shape, centre_px, matrix)  # type: ignore[arg-type]
    if sampled.size == 0:
        return labels_2d.copy()
    return merge_refined(
        labels_2d, sampled.argmax(axis=0), box, inside, pixel_spacing, band_mm, sac_band_mm
    )
