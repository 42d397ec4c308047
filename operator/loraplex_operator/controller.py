"""The per-pool reconcile loop: observe, plan (pure), write; plus the same for experiments without a pool.

Each pool has one loop (a kopf daemon), so all placement decisions for a pool
are made one pass at a time and never race each other. A pass runs when
something relevant changes (the pool, one of its experiments, one of its
pods: the handlers kick the loop) and otherwise every ``resync_seconds``,
which is what notices silent trainers, deadlines and idle replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import aiohttp
import kopf
from pydantic import ValidationError

from loraplex_api import SharedBasePool
from loraplex_api.pool import ServedAdapter
from loraplex_api.wire import API_VERSION, EXPERIMENT_KIND, EXPERIMENT_PLURAL, POOL_KIND, POOL_PLURAL

from .events import Event
from .kube import ApiError, object_path, path_of
from .observed import ExperimentView, PoolView, observe_experiment, observe_pod, observe_pool, snapshot
from .planner import ExperimentPlan, PoolMemory, PoolPlan, plan_orphan, plan_pool
from .poolstatus import Provisioning
from .render import RenderError, render_children, render_promoted_configmap
from .render_serving import render_serving, serving_endpoint, serving_name
from .runtime import PoolKey, Runtime
from .validation import describe

logger = logging.getLogger(__name__)

WRITE_CONCURRENCY = 16
TRANSIENT = (ApiError, aiohttp.ClientError, asyncio.TimeoutError)


def experiment_key(namespace: str, name: str) -> tuple[str, str, str]:
    """The ledger key of an experiment."""
    return (EXPERIMENT_KIND, namespace, name)


def pool_key(namespace: str, name: str) -> tuple[str, str, str]:
    """The ledger key of a pool."""
    return (POOL_KIND, namespace, name)


class PoolController:
    """Runs one pool's passes and remembers what the next pass needs (replica clocks, applied children)."""

    def __init__(self, namespace: str, name: str, runtime: Runtime) -> None:
        self.namespace = namespace
        self.name = name
        self.runtime = runtime
        self.memory = PoolMemory()
        self.provisioning = Provisioning(
            False, "Provisioning", "the pool's children have not been applied yet"
        )
        self._applied: dict[str, str] = {}
        self._applied_at = 0.0
        self.serving_status: dict[str, Any] | None = None
        """The serving Deployment as last read: status.serving (None when serving is off)."""

    @property
    def key(self) -> PoolKey:
        """``(namespace, name)``."""
        return (self.namespace, self.name)

    async def run(
        self,
        body: Mapping[str, Any],
        stopped: kopf.DaemonStopped,
        experiments: Mapping[Any, Iterable[Mapping[str, Any]]],
        pods: Mapping[Any, Iterable[Mapping[str, Any]]],
    ) -> None:
        """Pass after pass until the pool is deleted or the operator stops; then release its experiments."""
        config = self.runtime.config
        logger.info("pool loop started namespace=%s pool=%s", self.namespace, self.name)
        while not stopped:
            await self.reconcile(body, experiments, pods)
            if await self.runtime.wakeups.wait(self.key, timeout=config.resync_seconds, stopped=stopped):
                await asyncio.sleep(config.debounce_seconds)
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            await self.release(body, experiments)
        logger.info(
            "pool loop stopped namespace=%s pool=%s reason=%s", self.namespace, self.name, stopped.reason
        )

    async def reconcile(
        self,
        body: Mapping[str, Any],
        experiments: Mapping[Any, Iterable[Mapping[str, Any]]],
        pods: Mapping[Any, Iterable[Mapping[str, Any]]],
    ) -> PoolPlan | None:
        """One pass; errors are logged and counted, and the next pass tries again."""
        runtime = self.runtime
        started = time.perf_counter()
        try:
            view = observe_pool(runtime.ledger.overlay(pool_key(*self.key), snapshot(body)))
            if not view.deleting:
                self.provisioning = await self._provision(view)
            plan = plan_pool(
                view,
                self._experiments(experiments),
                [p for p in (observe_pod(raw) for raw in pods.get(self.key, ())) if p is not None],
                self.memory,
                self.provisioning,
                now=time.time(),
                timing=runtime.config.timing,
            )
            self.memory = plan.memory
            await write_experiments(runtime, plan.experiments)
            if not view.deleting:
                await self._write_pool(view, plan)
        except TRANSIENT as error:
            runtime.metrics.reconciled(POOL_KIND, ok=False)
            logger.warning("pool pass failed namespace=%s pool=%s error=%s", self.namespace, self.name, error)
            return None
        except Exception:
            runtime.metrics.reconciled(POOL_KIND, ok=False)
            logger.exception("pool pass crashed namespace=%s pool=%s", self.namespace, self.name)
            return None
        runtime.metrics.reconciled(POOL_KIND, ok=True)
        logger.debug(
            "pool pass namespace=%s pool=%s experiments=%d seconds=%.3f",
            self.namespace,
            self.name,
            len(plan.experiments),
            time.perf_counter() - started,
        )
        return plan

    async def release(
        self, body: Mapping[str, Any], experiments: Mapping[Any, Iterable[Mapping[str, Any]]]
    ) -> None:
        """The pool is being deleted: unplace its experiments (they wait with PoolNotFound) and forget it."""
        deleting = {**snapshot(body)}
        deleting["metadata"] = {**deleting["metadata"], "deletionTimestamp": "deleted"}
        plan = await self.reconcile(deleting, experiments, {})
        released = len(plan.experiments) if plan is not None else 0
        # Saying so in the status is also what wakes kopf up to drop its finalizer without delay.
        ready = {
            "type": "Ready",
            "status": "False",
            "reason": "Deleting",
            "message": f"released {released} experiment(s)",
        }
        with contextlib.suppress(*TRANSIENT):
            path = object_path(API_VERSION, POOL_PLURAL, self.namespace, self.name, "status")
            await self.runtime.api.merge_patch(path, {"status": {"conditions": [ready]}})
        self.runtime.metrics.forget_pool(self.namespace, self.name)
        self.runtime.ledger.forget(pool_key(*self.key))
        self.runtime.wakeups.forget(self.key)

    def _experiments(self, index: Mapping[Any, Iterable[Mapping[str, Any]]]) -> list[ExperimentView]:
        ledger = self.runtime.ledger
        views = []
        for raw in index.get(self.key, ()):
            meta = raw.get("metadata") or {}
            views.append(
                observe_experiment(ledger.overlay(experiment_key(self.namespace, meta.get("name", "")), raw))
            )
        return sorted(views, key=lambda v: v.name)

    async def _provision(self, view: PoolView) -> Provisioning:
        """Apply the pool's StatefulSet and Services when they changed (or every reapply period)."""
        if view.pool is None:
            return Provisioning(False, "InvalidSpec", describe(view.problems))
        config = self.runtime.config
        try:
            children = render_children(
                view.pool, default_service_account=config.default_trainer_service_account
            )
        except RenderError as error:
            return Provisioning(False, "InvalidSpec", str(error))
        fresh = time.monotonic() - self._applied_at < config.reapply_seconds
        try:
            for child in children:
                await self._apply(child, force=not fresh)
        except TRANSIENT as error:
            self._applied.clear()
            return Provisioning(False, "ProvisioningFailed", str(error)[:1000])
        if not fresh:
            self._applied_at = time.monotonic()
        sts, headless, metrics = (c["metadata"]["name"] for c in children)
        try:
            await self._provision_serving(view.pool, force=not fresh)
        except TRANSIENT as error:
            self._applied.clear()
            return Provisioning(False, "ProvisioningFailed", f"serving: {str(error)[:990]}")
        return Provisioning(
            True, "StatefulSetCreated", f"StatefulSet {sts}, Services {headless} and {metrics} applied"
        )

    async def _provision_serving(self, pool: SharedBasePool, *, force: bool) -> None:
        """Apply the serving Deployment and Service when serving is enabled, delete them when not."""
        config = self.runtime.config
        manifests = render_serving(
            pool,
            service_account=config.default_serving_service_account,
            default_service_account=config.default_trainer_service_account,
        )
        if pool.spec.serving.enabled:
            for manifest in manifests:
                await self._apply(manifest, force=force)
            deployment = await self.runtime.api.get(path_of(manifests[0]))
            status = (deployment or {}).get("status") or {}
            ready = int(status.get("readyReplicas") or 0)
            previous = self.serving_status or {}
            self.serving_status = {
                "replicas": int(status.get("replicas") or 0),
                "readyReplicas": ready,
                "endpoint": serving_endpoint(pool),
                "adapters": (await self._served_adapters(pool)) if ready else [],
            }
            if self.serving_status["adapters"] is None:  # unreachable this pass: keep what was seen
                self.serving_status["adapters"] = previous.get("adapters", [])
            return
        self.serving_status = None
        for manifest in manifests:
            path = path_of(manifest)
            if force or path in self._applied:
                await self.runtime.api.request("DELETE", path)  # None when it is not there
                self._applied.pop(path, None)

    async def _served_adapters(self, pool: SharedBasePool) -> list[dict[str, Any]] | None:
        """What a ready serving replica answers with (its /loraplex/served); None when it cannot be read."""
        base = self.runtime.config.serving_url_template.format(
            name=serving_name(pool.metadata.name), namespace=self.namespace, port=pool.spec.serving.port
        )
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
                session.get(f"{base}/loraplex/served") as response,
            ):
                served = (await response.json())["served"]
            adapters = []
            for name, entry in sorted(served.items())[:256]:
                try:  # what the API server would refuse must not block the pool's whole status
                    adapter = ServedAdapter.model_validate(
                        {"experiment": name, "revision": entry["revision"], "since": entry.get("since")}
                    )
                except (ValidationError, KeyError, TypeError):
                    logger.warning(
                        "served adapter skipped namespace=%s pool=%s entry=%.200r",
                        self.namespace,
                        self.name,
                        name,
                    )
                    continue
                adapters.append(adapter.wire())
            return adapters
        except (
            aiohttp.ClientError,
            asyncio.TimeoutError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as error:
            logger.info(
                "serving status unreadable namespace=%s pool=%s error=%r", self.namespace, self.name, error
            )
            return None

    async def _apply(self, manifest: Mapping[str, Any], *, force: bool = False) -> None:
        """Server-side apply a child unless the same manifest was applied before."""
        path = path_of(manifest)
        fingerprint = json.dumps(manifest, sort_keys=True)
        if not force and self._applied.get(path) == fingerprint:
            return
        applied = await self.runtime.api.apply(manifest)
        if "data" in manifest:
            # Server-side apply drops keys this manager no longer sets; an API server that merges
            # instead would keep the adapters of deleted experiments, so remove those explicitly.
            stale = {k: None for k in applied.get("data") or {} if k not in manifest["data"]}
            if stale:
                await self.runtime.api.merge_patch(path, {"data": stale})
        self._applied[path] = fingerprint
        logger.info(
            "applied kind=%s namespace=%s name=%s",
            manifest["kind"],
            self.namespace,
            manifest["metadata"]["name"],
        )

    async def _write_pool(self, view: PoolView, plan: PoolPlan) -> None:
        runtime = self.runtime
        api = runtime.api
        status_patch = dict(plan.status_patch)
        if view.raw_status.get("serving") != self.serving_status:
            status_patch["serving"] = self.serving_status
        if status_patch:
            path = object_path(API_VERSION, POOL_PLURAL, self.namespace, self.name, "status")
            if await api.merge_patch(path, {"status": status_patch}) is not None:
                runtime.ledger.record(pool_key(*self.key), {"status": status_patch})
        if plan.scale is not None:
            # Through /scale, as an HPA would: only spec.replicas can change this way.
            path = object_path(API_VERSION, POOL_PLURAL, self.namespace, self.name, "scale")
            await api.merge_patch(path, {"spec": {"replicas": plan.scale.replicas}})
            logger.info(
                "pool scaled namespace=%s pool=%s replicas=%d reason=%s",
                self.namespace,
                self.name,
                plan.scale.replicas,
                plan.scale.reason,
            )
        if self.provisioning.ok and view.pool is not None:
            await self._apply(render_promoted_configmap(view.pool, plan.adapters))
        post(view.ref, plan.events)
        runtime.metrics.observe_pool(
            self.namespace,
            self.name,
            total_slots=plan.slots_total,
            used_slots=plan.slots_used,
            phases=plan.phases,
        )


async def write_experiments(runtime: Runtime, plans: Iterable[ExperimentPlan]) -> None:
    """Write every experiment's patches (a few at a time), post its events and count what happened."""
    limit = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def one(plan: ExperimentPlan) -> None:
        async with limit:
            await write_experiment(runtime, plan)

    await asyncio.gather(*(one(p) for p in plans if p.status_patch or p.metadata_patch or p.events))


async def write_experiment(runtime: Runtime, plan: ExperimentPlan) -> None:
    """Patch one experiment's status and metadata, remember the writes, post events, count metrics."""
    exp = plan.experiment
    key = experiment_key(exp.namespace, exp.name)
    try:
        if plan.status_patch:
            path = object_path(API_VERSION, EXPERIMENT_PLURAL, exp.namespace, exp.name, "status")
            if await runtime.api.merge_patch(path, {"status": plan.status_patch}) is None:
                runtime.ledger.forget(key)
                return
            runtime.ledger.record(key, {"status": plan.status_patch})
        if plan.metadata_patch:
            path = object_path(API_VERSION, EXPERIMENT_PLURAL, exp.namespace, exp.name)
            if await runtime.api.merge_patch(path, {"metadata": plan.metadata_patch}) is None:
                runtime.ledger.forget(key)
                return
            runtime.ledger.record(key, {"metadata": plan.metadata_patch})
    except TRANSIENT as error:
        runtime.metrics.reconciled(EXPERIMENT_KIND, ok=False)
        logger.warning(
            "experiment write failed namespace=%s name=%s error=%s", exp.namespace, exp.name, error
        )
        return
    runtime.metrics.reconciled(EXPERIMENT_KIND, ok=True)
    if plan.waited is not None and plan.owned.placement is not None:
        runtime.metrics.placed_after(plan.waited)
        logger.info(
            "experiment placed namespace=%s name=%s replica=%s waited_seconds=%.3f",
            exp.namespace,
            exp.name,
            plan.owned.placement.replica,
            plan.waited,
        )
    if plan.promotion is not None:
        runtime.metrics.promoted(exp.namespace, exp.pool, plan.promotion)
    post(exp.ref, plan.events)


async def reconcile_orphan(runtime: Runtime, body: Mapping[str, Any]) -> None:
    """An experiment whose pool does not exist: validate it and say it waits for its pool."""
    raw = snapshot(body)
    meta = raw.get("metadata") or {}
    overlaid = runtime.ledger.overlay(experiment_key(meta.get("namespace", ""), meta.get("name", "")), raw)
    plan = plan_orphan(observe_experiment(overlaid), now=time.time(), timing=runtime.config.timing)
    await write_experiment(runtime, plan)


def post(ref: Mapping[str, Any], events: Iterable[Event]) -> None:
    """Post Kubernetes Events about an object (kopf queues and sends them)."""
    for event in events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, dict(ref))),
            type=event.type,
            reason=event.reason,
            message=event.message[:1024],
        )
