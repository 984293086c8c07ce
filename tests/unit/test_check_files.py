"""``lumbar-node check --files``: every stored instance against what was acknowledged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from series_samples import STUDY, record

from node.commands import check
from node.config import NodeConfig, load_config
from node.db import Database
from node.instances import ensure_schema, insert_instance
from node.spool import Spool

SERIES = "1.2.826.0.1.3680043.10.1.78"


def stored_instances(tmp_path: Path, count: int) -> tuple[NodeConfig, Database, Spool, list[str]]:
    config = load_config(None, overrides={"node.state_dir": str(tmp_path / "state")})
    spool = Spool(config.state_dir)
    spool.ensure()
    db = Database(config.index_path)
    ensure_schema(db)
    paths = []
    for i in range(count):
        sop = f"{SERIES}.{i}"
        stored = spool.write(STUDY, SERIES, sop, f"DICM {i}".encode() * 50)
        insert_instance(db, replace(record(sop, series=SERIES), path=stored.relative_path,
                                    sha256=stored.sha256, size_bytes=stored.size_bytes))
        paths.append(stored.relative_path)
    return config, db, spool, paths


def test_intact_files_pass_in_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "FILES_PAGE", 2)
    config, _, _, _ = stored_instances(tmp_path, 5)
    finding = check.check_files(config)
    assert finding.level == check.OK and finding.detail.startswith("5 instance file(s)"), finding


def test_a_changed_and_a_missing_file_fail_with_their_names(tmp_path: Path) -> None:
    config, _, spool, paths = stored_instances(tmp_path, 4)
    damaged = bytearray(spool.absolute(paths[1]).read_bytes())
    damaged[3] ^= 0x01
    spool.absolute(paths[1]).write_bytes(bytes(damaged))
    spool.absolute(paths[2]).unlink()
    finding = check.check_files(config)
    assert finding.level == check.FAIL and finding.detail.startswith("2 of 4 instance file(s)"), finding
    assert paths[1] in finding.detail and paths[2] in finding.detail and SERIES in finding.detail
    assert paths[0] not in finding.detail


def test_a_file_retention_removes_during_the_scan_is_not_a_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, db, spool, paths = stored_instances(tmp_path, 3)
    read_checked = Spool.read_checked

    def retention_meanwhile(self: Spool, path: str, digest: str, size: int) -> tuple[bytes | None, str | None]:
        if path == paths[1]:  # the running node's retention: rows first, then the file
            db.execute("DELETE FROM instances WHERE path = ?", (path,))
            spool.absolute(path).unlink()
        return read_checked(self, path, digest, size)

    monkeypatch.setattr(Spool, "read_checked", retention_meanwhile)
    finding = check.check_files(config)
    assert finding.level == check.OK, finding
