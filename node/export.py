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
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import pydicom
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, DestinationTls, NodeConfig
from node.db import Database
from node.outbox import KIND_BY_SOP_CLASS, Kind, State, delivery_counts, ensure_schema, is_shadow
from node.outbox import recover_sending as _recover_sending
from node.reactor import use_race_free_requestors

logger = logging.getLogger(__name__)

#: uncompressed transfer syntaxes proposed for every result class (preferred first)
UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: lossless compressed syntaxes proposed (one context each) for the image classes, so a
#: compressed outbox file is sent as it is when the peer accepts its syntax
LOSSLESS_SYNTAXES: tuple[str, ...] = (
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
)
#: proposed in its own context for every class: a deflated outbox file (a BINARY SEG
#: shrinks 20-50 fold) goes as it is where accepted, else it is inflated on the fly
DEFLATED_SYNTAX: str = DeflatedExplicitVRLittleEndian
#: the SOP classes with pixel data (SEG, Secondary Capture); SR has none
IMAGE_KINDS = frozenset({Kind.SEG, Kind.OVERLAY})
#: TCP connect timeout (s) to a destination
CONNECT_TIMEOUT_S = 10.0
#: how often (s) each destination's job looks for due deliveries
POLL_INTERVAL_S = 2.0
#: lower bound of the jitter factor applied to the exponential delay (equal jitter)
JITTER_LOW = 0.5
SECONDS_PER_HOUR = 3600.0


def export_contexts() -> list[tuple[str, tuple[str, ...]]]:
    """Presentation contexts the exporter proposes: ``[(SOP class UID, transfer syntaxes)]``.

    One context per SOP class with the uncompressed syntaxes (explicit VR little endian
    preferred, implicit VR little endian as fallback), one with Deflated Explicit VR
    Little Endian, and for the image classes one context per lossless compressed syntax.
    This is the table in ``docs/conformance.md``.
    """
    contexts: list[tuple[str, tuple[str, ...]]] = []
    for sop_class, kind in KIND_BY_SOP_CLASS.items():
        contexts.append((sop_class, UNCOMPRESSED_SYNTAXES))
        contexts.append((sop_class, (DEFLATED_SYNTAX,)))
        if kind in IMAGE_KINDS:
            contexts.extend((sop_class, (ts,)) for ts in LOSSLESS_SYNTAXES)
    return contexts


# -- outcomes ------------------------------------------------------------------------


class Verdict(StrEnum):
    """What happens to a delivery after an attempt."""

    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt to deliver one instance; ``reason`` is for people."""

    verdict: Verdict
    reason: str


#: DIMSE failure statuses that will not change on retry (PS3.4 B.2.3, PS3.7 C)
PERMANENT_STATUSES: dict[int, str] = {
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "refused: not authorised",
    0x0111: "duplicate SOP instance refused",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}
#: DIMSE failure statuses worth retrying
TRANSIENT_STATUSES: dict[int, str] = {
    0x0110: "processing failure",
    0x0210: "duplicate invocation",
    0x0213: "resource limitation",
    0xFE00: "cancelled",
}


def classify_store_status(status: int, comment: str | None = None) -> Outcome:
    """Turn a C-STORE (or STOW-RS FailureReason) status into an :class:`Outcome`.

    Success (0x0000) and warnings (0x0001, 0xBxxx) are done; 0xA7xx (out of resources)
    and the statuses in :data:`TRANSIENT_STATUSES` are retried; 0xA9xx (data set does not
    match SOP class), 0xCxxx (cannot understand) and :data:`PERMANENT_STATUSES` are dead at
    once. An unknown failure is retried (and dead-lettered at the retry horizon).
    """
    suffix = f" ({comment})" if comment else ""
    code = f"0x{status:04X}"
    if status == 0x0000:
        return Outcome(Verdict.DONE, "success")
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return Outcome(Verdict.DONE, f"stored with warning {code}{suffix}")
    if status in PERMANENT_STATUSES:
        return Outcome(Verdict.DEAD, f"refused {code}: {PERMANENT_STATUSES[status]}{suffix}")
    if 0xA900 <= status <= 0xA9FF:
        return Outcome(Verdict.DEAD, f"refused {code}: data set does not match SOP class{suffix}")
    if 0xC000 <= status <= 0xCFFF:
        return Outcome(Verdict.DEAD, f"refused {code}: cannot understand{suffix}")
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(Verdict.RETRY, f"refused {code}: out of resources{suffix}")
    if status in TRANSIENT_STATUSES:
        return Outcome(Verdict.RETRY, f"failed {code}: {TRANSIENT_STATUSES[status]}{suffix}")
    return Outcome(Verdict.RETRY, f"failed with unknown status {code}{suffix}")


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


# -- senders ------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What a destination answered to a test connection (``lumbar-node check``).

    ``reachable`` is False when no association / HTTP answer came back (``detail`` says
    why); ``accepted`` holds the SOP classes the peer accepted a presentation context for
    (DICOM destinations), ``echo`` its C-ECHO status (None when it did not answer one).
    """

    reachable: bool
    detail: str
    accepted: frozenset[str] = frozenset()
    echo: int | None = None


