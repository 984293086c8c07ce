"""Load: many concurrent associations into the real node, nothing lost.

``ASSOCIATIONS`` DCMTK ``storescu`` processes at once, each storing its own series of
``PER_ASSOCIATION`` small images (64x64, 16 bit) into a real ``lumbar-node serve`` on
loopback (durable writes: fsync + SQLite ``synchronous=FULL`` before each success). Reported:
sustained instances/s over the wall time, C-STORE response times seen by the senders
(DCMTK's log timestamps, p50/p99), and ``lost``: acknowledged instances that are not indexed
with an intact file afterwards (must be 0). ``tests/integration/test_reliability_load.py``
runs the same measurement at a size that fits ``make test``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from bench import harness
from node.spool import Spool

ASSOCIATIONS = 20
PER_ASSOCIATION = 200
ROWS = COLUMNS = 64


def measure(associations: int, per_association: int, workdir: Path, rows: int = ROWS) -> dict[str, Any]:
    """Push ``associations`` x ``per_association`` instances at once; the figures."""
    study = generate_uid()
    folders = [workdir / f"a{i}" for i in range(associations)]
    for folder in folders:
        harness.write_series(folder, per_association, rows, rows, study_uid=study)
    node = harness.NodeProcess(workdir / "node", {"node": {"max_associations": associations + 4}}).start()
    try:
        sent = harness.storescu(node.port, harness.NODE_AE, folders, workdir)
    finally:
        node.stop()
    conn = sqlite3.connect(node.state_dir / "index.sqlite")
    try:
        rows_found = conn.execute("SELECT path, sha256, size_bytes, sop_instance_uid FROM instances").fetchall()
    finally:
        conn.close()
    not_intact = [
        problem for problem in (_check(node.state_dir, *row) for row in rows_found) if problem is not None
    ]
    intact = len(rows_found) - len(not_intact)
    total = associations * per_association
    return {
        "associations": associations,
        "instances": total,
        "matrix": f"{rows}x{rows}",
        "succeeded": sent.succeeded,
        "lost": max(0, sent.succeeded - intact),
        "indexed": len(rows_found),
        "wall_s": round(sent.wall_s, 2),
        "instances_per_s": round(sent.per_second, 1),
        "p50_ms": _round(harness.percentile(sent.latencies_ms, 50)),
        "p99_ms": _round(harness.percentile(sent.latencies_ms, 99)),
        "max_ms": _round(max(sent.latencies_ms) if sent.latencies_ms else None),
        "errors": sent.errors[:3],
        "not_intact": not_intact[:5],
    }


def _check(state_dir: Path, path: str, digest: str, size: int, sop_uid: str) -> str | None:
    """None when the indexed file is there with the indexed bytes, else what is wrong."""
    _, problem = Spool(state_dir).read_checked(path, digest, size)
    return f"{sop_uid}: {problem}" if problem else None


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def run() -> dict[str, Any]:
    """The full-size load figure (20 x 200)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        with harness.isolated_network():
            return measure(ASSOCIATIONS, PER_ASSOCIATION, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
