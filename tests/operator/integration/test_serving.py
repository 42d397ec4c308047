"""The operator and a pool's serving: Deployment, Service, status.serving, and what a replica serves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import ClientSession, web

from loraplex_trainer.serving import Router, Served, build_app, free_port

from .builders import pool
from .conftest import Cluster, Operator, wait_for


@pytest.fixture
def serving_replica() -> Iterator[str]:
    """The serving proxy (real code) with one route, as a ready replica would answer."""
    router = Router("smollm2", "http://127.0.0.1:9", source=lambda: {})  # type: ignore[arg-type]
    router.routes["exp-a"] = Served(
        "step-00000020", "pvc://c/x/step-00000020", "exp-a@step-00000020", 1796119200
    )
    port, started, stop = free_port(), threading.Event(), threading.Event()

    async def run() -> None:
        runner = web.AppRunner(build_app(router, ClientSession))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    started.wait(10)
    yield f"http://127.0.0.1:{port}"
    stop.set()
    thread.join(10)


@pytest.fixture
def operator_config(serving_replica: str) -> Any:
    from loraplex_operator.runtime import OperatorConfig

    return OperatorConfig(
        resync_seconds=0.5, reapply_seconds=300.0, debounce_seconds=0.02,
        default_trainer_service_account="loraplex-trainer", default_serving_service_account="loraplex-serving",
        serving_url_template=serving_replica,
    )  # fmt: skip


def test_serving_gets_a_deployment_and_service_whose_readiness_shows_in_pool_status(
    cluster: Cluster, operator: Operator
) -> None:
    api = cluster.api
    api.create(pool("smol", serving={"enabled": True, "replicas": 2}, storage={"claimName": "shared"}))
    deployment = wait_for(lambda: api.get("Deployment", "smol-serving"), what="serving Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["ownerReferences"][0]["name"] == "smol"
    template = deployment["spec"]["template"]["spec"]
    assert template["containers"][0]["args"][:2] == ["loraplex", "serving"]
    assert template["serviceAccountName"] == "loraplex-serving"
    wait_for(lambda: api.get("Service", "smol-serving"), what="serving Service")

    def serving() -> dict | None:
        return ((api.get("SharedBasePool", "smol") or {}).get("status") or {}).get("serving")

    first = wait_for(serving, what="status.serving")
    assert first == {
        "replicas": 0, "readyReplicas": 0, "endpoint": "http://smol-serving.default.svc:8000/v1", "adapters": []
    }  # fmt: skip
    # The Deployment controller (not here) reports its pods; the operator follows.
    api.patch_status("Deployment", "smol-serving", {"replicas": 2, "readyReplicas": 1})
    api.patch("SharedBasePool", "smol", {"metadata": {"annotations": {"touch": "1"}}})  # a reconcile
    wait_for(lambda: (serving() or {}).get("readyReplicas") == 1, what="readyReplicas 1")
    # A ready replica's /loraplex/served (the real serving proxy here, without vLLM behind it).
    adapters = wait_for(lambda: (serving() or {}).get("adapters"), what="served adapters")
    assert adapters == [{"experiment": "exp-a", "revision": "step-00000020", "since": "2026-12-01T10:00:00Z"}]

    api.patch("SharedBasePool", "smol", {"spec": {"serving": {"enabled": False}}})
    wait_for(lambda: api.get("Deployment", "smol-serving") is None, what="Deployment deleted")
    wait_for(lambda: api.get("Service", "smol-serving") is None, what="Service deleted")
    wait_for(lambda: serving() is None, what="status.serving cleared")
    assert api.get("StatefulSet", "smol") is not None  # training is untouched
