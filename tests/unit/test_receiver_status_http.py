"""node.http status endpoint and node.logs JSON lines (the receiver's operational surface)."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from node import metrics
from node.http import StatusServer
from node.logs import configure_logging


@pytest.fixture
def status() -> Iterator[StatusServer]:
    server = StatusServer("127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def get(server: StatusServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:  # noqa: S310 - loopback
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def test_healthz_is_200_only_when_every_check_passes(status: StatusServer) -> None:
    state = {"ok": True}
    status.add_check("listener", lambda: (state["ok"], {"ports": [11112]}))
    code, body = get(status, "/healthz")
    assert code == 200 and json.loads(body) == {"ok": True, "checks": {"listener": {"ok": True, "ports": [11112]}}}
    state["ok"] = False
    code, body = get(status, "/healthz")
    assert code == 503 and json.loads(body)["ok"] is False


def test_a_broken_check_reports_unhealthy_not_500(status: StatusServer) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("db locked")

    status.add_check("queue", broken)
    code, body = get(status, "/healthz")
    assert code == 503
    assert "db locked" in json.loads(body)["checks"]["queue"]["error"]


def test_metrics_exposition_and_not_found(status: StatusServer) -> None:
    metrics.INSTANCES_REJECTED.labels(reason="sop_class").inc()
    code, body = get(status, "/metrics")
    assert code == 200
    assert b'lumbar_instances_rejected_total{reason="sop_class"}' in body
    assert b"lumbar_cstore_handler_seconds_bucket" in body
    assert get(status, "/other")[0] == 404


def test_json_log_lines() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", "INFO", stream=stream)
        logging.getLogger("node.test").info("stored %s", "1.2.3")
        logging.getLogger("node.test").debug("hidden")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["msg"] == "stored 1.2.3" and record["level"] == "INFO" and record["logger"] == "node.test"
