"""Safe writing and checked reading of a second-stage network's weights + JSON card.

The cascade stages (:mod:`ai.canal_refine`, :mod:`ai.column_refine`) each ship a
safetensors file beside a card that records its SHA-256. Both are written atomically
(temporary file, then rename) and read back with the same checks, so a truncated copy or a
card from another training run is refused at start-up instead of producing quiet nonsense.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ai.card import sha256_file


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
