"""The node's lifecycle: startup, serve, shutdown (like uvicorn's server).

``startup`` opens the index, creates the schemas, starts the orchestrator (series
assembly, jobs, which first recovers interrupted work from the index), the exporter, the
status endpoint and then the DICOM listener(s): the port opens last, when everything behind it
is ready. ``serve`` blocks until SIGTERM or SIGINT. ``shutdown`` drains: it closes the
listening sockets, lets open associations finish within ``node.drain_timeout_s``, stops
the orchestrator within the same budget, closes the index, and restores the previous
signal handlers. A second SIGTERM/SIGINT during the drain aborts open associations at
once. Everything the node acknowledged is already durable, so even a forced stop loses
nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from node import instances, metrics
from node.config import NodeConfig
from node.db import Database, check_index_version
from node.export import Exporter
from node.export import register_metrics as register_export_metrics
from node.http import StatusServer
from node.instances import InstanceRecord
from node.orphans import count_orphans, set_aside_orphans
from node.receiver import Receiver
from node.retention import Retention
from node.spool import Spool
from node.state_lock import StateLock

logger = logging.getLogger(__name__)

#: files the node creates are readable by its user only (0600 files, 0700 directories)
PRIVATE_UMASK = 0o077
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: exit status when a second signal forced the shutdown
EXIT_FORCED = 1
#: how often serve() wakes up to check the stop flag (s)
SERVE_POLL_S = 0.5


class OrchestratorLike(Protocol):
    """What the server needs from ``node.orchestrator.Orchestrator``."""

    def start(self) -> None: ...

    def instance_stored(self, record: InstanceRecord) -> None: ...

    def shutdown(self, timeout_s: float) -> None: ...

    #: called when the analysis worker has put results in the outbox (the exporter's wake)
    on_results: Callable[[], None] | None


class _NoOrchestrator:
    """Stand-in used only while ``node/orchestrator.py`` does not exist: receive-only node."""

    def start(self) -> None:
        logger.warning("node.orchestrator is not installed: receiving only, no series assembly")

    def instance_stored(self, record: InstanceRecord) -> None:
        return None

    def shutdown(self, timeout_s: float) -> None:
        return None

    on_results: Callable[[], None] | None = None


def make_orchestrator(db: Database, config: NodeConfig) -> OrchestratorLike:
    """The one place where the series/job pipeline is wired into the server."""
    if importlib.util.find_spec("node.orchestrator") is None:
        return _NoOrchestrator()
    module = importlib.import_module("node.orchestrator")
    orchestrator: OrchestratorLike = module.Orchestrator(db, config)
    return orchestrator


class NodeServer:
    """One running node: index, orchestrator, status endpoint, DICOM listener(s)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = Spool(config.state_dir)
        self.db: Database | None = None
        self.receiver: Receiver | None = None
        self.orchestrator: OrchestratorLike | None = None
        self.exporter: Exporter | None = None
        self.status_server: StatusServer | None = None
        self._stop = threading.Event()
        self._force = threading.Event()
        self._previous: dict[int, Any] = {}
        self._started_at = 0.0
        self.state_lock: StateLock | None = None
        self.retention: Retention | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def startup(self) -> None:
        """Open everything; the DICOM port opens last."""
        os.umask(PRIVATE_UMASK)
        self.spool.ensure()
        # before anything touches the state: a second node must not clean up the first's files
        self.state_lock = StateLock.acquire(self.config.state_dir)
        self.spool.remove_stale_temp_files()
        self.db = Database(self.config.index_path)
        check_index_version(self.db)
        instances.ensure_schema(self.db)
        # before the port opens: no C-STORE is between its file and its row now
        set_aside_orphans(self.db, self.spool)
        self.orchestrator = make_orchestrator(self.db, self.config)
        self.orchestrator.start()
        # export: durable deliveries to the configured destinations (node.export)
        self.exporter = Exporter(self.db, self.config)
        register_export_metrics(self.db, self.exporter)
        self.exporter.start()
        self.orchestrator.on_results = self.exporter.wake
        self.receiver = Receiver(
            self.config, self.db, self.spool, on_stored=self.orchestrator.instance_stored
        )
        self.retention = Retention(self.db, self.config, self.spool, self.receiver.instance_lock)
        self.retention.start()
        if self.config.http.enabled:
            self.status_server = StatusServer(self.config.http.host, self.config.http.port)
            self._add_health_checks(self.status_server)
            self.status_server.start()
        receiver = self.receiver
        metrics.set_live(metrics.FREE_DISK_MB, self.spool.free_mb)
        state_dir = self.config.state_dir
        metrics.set_live(metrics.SET_ASIDE_FILES, lambda: float(count_orphans(state_dir).files))
        metrics.set_live(
            metrics.ACTIVE_ASSOCIATIONS, lambda: float(len(receiver.active_associations()))
        )
        receiver.start()
        self._started_at = time.monotonic()
        logger.info(
            "lumbar-node ready: AE %s, ports %s, state %s",
            self.config.node.ae_title,
            receiver.ports,
            self.config.state_dir,
        )

    def serve(self) -> None:
        """Block until a stop is requested (signal or :meth:`request_stop`)."""
        while not self._stop.wait(SERVE_POLL_S):
            continue

    def request_stop(self, force: bool = False) -> None:
        """Ask :meth:`serve` to return; ``force`` also skips the drain."""
        if force:
            self._force.set()
        self._stop.set()

    def shutdown(self) -> bool:
        """Drain and close; True when everything finished within the drain timeout."""
        timeout = self.config.node.drain_timeout_s
        deadline = time.monotonic() + timeout
        clean = True
        if self.receiver is not None:
            self.receiver.stop_accepting()
            logger.info(
                "stopped accepting; draining %d association(s)",
                len(self.receiver.active_associations()),
            )
            while not self.receiver.wait_idle(
                min(SERVE_POLL_S, max(0.0, deadline - time.monotonic()))
            ):
                if self._force.is_set() or time.monotonic() >= deadline:
                    aborted = self.receiver.abort_all()
                    logger.warning("aborted %d association(s) still open at shutdown", aborted)
                    clean = False
                    break
        if self.retention is not None:
            self.retention.stop()
        if self.orchestrator is not None:
            remaining = 0.0 if self._force.is_set() else max(0.0, deadline - time.monotonic())
            self.orchestrator.shutdown(remaining)
        if self.exporter is not None:
            self.exporter.stop(wait=not self._force.is_set())
        if self.status_server is not None:
            self.status_server.stop()
        if self.db is not None:
            self.db.close()
        if self.state_lock is not None:
            self.state_lock.release()
        if self._started_at:
            logger.info(
                "lumbar-node stopped (%s)",
                "drained" if clean and not self._force.is_set() else "forced",
            )
        return clean and not self._force.is_set()

    def run(self) -> int:
        """startup, serve, shutdown with signal handling; the process exit status."""
        self._install_signal_handlers()
        try:
            try:
                self.startup()
            except BaseException:
                # stop what did start (the analysis worker is a child process) and re-raise
                self._force.set()
                self.shutdown()
                raise
            self.serve()
            clean = self.shutdown()
        finally:
            self._restore_signal_handlers()
        return 0 if clean else EXIT_FORCED

    # -- signals -------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            logger.warning("%s again: forcing shutdown", name)
            self._force.set()
        else:
            logger.info("%s: draining (send again to force)", name)
            self._stop.set()

    # -- health ----------------------------------------------------------------------------
    def _add_health_checks(self, status: StatusServer) -> None:
        receiver = self.receiver
        assert receiver is not None
        floor = self.config.node.free_disk_floor_mb

        def listener() -> tuple[bool, dict[str, Any]]:
            return receiver.listening, {
                "ports": receiver.ports,
                "associations": len(receiver.active_associations()),
            }

        def disk() -> tuple[bool, dict[str, Any]]:
            free = self.spool.free_mb()
            return free >= floor, {"free_mb": round(free, 1), "floor_mb": floor}

        def queue() -> tuple[bool, dict[str, Any]]:
            health = getattr(self.orchestrator, "health", None)
            if health is None:
                return True, {"detail": "no queue health reported"}
            ok, details = health()
            return bool(ok), dict(details)

        status.add_check("listener", listener)
        status.add_check("disk", disk)
        status.add_check("queue", queue)
