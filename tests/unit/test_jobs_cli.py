"""``lumbar-node status``, ``retry`` and ``purge`` on a real index file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from series_samples import SAGITTAL, complete_series, stack

from node import jobs, series
from node.cli import main
from node.config import load_config
from node.db import Database
from node.instances import ensure_schema as ensure_instances


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    config = load_config(None, overrides={"node.state_dir": str(state_dir)})
    db = Database(config.index_path)
    ensure_instances(db)
    series.ensure_schema(db)
    jobs.ensure_schema(db)
    (good,) = complete_series(db, "1.2.10", stack(4))
    (bad,) = complete_series(db, "1.2.11", stack(4))
    complete_series(db, "1.2.12", stack(3, iop=SAGITTAL, BodyPartExamined="BRAIN", SeriesDescription="sag"))
    now = time.time()
    db.execute("UPDATE jobs SET state = 'done', updated_at = ? WHERE id = ?", (now - 40 * 86400, good))
    db.execute("UPDATE jobs SET state = 'failed', reason = 'analyse: RuntimeError: boom' WHERE id = ?",
               (bad,))
    (config.results_dir / "1.2.10").mkdir(parents=True)
    (config.results_dir / "1.2.10" / "results.json").write_text("{}")
    db.close()
    return state_dir


def _status(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    assert main(["status", "--state-dir", str(state_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_reports_queue_series_and_failures(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _status(state, capsys)
    assert data["jobs"]["by_state"]["failed"] == 1 and data["jobs"]["by_state"]["done"] == 1
    assert data["jobs"]["by_state"]["skipped"] == 1
    (failure,) = data["jobs"]["failed"]
    assert failure["series_instance_uid"] == "1.2.11" and "boom" in failure["reason"]
    by_uid = {s["series_instance_uid"]: s for s in data["series"]["recent"]}
    assert by_uid["1.2.10"]["state"] == "complete" and by_uid["1.2.10"]["slices"] == 4
    skipped = by_uid["1.2.12"]
    assert skipped["state"] == "skipped" and skipped["description"] == "sag"
    assert "not axial" in skipped["reason"] and "BRAIN" in skipped["reason"]
    assert data["deliveries"] is None  # no deliveries table in this index
    store = data["storage"]
    assert store["instances"] == 11 and store["received_bytes"] == 11 * 1000  # the rows' sizes
    assert store["retention_keep_days"] == 30.0 and store["free_mb"] > 0
    assert main(["status", "--state-dir", str(state)]) == 0
    text = capsys.readouterr().out
    assert "failures:" in text and "boom" in text and "skipped" in text
    assert "storage: 11 instances, 0.0 MB received, oldest 0.0 days old;" in text
    assert "finished series removed after 30 days" in text


def test_status_without_an_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _status(tmp_path / "nothing", capsys)
    assert data["exists"] is False
    assert not (tmp_path / "nothing").exists()  # status never creates anything


def test_retry_requeues_failed_jobs(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retry", "--state-dir", str(state)]) == 1  # nothing asked
    assert main(["retry", "--state-dir", str(state), "--all-failed"]) == 0
    assert "re-queued 1 job(s)" in capsys.readouterr().out
    data = _status(state, capsys)
    assert data["jobs"]["by_state"]["failed"] == 0 and data["jobs"]["by_state"]["queued"] == 1
    assert main(["retry", "--state-dir", str(state), "999"]) == 1


def test_purge_removes_old_done_jobs_and_their_results(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = state / "results" / "1.2.10"
    assert main(["purge", "--state-dir", str(state), "--done-older-than", "60", "--files"]) == 0
    assert "purged 0 job(s)" in capsys.readouterr().out and results.exists()
    assert main(["purge", "--state-dir", str(state), "--done-older-than", "30", "--files"]) == 0
    assert "purged 1 job(s), removed 1 results folder(s)" in capsys.readouterr().out
    assert not results.exists()
    data = _status(state, capsys)
    assert data["jobs"]["by_state"]["done"] == 0 and data["jobs"]["by_state"]["failed"] == 1
