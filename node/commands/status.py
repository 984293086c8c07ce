"""``lumbar-node status``: the queue, recent series, failures and deliveries, from the index.

Reads the SQLite index only, opened read-only, so it works the same whether the node runs
or not and never changes anything. Tables that do not exist yet (a node that never ran,
or an export module that never started) are reported as empty. ``--json`` prints one JSON
object (times as Unix seconds) for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.commands.serve import CONFIG_ENV, EXIT_CONFIG
from node.config import NodeConfig
from node.db import check_index_version
from node.orphans import count_orphans, orphans_dir
from node.spool import BYTES_PER_MB, Spool

#: recent series and failures listed by default
DEFAULT_LIMIT = 20


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--state-dir``, shared by status, retry and purge."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML configuration file (default: ${CONFIG_ENV}, else built-in defaults)",
    )
    parser.add_argument("--state-dir", default=None, help="override node.state_dir")


def load_cli_config(
    args: argparse.Namespace, overrides: dict[str, object] | None = None
) -> NodeConfig | None:
    """The configuration a command runs with (``--config``, else ``$LUMBAR_NODE_CONFIG``,
    else the defaults; the environment; ``overrides``, by default ``--state-dir``); None,
    after printing ``configuration error: ...``, when it is invalid."""
    from node.config import load_config
    from node.errors import ConfigError

    path = args.config
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if overrides is None:
        overrides = {}
        if getattr(args, "state_dir", None):
            overrides["node.state_dir"] = str(Path(args.state_dir).resolve())
    try:
        return load_config(path, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return None


class ReadOnlyIndex:
    """The index opened read-only, with the ``execute`` interface the table modules use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        self.conn.row_factory = sqlite3.Row

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def ensure_schema(self, ddl: str) -> None:
        """Read-only: tables are never created here (callers check :meth:`has_table`)."""
        return None

    def has_table(self, name: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def close(self) -> None:
        self.conn.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"recent series and failures to list (default {DEFAULT_LIMIT})",
    )


def _series_section(index: ReadOnlyIndex, limit: int) -> dict[str, Any]:
    from node.series import SERIES_STATES

    if not index.has_table("series"):
        return {"by_state": dict.fromkeys(SERIES_STATES, 0), "recent": []}
    by_state = dict.fromkeys(SERIES_STATES, 0)
    for row in index.execute("SELECT state, COUNT(*) FROM series GROUP BY state"):
        by_state[row[0]] = int(row[1])
    live_counts = index.has_table("instances")
    recent = []
    for row in index.execute(
        "SELECT * FROM series ORDER BY last_received_at DESC LIMIT ?", (limit,)
    ).fetchall():
        groups = json.loads(row["echo_groups"]) if row["echo_groups"] else []
        instances = int(row["instance_count"])
        if live_counts and row["state"] == "open":
            instances = int(
                index.execute(
                    "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?",
                    (row["series_instance_uid"],),
                ).fetchone()[0]
            )
        recent.append(
            {
                "series_instance_uid": row["series_instance_uid"],
                "study_instance_uid": row["study_instance_uid"],
                "description": row["description"],
                "modality": row["modality"],
                "state": row["state"],
                "reason": row["reason"],
                "instances": instances,
                "slices": int(row["slice_count"]),
                "echo_groups": [
                    {k: g.get(k) for k in ("echo", "slices", "outcome", "reason")} for g in groups
                ],
                "calling_ae": row["calling_ae"],
                "first_received_at": row["first_received_at"],
                "last_received_at": row["last_received_at"],
                "completed_at": row["completed_at"],
                "completions": int(row["completions"]),
            }
        )
    return {"by_state": by_state, "recent": recent}


def _job_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "series_instance_uid": row["series_instance_uid"],
        "echo": int(row["echo"]),
        "state": row["state"],
        "reason": row["reason"],
        "attempts": int(row["attempts"]),
        "updated_at": row["updated_at"],
        "analyse_s": row["analyse_s"],
        "encode_s": row["encode_s"],
        "export_s": row["export_s"],
    }


def _jobs_section(index: ReadOnlyIndex, limit: int) -> dict[str, Any]:
    from node import jobs

    if not index.has_table("jobs"):
        return {"by_state": dict.fromkeys(jobs.STATES, 0), "active": [], "failed": []}
    by_state = dict.fromkeys(jobs.STATES, 0)
    for row in index.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        by_state[row[0]] = int(row[1])
    waiting = (jobs.RECEIVED, jobs.QUEUED, *jobs.ACTIVE_STATES)
    marks = ",".join("?" for _ in waiting)
    active = [
        _job_dict(r)
        for r in index.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY queued_at, id LIMIT ?",
            (*waiting, limit),
        )
    ]
    failed = [
        _job_dict(r)
        for r in index.execute(
            "SELECT * FROM jobs WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
            (jobs.FAILED, limit),
        )
    ]
    return {"by_state": by_state, "active": active, "failed": failed}


