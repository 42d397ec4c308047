"""Serving what is promoted: vLLM's OpenAI-compatible server behind a proxy that follows the promoted map.

One serving process (``loraplex serving`` in a pool's serving pod, ``loraplex serve RUN_DIR`` on
a laptop):

- starts ``vllm serve`` as a child on 127.0.0.1 with LoRA and runtime LoRA loading on. vLLM's
  load and unload endpoints have no authentication, so only this process can reach them;
- answers on the public port itself. ``POST /v1/completions`` and ``/v1/chat/completions``
  (streaming too) go to vLLM with ``model`` rewritten from the experiment's name to the name
  vLLM holds that revision under (``<experiment>@<revision>``; responses carry that name, so a
  client sees which revision answered); the base model's name passes as it is; any other name
  is a 404 that names it. ``GET /v1/models`` lists the base and the served experiments,
  ``/loraplex/served`` what is served since when, ``/health`` and ``/ready``. Nothing else of
  vLLM is reachable;
- every ``interval`` seconds reads the promoted map (experiment -> checkpoint URI) from its
  source: the pool's promoted-adapters ConfigMap through the API, or a run folder. A changed
  revision is loaded under its own versioned name, the route switches to it, and only then is
  the old version unloaded: nothing in flight fails and no request finds a gap. A rollback
  loads the old checkpoint again under its own name (vLLM gives every load a new LoRA id, so no
  cached copy of other weights answers). An experiment no longer in the map is unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from loraplex_api.wire import SERVING_API_KEY_ENV

from .checkpoint import MANIFEST_FILE
from .rollout.vllm_engine import max_lora_rank

log = logging.getLogger(__name__)

FORWARDED = ("/v1/completions", "/v1/chat/completions")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_ADAPTER_BYTES = 4 * 2**30
ADMIN_TIMEOUT = ClientTimeout(total=120)
"""A load of a large adapter takes seconds; one that hangs must not stall the sync for good."""
HEALTH_TIMEOUT = ClientTimeout(total=4)
"""Below the probes' timeoutSeconds (5)."""
SESSION = web.AppKey("session", ClientSession)
"""The app's client session to vLLM."""
MAX_BODY_BYTES = 8 * 2**20
VLLM_START_SECONDS = 1800.0
"""As long as the pod's startupProbe waits: a large model downloads and loads first."""


class ServingError(Exception):
    """A setup problem the user can fix, reported in one line."""


# ----------------------------------------------------------------- what to serve


class PromotedSource(Protocol):
    """Where the promoted map comes from: experiment name -> checkpoint URI."""

    def read(self) -> dict[str, str]: ...


@dataclass
class ConfigMapSource:
    """The pool's promoted-adapters ConfigMap, read through the API (seconds, not the kubelet's minute)."""

    namespace: str
    name: str
    _client: Any = None

    def read(self) -> dict[str, str]:
        if self._client is None:
            from .cluster import ClusterClient

            self._client = ClusterClient(self.namespace)
        return self._client.read_config_map(self.name) or {}


