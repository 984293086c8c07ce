"""End to end with real peers: DCMTK storescu -> lumbar-node (real process: receiver, series
assembly, routing, analysis, encoders, outbox, exporter) -> Orthanc as the PACS.

A phantom study (``lumbar-node phantom``: axial lumbar T2 + sagittal T2 + a non-lumbar
distractor, with ``truth.json``) is pushed into the node. The tests wait (polling with a
deadline) and check through Orthanc's REST API:

1. SEG, SR and overlay exist for the axial series and nothing for the other series, and the
   SR's dural sac areas match the phantom truth within loose tolerances;
2. Orthanc is down when the results are ready and comes back later: every result arrives
   exactly once (Orthanc's change log has one NewInstance per result);
3. the PACS refuses SR (SOP class not accepted): SEG and overlay arrive, the SR is
   dead-lettered with a clear reason.

Needs the whole chain: ``node/commands/phantom.py`` + ``node/phantom_dicom.py`` (phantom
issue), ``ai/pipeline.py`` with shipped weights (segmentation/grading issues),
``node/encode`` (``encode_series``; DICOM outputs issue) and the orchestrator.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from conftest import node_command
from orthanc_peer import Orthanc, RefusingGateway, isolated_network, wait_until
from pydicom.dataset import Dataset

from node.config import load_config
from node.db import Database
from node.outbox import deliveries_for_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}
#: receive + quiet period + analysis on a shared 2-core CPU + encode + export (s)
CHAIN_DEADLINE_S = 420.0
#: agreement of the SR's dural sac area with the phantom truth (mm2): about the widest
#: held-out Bland-Altman 95 % limit of the shipped models on realistic phantoms (1.0.0:
#: -48..+43, 1.1.0: -30..+37; docs/evaluation.md). The issue's target (<= 10 % error) is
#: not met by the shipped model on stenotic levels.
DSCA_LIMITS_MM2 = 48.0
#: the private coding scheme of node/encode/codes.py and its DSCA concept
PRIVATE_SCHEME = "99LUMBAR"
DSCA_CODE = "DSCA"
#: SCT finding-site codes of the disc levels (node/encode/codes.py LEVEL_SITE)
LEVEL_BY_SITE = {
    "243920003": "L1-L2",
    "243921004": "L2-L3",
    "243922006": "L3-L4",
    "243923001": "L4-L5",
    "243927000": "L5-S1",
}


@pytest.fixture(scope="module", autouse=True)
def private_network() -> Iterator[bool]:
    with isolated_network() as isolated:
        yield isolated


# -- the phantom study ------------------------------------------------------------------


def phantom_study(out: Path) -> Path:
    """Write one phantom subject (with sagittal and distractor series when the command
    offers them) and return the folder."""
    base = [*node_command(), "phantom"]
    help_text = subprocess.run([*base, "--help"], capture_output=True, text=True, check=True).stdout
    args = [*base, "--out", str(out), "--subjects", "1", "--seed", "11"]
    for flag in ("--sagittal", "--distractor"):
        if flag in help_text:
            args.append(flag)
    subprocess.run(args, capture_output=True, text=True, check=True, timeout=300)
    return out


def classify_series(folder: Path) -> dict[str, set[str]]:
    """``{"axial": {uid}, "sagittal": {...}, "other": {...}}`` from the written headers."""
    planes: dict[str, set[str]] = defaultdict(set)
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, IsADirectoryError, OSError):
            continue
        if "SeriesInstanceUID" not in ds:
            continue
        body = str(getattr(ds, "BodyPartExamined", "")).upper()
        normal = np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, dtype=float), (2, 3)))
        axis = int(np.argmax(np.abs(normal)))
        if "SPINE" not in body:
            planes["other"].add(str(ds.SeriesInstanceUID))
        elif axis == 2:
            planes["axial"].add(str(ds.SeriesInstanceUID))
        else:
            planes["sagittal"].add(str(ds.SeriesInstanceUID))
    return planes


def truth_dsca(folder: Path) -> dict[str, float]:
    """Mean true dural sac area (mm2) per level name from the phantom's ``truth.json``."""
    values: dict[str, list[float]] = defaultdict(list)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("level"), str) and isinstance(node.get("dsca_mm2"), int | float):
                values[node["level"]].append(float(node["dsca_mm2"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    files = list(folder.rglob("truth.json"))
    assert files, f"no truth.json under {folder}"
    for file in files:
        data = json.loads(file.read_text())
        walk(data.get("levels", data))  # per-level truth when present, else any entries
    assert values, "truth.json has no per-level dsca_mm2"
    return {level: float(np.mean(v)) for level, v in values.items()}


# -- reading the results back from Orthanc -----------------------------------------------


def orthanc_results(peer: Orthanc) -> dict[str, Dataset]:
    """SOP Instance UID -> full dataset of every SEG, SR and SC instance in Orthanc."""
    out: dict[str, Dataset] = {}
    for orthanc_id in peer.get("/instances"):
        tags = peer.get(f"/instances/{orthanc_id}/simplified-tags")
        if tags["SOPClassUID"] in {SEG} | SR_CLASSES | SC_CLASSES:
            response = requests.get(f"{peer.url}/instances/{orthanc_id}/file", timeout=30.0)
            response.raise_for_status()
            out[tags["SOPInstanceUID"]] = pydicom.dcmread(io.BytesIO(response.content))
    return out


def results_dsca(results_dir: Path, series_uid: str) -> dict[str, float]:
    """Dural sac area (mm2) per named level from the node's own results.json."""
    out: dict[str, float] = {}
    for path in results_dir.glob("*/results.json"):
        result = json.loads(path.read_text())
        if result["series_instance_uid"] != series_uid:
            continue
        for level in result["levels"]:
            if level["level"] and level["stenosis"]:
                out[level["level"]] = float(level["stenosis"]["dsca_mm2"])
    return out


def referenced_series(ds: Dataset, series_of_instance: dict[str, str]) -> set[str]:
    """Series a result refers to (SEG: referenced series, SR: evidence, SC: source images,
    whose instance UIDs are mapped to their series through the node's index)."""
    found: set[str] = set()
    for keyword in ("ReferencedSeriesSequence", "CurrentRequestedProcedureEvidenceSequence", "SourceImageSequence"):
        for item in ds.get(keyword, []):
            if "SeriesInstanceUID" in item:
                found.add(str(item.SeriesInstanceUID))
            if "ReferencedSOPInstanceUID" in item:
                found.add(series_of_instance.get(str(item.ReferencedSOPInstanceUID), "unknown"))
            for inner in item.get("ReferencedSeriesSequence", []):
                found.add(str(inner.SeriesInstanceUID))
    return found


def sr_dsca(sr: Dataset) -> dict[str, float]:
    """Dural sac area (mm2) per named level from the TID 1500 measurement groups."""
    out: dict[str, float] = {}

    def visit(items: Any, level: str | None) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence", [None])[0]
            if item.get("ValueType") == "CODE" and name is not None and name.CodeValue == "363698007":
                code = str(item.ConceptCodeSequence[0].CodeValue)  # Finding Site
                level = LEVEL_BY_SITE.get(code, level)
            if (
                item.get("ValueType") == "NUM"
                and name is not None
                and name.CodeValue == DSCA_CODE
                and name.CodingSchemeDesignator == PRIVATE_SCHEME
                and level is not None
            ):
                out[level] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                visit(item.ContentSequence, level)

    for group in sr.get("ContentSequence", []):
        visit([group], None)
    return out


# -- helpers ---------------------------------------------------------------------------


def start_node(node_factory: Callable[..., Any], destination: dict[str, Any], **sections: Any) -> Any:
    return node_factory(
        destinations=[destination],
        series={"quiet_seconds": 2.0},
        export={"retry_initial_s": 1.0, "retry_max_s": 3.0, "retry_horizon_h": 0.5, **sections.pop("export", {})},
        **sections,
    )


def dicom_destination(aet: str, port: int) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": aet, "host": "127.0.0.1", "port": port}


#: series and job states after which no result will come (node/series.py, node/jobs.py)
DEAD_END_SERIES = ("skipped", "incoherent")
DEAD_END_JOBS = ("failed", "skipped")


def chain_failure(db: Database, series_uid: str) -> str | None:
    """Why the analysed series will never produce results, if the index already says so."""
    try:
        series = db.execute(
            "SELECT state, reason FROM series WHERE series_instance_uid = ?", (series_uid,)
        ).fetchone()
        jobs = db.execute(
            "SELECT state, reason FROM jobs WHERE series_instance_uid = ?", (series_uid,)
        ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return None
    if series is not None and series["state"] in DEAD_END_SERIES:
        return f"axial series {series['state']}: {series['reason']}"
    for job in jobs:
        if job["state"] in DEAD_END_JOBS:
            return f"job {job['state']}: {job['reason']}"
    return None


def wait_for_deliveries(node: Any, db: Database, series_uid: str, done: Callable[[list[dict[str, Any]]], bool], what: str) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        stuck = chain_failure(db, series_uid)
        if stuck is not None:  # fail at once, with the reason, instead of at the deadline
            raise AssertionError(f"{stuck}\nnode log:\n{node.log_tail(30)}")
        rows = deliveries_for_series(db, series_uid)
        return rows if rows and done(rows) else None

    try:
        result: list[dict[str, Any]] = wait_until(check, CHAIN_DEADLINE_S, what, interval_s=1.0)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nnode log:\n{node.log_tail(60)}") from None
    return result


def push_phantom(node: Any, tmp_path: Path) -> tuple[Path, dict[str, set[str]]]:
    folder = phantom_study(tmp_path / "phantom")
    planes = classify_series(folder)
    assert len(planes["axial"]) == 1, planes
    result = node.storescu([folder], "+sp", "*.dcm")  # not truth.json / labels.npz
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, planes


# -- the scenarios -----------------------------------------------------------------------


def test_results_for_the_axial_series_only_and_sr_matches_truth(
    tmp_path: Path, node_factory: Callable[..., Any]
) -> None:
    peer = Orthanc(tmp_path / "orthanc")
    peer.start()
    try:
        node = start_node(node_factory, dicom_destination(peer.aet, peer.dicom_port))
        db = Database(load_config(node.config_path).index_path)
        folder, planes = push_phantom(node, tmp_path)
        [axial] = planes["axial"]
        rows = wait_for_deliveries(
            node, db, axial, lambda r: all(x["state"] == "done" for x in r), "results delivered"
        )
        assert {r["kind"] for r in rows} == {"seg", "sr", "overlay"}
        for other in planes["sagittal"] | planes["other"]:
            assert deliveries_for_series(db, other) == []

        stored = orthanc_results(peer)
        assert set(stored) == {r["sop_instance_uid"] for r in rows}
        classes = {str(ds.SOPClassUID) for ds in stored.values()}
        assert SEG in classes and classes & SR_CLASSES and classes & SC_CLASSES
        series_of_instance = {
            str(r["sop_instance_uid"]): str(r["series_instance_uid"])
            for r in db.execute("SELECT sop_instance_uid, series_instance_uid FROM instances")
        }
        for ds in stored.values():
            refs = referenced_series(ds, series_of_instance)
            assert axial in refs, ds.SOPClassUID
            assert not refs & (planes["sagittal"] | planes["other"] | {"unknown"})

        [sr] = [ds for ds in stored.values() if str(ds.SOPClassUID) in SR_CLASSES]
        measured = sr_dsca(sr)
        truth = truth_dsca(folder)
        common = set(measured) & set(truth)
        assert common, f"no named level in both SR {measured} and truth {truth}"
        # the SR carries exactly the numbers of the analysis ...
        analysed = results_dsca(load_config(node.config_path).results_dir, axial)
        assert set(measured) == set(analysed)
        for level, value in measured.items():
            assert value == pytest.approx(analysed[level], abs=0.01), level
        # ... and they agree with the phantom truth within the model's held-out limits
        for level in common:
            assert abs(measured[level] - truth[level]) <= DSCA_LIMITS_MM2, (level, measured, truth)
    finally:
        peer.stop(graceful=False)


def test_pacs_down_when_results_are_ready_then_every_result_arrives_once(
    tmp_path: Path, node_factory: Callable[..., Any]
) -> None:
    peer = Orthanc(tmp_path / "orthanc")  # configured, not running
    node = start_node(node_factory, dicom_destination(peer.aet, peer.dicom_port))
    db = Database(load_config(node.config_path).index_path)
    _folder, planes = push_phantom(node, tmp_path)
    [axial] = planes["axial"]
    wait_for_deliveries(
        node,
        db,
        axial,
        lambda r: all(x["state"] == "failed" and x["attempts"] >= 2 for x in r),
        "deliveries failing while Orthanc is down",
    )
    peer.start()
    try:
        rows = wait_for_deliveries(
            node, db, axial, lambda r: all(x["state"] == "done" for x in r), "delivery after Orthanc is back"
        )
        assert set(orthanc_results(peer)) == {r["sop_instance_uid"] for r in rows}
        assert peer.new_instance_events() == len(rows)
    finally:
        peer.stop(graceful=False)


def test_pacs_refusing_sr_gets_seg_and_overlay_and_sr_is_dead_lettered(
    tmp_path: Path, node_factory: Callable[..., Any]
) -> None:
    peer = Orthanc(tmp_path / "orthanc")
    peer.start()
    gateway = RefusingGateway(peer, mode="no-context")
    try:
        node = start_node(node_factory, dicom_destination(gateway.aet, gateway.port))
        db = Database(load_config(node.config_path).index_path)
        _folder, planes = push_phantom(node, tmp_path)
        [axial] = planes["axial"]
        rows = wait_for_deliveries(
            node,
            db,
            axial,
            lambda r: all(x["state"] in ("done", "dead") for x in r),
            "deliveries decided",
        )
        by_kind = defaultdict(set)
        for row in rows:
            by_kind[row["kind"]].add(row["state"])
        assert by_kind == {"seg": {"done"}, "overlay": {"done"}, "sr": {"dead"}}
        [sr_row] = [r for r in rows if r["kind"] == "sr"]
        assert "no presentation context for Comprehensive" in sr_row["last_error"]
        stored = orthanc_results(peer)
        assert {str(ds.SOPClassUID) for ds in stored.values()} & SR_CLASSES == set()
        assert set(stored) == {r["sop_instance_uid"] for r in rows if r["kind"] != "sr"}
    finally:
        gateway.stop()
        peer.stop(graceful=False)
