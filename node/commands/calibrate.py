"""``lumbar-node calibrate --data DIR --out DIR``: fit a segmentation model's logit offsets.

Reads labelled studies (phantom studies or real cases, as ``lumbar-node evaluate`` does),
fits per-class logit offsets that remove the model's area bias (:mod:`ai.calibrate`) and
writes the weights with a card that carries them into ``--out``, ready for ``evaluate
--weights OUT`` and for shipping. Use studies the model was not trained on and that the
evaluation will not use.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the model code load only when the command runs
    from ai.calibrate import CalibrationFit
    from ai.card import ModelCard
    from ai.labels import Label

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path,
        help="labelled calibration studies (phantom studies or real cases, as for `evaluate`)",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the calibrated weights and card")
    parser.add_argument(
        "--weights", type=Path, default=None,
        help="segmentation model folder (seg.safetensors + seg-card.json; default: shipped)",
    )
    parser.add_argument(
        "--classes", default=None,
        help="comma-separated label names to fit (default: all but BACKGROUND, DURAL_SAC, "
        "EPIDURAL_SPACE); the others keep the offsets of the input card",
    )
    parser.add_argument(
        "--version", default=None,
        help="version of the calibrated card (default: the input version with its last number + 1)",
    )
    parser.add_argument(
        "--grid", choices=("native", "model"), default="native",
        help="compare areas on the native pixel grid (default: the areas the measurements use) "
        "or on the model grid",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def next_version(version: str) -> str:
    """``1.2.1`` -> ``1.2.2``; a version without a trailing number needs ``--version``."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    if match is None:
        raise ValueError(f"cannot derive the next version of {version!r}: pass --version")
    return f"{match.group(1)}{int(match.group(2)) + 1}"


def parse_classes(text: str | None) -> list[Label] | None:
    """``"VERTEBRAL_BODY,PSOAS_LEFT"`` -> Labels (None: the default set); unknown names raise."""
    from ai.labels import Label

    if text is None:
        return None
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in Label.__members__]
    if unknown or not names:
        raise ValueError(f"unknown label name(s) {unknown or text!r}; known: {', '.join(Label.__members__)}")
    return [Label[n] for n in names]


#: Calibration keys that describe a fit (this one writes them anew; the input's ``note``
#: described the input's fit and is dropped); every other key of the input card is kept.
FIT_OWNED_KEYS = frozenset({"logit_offsets", "method", "chosen_on", "fit", "previous", "note"})


def write_calibrated(
    src: Path, out: Path, card: ModelCard, fit: CalibrationFit, version: str, data: Path
) -> ModelCard:
    """Copy the weights into ``out`` and write the card with ``fit``'s offsets (atomically)."""
    from ai.card import CARD_FILE, WEIGHTS_FILE

    out.mkdir(parents=True, exist_ok=True)
    if (src / WEIGHTS_FILE).resolve() != (out / WEIGHTS_FILE).resolve():
        tmp = out / (WEIGHTS_FILE + ".tmp")
        shutil.copyfile(src / WEIGHTS_FILE, tmp)
        tmp.replace(out / WEIGHTS_FILE)
    offsets = {**card.calibration.get("logit_offsets", {}), **fit.offsets}
    # Settings the fit does not own (the disc-evidence floor and its reason) carry over:
    # dropping them would silently change the series disc assignment.
    kept = {k: v for k, v in card.calibration.items() if k not in FIT_OWNED_KEYS}
    calibration = {
        **kept,
        "logit_offsets": {k: v for k, v in offsets.items() if v != 0.0},
        "method": "subtracted from the class logits before the arg-max; the disc / vertebral body "
        "identity stays the raw one (ai.inference.calibrate_logits). Fitted by `lumbar-node "
        "calibrate` (ai.calibrate): per class, the offset at which the predicted area equals the "
        f"true area over the calibration slices ({fit.grid} pixel grid).",
        "chosen_on": f"{fit.n_cases} studies ({fit.n_slices} slices) under {data}",
        "fit": fit.to_dict(),
        "previous": {"version": card.version, "logit_offsets": card.calibration.get("logit_offsets", {})},
    }
    metrics = dict(card.metrics)
    if metrics:
        metrics["note"] = f"measured with version {card.version}, before this calibration: re-run `lumbar-node evaluate`"
    new = dataclasses.replace(card, version=version, calibration=calibration, metrics=metrics)
    tmp_card = out / (CARD_FILE + ".tmp")
    new.save(tmp_card)
    tmp_card.replace(out / CARD_FILE)
    return new


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ai.calibrate import collect, fit_offsets
    from ai.card import SHIPPED_WEIGHTS_DIR, load_model
    from ai.inference import autocast_dtype
    from ai.model import fold_batchnorm
    from ai.pipeline import choose_device
    from node.commands.evaluate import labelled_cases

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        classes = parse_classes(args.classes)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    src = args.weights or SHIPPED_WEIGHTS_DIR
    model, card = load_model(src)
    try:
        version = args.version or next_version(card.version)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    device = choose_device(args.device)
    network = fold_batchnorm(model).to(device)
    with Progress(transient=True) as progress:
        task = progress.add_task("running the model (slices)", total=None)
        try:
            data = collect(
                network, card, ((c.volume, c.truth_labels) for c in labelled_cases(args.data)), device,
                dtype=autocast_dtype(device), progress=lambda n: progress.advance(task, n), grid=args.grid,
            )
        except ValueError as exc:
            logger.error("%s: %s", args.data, exc)
            return 2
    fit = fit_offsets(data, classes, start=card.logit_offsets())
    new = write_calibrated(src, args.out, card, fit, version, args.data)
    table = Table(title=f"{new.name} {card.version} -> {new.version}: {fit.n_cases} studies, {fit.n_slices} slices")
    for col in ("class", "offset", "area bias before %", "after %", "Dice before", "after"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, row in fit.table.items():
        table.add_row(name, f"{row['offset']:+.3f}", f"{row['bias_pct_before']:+.2f}", f"{row['bias_pct_after']:+.2f}",
                      f"{row['dice_before']:.4f}", f"{row['dice_after']:.4f}")
    Console().print(table)
    print(f"calibrated card written to {args.out} (evaluate it: lumbar-node evaluate --data DIR --weights {args.out})")
    return 0
