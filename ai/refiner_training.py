"""What the cascade refiners' training commands share: the resumable checkpoint and the run record.

:mod:`ai.train_canal` and :mod:`ai.train_column` train different networks on different
examples, but resume alike (model, optimiser, scheduler and sampler state, refused under
another configuration) and record the same facts about a run in their cards.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.model import count_parameters

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """How far a run is: steps done, best validation score, its history and time spent."""

    step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def save_checkpoint(
    path: Path, config: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
    sched: Any, rng: np.random.Generator, progress: Progress,
) -> None:
    """Write everything :func:`resume` needs, atomically (temporary file, then rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng.bit_generator.state, "step": progress.step,
                "best": progress.best, "history": progress.history, "elapsed_s": progress.elapsed_s}, tmp)
    tmp.replace(path)


def resume(
    path: Path, config: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
    sched: Any, rng: np.random.Generator,
) -> Progress:
    """Restore the states from ``path`` in place; raises ``ValueError`` for another configuration."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint
    if ckpt["config"] != config:
        raise ValueError("checkpoint was written with another configuration; refusing to resume")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    rng.bit_generator.state = ckpt["rng"]
    progress = Progress(int(ckpt["step"]), float(ckpt["best"]), list(ckpt["history"]), float(ckpt["elapsed_s"]))
    logger.info("resumed at step %d", progress.step)
    return progress


def run_record(
    model: torch.nn.Module, command: str, threads: int, render_s: float, init_dir: Path | str | None
) -> dict[str, Any]:
    """The card's facts about where and how a run ran."""
    return {
        "command": command,
        "threads": threads,
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "parameters": count_parameters(model),
        "render_s": round(render_s, 1),
        "init": str(init_dir) if init_dir is not None else None,
    }
