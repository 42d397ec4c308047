"""The serving proxy's own answers, without vLLM behind it: bad requests, unknown names, vLLM away.

The answers with vLLM behind it are tested with a real `vllm serve` in tests/vllm/test_serving.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from loraplex_trainer.serving import Router, Served, build_app, free_port


def _ask(router: Router, *requests: tuple[str, str, Any]) -> list[tuple[int, Any]]:
    async def run() -> list[tuple[int, Any]]:
        async with TestClient(TestServer(build_app(router, ClientSession))) as client:
            answers = []
            for method, path, body in requests:
                response = await client.request(
                    method, path, **({"data": body} if isinstance(body, str) else {"json": body})
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
