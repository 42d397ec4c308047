"""kopf handlers: thin glue between watch events and the controller.

- Indexes keep the latest pools, experiments (by pool) and trainer pods (by
  pool) in memory, filled from the watches; the pool passes read them.
- A daemon per pool runs its reconcile loop (``controller.PoolController``).
- Events on an experiment, a pod or a pool kick the loop of the pool they
  belong to. An experiment whose pool does not exist is handled on its own.

Nothing here decides anything: see ``planner.py`` and the modules it calls.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from loraplex_api.wire import EXPERIMENT_PLURAL, GROUP, POOL_LABEL, POOL_PLURAL, VERSION

from .controller import PoolController, experiment_key, reconcile_orphan
from .observed import snapshot
from .render import TRAINER_NAME
from .runtime import PoolKey, Runtime

logger = logging.getLogger(__name__)

POOLS = (GROUP, VERSION, POOL_PLURAL)
EXPERIMENTS = (GROUP, VERSION, EXPERIMENT_PLURAL)
TRAINER_PODS: dict[str, Any] = {  # not serving pods
    POOL_LABEL: kopf.PRESENT,
    "app.kubernetes.io/name": TRAINER_NAME,
}


def runtime_of(memo: Any) -> Runtime:
    """The shared runtime stored in kopf's memo by ``main``."""
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise RuntimeError(
            "kopf memo has no loraplex Runtime; start the operator through loraplex_operator.main"
        )
    return runtime


def pool_of_experiment(body: kopf.Body) -> str:
    """``spec.poolRef.name`` of a raw experiment, '' when absent."""
    spec = body.get("spec") or {}
    pool_ref = spec.get("poolRef") if isinstance(spec, dict) else None
    return str((pool_ref or {}).get("name") or "") if isinstance(pool_ref, dict) else ""


@kopf.on.login()
async def login(
    memo: Any, logger: kopf.Logger, settings: kopf.OperatorSettings, **kwargs: Any
) -> kopf.ConnectionInfo | None:
    """Log in in-cluster or through KUBECONFIG, and share the credentials with the operator's own client."""
    info = kopf.login_via_client(logger=logger, settings=settings, **kwargs)
    if info is None:
        info = kopf.login_with_service_account(
            logger=logger, settings=settings, **kwargs
        ) or kopf.login_with_kubeconfig(logger=logger, settings=settings, **kwargs)
    if info is not None:
        await runtime_of(memo).api.connect(info)
    return info


@kopf.on.cleanup()
async def close_client(memo: Any, **_: Any) -> None:
    """Close the operator's HTTP session on exit."""
    await runtime_of(memo).api.close()


@kopf.index(*POOLS)
def pools(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[PoolKey, dict[str, Any]]:
    """Pools by ``(namespace, name)``."""
    return {(namespace or "", name): snapshot(body)}


@kopf.index(*EXPERIMENTS)
def experiments_by_pool(body: kopf.Body, namespace: str | None, **_: Any) -> dict[PoolKey, dict[str, Any]]:
    """Experiments by the ``(namespace, pool)`` they reference."""
    return {(namespace or "", pool_of_experiment(body)): snapshot(body)}


@kopf.index("", "v1", "pods", labels=TRAINER_PODS)
def pods_by_pool(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[PoolKey, dict[str, Any]]:
    """Trainer pods by ``(namespace, pool)`` (only their metadata and status)."""
    return {(namespace or "", str(labels[POOL_LABEL])): snapshot(body, spec=False)}


# A deleted pool's loop gets time to release its experiments before kopf cancels it.
@kopf.daemon(*POOLS, cancellation_backoff=30, cancellation_timeout=30)
async def pool_loop(
    stopped: kopf.DaemonStopped, body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """The pool's reconcile loop, for as long as the pool exists (indexes arrive as kwargs)."""
    controller = PoolController(namespace or "", name, runtime_of(memo))
    await controller.run(body, stopped, kwargs["experiments_by_pool"], kwargs["pods_by_pool"])


@kopf.on.event(*POOLS)
def pool_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """A pool changed (spec, /scale, the trainer's model facts): run its pass."""
    runtime_of(memo).wakeups.kick((namespace or "", name))


@kopf.on.event("", "v1", "pods", labels=TRAINER_PODS)
def pod_changed(namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any) -> None:
    """A trainer pod changed (ready, not ready, gone): run its pool's pass."""
    runtime_of(memo).wakeups.kick((namespace or "", str(labels[POOL_LABEL])))


@kopf.on.event(*EXPERIMENTS)
async def experiment_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """An experiment changed: its pool's pass takes care of it, or, without a pool, it is handled here."""
    runtime = runtime_of(memo)
    namespace = namespace or ""
    key = (namespace, pool_of_experiment(body))
    pools: kopf.Index[PoolKey, dict[str, Any]] = kwargs["pools"]
    if event.get("type") == "DELETED":
        runtime.ledger.forget(experiment_key(namespace, name))
        runtime.wakeups.kick(key)
        return
    pool = next(iter(pools.get(key, ())), None)
    if pool is not None and not (pool.get("metadata") or {}).get("deletionTimestamp"):
        runtime.wakeups.kick(key)
        return
    await reconcile_orphan(runtime, body)
