"""The persisted job state machine: the ``jobs`` table and every transition of a job.

The worker loop that drives jobs through these states lives in :mod:`node.worker`.

One job per (series, echo group). States::

    received -> complete -> queued -> analysing -> encoding -> exporting -> done
                               \\-> skipped (routing)         any stage -> failed(reason)
    (superseded: an echo group that disappeared when a re-opened series was re-assembled)

Every transition is one SQLite transaction that also stamps ``<state>_at``. A transition
made by the worker only applies while the job is still in the state, ``generation`` and
``attempts`` the worker claimed it with: when a late instance re-opens and re-completes the
series (``generation`` + 1) or a restart re-queues the job (``attempts`` + 1 at the next
claim), the stale run stops at its next step instead of overwriting newer state.

Crash recovery (:func:`recover_interrupted`, at start-up and when the worker process dies):
jobs left in ``analysing``/``encoding``/``exporting`` go back to ``queued``; a job already
claimed :data:`MAX_ATTEMPTS` times is ``failed`` instead, so a series that kills the worker
cannot loop forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from node.db import Database

if TYPE_CHECKING:
    import sqlite3

    from node.series import EchoGroup

logger = logging.getLogger(__name__)

RECEIVED, COMPLETE, QUEUED = "received", "complete", "queued"
ANALYSING, ENCODING, EXPORTING = "analysing", "encoding", "exporting"
DONE, FAILED, SKIPPED, SUPERSEDED = "done", "failed", "skipped", "superseded"
STATES: tuple[str, ...] = (
    RECEIVED,
    COMPLETE,
    QUEUED,
    ANALYSING,
    ENCODING,
    EXPORTING,
    DONE,
    FAILED,
    SKIPPED,
    SUPERSEDED,
)
#: states in which a worker is (or was, before a crash) working on the job
ACTIVE_STATES: tuple[str, ...] = (ANALYSING, ENCODING, EXPORTING)
#: states a job never leaves by itself
TERMINAL_STATES: tuple[str, ...] = (DONE, FAILED, SKIPPED, SUPERSEDED)
#: a job claimed this many times (each crash or restart mid-job counts) fails instead
MAX_ATTEMPTS = 3

_STATE_COLUMNS = ",\n    ".join(f"{s}_at REAL" for s in STATES)
JOBS_DDL = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    echo                INTEGER NOT NULL DEFAULT 0,
    state               TEXT NOT NULL,
    reason              TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL DEFAULT 1,
    slices              INTEGER NOT NULL DEFAULT 0,
    results_dir         TEXT,
    worker_pid          INTEGER,
    analyse_s           REAL,
    encode_s            REAL,
    export_s            REAL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    {_STATE_COLUMNS},
    UNIQUE (series_instance_uid, echo)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, queued_at);
"""


def ensure_schema(db: Database) -> None:
    """Create the ``jobs`` table if needed."""
    db.ensure_schema(JOBS_DDL)


@dataclass(frozen=True)
class Job:
    """One row of ``jobs`` (times in Unix seconds)."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    echo: int
    state: str
    reason: str | None
    attempts: int
    generation: int
    slices: int
    results_dir: str | None
    times: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=int(row["id"]),
            series_instance_uid=row["series_instance_uid"],
            study_instance_uid=row["study_instance_uid"],
            echo=int(row["echo"]),
            state=row["state"],
            reason=row["reason"],
            attempts=int(row["attempts"]),
            generation=int(row["generation"]),
            slices=int(row["slices"]),
            results_dir=row["results_dir"],
            times={s: row[f"{s}_at"] for s in STATES},
        )

    @property
    def key(self) -> str:
        """``<series uid>`` or ``<series uid>_e<echo>``: names the results folder."""
        return (
            self.series_instance_uid
            if self.echo == 0
            else f"{self.series_instance_uid}_e{self.echo}"
        )


def results_dir_name(series_uid: str, echo: int) -> str:
    """Folder name of a job's results under ``config.results_dir``."""
    return series_uid if echo == 0 else f"{series_uid}_e{echo}"


# -- transitions -----------------------------------------------------------------------


def get_job(db: Database, job_id: int) -> Job | None:
    row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return Job.from_row(row) if row is not None else None


def jobs_of_series(db: Database, series_uid: str) -> list[Job]:
    rows = db.execute(
        "SELECT * FROM jobs WHERE series_instance_uid = ? ORDER BY echo", (series_uid,)
    ).fetchall()
    return [Job.from_row(r) for r in rows]


