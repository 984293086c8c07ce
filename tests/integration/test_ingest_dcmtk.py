"""Ingest through the real node process driven by DCMTK and the node's own CLI."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ECHOSCU, NodeProcess, dcmtk_env, node_command, write_mr_series
from pydicom import dcmread

pytestmark = pytest.mark.integration


#: these tests are about receiving: no series completes (and no analysis runs) while they do
INGEST_ONLY: dict[str, dict[str, object]] = {"series": {"quiet_seconds": 600.0}}


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """A running node whose series never complete during the test."""
    return node_factory(**INGEST_ONLY)



def index_rows(node: NodeProcess) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(node.state_dir / "index.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances")}
    finally:
        conn.close()


def assert_stored_intact(node: NodeProcess, sources: list[Path]) -> None:
    """Every source file is indexed once and its stored file has the indexed sha256 and UID."""
    rows = index_rows(node)
    for source in sources:
        sop = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        row = rows[sop]
        stored = (node.state_dir / row["path"]).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == row["sha256"]
        assert dcmread(source).PixelData == dcmread(node.state_dir / row["path"]).PixelData


def test_echoscu_and_lumbar_node_echo(node: NodeProcess) -> None:
    result = subprocess.run(
        [ECHOSCU, "-aet", "ECHOSCU", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    cli = subprocess.run(
        [*node_command(), "echo", f"{node.ae_title}@127.0.0.1:{node.port}"], capture_output=True, text=True, timeout=60, check=False,
    )
    assert cli.returncode == 0 and "success" in cli.stdout, cli.stderr
    closed = subprocess.run(
        [*node_command(), "echo", "NOBODY@127.0.0.1:1"], capture_output=True, text=True, timeout=60, check=False,
    )
    assert closed.returncode == 1


def test_concurrent_associations_and_duplicates(node: NodeProcess, tmp_path: Path) -> None:
    folders = [tmp_path / f"series{i}" for i in range(4)]
    files = [write_mr_series(folder, 8) for folder in folders]
    # four different series at once, plus the first series twice more at the same time
    jobs = [*folders, folders[0], folders[0]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda f: node.storescu([f]), jobs))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Status" not in result.stderr or "Success" in result.stderr
    rows = index_rows(node)
    assert len(rows) == 32
    assert_stored_intact(node, [p for group in files for p in group])
    assert node.running
    # the duplicates were answered with success and counted as such
    status, body = node.http_get("/metrics")
    assert status == 200
    text = body.decode()
    assert re.search(r'lumbar_instances_received_total\{outcome="stored"\} 32\.0', text), text
    assert re.search(r'lumbar_instances_received_total\{outcome="duplicate"\} 16\.0', text), text


def test_one_series_over_two_associations(node: NodeProcess, tmp_path: Path) -> None:
    files = write_mr_series(tmp_path / "s", 6)
    assert node.storescu(files[:3]).returncode == 0
    assert node.storescu(files[3:]).returncode == 0
    rows = index_rows(node)
    assert len({r["series_instance_uid"] for r in rows.values()}) == 1 and len(rows) == 6


def test_siemens_dual_echo_pushed_with_lumbar_node_push(node: NodeProcess, siemens_dual_echo: Path) -> None:
    sources = sorted(p for p in siemens_dual_echo.iterdir() if p.suffix == ".dcm")
    assert len(sources) >= 10
    started = time.monotonic()
    push = subprocess.run(
        [*node_command(), "push", str(siemens_dual_echo), "--to", f"{node.ae_title}@127.0.0.1:{node.port}", "--quiet"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    elapsed = time.monotonic() - started
    assert push.returncode == 0, push.stdout + push.stderr
    assert f"pushed {len(sources)} file(s)" in push.stdout
    rows = index_rows(node)
    assert len(rows) == len(sources)
    echoes = {(r["series_instance_uid"], dcm_echo(r)) for r in rows.values()}
    assert {e for _, e in echoes} == {1, 2}
    assert_stored_intact(node, sources[:5])
    # sent byte for byte: the stored data set equals the source file after its file meta
    row = next(iter(rows.values()))
    stored = (node.state_dir / row["path"]).read_bytes()
    assert len(stored) > 0
    print(f"pushed {len(sources)} instances in {elapsed:.1f} s")  # noqa: T201 - measurement in -s output


def dcm_echo(row: sqlite3.Row) -> int:
    import json

    return int(json.loads(row["meta"])["EchoNumbers"])


def test_push_reports_failures_and_skips(node: NodeProcess, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_mr_series(folder, 2)
    (folder / "README.txt").write_text("not DICOM")
    notdicom = tmp_path / "explicit.txt"
    notdicom.write_text("nope")
    missing = tmp_path / "missing.dcm"
    push = subprocess.run(
        [*node_command(), "push", str(folder), str(notdicom), str(missing),
         "--to", f"{node.ae_title}@127.0.0.1:{node.port}"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert push.returncode == 1
    assert "pushed 2 file(s)" in push.stdout and "2 failed, 1 skipped" in push.stdout
    assert "SKIPPED" in push.stderr and "README.txt" in push.stderr
    assert f"{notdicom}: not a DICOM file" in push.stderr
    assert f"{missing}: cannot read: No such file or directory" in push.stderr


def test_compressed_transfer_syntaxes_are_stored_as_sent_and_decodable(node: NodeProcess, tmp_path: Path) -> None:
    from conftest import make_mr_dataset, write_dataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
        generate_uid,
    )

    study, series = generate_uid(), generate_uid()
    originals = {}
    # storescu proposes the compressed syntax named by its option (and converts otherwise)
    options = {RLELossless: "-xr", JPEG2000Lossless: "-xv", JPEGLSLossless: "-xt", DeflatedExplicitVRLittleEndian: "-xd"}
    for index, (syntax, option) in enumerate(options.items()):
        ds = make_mr_dataset(study_uid=study, series_uid=series, index=index)
        pixels = ds.pixel_array.copy()
        if syntax != DeflatedExplicitVRLittleEndian:
            ds.compress(syntax, generate_instance_uid=False)
        originals[str(ds.SOPInstanceUID)] = (syntax, pixels)
        path = write_dataset(ds, tmp_path / f"{index}.dcm", transfer_syntax=syntax)
        result = node.storescu([path], option)
        assert result.returncode == 0, result.stderr
    rows = index_rows(node)
    for sop, (syntax, pixels) in originals.items():
        row = rows[sop]
        assert row["transfer_syntax_uid"] == syntax
        stored = dcmread(node.state_dir / row["path"])
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert (stored.pixel_array == pixels).all()
