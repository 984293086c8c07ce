"""C-ECHO and C-STORE SCP: thin handlers, caller policy, limits, disk floor.

Store before ACK: the C-STORE handler answers success only after the received bytes are
durable in the spool (:mod:`node.spool`) and indexed in one committed transaction
(:mod:`node.instances`). Everything slow (series assembly, analysis, export) happens
elsewhere: the handler hands the new :class:`~node.instances.InstanceRecord` to the
``on_stored`` callback, which must return at once.

The listener accepts every storage SOP class in negotiation, so that a non-image object
(an SR, a PDF...) gets a clear failure status from the handler instead of a bare
"no presentation context" on the sender's side; only the image classes in
:data:`IMAGE_SOP_CLASSES` are stored.

The listener itself (accept loop, TLS handshake, connection limits) is
:mod:`node.listener`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import ipaddress
import logging
import sqlite3
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import metrics
from node.config import CallersSection, NodeConfig, TlsSection
from node.db import Database
from node.instances import (
    InstanceRecord,
    count_series_instances,
    insert_instance,
    instance_exists,
    summarize,
)
from node.listener import PDU_SLACK_BYTES, NodeAssociationServer, SlotCountingAE
from node.reactor import EventDrivenRequestHandler
from node.spool import Spool
from node.statuses import Status

logger = logging.getLogger(__name__)

#: image storage SOP classes the node stores (everything else: SOP_CLASS_NOT_SUPPORTED)
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
}

#: transfer syntaxes accepted (all decodable later with pylibjpeg / gdcm)
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_NATIVE_SYNTAXES = frozenset(TRANSFER_SYNTAXES[:4])

#: A-ASSOCIATE-RJ (result, source, diagnostic): permanent, service user, calling AE unknown
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
#: A-ASSOCIATE-RJ: permanent, service user, called AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
#: lock stripes serialising concurrent stores of the same SOP Instance UID
_LOCK_STRIPES = 64
BITS_PER_BYTE = 8
#: OSError numbers that mean "no space": answered 0xA700 (out of resources), not 0x0110
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

StoredCallback = Callable[[InstanceRecord], None]


@dataclass(frozen=True)
class StoreOutcome:
    """What the handler answered and why (``reason`` is a metric label, no UIDs)."""

    status: Status
    reason: str
    record: InstanceRecord | None = None


def server_tls_context(tls: TlsSection) -> ssl.SSLContext:
    """The TLS listener's context (TLS >= 1.2; client certificates per ``tls``)."""
    assert tls.cert_file is not None and tls.key_file is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class CallerPolicy:
    """Who may associate: loopback callers (if allowed) and listed remote AE titles."""

    def __init__(self, callers: CallersSection, node_ae_title: str, check_called_ae: bool) -> None:
        self._callers = callers
        self._node_ae = node_ae_title.strip()
        self._check_called = check_called_ae

    def check(self, calling_ae: str, called_ae: str, address: str) -> str | None:
        """None when the association may proceed, else the reason for rejecting it."""
        calling = calling_ae.strip()
        if self._check_called and called_ae.strip() != self._node_ae:
            return f"called AE title {called_ae.strip()!r} is not {self._node_ae!r}"
        if self._callers.allow_any_loopback and is_loopback(address):
            return None
        for entry in self._callers.allowed:
            if entry.ae_title.strip() != calling:
                continue
            if entry.address is None or _same_ip(entry.address, address):
                return None
            return f"calling AE {calling!r} is listed for {entry.address}, not {address}"
        return f"calling AE {calling!r} from {address} is not in callers.allowed"

    def is_called_ae_failure(self, reason: str) -> bool:
        """True when ``reason`` came from the called-AE check."""
        return reason.startswith("called AE title")


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False