@dataclass
class ConfigMapFolderSource:
    """The ConfigMap mounted as a volume (one file per key), as the kubelet projects it."""

    folder: Path

    def read(self) -> dict[str, str]:
        return {
            p.name: p.read_text().strip()
            for p in sorted(self.folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
        }


@dataclass
class RunDirSource:
    """A ``loraplex train`` run folder: each experiment's final adapter, else its newest checkpoint."""

    run_dir: Path

    def read(self) -> dict[str, str]:
        found = {}
        for folder in sorted(p for p in self.run_dir.iterdir() if p.is_dir()):
            final = folder / "adapter"
            checkpoints = (
                sorted((folder / "checkpoints").glob("step-*")) if (folder / "checkpoints").is_dir() else []
            )
            chosen = (
                final
                if (final / "adapter_config.json").is_file()
                else (checkpoints[-1] if checkpoints else None)
            )
            if chosen is not None:
                found[folder.name] = f"file://{chosen}"
        return found


STEP_FOLDER = re.compile(r"step-\d{8}")


def local_path(
    uri: str,
    claims: Mapping[str, Path],
    *,
    experiment: str | None = None,
    namespace: str | None = None,
    allow_files: bool = True,
) -> Path:
    """The folder a checkpoint URI names here: ``pvc://claim/path`` under that claim's mount, or ``file://``.

    Refused: a claim not mounted, a path that leaves its mount, ``file://`` where ``allow_files``
    is off (a serving pod), a relative path; and, given ``experiment`` and ``namespace``, a pvc://
    path that is not one of that experiment's checkpoints (``.../<namespace>/<experiment>/.../
    checkpoints/step-NNNNNNNN``), so one experiment's entry cannot serve another's weights.
    """
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        if not allow_files:
            raise ValueError(f"{uri}: a serving pod serves pvc:// checkpoints only")
        path = Path(rest)
        if not path.is_absolute():
            raise ValueError(f"{uri}: not an absolute path")
        return path
    if scheme != "pvc":
        raise ValueError(f"{uri}: only pvc:// and file:// checkpoints can be served")
    claim, _, inside = rest.partition("/")
    if claim not in claims:
        raise ValueError(f"{uri}: claim {claim!r} is not mounted in this serving pod")
    root = claims[claim].resolve()
    path = (root / inside).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{uri}: the path leaves the claim")
    if experiment is not None and namespace is not None:
        parts = PurePosixPath(inside).parts
        owned = any(parts[i : i + 2] == (namespace, experiment) for i in range(len(parts) - 1))
        if not owned or len(parts) < 2 or parts[-2] != "checkpoints" or not STEP_FOLDER.fullmatch(parts[-1]):
            raise ValueError(f"{uri}: not a checkpoint of experiment {namespace}/{experiment}")
    return path


def revision_of(uri: str) -> str:
    """A checkpoint's revision: its folder name (``step-00000020``), ``final`` for a final adapter."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return "final" if name == "adapter" else name


# ----------------------------------------------------------------- vLLM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMServer:
    """``vllm serve`` as a child process, on 127.0.0.1 only."""

    model_folder: Path
    served_name: str
    max_loras: int
    max_lora_rank: int
    dtype: str = "auto"
    extra_args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        rank = max_lora_rank(self.max_lora_rank)  # vLLM accepts a few values; above 512 none
        return [
            sys.executable, "-m", "loraplex_trainer.vllm_launch", "serve", str(self.model_folder),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", self.served_name,
            "--dtype", self.dtype,
            "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(rank),
            "--max-cpu-loras", str(2 * self.max_loras),
            "--disable-uvicorn-access-log",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the CPU build would reserve most of the RAM
        log.info("event=vllm_serve_starting command=%r", " ".join(self.command()))
        self.process = subprocess.Popen(self.command(), env=env)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ----------------------------------------------------------------- the router


@dataclass(frozen=True)
class Served:
    """One experiment's adapter as vLLM holds it."""

    revision: str
    uri: str
    vllm_name: str
    since: float  # epoch seconds
    folder: Path | None = None
    """The private copy vLLM loaded it from (deleted when it is unloaded)."""


def stage_adapter(source: Path, root: Path, *, verify_manifest: bool) -> Path:
    """Copy a checkpoint's adapter files into a private folder of ``root`` and return it.

    vLLM re-reads an adapter's folder whenever it evicts and reloads it, and keys its prefix cache
    by path; the copy stays the same until it is unloaded whatever happens to the storage
    (pruning, a rewrite, a symlink swapped in). Only regular files are read (no symlinks), each
    at most ``MAX_ADAPTER_BYTES``; with ``verify_manifest`` the copies must match the checkpoint's
    manifest (sizes and SHA-256), so a half-written or altered checkpoint is refused.
    """
    manifest: dict[str, Any] = {}
    if verify_manifest:
        try:
            manifest = json.loads(_read_regular(source / MANIFEST_FILE, 2**20))["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}: no readable {MANIFEST_FILE} ({exc.__class__.__name__})") from exc
    folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=root))
    try:
        for name in ADAPTER_FILES:
            data = _read_regular(source / name, MAX_ADAPTER_BYTES)
            if verify_manifest:
                entry = manifest.get(name) or {}
                if entry.get("size") != len(data) or entry.get("sha256") != hashlib.sha256(data).hexdigest():
                    raise ValueError(f"{source / name}: does not match the checkpoint's manifest")
            (folder / name).write_bytes(data)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refusing symlinks, other kinds of file and files above ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path}: {info.st_size} bytes, above the {limit} allowed")
        return f.read(limit + 1)


