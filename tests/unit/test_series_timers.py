"""Quiet-period timers: completion, re-arming, per-AE override, late instances, restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from series_samples import SAGITTAL, SERIES, make_config, record, stack, wait_for

from node import instances, jobs
from node.config import NodeConfig
from node.db import Database
from node.instances import InstanceRecord, insert_instance
from node.orchestrator import Orchestrator
from node.series import COMPLETE, OPEN, SKIPPED, get_series


class Node:
    """An orchestrator without a worker process, over a fresh index."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.db = Database(config.index_path)
        instances.ensure_schema(self.db)
        self.orch = Orchestrator(self.db, config, run_worker=False)
        self.orch.start()

    def store(self, records: list[InstanceRecord]) -> None:
        for rec in records:
            insert_instance(self.db, rec)
            self.orch.instance_stored(rec)

    def series(self, uid: str = SERIES) -> dict[str, Any] | None:
        return get_series(self.db, uid)

    def state(self, uid: str = SERIES) -> str | None:
        row = self.series(uid)
        return row["state"] if row else None

    def close(self) -> None:
        self.orch.shutdown(5.0)
        self.db.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(make_config(tmp_path))
    yield n
    n.close()


def test_series_completes_after_the_quiet_period(node: Node) -> None:
    records = stack(5)
    node.store(records)
    assert node.state() == OPEN
    wait_for(lambda: node.state() == COMPLETE, what="completion")
    row = node.series()
    assert row is not None
    assert row["instance_count"] == 5 and row["slice_count"] == 5
    assert row["completed_at"] >= max(r.received_at for r in records) + 0.3
    (job,) = jobs.jobs_of_series(node.db, SERIES)
    assert job.state == jobs.QUEUED and job.echo == 0 and job.slices == 5
    assert job.times["complete"] is not None and job.times["queued"] is not None


def test_each_new_instance_pushes_completion_back(node: Node) -> None:
    node.store(stack(3))
    time.sleep(0.15)  # spaces the arrivals; the assertion below does not depend on timing
    last = stack(4)[3]
    node.store([last])
    wait_for(lambda: node.state() == COMPLETE, what="completion")
    row = node.series()
    assert row is not None and row["instance_count"] == 4
    assert row["completed_at"] >= last.received_at + 0.3


def test_quiet_period_per_calling_ae(tmp_path: Path) -> None:
    extra = '[[callers.allowed]]\nae_title = "FAST"\nquiet_seconds = 0.2\n'
    n = Node(make_config(tmp_path, quiet=60.0, extra=extra))
    try:
        n.store([record(f"1.2.9.{i}", series="1.2.9", calling_ae="FAST",
                        ipp=(0, 0, 4.0 * i)) for i in range(3)])
        n.store([record(f"1.2.8.{i}", series="1.2.8", calling_ae="SLOW",
                        ipp=(0, 0, 4.0 * i)) for i in range(3)])
        wait_for(lambda: n.state("1.2.9") == COMPLETE, what="FAST series completion")
        assert n.state("1.2.8") == OPEN
        row = n.series("1.2.8")
        assert row is not None and row["quiet_seconds"] == 60.0
    finally:
        n.close()


def test_late_instance_reopens_and_requeues(node: Node) -> None:
    node.store(stack(5))
    wait_for(lambda: node.state() == COMPLETE, what="first completion")
    (first,) = jobs.jobs_of_series(node.db, SERIES)
    node.store(stack(6)[5:])
    assert node.state() == OPEN
    (held,) = jobs.jobs_of_series(node.db, SERIES)
    assert held.state == jobs.RECEIVED  # not analysed while the series is incomplete
    wait_for(lambda: node.state() == COMPLETE, what="second completion")
    row = node.series()
    assert row is not None and row["instance_count"] == 6 and row["completions"] == 2
    (again,) = jobs.jobs_of_series(node.db, SERIES)
    assert again.id == first.id
    assert again.state == jobs.QUEUED and again.generation == first.generation + 1
    assert again.slices == 6


def test_multi_echo_series_becomes_one_job_per_echo(node: Node) -> None:
    brain = {"BodyPartExamined": "BRAIN", "SeriesDescription": "pd+t2_tse_sag"}
    node.store(stack(4, iop=SAGITTAL, EchoNumbers=1, **brain)
               + stack(4, iop=SAGITTAL, start=10, EchoNumbers=2, **brain))
    wait_for(lambda: node.state() == SKIPPED, what="skip")
    row = node.series()
    assert row is not None and "not axial" in row["reason"] and "BRAIN" in row["reason"]
    assert [g["echo"] for g in row["echo_groups"]] == [1, 2]
    found = jobs.jobs_of_series(node.db, SERIES)
    assert [(j.echo, j.state) for j in found] == [(1, jobs.SKIPPED), (2, jobs.SKIPPED)]
    assert all("not axial" in (j.reason or "") for j in found)
    assert [j.key for j in found] == [f"{SERIES}_e1", f"{SERIES}_e2"]


def test_timers_are_rearmed_at_start_up(tmp_path: Path) -> None:
    slow = Node(make_config(tmp_path, quiet=60.0))
    slow.store(stack(4))
    assert slow.state() == OPEN
    slow.close()
    # the quiet period has already elapsed for the restarted node: it fires at once
    fast = Node(make_config(tmp_path, quiet=0.2))
    try:
        wait_for(lambda: fast.state() == COMPLETE, what="completion after restart")
        row = fast.series()
        assert row is not None and row["instance_count"] == 4
    finally:
        fast.close()


def test_instances_never_seen_by_the_orchestrator_are_assembled_at_start_up(tmp_path: Path) -> None:
    config = make_config(tmp_path, quiet=0.2)
    db = Database(config.index_path)
    instances.ensure_schema(db)
    for rec in stack(3, received_at=time.time() - 100):
        insert_instance(db, rec)  # stored, then a crash before the orchestrator heard of it
    db.close()
    n = Node(config)
    try:
        wait_for(lambda: n.state() == COMPLETE, what="completion of the orphan series")
    finally:
        n.close()


def test_a_completion_that_raises_is_tried_again(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.orchestrator as orchestrator_module
    from node import series as series_module

    real = series_module.assemble
    calls: list[int] = []

    def flaky(records: Any, rules: Any) -> Any:
        calls.append(len(records))
        if len(calls) == 1:
            raise RuntimeError("index busy")
        return real(records, rules)

    monkeypatch.setattr(orchestrator_module, "COMPLETION_RETRY_S", 0.1)
    monkeypatch.setattr(series_module, "assemble", flaky)
    node.store(stack(3))
    wait_for(lambda: node.state() == COMPLETE, what="completion after a failed attempt")
    assert len(calls) == 2