def upsert_for_completion(
    conn: sqlite3.Connection,
    *,
    series_uid: str,
    study_uid: str,
    groups: Sequence[EchoGroup],
    received_at: float,
    now: float,
) -> list[int]:
    """Create or renew one job per echo group of a just-completed series.

    Runs inside the caller's transaction (with the series verdict). A group routed to
    analysis is ``queued`` (a re-run after a late instance gets ``generation`` + 1 and
    fresh attempts; its results are replaced); other groups are ``skipped`` with the
    reason. Jobs of echo groups that no longer exist are ``superseded``.

    Returns
    -------
    list of int
        Ids of the queued jobs.
    """
    queued: list[int] = []
    echoes = [g.echo for g in groups]
    for g in groups:
        state = QUEUED if g.analyse else SKIPPED
        if g.analyse:
            reason = None
        elif not g.coherent:
            reason = f"incoherent geometry: {g.reason}"
        else:
            reason = g.decision.reason if g.decision is not None else "not routed"
        results = results_dir_name(series_uid, g.echo)
        row = conn.execute(
            "SELECT id FROM jobs WHERE series_instance_uid = ? AND echo = ?", (series_uid, g.echo)
        ).fetchone()
        if row is None:
            cur = conn.execute(
                f"INSERT INTO jobs (series_instance_uid, study_instance_uid, echo, state, reason,"
                f" slices, results_dir, created_at, updated_at, received_at, complete_at, {state}_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    series_uid,
                    study_uid,
                    g.echo,
                    state,
                    reason,
                    len(g.slices),
                    results,
                    now,
                    now,
                    received_at,
                    now,
                    now,
                ),
            )
            job_id = int(cur.lastrowid or 0)
        else:
            job_id = int(row["id"])
            conn.execute(
                f"UPDATE jobs SET state = ?, reason = ?, attempts = 0, generation = generation + 1,"
                f" slices = ?, results_dir = ?, worker_pid = NULL, updated_at = ?, complete_at = ?,"
                f" {state}_at = ? WHERE id = ?",
                (state, reason, len(g.slices), results, now, now, now, job_id),
            )
        if state == QUEUED:
            queued.append(job_id)
    placeholders = ",".join("?" for _ in echoes)
    conn.execute(
        f"UPDATE jobs SET state = ?, reason = ?, generation = generation + 1, updated_at = ?,"
        f" superseded_at = ? WHERE series_instance_uid = ? AND echo NOT IN ({placeholders})"
        " AND state != ?",
        (
            SUPERSEDED,
            "echo group no longer present after re-assembly",
            now,
            now,
            series_uid,
            *echoes,
            SUPERSEDED,
        ),
    )
    return queued


def hold_for_reopen(conn: sqlite3.Connection, series_uid: str, now: float) -> int:
    """A late instance re-opened the series: queued jobs wait (``received``) for completion."""
    cur = conn.execute(
        "UPDATE jobs SET state = ?, received_at = ?, updated_at = ? WHERE series_instance_uid = ?"
        " AND state = ?",
        (RECEIVED, now, now, series_uid, QUEUED),
    )
    return int(cur.rowcount)


def recover_interrupted(db: Database, max_attempts: int = MAX_ATTEMPTS) -> tuple[int, int]:
    """Re-queue jobs interrupted mid-stage (by a crash or a killed worker).

    Call only when no worker is running. Returns ``(requeued, failed)``.
    """
    now = time.time()
    marks = ",".join("?" for _ in ACTIVE_STATES)
    with db.transaction() as conn:
        failed = conn.execute(
            f"UPDATE jobs SET state = ?, reason = ?, failed_at = ?, updated_at = ?, worker_pid = NULL"
            f" WHERE state IN ({marks}) AND attempts >= ?",
            (
                FAILED,
                f"interrupted {max_attempts} times (crash or restart during the job)",
                now,
                now,
                *ACTIVE_STATES,
                max_attempts,
            ),
        ).rowcount
        # queued_at is kept: an interrupted job resumes ahead of jobs queued after it
        requeued = conn.execute(
            f"UPDATE jobs SET state = ?, reason = ?, updated_at = ?, worker_pid = NULL"
            f" WHERE state IN ({marks})",
            (QUEUED, "resumed after an interruption", now, *ACTIVE_STATES),
        ).rowcount
    if requeued or failed:
        logger.warning(
            "recovered interrupted jobs: %d re-queued, %d failed (max attempts)", requeued, failed
        )
    return int(requeued), int(failed)


def claim_next(db: Database, worker_pid: int | None = None) -> Job | None:
    """Take the oldest queued job: ``queued -> analysing``, attempts + 1; None when idle."""
    now = time.time()
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT id FROM jobs WHERE state = ? ORDER BY queued_at, id LIMIT 1", (QUEUED,)
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            "UPDATE jobs SET state = ?, reason = NULL, attempts = attempts + 1, analysing_at = ?,"
            " updated_at = ?, worker_pid = ? WHERE id = ?",
            (ANALYSING, now, now, worker_pid, row["id"]),
        )
        return Job.from_row(
            conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        )


