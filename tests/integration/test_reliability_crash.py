"""SIGKILL the real node again and again while ten DCMTK ``storescu`` store 500 instances.

After every restart, every instance that any ``storescu`` saw answered *Success* must be on
disk under its indexed path, with the indexed sha256, and (at the end) carry the pixel data
that was sent. Lost instances are counted, not just asserted, so the figure can be
reported (docs/reliability.md). Then the series complete: each is analysed once (fast
fake stages in the real worker) and its results reach the PACS once. the ingest tests' ``test_sigkill_while_storing_loses_nothing_acknowledged``
covers one kill with one pynetdicom sender; this adds concurrency, DCMTK, and a loop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import pytest
from conftest import NodeProcess, wait_until, write_mr_series
from pydicom import dcmread
from reliability_helpers import (
    ScriptedPacs,
    analyses,
    derived_uid,
    fake_stage_node_command,
    indexed,
    intact,
    pythonpath_with_helpers,
    query,
    storescu_statuses,
)

pytestmark = pytest.mark.integration

SENDERS = 10
PER_SENDER = 50
#: kill/restart cycles (each: senders run, SIGKILL at a random point, restart, verify)
CYCLES = 6
#: the kill comes after this many more instances were indexed in the cycle (random in range),
#: so that it lands mid-transfer however loaded the machine is
KILL_AFTER_INSTANCES = (5, 60)
#: the longest a cycle waits for that progress before killing anyway (s)
CYCLE_DEADLINE_S = 30.0
KILL_POLL_S = 0.01
LOOP_QUIET_S = 600.0
FINAL_QUIET_S = 1.0
CHAIN_DEADLINE_S = 90.0
SEED = 20260601


def count(state_dir: Path) -> int:
    return int(query(state_dir, "SELECT COUNT(*) AS n FROM instances")[0]["n"]) if (state_dir / "index.sqlite").exists() else 0


def test_kill_loop_with_ten_storescu_loses_nothing(
    node_factory: Callable[..., NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the real node; its worker runs fast fake stages (reliability_helpers.FakeStages)
    monkeypatch.setattr(conftest, "node_command", fake_stage_node_command)
    monkeypatch.setenv("PYTHONPATH", pythonpath_with_helpers())
    pacs = ScriptedPacs()
    # no series completes during the kill loop (a series re-opened by late instances is
    # legitimately analysed again); they complete after the last restart
    node = node_factory(
        series={"quiet_seconds": LOOP_QUIET_S},
        destinations=[pacs.destination()],
        export={"retry_initial_s": 0.5, "retry_max_s": 1.0},
    )
    folders = [write_mr_series(tmp_path / f"sender{i}", PER_SENDER, seed=i) for i in range(SENDERS)]
    sop_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for files in folders for p in files}
    acknowledged: set[Path] = set()
    rng = random.Random(SEED)
    lost: set[str] = set()
    in_flight_kept = 0
    kill_stats: list[int] = []

    def send(files: list[Path]) -> dict[Path, str]:
        todo = [p for p in files if p not in acknowledged]
        if not todo:
            return {}
        statuses, _ = storescu_statuses(node.port, todo, calling_ae="CRASHSCU")
        return statuses

    def verify() -> None:
        rows = indexed(node.state_dir)
        for path in acknowledged:
            row = rows.get(sop_of[path])
            if row is None or not intact(node.state_dir, row):
                lost.add(sop_of[path])

    for _cycle in range(CYCLES):
        target = len(indexed(node.state_dir)) + rng.randint(*KILL_AFTER_INSTANCES)
        with ThreadPoolExecutor(SENDERS) as pool:
            futures = [pool.submit(send, files) for files in folders]
            deadline = time.monotonic() + CYCLE_DEADLINE_S
            while count(node.state_dir) < target and time.monotonic() < deadline:
                time.sleep(KILL_POLL_S)
            node.kill()
            before = len(acknowledged)
            for future in futures:
                acknowledged.update(p for p, status in future.result().items() if status == "Success")
        kill_stats.append(len(acknowledged) - before)
        stored_before_restart = set(indexed(node.state_dir))
        node.restart()
        verify()
        # instances whose response never arrived may or may not be stored: both are fine
        in_flight_kept += len({sop_of[p] for p in sop_of if p not in acknowledged} & stored_before_restart)

    # finish the transfer without faults: everything arrives exactly once
    with ThreadPoolExecutor(SENDERS) as pool:
        for statuses in pool.map(send, folders):
            acknowledged.update(p for p, status in statuses.items() if status == "Success")
    verify()
    assert len(acknowledged) == SENDERS * PER_SENDER
    rows = indexed(node.state_dir)
    assert len(rows) == SENDERS * PER_SENDER, "an instance is indexed twice or an extra one appeared"
    for path, sop in sop_of.items():
        assert dcmread(node.state_dir / rows[sop]["path"]).PixelData == dcmread(path).PixelData
    assert not list((node.state_dir / "spool").rglob("*.tmp")), "a temp file survived a restart"
    spool_files = {p.relative_to(node.state_dir).as_posix() for p in (node.state_dir / "spool").rglob("*.dcm")}
    assert spool_files == {r["path"] for r in rows.values()}, "a spool file without its index row"
    set_aside = [p.stem for p in (node.state_dir / "orphans").rglob("*.dcm")]
    assert set(set_aside) <= set(rows), "a file set aside that was never sent"
    per_series = query(node.state_dir, "SELECT series_instance_uid, COUNT(*) AS n FROM instances GROUP BY 1")
    assert sorted(r["n"] for r in per_series) == [PER_SENDER] * SENDERS
    try:
        # the series complete after one more restart: each analysed once, its results
        # delivered once
        node.stop()
        node.config_path.write_text(
            node.config_path.read_text().replace(f"quiet_seconds = {LOOP_QUIET_S!r}", f"quiet_seconds = {FINAL_QUIET_S!r}")
        )
        node.restart()
        series_uids = sorted({r["series_instance_uid"] for r in per_series})
        expected = sorted(derived_uid(uid, f"overlay-{n}") for uid in series_uids for n in range(2))

        def delivered() -> bool:
            rows = query(node.state_dir, "SELECT state FROM deliveries")
            return len(rows) == len(expected) and all(r["state"] == "done" for r in rows)

        wait_until(delivered, CHAIN_DEADLINE_S, "every series analysed and its results delivered")
        jobs = query(node.state_dir, "SELECT state FROM jobs")
        assert [j["state"] for j in jobs] == ["done"] * SENDERS
        assert sorted(analyses(node.state_dir)) == series_uids, "a series was analysed more or less than once"
        assert sorted(pacs.stored) == expected, "duplicate or missing results at the PACS"
    finally:
        pacs.stop()
    print(  # noqa: T201 - the figures for docs/reliability.md (pytest -s)
        f"kill loop: {CYCLES} SIGKILL/restart cycles, {SENDERS} storescu, {SENDERS * PER_SENDER} instances, "
        f"acknowledged per cycle {kill_stats}, unacknowledged but kept {in_flight_kept}, "
        f"set aside unacknowledged {len(set_aside)}, lost {len(lost)}"
    )
    assert not lost, f"{len(lost)} acknowledged instances lost or corrupt"
