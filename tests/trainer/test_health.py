"""The trainer pod's probes."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

from loraplex_trainer.health import HealthServer


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_server_answers_liveness_at_once_and_readiness_once_loaded() -> None:
    ready = threading.Event()
    server = HealthServer(0, ready.is_set).start()
    try:
        assert get(server.port, "/healthz") == (200, "ok\n")
        assert get(server.port, "/readyz") == (503, "loading the base model\n")
        ready.set()
        assert get(server.port, "/readyz") == (200, "ready\n")
        assert get(server.port, "/other")[0] == 404
    finally:
        server.stop()
