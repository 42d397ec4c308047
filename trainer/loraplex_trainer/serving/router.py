"""Experiment names -> the adapters vLLM holds for them; loads, switches and retirements."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout

from .sources import PromotedSource, local_path, revision_of, stage_adapter

log = logging.getLogger(__name__)

ADMIN_TIMEOUT = ClientTimeout(total=120)
"""A load of a large adapter takes seconds; one that hangs must not stall the sync for good."""


@dataclass(frozen=True)
class Served:
    """One experiment's adapter as vLLM holds it."""

    revision: str
    uri: str
    vllm_name: str
    since: float  # epoch seconds
    folder: Path | None = None
    """The private copy vLLM loaded it from (deleted when it is unloaded)."""


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
