"""A full disk: the node answers 0xA700 (out of resources), corrupts nothing, and accepts
again once space returns, without a restart.

The state directory is a small tmpfs mounted by the test (the project's test machines run
as root), filled with a ballast file: first down to the configured free-space floor
(``node.free_disk_floor_mb``), then to the last byte with the floor set to 0, where the
spool write or the index commit itself hits ENOSPC.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, c_echo, make_mr_dataset
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from reliability_helpers import indexed, intact, query

pytestmark = pytest.mark.integration

TMPFS_MB = 24
FLOOR_MB = 6
OUT_OF_RESOURCES = 0xA700
MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A ``TMPFS_MB`` tmpfs (needs root, as the test machines run)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / MB


def fill(path: Path, leave_mb: float) -> Path:
    """Write a ballast file so that about ``leave_mb`` stays free (0: as full as it gets)."""
    ballast = path / "ballast"
    with ballast.open("ab", buffering=0) as fh:
        chunk = bytes(MB // 4)
        try:
            while free_mb(path) - len(chunk) / MB > leave_mb:
                fh.write(chunk)
            if leave_mb == 0:
                while True:
                    fh.write(b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: full
    return ballast


def store_all(port: int, datasets: list[Dataset]) -> list[int | None]:
    ae = AE(ae_title="DISKSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="LUMBARNODE")
    assert assoc.is_established
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
    finally:
        assoc.release()
    return statuses


def series(n: int) -> list[Dataset]:
    study, uid = generate_uid(), generate_uid()
    return [make_mr_dataset(study_uid=study, series_uid=uid, index=i, rows=128, columns=128) for i in range(n)]


def test_full_disk_answers_out_of_resources_and_recovers(
    node_factory: Callable[..., NodeProcess], small_disk: Path
) -> None:
    state = small_disk / "state"
    node = node_factory(node={"state_dir": str(state), "free_disk_floor_mb": FLOOR_MB}, series={"quiet_seconds": 600.0})
    first = series(5)
    assert store_all(node.port, first) == [0] * 5

    # below the floor: refused with 0xA700, nothing half-written
    ballast = fill(small_disk, leave_mb=FLOOR_MB - 2)
    refused = series(3)
    assert store_all(node.port, refused) == [OUT_OF_RESOURCES] * 3
    assert "free disk below node.free_disk_floor_mb" in node.log_text()
    status, _ = node.http_get("/healthz")
    assert status != 200, "/healthz must report the disk check failing"

    # space returns: accepted again, no restart
    ballast.unlink()
    assert store_all(node.port, refused) == [0] * 3

    # the disk really full (floor 0): the write itself fails with ENOSPC -> still 0xA700
    node.stop()
    node.config_path.write_text(node.config_path.read_text().replace(f"free_disk_floor_mb = {FLOOR_MB}", "free_disk_floor_mb = 0"))
    node.restart()
    ballast = fill(small_disk, leave_mb=0)
    full = series(3)
    statuses = store_all(node.port, full)
    assert statuses == [OUT_OF_RESOURCES] * 3, [hex(s or 0) for s in statuses]
    assert node.running and c_echo(node.port) == 0
    ballast.unlink()
    assert store_all(node.port, full) == [0] * 3

    # nothing acknowledged was lost or corrupted, the index is sound, no debris
    rows = indexed(state)
    for ds in first + refused + full:
        row = rows[str(ds.SOPInstanceUID)]
        assert intact(state, row)
    assert len(rows) == len(first + refused + full)
    assert query(state, "PRAGMA integrity_check")[0][0] == "ok"
    assert not list((state / "spool").rglob("*.tmp"))
