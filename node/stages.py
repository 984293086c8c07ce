"""The real work of a job: analyse (volume_io + ai.pipeline + results_io), encode, export.

:mod:`node.jobs` owns the job state machine (states, claiming, retries) and
:mod:`node.worker` the worker loop and the :class:`node.worker.Stages` seam; this module is
what the worker loads through that seam by default (:data:`node.worker.DEFAULT_STAGES`).
Tests substitute fakes for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from node.errors import InvalidInstance
from node.spool import Spool
from node.worker import Analysis, JobContext

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.series import EchoGroup

logger = logging.getLogger(__name__)


def _subset_volume(volume: Any, sources: list[Any], group: EchoGroup) -> tuple[Any, list[Any]]:
    """Keep only the slices (instance, frame) of one echo group (enhanced multi-echo)."""
    import numpy as np

    from ai.volume import Volume

    wanted = {(s.sop_instance_uid, s.frame) for s in group.slices}
    keep = [
        i
        for i, key in enumerate(zip(volume.slice_uids, volume.frame_numbers, strict=True))
        if key in wanted
    ]
    if len(keep) == volume.n_slices:
        return volume, sources
    idx = np.asarray(keep, dtype=int)
    sub = Volume(
        pixels=volume.pixels[idx],
        pixel_spacing=volume.pixel_spacing,
        positions=volume.positions[idx],
        orientations=volume.orientations[idx],
        slice_uids=tuple(volume.slice_uids[i] for i in keep),
        series_instance_uid=volume.series_instance_uid,
        slice_thickness=volume.slice_thickness,
        frame_numbers=tuple(volume.frame_numbers[i] for i in keep),
    )
    uids = set(group.sop_instance_uids)
    return sub, [s for s in sources if str(getattr(s, "SOPInstanceUID", "")) in uids] or sources


def analysis_threads() -> int:
    """torch threads of the analysis worker when ``[ai] threads = 0``: all usable cores but one.

    The node's own process receives, assembles and exports while the worker analyses. On a
    2-core host with both cores busy, two torch threads made the analysis 2x slower than
    one (each parallel region waits for a thread that is not running; measured in
    ``docs/performance.md``), so one core is left to the rest of the node.
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


class DefaultStages:
    """The real stages: volume_io + ai.pipeline + results_io, encode, outbox.

    The analyser is built on first use and kept for the life of the worker process.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._analyzer: Any = None

    def _get_analyzer(self) -> Any:
        if self._analyzer is None:
            from ai.pipeline import Analyzer

            started = time.monotonic()
            self._analyzer = Analyzer(
                device=self.config.ai.device,
                batch_size=self.config.ai.batch_size,
                weights_dir=self.config.ai.weights_dir,
                threads=self.config.ai.threads or analysis_threads(),
                precision=self.config.ai.precision,
                mirror=self.config.ai.mirror,
            )
            logger.info("analyser loaded in %.1f s", time.monotonic() - started)
        return self._analyzer

    def warm_up(self) -> None:
        """Load the model and the result encoders now (``ai.preload``), so the first series
        after a start does not wait for them (importing highdicom and the encoders takes
        about a second).

        A model that cannot be loaded is logged here and fails each job with the reason
        later; the worker keeps running so receiving and the queue stay visible.
        """
        if not self.config.ai.preload:
            return
        try:
            self._get_analyzer()
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            logger.error("analyser could not be loaded at start-up: %s", exc)
        try:
            import node.encode  # noqa: F401  (import cost paid before the first series)
        except ImportError as exc:
            logger.error("result encoders could not be imported at start-up: %s", exc)

    def analyse(self, ctx: JobContext) -> Analysis:
        from node.results_io import write_results
        from node.volume_io import load_volume

        group, records = ctx.echo_group()
        uids = set(group.sop_instance_uids)
        chosen = [r for r in records if r.sop_instance_uid in uids]
        spool = Spool(ctx.config.state_dir)
        checked = [spool.read_checked(r.path, r.sha256, r.size_bytes) for r in chosen]
        changed = [problem for _, problem in checked if problem]
        if changed:
            raise InvalidInstance(
                f"{len(changed)} of {len(chosen)} received files are not the bytes that were "
                f"acknowledged ({changed[0]}); send the series again"
            )
        volume, sources = load_volume(
            [ctx.config.state_dir / r.path for r in chosen], contents=[data for data, _ in checked]
        )
        volume, sources = _subset_volume(volume, list(sources), group)
        result = self._get_analyzer().analyze(volume)
        out = ctx.results_dir
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_results(
            result,
            partial,
            slice_uids=tuple(volume.slice_uids),
            frame_numbers=tuple(volume.frame_numbers),
            extra={
                "echo": ctx.job.echo,
                "job": {"id": ctx.job.id, "generation": ctx.job.generation},
            },
        )
        # results of an earlier run (before a late instance) are replaced, never mixed
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        return Analysis(volume=volume, sources=sources, result=result)

    def encode(self, ctx: JobContext, analysis: Analysis) -> Sequence[Any]:
        from node.encode import encode_series  # type: ignore[attr-defined,unused-ignore]

        return list(
            encode_series(
                analysis.sources,
                analysis.volume,
                analysis.result,
                include_overlay=ctx.config.export.overlay,
            )
        )

    def export(self, ctx: JobContext, datasets: Sequence[Any]) -> None:
        from node.outbox import Outbox

        Outbox(ctx.db, ctx.config).add(ctx.job.series_instance_uid, datasets)
