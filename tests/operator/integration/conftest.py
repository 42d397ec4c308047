"""A Kubernetes API emulator (KMock) over real HTTP, and the loraplex operator running against it.

Fixtures:

- ``cluster``: KMock in its own thread and event loop, with the built-in
  resources and the loraplex CRDs (from ``crds/``) in its discovery, a
  KUBECONFIG pointing at it, and :class:`Api`, a small synchronous client for
  tests. Reusable for anything that talks to Kubernetes (the trainer agent too).
- ``operator``: the loraplex operator (kopf) in its own thread and event loop,
  with short resync and grace periods, started after its watches are open.

What KMock 0.8 does not emulate and :class:`Emulator` adds: uid,
resourceVersion, generation (bumped on spec changes) and creationTimestamp;
``generateName`` (so kopf can post Events); the status subresource split (a
patch to ``/status`` changes only status, a patch to the object never
changes status). What stays missing: label and field selectors (the operator
filters itself), garbage collection of owned objects (tests check the owner
references instead), a StatefulSet controller (tests create the pods), the
Scale object of ``/scale`` (a merge patch of ``spec.replicas`` works the same).
KMock 0.8 also fails to parse ``GET /api/v1/namespaces``, which kopf uses to
follow namespaces; :class:`Emulator` serves that path itself.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import kmock
import kubernetes.config.kube_config
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CRD_DIR = REPO / "crds"
NAMESPACE = "default"
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}

T = TypeVar("T")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator plus the object bookkeeping an API server does (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # KMock 0.8 cannot parse the cluster-wide /api/v1/namespaces path; kopf lists and watches it
        # to follow namespaces, so serve it here from the stored Namespace objects.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method == "GET":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        namespaces = [
            obj.raw
            for (resource, _, _), obj in list(self.objects.items())
            if resource.plural == "namespaces" and not obj.deleted
        ]
        if raw_request.query.get("watch") != "true":
            listing = {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"}}
            return aiohttp.web.json_response({**listing, "items": namespaces})
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for namespace in namespaces:
            await response.write(json.dumps({"type": "ADDED", "object": namespace}).encode() + b"\n")
        await asyncio.Event().wait()  # namespaces never change here; the client closes the stream
        return response

    def _subresources(self, resource: kmock.resource) -> set[str]:
        return set(self.resources[resource].subresources) if resource in self.resources else set()

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action == kmock.action.CREATE:
            self._stamp_create(request)
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            self._stamp_update(request)
        return await super()._handle(request)

    def _stamp_create(self, request: kmock.Request) -> None:
        data = request.data
        if not isinstance(data, dict):
            return
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        if "status" in self._subresources(request.resource):
            data.pop("status", None)

    def _stamp_update(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # KMock answers 404
        current = self.objects[key].raw
        split_status = "status" in self._subresources(request.resource)
        version = str(next(self._versions))
        generation = int(current.get("metadata", {}).get("generation") or 1)
        data = request.data
        if isinstance(data, dict):
            if request.subresource == "status":
                for k in [k for k in data if k != "status"]:
                    del data[k]
            elif split_status:
                data.pop("status", None)
            spec = data.get("spec")
            changed = isinstance(spec, dict) and _merge(current.get("spec") or {}, spec) != current.get(
                "spec"
            )
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            if changed:
                meta["generation"] = generation + 1
        elif isinstance(data, list):
            if request.subresource == "status":
                data[:] = [
                    op for op in data if op.get("op") == "test" or op.get("path", "").startswith("/status")
                ]
            elif split_status:
                data[:] = [op for op in data if not op.get("path", "").startswith("/status")]
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            if any(op.get("path", "").startswith("/spec") and op.get("op") != "test" for op in data):
                data.append({"op": "add", "path": "/metadata/generation", "value": generation + 1})


def register_crds(emulator: kmock.KubernetesEmulator, folder: Path = CRD_DIR) -> None:
    """Put every CRD of a folder into the emulator's API discovery."""
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            emulator.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names["singular"],
                namespaced=spec["scope"] == "Namespaced",
                verbs=ALL_VERBS,
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(version.get("subresources") or {}),
            )


class EmulatorThread:
    """Runs an :class:`Emulator` behind a real HTTP server in a thread of its own."""

    def __init__(self) -> None:
        self.url = ""
        self.emulator: Emulator | None = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"KMock did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # kmock 0.8 uses read_binary
                emulator.resources.load_bundled()
            register_crds(emulator)
            for path in sorted(CRD_DIR.glob("*.yaml")):
                crd = yaml.safe_load(path.read_text())
                emulator.objects[
                    "apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]
                ] = crd
            emulator.objects["v1/namespaces", None, NAMESPACE] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": NAMESPACE, "uid": str(uuid.uuid4())},
            }
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def watched(self) -> set[str]:
        """Plural names of the resources someone has opened a watch on."""
        assert self.emulator is not None
        return {
            r.resource.plural
            for r in list(self.emulator)
            if r.action == kmock.action.WATCH and r.resource is not None and r.resource.plural
        }


