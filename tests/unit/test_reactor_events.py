"""node.reactor: event-driven association reactors and the cheap context copy."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.reactor import (
    EventDrivenAssociation,
    EventDrivenDUL,
    EventDrivenRequestHandler,
    RaceFreeAssociation,
    copy_contexts,
    pause_point,
    use_race_free_requestors,
)

#: generous bound for N request/response round trips; a reactor that waited for its
#: periodic wake-up (IDLE_WAKE_S = 50 ms) instead of the message would need >= N * 50 ms
ROUND_TRIPS = 40
ROUND_TRIP_BOUND_S = ROUND_TRIPS * 0.05


def test_copy_contexts_equal_and_independent() -> None:
    ae = AE()
    ae.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=True, scp_role=True)
    original = ae.supported_contexts
    copies = copy_contexts(original)
    deep = copy.deepcopy(original)
    assert [vars(c) for c in copies] == [vars(c) for c in deep]
    copies[0].add_transfer_syntax("1.2.840.10008.1.2.5")
    copies[0].context_id = 7
    assert "1.2.840.10008.1.2.5" not in original[0].transfer_syntax
    assert original[0].context_id is None


@pytest.fixture
def scp() -> Iterator[tuple[ThreadedAssociationServer, list[Any]]]:
    seen: list[Any] = []

    def on_store(event: evt.Event) -> int:
        seen.append((type(event.assoc), type(event.assoc.dul), len(event.encoded_dataset())))
        return 0x0000

    ae = AE(ae_title="REACTOR")
    ae.add_supported_context(Verification)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    server = ae.make_server(
        ("127.0.0.1", 0),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        request_handler=EventDrivenRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    ae._servers.append(server)
    yield server, seen
    server.shutdown()
    thread.join(5)


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "R1"
    ds.BitsAllocated = 8
    ds.PixelRepresentation = 0
    ds.PixelData = b"\0" * 4096
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_store_echo_release_through_event_driven_reactors(scp: tuple[ThreadedAssociationServer, list[Any]]) -> None:
    server, seen = scp
    use_race_free_requestors()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="REACTOR")
    assert assoc.is_established and isinstance(assoc, RaceFreeAssociation)
    accepted = server.active_associations
    assert len(accepted) == 1 and isinstance(accepted[0], EventDrivenAssociation)
    started = time.monotonic()
    for i in range(ROUND_TRIPS):
        status = assoc.send_c_store(_dataset()) if i % 2 else assoc.send_c_echo()
        assert status.Status == 0x0000
    elapsed = time.monotonic() - started
    assoc.release()
    assert assoc.is_released
    assert elapsed < ROUND_TRIP_BOUND_S, f"{ROUND_TRIPS} round trips took {elapsed:.2f} s"
    assert len(seen) == ROUND_TRIPS // 2
    assert all(a is EventDrivenAssociation and d is EventDrivenDUL and n > 4096 for a, d, n in seen)
    accepted[0].join(5)
    assert not accepted[0].is_alive() and not accepted[0].dul.is_alive()
    assert server.active_associations == []


def test_peer_abort_ends_both_threads(scp: tuple[ThreadedAssociationServer, list[Any]]) -> None:
    server, _ = scp
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="REACTOR")
    assert assoc.is_established
    accepted = server.active_associations[0]
    assoc.abort()
    accepted.join(5)
    assert not accepted.is_alive() and not accepted.dul.is_alive()
    assert accepted.is_aborted


class _SenderClearsAfterFirstWait(threading.Event):
    """A checkpoint whose first ``wait()`` returns (it is set) and then, before the reactor
    can clear ``_is_paused``, lets a sender clear it: pynetdicom#875's interleaving."""

    def __init__(self, assoc: Any, sender_saw_paused: list[bool]) -> None:
        super().__init__()
        self.set()
        self._assoc = assoc
        self._sender_saw_paused = sender_saw_paused
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        result = super().wait(timeout)
        self.waits += 1
        if self.waits == 1:
            self.clear()  # what send_c_echo() does first ...
            self._sender_saw_paused.append(self._assoc._is_paused)  # ... then it polls this
        return result


def test_pause_point_parks_again_when_a_sender_cleared_the_checkpoint_in_between() -> None:
    class Holder:
        _is_paused = False

    holder = Holder()
    sender_saw_paused: list[bool] = []
    checkpoint = _SenderClearsAfterFirstWait(holder, sender_saw_paused)
    holder._reactor_checkpoint = checkpoint  # type: ignore[attr-defined]
    reactor = threading.Thread(target=pause_point, args=(holder,), daemon=True)
    reactor.start()
    time.sleep(0.3)
    # the sender saw the stale "paused" and goes on to send: the reactor must not run now
    assert sender_saw_paused == [True]
    assert reactor.is_alive(), "the reactor left its checkpoint while a sender was sending"
    assert holder._is_paused and checkpoint.waits == 1
    checkpoint.set()  # the sender got its response and lets the reactor go
    reactor.join(5)
    assert not reactor.is_alive() and not holder._is_paused
