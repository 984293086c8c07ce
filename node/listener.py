"""The node's DICOM listener: an accept loop that never blocks, and its connection limits.

pynetdicom 3.0.4 wraps TLS sockets in its accept thread, so one client that connects and
never finishes the handshake blocks every new association. Here the accept loop only
accepts; the TLS handshake (bounded by ``node.acse_timeout_s``) runs in the
per-connection thread. Plain TCP connections that never send an association request are
closed after ``node.acse_timeout_s``; established but idle associations after
``node.network_timeout_s``. Connections count against ``node.max_associations`` only once
they asked to associate, and at most ``node.max_pending_connections`` may wait to.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from node import metrics

logger = logging.getLogger(__name__)

#: bytes a PDU may exceed the advertised maximum length by (PDV item headers)
PDU_SLACK_BYTES = 1024


class SlotCountingAE(AE):
    """An AE whose ``node.max_associations`` counts only peers that asked to associate.

    pynetdicom counts every accepted TCP connection, so N silent connections (port scans,
    half-open peers, a slow client) would have a legitimate modality rejected with "local
    limit exceeded" until their ACSE timeout. A connection takes a slot once its
    A-ASSOCIATE-RQ has arrived and gives it back as soon as it is released or aborted (the
    association thread lives on a moment after that, and a modality that sends one
    association per file re-associates at once).

    The threads are matched against pynetdicom's base ``Association`` class here:
    pynetdicom's own property matches the module name ``pynetdicom.ae.Association``,
    which :func:`node.reactor.use_race_free_requestors` rebinds to a subclass.
    """

    @property
    def active_associations(self) -> list[Association]:
        return [
            a
            for a in threading.enumerate()
            if isinstance(a, Association)
            and a.ae is self
            and (
                not a.is_acceptor
                or (a.requestor.primitive is not None and not (a.is_released or a.is_aborted))
            )
        ]


def _waiting_for_request(assoc: Association) -> bool:
    """True from the association's start until its A-ASSOCIATE-RQ arrives or its peer goes.

    A peer that went away ends the DUL thread (pynetdicom then leaves the association
    thread waiting up to ``acse_timeout_s``); before the DUL has started the connection is
    still waiting. Computed from the association's own state each time, so no count can
    leak.
    """
    if not assoc.is_alive() or assoc.requestor.primitive is not None:
        return False
    return not assoc._started_dul or assoc.dul.is_alive()


class NodeAssociationServer(ThreadedAssociationServer):
    """Association server whose accept loop never blocks on a client.

    ``tls_context`` (not pynetdicom's ``ssl_context``, which would wrap in the accept
    thread) is applied in the per-connection thread with a handshake deadline.
    """

    daemon_threads = True
    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    #: longest PDU read (node.reactor.BoundedAssociationSocket; at least 1 MiB)
    max_pdu_read: int = 0
    #: largest DIMSE message accepted before the association is aborted (bytes)
    max_message_bytes: int = 0
    #: connections without an A-ASSOCIATE-RQ yet, beyond which new ones are closed at once
    max_pending: int = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._starting = 0  # accepted, association thread not yet running (TLS handshake...)
        #: guards ``_starting`` and the hand-over of a connection from it to its association
        self._starting_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a connection while :attr:`max_pending` others have not asked to associate.

        Each connection costs a thread until its A-ASSOCIATE-RQ (or ``acse_timeout_s``);
        without a bound a connection flood could exhaust threads and memory. Associated
        peers are not counted (``node.max_associations`` bounds those).
        """
        with self._starting_lock:
            waiting = sum(1 for a in self.active_associations if _waiting_for_request(a))
            if self._starting + waiting >= self.max_pending:
                logger.warning(
                    "connection from %s closed: %d connections are waiting to associate"
                    " (node.max_pending_connections)",
                    client_address[0],
                    self._starting + waiting,
                )
                metrics.ASSOCIATIONS.labels(result="too_many_pending").inc()
                return False
            self._starting += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Set TCP_NODELAY, do the TLS handshake here (bounded), then run the association.

        The TLS handshake and the A-ASSOCIATE-RQ must both arrive within
        ``handshake_timeout_s`` of the connection in total: socket timeouts bound each read,
        not a peer that trickles one byte at a time (which pynetdicom's ARTIM timer does not
        see while it reads a PDU), so a deadline timer shuts such a connection down.
        """
        sock = None
        try:
            sock = self._prepare_connection(request, client_address)
        finally:
            # One step under the lock: the association thread starts (and counts as
            # waiting) and the connection leaves ``_starting``, so :meth:`verify_request`
            # never sees a connection twice (which refused a legitimate one) or not at all.
            with self._starting_lock:
                try:
                    if sock is not None:
                        super().process_request_thread(sock, client_address)
                finally:
                    self._starting -= 1

    def _prepare_connection(self, request: Any, client_address: Any) -> socket.socket | None:
        """TCP_NODELAY, the deadline timer and the TLS handshake; None if the peer was dropped."""
        sock: socket.socket = request
        current = [sock]
        deadline = threading.Timer(
            self.handshake_timeout_s, self._drop_if_not_requested, args=(current, client_address)
        )
        deadline.daemon = True
        deadline.start()  # runs on after this returns: the association has its own thread
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock.settimeout(self.handshake_timeout_s)
                sock = self.tls_context.wrap_socket(sock, server_side=True)
                current[0] = sock
                sock.settimeout(self.ae.network_timeout)
        except (OSError, ssl.SSLError) as exc:
            deadline.cancel()
            logger.warning(
                "connection from %s dropped before association: %s", client_address[0], exc
            )
            metrics.ASSOCIATIONS.labels(result="handshake_failed").inc()
            self.shutdown_request(request)
            return None
        return sock

    def _drop_if_not_requested(self, current: list[socket.socket], client_address: Any) -> None:
        """Deadline: shut the connection down unless its association was requested."""
        sock = current[0]
        for assoc in self.active_associations:
            if (
                getattr(assoc.dul.socket, "socket", None) is sock
                and assoc.requestor.primitive is not None
            ):
                return
        if sock.fileno() < 0:
            return  # already closed
        logger.warning(
            "connection from %s dropped: no association request within %.0f s",
            client_address[0],
            self.handshake_timeout_s,
        )
        metrics.ASSOCIATIONS.labels(result="request_timeout").inc()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return  # closed meanwhile