class Sender(Protocol):
    """Sends one batch to one destination and says what happened to each instance."""

    def send(self, batch: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
        """``batch`` is ``[(delivery id, dataset)]``; return an outcome for every id."""
        ...

    def probe(self) -> Probe:
        """Connect as a delivery would and say what the peer answered; send nothing."""
        ...


def ssl_context_for(tls: DestinationTls) -> ssl.SSLContext:
    """A client TLS context (TLS >= 1.2) that verifies the peer against ``tls.ca_file``
    (system CAs when unset) and presents ``cert_file``/``key_file`` when given."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def _sop_name(uid: str) -> str:
    return f"{UID(uid).name} ({uid})"


class DicomSender:
    """C-STORE SCU for one ``type = "dicom"`` destination: one association per batch.

    Parameters
    ----------
    destination
        AE title, host, port and optional TLS of the peer.
    calling_ae
        The node's own AE title.
    acse_timeout_s, dimse_timeout_s, network_timeout_s
        pynetdicom timeouts (s) for association set-up, each response, and silence.
    """

    def __init__(
        self,
        destination: Destination,
        calling_ae: str,
        acse_timeout_s: float = 30.0,
        dimse_timeout_s: float = 60.0,
        network_timeout_s: float = 60.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if destination.type != "dicom" or destination.host is None or destination.port is None:
            raise ValueError(f"destination {destination.name!r} is not a DICOM destination")
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeouts = (acse_timeout_s, dimse_timeout_s, network_timeout_s, connect_timeout_s)
        self.ssl_context = ssl_context_for(destination.tls) if destination.tls else None

    def _application_entity(self) -> AE:
        use_race_free_requestors()
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout, ae.connection_timeout = self.timeouts
        for sop_class, syntaxes in export_contexts():
            ae.add_requested_context(sop_class, list(syntaxes))
        return ae

    def send(self, batch: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
        """Send ``batch`` over one association; see the module docstring for outcomes."""
        assoc, failure = self._associate(self._application_entity())
        if assoc is None:
            assert failure is not None
            return {row_id: failure for row_id, _ in batch}
        _set_nodelay(assoc)
        outcomes: dict[int, Outcome] = {}
        try:
            for row_id, ds in batch:
                outcomes[row_id] = self._store_one(assoc, ds)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    def probe(self) -> Probe:
        """Associate as a delivery would (plus Verification), C-ECHO, release; send nothing.

        Tells an administrator before the first result whether the peer is reachable,
        knows the node's AE title and takes the result classes (many archives refuse SEG).
        """
        ae = self._application_entity()
        ae.add_requested_context(Verification)
        assoc, failure = self._associate(ae)
        if assoc is None:
            assert failure is not None
            return Probe(False, failure.reason)
        try:
            accepted = frozenset(str(cx.abstract_syntax) for cx in assoc.accepted_contexts)
            echo: int | None = None
            if Verification in accepted:
                status = assoc.send_c_echo()
                echo = int(status.Status) if status and "Status" in status else None
        finally:
            if assoc.is_established:
                assoc.release()
        dest = self.destination
        return Probe(True, f"association accepted by {dest.ae_title}@{dest.host}:{dest.port}",
                     accepted - {Verification}, echo)

    def _associate(self, ae: AE) -> tuple[Association | None, Outcome | None]:
        """An established association with the destination, or None and why not."""
        dest = self.destination
        assert dest.host is not None and dest.port is not None and dest.ae_title is not None
        received: list[Any] = []

        def on_acse(event: evt.Event) -> None:
            received.append(getattr(event, "primitive", None))

        tls_args = (self.ssl_context, dest.host) if self.ssl_context is not None else None
        try:
            assoc = ae.associate(
                dest.host,
                dest.port,
                ae_title=dest.ae_title,
                tls_args=tls_args,
                evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
            )
        except (OSError, ssl.SSLError) as exc:
            return None, Outcome(Verdict.RETRY, f"cannot connect to {dest.host}:{dest.port}: {exc}")
        if not assoc.is_established:
            return None, self._not_established(assoc, received)
        return assoc, None

    def _not_established(self, assoc: Association, received: list[Any]) -> Outcome:
        dest = self.destination
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        for primitive in received:
            result = getattr(primitive, "result", None)
            if result == 0x01:
                return Outcome(
                    Verdict.DEAD,
                    f"association rejected (permanent) by {where}: "
                    f"{primitive.source_str}, {primitive.reason_str}",
                )
            if result == 0x02:
                return Outcome(
                    Verdict.RETRY,
                    f"association rejected (transient) by {where}: "
                    f"{primitive.source_str}, {primitive.reason_str}",
                )
            if result == 0x00:
                return Outcome(
                    Verdict.DEAD,
                    f"{where} accepted none of the proposed presentation contexts "
                    "(SEG, SR, Secondary Capture)",
                )
        return Outcome(
            Verdict.RETRY,
            f"cannot associate with {where} (connection refused, timeout, abort or TLS failure)",
        )

    def _store_one(self, assoc: Association, ds: Dataset) -> Outcome:
        if not assoc.is_established:
            return Outcome(Verdict.RETRY, "association lost before this instance was sent")
        sop_class = str(ds.SOPClassUID)
        contexts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
        if not contexts:
            return Outcome(
                Verdict.DEAD,
                f"peer accepted no presentation context for {_sop_name(sop_class)}",
            )
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if syntax.is_compressed and all(cx.transfer_syntax[0] != syntax for cx in contexts):
            try:
                ds.decompress()
            except (RuntimeError, ValueError, NotImplementedError, AttributeError) as exc:
                return Outcome(
                    Verdict.DEAD,
                    f"peer does not accept {syntax.name} and decompression failed: {exc}",
                )
        try:
            status = assoc.send_c_store(ds)
        except ValueError as exc:
            return Outcome(Verdict.DEAD, f"cannot send {_sop_name(sop_class)}: {exc}")
        except (RuntimeError, OSError) as exc:
            return Outcome(Verdict.RETRY, f"association failed while sending: {exc}")
        code = getattr(status, "Status", None)
        if code is None:
            return Outcome(
                Verdict.RETRY, "no C-STORE response (association aborted or DIMSE timeout)"
            )
        comment = status.get("ErrorComment")
        return classify_store_status(int(code), str(comment) if comment else None)


def _set_nodelay(assoc: Association) -> None:
    """Disable Nagle on the association's socket (30 -> ~100 instances/s on loopback)."""
    transport = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if transport is not None:
        transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_sender(destination: Destination, config: NodeConfig) -> Sender:
    """The sender for ``destination`` (C-STORE SCU or STOW-RS client)."""
    if destination.type == "stow":
        from node.stow import StowSender

        return StowSender(destination, timeout_s=config.node.network_timeout_s)
    return DicomSender(
        destination,
        calling_ae=config.node.ae_title,
        acse_timeout_s=config.node.acse_timeout_s,
        dimse_timeout_s=config.node.dimse_timeout_s,
        network_timeout_s=config.node.network_timeout_s,
    )


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
