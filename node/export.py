"""Delivery of outbox results to the configured destinations, with retries and dead letters.

:class:`Exporter` runs one apscheduler job per (non-shadow) destination. Each run claims up
to ``export.batch_size`` due rows of that destination (``pending``, or ``failed`` whose
``next_attempt_at`` has come) by moving them to ``sending`` in one transaction, sends them
over one association (DICOM) or one request (STOW-RS), and records one outcome per instance:

* **done**: success, or a warning status (the instance is stored; the warning is kept).
* **dead** at once: a permanent refusal (SOP class not supported 0x0122, not authorised
  0x0124, data set does not match SOP class 0xA9xx, cannot understand 0xCxxx, invalid
  instance, an association rejected permanently, no accepted presentation context for the
  SOP class, an unreadable outbox file).
* **retry**: transient trouble (connection refused, timeouts, aborts, out of resources
  0xA7xx, processing failure 0x0110, HTTP 5xx/429); the next attempt is scheduled with
  exponential backoff and jitter (:func:`backoff_delay_s`) until ``export.retry_horizon_h``
  after the row was queued, then it is dead-lettered with the last error.

State lives in the ``deliveries`` table (:mod:`node.outbox`), so a restart resumes where
the previous process stopped; rows in ``sending`` at start-up go back to ``pending``.
How each batch reaches its peer, and how an answer is classified, is :mod:`node.senders`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pydicom
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.config import NodeConfig
from node.db import Database
from node.outbox import State, delivery_counts, ensure_schema, is_shadow
from node.outbox import recover_sending as _recover_sending
from node.senders import Outcome, Sender, Verdict, make_sender

logger = logging.getLogger(__name__)

#: how often (s) each destination's job looks for due deliveries
POLL_INTERVAL_S = 2.0
#: lower bound of the jitter factor applied to the exponential delay (equal jitter)
JITTER_LOW = 0.5
SECONDS_PER_HOUR = 3600.0


def backoff_delay_s(attempts: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Delay (s) before the next attempt after ``attempts`` failed ones (equal jitter).

    The base doubles from ``initial_s`` per attempt and is capped at ``max_s``; the delay is
    uniform in ``[JITTER_LOW * base, base]`` so that many deliveries that failed together
    (a PACS restart) do not all come back in the same second.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    exponent = min(attempts - 1, 62)  # 2**62 s is far beyond any cap; avoids overflow
    base = min(max_s, initial_s * float(2**exponent))
    return rng.uniform(JITTER_LOW * base, base)

# -- the delivery loop --------------------------------------------------------------


@dataclass(frozen=True)
class _Claimed:
    id: int
    generation: int
    sop_instance_uid: str
    path: str
    attempts: int
    queued_at: float


class Exporter:
    """Delivers outbox rows to every non-shadow destination; see the module docstring.

    Parameters
    ----------
    db, config
        The index and the node configuration (destinations, retry schedule, batch size).
    senders
        Sender per destination name (tests); default :func:`make_sender` for each.
    clock
        Seconds since the epoch.
    rng
        Jitter source.
    poll_interval_s
        How often each destination's job looks for due rows; :meth:`wake` runs them now.
    """

    def __init__(
        self,
        db: Database,
        config: NodeConfig,
        senders: Mapping[str, Sender] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.db = db
        self.config = config
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.poll_interval_s = poll_interval_s
        self.active = [d for d in config.destinations if not is_shadow(d, config)]
        self.senders: dict[str, Sender] = dict(senders or {})
        for dest in self.active:
            if dest.name not in self.senders:
                self.senders[dest.name] = make_sender(dest, config)
        self._scheduler: BackgroundScheduler | None = None
        self._lock = threading.Lock()
        self._busy: dict[str, bool] = {}
        self._again: dict[str, bool] = {}
        self._outcomes: dict[tuple[str, str], int] = {}
        ensure_schema(db)

    # -- lifecycle --
    def start(self) -> None:
        """Recover interrupted rows, then start one polling job per active destination."""
        self.recover_sending()
        for dest in self.config.destinations:
            if is_shadow(dest, self.config):
                logger.info("destination %s is in shadow mode: results are held", dest.name)
        scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        for dest in self.active:
            scheduler.add_job(
                self._run_destination,
                IntervalTrigger(seconds=self.poll_interval_s, timezone=UTC),
                args=[dest.name],
                id=f"export:{dest.name}",
                next_run_time=datetime.now(UTC),
            )
        scheduler.start()
        self._scheduler = scheduler
        logger.info(
            "exporter started: %d active destinations (%s)",
            len(self.active),
            ", ".join(d.name for d in self.active) or "none",
        )

    def stop(self, wait: bool = True) -> None:
        """Stop the jobs; with ``wait`` the batch in flight finishes first."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
            self._scheduler = None

    def wake(self) -> None:
        """Look for due rows now (called by :class:`node.outbox.Outbox` after ``add``)."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        for dest in self.active:
            with self._lock:
                if self._busy.get(dest.name):
                    self._again[dest.name] = True
                    continue
            job = scheduler.get_job(f"export:{dest.name}")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    def recover_sending(self) -> int:
        """Rows left in ``sending`` by a crash go back to ``pending``."""
        return _recover_sending(self.db, self.clock)

    def _run_destination(self, name: str) -> None:
        with self._lock:
            self._busy[name] = True
            self._again[name] = False
        try:
            while True:
                claimed = self.deliver_batch(name)
                if claimed >= self.config.export.batch_size:
                    continue
                with self._lock:
                    if not self._again.get(name):
                        break
                    self._again[name] = False
        finally:
            with self._lock:
                self._busy[name] = False

    # -- one batch --
    def deliver_batch(self, name: str) -> int:
        """Claim, send and record one batch for destination ``name``; return rows claimed."""
        sender = self.senders.get(name)
        if sender is None:
            raise ValueError(f"destination {name!r} is not active (unknown or in shadow mode)")
        claimed = self._claim(name)
        if not claimed:
            return 0
        outcomes: dict[int, Outcome] = {}
        batch: list[tuple[int, Dataset]] = []
        for row in claimed:
            try:
                batch.append((row.id, pydicom.dcmread(self.config.state_dir / row.path)))
            except (OSError, InvalidDicomError) as exc:
                outcomes[row.id] = Outcome(Verdict.DEAD, f"outbox file unreadable: {exc}")
        if batch:
            try:
                outcomes.update(sender.send(batch))
            except Exception as exc:  # a sender bug must not leave rows in 'sending'
                logger.exception("sending to %s failed unexpectedly", name)
                for row_id, _ in batch:
                    outcomes.setdefault(row_id, Outcome(Verdict.RETRY, f"internal error: {exc!r}"))
        self._record(name, claimed, outcomes)
        return len(claimed)

    def drain(self, name: str, max_batches: int = 1000) -> int:
        """Deliver every due row of ``name`` now (tests, one-shot runs); return rows claimed."""
        total = 0
        for _ in range(max_batches):
            claimed = self.deliver_batch(name)
            total += claimed
            if claimed == 0:
                break
        return total

    def _claim(self, name: str) -> list[_Claimed]:
        now = self.clock()
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, generation, sop_instance_uid, path, attempts, queued_at "
                "FROM deliveries WHERE destination = ? AND state IN (?, ?) "
                "AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                (name, State.PENDING.value, State.FAILED.value, now, self.config.export.batch_size),
            ).fetchall()
            conn.executemany(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, updated_at = ? "
                "WHERE id = ?",
                [(State.SENDING.value, now, row["id"]) for row in rows],
            )
        return [
            _Claimed(
                id=row["id"],
                generation=row["generation"],
                sop_instance_uid=row["sop_instance_uid"],
                path=row["path"],
                attempts=row["attempts"] + 1,
                queued_at=row["queued_at"],
            )
            for row in rows
        ]

    def _record(
        self, name: str, claimed: Sequence[_Claimed], outcomes: Mapping[int, Outcome]
    ) -> None:
        now = self.clock()
        export = self.config.export
        horizon_s = export.retry_horizon_h * SECONDS_PER_HOUR
        counts = {v: 0 for v in Verdict}
        with self.db.transaction() as conn:
            for row in claimed:
                outcome = outcomes.get(row.id) or Outcome(Verdict.RETRY, "no outcome reported")
                verdict, reason = outcome.verdict, outcome.reason
                next_at = now
                if verdict is Verdict.RETRY:
                    deadline = row.queued_at + horizon_s
                    if now >= deadline:
                        verdict = Verdict.DEAD
                        reason = (
                            f"gave up after {row.attempts} attempts over "
                            f"{export.retry_horizon_h:g} h; last error: {reason}"
                        )
                    else:
                        delay = backoff_delay_s(
                            row.attempts, export.retry_initial_s, export.retry_max_s, self.rng
                        )
                        next_at = min(now + delay, deadline)
                state = {
                    Verdict.DONE: State.DONE,
                    Verdict.RETRY: State.FAILED,
                    Verdict.DEAD: State.DEAD,
                }[verdict]
                error = None if reason == "success" else reason
                conn.execute(
                    "UPDATE deliveries SET state = ?, last_error = ?, next_attempt_at = ?, "
                    "updated_at = ?, done_at = ? "
                    "WHERE id = ? AND generation = ? AND state = ?",
                    (
                        state.value,
                        error,
                        next_at,
                        now,
                        now if state is State.DONE else None,
                        row.id,
                        row.generation,
                        State.SENDING.value,
                    ),
                )
                counts[verdict] += 1
                if verdict is Verdict.DEAD:
                    logger.warning(
                        "delivery of %s to %s dead-lettered: %s", row.sop_instance_uid, name, reason
                    )
                elif verdict is Verdict.RETRY:
                    logger.warning(
                        "delivery of %s to %s failed (attempt %d), retry in %.0f s: %s",
                        row.sop_instance_uid,
                        name,
                        row.attempts,
                        next_at - now,
                        reason,
                    )
        with self._lock:
            for verdict, n in counts.items():
                key = (name, verdict.value)
                self._outcomes[key] = self._outcomes.get(key, 0) + n
        logger.info(
            "export to %s: %d done, %d to retry, %d dead",
            name,
            counts[Verdict.DONE],
            counts[Verdict.RETRY],
            counts[Verdict.DEAD],
        )

    def outcome_counts(self) -> dict[tuple[str, str], int]:
        """Attempts recorded by this process: ``{(destination, verdict): n}``."""
        with self._lock:
            return dict(self._outcomes)


# -- metrics ------------------------------------------------------------------------


class DeliveryCollector(Collector):
    """Prometheus collector: deliveries per destination and state (from the index, so it
    is true across restarts) and attempt outcomes recorded by this process."""

    def __init__(self, db: Database, exporter: Exporter | None = None) -> None:
        self.db = db
        self.exporter = exporter

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauge = GaugeMetricFamily(
            "lumbar_deliveries",
            "Result deliveries per destination and state (pending, sending, done, failed, dead, held)",
            labels=["destination", "state"],
        )
        for dest, per in sorted(delivery_counts(self.db).items()):
            for state, n in sorted(per.items()):
                gauge.add_metric([dest, state], n)
        yield gauge
        counter = CounterMetricFamily(
            "lumbar_delivery_attempts",
            "Delivery attempts by destination and outcome (done, retry, dead) since start",
            labels=["destination", "outcome"],
        )
        if self.exporter is not None:
            for (dest, verdict), n in sorted(self.exporter.outcome_counts().items()):
                counter.add_metric([dest, verdict], n)
        yield counter


#: collector registered per registry (by id), so that re-registering replaces it
_REGISTERED: dict[int, DeliveryCollector] = {}


def register_metrics(
    db: Database, exporter: Exporter | None = None, registry: CollectorRegistry | None = None
) -> DeliveryCollector:
    """Register the delivery metrics on ``registry`` (default: :data:`node.metrics.REGISTRY`,
    served at ``/metrics``), replacing one registered before."""
    from node import metrics

    target = registry if registry is not None else metrics.REGISTRY
    previous = _REGISTERED.pop(id(target), None)
    if previous is not None:  # a second server in the same process (tests) replaces the first
        target.unregister(previous)
    collector = DeliveryCollector(db, exporter)
    target.register(collector)
    _REGISTERED[id(target)] = collector
    return collector
