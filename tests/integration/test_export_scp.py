"""C-STORE SCU behaviour against scripted pynetdicom SCPs on loopback: per-instance statuses,
association rejection, a peer that is down, compressed files, TLS with client certificates."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, AllStoragePresentationContexts, evt
from result_samples import make_result_set

from node.config import load_config
from node.db import Database
from node.encode.transcode import transcode
from node.export import Exporter
from node.outbox import Outbox, deliveries_for_series

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class ScriptedSCP:
    """A storage SCP answering each SOP class with a scripted status."""

    statuses: dict[str, int] = field(default_factory=dict)
    syntaxes: dict[str, list[str]] = field(default_factory=dict)
    require_called_aet: bool = False
    ssl_context: ssl.SSLContext | None = None
    received: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    server: Any = None

    def start(self) -> None:
        ae = AE(ae_title="SCRIPTED")
        ae.require_called_aet = self.require_called_aet
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, self.syntaxes.get(cx.abstract_syntax, cx.transfer_syntax))
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )

    def _on_store(self, event: Any) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        self.received.append((sop_class, str(event.context.transfer_syntax)))
        return self.statuses.get(sop_class, 0x0000)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture()
def scp() -> Iterator[ScriptedSCP]:
    peer = ScriptedSCP()
    yield peer
    peer.stop()


def deliver(
    tmp_path: Path, port: int, datasets: list[Any], series_uid: str, extra: str = "", called: str = "SCRIPTED"
) -> Database:
    config_path = tmp_path / "node.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        f'[node]\nstate_dir = "{tmp_path / "state"}"\n[[destinations]]\nname = "pacs"\n'
        f'ae_title = "{called}"\nhost = "127.0.0.1"\nport = {port}\n{extra}'
    )
    config = load_config(config_path)
    db = Database(config.index_path)
    Outbox(db, config).add(series_uid, datasets)
    Exporter(db, config).drain("pacs")
    return db


def by_class(db: Database, series_uid: str) -> dict[str, dict[str, Any]]:
    return {r["sop_class_uid"]: r for r in deliveries_for_series(db, series_uid)}


def test_per_instance_statuses_in_one_association(tmp_path: Path, scp: ScriptedSCP) -> None:
    scp.statuses = {SEG: 0xB000, SR: 0xA700, SC: 0xA900}
    scp.start()
    results = make_result_set()
    rows = by_class(deliver(tmp_path, scp.port, results.results, results.series_uid), results.series_uid)
    assert len(scp.received) == 3
    assert rows[SEG]["state"] == "done" and "warning 0xB000" in rows[SEG]["last_error"]
    assert rows[SR]["state"] == "failed" and "out of resources" in rows[SR]["last_error"]
    assert rows[SC]["state"] == "dead" and "does not match SOP class" in rows[SC]["last_error"]


def test_permanent_association_rejection_is_dead(tmp_path: Path, scp: ScriptedSCP) -> None:
    scp.require_called_aet = True  # the SCP is SCRIPTED; the node calls WRONG
    scp.start()
    results = make_result_set()
    db = deliver(tmp_path, scp.port, results.results, results.series_uid, called="WRONG")
    rows = by_class(db, results.series_uid)
    assert {r["state"] for r in rows.values()} == {"dead"}
    assert "association rejected (permanent)" in rows[SEG]["last_error"]
    assert "Called AE title not recognised" in rows[SEG]["last_error"]
    assert scp.received == []


def test_peer_down_is_retried(tmp_path: Path) -> None:
    results = make_result_set()
    rows = by_class(deliver(tmp_path, free_port(), results.results, results.series_uid), results.series_uid)
    assert {r["state"] for r in rows.values()} == {"failed"}
    assert "cannot associate" in rows[SEG]["last_error"]


def test_compressed_file_is_sent_as_is_or_decompressed(tmp_path: Path, scp: ScriptedSCP) -> None:
    results = make_result_set()
    overlay = results.overlay
    overlay.compress(RLELossless)
    scp.syntaxes = {SC: [ExplicitVRLittleEndian]}  # RLE not accepted: decompress first
    scp.start()
    db = deliver(tmp_path / "a", scp.port, [overlay], results.series_uid)
    assert by_class(db, results.series_uid)[SC]["state"] == "done"
    assert scp.received == [(SC, ExplicitVRLittleEndian)]

    rle_peer = ScriptedSCP(syntaxes={SC: [RLELossless, ExplicitVRLittleEndian]})
    rle_peer.start()
    try:
        db = deliver(tmp_path / "b", rle_peer.port, [overlay], results.series_uid)
    finally:
        rle_peer.stop()
    assert by_class(db, results.series_uid)[SC]["state"] == "done"
    assert rle_peer.received == [(SC, RLELossless)]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> None:
    """A throw-away CA and server/client EC P-256 certificates (server SAN IP 127.0.0.1)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext",
            cwd=directory,
        )


def test_tls_destination_with_client_certificate(tmp_path: Path, scp: ScriptedSCP) -> None:
    pki = tmp_path / "pki"
    make_pki(pki)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    scp.ssl_context = server_ctx
    scp.start()
    results = make_result_set()
    tls = (
        f'[destinations.tls]\nca_file = "{pki / "ca.crt"}"\ncert_file = "{pki / "client.crt"}"\n'
        f'key_file = "{pki / "client.key"}"\n'
    )
    db = deliver(tmp_path, scp.port, results.results, results.series_uid, extra=tls)
    assert {r["state"] for r in by_class(db, results.series_uid).values()} == {"done"}
    assert len(scp.received) == 3


def test_deflated_file_is_sent_deflated_or_inflated(tmp_path: Path, scp: ScriptedSCP) -> None:
    results = make_result_set()
    seg = transcode(results.seg, DeflatedExplicitVRLittleEndian)
    scp.syntaxes = {SEG: [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian]}
    scp.start()
    db = deliver(tmp_path / "a", scp.port, [seg], results.series_uid)
    assert by_class(db, results.series_uid)[SEG]["state"] == "done"
    assert scp.received == [(SEG, DeflatedExplicitVRLittleEndian)]

    plain = ScriptedSCP(syntaxes={SEG: [ExplicitVRLittleEndian]})
    plain.start()
    try:
        db = deliver(tmp_path / "b", plain.port, [seg], results.series_uid)
    finally:
        plain.stop()
    assert by_class(db, results.series_uid)[SEG]["state"] == "done"
    assert plain.received == [(SEG, ExplicitVRLittleEndian)]