class Receiver:
    """The DICOM listener(s) of the node and their C-ECHO / C-STORE handlers.

    Parameters
    ----------
    config
        The node configuration.
    db
        The index (the ``instances`` schema must exist).
    spool
        Where instance files go.
    on_stored
        Called on the association thread with each newly stored instance (not for
        duplicates); must return at once (schedule work, do not do it).
    """

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        spool: Spool,
        on_stored: StoredCallback | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.on_stored = on_stored
        self.policy = CallerPolicy(
            config.callers, config.node.ae_title, config.node.check_called_ae
        )
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._servers: list[NodeAssociationServer] = []
        self._threads: list[threading.Thread] = []
        self._accepting = False
        self._tallies: weakref.WeakKeyDictionary[Association, Counter[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._tallies_lock = threading.Lock()
        self.ae = self._make_ae()

    # -- set-up ------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        node = self.config.node
        ae = SlotCountingAE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        # The called AE check is done by CallerPolicy (with a logged reason).
        ae.require_called_aet = False
        ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES[:4]))
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
        return ae

    def handlers(self) -> list[Any]:
        """pynetdicom event handlers bound to every association."""
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
        ]

    def start(self) -> None:
        """Open the plain listener and, if configured, the TLS listener."""
        node = self.config.node
        self._start_server(node.port, None)
        if self.config.tls.enabled:
            self._start_server(self.config.tls.port, server_tls_context(self.config.tls))
        self._accepting = True

    def _start_server(self, port: int, tls: ssl.SSLContext | None) -> None:
        node = self.config.node
        server = self.ae.make_server(
            (node.host, port),
            ae_title=node.ae_title,
            evt_handlers=self.handlers(),
            server_class=NodeAssociationServer,
            request_handler=EventDrivenRequestHandler,  # no 1 ms polling (node.reactor)
        )
        assert isinstance(server, NodeAssociationServer)
        server.tls_context = tls
        server.handshake_timeout_s = node.acse_timeout_s
        server.max_pdu_read = node.max_pdu + PDU_SLACK_BYTES
        server.max_message_bytes = node.max_instance_mb * 1024 * 1024
        server.max_pending = node.max_pending_connections
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"dicom-listener-{port}",
            daemon=True,
        )
        thread.start()
        self.ae._servers.append(server)  # so AE.active_associations sees its associations
        self._servers.append(server)
        self._threads.append(thread)
        logger.info(
            "DICOM listener %s on %s:%d (%s)",
            node.ae_title,
            node.host,
            server.server_address[1],
            "TLS" if tls is not None else "plain TCP",
        )

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        """True while the listener threads accept connections."""
        return self._accepting and all(t.is_alive() for t in self._threads)

    @property
    def ports(self) -> list[int]:
        """Bound ports (plain first, then TLS)."""
        return [int(s.server_address[1]) for s in self._servers]

    def active_associations(self) -> list[Association]:
        """Associations currently running on this receiver's listeners."""
        found: list[Association] = []
        for server in self._servers:
            found.extend(server.active_associations)
        return found

    def stop_accepting(self) -> None:
        """Close the listening sockets; running associations continue."""
        self._accepting = False
        for server in self._servers:
            server.shutdown()  # stops serve_forever and closes the listening socket
        for thread in self._threads:
            thread.join(timeout=5.0)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no association runs; False if some still run at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            active = self.active_associations()
            if not active:
                return True
            if time.monotonic() >= deadline:
                return False
            for assoc in active:
                assoc.join(timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    def abort_all(self) -> int:
        """Abort every running association (forced shutdown); return how many."""
        active = self.active_associations()
        for assoc in active:
            assoc.abort()
        return len(active)

    # -- association events -------------------------------------------------------------
    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title) if primitive is not None else ""
        called = str(primitive.called_ae_title) if primitive is not None else ""
        address = assoc.requestor.address
        reason = self.policy.check(calling, called, address)
        if reason is None:
            return
        logger.warning("association rejected: %s", reason)
        metrics.ASSOCIATIONS.labels(result="rejected").inc()
        rsd = REJECT_CALLED_AE if self.policy.is_called_ae_failure(reason) else REJECT_CALLING_AE
        assoc.acse.send_reject(*rsd)
        # as pynetdicom does after its own rejections: wait until the DUL has sent the
        # A-ASSOCIATE-RJ, else the socket closes first and the peer only sees an abort
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        metrics.ASSOCIATIONS.labels(result="accepted").inc()
        logger.info("association accepted from %s@%s", requestor.ae_title, requestor.address)

    def _on_aborted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.warning(
            "association from %s@%s aborted after %s",
            requestor.ae_title,
            requestor.address,
            self._tally_text(event.assoc),
        )

    def _on_released(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.info(
            "association from %s@%s released: %s",
            requestor.ae_title,
            requestor.address,
            self._tally_text(event.assoc),
        )

    def _tally(self, assoc: Association, outcome: str) -> None:
        with self._tallies_lock:
            self._tallies.setdefault(assoc, Counter())[outcome] += 1

    def _tally_text(self, assoc: Association) -> str:
        with self._tallies_lock:
            tally = self._tallies.pop(assoc, Counter())
        return ", ".join(f"{n} {k}" for k, n in sorted(tally.items())) or "no instances"

    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        try:
            outcome = self.store(
                data=event.encoded_dataset(),
                sop_class_uid=str(event.request.AffectedSOPClassUID or ""),
                sop_instance_uid=sop_uid,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae=str(event.assoc.requestor.ae_title).strip(),
                peer_address=str(event.assoc.requestor.address),
            )
        except Exception:  # noqa: BLE001 - the SCP answers a failure status, never crashes
            logger.exception("C-STORE of %s failed", sop_uid)
            outcome = StoreOutcome(Status.PROCESSING_FAILURE, "internal_error")
        finally:
            metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        self._tally(event.assoc, outcome.reason)
        if outcome.status is Status.SUCCESS:
            metrics.INSTANCES_RECEIVED.labels(outcome=outcome.reason).inc()
        else:
            metrics.INSTANCES_REJECTED.labels(reason=outcome.reason).inc()
        return int(outcome.status)

    def instance_lock(self, sop_instance_uid: str) -> threading.Lock:
        """The lock held from "is this UID stored?" until it is indexed (or refused).

        Whoever removes an instance (``node.retention``) holds it too, so a C-STORE of the
        same UID never sees a row that is about to go, nor loses a file it just wrote.
        """
        stripe = int(
            hashlib.sha1(sop_instance_uid.encode(), usedforsecurity=False).hexdigest()[:8], 16
        )
        return self._locks[stripe % _LOCK_STRIPES]

    # -- the store path (callable without a network, for tests) ------------------------------
    def store(
        self,
        data: bytes,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str | None,
        peer_address: str | None,
    ) -> StoreOutcome:
        """Validate, persist and index one received instance; the status to answer."""
        node = self.config.node
        if self.spool.free_mb() < node.free_disk_floor_mb:
            logger.error(
                "refusing %s: free disk below node.free_disk_floor_mb=%d MB",
                sop_instance_uid,
                node.free_disk_floor_mb,
            )
            return StoreOutcome(Status.OUT_OF_RESOURCES, "disk_floor")
        if sop_class_uid not in IMAGE_SOP_CLASSES:
            logger.warning(
                "refusing %s: SOP class %s is not an image class the node stores",
                sop_instance_uid,
                sop_class_uid,
            )
            return StoreOutcome(Status.SOP_CLASS_NOT_SUPPORTED, "sop_class")
        ds, why = _parse(data)
        if ds is None:
            logger.warning("refusing %s: cannot parse the data set (%s)", sop_instance_uid, why)
            return StoreOutcome(Status.CANNOT_UNDERSTAND, "unparseable")
        problem = _check_dataset(
            ds, sop_class_uid, sop_instance_uid, transfer_syntax_uid, node.max_pixels_per_frame
        )
        if problem is not None:
            reason, text = problem
            logger.warning("refusing %s: %s", sop_instance_uid, text)
            status = (
                Status.CANNOT_UNDERSTAND
                if reason == "truncated"
                else Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
            )
            return StoreOutcome(status, reason)
        study_uid = str(ds.StudyInstanceUID).strip()
        series_uid = str(ds.SeriesInstanceUID).strip()
        with self.instance_lock(sop_instance_uid):
            if instance_exists(self.db, sop_instance_uid):
                logger.info("duplicate %s ignored (first copy kept)", sop_instance_uid)
                return StoreOutcome(Status.SUCCESS, "duplicate")
            if count_series_instances(self.db, series_uid) >= node.max_instances_per_series:
                logger.error(
                    "refusing %s: series %s reached node.max_instances_per_series=%d",
                    sop_instance_uid,
                    series_uid,
                    node.max_instances_per_series,
                )
                return StoreOutcome(Status.OUT_OF_RESOURCES, "series_limit")
            try:
                stored = self.spool.write(study_uid, series_uid, sop_instance_uid, data)
            except OSError as exc:
                if exc.errno not in _DISK_FULL_ERRNOS:
                    raise
                logger.error("refusing %s: the disk is full (%s)", sop_instance_uid, exc.strerror)
                return StoreOutcome(Status.OUT_OF_RESOURCES, "disk_full")
            record = InstanceRecord(
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                path=stored.relative_path,
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
                calling_ae=calling_ae,
                peer_address=peer_address,
                received_at=time.time(),
                modality=_modality(ds),
                meta=summarize(ds),
            )
            try:
                inserted = insert_instance(self.db, record)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                    raise
                self.spool.remove(stored.relative_path)  # not indexed: not acknowledged
                logger.error(
                    "refusing %s: the index cannot grow, the disk is full", sop_instance_uid
                )
                return StoreOutcome(Status.OUT_OF_RESOURCES, "disk_full")
            if not inserted:
                return StoreOutcome(Status.SUCCESS, "duplicate")
        metrics.RECEIVED_BYTES.inc(stored.size_bytes)
        logger.debug(
            "stored %s (series %s, %d bytes) from %s",
            sop_instance_uid,
            series_uid,
            stored.size_bytes,
            calling_ae,
        )
        if self.on_stored is not None:
            try:
                self.on_stored(record)
            except Exception:  # noqa: BLE001 - the instance is durable; start-up recovery re-reads the index
                logger.exception("on_stored callback failed for %s", sop_instance_uid)
        return StoreOutcome(Status.SUCCESS, "stored", record)


def _parse(data: bytes) -> tuple[Dataset | None, str]:
    try:
        return dcmread(io.BytesIO(data), force=False), ""
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        OSError,
        NotImplementedError,
    ) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _uid(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword) or "").strip()
    except (ValueError, TypeError):
        return ""