def _deliveries_section(index: ReadOnlyIndex) -> dict[str, Any] | None:
    """Deliveries per destination, when the export side has created its table."""
    if not index.has_table("deliveries"):
        return None
    try:
        from node.outbox import delivery_summary
    except ImportError:
        return None
    summary: dict[str, Any] = delivery_summary(index)  # type: ignore[arg-type]
    return summary


def _storage_section(index: ReadOnlyIndex, config: NodeConfig) -> dict[str, Any]:
    """What the received images take, the free disk, and when retention removes them."""
    count, size, oldest = 0, 0, None
    if index.has_table("instances"):
        row = index.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0), MIN(received_at) FROM instances"
        ).fetchone()
        count, size, oldest = int(row[0]), int(row[1]), row[2]
    set_aside = count_orphans(config.state_dir)
    return {
        "instances": count,
        "received_bytes": size,
        "oldest_received_at": oldest,
        "free_mb": round(Spool(config.state_dir).free_mb(), 1),
        "free_disk_floor_mb": config.node.free_disk_floor_mb,
        "retention_keep_days": config.retention.keep_days,
        "set_aside_files": set_aside.files,
        "set_aside_bytes": set_aside.bytes,
        "set_aside_dir": str(orphans_dir(config.state_dir)),
    }


def collect(config: NodeConfig, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data."""
    path = config.index_path
    out: dict[str, Any] = {"index": str(path), "generated_at": time.time(), "exists": path.exists()}
    if not path.exists():
        return out
    index = ReadOnlyIndex(path)
    try:
        check_index_version(index, stamp=False)  # type: ignore[arg-type]
        out["series"] = _series_section(index, limit)
        out["jobs"] = _jobs_section(index, limit)
        out["deliveries"] = _deliveries_section(index)
        out["storage"] = _storage_section(index, config)
    finally:
        index.close()
    return out


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch)))


def human_size(n_bytes: float) -> str:
    """Bytes as "1.2 GB" or "3.4 MB"."""
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(shown) if shown else "none"


def render_text(data: dict[str, Any]) -> str:
    """The human view of :func:`collect`."""
    lines = [f"index: {data['index']}"]
    if not data.get("exists"):
        lines.append("no index yet: the node has not received anything")
        return "\n".join(lines)
    store = data["storage"]
    retention = (
        f"finished series removed after {store['retention_keep_days']:g} days"
        if store["retention_keep_days"] > 0
        else "retention off"
    )
    oldest = store["oldest_received_at"]
    age = f", oldest {(time.time() - oldest) / 86400:.1f} days old" if oldest is not None else ""
    lines.append(
        f"storage: {store['instances']} instances, {human_size(store['received_bytes'])} received{age};"
        f" {human_size(store['free_mb'] * BYTES_PER_MB)} free"
        f" (refusing below {human_size(store['free_disk_floor_mb'] * BYTES_PER_MB)});"
        f" {retention}"
    )
    if store["set_aside_files"]:
        lines.append(
            f"set aside: {store['set_aside_files']} spool files without index rows,"
            f" {human_size(store['set_aside_bytes'])}, in {store['set_aside_dir']} (see lumbar-node check)"
        )
    jobs_ = data["jobs"]
    lines.append(f"jobs: {_counts(jobs_['by_state'])}")
    for job in jobs_["active"]:
        lines.append(
            f"  #{job['id']} {job['state']:<9} {job['series_instance_uid']} echo {job['echo']}"
            f" (attempt {job['attempts']})"
        )
    series_ = data["series"]
    lines.append(f"series: {_counts(series_['by_state'])}")
    for s in series_["recent"]:
        desc = s["description"] or "(no description)"
        lines.append(
            f"  {s['state']:<10} {s['series_instance_uid']}  {desc!r}  {s['instances']} inst,"
            f" {s['slices']} slices, last {_when(s['last_received_at'])}"
        )
        for g in s["echo_groups"]:
            if len(s["echo_groups"]) > 1 or g.get("outcome") != "analyse":
                label = "series" if g["echo"] == 0 else f"echo {g['echo']}"
                lines.append(
                    f"      {label}: {g.get('outcome')} ({g.get('slices')} slices)"
                    + (
                        f": {g['reason']}"
                        if g.get("outcome") != "analyse" and g.get("reason")
                        else ""
                    )
                )
    if jobs_["failed"]:
        lines.append("failures:")
        for job in jobs_["failed"]:
            lines.append(
                f"  #{job['id']} {job['series_instance_uid']} echo {job['echo']}"
                f" at {_when(job['updated_at'])}: {job['reason']}"
            )
    deliveries = data.get("deliveries")
    if deliveries:
        lines.append("deliveries:" + ("" if deliveries.get("destinations") else " none"))
        for name, per in sorted(deliveries.get("destinations", {}).items()):
            lines.append(f"  {name}: {_counts(per)}")
        for dead in deliveries.get("dead_letters", []):
            lines.append(
                f"  dead letter {dead['kind']} {dead['sop_instance_uid']} -> {dead['destination']}:"
                f" {dead['last_error']}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_cli_config(args)
    if config is None:
        return EXIT_CONFIG
    data = collect(config, max(1, args.limit))
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(render_text(data))
    return 0
