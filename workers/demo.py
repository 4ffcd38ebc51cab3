"""The demo page `sitewire run` serves: a pretend shop with the tracking script installed, on
its own origin (http://127.0.0.1:PORT, allowed by the demo site), so a newcomer clicks around
in a normal browser and watches the events arrive on the dashboard or in `sitewire tail`.

Every path answers the same page (it is a single-page app; its links also work when typed),
except /files/*, the target of its download link. A thread of the `sitewire run` process: it
is local tooling, not part of a deployment.
"""

from __future__ import annotations

import html
import http.server
import threading
from importlib import resources
from typing import Any


class DemoPage:
    def __init__(self, port: int, site: str, ingest: str, dashboard: str, tail: str) -> None:
        template = resources.files("app").joinpath("static/demo.html").read_text()
        values = {"SITE": site, "INGEST": ingest, "DASHBOARD": dashboard, "TAIL": tail}
        for name, value in values.items():
            template = template.replace("{{" + name + "}}", html.escape(value))
        self.page = template.encode()
        self.url = f"http://127.0.0.1:{port}/"
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(self.page))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(page: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/files/"):
                body, kind = b"plan,price\nStarter,0\nPro,9\nTeam,29\n", "text/csv"
            else:
                body, kind = page, "text/html; charset=utf-8"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the stack's terminal is for the banner and the logs."""

    return Handler