@dataclass
class Router:
    """Experiment name -> the adapter vLLM serves for it; switched only after a load succeeded.

    Every load gets a vLLM name of its own (``<experiment>@<revision>.<n>``): vLLM compares
    adapters by name, and two weights under one name in flight kill its engine. An adapter
    replaced or withdrawn is retired: unloaded once no request still runs on it.
    """

    base_name: str
    vllm_url: str
    source: PromotedSource
    claims: Mapping[str, Path] = field(default_factory=dict)
    stage_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    namespace: str | None = None
    """Set in a serving pod: pvc:// entries must name their own experiment's checkpoints."""
    allow_files: bool = True
    verify_manifest: bool = False
    routes: dict[str, Served] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    retiring: list[Served] = field(default_factory=list)
    inflight: dict[str, int] = field(default_factory=dict)
    synced: bool = False
    clock: Callable[[], float] = time.time
    _loads: int = 0

    async def sync(self, session: ClientSession) -> None:
        """Bring vLLM's adapters to the promoted map; a failing adapter keeps its old route and is reported."""
        try:
            wanted = await asyncio.to_thread(self.source.read)
        except Exception as exc:  # the API is away: keep serving what is loaded
            log.warning("event=promoted_read_failed error=%r", exc)
            await self._retire(session)
            return
        for name, uri in sorted(wanted.items()):
            current = self.routes.get(name)
            if current is not None and current.uri == uri:
                continue
            await self._load(session, name, uri, current)
        for name in [n for n in self.routes if n not in wanted]:
            gone = self.routes.pop(name)
            log.info("event=adapter_unserved experiment=%s revision=%s", name, gone.revision)
            self.retiring.append(gone)
        for name in [n for n in self.problems if n not in wanted]:
            del self.problems[name]
        await self._retire(session)
        self.synced = True

    async def _load(self, session: ClientSession, name: str, uri: str, current: Served | None) -> None:
        revision = revision_of(uri)
        self._loads += 1
        vllm_name = f"{name}@{revision}.{self._loads}"
        folder = None
        try:
            path = local_path(
                uri, self.claims, experiment=name, namespace=self.namespace, allow_files=self.allow_files
            )
            folder = await asyncio.to_thread(
                stage_adapter, path, self.stage_root, verify_manifest=self.verify_manifest
            )
            await self._admin(
                session, "load_lora_adapter", {"lora_name": vllm_name, "lora_path": str(folder)}
            )
        except (ValueError, OSError, RuntimeError, ClientError, asyncio.TimeoutError) as exc:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            self.problems[name] = str(exc) or exc.__class__.__name__
            log.warning("event=adapter_load_failed experiment=%s uri=%s error=%s", name, uri, exc)
            return
        self.problems.pop(name, None)
        self.routes[name] = Served(revision, uri, vllm_name, self.clock(), folder)
        log.info("event=adapter_served experiment=%s revision=%s uri=%s", name, revision, uri)
        if current is not None:
            self.retiring.append(current)

    async def _retire(self, session: ClientSession) -> None:
        """Unload the retired adapters no request runs on any more, and delete their copies."""
        for served in list(self.retiring):
            if self.inflight.get(served.vllm_name, 0):
                continue
            with contextlib.suppress(RuntimeError, ClientError, asyncio.TimeoutError):  # gone already
                await self._admin(session, "unload_lora_adapter", {"lora_name": served.vllm_name})
            if served.folder is not None:
                shutil.rmtree(served.folder, ignore_errors=True)
            self.retiring.remove(served)

    async def _admin(self, session: ClientSession, action: str, body: dict[str, str]) -> None:
        async with session.post(f"{self.vllm_url}/v1/{action}", json=body, timeout=ADMIN_TIMEOUT) as response:
            if response.status != 200:
                text = await response.text()
                with contextlib.suppress(ValueError, AttributeError):
                    text = json.loads(text).get("error", {}).get("message", text)
                raise RuntimeError(f"vLLM {action} {body['lora_name']}: {response.status} {text[:300]}")

    def acquire(self, model: str) -> str | None:
        """The name vLLM knows ``model`` by (None: not served), counted in flight until released."""
        if model == self.base_name:
            return model
        served = self.routes.get(model)
        if served is None:
            return None
        self.inflight[served.vllm_name] = self.inflight.get(served.vllm_name, 0) + 1
        return served.vllm_name

    def release(self, vllm_name: str) -> None:
        if vllm_name in self.inflight:
            self.inflight[vllm_name] -= 1
            if not self.inflight[vllm_name]:
                del self.inflight[vllm_name]

    def served(self) -> dict[str, Any]:
        return {
            name: {
                "revision": s.revision,
                "uri": s.uri,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.since)),
            }
            for name, s in sorted(self.routes.items())
        }


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


