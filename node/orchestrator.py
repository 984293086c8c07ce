"""Series timers, completion, routing and the analysis worker, wired together.

The receiver calls :meth:`Orchestrator.instance_stored` on its association thread after
an instance is durable. That call must be fast: it only updates an in-memory record of
the open series (and writes the series row when a series opens or re-opens) and makes
sure a quiet-period timer exists. Timers are apscheduler ``date`` jobs keyed by series
UID; when one fires before the series has been quiet long enough (a later instance
arrived), it re-arms itself for the remaining time, which is the same as re-arming on
every instance but costs nothing per instance.

On completion (a scheduler thread) the series is assembled from the index
(``node/series.py``), routed (``node/routing.py``) and its echo groups become jobs
(``node/jobs.py``) in the same transaction. A worker *process* runs the jobs
(``node/worker.py``).

Restart safety: at :meth:`start` the orchestrator (1) re-queues jobs interrupted by a
crash, (2) reconciles the ``series`` table with the ``instances`` table (an instance
stored just before a crash, whose series row was never written or re-opened, opens it
now), and (3) re-arms a timer for every open series, firing at once when its quiet
period already elapsed.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from node import jobs, metrics, series
from node.config import NodeConfig
from node.db import Database
from node.instances import InstanceRecord, instances_of_series, series_activity
from node.worker import DEFAULT_STAGES, WAKE_MODULUS, WORKER_READY, worker_main

logger = logging.getLogger(__name__)

#: how often the watchdog checks the worker process and collects finished jobs (s)
WATCHDOG_S = 2.0
#: sent to the results relay by the node itself to end it
_RELAY_STOP = b"stop"
#: queued work with no job progress for this long makes ``/healthz`` report a stuck queue (s)
QUEUE_STALL_S = 1800.0
#: a completion that raised (index busy, unexpected data) is tried again after this (s)
COMPLETION_RETRY_S = 30.0
#: a completion that found the series still receiving re-arms with at least this delay (s)
MIN_REARM_S = 0.05
#: routing reasons are reduced to these metric labels (no UIDs, a fixed small set)
SKIP_REASON_LABELS: tuple[tuple[str, str], ...] = (
    ("incoherent", "incoherent_geometry"),
    ("modality", "modality"),
    ("not axial", "not_axial"),
    ("not lumbar", "not_lumbar"),
    ("too few slices", "too_few_slices"),
)


@dataclass
class _OpenSeries:
    """What the orchestrator remembers about a series while it receives."""

    study_uid: str
    opened_seq: int
    last_received_at: float
    quiet_seconds: float
    count: int


def skip_label(reason: str | None) -> str:
    """The metric label of a skip reason (the first rule that failed)."""
    text = (reason or "").lower()
    hits = [(text.find(key), label) for key, label in SKIP_REASON_LABELS if key in text]
    return min(hits)[1] if hits else "other"


class Orchestrator:
    """Quiet-period timers, completion, routing, jobs and the worker process.

    Parameters
    ----------
    db
        The node's index (shared with the receiver).
    config
        The node configuration.
    stages
        ``"module:callable"`` building the job stages in the worker
        (default :data:`node.worker.DEFAULT_STAGES`); tests pass fakes.
    run_worker
        False: no worker process (tests that drive :func:`node.worker.process_one` directly).
    clock
        Unix time source.
    """

    def __init__(
        self,
        db: Database,
        config: NodeConfig,
        *,
        stages: str = DEFAULT_STAGES,
        run_worker: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config
        self.stages = stages
        self.run_worker = run_worker
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, _OpenSeries] = {}
        self._armed: set[str] = set()
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        )
        self._ctx = multiprocessing.get_context("spawn")
        # lock-free shared flags: a worker killed mid-wait cannot leave them locked
        # (a multiprocessing Event/Condition can deadlock its next set() in that case)
        self._stop = self._ctx.RawValue("b", 0)
        self._wake = self._ctx.RawValue("L", 0)
        # worker -> node: "results are in the outbox" (a pipe: no lock, kernel-buffered)
        self._results_reader, self._results_writer = self._ctx.Pipe(duplex=False)
        self._results_listener: threading.Thread | None = None
        self._worker_ready = False
        #: called (on the listener thread) when the worker has put results in the outbox;
        #: the server sets it to the exporter's ``wake``
        self.on_results: Callable[[], None] | None = None
        self._worker: SpawnProcess | None = None
        self._stopping = False
        self._finished_watermark = 0.0
        self._last_progress = time.monotonic()
        self._last_counts: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Create tables, recover jobs, re-arm timers, start the scheduler and the worker."""
        series.ensure_schema(self.db)
        jobs.ensure_schema(self.db)
        jobs.recover_interrupted(self.db)
        self._finished_watermark = self.clock()
        self._install_metrics()
        self._scheduler.start()
        self._reconcile_and_rearm()
        if self.run_worker:
            self._results_listener = threading.Thread(
                target=self._relay_results, name="lumbar-node-results", daemon=True
            )
            self._results_listener.start()
            self._start_worker()
        self._scheduler.add_job(self._watchdog, "interval", seconds=WATCHDOG_S, id="__watchdog__")
        logger.info("orchestrator started: %d open series re-armed", len(self._armed))

    def shutdown(self, timeout_s: float) -> None:
        """Stop timers and let the worker finish its job within ``timeout_s`` (then kill it).

        A killed job is resumed at the next start (its state is in the index).
        """
        self._stopping = True
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        worker = self._worker
        if worker is not None:
            self._stop.value = 1
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                logger.warning(
                    "worker %s still busy at shutdown: killed (its job resumes at start)",
                    worker.pid,
                )
                worker.kill()
                worker.join(5.0)
            self._worker = None
        listener = self._results_listener
        if listener is not None:
            self._results_writer.send_bytes(_RELAY_STOP)
            listener.join(5.0)
            self._results_listener = None
        logger.info("orchestrator stopped")

    def _relay_results(self) -> None:
        """Pass the worker's "results ready" messages to :attr:`on_results` until stopped."""
        while True:
            try:
                message = self._results_reader.recv_bytes()
            except (EOFError, OSError) as exc:
                logger.warning("results pipe closed (%s): export relies on its poll", exc)
                return
            if message == _RELAY_STOP:
                return
            if message == WORKER_READY:
                self._worker_ready = True
                continue
            callback = self.on_results
            if callback is None:
                continue
            try:
                callback()
            except Exception:  # noqa: BLE001 - the relay must outlive a failing callback
                logger.exception("results-ready callback failed; export relies on its poll")

    def wake_worker(self) -> None:
        """Tell the worker there is queued work (it also polls)."""
        self._wake.value = (self._wake.value + 1) % WAKE_MODULUS

    # -- receiving -----------------------------------------------------------------------
    def instance_stored(self, record: InstanceRecord) -> None:
        """One instance is durable and indexed: keep its series open and its timer armed."""
        uid = record.series_instance_uid
        received = float(record.received_at or self.clock())
        quiet = self.config.quiet_seconds_for(record.calling_ae)
        with self._lock:
            state = self._open.get(uid)
            if state is not None:
                state.last_received_at = max(state.last_received_at, received)
                state.quiet_seconds = quiet
                state.count += 1
                if uid in self._armed:
                    return
        if state is None:
            seq, reopened = self._open_in_index(record, quiet, received)
            with self._lock:
                state = self._open.get(uid)
                if state is None or state.opened_seq < seq:
                    state = _OpenSeries(record.study_instance_uid, seq, received, quiet, 1)
                    self._open[uid] = state
                else:
                    state.last_received_at = max(state.last_received_at, received)
                    state.count += 1
            if reopened:
                logger.info("series %s re-opened by a late instance", uid)
        self._arm(uid, received + quiet)

    def _open_in_index(
        self, record: InstanceRecord, quiet: float, received: float
    ) -> tuple[int, bool]:
        seq, reopened = series.open_series(
            self.db,
            series_uid=record.series_instance_uid,
            study_uid=record.study_instance_uid,
            calling_ae=record.calling_ae,
            quiet_seconds=quiet,
            received_at=received,
        )
        if reopened:
            with self.db.transaction() as conn:
                jobs.hold_for_reopen(conn, record.series_instance_uid, self.clock())
        return seq, reopened

    def _arm(self, uid: str, run_at: float) -> None:
        if self._stopping:
            return
        delay = max(0.0, run_at - self.clock())
        with self._lock:
            self._armed.add(uid)
        self._scheduler.add_job(
            self._on_quiet,
            "date",
            run_date=_datetime_in(delay),
            args=(uid,),
            id=uid,
            replace_existing=True,
        )

    # -- completion ----------------------------------------------------------------------
    def _on_quiet(self, uid: str) -> None:
        """Timer fired: complete the series if it has been quiet long enough, else re-arm."""
        now = self.clock()
        with self._lock:
            state = self._open.get(uid)
            if state is None:
                self._armed.discard(uid)
                return
            due = state.last_received_at + state.quiet_seconds
            if due > now:
                rearm_at: float | None = max(due, now + MIN_REARM_S)
            else:
                rearm_at = None
                del self._open[uid]
                self._armed.discard(uid)
        if rearm_at is not None:
            self._arm(uid, rearm_at)
            return
        try:
            self.complete_series(uid, state)
        except Exception:  # noqa: BLE001 - a bad series must not kill the scheduler thread
            logger.exception(
                "completing series %s failed; trying again in %.0f s", uid, COMPLETION_RETRY_S
            )
            with self._lock:
                current = self._open.setdefault(uid, state)
            self._arm(
                uid,
                max(
                    current.last_received_at + current.quiet_seconds,
                    self.clock() + COMPLETION_RETRY_S,
                ),
            )

    def complete_series(self, uid: str, state: _OpenSeries) -> None:
        """Assemble, route and queue one quiet series (scheduler thread)."""
        started = time.monotonic()
        records = instances_of_series(self.db, uid)
        assembly = series.assemble(records, self.config.routing)
        modality, description = series.describe(records)
        now = self.clock()
        last = max((r.received_at for r in records), default=state.last_received_at)
        first_row = series.get_series(self.db, uid)
        first_received = float(first_row["first_received_at"]) if first_row else last
        with self.db.transaction() as conn:
            applied = series.record_completion(
                conn,
                series_uid=uid,
                opened_seq=state.opened_seq,
                assembly=assembly,
                modality=modality,
                description=description,
                last_received_at=last,
                now=now,
            )
            queued = (
                jobs.upsert_for_completion(
                    conn,
                    series_uid=uid,
                    study_uid=state.study_uid,
                    groups=assembly.groups,
                    received_at=first_received,
                    now=now,
                )
                if applied
                else []
            )
        if not applied:
            logger.info("series %s received a late instance during completion: stays open", uid)
            return
        metrics.SERIES_COMPLETED.inc()
        if assembly.state != series.COMPLETE:
            metrics.SERIES_SKIPPED.labels(reason=skip_label(assembly.reason)).inc()
        logger.info(
            "series %s %s: %d instances, %d slices, %d echo group(s), %d job(s) queued in %.2f s%s",
            uid,
            assembly.state,
            assembly.instance_count,
            assembly.slice_count,
            len(assembly.groups),
            len(queued),
            time.monotonic() - started,
            f"; reason: {assembly.reason}" if assembly.reason else "",
        )
        if queued:
            self.wake_worker()

    def _reconcile_and_rearm(self) -> None:
        """Open series from the index (and instances never accounted for) get timers again."""
        known = {r["series_instance_uid"]: r for r in series.list_open(self.db)}
        rows = {
            r["series_instance_uid"]: r
            for r in self.db.execute(
                "SELECT series_instance_uid, state, last_received_at, completed_at FROM series"
            ).fetchall()
        }
        for activity in series_activity(self.db):
            row = rows.get(activity.series_instance_uid)
            late = (
                row is not None
                and row["state"] != series.OPEN
                and (
                    row["completed_at"] is None
                    or activity.last_received_at > float(row["completed_at"])
                )
            )
            if row is None or late:
                quiet = self.config.quiet_seconds_for(activity.calling_ae)
                seq, _ = series.open_series(
                    self.db,
                    series_uid=activity.series_instance_uid,
                    study_uid=activity.study_instance_uid,
                    calling_ae=activity.calling_ae,
                    quiet_seconds=quiet,
                    received_at=activity.last_received_at,
                )
                logger.info(
                    "series %s had instances not yet assembled: opened at start-up",
                    activity.series_instance_uid,
                )
                known[activity.series_instance_uid] = {
                    "series_instance_uid": activity.series_instance_uid,
                    "study_instance_uid": activity.study_instance_uid,
                    "calling_ae": activity.calling_ae,
                    "quiet_seconds": quiet,
                    "last_received_at": activity.last_received_at,
                    "opened_seq": seq,
                    "instance_count": activity.instance_count,
                }
            elif (
                row is not None
                and row["state"] == series.OPEN
                and activity.series_instance_uid in known
            ):
                known[activity.series_instance_uid]["last_received_at"] = max(
                    float(known[activity.series_instance_uid]["last_received_at"]),
                    activity.last_received_at,
                )
                known[activity.series_instance_uid]["instance_count"] = activity.instance_count
        for uid, row in known.items():
            quiet = self.config.quiet_seconds_for(row["calling_ae"])
            last = float(row["last_received_at"])
            with self._lock:
                self._open[uid] = _OpenSeries(
                    row["study_instance_uid"],
                    int(row["opened_seq"]),
                    last,
                    quiet,
                    int(row["instance_count"] or 0),
                )
            self._arm(uid, last + quiet)

    # -- worker, watchdog, metrics -------------------------------------------------------
    def _start_worker(self) -> None:
        self._stop.value = 0
        self._worker_ready = False
        worker = self._ctx.Process(
            target=worker_main,
            args=(
                self.config,
                self.stages,
                self._stop,
                self._wake,
                self.config.logging.level.upper(),
                self.config.logging.format,
                self._results_writer,
            ),
            name="lumbar-node-worker",
            daemon=True,
        )
        worker.start()
        self._worker = worker
        logger.info("analysis worker started (pid %s)", worker.pid)

    def worker_pid(self) -> int | None:
        """The worker process id (None without a worker)."""
        return self._worker.pid if self._worker is not None else None

    def _watchdog(self) -> None:
        """Restart a dead worker (recovering its job) and feed job metrics."""
        try:
            worker = self._worker
            if (
                self.run_worker
                and not self._stopping
                and worker is not None
                and not worker.is_alive()
            ):
                logger.error(
                    "analysis worker %s died (exit code %s): recovering its job and restarting",
                    worker.pid,
                    worker.exitcode,
                )
                jobs.recover_interrupted(self.db)
                self._start_worker()
            self._observe_finished()
            counts = jobs.job_counts(self.db)
            if counts != self._last_counts:
                self._last_counts = counts
                self._last_progress = time.monotonic()
        except Exception:  # noqa: BLE001 - the watchdog must keep running
            logger.exception("watchdog tick failed")

    def _observe_finished(self) -> None:
        rows = self.db.execute(
            "SELECT updated_at, analyse_s, encode_s, export_s FROM jobs"
            " WHERE state IN (?, ?) AND updated_at > ? ORDER BY updated_at",
            (jobs.DONE, jobs.FAILED, self._finished_watermark),
        ).fetchall()
        for row in rows:
            for stage in ("analyse", "encode", "export"):
                value = row[f"{stage}_s"]
                if value is not None:
                    metrics.JOB_STAGE_SECONDS.labels(stage=stage).observe(float(value))
            self._finished_watermark = max(self._finished_watermark, float(row["updated_at"]))

    def _install_metrics(self) -> None:
        for state in jobs.STATES:
            metrics.JOBS.labels(state=state).set_function(_count_reader(self.db, state))

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz`` queue check: the worker is alive and queued work is moving."""
        counts = jobs.job_counts(self.db)
        waiting = counts[jobs.QUEUED] + sum(counts[s] for s in jobs.ACTIVE_STATES)
        alive = (not self.run_worker) or (self._worker is not None and self._worker.is_alive())
        stalled = waiting > 0 and time.monotonic() - self._last_progress > QUEUE_STALL_S
        details: dict[str, Any] = {
            "worker_alive": alive,
            # model loaded (ai.preload), jobs are taken without start-up delay
            "worker_ready": alive and self._worker_ready,
            "jobs": {k: v for k, v in counts.items() if v},
            "open_series": len(self._open),
        }
        if stalled:
            details["stalled_s"] = round(time.monotonic() - self._last_progress)
        return alive and not stalled, details


def _count_reader(db: Database, state: str) -> Callable[[], float]:
    def read() -> float:
        row = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()
        return float(row[0])

    return read


def _datetime_in(delay_s: float) -> Any:
    """An aware datetime ``delay_s`` from now (what apscheduler's date trigger wants)."""
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=delay_s)
