"""``lumbar-node retry``, ``reanalyze`` and ``purge``: job maintenance on the index.

Both work whether the node runs or not: they change rows in the index (in one write
transaction each) and a running node's worker picks re-queued jobs up at its next poll
(about a second).

* ``retry JOB_ID...`` / ``retry --all-failed`` re-queues failed jobs with fresh attempts;
  ``--dead-letters`` also re-queues dead-lettered deliveries (``node.outbox``).
* ``reanalyze JOB_ID...`` / ``--series UID`` / ``--done-within DAYS`` re-queues done jobs: the
  series is analysed again from its stored images and its results are re-sent (after a
  model upgrade, or when a result is wanted again).
* ``purge`` deletes finished jobs older than ``--done-older-than`` days (``done`` and
  ``superseded``; ``--include-failed``/``--include-skipped`` add those), and with ``--files``
  their results folders under ``results_dir``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import TYPE_CHECKING

from node.commands.status import EXIT_CONFIG, add_config_arguments, load_cli_config

if TYPE_CHECKING:
    from node.db import Database

#: exit status when nothing matched or the request is inconsistent
EXIT_USAGE = 1
#: default age (days) of finished jobs that purge removes
DEFAULT_PURGE_DAYS = 30.0
SECONDS_PER_DAY = 86400.0


def _open_jobs_index(args: argparse.Namespace, command: str) -> Database | int:
    """The index for ``retry`` / ``reanalyze`` (layout checked, jobs table there), or the
    exit status after saying why there is none."""
    from node import jobs
    from node.db import Database, check_index_version

    config = load_cli_config(args)
    if config is None:
        return EXIT_CONFIG
    if not config.index_path.exists():
        print(f"{command}: no index at {config.index_path}", file=sys.stderr)
        return EXIT_USAGE
    db = Database(config.index_path)
    try:
        check_index_version(db)
        jobs.ensure_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def add_retry_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "job_ids", nargs="*", type=int, metavar="JOB_ID", help="failed job ids (see status)"
    )
    parser.add_argument("--all-failed", action="store_true", help="re-queue every failed job")
    parser.add_argument(
        "--dead-letters",
        action="store_true",
        help="also re-queue dead-lettered deliveries of the results",
    )


def run_retry(args: argparse.Namespace) -> int:
    if not args.job_ids and not args.all_failed and not args.dead_letters:
        print("retry: give JOB_ID..., --all-failed or --dead-letters", file=sys.stderr)
        return EXIT_USAGE
    db = _open_jobs_index(args, "retry")
    if isinstance(db, int):
        return db
    from node import jobs

    try:
        status = 0
        if args.job_ids or args.all_failed:
            ids = jobs.retry_jobs(db, args.job_ids, all_failed=args.all_failed)
            missing = sorted(set(args.job_ids) - set(ids))
            if _report_requeued(ids, "", [str(i) for i in missing], "not failed"):
                status = EXIT_USAGE
        if args.dead_letters:
            from node.outbox import requeue_dead_letters

            count = requeue_dead_letters(db)
            print(f"re-queued {count} dead-lettered deliveries")
        return status
    finally:
        db.close()


def add_reanalyze_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "job_ids", nargs="*", type=int, metavar="JOB_ID", help="done job ids (see status)"
    )
    parser.add_argument(
        "--series", action="append", default=[], metavar="UID",
        help="every done job of this SeriesInstanceUID (repeatable)",
    )
    parser.add_argument(
        "--done-within", type=float, default=None, metavar="DAYS",
        help="every job done in the last DAYS days (e.g. after a model upgrade)",
    )


def run_reanalyze(args: argparse.Namespace) -> int:
    if not args.job_ids and not args.series and args.done_within is None:
        print("reanalyze: give JOB_ID..., --series UID or --done-within DAYS", file=sys.stderr)
        return EXIT_USAGE
    if args.done_within is not None and args.done_within <= 0:
        print("reanalyze: --done-within must be > 0", file=sys.stderr)
        return EXIT_USAGE
    db = _open_jobs_index(args, "reanalyze")
    if isinstance(db, int):
        return db
    from node import jobs

    try:
        ids = jobs.reanalyse_jobs(
            db,
            args.job_ids,
            series_uids=args.series,
            done_within_s=None if args.done_within is None else args.done_within * SECONDS_PER_DAY,
        )
        picked = {job.id: job for job in (jobs.get_job(db, i) for i in ids) if job is not None}
        missing_ids = sorted(set(args.job_ids) - set(ids))
        missing_series = sorted(
            set(args.series) - {job.series_instance_uid for job in picked.values()}
        )
    finally:
        db.close()
    left_alone = _report_requeued(ids, " for analysis", [str(i) for i in missing_ids] + missing_series, "not done")
    return 0 if ids and not left_alone else EXIT_USAGE


def _report_requeued(ids: list[int], purpose: str, left_alone: list[str], why: str) -> bool:
    """Print what was re-queued and, on stderr, what was asked for but left alone; whether any was."""
    print(f"re-queued {len(ids)} job(s){purpose}{': ' + ', '.join(map(str, ids)) if ids else ''}")
    if left_alone:
        print(f"{why} or unknown, left alone: {', '.join(left_alone)}", file=sys.stderr)
    return bool(left_alone)


def add_purge_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--done-older-than",
        type=float,
        default=DEFAULT_PURGE_DAYS,
        metavar="DAYS",
        help=f"purge finished jobs older than DAYS (default {DEFAULT_PURGE_DAYS:g})",
    )
    parser.add_argument("--files", action="store_true", help="also delete their results folders")
    parser.add_argument("--include-failed", action="store_true", help="also purge failed jobs")
    parser.add_argument("--include-skipped", action="store_true", help="also purge skipped jobs")


def run_purge(args: argparse.Namespace) -> int:
    if args.done_older_than < 0:
        print("purge: --done-older-than must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    config = load_cli_config(args)
    if config is None:
        return EXIT_CONFIG
    if not config.index_path.exists():
        print(f"purge: no index at {config.index_path}: nothing to purge")
        return 0
    from node import jobs
    from node.db import Database, check_index_version

    states = [jobs.DONE, jobs.SUPERSEDED]
    if args.include_failed:
        states.append(jobs.FAILED)
    if args.include_skipped:
        states.append(jobs.SKIPPED)
    db = Database(config.index_path)
    try:
        check_index_version(db)
        jobs.ensure_schema(db)
        purged = jobs.purge_jobs(db, args.done_older_than * SECONDS_PER_DAY, states)
    finally:
        db.close()
    removed = 0
    if args.files:
        root = config.results_dir.resolve()
        for job in purged:
            folder = (root / (job.results_dir or job.key)).resolve()
            if folder != root and folder.is_relative_to(root) and folder.is_dir():
                shutil.rmtree(folder)
                removed += 1
    print(
        f"purged {len(purged)} job(s)"
        + (f", removed {removed} results folder(s)" if args.files else "")
    )
    return 0
