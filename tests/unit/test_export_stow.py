"""STOW-RS outcome parsing without a server: per-instance FailedSOPSequence / ReferencedSOPSequence,
HTTP errors (409 with a body, 5xx, 4xx), connection errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset

from node.config import Destination
from node.senders import Verdict
from node.stow import StowSender

A, B = "1.2.3.1", "1.2.3.2"


def dataset(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    return ds


def stow_response(referenced: list[str], failed: dict[str, int]) -> Dataset:
    response = Dataset()
    if referenced:
        response.ReferencedSOPSequence = [Dataset() for _ in referenced]
        for item, uid in zip(response.ReferencedSOPSequence, referenced, strict=True):
            item.ReferencedSOPInstanceUID = uid
    if failed:
        response.FailedSOPSequence = [Dataset() for _ in failed]
        for item, (uid, reason) in zip(response.FailedSOPSequence, failed.items(), strict=True):
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
    return response


def http_error(status: int, body: Dataset | None = None, text: str = "") -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    if body is not None:
        response._content = json.dumps(body.to_json_dict()).encode()
        response.headers["Content-Type"] = "application/dicom+json"
    else:
        response._content = text.encode()
        response.headers["Content-Type"] = "text/plain"
    return requests.HTTPError(f"HTTP {status}", response=response)


@pytest.fixture()
def sender() -> StowSender:
    return StowSender(Destination(name="web", type="stow", url="http://127.0.0.1:9/dicom-web"))


def send_with(sender: StowSender, monkeypatch: pytest.MonkeyPatch, result: Any) -> dict[int, Any]:
    def store_instances(datasets: list[Dataset]) -> Dataset:
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(sender.client, "store_instances", store_instances)
    return sender.send([(1, dataset(A)), (2, dataset(B))])


def test_mixed_response_is_decided_per_instance(sender: StowSender, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = send_with(sender, monkeypatch, stow_response([A], {B: 0x0122}))
    assert outcomes[1].verdict is Verdict.DONE
    assert outcomes[2].verdict is Verdict.DEAD and "SOP class not supported" in outcomes[2].reason


def test_conflict_with_body_is_parsed(sender: StowSender, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = send_with(sender, monkeypatch, http_error(409, stow_response([A], {B: 0xA700})))
    assert outcomes[1].verdict is Verdict.DONE
    assert outcomes[2].verdict is Verdict.RETRY and "out of resources" in outcomes[2].reason


def test_empty_ok_means_stored(sender: StowSender, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = send_with(sender, monkeypatch, Dataset())
    assert {o.verdict for o in outcomes.values()} == {Verdict.DONE}


def test_instance_missing_from_a_listing_is_retried(sender: StowSender, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = send_with(sender, monkeypatch, stow_response([A], {}))
    assert outcomes[1].verdict is Verdict.DONE and outcomes[2].verdict is Verdict.RETRY


@pytest.mark.parametrize(("status", "verdict"), [(503, Verdict.RETRY), (429, Verdict.RETRY), (400, Verdict.DEAD), (415, Verdict.DEAD)])
def test_http_errors_without_body(
    sender: StowSender, monkeypatch: pytest.MonkeyPatch, status: int, verdict: Verdict
) -> None:
    outcomes = send_with(sender, monkeypatch, http_error(status, text="nope"))
    assert {o.verdict for o in outcomes.values()} == {verdict}
    assert f"HTTP {status}" in outcomes[1].reason and "nope" in outcomes[1].reason


def test_connection_error_is_retried(sender: StowSender, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = send_with(sender, monkeypatch, requests.ConnectionError("refused"))
    assert {o.verdict for o in outcomes.values()} == {Verdict.RETRY}


def test_not_a_stow_destination() -> None:
    with pytest.raises(ValueError, match="not a STOW-RS destination"):
        StowSender(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104))
