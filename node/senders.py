"""How a batch of result instances reaches one peer: the C-STORE sender and what an attempt means.

The delivery loop (:class:`node.export.Exporter`) claims rows and records outcomes; this
module owns the other half: the presentation contexts proposed (the SCU table of
``docs/conformance.md``), the association with a ``type = "dicom"`` destination
(:class:`DicomSender`, one association per batch, TLS optional), and the classification of
every answer into an :class:`Outcome` (done, retry, dead) that STOW-RS (:mod:`node.stow`)
shares. :meth:`DicomSender.probe` is the same association without a store, for
``lumbar-node check``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pydicom.dataset import Dataset
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
from node.outbox import KIND_BY_SOP_CLASS, Kind
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
