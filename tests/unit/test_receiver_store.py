"""node.receiver store path (no network): store before ACK, idempotence, refusals."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_mr_dataset, write_dataset
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.config import NodeConfig, load_config
from node.db import Database
from node.instances import (
    InstanceRecord,
    ensure_schema,
    get_instance,
    instances_of_series,
    series_activity,
)
from node.receiver import CallerPolicy, Receiver, is_loopback
from node.spool import Spool
from node.statuses import Status

MR = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
FAILURES = (Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)


def encode(ds: Dataset, tmp_path: Path) -> bytes:
    path = write_dataset(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    return path.read_bytes()


class Harness:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.tmp_path = tmp_path
        base: dict[str, object] = {"node.state_dir": str(tmp_path / "state"), "node.free_disk_floor_mb": 0}
        base.update(overrides)
        self.config: NodeConfig = load_config(None, overrides=base)
        self.db = Database(self.config.index_path)
        ensure_schema(self.db)
        self.spool = Spool(self.config.state_dir)
        self.spool.ensure()
        self.stored: list[InstanceRecord] = []
        self.receiver = Receiver(self.config, self.db, self.spool, on_stored=self.stored.append)

    def store(self, ds: Dataset, sop_class: str | None = None, data: bytes | None = None) -> tuple[Status, str]:
        outcome = self.receiver.store(
            data=data if data is not None else encode(ds, self.tmp_path),
            sop_class_uid=sop_class or str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            calling_ae="TESTSCU",
            peer_address="127.0.0.1",
        )
        return outcome.status, outcome.reason


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.db.close()


def mr(index: int = 0, series_uid: str | None = None, **options: object) -> Dataset:
    return make_mr_dataset(study_uid="1.2.826.0.1.3680043.99.1", series_uid=series_uid or "1.2.826.0.1.3680043.99.1.2", index=index, **options)  # type: ignore[arg-type]


def test_store_persists_indexes_and_notifies(harness: Harness) -> None:
    ds = mr()
    data = encode(ds, harness.tmp_path)
    assert harness.store(ds, data=data) == (Status.SUCCESS, "stored")
    row = get_instance(harness.db, ds.SOPInstanceUID)
    assert row is not None
    assert harness.spool.absolute(row.path).read_bytes() == data
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert (row.modality, row.calling_ae, row.peer_address) == ("MR", "TESTSCU", "127.0.0.1")
    assert row.meta["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert row.meta["BodyPartExamined"] == "LSPINE"
    assert "PatientName" not in row.meta and "Test^Lumbar" not in str(row.meta)
    assert harness.stored == [row]
    assert [r.sop_instance_uid for r in instances_of_series(harness.db, ds.SeriesInstanceUID)] == [ds.SOPInstanceUID]
    activity = series_activity(harness.db)
    assert len(activity) == 1 and activity[0].instance_count == 1


def test_duplicate_is_success_and_keeps_the_first_copy(harness: Harness) -> None:
    ds = mr()
    first = encode(ds, harness.tmp_path)
    assert harness.store(ds, data=first)[0] is Status.SUCCESS
    ds.SeriesDescription = "changed on resend"
    assert harness.store(ds) == (Status.SUCCESS, "duplicate")
    row = get_instance(harness.db, ds.SOPInstanceUID)
    assert row is not None and row.sha256 == hashlib.sha256(first).hexdigest()
    assert harness.spool.absolute(row.path).read_bytes() == first
    assert len(harness.stored) == 1  # duplicates are not announced again


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_refused_with_a900(harness: Harness, keyword: str) -> None:
    ds = mr()
    delattr(ds, keyword)
    assert harness.store(ds) == (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "missing_uid")
    assert get_instance(harness.db, ds.SOPInstanceUID) is None and harness.stored == []


def test_non_image_sop_class_is_refused(harness: Harness) -> None:
    ds = mr()
    ds.SOPClassUID = BASIC_TEXT_SR
    assert harness.store(ds) == (Status.SOP_CLASS_NOT_SUPPORTED, "sop_class")


def test_sop_class_or_instance_mismatch_is_refused(harness: Harness) -> None:
    ds = mr()
    assert harness.store(ds, sop_class="1.2.840.10008.5.1.4.1.1.2")[0] is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    outcome = harness.receiver.store(encode(ds, harness.tmp_path), MR, generate_uid(), ExplicitVRLittleEndian, "A", "127.0.0.1")
    assert (outcome.status, outcome.reason) == (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "uid_mismatch")


def test_garbage_and_truncated_data_cannot_be_understood(harness: Harness) -> None:
    ds = mr()
    data = encode(ds, harness.tmp_path)
    # pydicom parses garbage leniently: it is refused either as unparseable or as lacking UIDs
    assert harness.store(ds, data=b"\x00" * 128 + b"DICM" + b"\xff" * 50)[0] in FAILURES
    assert harness.store(ds, data=b"not dicom at all")[0] in FAILURES
    assert harness.store(ds, data=data[: len(data) - 700]) == (Status.CANNOT_UNDERSTAND, "truncated")
    assert harness.store(ds, data=data[:600])[0] in FAILURES
    assert get_instance(harness.db, ds.SOPInstanceUID) is None


def test_disk_floor_answers_out_of_resources(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"node.free_disk_floor_mb": 10**12})
    assert h.store(mr()) == (Status.OUT_OF_RESOURCES, "disk_floor")


def test_series_limit_and_pixel_limit(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"node.max_instances_per_series": 2, "node.max_pixels_per_frame": 32 * 32})
    assert h.store(mr(0))[0] is Status.SUCCESS
    assert h.store(mr(1))[0] is Status.SUCCESS
    assert h.store(mr(2)) == (Status.OUT_OF_RESOURCES, "series_limit")
    assert h.store(mr(0, series_uid="1.2.3.9", rows=64)) == (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "pixel_limit")


def test_failing_callback_still_acknowledges_the_durable_instance(harness: Harness) -> None:
    def broken(record: InstanceRecord) -> None:
        raise RuntimeError("orchestrator down")

    harness.receiver.on_stored = broken
    ds = mr()
    assert harness.store(ds)[0] is Status.SUCCESS
    assert get_instance(harness.db, ds.SOPInstanceUID) is not None


def test_status_values_are_the_standard_codes() -> None:
    assert Status.SUCCESS == 0x0000 and Status.SUCCESS.is_success
    assert Status.OUT_OF_RESOURCES == 0xA700
    assert Status.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert Status.CANNOT_UNDERSTAND == 0xC000
    assert Status.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert Status.PROCESSING_FAILURE.describe() == "processing_failure"


# -- caller policy -------------------------------------------------------------------------


def policy(text: str, tmp_path: Path, check_called: bool = False) -> CallerPolicy:
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path)
    return CallerPolicy(config.callers, "LUMBARNODE", check_called)


def test_default_policy_accepts_loopback_and_rejects_unknown_remote(tmp_path: Path) -> None:
    p = policy("", tmp_path)
    assert p.check("ANYONE", "LUMBARNODE", "127.0.0.1") is None
    assert p.check("ANYONE", "LUMBARNODE", "::1") is None
    assert p.check("ANYONE", "LUMBARNODE", "::ffff:127.0.0.1") is None
    reason = p.check("ANYONE", "LUMBARNODE", "10.1.2.3")
    assert reason is not None and "ANYONE" in reason and "10.1.2.3" in reason


def test_listed_remote_callers(tmp_path: Path) -> None:
    p = policy(
        "[callers]\nallow_any_loopback = false\n"
        "[[callers.allowed]]\nae_title = 'PACS'\n"
        "[[callers.allowed]]\nae_title = 'SCANNER'\naddress = '10.0.0.7'\n",
        tmp_path,
    )
    assert p.check("PACS", "LUMBARNODE", "10.9.9.9") is None
    assert p.check("SCANNER", "LUMBARNODE", "10.0.0.7") is None
    assert p.check("SCANNER", "LUMBARNODE", "10.0.0.8") is not None
    assert p.check("OTHER", "LUMBARNODE", "127.0.0.1") is not None  # loopback not trusted here


def test_called_ae_check(tmp_path: Path) -> None:
    p = policy("", tmp_path, check_called=True)
    reason = p.check("ANYONE", "WRONGAE", "127.0.0.1")
    assert reason is not None and p.is_called_ae_failure(reason)
    assert p.check("ANYONE", "LUMBARNODE  ", "127.0.0.1") is None


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.5") and is_loopback("::1")
    assert not is_loopback("192.168.1.1") and not is_loopback("garbage")
