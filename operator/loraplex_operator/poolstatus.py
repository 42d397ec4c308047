"""A pool's status: replica counts, slot accounting, per-replica status and its conditions.

The operator writes the whole pool status except ``status.model`` (the
trainer's measured facts), so nothing here ever produces that key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraplex_api import Condition
from loraplex_api.pool import ModelFactsStatus

from .clock import to_rfc3339
from .conditions import (
    MODEL_AVAILABLE,
    PROVISIONED,
    READY,
    RECONCILING,
    REPLICA_FAILURE,
    STALLED,
    SUSPENDED,
    Want,
    apply_all,
    find,
)
from .observed import PodView, PoolView
from .render import selector_string

CONDITION_ORDER = (READY, PROVISIONED, MODEL_AVAILABLE, REPLICA_FAILURE, SUSPENDED, RECONCILING, STALLED)


@dataclass(frozen=True)
class ReplicaHealth:
    """One replica slot of the pool: its pod (if any) and since when it has not been ready."""

    name: str
    ordinal: int
    exists: bool
    ready: bool
    unhealthy_since: float | None
    """None while ready; else when it stopped being ready (or was first seen missing)."""
    problem: str = ""


@dataclass(frozen=True)
class Provisioning:
    """How applying the pool's children went."""

    ok: bool
    reason: str
    message: str


def replica_health(
    pool: str, desired: int, pods: Sequence[PodView], missing_since: Mapping[str, float], *, now: float
) -> list[ReplicaHealth]:
    """Every replica the pool wants or still has, ordinal by ordinal."""
    by_ordinal = {p.ordinal: p for p in pods if p.ordinal is not None}
    count = max([desired, *(o + 1 for o in by_ordinal if o is not None)])
    health: list[ReplicaHealth] = []
    for ordinal in range(count):
        name = f"{pool}-{ordinal}"
        pod = by_ordinal.get(ordinal)
        if pod is not None and pod.ready:
            health.append(ReplicaHealth(name, ordinal, exists=True, ready=True, unhealthy_since=None))
        elif pod is not None and not pod.deleting:
            since = pod.since if pod.since is not None else missing_since.get(name, now)
            health.append(ReplicaHealth(name, ordinal, True, False, since, pod.problem))
        else:
            health.append(ReplicaHealth(name, ordinal, False, False, missing_since.get(name, now)))
    return health


def pool_status(
    view: PoolView,
    replicas: Sequence[ReplicaHealth],
    *,
    adapters: Mapping[str, int],
    pending: int,
    used_bytes: int | None,
    provisioning: Provisioning,
    now: float,
) -> dict[str, Any]:
    """The status the operator writes on a pool (everything but ``model``)."""
    pool = view.pool
    suspended = pool is not None and pool.spec.suspend
    desired = 0 if pool is None or suspended else pool.spec.replicas
    wanted = [r for r in replicas if r.ordinal < desired]
    ready = [r for r in wanted if r.ready]
    # A replica that is merely starting (pulling, loading the model) is not a failure; one whose
    # trainer cannot run (crash loop, bad image, bad config) is, however long it has been.
    failing = [r for r in wanted if r.problem and not r.ready]

    wants = [
        _provisioned(provisioning),
        _replica_failure(failing),
        Want(SUSPENDED, "True", "SpecSuspend", "spec.suspend is true; replicas scaled to 0")
        if suspended
        else Want(SUSPENDED, "False", "Active", "spec.suspend is false"),
    ]
    model = _model_available(view.status.model)
    if model is not None:
        wants.append(model)
    stamp = to_rfc3339(now)
    conditions = apply_all(view.status.conditions, wants, generation=view.generation, now=stamp)
    summary = _summary(conditions, ready=len(ready), desired=desired)
    conditions = apply_all(conditions, summary, generation=view.generation, now=stamp)

    per_replica = pool.spec.capacity.max_adapters_per_replica if pool is not None else 0
    budget = pool.spec.capacity.adapter_memory_budget_bytes if pool is not None else None
    capacity: dict[str, Any] = {
        "adapterSlots": per_replica * len(ready),
        "usedSlots": sum(adapters.values()),
        "pendingExperiments": pending,
        "memoryBytes": budget * len(ready) if budget is not None else None,
        "usedMemoryBytes": used_bytes if budget is not None else None,
    }
    return {
        "observedGeneration": view.generation,
        "conditions": [c.wire() for c in _ordered(conditions)],
        "replicas": sum(1 for r in replicas if r.exists),
        "readyReplicas": sum(1 for r in replicas if r.ready),
        "selector": selector_string(view.name),
        "capacity": capacity,
        "replicaStatus": [
            {"name": r.name, "ready": r.ready, "adapters": adapters.get(r.name, 0)} for r in replicas
        ],
    }


