"""The trainer pod's probes: /healthz (the process answers) and /readyz (the base model is loaded).

A stdlib HTTP server in a daemon thread: the probes must answer while the main thread is
busy loading a model or in a long training step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HealthServer:
    """/healthz (the process answers) and /readyz (the base model is loaded) on a stdlib HTTP server."""

    def __init__(self, port: int, ready: Callable[[], bool]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                if self.path == "/healthz":
                    self._answer(200, "ok")
                elif self.path == "/readyz":
                    self._answer(*((200, "ready") if ready() else (503, "loading the base model")))
                else:
                    self._answer(404, "not found")

            def _answer(self, code: int, text: str) -> None:
                body = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no access log
                return

        self._server = ThreadingHTTPServer(("", port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="loraplex-health", daemon=True
        )

    def start(self) -> HealthServer:
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