def _check_dataset(
    ds: Dataset,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    max_pixels: int,
) -> tuple[str, str] | None:
    """(metric reason, log text) when the data set cannot be stored, else None."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not _uid(ds, keyword):
            return "missing_uid", f"{keyword} is missing or empty"
    if _uid(ds, "SOPInstanceUID") != sop_instance_uid.strip():
        return "uid_mismatch", "SOPInstanceUID differs from the C-STORE request's"
    if _uid(ds, "SOPClassUID") != sop_class_uid.strip():
        return (
            "uid_mismatch",
            f"SOPClassUID {_uid(ds, 'SOPClassUID')} differs from the C-STORE request's",
        )
    try:
        rows = int(ds.get("Rows") or 0)
        columns = int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 0)
    except (TypeError, ValueError) as exc:
        return "bad_image_attributes", f"unreadable image attributes: {exc}"
    if rows <= 0 or columns <= 0 or bits <= 0:
        return "bad_image_attributes", "Rows, Columns or BitsAllocated missing"
    if rows * columns > max_pixels:
        return "pixel_limit", f"{rows}x{columns} exceeds node.max_pixels_per_frame={max_pixels}"
    if "PixelData" not in ds:
        return "truncated", "no PixelData (truncated or not an image)"
    if transfer_syntax_uid in _NATIVE_SYNTAXES:
        expected = (rows * columns * samples * frames * bits + BITS_PER_BYTE - 1) // BITS_PER_BYTE
        actual = len(ds.PixelData or b"")
        if actual < expected:
            return "truncated", f"PixelData has {actual} bytes, {expected} expected"
        if actual > expected + expected % 2:  # only a pad byte to even length may follow
            return (
                "pixel_length",
                f"PixelData has {actual} bytes, {expected} expected (Rows/Columns/BitsAllocated wrong?)",
            )
    return None


def _modality(ds: Dataset) -> str | None:
    value = ds.get("Modality")
    return str(value).strip() or None if value is not None else None
