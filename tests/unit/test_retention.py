"""Retention removes finished series after keep_days, and nothing that is still needed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from series_samples import STUDY, complete_series, record, stack

from node import jobs, outbox, series
from node.config import NodeConfig, load_config
from node.db import Database
from node.instances import ensure_schema as ensure_instances
from node.instances import insert_instance, instance_exists
from node.retention import Retention, expired_series, forget_series, remove_expired
from node.spool import Spool

DAY = 86400.0


class World:
    """An index with spool files, results folders and outbox files, as a node leaves them."""

    def __init__(self, tmp_path: Path, keep_days: float = 30.0) -> None:
        self.config: NodeConfig = load_config(
            None, overrides={"node.state_dir": str(tmp_path / "state"), "retention.keep_days": keep_days}
        )
        self.db = Database(self.config.index_path)
        ensure_instances(self.db)
        series.ensure_schema(self.db)
        jobs.ensure_schema(self.db)
        outbox.ensure_schema(self.db)
        self.spool = Spool(self.config.state_dir)
        self.spool.ensure()
        self.locked: list[str] = []
        self.results: dict[str, Path] = {}

    def add_series(self, uid: str, age_days: float, job_state: str = jobs.DONE, delivery: str | None = "done") -> None:
        at = time.time() - age_days * DAY
        (job,) = complete_series(self.db, uid, stack(3), at=at)
        self.db.execute("UPDATE jobs SET state = ? WHERE id = ?", (job_state, job))
        for i in range(3):
            self.spool.write(STUDY, uid, f"{uid}.{i}", b"DICM" * 100)
        (folder,) = self.db.execute("SELECT results_dir FROM jobs WHERE id = ?", (job,)).fetchone()
        self.results[uid] = self.config.results_dir / folder
        results = self.results[uid]
        results.mkdir(parents=True)
        (results / "results.json").write_text("{}")
        if delivery is not None:
            rel = f"outbox/{uid}/{uid}.9.dcm"
            (self.config.state_dir / rel).parent.mkdir(parents=True)
            (self.config.state_dir / rel).write_bytes(b"SEG")
            self.db.execute(
                "INSERT INTO deliveries (sop_instance_uid, sop_class_uid, series_uid, kind, destination, path,"
                " state, queued_at, next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, 'seg', 'pacs', ?, ?,"
                " ?, ?, ?, ?)",
                (f"{uid}.9", "1.2.840.10008.5.1.4.1.1.66.4", uid, rel, delivery, at, at, at, at),
            )

    @contextmanager
    def lock(self, sop_uid: str) -> Iterator[None]:
        self.locked.append(sop_uid)
        yield

    def kept(self, uid: str) -> dict[str, int]:
        count = lambda sql: int(self.db.execute(sql, (uid,)).fetchone()[0])  # noqa: E731
        return {
            "instances": count("SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?"),
            "files": len(list((self.config.spool_dir / STUDY / uid).glob("*.dcm")))
            if (self.config.spool_dir / STUDY / uid).is_dir() else 0,
            "series": count("SELECT COUNT(*) FROM series WHERE series_instance_uid = ?"),
            "jobs": count("SELECT COUNT(*) FROM jobs WHERE series_instance_uid = ?"),
            "deliveries": count("SELECT COUNT(*) FROM deliveries WHERE series_uid = ?"),
            "results": int(self.results[uid].is_dir()),
            "outbox": int((self.config.outbox_dir / uid).is_dir()),
        }


ALL_GONE = {"instances": 0, "files": 0, "series": 0, "jobs": 0, "deliveries": 0, "results": 0, "outbox": 0}


def test_only_finished_series_older_than_keep_days_go(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.add_series("1.2.20", age_days=31)  # finished, expired
    world.add_series("1.2.21", age_days=31, job_state=jobs.FAILED)  # waits for retry or a person
    world.add_series("1.2.22", age_days=31, delivery="pending")  # not delivered yet
    world.add_series("1.2.23", age_days=31, delivery="dead")  # dead letter: a person decides
    world.add_series("1.2.24", age_days=29)  # finished, not expired
    world.add_series("1.2.25", age_days=31, job_state=jobs.SKIPPED, delivery=None)  # skipped: nothing sent
    world.add_series("1.2.26", age_days=31, delivery="held")  # shadow destination: never sent by design
    removed = remove_expired(world.db, world.config, world.spool, world.lock)
    assert (removed.series, removed.instances, removed.bytes) == (3, 9, 9 * 1000)  # indexed sizes
    assert (removed.results_folders, removed.outbox_files) == (3, 2)
    for gone in ("1.2.20", "1.2.25", "1.2.26"):
        assert world.kept(gone) == ALL_GONE, gone
    for kept in ("1.2.21", "1.2.22", "1.2.23", "1.2.24"):
        assert world.kept(kept) == {**ALL_GONE, "instances": 3, "files": 3, "series": 1, "jobs": 1,
                                    "deliveries": 1, "results": 1, "outbox": 1}, kept
    # every removed row went under the receiver's lock for its UID
    assert sorted(world.locked) == sorted(f"{uid}.{i}" for uid in ("1.2.20", "1.2.25", "1.2.26") for i in range(3))
    assert remove_expired(world.db, world.config, world.spool, world.lock).series == 0  # idempotent


def test_results_no_destination_wanted_go_with_their_series(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.add_series("1.2.30", age_days=31, delivery=None)  # no destinations: files, no rows
    world.add_series("1.2.31", age_days=29, delivery=None)
    for uid in ("1.2.30", "1.2.31"):
        undelivered = world.config.outbox_dir / uid / f"{uid}.8.dcm"
        undelivered.parent.mkdir(parents=True)
        undelivered.write_bytes(b"SR")
    removed = remove_expired(world.db, world.config, world.spool, world.lock)
    assert (removed.series, removed.outbox_files) == (1, 1)
    assert world.kept("1.2.30") == ALL_GONE
    assert (world.config.outbox_dir / "1.2.31" / "1.2.31.8.dcm").is_file()


def test_a_late_instance_keeps_itself_and_its_series(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.add_series("1.2.30", age_days=40)
    late = record("1.2.30.late", series="1.2.30")
    stored = world.spool.write(STUDY, "1.2.30", "1.2.30.late", b"late")
    insert_instance(world.db, late.__class__(**{**late.__dict__, "path": stored.relative_path}))
    removed = remove_expired(world.db, world.config, world.spool, world.lock)
    assert (removed.series, removed.instances) == (0, 3)  # the three old instances only
    assert world.kept("1.2.30") == {**ALL_GONE, "instances": 1, "files": 1, "series": 1, "jobs": 1,
                                     "deliveries": 1, "results": 1, "outbox": 1}


def test_keep_days_zero_keeps_everything(tmp_path: Path) -> None:
    world = World(tmp_path, keep_days=0)
    world.add_series("1.2.40", age_days=4000)
    assert remove_expired(world.db, world.config, world.spool, world.lock).series == 0
    Retention(world.db, world.config, world.spool, world.lock).start()  # off: schedules nothing
    assert world.kept("1.2.40")["files"] == 3


def test_the_receivers_lock_orders_a_store_and_a_removal(tmp_path: Path) -> None:
    """While a C-STORE of a UID holds the receiver's lock, retention waits to remove that UID."""
    world = World(tmp_path)
    world.add_series("1.2.50", age_days=31)
    held = threading.Lock()
    held.acquire()
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(remove_expired(world.db, world.config, world.spool, lambda uid: held).instances),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=0.5)
    try:
        # the rows went in one transaction; the files wait for the store to finish
        assert worker.is_alive() and world.kept("1.2.50")["files"] == 3
        assert world.kept("1.2.50")["instances"] == 0
    finally:
        held.release()
    worker.join(timeout=10)
    assert result == [3] and world.kept("1.2.50") == ALL_GONE