async def wait_for_vllm(
    server: VLLMServer, session: ClientSession, timeout: float = VLLM_START_SECONDS
) -> float:
    """Seconds until vLLM answers /health; a vLLM that exits or never answers is a ServingError."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process is not None and server.process.poll() is not None:
            raise ServingError(f"vllm serve exited with code {server.process.returncode} while starting")
        with contextlib.suppress(OSError, ClientError):
            async with session.get(f"{server.url}/health") as response:
                if response.status == 200:
                    return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise ServingError(f"vllm serve did not answer /health within {timeout:.0f} s")


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


# ----------------------------------------------------------------- the two commands


def _claims(values: Sequence[str]) -> dict[str, Path]:
    claims = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ServingError(f"--claim {value!r}: expected NAME=/mounted/path")
        claims[name] = Path(path)
    return claims


def run_pod(args: Any) -> int:
    """``loraplex serving``: the serving pod's process (rendered by the operator)."""
    from .model_host import model_folder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.promoted_dir:
            source: PromotedSource = ConfigMapFolderSource(Path(args.promoted_dir))
        elif args.configmap and args.namespace:
            source = ConfigMapSource(args.namespace, args.configmap)
        else:
            raise ServingError("--configmap with --namespace, or --promoted-dir, names the promoted adapters")
        folder = model_folder(args.model_uri)
        server = VLLMServer(
            folder, args.model_name, args.max_loras, args.max_lora_rank, args.dtype, tuple(args.vllm_args)
        )
        router = Router(
            args.model_name, server.url, source, _claims(args.claim),
            namespace=args.namespace, allow_files=args.allow_file_uris, verify_manifest=True,
        )  # fmt: skip
        api_key = os.environ.get(SERVING_API_KEY_ENV) or None
        asyncio.run(
            serve(server, router, host=args.host, port=args.port, interval=args.interval, api_key=api_key)
        )
    except (ServingError, ValueError) as exc:
        print(f"loraplex serving: {exc}", file=sys.stderr)
        return 1
    return 0


def run_local(args: Any) -> int:
    """``loraplex serve RUN_DIR``: the run's base model and each experiment's final adapter."""
    from .model_host import model_folder

    logging.basicConfig(level=logging.WARNING)
    run_dir = Path(args.run_dir)
    summary_file = run_dir / "summary.json"
    try:
        if not summary_file.is_file():
            raise ServingError(f"{summary_file}: not found; RUN_DIR is a `loraplex train --output` folder")
        summary = json.loads(summary_file.read_text())
        model = summary.get("model") or {}
        if not model.get("uri"):
            raise ServingError(f"{summary_file}: names no model (written by an older loraplex)")
        source = RunDirSource(run_dir)
        if not source.read():
            raise ServingError(f"{run_dir}: no experiment has an adapter or a checkpoint yet")
        folder = model_folder(model["uri"])
        name = model.get("name") or model["uri"]
        max_loras = max(1, len(source.read()))
        server = VLLMServer(folder, name, max_loras, args.max_lora_rank, args.dtype, tuple(args.vllm_args))
        router = Router(name, server.url, source, allow_files=True, verify_manifest=False)
        asyncio.run(serve(server, router, host=args.host, port=args.port, interval=args.interval))
    except (ServingError, ValueError, OSError) as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 1
    return 0
