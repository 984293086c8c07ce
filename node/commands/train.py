"""``lumbar-node train``: train the segmentation model (phantoms on the fly, optional real data)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (checkpoints, best/, last/)"
    )
    parser.add_argument(
        "--steps",
        "--epochs",
        dest="steps",
        type=int,
        default=None,
        help="optimiser steps (default from the training config: 2400)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the training subjects and batches"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder of real labelled data (docs/segmentation.md) added to the phantoms",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--pool-subjects",
        type=int,
        default=None,
        help="phantom subjects rendered into the training pool",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (a best/ or last/ folder) instead of random",
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument(
        "--small-structure-weight",
        type=float,
        default=None,
        help="cross-entropy weight of vertebral body, dural sac, epidural space",
    )
    parser.add_argument(
        "--randomised-fraction",
        type=float,
        default=None,
        help="share of pool slices in randomised image mode (default 0.5)",
    )
    parser.add_argument(
        "--severe-fraction",
        type=float,
        default=None,
        help="share of pool subjects with severe stenosis, Schizas C/D (default 0)",
    )
    parser.add_argument(
        "--disc-fraction",
        type=float,
        default=None,
        help="share of pool slices at a disc (default 0.6; others mid-vertebral)",
    )
    parser.add_argument(
        "--canal-weight",
        type=float,
        default=None,
        help="cross-entropy weight of dural sac and epidural space (overrides "
        "--small-structure-weight for them)",
    )
    parser.add_argument(
        "--disc-weight",
        type=float,
        default=None,
        help="cross-entropy weight of the disc (default 1; the vertebral body has --small-structure-weight)",
    )
    parser.add_argument(
        "--synth-fraction",
        type=float,
        default=None,
        help="share of each batch drawn afresh with a new randomised contrast from the "
        "slices' tissue maps (default 0: cached pool images only)",
    )
    parser.add_argument(
        "--mirror-fraction",
        type=float,
        default=None,
        help="segmentation: share of each batch mirrored left to right with the left / right "
        "labels swapped (default 0)",
    )
    parser.add_argument(
        "--model-subjects",
        type=int,
        default=None,
        help="canal: phantom subjects whose crops carry the coarse model's own masks "
        "(default 60; rendered with a full field of view, slower than --pool-subjects)",
    )
    parser.add_argument(
        "--label-flip",
        type=float,
        default=None,
        help="column: chance that each slice's coarse disc / vertebral-body identity is shown "
        "swapped in a training example, so the refiner learns to read the images (default 0)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch default)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock safety stop; best weights so far stay in OUT/best",
    )
    parser.add_argument(
        "--task",
        choices=("segmentation", "grader", "canal", "column"),
        default="segmentation",
        help="segmentation (default), grader: the Schizas/rootlets grader "
        "(docs/grading.md; --pool-subjects = phantom subjects, --steps = epochs), canal: "
        "the canal refiner (docs/segmentation.md; --pool-subjects = truth-mask subjects), or "
        "column: the disc / vertebral-body column refiner (docs/segmentation.md; "
        "--pool-subjects = phantom studies per training set)",
    )


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, object]:
    """``{field: value}`` for each option in ``names`` (option -> config field) that was given."""
    return {
        field: getattr(args, option)
        for option, field in names.items()
        if getattr(args, option, None) is not None
    }


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "task", "segmentation") == "grader":
        return _run_grader(args)
    if getattr(args, "task", "segmentation") == "canal":
        return _run_canal(args)
    if getattr(args, "task", "segmentation") == "column":
        return _run_column(args)
    import dataclasses

    import torch

    from ai.pipeline import choose_device
    from ai.train import TrainConfig, command_line, train

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides: dict[str, object] = {"seed": args.seed}
    overrides.update(
        _given(
            args,
            {
                name: name
                for name in (
                    "steps", "batch_size", "pool_subjects", "lr", "small_structure_weight",
                    "randomised_fraction", "severe_fraction", "disc_fraction", "canal_weight",
                    "disc_weight", "synth_fraction", "mirror_fraction",
                )
            },
        )
    )
    if args.init is not None:
        overrides["init_from"] = str(args.init)
    cfg = dataclasses.replace(TrainConfig(), **overrides)  # type: ignore[arg-type]
    device = choose_device(args.device)
    real = None
    if args.data is not None:
        from ai.card import ModelCard
        from ai.realdata import load_training_slices
        from ai.train import build_card

        card: ModelCard = build_card(cfg, {})
        real = load_training_slices(args.data, card, volume_loader=_dicom_loader)
        logger.info("real data: %d labelled slices from %s", len(real[0]), args.data)
    card = train(
        cfg,
        args.out,
        device=device,
        resume=args.resume,
        real_slices=real,
        max_minutes=args.max_minutes,
        command=command_line(),
    )
    logger.info("best weights: %s (%s %s)", args.out / "best", card.name, card.version)
    return 0


def _run_grader(args: argparse.Namespace) -> int:
    """Train the stenosis grader on phantoms (CPU, ai.train_grader); writes OUT/grader.*."""
    from ai.train_grader import TRAIN_SEED, train_grader

    kwargs: dict[str, object] = {"threads": args.threads or 1, "seed": args.seed or TRAIN_SEED}
    kwargs.update(
        _given(args, {"pool_subjects": "n_subjects", "steps": "epochs", "batch_size": "batch_size"})
    )
    if args.max_minutes is not None:
        kwargs["time_budget_s"] = 60.0 * args.max_minutes
    card = train_grader(args.out, **kwargs)  # type: ignore[arg-type]
    logger.info(
        "grader written to %s: held-out macro-F1 %.3f",
        args.out,
        card["evaluation"]["patch_level"]["macro_f1"],
    )
    return 0


def _run_canal(args: argparse.Namespace) -> int:
    """Train the canal refiner on phantom crops (CPU, ai.train_canal); writes OUT/best, OUT/last."""
    import dataclasses

    from ai.train import command_line
    from ai.train_canal import CanalTrainConfig, train_canal

    overrides = _given(
        args, {"steps": "steps", "batch_size": "batch_size", "pool_subjects": "subjects", "lr": "lr",
               "synth_fraction": "synth_fraction", "model_subjects": "model_subjects"}
    )
    if args.seed:
        overrides["seed"] = args.seed
    cfg = dataclasses.replace(CanalTrainConfig(), **overrides)  # type: ignore[arg-type]
    card = train_canal(
        args.out, cfg, threads=args.threads or 1, max_minutes=args.max_minutes,
        resume=args.resume, command=command_line(), init_dir=args.init,
    )
    logger.info(
        "canal refiner written to %s/best: validation sac Dice %s",
        args.out, card["evaluation"]["validation"]["all"],
    )
    return 0


def _run_column(args: argparse.Namespace) -> int:
    """Train the column refiner on phantom blocks (CPU, ai.train_column); writes OUT/best, OUT/last."""
    import dataclasses

    from ai.train import command_line
    from ai.train_column import ColumnTrainConfig, train_column

    cfg = ColumnTrainConfig()
    overrides = _given(args, {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
                              "label_flip": "label_flip"})
    if args.pool_subjects is not None:
        overrides["sets"] = tuple((s[0], args.pool_subjects, *s[2:]) for s in cfg.sets)
    cfg = dataclasses.replace(cfg, **overrides)  # type: ignore[arg-type]
    card = train_column(
        args.out, cfg, threads=args.threads or 1, max_minutes=args.max_minutes,
        resume=args.resume, command=command_line(), init_dir=args.init,
    )
    logger.info(
        "column refiner written to %s/best: validation %s",
        args.out, json.dumps(card["evaluation"]["validation"].get("all", {})),
    )
    return 0


def _dicom_loader(paths: list[Path]):  # type: ignore[no-untyped-def]
    """DICOM series -> (Volume, datasets) for :mod:`ai.realdata` (ai/ never imports node/)."""
    from node.volume_io import load_volume

    return load_volume(paths)
