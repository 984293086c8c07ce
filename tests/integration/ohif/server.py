"""Same-origin web server for the OHIF viewer test.

Serves the prebuilt OHIF ``dist/`` folder, answers ``/app-config.js`` with a configuration
pointing at this server, and proxies ``/dicom-web`` and ``/wado`` to Orthanc (which sends
no CORS headers, so the viewer and the DICOMweb API must share one origin). Unknown paths
fall back to ``index.html`` (client-side routes such as ``/viewer?...``). Listens on
127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import logging
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

PROXIED_PREFIXES = ("/dicom-web", "/wado")
#: Headers needed for SharedArrayBuffer (the OHIF decoders use it).
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
PROXY_TIMEOUT_S = 60.0


def app_config(origin: str) -> str:
    """``window.config`` for OHIF 3.13 with one DICOMweb data source at ``origin``."""
    return f"""window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: false,
  disableConfirmationPrompts: true,
  investigationalUseDialog: {{ option: 'never' }},
  defaultDataSourceName: 'orthanc',
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {{
      friendlyName: 'test Orthanc',
      name: 'orthanc',
      wadoUriRoot: '{origin}/wado',
      qidoRoot: '{origin}/dicom-web',
      wadoRoot: '{origin}/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: {{ enabled: true }},
      omitQuotationForMultipartRequest: true,
    }},
  }}],
}};
"""


class ViewerServer:
    """The viewer + proxy server, in a background thread.

    Parameters
    ----------
    dist
        The OHIF ``dist/`` folder.
    orthanc_port
        HTTP port of Orthanc on 127.0.0.1.
    """

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        self.dist = Path(dist).resolve()
        self.orthanc_port = orthanc_port
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self.config_js = app_config(self.origin).encode()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)

    def __enter__(self) -> ViewerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                logger.debug("viewer server: " + format, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = urlsplit(self.path).path
                if path.startswith(PROXIED_PREFIXES):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, server.config_js, "application/javascript")
                else:
                    self._static(path)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in ISOLATION_HEADERS.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _static(self, path: str) -> None:
                target = (server.dist / path.lstrip("/")).resolve()
                if not target.is_relative_to(server.dist) or not target.is_file():
                    target = server.dist / "index.html"
                content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    content_type = "application/wasm"
                self._send(200, target.read_bytes(), content_type)

            def _proxy(self) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", server.orthanc_port, timeout=PROXY_TIMEOUT_S)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
                try:
                    conn.request("GET", self.path, headers=headers)
                    response = conn.getresponse()
                    body = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                for key, value in ISOLATION_HEADERS.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler
