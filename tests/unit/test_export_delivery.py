"""Exporter decisions without a network: status classification, backoff bounds, retry
horizon, dead letters, the generation guard, crash leftovers and the metrics collector."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from outbox_samples import PACS, SEG, SERIES, SR, make_config, result
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset

from node.db import Database
from node.export import JITTER_LOW, Exporter, backoff_delay_s, register_metrics
from node.outbox import KIND_BY_SOP_CLASS, Outbox, deliveries_for_series
from node.senders import Outcome, Verdict, classify_store_status, export_contexts


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedSender:
    """Answers each instance with the outcome scripted for its SOP class (default: done)."""

    def __init__(self, by_class: dict[str, Outcome] | None = None) -> None:
        self.by_class = by_class or {}
        self.batches: list[list[str]] = []
        self.hook: object = None

    def send(self, batch: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
        self.batches.append([str(ds.SOPInstanceUID) for _, ds in batch])
        if callable(self.hook):
            self.hook()
        return {
            row_id: self.by_class.get(str(ds.SOPClassUID), Outcome(Verdict.DONE, "success"))
            for row_id, ds in batch
        }


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, Verdict.DONE),
        (0x0001, Verdict.DONE),
        (0xB000, Verdict.DONE),
        (0xB007, Verdict.DONE),
        (0x0122, Verdict.DEAD),
        (0x0124, Verdict.DEAD),
        (0xA900, Verdict.DEAD),
        (0xA9FF, Verdict.DEAD),
        (0xC000, Verdict.DEAD),
        (0xC211, Verdict.DEAD),
        (0xA700, Verdict.RETRY),
        (0xA7FF, Verdict.RETRY),
        (0x0110, Verdict.RETRY),
        (0x0213, Verdict.RETRY),
        (0xF123, Verdict.RETRY),
    ],
)
def test_status_classification(status: int, verdict: Verdict) -> None:
    outcome = classify_store_status(status, "peer comment")
    assert outcome.verdict is verdict
    if verdict is not Verdict.DONE or status != 0:
        assert f"0x{status:04X}" in outcome.reason and "peer comment" in outcome.reason


def test_refusal_reason_names_the_problem() -> None:
    assert "SOP class not supported" in classify_store_status(0x0122).reason
    assert "out of resources" in classify_store_status(0xA702).reason


@given(
    attempts=st.integers(min_value=1, max_value=200),
    initial=st.floats(min_value=0.01, max_value=600.0),
    factor=st.floats(min_value=1.0, max_value=1000.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_bounded_and_jittered(attempts: int, initial: float, factor: float, seed: int) -> None:
    max_s = initial * factor
    delay = backoff_delay_s(attempts, initial, max_s, random.Random(seed))
    base = min(max_s, initial * 2 ** (attempts - 1))
    assert JITTER_LOW * base <= delay <= base
    assert delay <= max_s


def test_backoff_grows_and_jitter_spreads() -> None:
    rng = random.Random(1)
    delays = [backoff_delay_s(1, 30.0, 3600.0, rng) for _ in range(200)]
    assert 15.0 <= min(delays) and max(delays) <= 30.0 and max(delays) - min(delays) > 10.0
    assert backoff_delay_s(10, 30.0, 3600.0, rng) >= 1800.0
    with pytest.raises(ValueError):
        backoff_delay_s(0, 30.0, 3600.0, rng)


def test_contexts_cover_every_result_class() -> None:
    contexts = export_contexts()
    assert {sop for sop, _ in contexts} == set(KIND_BY_SOP_CLASS)
    assert len(contexts) <= 128
    sr_syntaxes = [ts for sop, ts in contexts if sop == SR]
    assert sr_syntaxes == [("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"), ("1.2.840.10008.1.2.1.99",)]


def setup(tmp_path: Path, sender: ScriptedSender, export: str = "") -> tuple[Database, Exporter, Clock]:
    config = make_config(
        tmp_path,
        PACS,
        export=export or "retry_initial_s = 10.0\nretry_max_s = 40.0\nretry_horizon_h = 0.05",
    )
    db = Database(config.index_path)
    clock = Clock()
    exporter = Exporter(db, config, senders={"pacs": sender}, clock=clock, rng=random.Random(0))
    Outbox(db, config, clock=clock).add(SERIES, [result(SEG), result(SR)])
    return db, exporter, clock


def states(db: Database) -> dict[str, str]:
    return {r["kind"]: r["state"] for r in deliveries_for_series(db, SERIES)}


def test_success_and_permanent_refusal_in_one_batch(tmp_path: Path) -> None:
    sender = ScriptedSender({SR: classify_store_status(0x0122)})
    db, exporter, _clock = setup(tmp_path, sender)
    assert exporter.drain("pacs") == 2
    assert len(sender.batches) == 1  # one association for the batch
    rows = {r["kind"]: r for r in deliveries_for_series(db, SERIES)}
    assert rows["seg"]["state"] == "done" and rows["seg"]["last_error"] is None
    assert rows["sr"]["state"] == "dead" and "SOP class not supported" in rows["sr"]["last_error"]
    assert exporter.drain("pacs") == 0  # dead is never retried by itself
    assert exporter.outcome_counts() == {("pacs", "done"): 1, ("pacs", "retry"): 0, ("pacs", "dead"): 1}


def test_transient_failure_retries_with_backoff_then_dead_at_horizon(tmp_path: Path) -> None:
    sender = ScriptedSender({SEG: Outcome(Verdict.RETRY, "connection refused")})
    db, exporter, clock = setup(tmp_path, sender)  # horizon 0.05 h = 180 s
    queued = clock.now
    exporter.drain("pacs")
    row = next(r for r in deliveries_for_series(db, SERIES) if r["kind"] == "seg")
    assert row["state"] == "failed" and row["attempts"] == 1
    assert clock.now + 5.0 <= row["next_attempt_at"] <= clock.now + 10.0
    assert exporter.drain("pacs") == 0  # not due yet
    attempts = 1
    while True:
        row = next(r for r in deliveries_for_series(db, SERIES) if r["kind"] == "seg")
        if row["state"] == "dead":
            break
        assert row["next_attempt_at"] <= queued + 180.0
        clock.now = row["next_attempt_at"]
        assert exporter.drain("pacs") == 1
        attempts += 1
        assert attempts < 20
    assert row["attempts"] == attempts
    assert row["last_error"].startswith(f"gave up after {attempts} attempts")
    assert "connection refused" in row["last_error"]


def test_outcome_for_an_older_generation_is_discarded(tmp_path: Path) -> None:
    sender = ScriptedSender()
    db, exporter, clock = setup(tmp_path, sender)
    config = exporter.config
    seg_uid = next(r["sop_instance_uid"] for r in deliveries_for_series(db, SERIES) if r["kind"] == "seg")

    def readd_while_sending() -> None:  # re-analysis lands while the old file is in flight
        Outbox(db, config, clock=clock).add(SERIES, [result(SEG, seg_uid, value="new")])

    sender.hook = readd_while_sending
    exporter.drain("pacs", max_batches=1)
    rows = {r["kind"]: r for r in deliveries_for_series(db, SERIES)}
    assert rows["seg"]["state"] == "pending" and rows["seg"]["generation"] == 2
    assert rows["sr"]["state"] == "done"
    sender.hook = None
    exporter.drain("pacs")
    assert states(db) == {"seg": "done", "sr": "done"}


def test_unreadable_file_is_dead_and_sender_errors_never_leave_sending(tmp_path: Path) -> None:
    class Broken(ScriptedSender):
        def send(self, batch: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
            raise KeyError("bug")

    db, exporter, _clock = setup(tmp_path, Broken())
    seg = next(r for r in deliveries_for_series(db, SERIES) if r["kind"] == "seg")
    (exporter.config.state_dir / seg["path"]).write_bytes(b"not dicom")
    exporter.drain("pacs")
    rows = {r["kind"]: r for r in deliveries_for_series(db, SERIES)}
    assert rows["seg"]["state"] == "dead" and "unreadable" in rows["seg"]["last_error"]
    assert rows["sr"]["state"] == "failed" and "internal error" in rows["sr"]["last_error"]


def test_shadow_destination_has_no_sender(tmp_path: Path) -> None:
    config = make_config(tmp_path, PACS, export="shadow = true")
    exporter = Exporter(Database(config.index_path), config)
    assert exporter.senders == {} and exporter.active == []
    with pytest.raises(ValueError, match="not active"):
        exporter.deliver_batch("pacs")


def test_metrics_report_states_per_destination(tmp_path: Path) -> None:
    sender = ScriptedSender({SR: classify_store_status(0xA700)})
    db, exporter, _clock = setup(tmp_path, sender)
    exporter.drain("pacs")
    registry = CollectorRegistry()
    register_metrics(db, exporter, registry=registry)
    value = registry.get_sample_value
    assert value("lumbar_deliveries", {"destination": "pacs", "state": "done"}) == 1
    assert value("lumbar_deliveries", {"destination": "pacs", "state": "failed"}) == 1
    assert value("lumbar_deliveries", {"destination": "pacs", "state": "pending"}) == 0
    assert value("lumbar_delivery_attempts_total", {"destination": "pacs", "outcome": "retry"}) == 1
