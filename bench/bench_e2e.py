"""End-to-end latency: last instance acknowledged -> every result acknowledged by Orthanc.

A phantom axial lumbar series (``lumbar-node phantom``) is pushed with DCMTK ``storescu``
into a real node whose destination is a real Orthanc. The clock starts at the last
"Received Store Response" in storescu's log (the modality's last ACK) and stops at the
last ``done_at`` of the series' deliveries (Orthanc's C-STORE response to the node's
exporter). The configured quiet period (``series.quiet_seconds``) is subtracted: it is a
deliberate wait for late instances, not work. The job's own stage timings (analyse,
encode, export) come from the ``jobs`` table.

The 15-slice series is the phantom's 3 disc blocks x 5 slices. The phantom writes at most
5 slices per block, so the 60-slice series is the same kind of study resampled to 4x the
slice density (20 slices per block at a quarter of the spacing, pixels of the nearest
phantom slice): same geometry checks, routing and analysis, 4x the slices.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from bench import harness

logger = logging.getLogger(__name__)

QUIET_S = 2.0
TARGET_15_S = 3.0
SUBDIVIDE = 4
POLL_S = 0.2
LEVELS = "L3-L4,L4-L5,L5-S1"
SLICES_PER_BLOCK = 5


def phantom_series(out: Path, seed: int) -> Path:
    """A 3-block x 5-slice axial phantom study (no sagittal, no distractor); its axial folder."""
    subprocess.run(
        [
            *harness.node_command(), "phantom", "--out", str(out), "--subjects", "1", "--seed", str(seed),
            "--levels", LEVELS, "--slices-per-block", str(SLICES_PER_BLOCK), "--no-sagittal", "--no-distractor",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    folders = sorted(p.parent for p in out.rglob("*.dcm"))
    return folders[0]


def densify(source: Path, out: Path, factor: int = SUBDIVIDE) -> Path:
    """``factor`` x the slices of each block (same orientation, spacing / factor), new UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(p) for p in sorted(source.glob("*.dcm"))]
    blocks: dict[tuple[float, ...], list[Any]] = {}
    for ds in datasets:
        blocks.setdefault(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient), []).append(ds)
    series_uid = generate_uid()
    number = 0
    for members in blocks.values():
        members.sort(key=lambda d: int(d.InstanceNumber))
        first = np.asarray(members[0].ImagePositionPatient, dtype=float)
        step = (
            (np.asarray(members[-1].ImagePositionPatient, dtype=float) - first) / (len(members) - 1)
            if len(members) > 1
            else np.zeros(3)
        )
        for j in range(len(members) * factor):
            template = members[min(round(j / factor), len(members) - 1)]
            ds = pydicom.dcmread(source / Path(template.filename).name)
            number += 1
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID = series_uid
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [float(v) for v in first + step * j / factor]
            if "SpacingBetweenSlices" in ds:
                ds.SpacingBetweenSlices = float(np.linalg.norm(step)) / factor
            ds.save_as(out / f"IM{number:04d}.dcm", enforce_file_format=True)
    return out


def _deliveries(index: Path, series_uid: str) -> tuple[list[sqlite3.Row], sqlite3.Row | None]:
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT kind, state, created_at, done_at FROM deliveries WHERE series_uid = ?", (series_uid,)
        ).fetchall()
        job = conn.execute(
            "SELECT j.state, j.reason, j.slices, j.analyse_s, j.encode_s, j.export_s, j.queued_at,"
            " j.analysing_at, j.done_at, s.completed_at FROM jobs j"
            " LEFT JOIN series s ON s.series_instance_uid = j.series_instance_uid"
            " WHERE j.series_instance_uid = ? ORDER BY j.id DESC",
            (series_uid,),
        ).fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return [], None
    finally:
        conn.close()
    return rows, job


