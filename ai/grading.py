"""Central canal stenosis grades at one disc level.

Three grades, each with a probability (clinical spec section 0):

* **DSCA**: dural-sac cross-sectional area (mm2) on the mid-disc slice = number of
  dural-sac pixels x pixel area; quantitative grade ``normal`` >= 100 mm2,
  ``relative`` 75-100 mm2, ``absolute`` < 75 mm2 (Schonstrom-style cut-offs, a
  *heuristic*: the cut-offs are not verified in the literature we hold).
* **Schizas A-D** main grade from :class:`ai.grading_model.SchizasNet` on the
  canal-centred patch, with its softmax probabilities; RSNA-style severity from it
  (A -> normal/mild, B -> moderate, C/D -> severe; our design choice).
* **Rootlets vs cord**: the second head of the same network; ``rootlets_probability``
  is the probability of cauda-equina rootlets (``1 - P(cord)``), whichever is reported.

``confidence`` is the probability of the chosen Schizas grade times the probability of
the chosen rootlets/cord answer, lowered when the canal is not segmented on the slice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.grading_model import (
    GraderConfig,
    SchizasNet,
    canal_centre,
    extract_patch,
    load_grader,
)
from ai.labels import Label
from ai.levels import LevelAssignment
from ai.results import SCHIZAS_GRADES, Stenosis
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Quantitative DSCA cut-offs (mm2): >= normal is normal, >= relative is relative stenosis.
DSCA_NORMAL_MM2 = 100.0
DSCA_RELATIVE_MM2 = 75.0
#: Severity from the Schizas main grade (design choice, clinical spec section 1).
SEVERITY_BY_SCHIZAS: dict[str, str] = {
    "A": "normal/mild",
    "B": "moderate",
    "C": "severe",
    "D": "severe",
}
#: Confidence factor when the canal is not segmented on the mid slice (patch centre guessed).
NO_CANAL_CONFIDENCE_FACTOR = 0.25
#: Default folder of the shipped weights.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def dsca_mm2(labels_2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Dural-sac cross-sectional area (mm2) on one slice: sac pixels x pixel area."""
    return float(np.count_nonzero(labels_2d == int(Label.DURAL_SAC))) * float(
        pixel_spacing[0] * pixel_spacing[1]
    )


def dsca_grade(area_mm2: float) -> str:
    """Quantitative grade of a DSCA (heuristic cut-offs 100 / 75 mm2)."""
    if not np.isfinite(area_mm2) or area_mm2 < 0:
        raise ValueError(f"DSCA must be a finite area >= 0, got {area_mm2}")
    if area_mm2 >= DSCA_NORMAL_MM2:
        return "normal"
    if area_mm2 >= DSCA_RELATIVE_MM2:
        return "relative"
    return "absolute"


def severity_from_schizas(grade: str) -> str:
    """RSNA-style severity of a Schizas main grade (sub-grades A1-A4 count as A)."""
    main = grade[:1].upper()
    if main not in SEVERITY_BY_SCHIZAS:
        raise ValueError(f"unknown Schizas grade {grade!r}")
    return SEVERITY_BY_SCHIZAS[main]


