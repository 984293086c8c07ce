"""``lumbar-node check``: every item against the real thing (ports, a running node, DICOM
peers that accept or refuse the result classes, a STOW-RS service), and its exit status."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProcess, free_port, free_ports, node_command, to_toml, write_mr_series
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from node.commands.check import EXIT_FAILED, FAIL, OK, SKIP, WARN

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, destinations: list[dict[str, Any]] | None = None, **node: Any) -> Path:
    dicom_port, http_port = free_ports(2)
    sections: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": dicom_port, "state_dir": str(tmp_path / "state"),
                 "free_disk_floor_mb": 1, **node},
        "http": {"host": "127.0.0.1", "port": http_port},
    }
    text = to_toml(sections)
    for dest in destinations or []:
        text += "\n[[destinations]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in dest.items())
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def run_check(config: Path, *extra: str) -> tuple[int, dict[str, list[dict[str, str]]]]:
    """Run the command as an administrator would; (exit status, findings by item)."""
    proc = subprocess.run(
        [*node_command(), "check", "--config", str(config), "--json", *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.stdout, proc.stderr
    by_item: dict[str, list[dict[str, str]]] = {}
    for finding in json.loads(proc.stdout)["checks"]:
        by_item.setdefault(finding["item"], []).append(finding)
    return proc.returncode, by_item


def level(findings: dict[str, list[dict[str, str]]], item: str) -> str:
    return findings[item][0]["level"]


def test_a_fresh_host_passes_and_loads_the_models(tmp_path: Path) -> None:
    rc, found = run_check(write_config(tmp_path))
    assert rc == 0
    for item in ("configuration", "state directory", "free space", "running node", "index",
                 "DICOM port", "status endpoint"):
        assert level(found, item) == OK, found[item]
    assert "will be created" in found["state directory"][0]["detail"]
    assert "does not exist yet" in found["index"][0]["detail"]
    models = found["models"][0]
    assert models["level"] == OK and "lumbar-seg-unet" in models["detail"], models
    assert level(found, "destinations") == WARN  # none configured
    assert level(found, "senders") == WARN  # only this machine may send
    assert not (tmp_path / "state").exists()  # the check creates nothing


def test_a_port_taken_by_another_program_fails(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    port = int(next(line for line in config.read_text().splitlines() if line.startswith("port")).split("=")[1])
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        rc, found = run_check(config, "--no-models")
    assert rc == EXIT_FAILED
    assert level(found, "DICOM port") == FAIL
    assert "in use by another program" in found["DICOM port"][0]["detail"]
    assert level(found, "models") == SKIP


def test_senders_say_who_may_send(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    base = config.read_text()
    config.write_text(base + '\n[[callers.allowed]]\nae_title = "MRI3T"\naddress = "10.1.2.3"\n')
    rc, found = run_check(config, "--no-models")
    assert rc == 0 and found["senders"][0] == {
        "item": "senders", "level": OK, "detail": "may send: callers on this machine, MRI3T@10.1.2.3"}
    config.write_text(base + "\n[callers]\nallow_any_loopback = false\n")
    rc, found = run_check(config, "--no-models")
    assert rc == EXIT_FAILED and level(found, "senders") == FAIL


def test_an_index_of_a_newer_layout_fails(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    with sqlite3.connect(tmp_path / "state" / "index.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    rc, found = run_check(config, "--no-models")
    assert rc == EXIT_FAILED
    assert level(found, "index") == FAIL and "newer lumbar-node" in found["index"][0]["detail"]


def test_an_invalid_configuration_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[node]\nport = 70000\n")
    proc = subprocess.run([*node_command(), "check", "--config", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("configuration error: node.port")
    (tmp_path / "afile").write_text("x")
    config = write_config(tmp_path, state_dir=str(tmp_path / "afile" / "state"))
    proc = subprocess.run([*node_command(), "check", "--config", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "node.state_dir" in proc.stderr and "is not a directory" in proc.stderr


def test_a_running_node_is_checked_by_talking_to_it(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory()
    assert node.storescu(write_mr_series(tmp_path / "s", 4)).returncode == 0
    rc, found = run_check(node.config_path, "--no-models", "--files")
    assert rc == 0, found
    assert level(found, "stored files") == OK and found["stored files"][0]["detail"].startswith("4 instance file(s)")  # type: ignore[union-attr]
    assert f"pid {node.proc.pid}" in found["running node"][0]["detail"]  # type: ignore[union-attr]
    assert level(found, "DICOM port") == OK and "answers C-ECHO" in found["DICOM port"][0]["detail"]
    assert level(found, "status endpoint") == OK and "healthy" in found["status endpoint"][0]["detail"]
    assert level(found, "index") == OK and "layout 1" in found["index"][0]["detail"]
    # the check took nothing from it: it still answers, and stops cleanly
    assert node.running
    assert node.stop() == 0


class _Peer:
    """A pynetdicom SCP accepting Verification and the given storage classes."""

    def __init__(self, ae_title: str, classes: list[str]) -> None:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for uid in classes:
            ae.add_supported_context(uid)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def peers() -> Iterator[list[_Peer]]:
    started: list[_Peer] = []
    yield started
    for peer in started:
        peer.stop()


def test_destinations_report_what_they_accept(tmp_path: Path, peers: list[_Peer]) -> None:
    everything = _Peer("ARCHIVE", [SegmentationStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
                                   MRImageStorage])
    sc_only = _Peer("OLDPACS", [SecondaryCaptureImageStorage])
    peers += [everything, sc_only]
    down = free_port()
    config = write_config(tmp_path, [
        {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": everything.port},
        {"name": "oldpacs", "ae_title": "OLDPACS", "host": "127.0.0.1", "port": sc_only.port},
        {"name": "overlays", "ae_title": "OLDPACS", "host": "127.0.0.1", "port": sc_only.port,
         "kinds": ["overlay"]},
        {"name": "wrongae", "ae_title": "NOTME", "host": "127.0.0.1", "port": everything.port},
        {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down, "shadow": True},
    ])
    rc, found = run_check(config, "--no-models")
    assert rc == EXIT_FAILED
    archive = found["destination archive"][0]
    assert archive["level"] == OK and "C-ECHO ok, accepts seg, sr, overlay" in archive["detail"], archive
    old = found["destination oldpacs"][0]
    assert old["level"] == FAIL and "no presentation context for seg, sr" in old["detail"], old
    assert level(found, "destination overlays") == OK  # it is sent only what it takes
    wrong = found["destination wrongae"][0]
    assert wrong["level"] == FAIL and "rejected (permanent)" in wrong["detail"], wrong
    gone = found["destination down"][0]
    assert gone["level"] == FAIL and "shadow" in gone["detail"], gone
    rc, found = run_check(config, "--no-models", "--no-network")
    assert rc == 0
    assert all(found[f"destination {n}"][0]["level"] == SKIP for n in ("archive", "oldpacs", "down"))


class _Qido(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(self.path)  # type: ignore[attr-defined]
        self.send_response(self.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args: Any) -> None:
        return None


def test_a_stow_destination_is_asked_one_qido_query(tmp_path: Path) -> None:
    handlers = {200: type("Ok", (_Qido,), {"status": 200, "seen": []}),
                401: type("Denied", (_Qido,), {"status": 401, "seen": []})}
    servers = {code: ThreadingHTTPServer(("127.0.0.1", 0), h) for code, h in handlers.items()}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = write_config(tmp_path, [
            {"name": f"web{code}", "type": "stow", "url": f"http://127.0.0.1:{s.server_address[1]}/dicom-web"}
            for code, s in servers.items()
        ])
        rc, found = run_check(config, "--no-models")
    finally:
        for server in servers.values():
            server.shutdown()
    assert rc == EXIT_FAILED
    assert level(found, "destination web200") == OK
    assert level(found, "destination web401") == FAIL and "HTTP 401" in found["destination web401"][0]["detail"]
    assert handlers[200].seen == ["/dicom-web/studies?limit=1"]  # type: ignore[attr-defined]


def test_the_tls_certificate_must_load_with_its_key(tmp_path: Path) -> None:
    from test_ingest_tls import make_pki

    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    config = write_config(tmp_path)
    base = config.read_text()

    def with_tls(cert: str, key: str) -> tuple[int, dict[str, list[dict[str, str]]]]:
        config.write_text(base + f'\n[tls]\nenabled = true\nport = {tls_port}\ncert_file = "{pki / cert}"\n'
                                 f'key_file = "{pki / key}"\nca_file = "{pki / "ca.crt"}"\n')
        return run_check(config, "--no-models")

    rc, found = with_tls("server.crt", "server.key")
    assert rc == 0, found
    assert level(found, "TLS certificate") == OK and level(found, "TLS port") == OK
    rc, found = with_tls("server.crt", "client.key")  # the other certificate's key
    assert rc == EXIT_FAILED
    assert level(found, "TLS certificate") == FAIL, found["TLS certificate"]
