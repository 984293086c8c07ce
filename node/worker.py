"""The analysis worker: runs claimed jobs through the stages, in its own process.

Kept apart from :mod:`node.jobs` (the persisted state machine it drives) so that the
job table and its transitions can be read, used and tested without the worker loop.

The three stages are reached through one seam, :class:`Stages` (``analyse``, ``encode``,
``export``). :class:`node.stages.DefaultStages` imports the real modules inside each stage,
so a missing or broken module fails that job with a clear reason, never the node; tests
pass fast fakes. A stage that raises fails its job with the reason and the worker takes
the next job: a failing job never blocks the queue.

The worker runs in a separate process (multiprocessing *spawn*, target
:func:`worker_main`): it builds its stages once (the AI model is loaded on first use, then
kept) and takes queued jobs one by one from the index (:func:`process_one`), so the
receiver keeps receiving during inference.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from node.db import Database
from node.jobs import (
    ANALYSING,
    DONE,
    ENCODING,
    EXPORTING,
    FAILED,
    Job,
    advance,
    claim_next,
    get_job,
)

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.series import EchoGroup

logger = logging.getLogger(__name__)

#: how long the idle worker waits for a wake-up before looking at the queue again (s)
WORKER_POLL_S = 1.0
#: how often the idle worker checks its stop and wake flags (s)
WORKER_TICK_S = 0.05
#: message on the worker -> parent pipe: a job put results in the outbox
RESULTS_READY = b"results"
#: message on the worker -> parent pipe: the worker has loaded its model and takes jobs
WORKER_READY = b"ready"
#: the wake counter shared with the worker wraps at this value
WAKE_MODULUS = 2**31
#: Linux prctl option: signal sent to this process when its parent dies
_PR_SET_PDEATHSIG = 1


# -- stages ----------------------------------------------------------------------------


@dataclass
class JobContext:
    """What a stage gets: the claimed job, the configuration and the index."""

    job: Job
    config: NodeConfig
    db: Database

    @property
    def results_dir(self) -> Path:
        return self.config.results_dir / (self.job.results_dir or self.job.key)

    def echo_group(self) -> tuple[EchoGroup, list[Any]]:
        """The job's echo group, re-assembled from the index, and the series' records."""
        from node.instances import instances_of_series
        from node.series import assemble

        records = instances_of_series(self.db, self.job.series_instance_uid)
        assembly = assemble(records, self.config.routing)
        for group in assembly.groups:
            if group.echo == self.job.echo:
                return group, records
        raise LookupError(
            f"echo group {self.job.echo} of series {self.job.series_instance_uid} not found "
            f"(groups: {[g.echo for g in assembly.groups]})"
        )

    def source_paths(self) -> list[Path]:
        """Files of the instances in the job's echo group (absolute paths)."""
        group, records = self.echo_group()
        uids = set(group.sop_instance_uids)
        return [self.config.state_dir / r.path for r in records if r.sop_instance_uid in uids]


@dataclass
class Analysis:
    """What ``analyse`` hands to ``encode``: the volume, its source headers, the result."""

    volume: Any
    sources: list[Any]
    result: Any


class Stages(Protocol):
    """The seam between the job machinery and the work itself (tests substitute fakes)."""

    def analyse(self, ctx: JobContext) -> Analysis: ...
    def encode(self, ctx: JobContext, analysis: Analysis) -> Sequence[Any]: ...
    def export(self, ctx: JobContext, datasets: Sequence[Any]) -> None: ...


#: the stages the worker uses unless told otherwise ("module:callable(config) -> Stages")
DEFAULT_STAGES = "node.stages:DefaultStages"


def load_stages(spec: str, config: NodeConfig) -> Stages:
    """Build stages from ``"module:callable"`` (picklable, so a spawned worker can use it)."""
    module_name, _, attr = spec.partition(":")
    factory: Callable[[NodeConfig], Stages] = getattr(importlib.import_module(module_name), attr)
    return factory(config)