def _provisioned(provisioning: Provisioning) -> Want:
    return Want(
        PROVISIONED, "True" if provisioning.ok else "False", provisioning.reason, provisioning.message
    )


def _model_available(model: ModelFactsStatus | None) -> Want | None:
    """From what the trainers wrote in status.model: a problem, the facts of a load, or nothing yet."""
    if model is not None and model.problem is not None:
        return Want(MODEL_AVAILABLE, "False", model.problem.reason, model.problem.message)
    if model is not None and model.parameter_count:
        return Want(MODEL_AVAILABLE, "True", "ModelLoaded", f"{model.parameter_count} parameters loaded")
    return None


def _replica_failure(failing: Sequence[ReplicaHealth]) -> Want:
    if not failing:
        return Want(REPLICA_FAILURE, "False", "ReplicasHealthy", "no replica has failed")
    parts = [f"replica {r.name}: {r.problem}" for r in failing]
    return Want(REPLICA_FAILURE, "True", failing[0].problem.split(":", 1)[0], "; ".join(parts))


def _summary(conditions: Sequence[Condition], *, ready: int, desired: int) -> list[Want]:
    """Ready, Reconciling and Stalled of a pool (see conditions.py for why the last two exist)."""
    provisioned = find(conditions, PROVISIONED)
    failure = find(conditions, REPLICA_FAILURE)
    suspended = find(conditions, SUSPENDED)
    counts = f"{ready}/{desired} replicas ready"
    if suspended is not None and suspended.status == "True":
        return [
            Want(READY, "False", "Suspended", suspended.message),
            Want(RECONCILING, "False", "Suspended"),
            Want(STALLED, "False", "NotStalled"),
        ]
    if provisioned is not None and provisioned.status != "True":
        stalled = provisioned.reason == "InvalidSpec"
        return [
            Want(READY, "False", provisioned.reason, provisioned.message),
            Want(RECONCILING, "False" if stalled else "True", provisioned.reason, provisioned.message),
            Want(STALLED, "True" if stalled else "False", provisioned.reason if stalled else "NotStalled"),
        ]
    model = find(conditions, MODEL_AVAILABLE)
    if model is not None and model.status == "False":
        # The trainers keep trying (a hub that comes back, a cache filled by hand), without restarts.
        return [
            Want(READY, "False", model.reason, model.message),
            Want(RECONCILING, "False", model.reason),
            Want(STALLED, "True", model.reason, model.message),
        ]
    if failure is not None and failure.status == "True":
        return [
            Want(READY, "False", "ReplicasFailing", failure.message),
            Want(RECONCILING, "False", "ReplicasFailing"),
            Want(STALLED, "True", failure.reason, failure.message),
        ]
    if ready >= desired:
        reason = "ScaledToZero" if desired == 0 else "ReplicasReady"
        return [
            Want(READY, "True", reason, counts),
            Want(RECONCILING, "False", reason),
            Want(STALLED, "False", "NotStalled"),
        ]
    return [
        Want(READY, "False", "ReplicasStarting", counts),
        Want(RECONCILING, "True", "ReplicasStarting", counts),
        Want(STALLED, "False", "NotStalled"),
    ]


def _ordered(conditions: Sequence[Condition]) -> list[Condition]:
    rank = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted(conditions, key=lambda c: rank.get(c.type, len(rank)))
