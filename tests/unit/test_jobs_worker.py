"""The worker process: receiving goes on during analysis; a killed worker's job resumes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from series_samples import make_config, stack, wait_for

from node import instances, jobs
from node.config import NodeConfig
from node.db import Database
from node.instances import InstanceRecord, insert_instance
from node.orchestrator import Orchestrator
from node.series import COMPLETE, get_series
from node.worker import Analysis, JobContext

#: how long a gated analysis waits for the test to release it (s)
GATE_TIMEOUT_S = 60.0


class GatedStages:
    """Stages whose analysis blocks until the file ``<state>/release`` exists."""

    def __init__(self, config: NodeConfig) -> None:
        self.gate = config.state_dir / "release"

    def analyse(self, ctx: JobContext) -> Analysis:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not self.gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never released the analysis")
            time.sleep(0.02)
        return Analysis(volume=None, sources=[], result=None)

    def encode(self, ctx: JobContext, analysis: Analysis) -> Sequence[Any]:
        return []

    def export(self, ctx: JobContext, datasets: Sequence[Any]) -> None:
        return None


def _series(uid: str, n: int = 3) -> list[InstanceRecord]:
    return [
        r.__class__(**{**r.__dict__, "series_instance_uid": uid, "sop_instance_uid": f"{uid}.{i}"})
        for i, r in enumerate(stack(n))
    ]


def test_worker_process_analyses_while_receiving_and_survives_being_killed(tmp_path: Path) -> None:
    config = make_config(tmp_path, quiet=0.2)
    db = Database(config.index_path)
    instances.ensure_schema(db)
    orch = Orchestrator(db, config, stages=f"{__name__}:GatedStages")
    orch.start()
    try:
        for rec in _series("1.2.1000"):
            insert_instance(db, rec)
            orch.instance_stored(rec)
        job = wait_for(
            lambda: next((j for j in jobs.jobs_of_series(db, "1.2.1000") if j.state == jobs.ANALYSING), None),
            what="the worker to start analysing",
        )
        worker = orch.worker_pid()
        assert worker is not None and worker != os.getpid()

        # receiving and series assembly go on while the worker is busy
        slowest = 0.0
        for rec in _series("1.2.1001"):
            insert_instance(db, rec)
            started = time.monotonic()
            orch.instance_stored(rec)
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5
        wait_for(lambda: (get_series(db, "1.2.1001") or {}).get("state") == COMPLETE,
                 what="the second series to complete during analysis")
        current = jobs.get_job(db, job.id)
        assert current is not None and current.state == jobs.ANALYSING

        # the worker dies mid-job: the watchdog re-queues the job and starts a new worker
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: orch.worker_pid() not in (None, worker), what="a new worker")
        resumed = wait_for(
            lambda: (j := jobs.get_job(db, job.id)) is not None and j.attempts == 2
            and j.state == jobs.ANALYSING and j,
            what="the interrupted job to be claimed again",
        )
        assert resumed.reason is None

        (config.state_dir / "release").touch()
        wait_for(lambda: jobs.job_counts(db)[jobs.DONE] == 2, what="both jobs done")
        done = jobs.get_job(db, job.id)
        assert done is not None and done.attempts == 2 and done.times["done"] is not None
    finally:
        (config.state_dir / "release").touch()
        orch.shutdown(10.0)
        db.close()
    assert orch.worker_pid() is None


def test_worker_tells_the_node_as_soon_as_results_are_in_the_outbox(tmp_path: Path) -> None:
    config = make_config(tmp_path, quiet=0.2)
    db = Database(config.index_path)
    instances.ensure_schema(db)
    (config.state_dir / "release").touch()
    orch = Orchestrator(db, config, stages=f"{__name__}:GatedStages")
    told: list[float] = []
    orch.on_results = lambda: told.append(time.monotonic())
    orch.start()
    try:
        for rec in _series("1.2.2000"):
            insert_instance(db, rec)
            orch.instance_stored(rec)
        wait_for(lambda: jobs.job_counts(db)[jobs.DONE] == 1, what="the job to finish")
        # the relay calls back once per finished job (the exporter's wake in the node)
        wait_for(lambda: len(told) == 1, what="the results-ready message")
        assert orch.health()[1]["worker_ready"]
    finally:
        orch.shutdown(10.0)
        db.close()
    assert orch._results_listener is None  # the relay thread ended with the orchestrator
