"""Idle and slow peers, plain and TLS, do not delay a normal peer, and do not stay forever.

pynetdicom 3.0.4 performs the TLS handshake in its accept thread (one silent client blocks
every new association) and counts every open TCP connection against
``maximum_associations`` (so 16 silent connections lock modalities out). The ingest tests'
``test_ingest_tls`` / ``test_idle_connections_do_not_block_and_time_out`` cover a few silent
clients; here 20 silent plain connections, 20 silent TLS connections (more than the
default ``node.max_associations`` = 16) and two clients trickling one byte a second (an
A-ASSOCIATE-RQ on the plain port, a TLS ClientHello on the TLS port) are open while DCMTK
``storescu`` stores a series over plain TCP and over mutual TLS. Each must succeed within
a generous bound of its baseline measured in the same test. The trickling clients are cut
off at the request deadline (``node.acse_timeout_s`` from the connection, in total).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, free_port, wait_until, write_mr_series
from test_ingest_tls import make_pki, tls_storescu

pytestmark = pytest.mark.integration

IDLE = 20
SERIES = 20
ACSE_TIMEOUT_S = 8.0
TRICKLE_INTERVAL_S = 1.0
#: the loaded store may take this factor of its baseline, plus a fixed allowance (s)
SLOWDOWN_FACTOR = 3.0
SLOWDOWN_ALLOWANCE_S = 5.0


class Trickler:
    """Sends ``payload`` one byte every :data:`TRICKLE_INTERVAL_S`; records when the node cut it."""

    def __init__(self, port: int, payload: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.payload = payload
        self.started = time.monotonic()
        self.cut_after_s: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for byte in self.payload:
                if self.stop.wait(TRICKLE_INTERVAL_S):
                    return
                self.sock.send(bytes([byte]))
        except OSError:
            self.cut_after_s = time.monotonic() - self.started

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def client_hello() -> bytes:
    """The bytes of a TLS ClientHello (what a client sends first)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


#: an A-ASSOCIATE-RQ header announcing 4 KiB that will arrive one byte a second
ASSOCIATE_RQ_START = b"\x01\x00\x00\x00\x10\x00" + b"\x00\x01\x00\x00" + b"LUMBARNODE      " + b"\x00" * 4080


@pytest.fixture
def tls_node(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> Iterator[tuple[NodeProcess, int, Path]]:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    node = node_factory(
        series={"quiet_seconds": 600.0},
        node={"acse_timeout_s": ACSE_TIMEOUT_S},
        tls={
            "enabled": True, "port": tls_port, "cert_file": str(pki / "server.crt"),
            "key_file": str(pki / "server.key"), "ca_file": str(pki / "ca.crt"), "require_client_cert": True,
        },
    )
    yield node, tls_port, pki


def timed(action: Callable[[], int]) -> float:
    started = time.monotonic()
    assert action() == 0
    return time.monotonic() - started


def test_idle_and_trickling_peers_do_not_delay_plain_or_tls_stores(
    tls_node: tuple[NodeProcess, int, Path], tmp_path: Path
) -> None:
    node, tls_port, pki = tls_node
    batches = iter(write_mr_series(tmp_path / f"s{i}", SERIES) for i in range(4))

    def plain() -> int:
        return node.storescu(next(batches)).returncode

    def over_tls() -> int:
        return tls_storescu(node, tls_port, pki, next(batches)).returncode

    baseline = {"plain": timed(plain), "tls": timed(over_tls)}
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for port in (node.port, tls_port) for _ in range(IDLE)]
    tricklers = [Trickler(node.port, ASSOCIATE_RQ_START), Trickler(tls_port, client_hello())]
    try:
        loaded = {"plain": timed(plain), "tls": timed(over_tls)}
        for kind in ("plain", "tls"):
            bound = baseline[kind] * SLOWDOWN_FACTOR + SLOWDOWN_ALLOWANCE_S
            assert loaded[kind] < bound, f"{kind}: {loaded[kind]:.1f} s with idle peers, baseline {baseline[kind]:.1f} s"
        # the node cuts every one of them off at the request deadline, trickling or not
        wait_until(lambda: all(t.cut_after_s is not None for t in tricklers), ACSE_TIMEOUT_S * 4, "tricklers cut off")
        for sock in idle:
            assert sock.recv(1) == b""
    finally:
        for t in tricklers:
            t.close()
        for sock in idle:
            sock.close()
    cut = [t.cut_after_s or 0.0 for t in tricklers]
    assert all(ACSE_TIMEOUT_S * 0.9 <= c <= ACSE_TIMEOUT_S * 3 for c in cut), cut
    assert "no association request within" in node.log_text()
    print(  # noqa: T201 - figures for docs/reliability.md
        f"{SERIES} instances: plain {baseline['plain']:.2f} s -> {loaded['plain']:.2f} s, "
        f"TLS {baseline['tls']:.2f} s -> {loaded['tls']:.2f} s with {2 * IDLE} idle and 2 trickling peers; "
        f"tricklers cut after {cut[0]:.1f} / {cut[1]:.1f} s"
    )
