"""Durable outbox: files before rows, one row per (instance, destination), idempotent re-add,
shadow mode, restart recovery, re-queue of dead letters, status summary."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from outbox_samples import MR, NO_OVERLAY, PACS, SC, SEG, SEG_ONLY, SERIES, SR, make_config, result
from pydicom.uid import generate_uid

from node.db import Database
from node.outbox import (
    Kind,
    Outbox,
    State,
    deliveries_for_series,
    delivery_summary,
    kind_of,
    recover_sending,
    release_held,
    requeue_dead_letters,
)


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "state" / "index.sqlite")


def test_kind_comes_from_the_sop_class() -> None:
    assert kind_of(result(SEG)) is Kind.SEG
    assert kind_of(result(SR)) is Kind.SR
    assert kind_of(result(SC)) is Kind.OVERLAY
    with pytest.raises(ValueError, match="not a result class"):
        kind_of(result(MR))


def test_add_writes_files_and_one_row_per_wanted_destination(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS + SEG_ONLY + NO_OVERLAY)
    datasets = [result(SEG), result(SR), result(SC)]
    items = Outbox(db, config).add(SERIES, datasets)

    for ds, item in zip(datasets, items, strict=True):
        path = config.state_dir / item.path
        assert path.is_file() and path.stat().st_mode & 0o777 == 0o600
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(config.outbox_dir.rglob("*.tmp"))
    assert [i.destinations for i in items] == [("pacs", "segs", "web"), ("pacs", "web"), ("pacs",)]
    rows = deliveries_for_series(db, SERIES)
    assert len(rows) == 6
    assert {r["state"] for r in rows} == {State.PENDING.value}
    assert all(r["attempts"] == 0 and r["generation"] == 1 for r in rows)


def test_global_overlay_switch_drops_overlays(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS, export="overlay = false")
    items = Outbox(db, config).add(SERIES, [result(SEG), result(SC)])
    assert [i.destinations for i in items] == [("pacs",), ()]
    # the overlay is still kept locally
    assert (config.state_dir / items[1].path).is_file()


def test_readd_replaces_file_and_resets_delivery(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS)
    uid = generate_uid()
    outbox = Outbox(db, config)
    [item] = outbox.add(SERIES, [result(SEG, uid, value="first")])
    db.execute(
        "UPDATE deliveries SET state = 'dead', attempts = 7, last_error = 'x' WHERE sop_instance_uid = ?",
        (uid,),
    )
    outbox.add(SERIES, [result(SEG, uid, value="second")])

    rows = deliveries_for_series(db, SERIES)
    assert len(rows) == 1
    row = rows[0]
    assert (row["state"], row["attempts"], row["generation"], row["last_error"]) == (
        "pending",
        0,
        2,
        None,
    )
    assert pydicom.dcmread(config.state_dir / item.path).SeriesDescription == "second"


def test_unknown_sop_class_writes_nothing(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS)
    with pytest.raises(ValueError, match="not a result class"):
        Outbox(db, config).add(SERIES, [result(SEG), result(MR)])
    assert deliveries_for_series(db, SERIES) == []
    assert not config.outbox_dir.exists() or not list(config.outbox_dir.rglob("*.dcm"))


def test_global_shadow_holds_and_release_sends(tmp_path: Path, db: Database) -> None:
    shadow = make_config(tmp_path, PACS, export="shadow = true")
    items = Outbox(db, shadow).add(SERIES, [result(SEG), result(SR)])
    assert [i.held for i in items] == [("pacs",), ("pacs",)]
    assert delivery_summary(db)["destinations"]["pacs"]["held"] == 2
    # still in shadow: release with the config leaves them held
    assert release_held(db, config=shadow) == 0
    live = make_config(tmp_path, PACS)
    assert release_held(db, config=live) == 2
    assert {r["state"] for r in deliveries_for_series(db, SERIES)} == {"pending"}


def test_per_destination_shadow(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS + SEG_ONLY.replace('kinds = ["seg"]', "shadow = true"))
    [item] = Outbox(db, config).add(SERIES, [result(SEG)])
    assert item.destinations == ("pacs", "segs") and item.held == ("segs",)
    counts = delivery_summary(db)["destinations"]
    assert counts["pacs"]["pending"] == 1 and counts["segs"]["held"] == 1
    assert release_held(db, destination="pacs") == 0
    assert release_held(db, destination="segs") == 1


def test_sending_rows_go_back_to_pending_at_start_up(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS)
    Outbox(db, config).add(SERIES, [result(SEG), result(SR)])
    db.execute("UPDATE deliveries SET state = 'sending', attempts = 1 WHERE kind = 'seg'")
    assert recover_sending(db, clock=lambda: 5e9) == 1
    rows = {r["kind"]: r for r in deliveries_for_series(db, SERIES)}
    assert rows["seg"]["state"] == "pending" and rows["seg"]["next_attempt_at"] == 5e9
    assert rows["seg"]["last_error"] == "interrupted while sending"
    assert recover_sending(db) == 0


def test_requeue_dead_letters_with_filters(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, PACS + SEG_ONLY)
    Outbox(db, config).add(SERIES, [result(SEG)])
    db.execute("UPDATE deliveries SET state = 'dead', attempts = 3, last_error = 'refused'")
    assert requeue_dead_letters(db, destination="segs", clock=lambda: 7e9) == 1
    rows = {r["destination"]: r for r in deliveries_for_series(db, SERIES)}
    assert rows["segs"]["state"] == "pending" and rows["segs"]["attempts"] == 0
    assert rows["segs"]["queued_at"] == 7e9
    assert rows["pacs"]["state"] == "dead"
    summary = delivery_summary(db)
    assert summary["totals"]["dead"] == 1 and summary["totals"]["pending"] == 1
    assert summary["dead_letters"][0]["last_error"] == "refused"
    assert summary["next_attempt_at"] == 7e9
    assert requeue_dead_letters(db) == 1


def test_summary_of_an_empty_index(db: Database) -> None:
    summary = delivery_summary(db)
    assert summary["destinations"] == {} and summary["dead_letters"] == []
    assert set(summary["totals"]) == {s.value for s in State}
    assert summary["next_attempt_at"] is None
