"""Lifecycle of the real node: crash safety, SIGTERM drain, idle connections, policy, config, HTTP."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    NodeProcess,
    c_echo,
    free_port,
    make_mr_dataset,
    node_command,
    wait_until,
    write_mr_series,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

pytestmark = pytest.mark.integration


#: these tests are about receiving: no series completes (and no analysis runs) while they do
INGEST_ONLY: dict[str, dict[str, object]] = {"series": {"quiet_seconds": 600.0}}


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """A running node whose series never complete during the test."""
    return node_factory(**INGEST_ONLY)


def associate(node: NodeProcess, calling_ae: str = "TESTSCU") -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def status_of(assoc: Association, ds: Dataset) -> int | None:
    try:
        rsp = assoc.send_c_store(ds)
    except (RuntimeError, OSError):
        return None
    return int(rsp.Status) if rsp is not None and "Status" in rsp else None


def index(node: NodeProcess) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(node.state_dir / "index.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances")}
    finally:
        conn.close()


def series(n: int, rows: int = 64) -> list[Dataset]:
    study, series_uid = generate_uid(), generate_uid()
    return [make_mr_dataset(study_uid=study, series_uid=series_uid, index=i, rows=rows, columns=rows) for i in range(n)]


def test_sigkill_while_storing_loses_nothing_acknowledged(node: NodeProcess) -> None:
    datasets = series(150)
    acknowledged: list[Dataset] = []
    done = threading.Event()

    def sender() -> None:
        assoc = associate(node)
        try:
            for ds in datasets:
                if status_of(assoc, ds) != 0:
                    break
                acknowledged.append(ds)
        finally:
            if assoc.is_established:
                assoc.abort()
            done.set()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    wait_until(lambda: len(acknowledged) >= 20 or done.is_set(), 60, "20 acknowledged instances")
    node.kill()  # SIGKILL mid-association: nothing drains
    assert done.wait(60)
    assert 20 <= len(acknowledged) < len(datasets), "the crash must happen mid-series"
    # a file the crash left without its index row (the kill may have made one too)
    planted = node.state_dir / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"DICM never acknowledged")
    node.restart()
    assert not planted.exists() and (node.state_dir / "orphans/1.2.3/1.2.3.4/1.2.3.4.5.dcm").is_file()
    set_aside = len(list((node.state_dir / "orphans").rglob("*.dcm")))
    assert f"lumbar_set_aside_files {set_aside:.1f}" in node.http_get("/metrics")[1].decode()
    assert "spool files" in node.log_text() and "without index rows" in node.log_text()
    rows = index(node)
    for ds in acknowledged:
        row = rows[str(ds.SOPInstanceUID)]
        stored = (node.state_dir / row["path"]).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == row["sha256"]
        assert dcmread(node.state_dir / row["path"]).PixelData == ds.PixelData
    # no temp files survive the restart, and the rest of the series can still be sent
    assert not list((node.state_dir / "spool").rglob("*.tmp"))
    indexed_paths = {row["path"] for row in rows.values()}
    assert {p.relative_to(node.state_dir).as_posix() for p in (node.state_dir / "spool").rglob("*.dcm")} == indexed_paths
    assoc = associate(node)
    statuses = [status_of(assoc, ds) for ds in datasets]
    assoc.release()
    assert set(statuses) == {0}
    assert len(index(node)) == len(datasets)


def test_sigterm_drains_open_association_and_exits_zero(node: NodeProcess) -> None:
    datasets = series(3)
    assoc = associate(node)
    assert status_of(assoc, datasets[0]) == 0
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    # the listener closes at once: new associations are refused...
    wait_until(lambda: c_echo(node.port, node.ae_title, timeout_s=1.0) is None, 15, "listener to close")
    # ...while the open association finishes its work
    assert status_of(assoc, datasets[1]) == 0
    assert status_of(assoc, datasets[2]) == 0
    assoc.release()
    assert node.proc.wait(30) == 0
    assert "drained" in node.log_text()
    assert {str(d.SOPInstanceUID) for d in datasets} <= set(index(node))


def test_second_signal_forces_shutdown(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(node={"drain_timeout_s": 60.0}, **INGEST_ONLY)
    assoc = associate(node)  # held open: a plain SIGTERM would wait up to 60 s
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in node.log_text(), 15, "the drain to start")
    started = time.monotonic()
    node.proc.send_signal(signal.SIGINT)
    code = node.proc.wait(30)
    assert code == 1 and time.monotonic() - started < 15
    assert "forcing shutdown" in node.log_text()
    if assoc.is_established:
        assoc.abort()


def test_idle_connections_do_not_block_and_time_out(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory(node={"acse_timeout_s": 3.0, "network_timeout_s": 5.0}, **INGEST_ONLY)
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=20) for _ in range(5)]
    try:
        files = write_mr_series(tmp_path / "s", 3)
        started = time.monotonic()
        result = node.storescu(files)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 10, "idle connections delayed a normal association"
        # the node closes connections that never send an association request
        for sock in idle:
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert len(index(node)) == 3


def test_caller_policy_on_the_real_listener(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory(**INGEST_ONLY, callers={"allow_any_loopback": False, "allowed": [{"ae_title": "GOODSCU", "address": "127.0.0.1"}]})
    files = write_mr_series(tmp_path / "s", 2)
    rejected = node.storescu(files, calling_ae="BADSCU")
    assert rejected.returncode != 0
    assert "Rejected" in rejected.stderr or "rejected" in rejected.stderr
    assert "association rejected: calling AE 'BADSCU'" in node.log_text()
    accepted = node.storescu(files, calling_ae="GOODSCU")
    assert accepted.returncode == 0, accepted.stderr
    assert len(index(node)) == 2


def test_invalid_configuration_refuses_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f"[node]\nport = 'eleven'\nstate_dir = '{tmp_path / 'state'}'\n")
    result = subprocess.run(
        [*node_command(), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "node.port" in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_healthz_and_metrics(node: NodeProcess, tmp_path: Path) -> None:
    files = write_mr_series(tmp_path / "s", 3)
    assert node.storescu(files).returncode == 0
    status, body = node.http_get("/healthz")
    health = json.loads(body)
    assert status == 200 and health["ok"] is True, health
    assert health["checks"]["listener"]["ports"] == [node.port]
    assert health["checks"]["disk"]["free_mb"] > 0
    assert "queue" in health["checks"]
    status, body = node.http_get("/metrics")
    text = body.decode()
    assert status == 200
    for name in (
        'lumbar_instances_received_total{outcome="stored"} 3.0',
        "lumbar_cstore_handler_seconds_count 3.0",
        "lumbar_received_bytes_total",
        "lumbar_series_completed_total",
        "lumbar_free_disk_megabytes",
        "lumbar_set_aside_files 0.0",
        'lumbar_associations_total{result="accepted"}',
    ):
        assert name in text, name
    uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert uid not in text and "Test^Lumbar" not in text
    assert node.http_get("/nope")[0] == 404


def test_a_second_node_on_the_same_state_directory_refuses_to_start(node: NodeProcess, tmp_path: Path) -> None:
    """Two nodes on one state directory would share spool, index and outbox; the second one
    stops at start-up with the first one's pid and leaves the first one's files alone."""
    in_flight = node.state_dir / "spool" / ".in-flight.dcm.tmp"  # what a store in progress looks like
    in_flight.write_bytes(b"half an instance")
    config = tmp_path / "second.toml"
    config.write_text(
        f"[node]\nhost = '127.0.0.1'\nport = {free_port()}\nstate_dir = '{node.state_dir}'\nfree_disk_floor_mb = 1\n"
        "[http]\nenabled = false\n"
    )
    result = subprocess.run(
        [*node_command(), "serve", "--config", str(config)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 3, result.stderr
    assert f"state directory {node.state_dir} is in use by another lumbar-node (pid {node.proc.pid})" in result.stderr
    assert in_flight.exists()  # the second node did not clean up the first one's temp files
    assert node.running and c_echo(node.port, node.ae_title) == 0


def test_retention_removes_a_finished_series_and_keeps_receiving(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """The node's own retention run: a finished (skipped) series older than keep_days leaves
    no file and no row behind, and the node still stores what arrives next."""
    node = node_factory(series={"quiet_seconds": 0.5}, retention={"keep_days": 2.0 / 86400, "check_every_minutes": 0.02})
    files = write_mr_series(tmp_path / "sag", 3, orientation=(0, 1, 0, 0, 0, -1))  # sagittal: skipped
    assert node.storescu(files).returncode == 0

    def gone() -> bool:
        conn = sqlite3.connect(node.state_dir / "index.sqlite")
        try:
            rows = sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("instances", "series", "jobs"))
        finally:
            conn.close()
        return rows == 0 and not any(p.is_file() for p in (node.state_dir / "spool").rglob("*"))

    wait_until(gone, 30.0, "the skipped series removed by retention")
    assert "retention: removed 1 finished series (3 instances" in node.log_text()
    more = write_mr_series(tmp_path / "ax", 3)
    assert node.storescu(more).returncode == 0
    assert len(index(node)) == 3


def test_an_index_written_by_a_newer_node_stops_start_up(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / "index.sqlite")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    config = tmp_path / "node.toml"
    config.write_text(f"[node]\nhost = '127.0.0.1'\nport = {free_port()}\nstate_dir = '{state}'\nfree_disk_floor_mb = 1\n[http]\nenabled = false\n")
    result = subprocess.run(
        [*node_command(), "serve", "--config", str(config)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 3, result.stderr
    assert "start-up failed: the index" in result.stderr and "newer lumbar-node (layout 999" in result.stderr


def test_port_in_use_fails_start_up_cleanly(node: NodeProcess, tmp_path: Path) -> None:
    config = tmp_path / "second.toml"
    config.write_text(
        f"[node]\nhost = '127.0.0.1'\nport = {node.port}\nstate_dir = '{tmp_path / 'state2'}'\nfree_disk_floor_mb = 1\n"
        "[http]\nenabled = false\n[series]\nquiet_seconds = 600.0\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [*node_command(), "serve", "--config", str(config)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 3, result.stderr
    assert "start-up failed" in result.stderr and "in use" in result.stderr
    assert time.monotonic() - started < 60  # the worker it had started did not keep it alive
    assert node.running and c_echo(node.port, node.ae_title) == 0
