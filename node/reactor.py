"""Event-driven reactors for the node's accepted associations (pynetdicom 3.0.4).

pynetdicom runs two threads per association and both poll: the DUL thread sleeps 1 ms
whenever it found nothing to do (``DULServiceProvider._run_loop_delay``) and the
association thread sleeps 1 ms on every loop (``Association._run_reactor``). Each
C-STORE then waits up to ~1 ms twice before its handler runs and once more before its
response leaves, and every idle association wakes 2000 times a second: on a loaded
2-core host that polling, not the handler, was the largest cost of receiving (see
``docs/performance.md``).

Here both threads block until there is work instead:

* the DUL thread waits in ``select()`` on the association socket and a wake-up pipe; the
  pipe is written whenever a primitive is queued for sending, an event is queued for the
  state machine, or the DUL is told to stop;
* the association thread waits on an :class:`threading.Event` set whenever a complete
  DIMSE message or an ACSE primitive (release, abort) is queued for it, or the DUL ends.

Both still wake every :data:`IDLE_WAKE_S` to check timers (ARTIM, network idle timeout)
and kill flags, exactly as the polling loops did. The loops are otherwise pynetdicom's own
(same state machine, same order of checks), so protocol behaviour is unchanged. Only
associations accepted by the node's listener use them (:class:`EventDrivenRequestHandler`);
anything unexpected (TLS data already buffered, a closed socket) falls back to the
original 1 ms sleep for that iteration.

The same handler also replaces pynetdicom's per-association ``copy.deepcopy`` of the
server's presentation contexts (~100 ms of CPU per association with every storage SOP
class x 13 transfer syntaxes) by :func:`copy_contexts`.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import select
import ssl
import threading
import time
import weakref
from datetime import datetime
from typing import Any, cast

from pynetdicom import ae as pynetdicom_ae
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

logger = logging.getLogger(__name__)

#: longest a reactor blocks without work before re-checking its timers and kill flag (s)
IDLE_WAKE_S = 0.05
#: bytes drained from the wake-up pipe per read
_DRAIN_BYTES = 4096


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A :class:`queue.Queue` that calls ``notify()`` after every put."""

    def __init__(self, notify: Any, previous: queue.Queue | None = None) -> None:  # type: ignore[type-arg]
        super().__init__()
        self._notify = notify
        while previous is not None:
            try:
                self.put_nowait(previous.get_nowait())
            except queue.Empty:
                break

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _WakePipe:
    """A non-blocking pipe used to interrupt a ``select()``; closed when garbage collected."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._finalizer = weakref.finalize(self, _close_fds, self.read_fd, self.write_fd)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):
            return  # already full of wake-ups, or closed: nothing more to signal

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, _DRAIN_BYTES):
                continue
        except (BlockingIOError, OSError):
            return

    def close(self) -> None:
        self._finalizer()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            continue


class EventDrivenDUL(DULServiceProvider):
    """The DUL provider with ``run_reactor`` blocking in ``select()`` instead of sleeping."""

    _wake_pipe: _WakePipe

    def kill_dul(self) -> None:
        """Stop the reactor (and interrupt its wait)."""
        super().kill_dul()
        self._wake_pipe.wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if the state machine is idle (Sta1); True when it stopped."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake_pipe.wake()
        while self.is_alive():
            time.sleep(self._run_loop_delay)
        return True

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, something is queued, or IDLE_WAKE_S passed."""
        transport = self.socket
        sock = getattr(transport, "socket", None)
        if (
            sock is None
            or not getattr(transport, "_is_connected", False)
            or (isinstance(sock, ssl.SSLSocket) and sock.pending())
        ):
            time.sleep(self._run_loop_delay)
            return
        if not self.to_provider_queue.empty() or not self.event_queue.empty() or self._kill_thread:
            return
        try:
            select.select([sock, self._wake_pipe.read_fd], [], [], IDLE_WAKE_S)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)
            return
        self._wake_pipe.drain()

    def run_reactor(self) -> None:  # noqa: C901 - pynetdicom's loop, kept in its shape
        """pynetdicom 3.0.4's DUL loop with the idle sleep replaced by :meth:`_wait_for_work`."""
        try:
            self._run_reactor_loop()
        finally:
            self._wake_pipe.close()
            wake = getattr(self._assoc, "_wake", None)
            if wake is not None:
                wake.set()

    def _run_reactor_loop(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:  # noqa: BLE001 - as pynetdicom: abort the association, end the thread
                logger.exception("exception in the DUL reactor, aborting the association")
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None:
                    self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False


def pause_point(assoc: Association) -> None:
    """The reactor's pause checkpoint, without pynetdicom 3.0.4's lost-response race.

    ``send_c_echo()`` and the other ``send_*`` methods clear ``_reactor_checkpoint`` and
    then wait for ``_is_paused`` before sending. pynetdicom's reactor sets ``_is_paused``
    *before* every ``wait()``, also when the checkpoint is still set, so a sender that
    clears it just after that ``wait()`` returned sees a stale ``True``, sends, and the
    reactor then takes the response off the queue ("Received unexpected C-ECHO service
    message", then a DIMSE timeout and an abort; pydicom/pynetdicom#875). Here the reactor
    re-checks the checkpoint after clearing ``_is_paused`` and parks again if a sender
    cleared it in between, so it never runs while a sender believes it paused.
    """
    checkpoint = assoc._reactor_checkpoint
    while True:
        assoc._is_paused = True
        checkpoint.wait()
        assoc._is_paused = False
        if checkpoint.is_set():
            return


class RaceFreeAssociation(Association):
    """pynetdicom's association with :func:`pause_point` in its reactor loop.

    Used for every association the node requests (:func:`use_race_free_requestors`) and,
    through :class:`EventDrivenAssociation`, for every one it accepts.
    """

    def _wait_for_work(self) -> None:
        """pynetdicom's 1 ms poll; :class:`EventDrivenAssociation` waits on an event."""
        time.sleep(0.001)

    def _run_reactor(self) -> None:  # noqa: C901 - pynetdicom's loop, kept in its shape
        """pynetdicom 3.0.4's reactor loop with :func:`pause_point` and :meth:`_wait_for_work`."""
        self._is_paused = False
        while not self._kill:
            self._wait_for_work()
            pause_point(self)

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.debug("association released")
                self.is_released = True
                self.is_established = False
                _trigger(self, "EVT_RELEASED")
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                _trigger(self, "EVT_ABORTED")
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                logger.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def use_race_free_requestors() -> None:
    """Make ``AE.associate()`` create :class:`RaceFreeAssociation` (idempotent).

    ``AE.associate()`` builds its association from the module-level name
    ``pynetdicom.ae.Association``, with no hook to choose the class; rebinding that name
    is the only way to give the node's own requests (result export, ``push``, ``echo``)
    the race-free reactor without copying ``associate()``. Side effect: pynetdicom's
    ``AE.active_associations`` matches that name, so it no longer sees plain (base-class)
    associations; :class:`node.listener.SlotCountingAE` matches the base class instead.
    """
    pynetdicom_ae.Association = RaceFreeAssociation  # type: ignore[misc]


class EventDrivenAssociation(RaceFreeAssociation):
    """An accepted association whose reactor waits on an event instead of sleeping 1 ms."""

    _wake: threading.Event

    def _has_work(self) -> bool:
        return (
            self._kill
            or not self.dimse.msg_queue.empty()
            or not self.dul.to_user_queue.empty()
            or not self.dul.is_alive()
        )

    def _wait_for_work(self) -> None:
        if not self._has_work():
            self._wake.wait(IDLE_WAKE_S)
        self._wake.clear()


def _trigger(assoc: Association, name: str) -> None:
    evt.trigger(assoc, getattr(evt, name), {})


def make_event_driven(assoc: Association) -> Association:
    """Switch a not-yet-started association (and its DUL) to the event-driven reactors."""
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("the association is already running")
    wake = threading.Event()
    pipe = _WakePipe()
    dul = assoc.dul
    assoc.__class__ = EventDrivenAssociation
    dul.__class__ = EventDrivenDUL
    assoc._wake = wake  # type: ignore[attr-defined]
    dul._wake_pipe = pipe  # type: ignore[attr-defined]
    # Items already queued (the acceptor's socket queued Evt5, T-CONNECT) move over.
    dul.to_provider_queue = _NotifyingQueue(pipe.wake, dul.to_provider_queue)
    dul.event_queue = _NotifyingQueue(pipe.wake, dul.event_queue)
    dul.to_user_queue = _NotifyingQueue(wake.set, dul.to_user_queue)
    assoc.dimse.msg_queue = _NotifyingQueue(wake.set, assoc.dimse.msg_queue)
    # Thread.__init__ bound the original method as the DUL thread's target.
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]
    return assoc


