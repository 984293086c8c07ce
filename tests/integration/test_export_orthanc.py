"""Export to a real Orthanc: C-STORE and STOW-RS delivery, a PACS that is down and comes
back (every result arrives exactly once), a PACS that refuses SR (dead letter with the
reason), and shadow mode (held, then released and sent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc_peer import Orthanc, RefusingGateway, isolated_network, wait_until
from result_samples import ResultSet, make_result_set

from node.config import NodeConfig, load_config
from node.db import Database
from node.export import Exporter
from node.outbox import Outbox, deliveries_for_series, delivery_summary, release_held

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module", autouse=True)
def private_network() -> Iterator[bool]:
    with isolated_network() as isolated:
        yield isolated


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc")
    peer.start()
    yield peer
    peer.stop(graceful=False)


def node_config(tmp_path: Path, destination: str, export: str = "") -> NodeConfig:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nstate_dir = "{tmp_path / "state"}"\nae_title = "LUMBARNODE"\n'
        f"[export]\n{export}\n[[destinations]]\n{destination}"
    )
    return load_config(path)


def dicom_destination(peer: Orthanc) -> str:
    return f'name = "pacs"\nae_title = "{peer.aet}"\nhost = "127.0.0.1"\nport = {peer.dicom_port}\n'


def stow_destination(peer: Orthanc) -> str:
    return f'name = "pacs"\ntype = "stow"\nurl = "{peer.dicomweb_url}"\n'


def states(db: Database, results: ResultSet) -> dict[str, str]:
    return {r["sop_class_uid"]: r["state"] for r in deliveries_for_series(db, results.series_uid)}


def assert_stored_once(peer: Orthanc, results: ResultSet) -> None:
    stored = peer.instance_tags()
    assert set(stored) == {str(ds.SOPInstanceUID) for ds in results.results}
    assert {t["SOPClassUID"] for t in stored.values()} == {SEG, SR, SC}
    assert peer.new_instance_events() == len(results.results)


@pytest.mark.parametrize("kind", ["dicom", "stow"])
def test_results_arrive_in_orthanc(tmp_path: Path, orthanc: Orthanc, kind: str) -> None:
    destination = dicom_destination(orthanc) if kind == "dicom" else stow_destination(orthanc)
    config = node_config(tmp_path, destination)
    db = Database(config.index_path)
    results = make_result_set()
    Outbox(db, config).add(results.series_uid, results.results)

    exporter = Exporter(db, config)
    assert exporter.drain("pacs") == 3
    assert states(db, results) == {SEG: "done", SR: "done", SC: "done"}
    assert_stored_once(orthanc, results)
    seg_tags = orthanc.instance_tags()[str(results.seg.SOPInstanceUID)]
    assert seg_tags["StudyInstanceUID"] == results.sources[0].StudyInstanceUID


@pytest.mark.parametrize("mode", ["no-context", "status"])
def test_refused_sr_is_dead_lettered_with_the_reason(tmp_path: Path, orthanc: Orthanc, mode: str) -> None:
    gateway = RefusingGateway(orthanc, mode=mode)
    try:
        destination = f'name = "pacs"\nae_title = "{gateway.aet}"\nhost = "127.0.0.1"\nport = {gateway.port}\n'
        config = node_config(tmp_path, destination)
        db = Database(config.index_path)
        results = make_result_set()
        Outbox(db, config).add(results.series_uid, results.results)
        Exporter(db, config).drain("pacs")
    finally:
        gateway.stop()

    assert states(db, results) == {SEG: "done", SR: "dead", SC: "done"}
    stored = set(orthanc.instance_tags())
    assert stored == {str(results.seg.SOPInstanceUID), str(results.overlay.SOPInstanceUID)}
    [dead] = delivery_summary(db)["dead_letters"]
    assert dead["sop_instance_uid"] == str(results.sr.SOPInstanceUID)
    assert dead["attempts"] == 1
    expected = (
        "no presentation context for Comprehensive 3D SR Storage"
        if mode == "no-context"
        else "0x0122: SOP class not supported"
    )
    assert expected in dead["last_error"]


def test_orthanc_down_then_up_every_result_arrives_once(tmp_path: Path) -> None:
    peer = Orthanc(tmp_path / "orthanc")
    config = node_config(
        tmp_path,
        dicom_destination(peer),
        export="retry_initial_s = 0.3\nretry_max_s = 1.0\nretry_horizon_h = 0.1",
    )
    db = Database(config.index_path)
    results = make_result_set()
    exporter = Exporter(db, config, poll_interval_s=0.2)
    outbox = Outbox(db, config, on_added=exporter.wake)
    exporter.start()
    try:
        outbox.add(results.series_uid, results.results)  # the PACS is not running yet

        def retried() -> bool:
            rows = deliveries_for_series(db, results.series_uid)
            return all(r["state"] == "failed" and r["attempts"] >= 2 for r in rows)

        wait_until(retried, 30.0, "deliveries to fail and be retried while Orthanc is down")
        row = deliveries_for_series(db, results.series_uid)[0]
        assert "cannot associate" in row["last_error"]

        peer.start()
        wait_until(
            lambda: set(states(db, results).values()) == {"done"}, 30.0, "deliveries to complete"
        )
    finally:
        exporter.stop()
        peer.stop(graceful=False)
    peer.start()  # same storage: nothing was stored twice
    try:
        assert_stored_once(peer, results)
    finally:
        peer.stop(graceful=False)


def test_shadow_mode_holds_then_release_sends(tmp_path: Path, orthanc: Orthanc) -> None:
    shadow = node_config(tmp_path, dicom_destination(orthanc), export="shadow = true")
    db = Database(shadow.index_path)
    results = make_result_set()
    Outbox(db, shadow).add(results.series_uid, results.results)
    held = Exporter(db, shadow)
    assert held.active == []
    assert delivery_summary(db)["destinations"]["pacs"]["held"] == 3
    assert orthanc.get("/instances") == []

    live = node_config(tmp_path, dicom_destination(orthanc))
    assert release_held(db, config=live) == 3
    assert Exporter(db, live).drain("pacs") == 3
    assert_stored_once(orthanc, results)
