"""The serving proxy's own answers, without vLLM behind it: bad requests, unknown names, vLLM away.

The answers with vLLM behind it are tested with a real `vllm serve` in tests/vllm/test_serving.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from loraplex_trainer.serving import (
    ConfigMapFolderSource,
    Router,
    Served,
    build_app,
    free_port,
    stage_adapter,
)


def _ask(router: Router, *requests: tuple[str, str, Any], **app: Any) -> list[tuple[int, Any]]:
    async def run() -> list[tuple[int, Any]]:
        async with TestClient(TestServer(build_app(router, ClientSession, **app))) as client:
            answers = []
            for method, path, body, *headers in requests:
                response = await client.request(
                    method,
                    path,
                    headers=headers[0] if headers else None,
                    **({"data": body} if isinstance(body, str) else {"json": body}),
                )
                answers.append(
                    (
                        response.status,
                        await response.json()
                        if response.content_type == "application/json"
                        else await response.text(),
                    )
                )
            return answers

    return asyncio.run(run())


def _router() -> Router:
    router = Router("smollm2", f"http://127.0.0.1:{free_port()}", source=dict)  # nothing listens there
    router.routes["exp-a"] = Served("step-00000020", "pvc://c/step-00000020", "exp-a@step-00000020", 0.0)
    router.problems["exp-b"] = "vLLM load_lora_adapter exp-b@step-1: 404 No adapter found"
    return router


def test_requests_the_proxy_cannot_pass_on_get_openai_style_errors_naming_the_cause() -> None:
    answers = _ask(
        _router(),
        ("POST", "/v1/completions", "not json"),
        ("POST", "/v1/completions", {"prompt": "no model"}),
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
        ("POST", "/v1/chat/completions", {"model": "exp-b", "messages": []}),
        ("POST", "/v1/completions", {"model": "exp-a", "prompt": "x"}),  # vLLM is away
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/"}),  # never forwarded
    )
    (bad_json, no_model, unknown, unloadable, away, admin) = answers
    assert bad_json[0] == 400 and no_model[0] == 400
    assert unknown[0] == 404 and "`nope` does not exist" in unknown[1]["error"]["message"]
    assert unknown[1]["error"]["type"] == "NotFoundError"
    assert unloadable[0] == 404 and "promoted but cannot be served" in unloadable[1]["error"]["message"]
    assert away[0] == 503 and away[1]["error"]["type"] == "ServiceUnavailableError"
    assert admin[0] in (404, 405)


def test_models_and_served_list_the_base_and_the_routed_experiments_only() -> None:
    (models, served, ready) = _ask(
        _router(), ("GET", "/v1/models", None), ("GET", "/loraplex/served", None), ("GET", "/ready", None)
    )
    assert [m["id"] for m in models[1]["data"]] == ["smollm2", "exp-a"]
    assert models[1]["data"][1]["revision"] == "step-00000020"
    assert served[1]["served"]["exp-a"] == {
        "revision": "step-00000020", "uri": "pvc://c/step-00000020", "since": "1970-01-01T00:00:00Z"
    }  # fmt: skip
    assert ready[0] == 503  # not synced yet


def test_a_checkpoint_is_copied_only_from_regular_files_that_match_its_manifest(tmp_path: Path) -> None:
    import hashlib
    import json

    source = tmp_path / "step-00000001"
    source.mkdir()
    files = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    manifest = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    (source / "manifest.json").write_text(json.dumps({"format": 1, "files": manifest}))
    staged = stage_adapter(source, tmp_path, verify_manifest=True)
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == files and staged.parent == tmp_path

    (source / "adapter_model.safetensors").write_bytes(b"altered")
    with pytest.raises(ValueError, match="does not match the checkpoint's manifest"):
        stage_adapter(source, tmp_path, verify_manifest=True)
    (source / "adapter_model.safetensors").unlink()
    (source / "adapter_model.safetensors").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        stage_adapter(source, tmp_path, verify_manifest=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [source.name, staged.name]
    )  # nothing left over


def test_a_replaced_adapter_is_unloaded_only_after_its_last_request(tmp_path: Path) -> None:
    for step in (1, 2):
        folder = tmp_path / "ckpt" / f"step-0000000{step}"
        folder.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / name).write_text(f"{name} {step}")
    promoted = tmp_path / "promoted"  # the ConfigMap, mounted
    promoted.mkdir()
    copies = tmp_path / "copies"
    copies.mkdir()
    router = Router("base", "http://vllm", ConfigMapFolderSource(promoted), stage_root=copies)
    calls: list[tuple[str, str]] = []

    async def admin(session: object, action: str, body: dict[str, str]) -> None:
        calls.append((action, body["lora_name"]))  # vLLM's side is tested against vLLM (tests/vllm)

    router._admin = admin  # type: ignore[method-assign]

    def promote(step: int) -> None:
        (promoted / "exp-a").write_text(f"file://{tmp_path}/ckpt/step-0000000{step}")
        asyncio.run(router.sync(None))  # type: ignore[arg-type]

    promote(1)
    first = router.acquire("exp-a")  # a long request starts on the first revision
    promote(2)
    second = router.acquire("exp-a")
    assert first is not None and second is not None and first != second
    assert ("unload_lora_adapter", first) not in calls  # still in flight
    router.release(first)
    asyncio.run(router.sync(None))  # type: ignore[arg-type]
    assert ("unload_lora_adapter", first) in calls
    router.release(second)
    promote(1)  # a rollback loads under a name of its own again
    assert router.routes["exp-a"].vllm_name not in (first, second)
    assert len(list(copies.iterdir())) == 1  # the unloaded ones' copies are gone


def test_with_an_api_key_v1_requests_must_send_it_and_probes_stay_open() -> None:
    key = {"api_key": "s3cret"}
    unknown = {"model": "nope", "prompt": "x"}  # past the key check, the proxy's own 404
    answers = _ask(
        _router(),
        ("POST", "/v1/completions", unknown),
        ("POST", "/v1/completions", unknown, {"Authorization": "Bearer wrong"}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", unknown, {"Authorization": "Bearer s3cret"}),
        ("GET", "/loraplex/served", None),
        ("GET", "/health", None),
        **key,
    )
    assert [status for status, _ in answers] == [401, 401, 401, 404, 200, 503]  # 503: no vLLM behind
    assert answers[0][1]["error"]["type"] == "AuthenticationError"