#: largest PDU read whatever ``node.max_pdu`` is: an A-ASSOCIATE-RQ proposing every
#: storage SOP class with many transfer syntaxes stays far below it
MIN_PDU_READ_BYTES = 1 << 20


class BoundedAssociationSocket(AssociationSocket):
    """An association socket that refuses to read a PDU longer than ``max_read`` bytes.

    pynetdicom reads a PDU of whatever length its header declares into memory. A read
    above the bound raises :class:`OSError`, which pynetdicom's DUL treats as the
    transport closing (Evt17): the association ends and its thread is freed.
    """

    max_read: int = MIN_PDU_READ_BYTES

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's ``recv`` for lengths within the bound."""
        if nr_bytes > self.max_read:
            logger.error(
                "peer %s declared a PDU of %d bytes (limit %d): association closed",
                self.assoc.requestor.address, nr_bytes, self.max_read,
            )
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {self.max_read}")
        return super().recv(nr_bytes)


def bound_message_size(assoc: Association, max_bytes: int) -> None:
    """Abort the association when one DIMSE message's data passes ``max_bytes``.

    pynetdicom buffers a whole C-STORE data set before the handler sees it; without a
    bound a peer decides how much memory the node holds. The P-DATA of the message being
    assembled is counted; past the bound the partial message is dropped and Evt19 (an
    invalid PDU: A-P-ABORT) is put to the state machine, as pynetdicom does for a
    message it cannot decode.
    """
    dimse = assoc.dimse
    receive = dimse.receive_primitive
    received = [0]

    def bounded(primitive: Any) -> None:
        if received[0] > max_bytes:
            return  # already over: the abort is under way, drop the rest
        received[0] += sum(len(item[1]) for item in primitive.presentation_data_value_list)
        if received[0] > max_bytes:
            logger.error(
                "peer %s sent a DIMSE message of more than %d bytes: association aborted",
                assoc.requestor.address, max_bytes,
            )
            dimse.message = None
            dimse.dul.event_queue.put("Evt19")
            return
        receive(primitive)
        if dimse.message is None:  # a message was completed: count the next one afresh
            received[0] = 0

    dimse.receive_primitive = bounded  # type: ignore[method-assign]


def copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """An independent copy of presentation contexts, without ``copy.deepcopy``.

    pynetdicom deep-copies the server's contexts for every association; with every storage
    SOP class and 13 transfer syntaxes that took ~100 ms of CPU per association here, most
    of it re-validating UIDs. A context's only mutable member is its transfer syntax list
    (UIDs are immutable ``str``), so a shallow copy with a new list is equivalent.
    """
    copies = []
    for context in contexts:
        clone = copy.copy(context)
        clone._transfer_syntax = list(context._transfer_syntax)
        copies.append(clone)
    return copies


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating associations with event-driven reactors."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0.4's ``_create_association`` with :func:`copy_contexts`."""
        server = cast(Any, self.server)
        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = BoundedAssociationSocket(assoc, client_socket=self.request)
        sock.max_read = max(MIN_PDU_READ_BYTES, int(getattr(server, "max_pdu_read", 0)))
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy_contexts(server.contexts)
        assoc.requestor.address_info = self.remote
        for event in server._handlers:
            if event.is_intervention and server._handlers[event]:
                assoc.bind(event, *server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        max_message = getattr(server, "max_message_bytes", None)
        if max_message:
            bound_message_size(assoc, int(max_message))
        return make_event_driven(assoc)
