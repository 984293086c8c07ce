"""``node.max_pending_connections`` counts each waiting connection exactly once.

A connection moves from the server's "starting" count to its association thread; if the
accept loop looked in between it counted that connection twice and refused a legitimate
peer (a CI flake). Here the hand-over is slowed down on purpose so the window is wide.
Likewise ``node.max_associations`` must not count an association that has released while
its thread finishes (another CI flake).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import closed_by_peer
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from node.listener import NodeAssociationServer, SlotCountingAE


@pytest.fixture
def slow_handover(monkeypatch: pytest.MonkeyPatch) -> None:
    """Association threads start, then their connection thread lingers for 0.4 s."""
    original = Association.start

    def start_then_linger(self: Association) -> None:
        original(self)
        if self.is_acceptor:
            time.sleep(0.4)

    monkeypatch.setattr(Association, "start", start_then_linger)


@pytest.fixture
def server(slow_handover: None) -> Iterator[NodeAssociationServer]:
    ae = SlotCountingAE(ae_title="PENDING")
    ae.add_supported_context(Verification)
    ae.acse_timeout = 30
    made = ae.make_server(("127.0.0.1", 0), server_class=NodeAssociationServer)
    assert isinstance(made, NodeAssociationServer)
    made.max_pending = 2
    ae._servers.append(made)  # as node.receiver does; shutdown() removes it
    thread = threading.Thread(target=made.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield made
    finally:
        made.shutdown()
        made.server_close()
        thread.join(timeout=10)


def test_waiting_connections_up_to_the_bound_are_kept(server: NodeAssociationServer) -> None:
    port = server.server_address[1]
    first = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    time.sleep(0.1)  # the first connection is now being handed to its association thread
    second = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    time.sleep(0.6)
    third = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    try:
        assert not closed_by_peer(first, 0.5), "the first waiting connection was dropped"
        assert not closed_by_peer(second, 0.5), "a connection within the bound was refused"
        assert closed_by_peer(third, 5.0), "a connection past the bound must be closed"
    finally:
        for sock in (first, second, third):
            sock.close()


def test_an_association_request_frees_its_pending_place(server: NodeAssociationServer) -> None:
    port = server.server_address[1]
    idle = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    try:
        requestor = AE(ae_title="ECHOSCU")
        requestor.add_requested_context(Verification)
        for _ in range(3):  # associated peers do not count against the pending bound
            assoc = requestor.associate("127.0.0.1", port, ae_title="PENDING")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        assert not closed_by_peer(idle, 0.5)
    finally:
        idle.close()


def test_a_released_association_gives_its_slot_back_at_once(
    server: NodeAssociationServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A modality sending one association per file re-associates the moment it has released.

    The acceptor's thread is kept alive 3 s past the release here: the slot must come back
    with the release, not with the thread (retried for 1 s, the requestor's side of the race).
    """
    original = Association._run_reactor

    def run_then_linger(self: Association) -> None:
        original(self)
        time.sleep(3.0)

    monkeypatch.setattr(Association, "_run_reactor", run_then_linger)
    server.ae.maximum_associations = 1
    port = server.server_address[1]
    requestor = AE(ae_title="ECHOSCU")
    requestor.add_requested_context(Verification)
    first = requestor.associate("127.0.0.1", port, ae_title="PENDING")
    assert first.is_established
    assert requestor.associate("127.0.0.1", port, ae_title="PENDING").is_rejected, "the limit holds"
    first.release()
    deadline = time.monotonic() + 1.0
    again = requestor.associate("127.0.0.1", port, ae_title="PENDING")
    while not again.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
        again = requestor.associate("127.0.0.1", port, ae_title="PENDING")
    assert again.is_established, "the released association still held the only slot"
    again.release()
