"""The TLS listener: DCMTK storescu over mutual TLS, and a silent client blocks nobody."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import STORESCU, NodeProcess, dcmtk_env, free_port, write_mr_series

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Path:
    """A throw-away CA with a server (SAN 127.0.0.1) and a client certificate (EC P-256)."""
    folder.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=lumbar-test-ca", cwd=folder)
    for name, san in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:storescu")):
        (folder / f"{name}.ext").write_text(san + "\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder,
        )
    return folder


def tls_storescu(node: NodeProcess, port: int, pki: Path, files: list[Path], with_client_cert: bool = True) -> subprocess.CompletedProcess[str]:
    # +tla: TLS as an anonymous client (no certificate)
    client = ["+tls", str(pki / "client.key"), str(pki / "client.crt")] if with_client_cert else ["+tla"]
    args = [STORESCU, "-aet", "TLSSCU", "-aec", node.ae_title, *client, "+cf", str(pki / "ca.crt"), "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=60, check=False)


def test_mutual_tls_store_and_silent_clients(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    node = node_factory(
        series={"quiet_seconds": 600.0},
        node={"acse_timeout_s": 5.0},
        tls={
            "enabled": True,
            "port": tls_port,
            "cert_file": str(pki / "server.crt"),
            "key_file": str(pki / "server.key"),
            "ca_file": str(pki / "ca.crt"),
            "require_client_cert": True,
        },
    )
    files = write_mr_series(tmp_path / "s", 3)
    # clients that connect to the TLS port and never start the handshake
    silent = [socket.create_connection(("127.0.0.1", tls_port), timeout=30) for _ in range(3)]
    try:
        started = time.monotonic()
        result = tls_storescu(node, tls_port, pki, files)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 10, "a silent TLS client blocked the listener"
        # without a client certificate the handshake fails: nothing stored from it
        refused = tls_storescu(node, tls_port, pki, write_mr_series(tmp_path / "t", 1), with_client_cert=False)
        assert refused.returncode != 0
        # the silent connections are closed after the handshake deadline (acse_timeout_s)
        for sock in silent:
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()
    assert "dropped before association" in node.log_text()
    status, body = node.http_get("/healthz")
    assert status == 200
    assert f"{tls_port}" in body.decode()
    # the plain listener still works alongside
    assert node.storescu(write_mr_series(tmp_path / "u", 1)).returncode == 0