def advance(
    db: Database,
    job: Job,
    from_state: str,
    to_state: str,
    *,
    duration: tuple[str, float] | None = None,
    reason: str | None = None,
) -> bool:
    """Move a claimed job on; False (nothing changed) when the claim is stale."""
    now = time.time()
    extra, params = "", []
    if duration is not None:
        column, seconds = duration
        if column not in ("analyse_s", "encode_s", "export_s"):
            raise ValueError(f"unknown duration column {column!r}")
        extra = f", {column} = ?"
        params.append(seconds)
    with db.transaction() as conn:
        cur = conn.execute(
            f"UPDATE jobs SET state = ?, reason = ?, {to_state}_at = ?, updated_at = ?{extra}"
            " WHERE id = ? AND state = ? AND generation = ? AND attempts = ?",
            (to_state, reason, now, now, *params, job.id, from_state, job.generation, job.attempts),
        )
        return bool(cur.rowcount == 1)


def retry_jobs(db: Database, job_ids: Iterable[int] = (), *, all_failed: bool = False) -> list[int]:
    """Re-queue failed jobs (by id, or every failed job); attempts start again from 0.

    Returns the ids re-queued. Jobs that are not ``failed`` are left alone.
    """
    now = time.time()
    with db.transaction() as conn:
        if all_failed:
            ids = [
                int(r[0]) for r in conn.execute("SELECT id FROM jobs WHERE state = ?", (FAILED,))
            ]
        else:
            ids = [
                int(r[0])
                for i in job_ids
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE id = ? AND state = ?", (int(i), FAILED)
                )
            ]
        for job_id in ids:
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, attempts = 0, queued_at = ?, updated_at = ?"
                " WHERE id = ?",
                (QUEUED, "re-queued by retry", now, now, job_id),
            )
    return ids


def reanalyse_jobs(
    db: Database,
    job_ids: Iterable[int] = (),
    *,
    series_uids: Iterable[str] = (),
    done_within_s: float | None = None,
) -> list[int]:
    """Re-queue finished (``done``) jobs for a fresh analysis; return the ids re-queued.

    Why: after a model upgrade, or when a radiologist asks for a series' results again,
    the images are still in the spool (until retention removes the series, jobs and all):
    the job runs the whole chain once more, and the outbox re-sends its results (same
    models: the same UIDs, replacing; new models: new UIDs). Selected by id, by series, or
    every job done within the last ``done_within_s`` seconds; other states are left alone
    (failed jobs are ``retry_jobs``'; skipped ones were routed away on purpose), and so are
    jobs whose series has no indexed instance left. Retention deletes a series' instance
    rows in one transaction and only while no job of it is queued, so the two never leave
    a job with a part of its series.
    ``generation`` + 1 marks the new run, as a late instance would.
    """
    now = time.time()
    job_ids, series_uids = [int(i) for i in job_ids], list(series_uids)
    chosen: list[str] = []
    params: list[object] = []
    if job_ids:
        chosen.append(f"id IN ({','.join('?' for _ in job_ids)})")
        params += job_ids
    if series_uids:
        chosen.append(f"series_instance_uid IN ({','.join('?' for _ in series_uids)})")
        params += series_uids
    if done_within_s is not None:
        chosen.append("done_at >= ?")
        params.append(now - done_within_s)
    if not chosen:
        return []
    with db.transaction() as conn:
        # a done job whose images retention is removing has none left (one transaction there)
        ids = sorted(int(r[0]) for r in conn.execute(
            f"SELECT id FROM jobs WHERE state = ? AND ({' OR '.join(chosen)}) AND EXISTS"
            " (SELECT 1 FROM instances i WHERE i.series_instance_uid = jobs.series_instance_uid)",
            (DONE, *params),
        ))
        for job_id in ids:
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, attempts = 0, generation = generation + 1,"
                " worker_pid = NULL, queued_at = ?, updated_at = ? WHERE id = ?",
                (QUEUED, "re-queued by reanalyze", now, now, job_id),
            )
    return ids


def purge_jobs(db: Database, older_than_s: float, states: Sequence[str] = (DONE,)) -> list[Job]:
    """Delete jobs in ``states`` last updated more than ``older_than_s`` ago; return them."""
    bad = sorted(set(states) - set(TERMINAL_STATES))
    if bad:
        raise ValueError(f"only finished jobs can be purged, not {bad}")
    cutoff = time.time() - older_than_s
    marks = ",".join("?" for _ in states)
    with db.transaction() as conn:
        rows = conn.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) AND updated_at < ?", (*states, cutoff)
        ).fetchall()
        jobs = [Job.from_row(r) for r in rows]
        for job in jobs:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
    return jobs


def job_counts(db: Database) -> dict[str, int]:
    """Jobs per state, every state present (for ``/metrics`` and ``lumbar-node status``)."""
    counts = dict.fromkeys(STATES, 0)
    for row in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall():
        counts[row[0]] = int(row[1])
    return counts
