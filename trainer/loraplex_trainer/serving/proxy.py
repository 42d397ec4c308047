"""The public server in front of vLLM: the forwarded OpenAI routes, the model list, what is served, health."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from .errors import ServingError
from .router import Router
from .vllm_server import VLLMServer, wait_for_vllm

log = logging.getLogger(__name__)

FORWARDED = ("/v1/completions", "/v1/chat/completions")
HEALTH_TIMEOUT = ClientTimeout(total=4)
"""Below the probes' timeoutSeconds (5)."""
SESSION = web.AppKey("session", ClientSession)
"""The app's client session to vLLM."""
MAX_BODY_BYTES = 8 * 2**20


def _error(status: int, message: str, kind: str) -> web.Response:
    """An OpenAI-style error body."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


async def _pass_on(request: web.Request, vllm_url: str, body: dict[str, Any]) -> web.StreamResponse:
    """Send the request on to vLLM and stream its answer back as it comes."""
    # vLLM's own --api-key, if one is passed in serving.args, checks the caller's header.
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    response = web.StreamResponse()
    try:
        async with request.app[SESSION].post(
            f"{vllm_url}{request.path}", json=body, headers=headers
        ) as upstream:
            response.set_status(upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
    except ClientError as exc:
        if not response.prepared:
            return _error(503, f"vLLM did not answer: {exc}", "ServiceUnavailableError")
        raise  # mid-stream: the client sees the connection end
    await response.write_eof()
    return response


def build_app(
    router: Router, session_factory: Callable[[], ClientSession], *, api_key: str | None = None
) -> web.Application:
    """The public server: the forwarded OpenAI routes, the model list, what is served, health.

    With ``api_key``, every /v1 request must send it as ``Authorization: Bearer <key>`` (what the
    OpenAI clients do with their api_key); it is checked here and not passed on to vLLM.
    """

    @web.middleware
    async def authorize(request: web.Request, handler: Any) -> web.StreamResponse:
        if api_key and request.path.startswith("/v1/"):
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    401, "a valid API key is needed (Authorization: Bearer ...)", "AuthenticationError"
                )
        return await handler(request)

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[authorize])

    async def on_startup(app: web.Application) -> None:
        app[SESSION] = session_factory()

    async def on_cleanup(app: web.Application) -> None:
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON", "BadRequestError")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "the request names no model (a string)", "BadRequestError")
        model = body["model"]
        target = router.acquire(model)
        if target is None:
            why = router.problems.get(model)
            message = (
                f"The model `{model}` is promoted but cannot be served: {why}"
                if why
                else f"The model `{model}` does not exist: it is neither the base model `{router.base_name}` "
                "nor an experiment with a promoted adapter on this pool."
            )
            return _error(404, message, "NotFoundError")
        try:
            return await _pass_on(request, router.vllm_url, {**body, "model": target})
        finally:
            router.release(target)

    async def models(request: web.Request) -> web.Response:
        now = int(time.time())
        data = [{"id": router.base_name, "object": "model", "created": now, "owned_by": "loraplex"}]
        data += [
            {"id": name, "object": "model", "created": int(s.since), "owned_by": "loraplex",
             "parent": router.base_name, "revision": s.revision}
            for name, s in sorted(router.routes.items())
        ]  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def served(request: web.Request) -> web.Response:
        return web.json_response(
            {"model": router.base_name, "served": router.served(), "problems": router.problems}
        )

    async def health(request: web.Request) -> web.Response:
        try:
            async with request.app[SESSION].get(
                f"{router.vllm_url}/health", timeout=HEALTH_TIMEOUT
            ) as upstream:
                ok = upstream.status == 200
        except (OSError, ClientError, asyncio.TimeoutError):
            ok = False
        return web.Response(status=200 if ok else 503, text="ok" if ok else "vLLM is not healthy")

    async def ready(request: web.Request) -> web.Response:
        if not router.synced:
            return web.Response(status=503, text="the promoted adapters are not loaded yet")
        return await health(request)

    for path in FORWARDED:
        app.router.add_post(path, forward)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/loraplex/served", served)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(
    server: VLLMServer,
    router: Router,
    *,
    host: str,
    port: int,
    interval: float,
    api_key: str | None = None,
    announce: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Start vLLM, load what is promoted, answer on ``host:port`` and follow the map until stopped."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    server.start()
    timeout = ClientTimeout(total=None, sock_connect=10)

    def forwarding() -> ClientSession:
        # No pool limit: a hundred long generations must not queue the health probes behind them.
        return ClientSession(timeout=timeout, connector=TCPConnector(limit=0))

    try:
        async with ClientSession(timeout=timeout) as session:
            seconds = await wait_for_vllm(server, session)
            log.info("event=vllm_serve_ready seconds=%.1f", seconds)
            await router.sync(session)
            app = build_app(router, forwarding, api_key=api_key)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            announce(f"serving on http://{host}:{port}/v1 (vLLM started in {seconds:.1f} s)")
            announce(f"  {router.base_name} (the base model)")
            for name, s in sorted(router.routes.items()):
                announce(f"  {name} ({s.revision})")
            for name, why in sorted(router.problems.items()):
                announce(f"  {name}: not served: {why}")
            try:
                while not stop.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)
                    if server.process is not None and server.process.poll() is not None:
                        raise ServingError(f"vllm serve exited with code {server.process.returncode}")
                    await router.sync(session)
            finally:
                await runner.cleanup()
    finally:
        server.stop()
