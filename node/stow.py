"""DICOMweb STOW-RS destination (``type = "stow"``): one POST per batch via dicomweb-client.

The response (PS3.18 10.5.3) lists stored instances in ReferencedSOPSequence (with an
optional WarningReason) and refused ones in FailedSOPSequence with a FailureReason, whose
values are the DIMSE storage statuses; they are classified exactly like C-STORE statuses
(:func:`node.senders.classify_store_status`). HTTP-level trouble is classified by status
code: 408, 429 and 5xx and connection errors are retried, other 4xx are permanent.
dicomweb-client's own retries are switched off: the exporter owns the schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from node.config import Destination
from node.senders import Outcome, Probe, Verdict, classify_store_status

logger = logging.getLogger(__name__)

#: HTTP statuses after which the same request may succeed later
TRANSIENT_HTTP = frozenset(
    {
        HTTPStatus.REQUEST_TIMEOUT,
        HTTPStatus.TOO_MANY_REQUESTS,
        HTTPStatus.INTERNAL_SERVER_ERROR,
        HTTPStatus.BAD_GATEWAY,
        HTTPStatus.SERVICE_UNAVAILABLE,
        HTTPStatus.GATEWAY_TIMEOUT,
    }
)
#: HTTP statuses whose body may still list per-instance results (partial success, conflict)
PER_INSTANCE_HTTP = frozenset({HTTPStatus.OK, HTTPStatus.ACCEPTED, HTTPStatus.CONFLICT})
#: FailureReason used when a refused instance has none (0xC000: cannot understand)
UNSPECIFIED_FAILURE = 0xC000
#: how much of an HTTP error body goes into the reason
BODY_EXCERPT = 200


def session_for(destination: Destination) -> requests.Session:
    """A requests session with the destination's CA bundle and client certificate."""
    session = requests.Session()
    tls = destination.tls
    if tls is not None:
        if tls.ca_file is not None:
            session.verify = str(tls.ca_file)
        if tls.cert_file is not None and tls.key_file is not None:
            session.cert = (str(tls.cert_file), str(tls.key_file))
    return session


class StowSender:
    """STOW-RS client for one destination; see the module docstring for outcomes.

    Parameters
    ----------
    destination
        ``url`` is the DICOMweb root (``http://pacs:8042/dicom-web``); instances are
        POSTed to ``{url}/studies``.
    timeout_s
        Connect and read timeout of each request.
    """

    def __init__(self, destination: Destination, timeout_s: float = 60.0) -> None:
        if destination.type != "stow" or not destination.url:
            raise ValueError(f"destination {destination.name!r} is not a STOW-RS destination")
        self.destination = destination
        self.timeout_s = timeout_s
        self.session = session_for(destination)
        self.client = DICOMwebClient(
            url=destination.url.rstrip("/"), session=self.session, timeout=timeout_s
        )
        self.client.set_http_retry_params(retry=False)

    def send(self, batch: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
        """POST ``batch`` in one multipart request and return an outcome per row id."""
        ids_by_uid = {str(ds.SOPInstanceUID): row_id for row_id, ds in batch}
        url = self.destination.url
        try:
            response = self.client.store_instances(datasets=[ds for _, ds in batch])
            http_status = int(HTTPStatus.OK)
        except requests.HTTPError as exc:
            if exc.response is None:
                outcome = Outcome(Verdict.RETRY, f"STOW-RS to {url} failed: {exc}")
                return dict.fromkeys(ids_by_uid.values(), outcome)
            http_status = exc.response.status_code
            parsed = _response_dataset(exc.response)
            if http_status not in PER_INSTANCE_HTTP or parsed is None:
                verdict = Verdict.RETRY if http_status in TRANSIENT_HTTP else Verdict.DEAD
                excerpt = exc.response.text[:BODY_EXCERPT].strip()
                outcome = Outcome(
                    verdict, f"STOW-RS to {url} answered HTTP {http_status}: {excerpt}"
                )
                return dict.fromkeys(ids_by_uid.values(), outcome)
            response = parsed
        except (requests.ConnectionError, requests.Timeout) as exc:
            outcome = Outcome(Verdict.RETRY, f"cannot reach STOW-RS service {url}: {exc}")
            return dict.fromkeys(ids_by_uid.values(), outcome)
        return _per_instance(response, ids_by_uid, http_status)


    def probe(self) -> Probe:
        """Ask the service for one study (QIDO-RS ``GET {url}/studies?limit=1``); store nothing.

        Any HTTP answer but 401 / 403 / 5xx counts as reachable: a STOW-only service may not
        offer QIDO-RS, but it answered, with the destination's TLS settings and credentials.
        """
        url = f"{self.destination.url.rstrip('/')}/studies"  # type: ignore[union-attr]
        try:
            response = self.session.get(
                url, params={"limit": "1"}, headers={"Accept": "application/dicom+json"},
                timeout=self.timeout_s,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            return Probe(False, f"cannot reach {url}: {exc}")
        code = response.status_code
        if code in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN) or code >= HTTPStatus.INTERNAL_SERVER_ERROR:
            excerpt = response.text[:BODY_EXCERPT].strip()
            return Probe(False, f"{url} answered HTTP {code}: {excerpt}")
        return Probe(True, f"{url} answered HTTP {code}")


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The STOW-RS response body as a dataset (DICOM JSON), or None when there is none."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type not in ("application/dicom+json", "application/json") or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("unreadable STOW-RS response body: %s", exc)
        return None


def _per_instance(
    response: Dataset, ids_by_uid: dict[str, int], http_status: int
) -> dict[int, Outcome]:
    outcomes: dict[int, Outcome] = {}
    for item in response.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in ids_by_uid:
            reason = item.get("FailureReason")
            code = int(reason) if reason is not None else UNSPECIFIED_FAILURE
            outcomes[ids_by_uid[uid]] = classify_store_status(code, "STOW-RS FailureReason")
    for item in response.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in ids_by_uid and ids_by_uid[uid] not in outcomes:
            warning = item.get("WarningReason")
            outcomes[ids_by_uid[uid]] = (
                classify_store_status(int(warning), "STOW-RS WarningReason")
                if warning is not None
                else Outcome(Verdict.DONE, "success")
            )
    for uid, row_id in ids_by_uid.items():
        if row_id not in outcomes:
            outcomes[row_id] = (
                # a 200 without any per-instance list means every instance was stored
                Outcome(Verdict.DONE, "success")
                if http_status == HTTPStatus.OK
                and "FailedSOPSequence" not in response
                and "ReferencedSOPSequence" not in response
                else Outcome(Verdict.RETRY, f"{uid} not mentioned in the STOW-RS response")
            )
    return outcomes
