"""What the training commands share: progress, the resumable checkpoint and the run record.

:mod:`ai.train_canal` and :mod:`ai.train_column` train different networks on different
examples, but step, validate and resume alike (model, optimiser, scheduler and sampler
state, refused under another configuration) and record the same facts about a run in
their cards. :mod:`ai.train` (the segmentation model, with AMP and its own checkpoint
keys) keeps its progress in the same :class:`Progress`.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.card import lineage
from ai.model import count_parameters
from ai.refiner import PatchRefiner

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """How far a run is: steps done, best validation score, its history and time spent.

    ``loss_sum`` / ``loss_steps`` accumulate the training loss since the last validation
    (not checkpointed: a resumed run starts a fresh interval).
    """

    step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    loss_sum: float = 0.0
    loss_steps: int = 0

    def take_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any) -> None:
        """Back-propagate ``loss``, step the optimiser and the schedule, count the step."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        self.step += 1
        self.loss_sum += float(loss.detach())
        self.loss_steps += 1

    def record_validation(self, metrics: dict[str, Any]) -> float:
        """Append a history entry for ``metrics``; returns the interval's mean loss and resets it."""
        mean_loss = self.loss_sum / max(self.loss_steps, 1)
        self.history.append({"step": self.step, "loss": round(mean_loss, 4), "val": metrics,
                             "elapsed_s": round(self.elapsed_s, 1)})
        self.loss_sum, self.loss_steps = 0.0, 0
        return mean_loss

    def training_record(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The card's ``training`` section: the run's facts ``extra`` plus where it stands."""
        return {**extra, "step": self.step, "elapsed_s": round(self.elapsed_s, 1), "history": self.history}


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
    model: torch.nn.Module, command: str, threads: int, render_s: float, init_dir: Path | str | None,
    history: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card's facts about where and how a run ran (``history``: :func:`init_from`'s)."""
    return {
        **(history or {}),
        "command": command,
        "threads": threads,
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "parameters": count_parameters(model),
        "render_s": round(render_s, 1),
        "init": str(init_dir) if init_dir is not None else None,
    }


def init_from(model: torch.nn.Module, stage: type[PatchRefiner], init_dir: Path | str) -> dict[str, Any]:
    """Start ``model`` from the ``stage`` weights in ``init_dir`` (checked like at start-up);
    returns their :func:`ai.card.lineage` for the new card."""
    init = stage.load(init_dir)
    model.load_state_dict(init.net.state_dict())
    card = init.card
    logger.info("initialised from %s (%s)", init_dir, str(card["weights_sha256"])[:12])
    return lineage(str(card["name"]), str(card["version"]), str(card["weights_sha256"]),
                   dict(card.get("training", {})))
