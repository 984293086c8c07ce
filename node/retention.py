"""Retention: a finished series' files and index rows go ``[retention] keep_days`` after its last instance.

Why: the node keeps a copy of every image it receives, the results it computed and the
result instances it sent; without an end, a node that runs for months fills its disk and
then refuses images (the disk floor). The PACS holds the images and the delivered results,
so once a series is *finished* its copies here have done their job:

* the series is not receiving (state ``complete``, ``skipped`` or ``incoherent``) and its
  last instance arrived before the cut-off;
* every job of it is ``done``, ``skipped`` or ``superseded`` (a ``failed`` job waits for
  ``lumbar-node retry`` or a person);
* every delivery of its results is ``done`` or ``held`` (shadow destinations); pending,
  sending, failed and dead-lettered deliveries keep the series.

What goes, in this order: the received instances (index rows, then spool files), the jobs'
results folders and rows, the outbox files and delivery rows, the series row. A crash part
way leaves a series that is still finished and expired, so the next run finishes the work;
at worst the spool files of one series stay without their rows (a crash between the
transaction and the file removals), which the next start-up sets aside
(:mod:`node.orphans`) and a later run removes with the other set-aside files older than
the cut-off.

The series' instance rows are deleted in one transaction, and only if the series is still
finished then: a job queued for it meanwhile (``lumbar-node reanalyze``) keeps all of them,
so an analysis never sees a part of a series. The receiver may be storing an instance of the
same series at that moment (a late instance, or one sent again): each file is removed while
holding the receiver's lock for that SOP Instance UID (the lock a C-STORE of the UID holds
between "do I have it" and "it is indexed"), and not if the UID is indexed again by then
(the file is the new copy); a late instance is newer than the cut-off and stays, and the
series row is deleted only if the series is still finished and quiet since the cut-off, so
a series re-opened meanwhile keeps its row.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from node import jobs, metrics, outbox
from node.config import NodeConfig
from node.db import Database
from node.instances import instance_exists
from node.orphans import remove_old_orphans
from node.outbox import State
from node.series import COMPLETE, INCOHERENT, SKIPPED
from node.spool import Spool

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
#: series states in which no instance is expected any more
QUIET_SERIES_STATES = (COMPLETE, SKIPPED, INCOHERENT)
#: job states after which the series' data are no longer needed
FINISHED_JOB_STATES = (jobs.DONE, jobs.SKIPPED, jobs.SUPERSEDED)
#: delivery states after which the outbox file is no longer needed
FINISHED_DELIVERY_STATES = (State.DONE.value, State.HELD.value)
#: the first check runs this long after start-up (the node settles first), or one interval if shorter
FIRST_CHECK_DELAY_S = 60.0

#: ``instance_lock(sop_instance_uid)``: the receiver's lock for that UID
InstanceLock = Callable[[str], AbstractContextManager[object]]


@dataclass
class Removed:
    """What one retention run removed."""

    series: int = 0
    instances: int = 0
    bytes: int = 0
    results_folders: int = 0
    outbox_files: int = 0
    orphans: int = 0  #: set-aside spool files (:mod:`node.orphans`)

    def add(self, other: Removed) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


#: condition on ``s`` (a series row): quiet since ``:cutoff`` and nothing of it pending
FINISHED_SQL = (
    f"s.state IN ({_marks(QUIET_SERIES_STATES)}) AND s.last_received_at < :cutoff"
    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = s.series_instance_uid"
    f" AND j.state NOT IN ({_marks(FINISHED_JOB_STATES)}))"
    " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.series_uid = s.series_instance_uid"
    f" AND d.state NOT IN ({_marks(FINISHED_DELIVERY_STATES)}))"
)


def expired_series(db: Database, cutoff: float) -> list[str]:
    """Series UIDs that are finished and whose last instance arrived before ``cutoff``."""
    sql = f"SELECT s.series_instance_uid FROM series s WHERE {FINISHED_SQL}"
    return [str(r[0]) for r in db.execute(sql, {"cutoff": cutoff}).fetchall()]


def forget_series(
    db: Database, config: NodeConfig, spool: Spool, series_uid: str, cutoff: float, instance_lock: InstanceLock
) -> Removed:
    """Remove one expired series' instances, results, outbox files and rows (module docstring)."""
    removed = Removed()
    params = {"uid": series_uid, "cutoff": cutoff}
    with db.transaction() as conn:
        # one transaction, and only while the series is still finished: work queued for it
        # meanwhile (``reanalyze``) keeps every instance, never a part of them
        if conn.execute(f"SELECT 1 FROM series s WHERE s.series_instance_uid = :uid AND {FINISHED_SQL}",
                        params).fetchone() is None:
            return removed
        rows = conn.execute(
            "SELECT sop_instance_uid, path, size_bytes FROM instances"
            " WHERE series_instance_uid = :uid AND received_at < :cutoff",
            params,
        ).fetchall()
        conn.execute(
            "DELETE FROM instances WHERE series_instance_uid = :uid AND received_at < :cutoff", params
        )
    for sop_uid, path, size in rows:
        with instance_lock(sop_uid):
            if instance_exists(db, sop_uid):  # stored again since: the file is the new copy
                continue
            spool.remove(path)
        removed.instances += 1
        removed.bytes += int(size)
    with db.transaction() as conn:
        still = conn.execute(
            f"SELECT 1 FROM series s WHERE s.series_instance_uid = :uid AND {FINISHED_SQL}"
            " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.series_instance_uid = :uid)",
            {"uid": series_uid, "cutoff": cutoff},
        ).fetchone()
        if still is None:  # a late instance arrived, or work was queued again meanwhile
            return removed
        folders = [
            str(r[0])
            for r in conn.execute(
                "SELECT results_dir FROM jobs WHERE series_instance_uid = ? AND results_dir IS NOT NULL",
                (series_uid,),
            ).fetchall()
        ]
        conn.execute("DELETE FROM deliveries WHERE series_uid = ?", (series_uid,))
        conn.execute("DELETE FROM jobs WHERE series_instance_uid = ?", (series_uid,))
        conn.execute("DELETE FROM series WHERE series_instance_uid = ?", (series_uid,))
    removed.series = 1
    results_root = config.results_dir.resolve()
    for name in folders:
        folder = (results_root / name).resolve()
        if folder != results_root and folder.is_relative_to(results_root) and folder.is_dir():
            shutil.rmtree(folder)
            removed.results_folders += 1
    # every result file of the series, delivered or held, and those no destination wanted
    # (none configured, or not of its kinds), which have no delivery row
    results = outbox.series_folder(config, series_uid)
    if results.is_dir():
        for path in results.iterdir():
            if path.is_file():
                path.unlink()
                removed.outbox_files += 1
        _remove_empty_parent(results, config.outbox_dir)
    return removed