def _timeline(last_ack: float, job: sqlite3.Row, rows: list[sqlite3.Row]) -> dict[str, float | None]:
    """Seconds after the last ACK at which each hand-off happened (where hand-off time goes)."""

    def at(value: Any) -> float | None:
        return None if value is None else round(float(value) - last_ack, 2)

    return {
        "series_complete": at(job["completed_at"]),
        "job_queued": at(job["queued_at"]),
        "job_picked_up": at(job["analysing_at"]),
        "job_done": at(job["done_at"]),
        "first_delivery_queued": at(min(float(r["created_at"]) for r in rows)),
        "last_delivery_done": at(max(float(r["done_at"]) for r in rows)),
    }


def _wait_for_worker(node: harness.NodeProcess, deadline: float) -> None:
    """Wait until the analysis worker has loaded its model (a node in service has).

    Without this the first series waits for the model to load, which is start-up time,
    not latency.
    """
    while time.monotonic() < deadline:
        checks = node.health().get("checks", {})
        if checks.get("queue", {}).get("worker_ready"):
            return
        time.sleep(POLL_S)


def measure_one(node: harness.NodeProcess, folder: Path, work: Path, deadline: float) -> dict[str, Any]:
    """Push one series and wait for every delivery of it to be done (or the deadline)."""
    series_uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    sent = harness.storescu(node.port, harness.NODE_AE, [folder], work)
    last_ack = sent.last_response_at or time.time()
    index = node.state_dir / "index.sqlite"
    while time.monotonic() < deadline:
        rows, job = _deliveries(index, series_uid)
        if job is not None and job["state"] in ("failed", "skipped"):
            return {
                "slices": sent.sent,
                "error": f"job {job['state']}: {job['reason']}",
                "analyse_s": job["analyse_s"],
                "encode_s": job["encode_s"],
            }
        if rows and job is not None and job["state"] == "done" and all(r["state"] == "done" for r in rows):
            done = max(float(r["done_at"]) for r in rows)
            return {
                "slices": sent.sent,
                "latency_s": round(done - last_ack - QUIET_S, 2),
                "quiet_period_s": QUIET_S,
                "results": sorted(str(r["kind"]) for r in rows),
                "analyse_s": job["analyse_s"],
                "encode_s": job["encode_s"],
                "export_s": job["export_s"],
                "timeline_s": _timeline(last_ack, job, rows),
            }
        time.sleep(POLL_S)
    return {"slices": sent.sent, "error": "deadline passed before every result was acknowledged", "log": node.log_tail(600)}


def run(budget_s: float = 140.0) -> dict[str, Any]:
    """15- and 60-slice series through the whole chain into Orthanc."""
    started = time.monotonic()
    deadline = started + budget_s
    work = Path(tempfile.mkdtemp(prefix="lumbar-bench-e2e-"))
    figures: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    try:
        fifteen = phantom_series(work / "p15", seed=21)
        sixty = densify(phantom_series(work / "p60", seed=22), work / "p60dense")
        with harness.isolated_network() as isolated:
            pacs = harness.Orthanc(work / "orthanc")
            node = harness.NodeProcess(
                work / "node",
                {
                    "series": {"quiet_seconds": QUIET_S},
                    "ai": {"device": "cpu"},
                    "export": {"retry_initial_s": 1.0, "retry_max_s": 2.0},
                    "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
                },
            )
            try:
                node.start()
                _wait_for_worker(node, deadline)
                for label, folder in (("15", fifteen), ("60", sixty)):
                    details[label] = measure_one(node, folder, work, deadline)
            finally:
                node.stop()
                pacs.stop()
        for label, result in details.items():
            figures.append(
                {
                    "figure": f"end-to-end, {result.get('slices', label)} slices (minus {QUIET_S:.0f} s quiet period)",
                    "value": result.get("latency_s"),
                    "unit": "s",
                    "note": result.get("error"),
                    "target": f"<= {TARGET_15_S:.0f} s" if label == "15" else "",
                    "met": (result.get("latency_s") is not None and result["latency_s"] <= TARGET_15_S) if label == "15" else None,
                }
            )
        return {
            "figures": figures,
            "details": details,
            "notes": ["private network namespace" if isolated else "host loopback"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=2, default=str))