def _failure_reason(stage: str, exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{stage}: {type(exc).__name__}: {text}"[:1000]


# -- the worker loop -------------------------------------------------------------------


def process_one(db: Database, config: NodeConfig, stages: Stages) -> Job | None:
    """Claim and run one queued job through every stage; None when the queue is empty.

    Returns the job as it ended (``done``, ``failed``, or unchanged if superseded).
    """
    job = claim_next(db, os.getpid())
    if job is None:
        return None
    ctx = JobContext(job=job, config=config, db=db)
    logger.info(
        "job %d: analysing series %s echo %d (attempt %d)",
        job.id,
        job.series_instance_uid,
        job.echo,
        job.attempts,
    )
    analysis: Any = None
    datasets: Any = None
    steps: tuple[tuple[str, str, str, str], ...] = (
        ("analyse", ANALYSING, ENCODING, "analyse_s"),
        ("encode", ENCODING, EXPORTING, "encode_s"),
        ("export", EXPORTING, DONE, "export_s"),
    )
    for stage, current, following, column in steps:
        started = time.monotonic()
        try:
            if stage == "analyse":
                analysis = stages.analyse(ctx)
            elif stage == "encode":
                datasets = stages.encode(ctx, analysis)
            else:
                stages.export(ctx, datasets)
        except Exception as exc:  # noqa: BLE001 - any stage error fails this job, not the worker
            reason = _failure_reason(stage, exc)
            logger.error(
                "job %d (series %s echo %d) failed: %s\n%s",
                job.id,
                job.series_instance_uid,
                job.echo,
                reason,
                traceback.format_exc(),
            )
            advance(db, job, current, FAILED, reason=reason)  # a stale claim changes nothing
            return get_job(db, job.id)
        elapsed = time.monotonic() - started
        if not advance(db, job, current, following, duration=(column, elapsed)):
            logger.info(
                "job %d: superseded during %s (series re-opened or re-queued)", job.id, stage
            )
            return get_job(db, job.id)
        logger.info("job %d: %s done in %.2f s", job.id, stage, elapsed)
    return get_job(db, job.id)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned worker)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError as exc:
        logger.warning("cannot set parent-death signal: %s", exc)


def _tell_parent(results: Any, message: bytes = RESULTS_READY) -> None:
    """Send ``message`` to the parent; a parent gone is not this job's failure."""
    try:
        results.send_bytes(message)
    except OSError as exc:
        logger.warning("cannot tell the node %r: %s", message, exc)


def _idle(stop: Any, wake: Any, seen: int) -> None:
    """Sleep up to :data:`WORKER_POLL_S`, returning early on a wake-up or a stop."""
    deadline = time.monotonic() + WORKER_POLL_S
    while time.monotonic() < deadline and not stop.value and wake.value == seen:
        time.sleep(WORKER_TICK_S)


def worker_main(
    config: NodeConfig,
    stages_spec: str,
    stop: Any,
    wake: Any,
    log_level: str = "INFO",
    log_format: str = "text",
    results: Any = None,
) -> None:
    """Entry point of the worker process: run queued jobs until ``stop.value`` is set.

    ``stop`` and ``wake`` are shared ``multiprocessing.RawValue`` flags (no locks, so a
    killed process never leaves them locked): ``wake.value`` changes when work is queued.
    ``results`` is the write end of a pipe to the parent: :data:`WORKER_READY` goes down it
    once the model is loaded, :data:`RESULTS_READY` whenever a job has put results in the
    outbox, so the exporter starts at once instead of at its next poll.
    """
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    # SIGTERM/SIGINT from the service manager or a terminal reach the whole process
    # group; the parent decides when the worker stops (and kills it after its timeout).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from node.logs import configure_logging

    configure_logging(log_format, log_level)
    db = Database(config.index_path)
    stages = load_stages(stages_spec, config)
    warm_up = getattr(stages, "warm_up", None)
    if callable(warm_up):
        warm_up()
    logger.info("worker %d ready (stages %s)", os.getpid(), stages_spec)
    if results is not None:
        _tell_parent(results, WORKER_READY)
    try:
        while not stop.value:
            seen = wake.value
            job = process_one(db, config, stages)
            if job is None:
                _idle(stop, wake, seen)
            elif job.state == DONE and results is not None:
                _tell_parent(results)
    finally:
        db.close()
        logger.info("worker %d stopped", os.getpid())