def test_a_uid_stored_again_keeps_its_new_file(tmp_path: Path) -> None:
    """A C-STORE of a UID between the rows' removal and its file's keeps the new copy."""
    world = World(tmp_path)
    world.add_series("1.2.55", age_days=31)
    again = record("1.2.55.0", series="1.2.55")

    def store_again_then_lock(uid: str) -> Any:
        if uid == "1.2.55.0" and not instance_exists(world.db, uid):
            stored = world.spool.write(STUDY, "1.2.55", uid, b"sent again")
            insert_instance(world.db, again.__class__(**{**again.__dict__, "path": stored.relative_path}))
        return world.lock(uid)

    removed = remove_expired(world.db, world.config, world.spool, store_again_then_lock)
    assert (removed.series, removed.instances) == (0, 2)  # the new copy and its series stay
    assert world.kept("1.2.55")["instances"] == 1 and world.kept("1.2.55")["files"] == 1
    [path] = (world.config.spool_dir / STUDY / "1.2.55").glob("*.dcm")
    assert path.read_bytes() == b"sent again"


def test_work_queued_meanwhile_keeps_the_whole_series(tmp_path: Path) -> None:
    """reanalyze between the expiry query and the removal: nothing of the series goes."""
    world = World(tmp_path)
    world.add_series("1.2.56", age_days=31)
    [uid] = expired_series(world.db, time.time() - 30 * DAY)
    assert jobs.reanalyse_jobs(world.db, series_uids=[uid]) != []
    removed = forget_series(world.db, world.config, world.spool, uid, time.time() - 30 * DAY, world.lock)
    assert removed.instances == 0 and world.kept(uid)["files"] == 3 and world.kept(uid)["instances"] == 3
    # and once retention has removed a series, there is nothing left to re-queue
    world.add_series("1.2.57", age_days=31)
    remove_expired(world.db, world.config, world.spool, world.lock)
    assert jobs.reanalyse_jobs(world.db, series_uids=["1.2.57"]) == []


def test_invalid_retention_settings_are_refused(tmp_path: Path) -> None:
    from node.errors import ConfigError

    with pytest.raises(ConfigError, match="retention.keep_days"):
        load_config(None, overrides={"node.state_dir": str(tmp_path), "retention.keep_days": -1})
    with pytest.raises(ConfigError, match="retention.check_every_minutes"):
        load_config(None, overrides={"node.state_dir": str(tmp_path), "retention.check_every_minutes": 0})
