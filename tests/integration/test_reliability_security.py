"""Who gets in, what the node keeps private, and what it never writes to its logs.

* Caller policy: a non-loopback caller is refused by the default policy (the policy object,
  fed the addresses the listener would see); on the real listener, a caller listed for
  another address and a wrong called AE title are rejected at association time with the
  reason logged. (the ingest tests' ``test_caller_policy_on_the_real_listener`` covers an unlisted AE.)
* A full run of the real chain on a phantom study (``lumbar-node phantom`` + ``lumbar-node
  push`` -> receiver -> assembly -> analysis -> encoders -> outbox -> a scripted PACS):
  the node's INFO log never contains the patient's name, ID, birth date or accession
  number; ``/healthz`` and ``/metrics`` carry no patient data and ``/metrics`` no UID; the
  status endpoint listens on loopback only; every directory under the state directory is
  0700 and every file 0600.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, node_command, wait_until, write_mr_series
from pydicom import dcmread
from reliability_helpers import ScriptedPacs, query

from node.config import AllowedCaller, CallersSection, load_config
from node.receiver import CallerPolicy

pytestmark = pytest.mark.integration

#: the real analysis on a shared 2-core CPU, encoders, export (s)
CHAIN_DEADLINE_S = 400.0
#: a DICOM UID as it would appear in text (at least 4 dotted numeric components)
UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


# -- caller policy ---------------------------------------------------------------------------


def test_default_policy_refuses_remote_callers_with_a_reason() -> None:
    default = CallerPolicy(CallersSection(), "LUMBARNODE", check_called_ae=False)
    assert default.check("ANYSCU", "LUMBARNODE", "127.0.0.1") is None
    assert default.check("ANYSCU", "LUMBARNODE", "::1") is None
    assert default.check("ANYSCU", "LUMBARNODE", "::ffff:127.0.0.1") is None
    for remote in ("10.1.2.3", "192.168.0.7", "::ffff:10.1.2.3", "fe80::1%eth0", "not-an-address"):
        reason = default.check("ANYSCU", "LUMBARNODE", remote)
        assert reason is not None and "not in callers.allowed" in reason, remote

    listed = CallersSection(
        allow_any_loopback=False,
        allowed=(AllowedCaller(ae_title="MODALITY1", address="10.1.2.3"), AllowedCaller(ae_title="ANYWHERE")),
    )
    policy = CallerPolicy(listed, "LUMBARNODE", check_called_ae=True)
    assert policy.check("MODALITY1", "LUMBARNODE", "10.1.2.3") is None
    assert policy.check("ANYWHERE", "LUMBARNODE", "10.9.9.9") is None
    spoofed = policy.check("MODALITY1", "LUMBARNODE", "10.1.2.4")
    assert spoofed is not None and "listed for 10.1.2.3, not 10.1.2.4" in spoofed
    assert policy.check("MODALITY1", "LUMBARNODE", "127.0.0.1") is not None  # loopback not trusted here
    wrong_called = policy.check("MODALITY1", "OTHERNODE", "10.1.2.3")
    assert wrong_called is not None and policy.is_called_ae_failure(wrong_called)


def test_real_listener_rejects_wrong_address_and_wrong_called_ae(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(
        series={"quiet_seconds": 600.0},
        node={"check_called_ae": True},
        callers={"allow_any_loopback": False, "allowed": [{"ae_title": "MODALITY1", "address": "10.1.2.3"}, {"ae_title": "LOCALSCU", "address": "127.0.0.1"}]},
    )
    files = write_mr_series(tmp_path / "s", 1)
    spoofed = node.storescu(files, calling_ae="MODALITY1")
    assert spoofed.returncode != 0 and "Calling AE Title Not Recognized" in spoofed.stderr, spoofed.stderr
    wrong_called = node.storescu(files, "-aec", "NOTTHISNODE", calling_ae="LOCALSCU")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr, wrong_called.stderr
    log = node.log_text()
    assert "association rejected: calling AE 'MODALITY1' is listed for 10.1.2.3, not 127.0.0.1" in log
    assert "association rejected: called AE title 'NOTTHISNODE' is not 'LUMBARNODE'" in log
    assert query(node.state_dir, "SELECT * FROM instances") == []
    assert node.storescu(files, calling_ae="LOCALSCU").returncode == 0


# -- a full run of the real chain --------------------------------------------------------------


@pytest.fixture
def pacs() -> Iterator[ScriptedPacs]:
    peer = ScriptedPacs()
    yield peer
    peer.stop()


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                found.add(address)
    return found


def test_full_phantom_run_keeps_patient_data_out_of_logs_status_and_permissions(
    node_factory: Callable[..., NodeProcess], pacs: ScriptedPacs, tmp_path: Path
) -> None:
    phantom = tmp_path / "phantom"
    subprocess.run(
        [*node_command(), "phantom", "--out", str(phantom), "--subjects", "1", "--seed", "5",
         "--levels", "L4-L5,L5-S1", "--matrix", "128", "--slices-per-block", "3"],
        check=True, capture_output=True, timeout=300,
    )
    axial = sorted((next(phantom.iterdir()) / "ax").glob("*.dcm"))
    header = dcmread(axial[0], stop_before_pixels=True)
    secrets = {
        "patient name": str(header.PatientName),
        "patient name (family)": str(header.PatientName).split("^")[0] + "^",
        "patient id": str(header.PatientID),
        "birth date": str(header.PatientBirthDate),
        "accession": str(header.AccessionNumber),
    }
    assert all(len(v) >= 6 for v in secrets.values()), secrets
    node = node_factory(destinations=[pacs.destination()], ai={"threads": 1}, logging={"level": "INFO"})
    config = load_config(node.config_path)
    assert config.http.host == "127.0.0.1" and load_config(None).http.host == "127.0.0.1"
    push = subprocess.run(
        [*node_command(), "push", str(phantom), "--to", f"{node.ae_title}@127.0.0.1:{node.port}", "--quiet"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert push.returncode == 0, push.stdout + push.stderr
    series_uid = str(header.SeriesInstanceUID)

    def finished() -> bool:
        jobs = query(node.state_dir, "SELECT state FROM jobs WHERE series_instance_uid = ?", (series_uid,))
        if any(j["state"] == "failed" for j in jobs):
            raise AssertionError(f"analysis failed: {node.log_tail(40)}")
        rows = query(node.state_dir, "SELECT state FROM deliveries WHERE series_uid = ?", (series_uid,))
        return bool(rows) and all(r["state"] == "done" for r in rows)

    wait_until(finished, CHAIN_DEADLINE_S, "results of the phantom's axial series delivered")
    assert pacs.stored, "the scripted PACS received nothing"

    # logs at INFO: no patient identifiers
    log = node.log_text()
    assert "INFO" in log and "outbox:" in log, "the log does not cover the whole chain"
    for what, value in secrets.items():
        assert value not in log, f"the {what} appears in the node's INFO log"

    # status endpoint: loopback only, no patient data, no UIDs in /metrics
    assert listening_addresses(node.http_port) == {"0100007F"}, "status endpoint not bound to 127.0.0.1 only"
    for path in ("/healthz", "/metrics"):
        status, body = node.http_get(path)
        text = body.decode()
        assert status == 200, (path, text[:500])
        for what, value in secrets.items():
            assert value not in text, f"{path} shows the {what}"
    metrics_text = node.http_get("/metrics")[1].decode()
    uids = UID_RE.findall(metrics_text)
    assert not uids, f"/metrics carries UIDs: {uids[:5]}"

    # permissions under the state directory
    loose = []
    for path in [node.state_dir, *node.state_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose.append(f"{oct(mode)} {path.relative_to(node.state_dir)}")
    assert stat.S_IMODE(node.state_dir.stat().st_mode) == 0o700
    assert not loose, loose
    kinds = {p.relative_to(node.state_dir).parts[0] for p in node.state_dir.rglob("*") if p.is_file()}
    assert {"spool", "outbox", "results", "index.sqlite"} <= kinds, kinds