def _remove_empty_parent(folder: Path, root: Path) -> None:
    if folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (another result of the series) or already gone


def remove_expired(
    db: Database, config: NodeConfig, spool: Spool, instance_lock: InstanceLock, now: float | None = None
) -> Removed:
    """One retention run: every finished series older than ``[retention] keep_days``."""
    total = Removed()
    keep_days = config.retention.keep_days
    if keep_days <= 0:
        return total
    cutoff = (time.time() if now is None else now) - keep_days * SECONDS_PER_DAY
    for uid in expired_series(db, cutoff):
        total.add(forget_series(db, config, spool, uid, cutoff, instance_lock))
    orphans = remove_old_orphans(db, config.state_dir, cutoff)
    total.orphans, total.bytes = orphans.files, total.bytes + orphans.bytes
    if total.series or total.instances or total.orphans:
        logger.info(
            "retention: removed %d finished series (%d instances, %.1f MB, %d results folders, "
            "%d outbox files) and %d set-aside files older than %g days",
            total.series,
            total.instances,
            total.bytes / 1e6,
            total.results_folders,
            total.outbox_files,
            total.orphans,
            keep_days,
        )
    metrics.RETENTION_REMOVED.labels(what="series").inc(total.series)
    metrics.RETENTION_REMOVED.labels(what="instances").inc(total.instances)
    metrics.RETENTION_REMOVED.labels(what="set_aside_files").inc(total.orphans)
    return total


class Retention:
    """Runs :func:`remove_expired` every ``[retention] check_every_minutes`` in the node."""

    def __init__(self, db: Database, config: NodeConfig, spool: Spool, instance_lock: InstanceLock) -> None:
        self.db, self.config, self.spool, self.instance_lock = db, config, spool, instance_lock
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        if self.config.retention.keep_days <= 0:
            logger.info("retention: off ([retention] keep_days = 0): nothing is ever removed")
            return
        interval_s = self.config.retention.check_every_minutes * 60.0
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(
            self.run_once,
            IntervalTrigger(seconds=interval_s),
            next_run_time=datetime.now(UTC) + timedelta(seconds=min(FIRST_CHECK_DELAY_S, interval_s)),
            id="retention",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()
        logger.info(
            "retention: finished series are removed %g days after their last instance (checked every %g min)",
            self.config.retention.keep_days,
            self.config.retention.check_every_minutes,
        )

    def run_once(self) -> Removed:
        """One run (the schedule never overlaps two); errors are logged, never raised."""
        try:
            return remove_expired(self.db, self.config, self.spool, self.instance_lock)
        except Exception:  # noqa: BLE001 - the next run tries again; the node keeps receiving
            logger.exception("retention run failed")
            return Removed()

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
