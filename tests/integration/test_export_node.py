"""The exporter inside the real node process (``lumbar-node serve``) delivering to a real
Orthanc: results added to the outbox by another process (the job worker's situation) are
sent; a PACS outage plus a node crash (SIGKILL, a row left in ``sending``) still ends with
every result stored exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from orthanc_peer import Orthanc, isolated_network, wait_until
from result_samples import make_result_set

from node.config import load_config
from node.db import Database
from node.outbox import Outbox, deliveries_for_series

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0


@pytest.fixture(scope="module", autouse=True)
def private_network() -> Iterator[bool]:
    with isolated_network() as isolated:
        yield isolated


def destination(peer: Orthanc) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port}


def states(db: Database, series_uid: str) -> list[str]:
    return [r["state"] for r in deliveries_for_series(db, series_uid)]


def test_node_process_delivers_results_queued_by_another_process(
    tmp_path: Path, node_factory: Callable[..., Any]
) -> None:
    peer = Orthanc(tmp_path / "orthanc")
    peer.start()
    try:
        node = node_factory(destinations=[destination(peer)])
        config = load_config(node.config_path)
        db = Database(config.index_path)
        results = make_result_set()
        Outbox(db, config).add(results.series_uid, results.results)

        wait_until(lambda: states(db, results.series_uid) == ["done"] * 3, DEADLINE_S, "node to deliver")
        assert set(peer.instance_tags()) == {str(ds.SOPInstanceUID) for ds in results.results}
        status, body = node.http_get("/metrics")
        assert status == 200
        assert 'lumbar_deliveries{destination="pacs",state="done"} 3.0' in body.decode()
    finally:
        peer.stop(graceful=False)


def test_outage_and_node_crash_still_deliver_exactly_once(
    tmp_path: Path, node_factory: Callable[..., Any]
) -> None:
    peer = Orthanc(tmp_path / "orthanc")  # not started: the PACS is down
    node = node_factory(
        destinations=[destination(peer)],
        export={"retry_initial_s": 0.5, "retry_max_s": 1.0, "retry_horizon_h": 0.2},
    )
    config = load_config(node.config_path)
    db = Database(config.index_path)
    results = make_result_set()
    Outbox(db, config).add(results.series_uid, results.results)

    def retried() -> bool:
        rows = deliveries_for_series(db, results.series_uid)
        return all(r["state"] == "failed" and r["attempts"] >= 2 for r in rows)

    wait_until(retried, DEADLINE_S, "the node to retry while Orthanc is down")
    node.kill()
    # the crash interrupted one delivery in the middle of sending
    db.execute("UPDATE deliveries SET state = 'sending' WHERE kind = 'seg'")
    peer.start()
    try:
        node.restart()
        wait_until(lambda: states(db, results.series_uid) == ["done"] * 3, DEADLINE_S, "delivery after restart")
        assert set(peer.instance_tags()) == {str(ds.SOPInstanceUID) for ds in results.results}
        assert peer.new_instance_events() == 3
        assert "interrupted while sending; re-queued" in node.log_text()
    finally:
        peer.stop(graceful=False)
