"""Limits of the real node: past each one the peer gets a clear refusal, and the node goes on.

* ``node.max_associations``: the next association is rejected (A-ASSOCIATE-RJ, transient,
  "local limit exceeded"), and accepted again once one closes;
* ``node.max_instances_per_series``: the instance past the limit gets 0xA700;
* ``node.max_pixels_per_frame``: a larger matrix gets 0xA900, smaller series still store;
* ``node.max_pdu``: the node advertises it and DCMTK ``storescu`` fragments to it; a PDU
  declaring more than ``max(max_pdu, 1 MiB)`` is not read: the connection is closed;
* ``node.max_instance_mb``: a larger data set aborts its association before it is all
  buffered, nothing is stored, and the next association stores normally;
* ``node.max_pending_connections``: connections past it that have not asked to associate
  are closed at once; slots come back when waiting connections go.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import NodeProcess, c_echo, closed_by_peer, make_mr_dataset, write_mr_series
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from reliability_helpers import indexed, storescu_statuses

pytestmark = pytest.mark.integration

INGEST_ONLY = {"quiet_seconds": 600.0}
#: A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local limit exceeded
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900


def associate(node: NodeProcess) -> Association:
    ae = AE(ae_title="LIMITSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def associate_when_free(node: NodeProcess, timeout_s: float = 15.0) -> Association:
    """Associate, retrying while the node still counts an association that just released.

    The node frees a slot when the association's thread has finished with the release, a
    moment after the peer sees the release (the start-up probe's C-ECHO, or a test's own):
    on a loaded machine the next association can arrive before that.
    """
    deadline = time.monotonic() + timeout_s
    assoc = associate(node)
    while not assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.2)
        assoc = associate(node)
    return assoc


def store(assoc: Association, ds: Dataset) -> int | None:
    rsp = assoc.send_c_store(ds)
    return int(rsp.Status) if rsp is not None and "Status" in rsp else None


def test_association_limit_rejects_with_reason_and_recovers(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(node={"max_associations": 2}, series=INGEST_ONLY)
    held = [associate_when_free(node) for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = associate(node)
    assert extra.is_rejected, "a third association must be refused"
    rj = extra.acceptor.primitive
    assert rj is not None and (rj.result, rj.result_source, rj.diagnostic) == REJECT_LOCAL_LIMIT
    held[0].release()
    ds = make_mr_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    again = associate_when_free(node)
    assert again.is_established, "a slot freed by a release must be usable again"
    assert store(again, ds) == 0
    again.release()
    held[1].release()


def test_instances_per_series_limit(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(node={"max_instances_per_series": 3}, series=INGEST_ONLY)
    study, series = generate_uid(), generate_uid()
    datasets = [make_mr_dataset(study_uid=study, series_uid=series, index=i) for i in range(5)]
    other = make_mr_dataset(study_uid=study, series_uid=generate_uid())
    assoc = associate(node)
    statuses = [store(assoc, ds) for ds in [*datasets, datasets[0], other]]
    assoc.release()
    # the 4th and 5th are refused; a duplicate of a stored one and another series still pass
    assert statuses == [0, 0, 0, OUT_OF_RESOURCES, OUT_OF_RESOURCES, 0, 0]
    assert "reached node.max_instances_per_series=3" in node.log_text()
    assert len(indexed(node.state_dir)) == 4


def test_pixel_matrix_limit(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(node={"max_pixels_per_frame": 64 * 64}, series=INGEST_ONLY)
    study = generate_uid()
    big = make_mr_dataset(study_uid=study, series_uid=generate_uid(), rows=128, columns=128)
    small = make_mr_dataset(study_uid=study, series_uid=generate_uid(), rows=64, columns=64)
    assoc = associate(node)
    assert [store(assoc, big), store(assoc, small)] == [DATASET_DOES_NOT_MATCH, 0]
    assoc.release()
    assert "128x128 exceeds node.max_pixels_per_frame=4096" in node.log_text()
    assert c_echo(node.port) == 0


def test_max_pdu_is_advertised_and_honoured_by_storescu(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(node={"max_pdu": 16384}, series=INGEST_ONLY)
    assoc = associate(node)
    assert assoc.acceptor.maximum_length == 16384
    assoc.release()
    # a 256x256x16 bit image (128 KiB) arrives in PDUs of at most 16 KiB, intact
    files = write_mr_series(tmp_path / "s", 2, rows=256, columns=256)
    statuses, result = storescu_statuses(node.port, files)
    assert "Max Send PDV: 16372" in result.stdout + result.stderr
    assert list(statuses.values()) == ["Success", "Success"]
    assert len(indexed(node.state_dir)) == 2


def test_message_larger_than_max_instance_mb_aborts_and_the_node_goes_on(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(node={"max_instance_mb": 1}, series=INGEST_ONLY)
    study = generate_uid()
    big = make_mr_dataset(
        study_uid=study, series_uid=generate_uid(), rows=1024, columns=1024
    )  # 2 MiB
    assoc = associate(node)
    assert store(assoc, big) is None, "a 2 MiB data set must not be acknowledged"
    deadline = time.monotonic() + 20.0
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted
    assert "DIMSE message of more than 1048576 bytes" in node.log_text()
    assert big.SOPInstanceUID not in indexed(node.state_dir)
    small = make_mr_dataset(study_uid=study, series_uid=generate_uid())
    again = associate(node)
    assert store(again, small) == 0
    again.release()


def test_pdu_longer_than_the_bound_is_not_read(node_factory: Callable[..., NodeProcess]) -> None:
    # the handshake deadline (acse_timeout_s) would close the connection only after 60 s
    node = node_factory(node={"acse_timeout_s": 60.0}, series=INGEST_ONLY)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10.0) as sock:
        # an A-ASSOCIATE-RQ header declaring 512 MiB, and nothing after it
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 512 * 1024 * 1024))
        started = time.monotonic()
        assert sock.recv(1) == b"", "the node must close the connection, not wait for 512 MiB"
        assert time.monotonic() - started < 10.0
    assert "declared a PDU of 536870912 bytes" in node.log_text()
    assert c_echo(node.port, node.ae_title) == 0


def test_connections_past_max_pending_are_closed_and_slots_come_back(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(
        node={"max_pending_connections": 3, "acse_timeout_s": 60.0}, series=INGEST_ONLY
    )
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10.0) for _ in range(3)]
    try:
        time.sleep(0.5)  # let the node accept them
        with socket.create_connection(("127.0.0.1", node.port), timeout=10.0) as extra:
            assert closed_by_peer(extra, 10.0), (
                f"a 4th waiting connection must be closed at once:\n{node.log_tail()}"
            )
        assert "3 connections are waiting to associate" in node.log_text()
        idle.pop().close()
        deadline = time.monotonic() + 15.0
        status = c_echo(node.port, node.ae_title)
        while status != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            status = c_echo(node.port, node.ae_title)
        assert status == 0, "a freed slot must let an association in"
    finally:
        for sock in idle:
            sock.close()
