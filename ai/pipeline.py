"""The analysis of one series: segmentation, measurements, levels and grades.

:class:`Analyzer` chooses the model and the device once, at construction (the node builds
one per worker); :meth:`Analyzer.analyze` then turns a :class:`ai.volume.Volume` into a
:class:`ai.results.SeriesResult`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ai.canal_refine import CanalRefiner
from ai.card import ModelCard, load_model
from ai.column_refine import ColumnRefiner
from ai.disc_assignment import (
    MIN_EVIDENCE,
    assign_block_discs,
    centre_disc_runs,
    move_even_block_discs,
)
from ai.inference import CalibratedNetwork, autocast_dtype, pre_process, predict_native
from ai.levels import LevelAssignment, find_levels
from ai.measure import level_of_slices, measure_slice, plausibility_flags
from ai.model import fold_batchnorm
from ai.postprocess import post_process
from ai.refiner import PatchRefiner, RefinerCardError
from ai.results import (
    ROLE_CANAL_REFINEMENT,
    ROLE_COLUMN_REFINEMENT,
    ROLE_SEGMENTATION,
    ROLE_STENOSIS_GRADING,
    InferenceSettings,
    LevelResult,
    SeriesResult,
    SliceResult,
    Stenosis,
)
from ai.volume import Volume

logger = logging.getLogger(__name__)

StageT = TypeVar("StageT", bound=PatchRefiner)


def choose_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit ``cuda`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


class Analyzer:
    """Segments, measures, finds levels and grades stenosis for whole series.

    Parameters
    ----------
    device
        ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    batch_size
        Slices per forward pass.
    weights_dir
        Folder with ``seg.safetensors`` + ``seg-card.json`` (default: shipped weights).
    threads
        torch CPU threads (0: leave torch's default).
    precision
        ``auto``, ``float32`` or ``bfloat16``: the network's arithmetic (see
        :func:`ai.inference.autocast_dtype`).
    refine
        Run the canal refiner (:mod:`ai.canal_refine`) after post-processing; missing or
        invalid refiner weights leave the coarse masks and add a setup flag.
    refiner_dir
        Folder with ``canal.safetensors`` + ``canal-card.json`` (default: shipped weights).
    column_dir
        Folder with ``column.safetensors`` + ``column-card.json`` (default: shipped weights).
    mirror
        Average the segmentation network's answer on each slice with its answer on the
        slice's left-right mirror image (:func:`ai.inference.predict`): steadier masks on
        hard contrast for one more forward pass.
    """

    def __init__(
        self,
        device: str = "auto",
        batch_size: int = 8,
        weights_dir: Path | str | None = None,
        threads: int = 0,
        precision: str = "auto",
        refine: bool = True,
        refiner_dir: Path | str | None = None,
        column_dir: Path | str | None = None,
        mirror: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        if threads:
            torch.set_num_threads(threads)
        self.device = choose_device(device)
        self.batch_size = batch_size
        model, card = load_model(Path(weights_dir) if weights_dir is not None else None)
        self.autocast = autocast_dtype(self.device, precision)
        self.inference = InferenceSettings(
            device=self.device.type,
            precision=str(self.autocast or torch.float32).removeprefix("torch."),
            mirror=mirror,
        )
        network = CalibratedNetwork(fold_batchnorm(model), card.logit_offsets())
        self.model = network.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.card: ModelCard = card
        floor = card.disc_evidence_floor()
        self.disc_evidence_floor = MIN_EVIDENCE if floor is None else floor
        self.grader: Any = None
        self._setup_flags: list[str] = []
        try:
            from ai.grading import StenosisGrader

            self.grader = StenosisGrader.load(self.device)
        except ImportError:
            self._setup_flags.append("stenosis grading module unavailable: no grades")
        except (FileNotFoundError, ValueError, OSError) as exc:
            logger.warning("stenosis grader not loaded: %s", exc)
            self._setup_flags.append(f"stenosis grader not loaded: {exc}")
        self.refiner: CanalRefiner | None = None
        self.column_refiner: ColumnRefiner | None = None
        if refine:
            self.refiner = self._load_stage(CanalRefiner, refiner_dir, "coarse canal masks")
            self.column_refiner = self._load_stage(ColumnRefiner, column_dir, "coarse disc / vertebral body")
        logger.info(
            "analyzer ready: model %s %s on %s (batch %d, %s)",
            card.name, card.version, self.device, batch_size, self.autocast or torch.float32,
        )

    @property
    def setup_flags(self) -> list[str]:
        """Stages that did not load (each analysis carries these flags too)."""
        return list(self._setup_flags)

    def _load_stage(
        self, stage: type[StageT], weights_dir: Path | str | None, fallback: str
    ) -> StageT | None:
        """Load a cascade refiner; missing or invalid weights leave a setup flag and ``fallback``."""
        try:
            refiner = stage.load(weights_dir, self.device)
        except (FileNotFoundError, RefinerCardError, OSError) as exc:
            logger.warning("%s not loaded: %s", stage.STAGE, exc)
            self._setup_flags.append(f"{stage.STAGE} not loaded ({exc}): {fallback}")
            return None
        refiner.autocast = self.autocast
        return refiner

    def segment(self, volume: Volume) -> tuple[np.ndarray, list[str], dict[str, float]]:
        """Native-grid label volume, post-processing flags and timings (s) per stage."""
        t0 = time.perf_counter()
        pre = pre_process(volume, self.card)
        t1 = time.perf_counter()
        raw = predict_native(
            self.model, pre, self.device, self.batch_size, self.autocast, self.inference.mirror
        )
        t2 = time.perf_counter()
        labels, flags = post_process(raw.labels, volume)
        timings = {"pre_process": t1 - t0, "predict": t2 - t1, "post_process": time.perf_counter() - t2}
        if self.column_refiner is not None:
            t = time.perf_counter()
            labels, changed = self.column_refiner.refine(labels, volume, raw.disc_evidence)
            flags.extend(changed)
            timings["column_refine"] = time.perf_counter() - t
        t = time.perf_counter()
        labels, assigned = assign_block_discs(labels, volume, raw.disc_evidence, self.disc_evidence_floor)
        flags.extend(assigned)
        labels, moved = move_even_block_discs(labels, volume, raw.disc_evidence, self.disc_evidence_floor)
        flags.extend(moved)
        labels, centred = centre_disc_runs(labels, volume, raw.disc_evidence)
        flags.extend(centred)
        timings["post_process"] += time.perf_counter() - t
        if self.refiner is not None:
            t = time.perf_counter()
            labels, _ = self.refiner.refine(labels, volume)
            timings["refine"] = time.perf_counter() - t
        return labels, flags, timings

    def analyze(self, volume: Volume) -> SeriesResult:
        """Everything the analysis says about one series."""
        if volume.n_slices == 0:
            raise ValueError("volume has no slices")
        labels, flags, timings = self.segment(volume)
        flags = list(self._setup_flags) + flags
        t0 = time.perf_counter()
        assignments = find_levels(labels, volume)
        t1 = time.perf_counter()
        levels: list[LevelResult] = []
        t_grade = 0.0
        per_slice = [measure_slice(volume.pixels[k], labels[k], volume.pixel_spacing)
                     for k in range(volume.n_slices)]
        for a in assignments:
            name = a.level if a.level is not None else f"level {a.position} from caudal"
            lm = level_of_slices([per_slice[k] for k in a.slice_indices])
            flags.extend(plausibility_flags(name, lm))
            tg = time.perf_counter()
            stenosis = self._grade(volume, labels, a, flags, name)
            t_grade += time.perf_counter() - tg
            levels.append(
                LevelResult(
                    level=a.level,
                    position=a.position,
                    slice_indices=[int(i) for i in a.slice_indices],
                    level_confidence=float(a.confidence),
                    measurements=lm.measurements,
                    asymmetry_pct=lm.asymmetry_pct,
                    kjaer_grade=lm.kjaer_grade,
                    stenosis=stenosis,
                )
            )
        level_of = {int(k): a for a in assignments for k in a.slice_indices}
        slices = [
            SliceResult(
                index=k,
                sop_instance_uid=volume.slice_uids[k],
                frame_number=int(volume.frame_numbers[k]),
                level_position=owner.position if (owner := level_of.get(k)) else None,
                level=owner.level if owner else None,
                measurements=m.values,
            )
            for k, m in enumerate(per_slice)
        ]
        t2 = time.perf_counter()
        if not levels:
            flags.append("no disc level found in the series")
        timings.update({"levels": t1 - t0, "measure": t2 - t1 - t_grade, "grading": t_grade})
        logger.info(
            "series %s: %d slices, %d levels, %d flags", volume.series_instance_uid,
            volume.n_slices, len(levels), len(flags),
        )
        return SeriesResult(
            series_instance_uid=volume.series_instance_uid,
            model_name=self.card.name,
            model_version=self.card.version,
            models=self.models(),
            inference=self.inference,
            labels=labels,
            levels=levels,
            slices=slices,
            flags=flags,
            timings_s=timings,
        )

    def models(self) -> list[dict[str, str]]:
        """Every model this analyzer runs, in pipeline order (provenance of each result)."""
        out = [{"role": ROLE_SEGMENTATION, "name": self.card.name, "version": self.card.version}]
        if self.column_refiner is not None:
            out.append({"role": ROLE_COLUMN_REFINEMENT, "name": self.column_refiner.name,
                        "version": self.column_refiner.version})
        if self.refiner is not None:
            out.append({"role": ROLE_CANAL_REFINEMENT, "name": self.refiner.name, "version": self.refiner.version})
        if self.grader is not None:
            out.append({"role": ROLE_STENOSIS_GRADING, "name": self.grader.name, "version": self.grader.version})
        return out

    def _grade(
        self, volume: Volume, labels: np.ndarray, assignment: LevelAssignment, flags: list[str], name: str
    ) -> Stenosis | None:
        if self.grader is None:
            return None
        try:
            result: Stenosis = self.grader.grade(volume, labels, assignment)
        except ValueError as exc:
            flags.append(f"{name}: stenosis not graded ({exc})")
            return None
        from ai.grading import grade_conflict  # importable: the grader came from it

        conflict = grade_conflict(result)
        if conflict is not None:
            flags.append(f"{name}: grades disagree, review the level: {conflict}")
        return result
