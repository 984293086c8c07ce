"""The status endpoint: ``GET /healthz`` (JSON) and ``GET /metrics`` (Prometheus text).

Bound to loopback by default (``[http] host``); it has no authentication and carries no
patient data or UIDs. ``/healthz`` runs every registered check; it answers 200 when all
pass and 503 otherwise, with a JSON body such as::

    {"ok": true, "checks": {"listener": {"ok": true, "ports": [11112]},
                            "disk": {"ok": true, "free_mb": 51234.5, "floor_mb": 500},
                            "queue": {"ok": true, ...}}}
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from node import metrics

logger = logging.getLogger(__name__)

#: a check returns (ok, details); details must be JSON-serialisable and UID-free
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
HTTP_OK = 200
HTTP_NOT_FOUND = 404
HTTP_UNAVAILABLE = 503


class StatusServer:
    """A small threaded HTTP server for ``/healthz`` and ``/metrics``."""

    def __init__(self, host: str, port: int) -> None:
        self._checks: dict[str, HealthCheck] = {}
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self._httpd.server_address[1])

    def add_check(self, name: str, check: HealthCheck) -> None:
        """Register a named health check (replaces one of the same name)."""
        self._checks[name] = check

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Run every check; a check that raises counts as failed with its error."""
        results: dict[str, Any] = {}
        all_ok = True
        for name, check in list(self._checks.items()):
            try:
                ok, details = check()
            except Exception as exc:  # noqa: BLE001 - a broken check reports unhealthy, not a 500
                logger.exception("health check %s failed", name)
                ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
            results[name] = {"ok": ok, **details}
            all_ok = all_ok and ok
        return all_ok, {"ok": all_ok, "checks": results}

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http-status",
            daemon=True,
        )
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        logger.info("status endpoint on http://%s:%d (/healthz, /metrics)", host, port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5.0)
        self._httpd.server_close()


def _make_handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lumbar-node"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, body = server.health()
                self._send(
                    HTTP_OK if ok else HTTP_UNAVAILABLE,
                    "application/json",
                    json.dumps(body).encode(),
                )
            elif path == "/metrics":
                self._send(HTTP_OK, metrics.CONTENT_TYPE, metrics.render())
            else:
                self._send(HTTP_NOT_FOUND, "text/plain", b"not found: try /healthz or /metrics\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
            logger.debug("http %s " + format, self.client_address[0], *args)

    return Handler