class StenosisGrader:
    """Grades central stenosis at disc levels; the model is loaded once.

    Use :meth:`load` for the shipped weights; the constructor takes a ready model (tests,
    training).
    """

    def __init__(
        self, model: SchizasNet, device: torch.device, card: dict[str, Any] | None = None
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.card: dict[str, Any] = dict(card or {})
        self.config: GraderConfig = model.config

    @property
    def name(self) -> str:
        return str(self.card.get("name", "untrained"))

    @property
    def version(self) -> str:
        return str(self.card.get("version", "0"))

    @classmethod
    def load(cls, device: str | torch.device = "cpu", weights_dir: Path | str | None = None) -> StenosisGrader:
        """Load the grader from ``weights_dir`` (default: the shipped ``ai/weights``)."""
        folder = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
        dev = torch.device(device)
        model, card = load_grader(folder, dev)
        logger.info("grader %s %s loaded from %s on %s", card["name"], card["version"], folder, dev)
        return cls(model, dev, card)

    def predict_patches(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Schizas probabilities ``(n, 4)`` and cord probabilities ``(n,)`` of patches."""
        if patches.ndim != 4 or patches.shape[1] != self.config.in_channels:
            raise ValueError(f"patches must be (n, {self.config.in_channels}, h, w), got {patches.shape}")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(self.device)
            logits, cord = self.model(x)
            probs = torch.softmax(logits, dim=1).cpu().numpy()
            p_cord = torch.sigmoid(cord).cpu().numpy()
        return probs.astype(float), p_cord.astype(float)

    def grade_slice(
        self, image: np.ndarray, labels_2d: np.ndarray, pixel_spacing: tuple[float, float]
    ) -> Stenosis:
        """Grade one slice through a disc (the mid-disc slice)."""
        centre = canal_centre(labels_2d)
        patch = extract_patch(image, labels_2d, pixel_spacing, centre, config=self.config)
        probs, p_cord = self.predict_patches(patch[None])
        return _stenosis(probs[0], float(p_cord[0]), dsca_mm2(labels_2d, pixel_spacing), centre is not None)

    def grade(self, volume: Volume, labels: np.ndarray, level: LevelAssignment) -> Stenosis:
        """Grade the level on its mid-disc slice.

        Parameters
        ----------
        volume
            The series.
        labels
            Segmentation of the whole series on the native grid.
        level
            The level from :func:`ai.levels.find_levels`.
        """
        if labels.shape != volume.pixels.shape:
            raise ValueError(f"labels shape {labels.shape} != volume shape {volume.pixels.shape}")
        i = level.mid_slice
        if not 0 <= i < volume.n_slices:
            raise ValueError(f"mid_slice {i} outside the series ({volume.n_slices} slices)")
        result = self.grade_slice(volume.pixels[i], labels[i], volume.pixel_spacing)
        logger.debug(
            "series %s position %d: Schizas %s (%.2f), DSCA %.1f mm2",
            volume.series_instance_uid,
            level.position,
            result.schizas,
            result.schizas_probabilities[result.schizas],
            result.dsca_mm2,
        )
        return result


def grade_conflict(stenosis: Stenosis) -> str | None:
    """Why the Schizas grade and the dural-sac area contradict each other, else None.

    The two grades read different things (the network the CSF and rootlets on the image,
    DSCA the sac mask's area), so they differ by one class often and legitimately; two
    classes apart (no stenosis by Schizas with an absolute stenosis by area, or a severe
    Schizas grade with a normal area) one of them has failed. Never seen in the phantom
    truth (1,093 levels); the report flags it for review instead of choosing one.
    """
    if stenosis.schizas == "A" and stenosis.dsca_grade == "absolute":
        return (f"Schizas A (no stenosis) but dural sac {stenosis.dsca_mm2:.0f} mm2 "
                f"(< {DSCA_RELATIVE_MM2:.0f}: absolute stenosis)")
    if stenosis.schizas in ("C", "D") and stenosis.dsca_grade == "normal":
        return (f"Schizas {stenosis.schizas} (severe) but dural sac {stenosis.dsca_mm2:.0f} mm2 "
                f"(>= {DSCA_NORMAL_MM2:.0f}: normal)")
    return None


def _stenosis(probs: np.ndarray, p_cord: float, area: float, canal_found: bool) -> Stenosis:
    """Fill :class:`ai.results.Stenosis`; ``rootlets_probability`` is P(rootlets), always."""
    k = int(np.argmax(probs))
    grade = SCHIZAS_GRADES[k]
    is_cord = p_cord >= 0.5
    p_answer = p_cord if is_cord else 1.0 - p_cord
    confidence = float(probs[k]) * p_answer
    if not canal_found:
        confidence *= NO_CANAL_CONFIDENCE_FACTOR
    return Stenosis(
        schizas=grade,
        schizas_probabilities={g: float(p) for g, p in zip(SCHIZAS_GRADES, probs, strict=True)},
        dsca_mm2=area,
        dsca_grade=dsca_grade(area),
        severity=severity_from_schizas(grade),
        rootlets="cord" if is_cord else "rootlets",
        rootlets_probability=float(1.0 - p_cord),
        confidence=float(np.clip(confidence, 0.0, 1.0)),
    )
