"""The node's Prometheus metrics: one registry, served at ``/metrics`` by :mod:`node.http`.

Other modules add their own metrics to :data:`REGISTRY`::

    from node import metrics
    DELIVERIES = metrics.counter("deliveries_total", "Deliveries by result", ["result"])
    DELIVERIES.labels(result="sent").inc()

Names get the ``lumbar_`` prefix. Labels must never carry UIDs or patient data: use
small fixed sets of values (a reason, a state, a stage). Every metric here is defined at
import time so that ``/metrics`` lists it (with zero) before the first event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "lumbar_"
#: C-STORE handler durations (s): store-before-ACK costs an fsync or three
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: job stage durations (s): analysis of a series takes seconds to minutes on CPU
STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
    """A counter named ``lumbar_<name>`` in the node's registry."""
    return Counter(PREFIX + name, documentation, labelnames=list(labelnames), registry=REGISTRY)


def gauge(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
    """A gauge named ``lumbar_<name>`` in the node's registry."""
    return Gauge(PREFIX + name, documentation, labelnames=list(labelnames), registry=REGISTRY)


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    buckets: Sequence[float] = STAGE_BUCKETS,
) -> Histogram:
    """A histogram named ``lumbar_<name>`` in the node's registry (seconds)."""
    return Histogram(
        PREFIX + name,
        documentation,
        labelnames=list(labelnames),
        buckets=list(buckets),
        registry=REGISTRY,
    )


# -- receiving (node.receiver) ------------------------------------------------------------
INSTANCES_RECEIVED = counter(
    "instances_received_total",
    "C-STORE requests answered with success, by outcome (stored, duplicate)",
    ["outcome"],
)
INSTANCES_REJECTED = counter(
    "instances_rejected_total",
    "C-STORE requests answered with a failure status, by reason",
    ["reason"],
)
RECEIVED_BYTES = counter("received_bytes_total", "Bytes of newly stored instances")
RETENTION_REMOVED = counter(
    "retention_removed_total",
    "Finished series, their received instances, and set-aside spool files removed by retention ([retention] keep_days)",
    ["what"],
)
STORE_SECONDS = histogram(
    "cstore_handler_seconds",
    "Time in the C-STORE handler (validate, persist, index)",
    buckets=STORE_BUCKETS,
)
ASSOCIATIONS = counter(
    "associations_total",
    "Association requests by result (accepted, rejected, handshake_failed)",
    ["result"],
)
ACTIVE_ASSOCIATIONS = gauge("associations_active", "Associations running now")
FREE_DISK_MB = gauge("free_disk_megabytes", "Free space on the state directory's file system (MB)")
SET_ASIDE_FILES = gauge(
    "set_aside_files", "Spool files without an index row set aside at start-up (node.orphans); alert above 0"
)

# -- series, routing, jobs (node.series, node.routing, node.jobs) ------------------------
SERIES_COMPLETED = counter(
    "series_completed_total", "Series found complete after their quiet period"
)
SERIES_SKIPPED = counter(
    "series_skipped_total", "Complete series not analysed, by routing reason", ["reason"]
)
JOBS = gauge("jobs", "Jobs by state", ["state"])
JOB_STAGE_SECONDS = histogram("job_stage_seconds", "Duration of a job stage", ["stage"])


def set_live(gauge_: Gauge, read: Callable[[], float]) -> None:
    """Make ``gauge_`` read its value from ``read()`` at every scrape."""
    gauge_.set_function(read)


def render() -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(REGISTRY)
