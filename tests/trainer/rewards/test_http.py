"""The http reward against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loraplex_api.experiment import RewardSpec
from loraplex_trainer.rewards import RewardError, Sample, build_reward

SAMPLES = [Sample("What is 2 + 2?", "4", {"solution": "4"}), Sample("What is 2 + 3?", "6", {"solution": "5"})]


class RewardHandler(BaseHTTPRequestHandler):
    """Scores by exact match on /ok and misbehaves in one way on every other path."""

    received: list[dict] = []

    def do_POST(self) -> None:  # the name http.server dispatches to
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RewardHandler.received.append(body)
        samples = body["samples"]
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/500":
            self._reply(500, b"model not loaded")
        elif self.path == "/short":
            self._reply(200, json.dumps({"rewards": [1.0]}).encode())
        elif self.path == "/not-json":
            self._reply(200, b"<html>oops</html>")
        elif self.path == "/inf":
            self._reply(200, b'{"rewards": [1.0, Infinity]}')
        else:
            rewards = [float(s["completion"] == s["row"]["answer"]) for s in samples]
            self._reply(200, json.dumps({"rewards": rewards}).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


class QuietServer(ThreadingHTTPServer):
    """A server that does not print the broken pipe of the /slow reply, whose client gave up on purpose."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Ignore: the only errors are writes to clients that timed out."""


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of a reward server running in a background thread."""
    httpd = QuietServer(("127.0.0.1", 0), RewardHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours proxy variables; a proxy must not intercept the loopback server."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def http_reward(url: str, timeout: float = 5.0):
    spec = RewardSpec.model_validate({"http": {"url": url, "timeoutSeconds": timeout}})
    return build_reward(spec, base_dir=Path("."), answer_field="solution")


def test_ok_sends_samples_and_reads_rewards(server: str) -> None:
    assert http_reward(f"{server}/ok")(SAMPLES) == [1.0, 0.0]
    sent = RewardHandler.received[-1]["samples"][0]
    assert sent == {"prompt": "What is 2 + 2?", "completion": "4", "row": {"solution": "4", "answer": "4"}}


def test_server_error_names_url_and_status(server: str) -> None:
    with pytest.raises(
        RewardError, match=r"reward\.http: POST http://127\.0\.0\.1:\d+/500: status 500 .*model not loaded"
    ):
        http_reward(f"{server}/500")(SAMPLES)


def test_timeout(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"/slow: no reply within 0\.5s"):
        http_reward(f"{server}/slow", timeout=0.5)(SAMPLES)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/short", "returned 1 rewards for 2 samples"),
        ("/not-json", "reply is not JSON: '<html>oops</html>'"),
        ("/inf", "reward 1 is inf, expected a finite number"),
    ],
)
def test_bad_replies(server: str, path: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        http_reward(f"{server}{path}")(SAMPLES)


def test_connection_refused() -> None:
    with socket.socket() as probe:  # a port that was just free, so nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RewardError, match=rf"POST http://127\.0\.0\.1:{port}/: .*refused"):
        http_reward(f"http://127.0.0.1:{port}/")(SAMPLES)