class ApiError(Exception):
    """An HTTP error from the emulator."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


PATHS = {
    "SharedBasePool": ("/apis/loraplex.dev/v1alpha1", "sharedbasepools"),
    "LoRAExperiment": ("/apis/loraplex.dev/v1alpha1", "loraexperiments"),
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Event": ("/api/v1", "events"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
}


class Api:
    """A synchronous client for tests: create, get, list, merge-patch, delete, by kind and name."""

    def __init__(self, url: str, namespace: str = NAMESPACE) -> None:
        self.url = url
        self.namespace = namespace

    def path(self, kind: str, name: str | None = None, subresource: str | None = None) -> str:
        root, plural = PATHS[kind]
        path = f"{root}/namespaces/{self.namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode()) from None
        return json.loads(text) if text else None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {}).setdefault("namespace", self.namespace)
        return self.request("POST", self.path(obj["kind"]), obj)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, kind: str) -> list[dict[str, Any]]:
        return self.request("GET", self.path(kind))["items"]

    def patch(self, kind: str, name: str, patch: Any, subresource: str | None = None) -> dict[str, Any]:
        return self.request(
            "PATCH", self.path(kind, name, subresource), patch, content_type="application/merge-patch+json"
        )

    def patch_status(self, kind: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.patch(kind, name, {"status": status}, subresource="status")

    def delete(self, kind: str, name: str) -> None:
        self.request("DELETE", self.path(kind, name))


def wait_for(check: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.02, what: str = "") -> T:
    """Poll until ``check`` returns something truthy; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or check}: last value {value!r}"
            )
        time.sleep(interval)
        value = check()
    return value


@dataclass
class Cluster:
    """A running emulator, a client for tests, and the KUBECONFIG that points at it."""

    server: EmulatorThread
    api: Api
    kubeconfig: Path

    @property
    def emulator(self) -> Emulator:
        assert self.server.emulator is not None
        return self.server.emulator


def write_kubeconfig(path: Path, url: str, namespace: str = NAMESPACE) -> Path:
    """A kubeconfig with one context for the emulator (a token, since KMock checks none)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [
            {"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}
        ],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """KMock over HTTP with the loraplex CRDs, and KUBECONFIG set to it for the duration of a test."""
    server = EmulatorThread().start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # The kubernetes client reads $KUBECONFIG once, at import; later tests need it read again.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    try:
        yield Cluster(server=server, api=Api(server.url), kubeconfig=kubeconfig)
    finally:
        server.stop()


@dataclass
class Operator:
    """The operator running in its thread, with its own metrics registry and config."""

    runtime: Any
    registry: Any
    thread: threading.Thread
    stop_flag: threading.Event


OPERATOR_WATCHES = {"sharedbasepools", "loraexperiments", "pods"}


@pytest.fixture
def operator_config() -> Any:
    """Short periods so tests see resyncs, lost heartbeats and lost replicas within seconds."""
    from loraplex_operator.runtime import OperatorConfig

    return OperatorConfig(
        resync_seconds=0.5,
        heartbeat_grace_seconds=3.0,
        replica_grace_seconds=1.5,
        reapply_seconds=300.0,
        debounce_seconds=0.02,
        default_trainer_service_account="loraplex-trainer",
    )


@pytest.fixture
def operator(cluster: Cluster, operator_config: Any) -> Iterator[Operator]:
    """The loraplex operator against ``cluster``, started once its watches are open."""
    from prometheus_client import CollectorRegistry

    from loraplex_operator.main import build_runtime, build_settings, operate
    from loraplex_operator.metrics import OperatorMetrics

    settings = build_settings(standalone=True)
    settings.watching.connect_timeout = 5
    settings.persistence.consistency_timeout = 2.0
    registry = CollectorRegistry()
    runtime = build_runtime(operator_config, OperatorMetrics(registry))
    stop_flag, ready_flag = threading.Event(), threading.Event()

    def main() -> None:
        asyncio.run(
            operate(runtime, settings, namespaces=[NAMESPACE], stop_flag=stop_flag, ready_flag=ready_flag)
        )

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    try:
        wait_for(ready_flag.is_set, timeout=20, what="the operator to start")
        wait_for(
            lambda: cluster.server.watched() >= OPERATOR_WATCHES, timeout=20, what="the operator's watches"
        )
        yield Operator(runtime=runtime, registry=registry, thread=thread, stop_flag=stop_flag)
    finally:
        stop_flag.set()
        thread.join(20)
        if thread.is_alive():
            logging.getLogger(__name__).warning("the operator thread did not stop within 20s")
