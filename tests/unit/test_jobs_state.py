"""The job state machine with fake stages: success, failures, crash recovery, retry, purge."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from series_samples import stack

from node import jobs, series
from node.config import NodeConfig, load_config
from node.db import Database
from node.instances import ensure_schema as ensure_instances
from node.instances import insert_instance
from node.series import assemble
from node.worker import Analysis, JobContext, process_one


class FakeStages:
    """Fast stages: record what ran; fail the configured series at the configured stage."""

    def __init__(self, fail: dict[str, str] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple[str, str]] = []
        self.on_analyse: Any = None

    def _maybe_fail(self, stage: str, ctx: JobContext) -> None:
        self.calls.append((stage, ctx.job.series_instance_uid))
        if self.fail.get(ctx.job.series_instance_uid) == stage:
            raise RuntimeError(f"{stage} exploded")

    def analyse(self, ctx: JobContext) -> Analysis:
        self._maybe_fail("analyse", ctx)
        if self.on_analyse is not None:
            self.on_analyse(ctx)
        return Analysis(volume=None, sources=ctx.source_paths(), result="result")

    def encode(self, ctx: JobContext, analysis: Analysis) -> Sequence[Any]:
        self._maybe_fail("encode", ctx)
        return ["seg", "sr"]

    def export(self, ctx: JobContext, datasets: Sequence[Any]) -> None:
        self._maybe_fail("export", ctx)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Database, NodeConfig]]:
    config = load_config(None, overrides={"node.state_dir": str(tmp_path / "state")})
    db = Database(config.index_path)
    ensure_instances(db)
    series.ensure_schema(db)
    jobs.ensure_schema(db)
    yield db, config
    db.close()


def queue_series(db: Database, config: NodeConfig, uid: str, n: int = 4) -> int:
    """Store ``n`` axial lumbar slices of series ``uid`` and queue its job; the job id."""
    records = [
        r.__class__(**{**r.__dict__, "series_instance_uid": uid, "sop_instance_uid": f"{uid}.{i}"})
        for i, r in enumerate(stack(n))
    ]
    for rec in records:
        insert_instance(db, rec)
    assembly = assemble(records, config.routing)
    with db.transaction() as conn:
        (job_id,) = jobs.upsert_for_completion(
            conn, series_uid=uid, study_uid=records[0].study_instance_uid,
            groups=assembly.groups, received_at=time.time(), now=time.time(),
        )
    return job_id


def test_a_job_runs_through_every_stage(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    job_id = queue_series(db, config, "1.2.100")
    stages = FakeStages()
    job = process_one(db, config, stages)
    assert job is not None and job.id == job_id
    assert job.state == jobs.DONE and job.attempts == 1 and job.reason is None
    assert [c[0] for c in stages.calls] == ["analyse", "encode", "export"]
    for state in ("received", "complete", "queued", "analysing", "encoding", "exporting", "done"):
        assert job.times[state] is not None, state
    row = db.execute("SELECT analyse_s, encode_s, export_s FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert all(v is not None and v >= 0 for v in row)
    assert process_one(db, config, stages) is None  # queue empty


def test_the_job_sees_its_echo_groups_files(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    queue_series(db, config, "1.2.101", n=3)
    stages = FakeStages()
    seen: list[list[Path]] = []
    stages.on_analyse = lambda ctx: seen.append(ctx.source_paths())
    process_one(db, config, stages)
    (paths,) = seen
    assert len(paths) == 3 and all(p.is_relative_to(config.state_dir) for p in paths)


@pytest.mark.parametrize("stage", ["analyse", "encode", "export"])
def test_a_failing_stage_fails_its_job_and_the_next_job_still_runs(
    env: tuple[Database, NodeConfig], stage: str
) -> None:
    db, config = env
    bad = queue_series(db, config, "1.2.200")
    good = queue_series(db, config, "1.2.201")
    stages = FakeStages(fail={"1.2.200": stage})
    failed = process_one(db, config, stages)
    assert failed is not None and failed.id == bad
    assert failed.state == jobs.FAILED
    assert failed.reason == f"{stage}: RuntimeError: {stage} exploded"
    assert failed.times["failed"] is not None
    done = process_one(db, config, stages)
    assert done is not None and done.id == good and done.state == jobs.DONE


def test_a_missing_stage_module_fails_the_job_with_a_clear_reason(
    env: tuple[Database, NodeConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, config = env
    queue_series(db, config, "1.2.300")
    import builtins

    from node.stages import DefaultStages

    real_import = builtins.__import__

    def no_volume_io(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in ("node.volume_io", "node.results_io"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_volume_io)
    job = process_one(db, config, DefaultStages(config))
    assert job is not None and job.state == jobs.FAILED
    assert job.reason is not None and job.reason.startswith("analyse: ModuleNotFoundError")
    assert "No module named 'node." in job.reason


def _leave_in(db: Database, job_id: int, state: str, attempts: int) -> None:
    db.execute("UPDATE jobs SET state = ?, attempts = ? WHERE id = ?", (state, attempts, job_id))


def test_crash_recovery_requeues_interrupted_jobs(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    a = queue_series(db, config, "1.2.400")
    b = queue_series(db, config, "1.2.401")
    c = queue_series(db, config, "1.2.402")
    _leave_in(db, a, jobs.ANALYSING, 1)  # the node died during inference
    _leave_in(db, b, jobs.EXPORTING, 1)
    _leave_in(db, c, jobs.ENCODING, jobs.MAX_ATTEMPTS)  # this one keeps killing the node
    assert jobs.recover_interrupted(db) == (2, 1)
    ja, jb, jc = (jobs.get_job(db, i) for i in (a, b, c))
    assert ja is not None and ja.state == jobs.QUEUED and ja.reason == "resumed after an interruption"
    assert jb is not None and jb.state == jobs.QUEUED
    assert jc is not None and jc.state == jobs.FAILED and "interrupted 3 times" in (jc.reason or "")
    stages = FakeStages()
    resumed = process_one(db, config, stages)
    assert resumed is not None and resumed.state == jobs.DONE and resumed.attempts == 2


def test_a_stale_claim_cannot_overwrite_a_newer_run(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    job_id = queue_series(db, config, "1.2.500")
    stages = FakeStages()

    def reopen_and_requeue(ctx: JobContext) -> None:
        # a late instance re-completes the series while this run is analysing
        records = [r for r in stack(5)]
        assembly = assemble(records, config.routing)
        with db.transaction() as conn:
            jobs.upsert_for_completion(conn, series_uid="1.2.500", study_uid="1.2",
                                       groups=assembly.groups, received_at=0.0, now=time.time())

    stages.on_analyse = reopen_and_requeue
    job = process_one(db, config, stages)
    assert job is not None and job.id == job_id
    assert job.state == jobs.QUEUED and job.generation == 2  # the new run waits, untouched
    assert [c[0] for c in stages.calls] == ["analyse"]  # the stale run stopped early
    again = process_one(db, config, FakeStages())
    assert again is not None and again.state == jobs.DONE and again.generation == 2


def test_retry_requeues_failed_jobs_only(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    bad = queue_series(db, config, "1.2.600")
    other = queue_series(db, config, "1.2.601")
    process_one(db, config, FakeStages(fail={"1.2.600": "encode"}))
    assert jobs.retry_jobs(db, [bad, other]) == [bad]  # `other` is queued, not failed
    job = jobs.get_job(db, bad)
    assert job is not None and job.state == jobs.QUEUED and job.attempts == 0
    process_one(db, config, FakeStages(fail={"1.2.601": "analyse"}))
    process_one(db, config, FakeStages(fail={"1.2.601": "analyse"}))
    assert jobs.retry_jobs(db, all_failed=True) == [other]


def test_reanalyse_requeues_done_jobs_only(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    done_old = queue_series(db, config, "1.2.650")
    done_new = queue_series(db, config, "1.2.651")
    failed = queue_series(db, config, "1.2.652")
    stages = FakeStages(fail={"1.2.652": "analyse"})
    for _ in range(3):
        process_one(db, config, stages)
    waiting = queue_series(db, config, "1.2.653")  # queued, never run
    db.execute("UPDATE jobs SET done_at = ? WHERE id = ?", (time.time() - 3 * 86400, done_old))
    assert jobs.reanalyse_jobs(db, [failed, waiting]) == []  # neither is done
    assert jobs.reanalyse_jobs(db, done_within_s=86400) == [done_new]
    assert jobs.reanalyse_jobs(db, series_uids=["1.2.650", "1.2.699"]) == [done_old]
    for job_id in (done_old, done_new):
        job = jobs.get_job(db, job_id)
        assert job is not None and job.state == jobs.QUEUED and job.attempts == 0
        assert job.generation == 2 and job.reason == "re-queued by reanalyze"
    # the worker runs them again to the end, after the job that was queued before them
    stages.calls.clear()
    for _ in range(3):
        process_one(db, config, stages)
    assert [uid for stage, uid in stages.calls if stage == "analyse"] == ["1.2.653", "1.2.651", "1.2.650"]
    assert {jobs.get_job(db, i).state for i in (done_old, done_new)} == {jobs.DONE}  # type: ignore[union-attr]


def test_purge_removes_old_finished_jobs(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    old = queue_series(db, config, "1.2.700")
    recent = queue_series(db, config, "1.2.701")
    stages = FakeStages()
    process_one(db, config, stages)
    process_one(db, config, stages)
    db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time() - 10 * 86400, old))
    purged = jobs.purge_jobs(db, older_than_s=7 * 86400)
    assert [j.id for j in purged] == [old]
    assert jobs.get_job(db, old) is None and jobs.get_job(db, recent) is not None
    with pytest.raises(ValueError, match="only finished jobs"):
        jobs.purge_jobs(db, 0, states=(jobs.QUEUED,))


def test_job_counts_cover_every_state(env: tuple[Database, NodeConfig]) -> None:
    db, config = env
    queue_series(db, config, "1.2.800")
    counts = jobs.job_counts(db)
    assert set(counts) == set(jobs.STATES)
    assert counts[jobs.QUEUED] == 1 and sum(counts.values()) == 1
