"""What the cascade refiners share: their weights + card on disk, and the loaded patch network.

The cascade stages (:mod:`ai.canal_refine`, :mod:`ai.column_refine`) each ship a
safetensors file beside a card that records its SHA-256. Both are written atomically
(temporary file, then rename) and read back with the same checks, so a truncated copy or a
card from another training run is refused at start-up instead of producing quiet nonsense.
:class:`PatchRefiner` holds one loaded network (BatchNorm folded, channels-last) and runs
it over a stack of patches; each stage adds its own card rules, inputs and merge.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import torch

from ai.card import sha256_file
from ai.errors import InputError
from ai.model import UNet, UNetConfig, fold_batchnorm

logger = logging.getLogger(__name__)

#: Folder of the shipped weights.
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class RefinerCardError(InputError):
    """A refiner card is invalid or does not match its weights (each stage subclasses it)."""


class PatchConfig(Protocol):
    """What :class:`PatchRefiner` needs of a stage's config."""

    @property
    def patch_px(self) -> int: ...

    @property
    def unet_config(self) -> UNetConfig: ...


def check_card(
    card: dict[str, Any], required: tuple[str, ...], name: str, classes: tuple[str, ...],
    error: type[Exception], what: str,
) -> None:
    """Raise ``error`` naming the first missing field, or a wrong name, classes or version."""
    for key in required:
        if key not in card:
            raise error(f"{what} card is missing {key!r}")
    if card["name"] != name:
        raise error(f"{what} card name {card['name']!r} != {name!r}")
    if tuple(card["classes"]) != classes:
        raise error(f"{what} card classes {card['classes']} != {list(classes)}")
    if not isinstance(card["version"], str) or not card["version"]:
        raise error(f"{what} card version must be a non-empty string")


def write_weights_and_card(
    model: torch.nn.Module,
    card: dict[str, Any],
    out_dir: Path,
    weights_file: str,
    card_file: str,
    validate: Callable[[dict[str, Any]], object],
) -> dict[str, Any]:
    """Write ``weights_file`` and ``card_file`` in ``out_dir``; returns the card with its SHA-256."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / weights_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"name": str(card["name"]), "version": str(card["version"])})
    tmp.replace(weights)
    card = {**card, "weights_sha256": sha256_file(weights)}
    validate(card)
    tmp_card = out_dir / (card_file + ".tmp")
    tmp_card.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    tmp_card.replace(out_dir / card_file)
    return card


def read_checked_weights(
    folder: Path,
    weights_file: str,
    card_file: str,
    max_bytes: int,
    error: type[Exception],
    what: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and card of ``folder``, after the file, size and checksum checks.

    Raises ``FileNotFoundError`` when either file is missing and ``error`` (a message that
    starts with ``what``) for an unreadable card, oversized weights or a checksum mismatch.
    The caller validates the card's fields and the tensors' shapes against its architecture.
    """
    from safetensors.torch import load_file

    card_path = folder / card_file
    weights = folder / weights_file
    if not card_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{what} weights or card missing in {folder}")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"cannot read {what} card {card_path}: {exc}") from exc
    if not isinstance(card, dict) or "weights_sha256" not in card:
        raise error(f"{what} card {card_path} has no weights_sha256")
    size = weights.stat().st_size
    if size > max_bytes:
        raise error(f"{what} weights are {size} bytes, above {max_bytes}")
    digest = sha256_file(weights)
    if digest != card["weights_sha256"]:
        raise error(
            f"{what} weights checksum {digest[:12]} differs from the card's "
            f"{str(card['weights_sha256'])[:12]}"
        )
    return load_file(str(weights)), card


class PatchRefiner(ABC):
    """A loaded cascade network; subclasses name their files, error and card rules.

    Subclasses set :attr:`STAGE` (for logs and setup flags), :attr:`WHAT` (the prefix of
    their error messages), :attr:`WEIGHTS_FILE`, :attr:`CARD_FILE`, :attr:`ERROR`, and
    implement :meth:`validate_card` (returns the stage's config from the card).
    """

    STAGE: ClassVar[str]
    WHAT: ClassVar[str]
    WEIGHTS_FILE: ClassVar[str]
    CARD_FILE: ClassVar[str]
    ERROR: ClassVar[type[RefinerCardError]]
    #: Hard ceiling on the weights file (bytes).
    MAX_WEIGHTS_BYTES: ClassVar[int] = 5 * 1024 * 1024
    #: Patches per forward pass.
    BATCH: ClassVar[int] = 16

    @staticmethod
    @abstractmethod
    def validate_card(card: dict[str, Any]) -> PatchConfig:
        """The stage's config from a card; raises :attr:`ERROR` for an invalid one."""

    def __init__(self, model: UNet, card: dict[str, Any], device: torch.device | None = None) -> None:
        self.config = self.validate_card(card)
        if model.config != self.config.unet_config:
            raise self.ERROR(f"{self.WHAT} model does not match its card's architecture")
        self.card = card
        self.device = device or torch.device("cpu")
        #: the network as trained (state dict = the weights file), e.g. to fine-tune from
        self.net = model
        # inference copy: BatchNorm folded into the convolutions, channels-last (CPU speed)
        self.model = fold_batchnorm(model).to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        #: autocast dtype of the forward pass (None: float32); the Analyzer sets its own
        self.autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @classmethod
    def save(cls, model: UNet, card: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Write the weights and the card (with the weights' SHA-256) in ``out_dir``."""
        return write_weights_and_card(model, card, out_dir, cls.WEIGHTS_FILE, cls.CARD_FILE, cls.validate_card)

    @classmethod
    def load(cls, weights_dir: Path | str | None = None, device: str | torch.device = "cpu") -> Self:
        """Load and verify the weights + card of ``weights_dir`` (default: shipped).

        Raises ``FileNotFoundError`` (a file missing) or :attr:`ERROR` (invalid card,
        checksum mismatch, oversized weights, tensors that do not fit the card's architecture).
        """
        folder = Path(weights_dir) if weights_dir is not None else SHIPPED_WEIGHTS_DIR
        state, card = read_checked_weights(
            folder, cls.WEIGHTS_FILE, cls.CARD_FILE, cls.MAX_WEIGHTS_BYTES, cls.ERROR, cls.WHAT
        )
        model = UNet(cls.validate_card(card).unet_config)
        expected = model.state_dict()
        if set(state) != set(expected) or any(
            tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()
        ):
            raise cls.ERROR(f"{cls.WHAT} weights do not fit the card's architecture")
        model.load_state_dict(state)
        logger.info("loaded %s %s %s from %s", cls.STAGE, card["name"], card["version"], folder)
        return cls(model, card, torch.device(device))

    def predict_patches(self, patches: np.ndarray) -> torch.Tensor:
        """Softmax probabilities ``(n, classes, px, px)`` (CPU float32) of input patches."""
        outs: list[torch.Tensor] = []
        with torch.inference_mode():
            for s in range(0, len(patches), self.BATCH):
                x = torch.from_numpy(patches[s : s + self.BATCH]).to(self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(
                    device_type=self.device.type,
                    dtype=self.autocast or torch.float32,
                    enabled=self.autocast is not None,
                ):
                    logits = self.model(x)
                outs.append(torch.softmax(logits.float(), dim=1).cpu())
        if not outs:
            n = self.config.patch_px
            return torch.zeros((0, self.config.unet_config.num_classes, n, n))
        return torch.cat(outs)
