"""Plain result objects of the analysis, and their ``results.json`` form.

The node encodes these into DICOM SEG / SR / overlay; researchers read the JSON.
Schema of the JSON is versioned by :data:`RESULTS_SCHEMA_VERSION` and documented in
``docs/results-schema.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

RESULTS_SCHEMA_VERSION = "1.4"

SCHIZAS_GRADES: tuple[str, ...] = ("A", "B", "C", "D")
DSCA_GRADES: tuple[str, ...] = ("normal", "relative", "absolute")
SEVERITIES: tuple[str, ...] = ("normal/mild", "moderate", "severe")


@dataclass
class StructureMeasurement:
    """Measurements of one structure on one slice, or at one level (averaged over the level's
    disc slices).

    Areas in mm2, fat fraction in %, signal intensity in stored-value units.
    """

    csa_mm2: float
    fcsa_mm2: float | None = None
    fat_fraction_pct: float | None = None
    mean_si: float | None = None
    si_ratio_to_fat: float | None = None
    #: how far the structure's outline is supported by the image, 0-1 (the Kolmogorov-Smirnov
    #: distance of its grey levels from those around it, :func:`ai.measure.structure_contrast`);
    #: only for :data:`ai.measure.CONTRAST_STRUCTURES`
    outline_contrast: float | None = None
    #: the structure reaches the edge of the image (on any of the level's slices): the field
    #: of view may cut it, and its area would then leave out what lies outside the image
    at_image_edge: bool = False

    def to_dict(self) -> dict[str, float | bool]:
        out: dict[str, float | bool] = {"csa_mm2": round(self.csa_mm2, 2)}
        for key in ("fcsa_mm2", "fat_fraction_pct", "mean_si", "si_ratio_to_fat", "outline_contrast"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(float(value), 3)
        if self.at_image_edge:
            out["at_image_edge"] = True
        return out


@dataclass
class Stenosis:
    """Central canal stenosis at one disc level (clinical spec section 0, grades)."""

    schizas: str
    schizas_probabilities: dict[str, float]
    dsca_mm2: float
    dsca_grade: str
    severity: str
    rootlets: str
    rootlets_probability: float
    confidence: float

    def __post_init__(self) -> None:
        if self.schizas not in SCHIZAS_GRADES:
            raise ValueError(f"schizas must be one of {SCHIZAS_GRADES}, got {self.schizas!r}")
        if self.dsca_grade not in DSCA_GRADES:
            raise ValueError(f"dsca_grade must be one of {DSCA_GRADES}, got {self.dsca_grade!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if self.rootlets not in ("rootlets", "cord"):
            raise ValueError(f"rootlets must be 'rootlets' or 'cord', got {self.rootlets!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schizas": self.schizas,
            "schizas_probabilities": {k: round(v, 4) for k, v in self.schizas_probabilities.items()},
            "dsca_mm2": round(self.dsca_mm2, 2),
            "dsca_grade": self.dsca_grade,
            "severity": self.severity,
            "rootlets": self.rootlets,
            "rootlets_probability": round(self.rootlets_probability, 4),
            "confidence": round(self.confidence, 4),
        }


@dataclass
class LevelResult:
    """One disc level: where it is, what it measures, how narrow the canal is."""

    level: str | None
    position: int
    slice_indices: list[int]
    level_confidence: float
    measurements: dict[str, StructureMeasurement] = field(default_factory=dict)
    asymmetry_pct: dict[str, float] = field(default_factory=dict)
    kjaer_grade: dict[str, int] = field(default_factory=dict)
    stenosis: Stenosis | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "position": self.position,
            "slice_indices": list(self.slice_indices),
            "level_confidence": round(self.level_confidence, 4),
            "measurements": {k: v.to_dict() for k, v in self.measurements.items()},
            "asymmetry_pct": {k: round(v, 2) for k, v in self.asymmetry_pct.items()},
            "kjaer_grade": dict(self.kjaer_grade),
            "stenosis": self.stenosis.to_dict() if self.stenosis else None,
        }


@dataclass
class SliceResult:
    """One slice of the series and every structure measured on it.

    Researchers measure on slices the disc levels do not report (a mid-vertebral slice, every
    slice of a range); the level figures are the means of their disc slices' figures.
    ``level_position`` is the :attr:`LevelResult.position` of the level whose disc slices
    include this one (None: not a reported disc slice).
    """

    index: int
    sop_instance_uid: str
    frame_number: int
    level_position: int | None
    level: str | None
    measurements: dict[str, StructureMeasurement] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sop_instance_uid": self.sop_instance_uid,
            "frame_number": self.frame_number,
            "level_position": self.level_position,
            "level": self.level,
            "measurements": {k: v.to_dict() for k, v in self.measurements.items()},
        }


#: Roles of the entries of :attr:`SeriesResult.models` (``ai.pipeline.Analyzer.models``).
ROLE_SEGMENTATION = "segmentation"
ROLE_CANAL_REFINEMENT = "canal refinement"
ROLE_COLUMN_REFINEMENT = "column refinement"
ROLE_STENOSIS_GRADING = "stenosis grading"


@dataclass(frozen=True)
class InferenceSettings:
    """How the segmentation network ran: these change the masks, so every result says them.

    ``precision`` is the arithmetic actually used (``float32``, ``bfloat16``, ``float16``),
    ``device`` the torch device type (``cpu``, ``cuda``), ``mirror`` whether each slice was
    averaged with its left-right mirror image (``[ai] mirror``).
    """

    device: str
    precision: str
    mirror: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def parameters(self) -> list[str]:
        return [
            f"device={self.device}",
            f"precision={self.precision}",
            f"mirror={'on' if self.mirror else 'off'}",
        ]


@dataclass
class SeriesResult:
    """Everything the analysis says about one series.

    ``labels`` is the label map on the native grid of the input volume,
    ``(n_slices, rows, columns)`` uint8 with values of :class:`ai.labels.Label`, in the
    volume's slice order. ``flags`` are plausibility warnings that must be shown, not hidden.
    """

    series_instance_uid: str
    model_name: str
    model_version: str
    labels: np.ndarray
    levels: list[LevelResult] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    #: every model that contributed, in pipeline order: ``{"role", "name", "version"}``
    #: (segmentation, canal refiner, stenosis grader); empty when not recorded
    models: list[dict[str, str]] = field(default_factory=list)
    #: how the segmentation network ran (:class:`InferenceSettings`); None when not recorded
    inference: InferenceSettings | None = None
    #: every slice of the series with its measurements, in the volume's order (schema 1.4;
    #: empty when not measured)
    slices: list[SliceResult] = field(default_factory=list)

    @property
    def models_line(self) -> str:
        """``name version`` of every contributing model, joined for captions and output UIDs.

        A mirrored pass is named after the segmentation model: its masks differ, so its
        outputs must not share UIDs with a one-pass analysis of the same series.
        """
        models = self.models or [{"name": self.model_name, "version": self.model_version}]
        line = " + ".join(f"{m['name']} {m['version']}" for m in models)
        if self.inference is not None and self.inference.mirror:
            line += " (mirrored pass)"
        return line

    def algorithm_parameters_for(self, role: str) -> list[str]:
        """DICOM Algorithm Parameters of the model with ``role`` (:meth:`model_for`): the
        run settings when that is the segmentation model, none for refiners and the grader
        (and none when not recorded)."""
        if self.inference is None or self.model_for(role) != (self.model_name, self.model_version):
            return []
        return self.inference.parameters()

    def model_for(self, role: str) -> tuple[str, str]:
        """``(name, version)`` of the model that had ``role`` in this analysis.

        Falls back to the segmentation model (:attr:`model_name` / :attr:`model_version`)
        when :attr:`models` lists no model with that role (refiner or grader not loaded, a
        result from before the models were recorded), so such outputs stay what they were.
        """
        if role != ROLE_SEGMENTATION:
            for model in self.models:
                if model.get("role") == role:
                    return str(model["name"]), str(model["version"])
        return self.model_name, self.model_version

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "series_instance_uid": self.series_instance_uid,
            "model": {"name": self.model_name, "version": self.model_version},
            "models": [dict(m) for m in self.models],
            "inference": self.inference.to_dict() if self.inference is not None else None,
            "levels": [lv.to_dict() for lv in self.levels],
            "slices": [sl.to_dict() for sl in self.slices],
            "flags": list(self.flags),
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
        }
