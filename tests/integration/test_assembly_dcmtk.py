"""Series assembly and routing in the real node process, fed by DCMTK ``storescu``."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProcess, node_command, wait_until, write_mr_series

pytestmark = pytest.mark.integration

#: 70 files: 35 sagittal slices x 2 echoes (PD + T2), BodyPartExamined BRAIN
SIEMENS_FILES = 70
SIEMENS_SLICES_PER_ECHO = 35
TIMEOUT_S = 60.0


def status_json(node: NodeProcess) -> dict[str, Any]:
    """``lumbar-node status --json`` of the running node (reads the index only)."""
    result = subprocess.run(
        [*node_command(), "status", "--config", str(node.config_path), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def series_state(node: NodeProcess, uid: str) -> str | None:
    """The series' state straight from the index (cheap enough to poll)."""
    path = node.state_dir / "index.sqlite"
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        row = conn.execute(
            "SELECT state FROM series WHERE series_instance_uid = ?", (uid,)
        ).fetchone()
    except sqlite3.OperationalError:  # the table does not exist yet
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def series_entry(node: NodeProcess, uid: str) -> dict[str, Any]:
    """The series as ``lumbar-node status --json`` reports it."""
    data = status_json(node)
    for entry in data["series"]["recent"]:
        if entry["series_instance_uid"] == uid:
            return entry
    raise AssertionError(f"series {uid} not in status: {data['series']}")


def test_siemens_dual_echo_series_is_two_echo_groups_skipped_as_sagittal_brain(
    node_factory: Any, siemens_dual_echo: Path
) -> None:
    node: NodeProcess = node_factory(series={"quiet_seconds": 1.0})
    sources = sorted(siemens_dual_echo.glob("*.dcm"))
    assert len(sources) == SIEMENS_FILES
    result = node.storescu([siemens_dual_echo])
    assert result.returncode == 0, result.stderr
    from pydicom import dcmread

    uid = str(dcmread(sources[0], stop_before_pixels=True).SeriesInstanceUID)
    wait_until(lambda: series_state(node, uid) not in (None, "open"), TIMEOUT_S,
               "the Siemens series to complete")
    entry = series_entry(node, uid)
    assert entry["state"] == "skipped", entry
    assert entry["instances"] == SIEMENS_FILES and entry["slices"] == SIEMENS_FILES
    assert entry["description"] == "pd+t2_tse_sag_ISO_1.8mm"
    groups = entry["echo_groups"]
    assert [g["echo"] for g in groups] == [1, 2]
    for g in groups:
        assert g["slices"] == SIEMENS_SLICES_PER_ECHO and g["outcome"] == "skipped", g
        assert "not axial" in g["reason"] and "sagittal" in g["reason"]
        assert "not lumbar: BodyPartExamined 'BRAIN'" in g["reason"]
    assert entry["reason"].startswith("echo 1: not axial")
    data = status_json(node)
    assert data["jobs"]["by_state"]["skipped"] == 2
    assert data["jobs"]["by_state"]["queued"] == 0 and data["jobs"]["failed"] == []
    status, body = node.http_get("/metrics")
    text = body.decode()
    assert status == 200
    assert re.search(r'lumbar_series_skipped_total\{reason="not_axial"\} 1\.0', text), text
    assert re.search(r'lumbar_jobs\{state="skipped"\} 2\.0', text), text
    assert re.search(r"lumbar_series_completed_total 1\.0", text), text


def test_one_series_over_two_associations_completes_once(
    node_factory: Any, tmp_path: Path
) -> None:
    node: NodeProcess = node_factory(series={"quiet_seconds": 3.0})
    files = write_mr_series(tmp_path / "lumbar", 10)
    from pydicom import dcmread

    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    first = node.storescu(files[:5], calling_ae="SCANNER")
    assert first.returncode == 0, first.stderr
    second = node.storescu(files[5:], calling_ae="SCANNER")
    assert second.returncode == 0, second.stderr
    wait_until(lambda: series_state(node, uid) not in (None, "open"), TIMEOUT_S,
               "the series to complete")
    entry = series_entry(node, uid)
    assert entry["state"] == "complete", entry
    assert entry["instances"] == 10 and entry["completions"] == 1
    (group,) = entry["echo_groups"]
    assert group["echo"] == 0 and group["slices"] == 10 and group["outcome"] == "analyse"
    data = status_json(node)
    mine = [j for j in data["jobs"]["active"] + data["jobs"]["failed"] if j["series_instance_uid"] == uid]
    counts = data["jobs"]["by_state"]
    # exactly one job for the series, whatever stage the real pipeline has reached by now
    assert sum(counts.values()) == 1, counts
    assert len(mine) <= 1
    log = node.log_text()
    assert len(re.findall(rf"series {re.escape(uid)} complete", log)) == 1, log[-3000:]
