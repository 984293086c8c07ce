"""The stenosis grading network and the canal-centred patch it reads.

Schizas grades describe the dural sac's content (rootlets, CSF) and the posterior
epidural fat, all inside a few centimetres around the canal. The grader therefore reads
a small patch centred on the spinal canal: :data:`PATCH_MM` square, resampled to
:data:`PATCH_PX` pixels, with three channels (the normalised T2 image, the dural-sac
mask and the epidural-space mask from the segmentation). A small CNN gives the four
Schizas main grades (softmax) and, from a second head, the probability that the sac
holds the cord / conus rather than cauda-equina rootlets.

Patches are always in the image's own row/column directions (rows anterior -> posterior,
columns patient right -> left for a standard axial slice); training rotates them, so the
network does not depend on small in-plane rotations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ai.canal_patch import canal_centre, normalise_patch_image
from ai.labels import Label
from ai.results import SCHIZAS_GRADES

logger = logging.getLogger(__name__)

#: Side of the square patch around the canal centre (mm).
PATCH_MM = 40.0
#: Side of the resampled patch (pixels): 0.625 mm per pixel, finer than the rootlets' gaps.
PATCH_PX = 64
#: Input channels: normalised image, dural-sac mask, epidural-space mask.
IN_CHANNELS = 3
#: Names of the weight and card files in the weights folder.
WEIGHTS_FILE = "grader.safetensors"
CARD_FILE = "grader-card.json"
MODEL_NAME = "lumbar-node-schizas-grader"


@dataclass(frozen=True)
class GraderConfig:
    """Architecture and input hyper-parameters (recorded in the grader card)."""

    patch_mm: float = PATCH_MM
    patch_px: int = PATCH_PX
    in_channels: int = IN_CHANNELS
    channels: tuple[int, ...] = (16, 32, 64, 64)
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.patch_mm <= 0 or self.patch_px < 16:
            raise ValueError("patch_mm must be > 0 and patch_px >= 16")
        if self.in_channels != IN_CHANNELS:
            raise ValueError(f"in_channels must be {IN_CHANNELS}")
        if len(self.channels) < 2 or any(c < 4 for c in self.channels):
            raise ValueError("channels needs at least two levels of >= 4 channels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def mm_per_px(self) -> float:
        return self.patch_mm / self.patch_px

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraderConfig:
        return cls(
            patch_mm=float(d["patch_mm"]),
            patch_px=int(d["patch_px"]),
            in_channels=int(d["in_channels"]),
            channels=tuple(int(c) for c in d["channels"]),
            dropout=float(d.get("dropout", 0.2)),
        )


class SchizasNet(nn.Module):
    """Small CNN: conv blocks with pooling, global average pool, two heads.

    ``forward`` returns ``(schizas_logits (n, 4), cord_logit (n,))``.
    """

    def __init__(self, config: GraderConfig | None = None) -> None:
        super().__init__()
        self.config = config or GraderConfig()
        layers: list[nn.Module] = []
        cin = self.config.in_channels
        for k, cout in enumerate(self.config.channels):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            if k >= 2:  # a second convolution on the coarser grids, where it is cheap
                layers += [
                    nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
            if k < len(self.config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(self.config.dropout)
        self.schizas_head = nn.Linear(cin, len(SCHIZAS_GRADES))
        self.cord_head = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).mean(dim=(2, 3))
        h = self.dropout(h)
        return self.schizas_head(h), self.cord_head(h).squeeze(1)


# --------------------------------------------------------------------------- patches


def extract_patch(
    image: np.ndarray,
    labels_2d: np.ndarray,
    pixel_spacing: tuple[float, float],
    centre_px: tuple[float, float] | None = None,
    *,
    config: GraderConfig | None = None,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    shift_mm: tuple[float, float] = (0.0, 0.0),
    flip_lr: bool = False,
) -> np.ndarray:
    """Resample the canal-centred patch ``(3, patch_px, patch_px)`` float32.

    Parameters
    ----------
    image, labels_2d
        One slice and its label map (same shape).
    pixel_spacing
        ``(row, col)`` spacing of the slice (mm).
    centre_px
        Patch centre ``(row, col)`` in pixels; default :func:`canal_centre`, else the
        image centre.
    rotation_deg, scale, shift_mm, flip_lr
        Augmentation (training only): in-plane rotation, zoom, centre shift (mm, rows
        then columns), left-right mirror.
    """
    cfg = config or GraderConfig()
    if image.shape != labels_2d.shape:
        raise ValueError(f"image {image.shape} and labels {labels_2d.shape} differ")
    if centre_px is None:
        centre_px = canal_centre(labels_2d)
    if centre_px is None:
        centre_px = ((image.shape[0] - 1) / 2.0, (image.shape[1] - 1) / 2.0)
    n = cfg.patch_px
    step = cfg.mm_per_px * scale
    offs = (np.arange(n) - (n - 1) / 2.0) * step
    dy, dx = np.meshgrid(offs, offs, indexing="ij")  # mm, patch rows / cols
    if flip_lr:
        dx = -dx
    theta = np.radians(rotation_deg)
    ry = np.cos(theta) * dy - np.sin(theta) * dx + shift_mm[0]
    rx = np.sin(theta) * dy + np.cos(theta) * dx + shift_mm[1]
    rows = centre_px[0] + ry / pixel_spacing[0]
    cols = centre_px[1] + rx / pixel_spacing[1]
    coords = np.stack([rows, cols])
    img = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, mode="nearest")
    sac = ndimage.map_coordinates(
        (labels_2d == int(Label.DURAL_SAC)).astype(np.float32), coords, order=1, mode="constant"
    )
    epi = ndimage.map_coordinates(
        (labels_2d == int(Label.EPIDURAL_SPACE)).astype(np.float32),
        coords,
        order=1,
        mode="constant",
    )
    return np.stack([normalise_patch_image(img), sac, epi]).astype(np.float32)


# --------------------------------------------------------------------------- weights + card


def validate_card(card: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing or malformed card field."""
    for key in ("name", "version", "config", "classes", "training", "evaluation", "intended_use"):
        if key not in card:
            raise ValueError(f"grader card is missing {key!r}")
    if tuple(card["classes"]) != SCHIZAS_GRADES:
        raise ValueError(f"grader card classes {card['classes']} != {SCHIZAS_GRADES}")
    GraderConfig.from_dict(card["config"])
    if not isinstance(card["version"], str) or not card["version"]:
        raise ValueError("grader card version must be a non-empty string")


def save_grader(model: SchizasNet, card: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``grader.safetensors`` and ``grader-card.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    validate_card(card)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    card_path = out_dir / CARD_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"name": card["name"], "version": card["version"]})
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return weights, card_path


def load_grader(weights_dir: Path, device: torch.device) -> tuple[SchizasNet, dict[str, Any]]:
    """Load and validate the grader weights and card; the model is in eval mode."""
    from safetensors.torch import load_file

    card_path = weights_dir / CARD_FILE
    weights = weights_dir / WEIGHTS_FILE
    if not card_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"grader weights or card missing in {weights_dir}")
    card = json.loads(card_path.read_text())
    validate_card(card)
    model = SchizasNet(GraderConfig.from_dict(card["config"]))
    state = load_file(str(weights), device="cpu")
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    return model, card
