"""Faults after receipt, in the real node: SIGKILL during analysis and during export, and a
PACS that drops associations or answers too slowly. Work resumes and finishes exactly once.

The node is the real ``lumbar-node serve`` (receiver, series assembly, routing, job state
machine, worker process, outbox, exporter); only the job stages are fast fakes
(:class:`reliability_helpers.FakeStages`, deterministic result UIDs like the real encoders'),
so each scenario takes seconds and can hold the analysis exactly where the test wants the
crash. The destination is :class:`reliability_helpers.ScriptedPacs`. the export tests' tests cover a PACS
that is down, per-instance failure statuses and a row left in ``sending`` by a crash; these
add a kill mid-analysis, a kill while the PACS holds a C-STORE, aborts and slow answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import conftest
import pytest
from conftest import NodeProcess, wait_until, write_mr_series
from reliability_helpers import (
    ScriptedPacs,
    analyses,
    derived_uid,
    fake_stage_node_command,
    pythonpath_with_helpers,
    query,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 90.0
SLICES = 4
#: results FakeStages makes per series
RESULTS_PER_SERIES = 2


@pytest.fixture
def pacs() -> Iterator[ScriptedPacs]:
    peer = ScriptedPacs()
    yield peer
    peer.stop()


@pytest.fixture
def fake_stage_node(
    node_factory: Callable[..., NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., NodeProcess]:
    """``node_factory`` for nodes whose worker runs :class:`FakeStages`."""
    monkeypatch.setattr(conftest, "node_command", fake_stage_node_command)
    monkeypatch.setenv("PYTHONPATH", pythonpath_with_helpers())

    def start(pacs: ScriptedPacs, **sections: Any) -> NodeProcess:
        return node_factory(
            destinations=[pacs.destination()],
            series={"quiet_seconds": 1.0},
            export={"retry_initial_s": 0.5, "retry_max_s": 1.0, "retry_horizon_h": 0.2},
            **sections,
        )

    return start


def jobs_of(node: NodeProcess) -> list[Any]:
    return query(node.state_dir, "SELECT * FROM jobs")


def deliveries_of(node: NodeProcess) -> list[Any]:
    return query(node.state_dir, "SELECT * FROM deliveries")


def expected_results(series_uid: str) -> set[str]:
    return {derived_uid(series_uid, f"overlay-{n}") for n in range(RESULTS_PER_SERIES)}


def send_series(node: NodeProcess, folder: Path) -> str:
    files = write_mr_series(folder, SLICES)
    result = node.storescu(files)
    assert result.returncode == 0, result.stderr
    from pydicom import dcmread

    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def wait_delivered(node: NodeProcess, count: int) -> list[Any]:
    def done() -> bool:
        rows = deliveries_of(node)
        return len(rows) == count and all(r["state"] == "done" for r in rows)

    try:
        wait_until(done, DEADLINE_S, f"{count} deliveries done")
    except BaseException:
        print(node.log_tail(60))  # noqa: T201 - context for the failure
        raise
    return deliveries_of(node)


def test_sigkill_during_analysis_resumes_and_finishes_once(
    fake_stage_node: Callable[..., NodeProcess], pacs: ScriptedPacs, tmp_path: Path
) -> None:
    node = fake_stage_node(pacs)
    (node.state_dir / "hold").touch()  # FakeStages waits in analyse() until 'release' exists
    series_uid = send_series(node, tmp_path / "s")
    wait_until(lambda: (node.state_dir / "analysing").exists(), DEADLINE_S, "the analysis to start")
    [job] = jobs_of(node)
    assert job["state"] == "analysing" and job["worker_pid"]
    node.kill()
    # the worker process dies with the node (parent-death signal): no orphan finishes the job
    wait_until(lambda: not _alive(int(job["worker_pid"])), 10, "the worker to die with the node")
    assert analyses(node.state_dir) == []
    (node.state_dir / "release").touch()
    node.restart()
    rows = wait_delivered(node, RESULTS_PER_SERIES)
    [job] = jobs_of(node)
    assert job["state"] == "done" and job["attempts"] == 2, dict(job)
    assert analyses(node.state_dir) == [series_uid], "analysed more or less than once"
    assert {r["sop_instance_uid"] for r in rows} == expected_results(series_uid)
    assert sorted(pacs.stored) == sorted(expected_results(series_uid)), "a result reached the PACS twice"
    assert "recovered interrupted jobs: 1 re-queued" in node.log_text()


def test_sigkill_while_the_pacs_holds_a_store_delivers_after_restart(
    fake_stage_node: Callable[..., NodeProcess], pacs: ScriptedPacs, tmp_path: Path
) -> None:
    node = fake_stage_node(pacs)
    pacs.hold.set()
    series_uid = send_series(node, tmp_path / "s")
    assert pacs.entered.wait(DEADLINE_S), "the node never sent its results"
    sending = [r for r in deliveries_of(node) if r["state"] == "sending"]
    assert sending, "the kill must come while a delivery is in flight"
    node.kill()
    pacs.hold.clear()  # the held C-STORE now "succeeds" on a dead association
    node.restart()
    rows = wait_delivered(node, RESULTS_PER_SERIES)
    assert {r["sop_instance_uid"] for r in rows} == expected_results(series_uid)
    # analysis and encoding were not redone; the PACS holds each result UID (a re-sent UID
    # is the same object to a PACS, never a second result)
    assert analyses(node.state_dir) == [series_uid]
    [job] = jobs_of(node)
    assert job["state"] == "done" and job["attempts"] == 1
    assert set(pacs.stored) == expected_results(series_uid)
    print(f"kill during export: {len(pacs.stored)} C-STOREs answered for {len(rows)} results")  # noqa: T201


def test_pacs_aborting_then_too_slow_still_gets_everything(
    fake_stage_node: Callable[..., NodeProcess], pacs: ScriptedPacs, tmp_path: Path
) -> None:
    pacs.abort_first = 2  # the first two C-STOREs: A-ABORT mid-transfer
    pacs.delay_first = 3  # the third: answered after the node's DIMSE timeout
    pacs.delay_s = 3.0
    node = fake_stage_node(pacs, node={"dimse_timeout_s": 1.0})
    uids = [send_series(node, tmp_path / f"s{i}") for i in range(2)]
    rows = wait_delivered(node, RESULTS_PER_SERIES * len(uids))
    expected = set().union(*(expected_results(u) for u in uids))
    assert {r["sop_instance_uid"] for r in rows} == expected
    assert set(pacs.stored) == expected
    assert max(r["attempts"] for r in rows) >= 2, "the faults must have forced retries"
    assert sorted(analyses(node.state_dir)) == sorted(uids)
    assert node.running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_reanalyze_runs_a_done_series_again_and_sends_its_results_again(
    fake_stage_node: Callable[..., NodeProcess], pacs: ScriptedPacs, tmp_path: Path
) -> None:
    import subprocess

    node = fake_stage_node(pacs)
    series_uid = send_series(node, tmp_path / "s")
    wait_delivered(node, RESULTS_PER_SERIES)
    [job] = jobs_of(node)
    assert job["state"] == "done" and job["generation"] == 1

    def reanalyze(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*conftest.node_command(), "reanalyze", "--config", str(node.config_path), *args],
                              capture_output=True, text=True, timeout=60, check=False)

    unknown = reanalyze("--series", "1.2.3.999")
    assert unknown.returncode == 1 and "left alone: 1.2.3.999" in unknown.stderr
    done = reanalyze("--series", series_uid)  # the node is running: its worker picks it up
    assert done.returncode == 0 and f"re-queued 1 job(s) for analysis: {job['id']}" in done.stdout, done
    wait_until(lambda: analyses(node.state_dir) == [series_uid, series_uid], DEADLINE_S, "the second analysis")
    wait_until(lambda: len(pacs.stored) == 2 * RESULTS_PER_SERIES, DEADLINE_S, "the results sent again")
    [job] = jobs_of(node)
    assert job["state"] == "done" and job["generation"] == 2 and job["attempts"] == 1
    assert sorted(pacs.stored) == sorted(2 * list(expected_results(series_uid)))  # same UIDs: replaced
    # The PACS has the instances a moment before the node records each delivery done.
    wait_delivered(node, len(deliveries_of(node)))
    assert reanalyze("--done-within", "1").returncode == 0  # the same job, found by its age
