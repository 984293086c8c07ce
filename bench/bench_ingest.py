"""Ingest: DCMTK ``storescu`` into the node (durable writes) vs into DCMTK ``storescp``.

Both receivers run in the same invocation, on the same synthetic files (256x256, 16 bit
MR, ~130 kB each), over loopback, with 1 and with 8 concurrent associations (8
``storescu`` processes, one series each). The node runs as in production: a real
``lumbar-node serve`` process whose C-STORE answers success only after the file is
fsynced, renamed and its directory fsynced, and its index row committed with SQLite
``synchronous=FULL``. ``storescp`` writes each file and never calls fsync, and it runs with
``--fork`` (one process per association) for the 8-association figure.

Response times are measured by the sender: DCMTK's own log timestamps (microseconds)
from "Sending Store Request" to "Received Store Response", for every instance. The node's
handler-time histogram (``lumbar_cstore_handler_seconds``) is reported beside them.
Receivers alternate (reference, node, reference, node...) and each figure is the best of
``rounds`` runs, so that a burst of load from other processes does not pick the winner.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from bench import harness

logger = logging.getLogger(__name__)

#: instances pushed per run (one association, or split over CONCURRENT associations)
INSTANCES = 320
CONCURRENT = 8
ROWS = COLUMNS = 256
ROUNDS = 2
#: targets from the issue
TARGET_RATIO = 1.0
TARGET_P99_MS = 20.0


def _prepare(root: Path) -> tuple[list[Path], list[Path]]:
    """One folder of INSTANCES slices (one series) and CONCURRENT folders (one series each)."""
    study = generate_uid()
    single = root / "single"
    harness.write_series(single, INSTANCES, ROWS, COLUMNS, study_uid=study)
    multi = [root / f"multi{i}" for i in range(CONCURRENT)]
    for folder in multi:
        harness.write_series(folder, INSTANCES // CONCURRENT, ROWS, COLUMNS, study_uid=study)
    return [single], multi


def _summary(result: harness.SendResult) -> dict[str, Any]:
    return {
        "instances_per_s": round(result.per_second, 1),
        "sent": result.sent,
        "succeeded": result.succeeded,
        "wall_s": round(result.wall_s, 3),
        "p50_ms": _round(harness.percentile(result.latencies_ms, 50)),
        "p99_ms": _round(harness.percentile(result.latencies_ms, 99)),
        "errors": result.errors[:3],
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    complete = [r for r in runs if r["succeeded"] == r["sent"]] or runs
    return max(complete, key=lambda r: r["instances_per_s"])


def _run_storescp(work: Path, folders: list[Path], fork: bool) -> dict[str, Any]:
    scp = harness.Storescp(work / f"storescp-{time.monotonic_ns()}", fork=fork)
    try:
        return _summary(harness.storescu(scp.port, scp.ae_title, folders, work))
    finally:
        scp.stop()
        shutil.rmtree(scp.outdir, ignore_errors=True)


def _run_node(work: Path, folders: list[Path]) -> dict[str, Any]:
    node = harness.NodeProcess(work / f"node-{time.monotonic_ns()}").start()
    try:
        result = harness.storescu(node.port, harness.NODE_AE, folders, work)
        text = node.metrics()
    finally:
        code = node.stop()
    summary = _summary(result)
    count = harness.metric_value(text, "lumbar_cstore_handler_seconds_count")
    total = harness.metric_value(text, "lumbar_cstore_handler_seconds_sum")
    stored = harness.metric_value(text, "lumbar_instances_received_total")
    summary["handler_mean_ms"] = _round(1e3 * total / count) if count and total is not None else None
    summary["stored_by_node"] = int(stored) if stored is not None else None
    summary["exit_code"] = code
    if result.errors or code != 0:
        summary["log_tail"] = node.log_tail(800)
    shutil.rmtree(node.state_dir, ignore_errors=True)
    return summary


def measure(work: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """Both receivers, 1 and CONCURRENT associations, ``rounds`` alternating runs each."""
    single, multi = _prepare(work / "data")
    out: dict[str, Any] = {}
    for label, folders, fork in (("1", single, False), (str(CONCURRENT), multi, True)):
        ref_runs: list[dict[str, Any]] = []
        node_runs: list[dict[str, Any]] = []
        for _ in range(rounds):
            ref_runs.append(_run_storescp(work, folders, fork))
            node_runs.append(_run_node(work, folders))
        out[label] = {"storescp": _best(ref_runs), "node": _best(node_runs), "runs": {"storescp": ref_runs, "node": node_runs}}
    return out


def figures(measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (see :mod:`bench.run`) from :func:`measure`'s output."""
    rows: list[dict[str, Any]] = []
    for label, pair in measured.items():
        node, ref = pair["node"], pair["storescp"]
        rate, ref_rate = node["instances_per_s"], ref["instances_per_s"]
        ratio = rate / ref_rate if ref_rate else None
        rows.append(
            {
                "figure": f"ingest, {label} assoc. (node fsyncs; storescp does not)",
                "value": rate,
                "unit": "inst/s",
                "reference": ref_rate,
                "reference_name": "DCMTK storescp" + (" --fork" if label != "1" else ""),
                "ratio": _round(ratio),
                "target": f">= {TARGET_RATIO:.1f}x storescp",
                "met": ratio is not None and ratio >= TARGET_RATIO,
            }
        )
        for q in ("p50", "p99"):
            value = node[f"{q}_ms"]
            rows.append(
                {
                    "figure": f"C-STORE response {q}, {label} assoc.",
                    "value": value,
                    "unit": "ms",
                    "reference": ref[f"{q}_ms"],
                    "reference_name": "DCMTK storescp",
                    "ratio": _round(value / ref[f"{q}_ms"]) if value and ref[f"{q}_ms"] else None,
                    "target": f"<= {TARGET_P99_MS:.0f} ms" if q == "p99" else "",
                    "met": (value is not None and value <= TARGET_P99_MS) if q == "p99" else None,
                }
            )
    return rows


def run(budget_s: float = 240.0) -> dict[str, Any]:
    """The ingest benchmark (``budget_s`` caps the rounds; one round is ~20-60 s here)."""
    work = Path(tempfile.mkdtemp(prefix="lumbar-bench-ingest-"))
    started = time.monotonic()
    try:
        with harness.isolated_network() as isolated:
            rounds = ROUNDS if budget_s >= 120 else 1
            measured = measure(work, rounds)
        return {
            "figures": figures(measured),
            "details": measured,
            "notes": [
                f"{INSTANCES} instances of {ROWS}x{COLUMNS} 16-bit MR per run; best of {rounds} alternating runs",
                "node: fsync(file) + rename + fsync(dir) + SQLite WAL commit (synchronous=FULL) before each success",
                "storescp: DCMTK 3.6.7, writes files without fsync (no durability); --fork for concurrent associations",
                "response times from storescu's log timestamps (request sent -> response received)",
                "private network namespace" if isolated else "host loopback (no network namespace available)",
            ],
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=2))
