"""Peak resident memory of the node (all its processes) while it analyses a 100-slice series.

The node runs as in production (``lumbar-node serve``; analysis in its worker process);
a 100-slice axial phantom series (the 15-slice phantom resampled to 7x the slice density,
first 100 slices) is pushed with ``storescu`` and the process tree's resident set (sum of
``VmRSS`` over the node and its children) is sampled every 50 ms until the job ends. Each
process's own high-water mark (``VmHWM``) is kept as well.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.bench_e2e import QUIET_S, densify, phantom_series

logger = logging.getLogger(__name__)

SLICES = 100
FACTOR = 7
SAMPLE_S = 0.05
TARGET_MB = 1024.0
KB_PER_MB = 1024.0


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _job(index: Path) -> sqlite3.Row | None:
    try:
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.OperationalError:
        return None
    conn.row_factory = sqlite3.Row
    try:
        row: sqlite3.Row | None = conn.execute("SELECT state, reason, slices, analyse_s FROM jobs ORDER BY id DESC").fetchone()
        return row
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def run(budget_s: float = 90.0) -> dict[str, Any]:
    """Peak RSS (MB) of the node's process tree during one 100-slice analysis."""
    deadline = time.monotonic() + budget_s
    work = Path(tempfile.mkdtemp(prefix="lumbar-bench-memory-"))
    try:
        dense = densify(phantom_series(work / "p", seed=31), work / "dense", FACTOR)
        for extra in sorted(dense.glob("*.dcm"))[SLICES:]:
            extra.unlink()
        with harness.isolated_network():
            node = harness.NodeProcess(
                work / "node",
                {"series": {"quiet_seconds": QUIET_S}, "ai": {"device": "cpu"}},
            )
            node.start()
            try:
                idle_kb = sum(_status_kb(p, "VmRSS") for p in _tree(node.pid))
                sent = harness.storescu(node.port, harness.NODE_AE, [dense], work)
                peak_kb = idle_kb
                hwm: dict[int, int] = {}
                job: sqlite3.Row | None = None
                while time.monotonic() < deadline:
                    pids = _tree(node.pid)
                    peak_kb = max(peak_kb, sum(_status_kb(p, "VmRSS") for p in pids))
                    for pid in pids:
                        hwm[pid] = max(hwm.get(pid, 0), _status_kb(pid, "VmHWM"))
                    job = _job(node.state_dir / "index.sqlite")
                    if job is not None and job["state"] in ("done", "failed", "skipped"):
                        break
                    time.sleep(SAMPLE_S)
            finally:
                node.stop()
        state = job["state"] if job is not None else "no job"
        peak_mb = round(peak_kb / KB_PER_MB, 1)
        note = None if state == "done" else f"job {state}: {job['reason'] if job is not None else 'not created before the deadline'}"
        return {
            "figures": [
                {
                    "figure": f"peak RSS, node analysing {sent.sent} slices (all processes)",
                    "value": peak_mb,
                    "unit": "MB",
                    "target": f"<= {TARGET_MB:.0f} MB",
                    "met": peak_mb <= TARGET_MB,
                    "note": note,
                }
            ],
            "details": {
                "slices_sent": sent.sent,
                "idle_rss_mb": round(idle_kb / KB_PER_MB, 1),
                "peak_tree_rss_mb": peak_mb,
                "per_process_hwm_mb": {str(k): round(v / KB_PER_MB, 1) for k, v in hwm.items()},
                "job_state": state,
                "job_reason": job["reason"] if job is not None else None,
                "analyse_s": job["analyse_s"] if job is not None else None,
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=2, default=str))
