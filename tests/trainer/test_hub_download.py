"""hf:// models downloaded with the official hub client, from a local hub that speaks its HTTP API.

The hub here serves what ``snapshot_download`` asks for (revision info, the file tree, HEAD and GET
of each file) for one public and one gated repository, and records every request. The trainer's
loading runs in a child process with ``HF_ENDPOINT`` pointing at it, as a pod's would point at
huggingface.co, and ``HF_HUB_OFFLINE`` lifted for that process only.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.processes import checkout_env

TOKEN = "hf_loraplex_test_token"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}


@dataclass
class Hub:
    url: str
    files: dict[str, dict[str, bytes]]
    """Commit -> file name -> content, for every repository (one file tree per commit)."""
    gated: set[str]
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Authorization header) of every request."""

    def file_gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            auth = self.headers.get("Authorization", "")
            hub.requests.append((self.command, self.path, auth))
            path = self.path.split("?", 1)[0]
            repo = re.match(r"^/(?:api/models/)?([^/]+/[^/]+)/", path)
            if repo is None or repo.group(1) not in {"loraplex-tests/tiny", *hub.gated}:
                return self._error(404, "RepoNotFound")
            if repo.group(1) in hub.gated and auth != f"Bearer {TOKEN}":
                return self._error(401, "GatedRepo")
            if m := re.match(r"^/api/models/[^/]+/[^/]+/revision/([^/]+)$", path):
                commit = COMMITS.get(m.group(1)) or (m.group(1) if m.group(1) in COMMITS.values() else None)
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                siblings = [{"rfilename": f} for f in hub.files[commit]]
                return self._json({"id": repo.group(1), "sha": commit, "siblings": siblings})
            if m := re.match(r"^/api/models/[^/]+/[^/]+/tree/([0-9a-f]{40})", path):
                tree = [
                    {"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for f, data in hub.files[m.group(1)].items()
                ]
                return self._json(tree)
            if m := re.match(r"^/[^/]+/[^/]+/resolve/([0-9a-f]{40})/(.+)$", path):
                data = hub.files.get(m.group(1), {}).get(m.group(2))
                if data is None:
                    return self._error(404, "EntryNotFound")
                self.send_response(200)
                self.send_header("X-Repo-Commit", m.group(1))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return None
            return self._error(404, "EntryNotFound")

        def _json(self, value: object) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

        def _error(self, status: int, code: str) -> None:
            data = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

    return Handler


@pytest.fixture(scope="module")
def hub(tiny_model_dir: Path) -> Iterator[Hub]:
    main = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    # Revision v2 differs in a file the trainer reads, and carries a file a download must skip.
    config = json.loads(main["config.json"])
    v2 = {**main, "config.json": json.dumps({**config, "loraplex_revision": "v2"}).encode()}
    v2["pytorch_model.bin"] = b"not fetched: only safetensors, configs and tokenizer files are"
    files = {COMMITS["main"]: main, COMMITS["v2"]: v2}
    # The gated repository serves the same trees; only the token differs.
    state = Hub(url="", files=files, gated={"loraplex-tests/gated"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


LOAD = """
import json, sys
from loraplex_trainer.model_host import ModelUnavailable, load_base_model
uri, revision = sys.argv[1], sys.argv[2] or None
try:
    base = load_base_model(uri, revision=revision)
except ModelUnavailable as error:
    print(json.dumps({"reason": error.reason, "message": str(error)}))
else:
    print(json.dumps({"parameters": base.facts.parameter_count, "config": base.model.config.to_dict()}))
"""


def load(hub: Hub, home: Path, uri: str, revision: str = "", **env: str) -> dict[str, object]:
    """Load a model in a child process whose hub is ``hub`` and whose cache is ``home``."""
    settings = {k: v for k, v in checkout_env().items() if k != "HF_TOKEN"}
    settings.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", **env})
    done = subprocess.run(
        [sys.executable, "-c", LOAD, uri, revision], env=settings, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_hub_model_is_downloaded_once_and_then_read_from_the_cache(hub: Hub, tmp_path: Path) -> None:
    first = load(hub, tmp_path, "hf://loraplex-tests/tiny")
    assert first["parameters"]
    fetched = hub.file_gets()
    assert any(p.endswith("/model.safetensors") for p in fetched)
    # A second replica, or the same one restarted, on the same cache: no file is fetched again.
    second = load(hub, tmp_path, "hf://loraplex-tests/tiny")
    assert second["parameters"] == first["parameters"]
    assert hub.file_gets() == fetched
    # And with the hub out of reach entirely, the cache alone serves it.
    offline = load(hub, tmp_path, "hf://loraplex-tests/tiny", HF_HUB_OFFLINE="1")
    assert offline["parameters"] == first["parameters"]


def test_the_revision_is_honoured_and_only_the_needed_files_are_fetched(hub: Hub, tmp_path: Path) -> None:
    loaded = load(hub, tmp_path, "hf://loraplex-tests/tiny", "v2")
    assert loaded["config"]["loraplex_revision"] == "v2"  # type: ignore[index]
    assert any("/revision/v2" in path for _, path, _ in hub.requests)
    assert not any(p.endswith("pytorch_model.bin") for p in hub.file_gets())
    snapshots = tmp_path / "hub" / "models--loraplex-tests--tiny" / "snapshots"
    assert (snapshots / COMMITS["v2"] / "config.json").is_file()


def test_a_gated_model_needs_the_token_and_gets_it_from_hf_token(hub: Hub, tmp_path: Path) -> None:
    refused = load(hub, tmp_path / "a", "hf://loraplex-tests/gated")
    assert refused["reason"] == "ModelAccessDenied"
    assert "tokenSecretRef" in str(refused["message"])
    loaded = load(hub, tmp_path / "b", "hf://loraplex-tests/gated", HF_TOKEN=TOKEN)
    assert loaded["parameters"]
    assert any(auth == f"Bearer {TOKEN}" for _, path, auth in hub.requests if "gated" in path)


@pytest.mark.parametrize(
    ("uri", "revision", "reason"),
    [
        ("hf://loraplex-tests/no-such-model", "", "ModelNotFound"),
        ("hf://loraplex-tests/tiny", "no-such-branch", "ModelNotFound"),
    ],
)
def test_a_model_the_hub_does_not_have_says_so(
    hub: Hub, tmp_path: Path, uri: str, revision: str, reason: str
) -> None:
    answer = load(hub, tmp_path, uri, revision)
    assert answer["reason"] == reason
    assert uri in str(answer["message"])
