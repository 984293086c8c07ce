"""The model card: what a weights file is, how it expects its input, how it was made.

The card travels next to the weights (``ai/weights/seg-card.json`` beside
``seg.safetensors``). :func:`load_model` refuses to start when the card and the weights
disagree (label map, architecture, tensor shapes, checksum), so a site that swaps the
model cannot silently run one that was trained for another label set or input grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ai.errors import InputError
from ai.labels import Label
from ai.model import UNet, UNetConfig

logger = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = "1.0"
WEIGHTS_FILE = "seg.safetensors"
CARD_FILE = "seg-card.json"
#: Folder of the weights shipped inside the package.
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Hard ceiling on the shipped weights (issue: <= 20 MB).
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024
#: Largest logit offset a card may carry (e^5: a prior ratio of about 150).
MAX_LOGIT_OFFSET = 5.0


class CardError(InputError):
    """The model card is invalid or does not match its weights."""


def label_map() -> dict[str, str]:
    """The label map of this code base: ``{"0": "BACKGROUND", ...}`` (JSON keys are strings)."""
    return {str(int(lab)): lab.name for lab in Label}


@dataclass(frozen=True)
class Normalisation:
    """Robust intensity normalisation applied to every slice before the network.

    The slice's ``low_pct`` and ``high_pct`` percentiles (over pixels inside the field of
    view, i.e. not the zero padding) map to 0 and 1; values are then clipped to
    ``[clip_low, clip_high]``.
    """

    method: str = "percentile"
    low_pct: float = 1.0
    high_pct: float = 99.0
    clip_low: float = -0.5
    clip_high: float = 2.0

    def __post_init__(self) -> None:
        if self.method != "percentile":
            raise CardError(f"unknown normalisation method {self.method!r}")
        if not 0.0 <= self.low_pct < self.high_pct <= 100.0:
            raise CardError("normalisation needs 0 <= low_pct < high_pct <= 100")
        if self.clip_low >= self.clip_high:
            raise CardError("normalisation needs clip_low < clip_high")


@dataclass(frozen=True)
class ModelCard:
    """Description of one trained segmentation model.

    Attributes
    ----------
    name, version
        Reported in results.json and in the DICOM algorithm identification.
    labels
        Label value (as a string) -> :class:`ai.labels.Label` name.
    input_spacing_mm
        In-plane pixel spacing (mm) of the grid the network sees.
    input_size
        ``(rows, columns)`` of that grid; slices are cropped/padded around their centre.
    architecture
        :class:`ai.model.UNetConfig` as a dict.
    weights_sha256
        Checksum of the weights file the card describes.
    training
        Data description, seed, configuration, command line, duration.
    metrics
        Held-out metrics (Dice, IoU, CSA ICC per structure...).
    calibration
        Post-training calibration chosen on tuning studies: ``logit_offsets`` (label name ->
        amount subtracted from that class's logit, see :func:`ai.inference.calibrate_logits`)
        and ``disc_evidence_floor`` (the least disc evidence that lets the series disc assignment
        place a disc, :func:`ai.disc_assignment.assign_block_discs`: it scales with how
        confident the model is), and free-text fields saying why and on what it was chosen.
        Empty: raw logits and the assignment's default floor.
    """

    name: str
    version: str
    labels: dict[str, str]
    input_spacing_mm: float
    input_size: tuple[int, int]
    architecture: dict[str, Any]
    normalisation: Normalisation = field(default_factory=Normalisation)
    weights_sha256: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    card_schema_version: str = CARD_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise CardError("card needs a name and a version")
        if not 0.1 <= self.input_spacing_mm <= 5.0:
            raise CardError(f"input_spacing_mm {self.input_spacing_mm} out of range 0.1-5 mm")
        cfg = UNetConfig.from_dict(self.architecture)
        rows, cols = self.input_size
        if rows % cfg.divisor or cols % cfg.divisor or rows <= 0 or cols <= 0:
            raise CardError(f"input_size {self.input_size} must be multiples of {cfg.divisor}")
        if self.labels != label_map():
            raise CardError(
                "card label map differs from ai.labels.Label: "
                f"card {self.labels} vs code {label_map()}"
            )
        if cfg.num_classes != len(self.labels):
            raise CardError("architecture num_classes differs from the label map")
        self.logit_offsets()  # validates the calibration
        self.disc_evidence_floor()

    def tag(self) -> str:
        """``name-version-sha12``, plus the logit offsets when calibrated: names the masks these
        weights produce, so training caches of one model's masks are never reused for another."""
        tag = f"{self.name}-{self.version}-{self.weights_sha256[:12]}"
        offsets = self.calibration.get("logit_offsets") or {}
        if offsets:
            tag += "+offsets-" + ",".join(f"{k}={v:g}" for k, v in sorted(offsets.items()))
        return tag

    def disc_evidence_floor(self) -> float | None:
        """The card's ``calibration.disc_evidence_floor`` (0-1), None when it sets none."""
        value = self.calibration.get("disc_evidence_floor")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise CardError(f"calibration.disc_evidence_floor = {value!r}: a number in [0, 1)")
        return float(value)

    def logit_offsets(self) -> torch.Tensor:
        """Per-class amounts subtracted from the logits (float32, one per label; zeros when uncalibrated)."""
        offsets = self.calibration.get("logit_offsets", {})
        if not isinstance(offsets, dict):
            raise CardError("calibration.logit_offsets must map label names to numbers")
        out = torch.zeros(len(self.labels))
        for name, value in offsets.items():
            if name not in Label.__members__:
                raise CardError(f"calibration.logit_offsets names an unknown label {name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_LOGIT_OFFSET:
                raise CardError(f"calibration.logit_offsets[{name}] = {value!r}: a number within +-{MAX_LOGIT_OFFSET}")
            out[int(Label[name])] = float(value)
        return out

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.architecture)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        try:
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                labels={str(k): str(v) for k, v in d["labels"].items()},
                input_spacing_mm=float(d["input_spacing_mm"]),
                input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
                architecture=dict(d["architecture"]),
                normalisation=Normalisation(**d.get("normalisation", {})),
                weights_sha256=str(d.get("weights_sha256", "")),
                training=dict(d.get("training", {})),
                metrics=dict(d.get("metrics", {})),
                calibration=dict(d.get("calibration", {})),
                card_schema_version=str(d.get("card_schema_version", CARD_SCHEMA_VERSION)),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise CardError(f"model card is missing or has a malformed field: {exc}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CardError(f"cannot read model card {path}: {exc}") from exc
        return cls.from_dict(data)


def lineage(name: str, version: str, weights_sha256: str, training: dict[str, Any]) -> dict[str, Any]:
    """Training record of a fine-tune's starting weights, for the new card (any stage).

    The card must say how its weights were made from scratch: the stages that made the
    starting weights (``previous_stages``, oldest first, each with its command, config and
    resulting checksum) and which weights it started from, with their version.
    """
    own = {k: v for k, v in training.items() if k != "previous_stages"}
    own["weights_sha256"] = weights_sha256
    own["version"] = version
    return {
        "init_weights": {"name": name, "version": version, "weights_sha256": weights_sha256},
        "previous_stages": [*training.get("previous_stages", []), own],
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model: UNet, card: ModelCard, out_dir: Path) -> ModelCard:
    """Write ``seg.safetensors`` and the card (with the weights' checksum) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"name": card.name, "version": card.version})
    tmp.replace(weights)
    card = ModelCard.from_dict({**card.to_dict(), "weights_sha256": sha256_file(weights)})
    tmp_card = out_dir / (CARD_FILE + ".tmp")
    card.save(tmp_card)
    tmp_card.replace(out_dir / CARD_FILE)
    return card


def load_model(weights_dir: Path | None = None) -> tuple[UNet, ModelCard]:
    """Load and validate the model in ``weights_dir`` (default: the shipped weights).

    Raises
    ------
    CardError
        When the card is invalid, the checksum differs, or the tensors do not fit the
        architecture the card declares.
    """
    folder = weights_dir or SHIPPED_WEIGHTS_DIR
    card = ModelCard.load(folder / CARD_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CardError(f"weights file {weights} is missing")
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise CardError(f"weights file is {size} bytes, above the {MAX_WEIGHTS_BYTES} ceiling")
    digest = sha256_file(weights)
    if card.weights_sha256 and digest != card.weights_sha256:
        raise CardError(
            f"weights checksum {digest[:12]} differs from the card's {card.weights_sha256[:12]}"
        )
    if not card.weights_sha256:
        raise CardError("card has no weights_sha256: refusing unverifiable weights")
    state = load_file(str(weights))  # safetensors: no pickle, no code execution
    model = UNet(card.unet_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CardError(
            f"weights do not fit the card's architecture: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CardError(
                f"tensor {key} has shape {tuple(state[key].shape)}, card's architecture "
                f"expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)
    model.eval()
    logger.info("loaded model %s %s from %s (%d bytes)", card.name, card.version, folder, size)
    return model, card


def state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's state dict (for checkpoints)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
