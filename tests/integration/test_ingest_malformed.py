"""Malformed input gets a failure status from the real node, which stays up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, c_echo, make_mr_dataset, write_dataset
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

pytestmark = pytest.mark.integration


#: these tests are about receiving: no series completes (and no analysis runs) while they do
INGEST_ONLY: dict[str, dict[str, object]] = {"series": {"quiet_seconds": 600.0}}


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """A running node whose series never complete during the test."""
    return node_factory(**INGEST_ONLY)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture
def raw_sending() -> Iterator[None]:
    """Send files byte for byte (no decoding), so broken files reach the node as they are."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def send_files(node: NodeProcess, files: list[tuple[Path, str]]) -> list[int | None]:
    """C-STORE each (path, SOP class) on one association; the statuses."""
    ae = AE(ae_title="RAWSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sorted({c for _, c in files}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    statuses: list[int | None] = []
    try:
        for path, _ in files:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if status is not None and "Status" in status else None)
    finally:
        assoc.release()
    return statuses


def mr(tmp_path: Path, name: str) -> tuple[Dataset, Path]:
    ds = make_mr_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    return ds, tmp_path / name


def test_malformed_instances_fail_and_the_node_stays_up(node: NodeProcess, tmp_path: Path, raw_sending: None) -> None:
    good, good_path = mr(tmp_path, "good.dcm")
    write_dataset(good, good_path)

    truncated_path = tmp_path / "truncated.dcm"
    truncated_path.write_bytes(good_path.read_bytes()[:-1000])

    no_study, no_study_path = mr(tmp_path, "no-study.dcm")
    del no_study.StudyInstanceUID
    write_dataset(no_study, no_study_path)

    no_series, no_series_path = mr(tmp_path, "no-series.dcm")
    del no_series.SeriesInstanceUID
    write_dataset(no_series, no_series_path)

    sr = Dataset()
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr_path = write_dataset(sr, tmp_path / "report.dcm")

    mr_class = str(good.SOPClassUID)
    statuses = send_files(
        node,
        [
            (truncated_path, mr_class),
            (no_study_path, mr_class),
            (no_series_path, mr_class),
            (sr_path, BASIC_TEXT_SR),
            (good_path, mr_class),
        ],
    )
    assert statuses == [0xC000, 0xA900, 0xA900, 0x0122, 0x0000]
    assert node.running and c_echo(node.port, node.ae_title) == 0
    log = node.log_text()
    assert "PixelData has" in log  # the reason is logged with the UID
    assert "StudyInstanceUID is missing" in log and "SeriesInstanceUID is missing" in log
    assert "not an image class" in log
    assert "Test^Lumbar" not in log and "TEST0001" not in log  # no patient data at INFO
    status, body = node.http_get("/metrics")
    text = body.decode()
    for reason, count in (("truncated", 1), ("missing_uid", 2), ("sop_class", 1)):
        assert f'lumbar_instances_rejected_total{{reason="{reason}"}} {count}.0' in text
    assert str(good.SOPInstanceUID) not in text
