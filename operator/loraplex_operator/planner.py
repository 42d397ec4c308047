"""One reconcile pass over a pool and its experiments, as a pure function from observations to writes.

The controller gathers what the watches saw (the pool, its experiments, its
trainer pods), calls :func:`plan_pool`, and writes what comes back: status and
label patches for experiments, the pool's status, a scale request, the
promoted-adapters data, Events and metrics. Everything is decided here, over
all experiments of the pool at once, which is what makes placement safe: the
scheduler sees every slot in one call.

A pass is idempotent. Planning again over the result of a plan yields empty
patches, because nothing here depends on the wall clock except deadlines and
grace periods, and conditions keep their transition times.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from loraplex_api import Condition
from loraplex_api.experiment import PromotionSpec
from loraplex_api.wire import HISTORY_ANNOTATION, POOL_LABEL, REPLICA_LABEL

from . import scheduler
from .clock import from_rfc3339
from .conditions import PLACED, PROMOTED, PROVISIONED, REPLICA_FAILURE, find
from .events import Event, condition_events
from .lifecycle import (
    OwnedStatus,
    PoolAvailability,
    PoolContext,
    Timing,
    Verdict,
    assess,
    owned_status,
    settle,
)
from .memory import ModelFacts
from .observed import ExperimentView, PodView, PoolView
from .patches import minimal_patch
from .poolstatus import Provisioning, ReplicaHealth, pool_status, replica_health
from .promotion import PromotionOutcome, decide, dump_history
from .validation import describe


@dataclass(frozen=True)
class PoolMemory:
    """What the controller remembers about a pool between passes (lost on restart, which only delays)."""

    missing_since: Mapping[str, float] = field(default_factory=dict)
    """Replicas without a pod, and since when (a pod that never existed has no timestamp to read)."""
    idle_since: Mapping[str, float] = field(default_factory=dict)
    """Replicas without experiments, and since when (for the scale-down delay)."""


@dataclass(frozen=True)
class ExperimentPlan:
    """What to write on one experiment."""

    experiment: ExperimentView
    owned: OwnedStatus
    status_patch: dict[str, object]
    metadata_patch: dict[str, object]
    events: tuple[Event, ...] = ()
    waited: float | None = None
    """Seconds the experiment waited, when this pass placed it (not when it moved it)."""
    promotion: str | None = None
    """The promotion result to count, when this pass promoted, rolled back or refused a revision."""


@dataclass(frozen=True)
class PoolPlan:
    """What to write for one pool and its experiments."""

    experiments: tuple[ExperimentPlan, ...]
    status_patch: dict[str, object]
    scale: scheduler.ScaleRequest | None
    adapters: dict[str, str]
    """Promoted-adapters ConfigMap data: experiment name -> promoted checkpoint URI."""
    events: tuple[Event, ...]
    memory: PoolMemory
    slots_total: int
    slots_used: int
    phases: dict[str, int]


def plan_pool(
    view: PoolView,
    experiments: Sequence[ExperimentView],
    pods: Sequence[PodView],
    memory: PoolMemory,
    provisioning: Provisioning,
    *,
    now: float,
    timing: Timing,
) -> PoolPlan:
    """Decide everything about one pool and the experiments that reference it."""
    context, health = _context(view, pods, memory, now=now)
    verdicts = {exp.key: assess(exp, context, now=now, timing=timing) for exp in experiments}

    decision: scheduler.Decision | None = None
    if context.availability == "ok" and context.pool is not None:
        decision = _schedule(view, context, experiments, verdicts, health, memory, now=now)
        for exp in experiments:
            outcome = _outcome(decision, exp.key)
            verdicts[exp.key] = settle(
                exp, verdicts[exp.key], outcome, now=now, incarnations=context.incarnations
            )

    plans = tuple(_experiment_plan(exp, verdicts[exp.key], now=now) for exp in experiments)
    adapters_on: Counter[str] = Counter(
        p.owned.placement.replica for p in plans if p.owned.placement is not None
    )
    pending = sum(1 for exp in experiments if verdicts[exp.key].state == "pending")
    used_bytes = _used_bytes(context, experiments, verdicts)

    status = pool_status(
        view,
        health,
        adapters=adapters_on,
        pending=pending,
        used_bytes=used_bytes,
        provisioning=provisioning,
        now=now,
    )
    status_patch = minimal_patch(view.raw_status, status)
    scale = decision.scale if decision is not None else None

    idle = {r.name: memory.idle_since.get(r.name, now) for r in health if adapters_on.get(r.name, 0) == 0}
    missing = {r.name: r.unhealthy_since for r in health if not r.exists and r.unhealthy_since is not None}
    per_replica = context.pool.spec.capacity.max_adapters_per_replica if context.pool is not None else 0
    ready = sum(1 for r in health if r.ready and r.ordinal < context.desired_replicas)
    return PoolPlan(
        experiments=plans,
        status_patch=status_patch,
        scale=scale,
        adapters={p.experiment.name: p.owned.promoted.uri for p in plans if p.owned.promoted is not None},
        events=_pool_events(view.status.conditions, status, scale),
        memory=PoolMemory(missing_since=missing, idle_since=idle),
        slots_total=per_replica * ready,
        slots_used=sum(adapters_on.values()),
        phases=dict(Counter(p.owned.phase for p in plans)),
    )


def plan_orphan(exp: ExperimentView, *, now: float, timing: Timing) -> ExperimentPlan:
    """Decide about an experiment whose pool does not exist (or whose spec names none)."""
    return _experiment_plan(exp, assess(exp, None, now=now, timing=timing), now=now)


def _context(
    view: PoolView, pods: Sequence[PodView], memory: PoolMemory, *, now: float
) -> tuple[PoolContext, list[ReplicaHealth]]:
    """The pool as the experiments' decisions see it, and the health of each of its replicas."""
    pool = view.pool
    availability: PoolAvailability
    if view.deleting:
        availability, message = "missing", f"pool {view.name} is being deleted"
    elif pool is None:
        availability, message = "invalid", f"pool {view.name} has an invalid spec: {describe(view.problems)}"
    elif pool.spec.suspend:
        availability, message = "suspended", f"pool {view.name} is suspended (spec.suspend)"
    else:
        availability, message = "ok", ""
    desired = pool.spec.replicas if pool is not None and availability == "ok" else 0
    health = replica_health(view.name, desired, pods, memory.missing_since, now=now)
    context = PoolContext(
        name=view.name,
        availability=availability,
        message=message,
        pool=pool,
        facts=ModelFacts.from_status(view.status.model.wire() if view.status.model else None),
        desired_replicas=desired,
        unhealthy_since={
            r.name: r.unhealthy_since for r in health if r.unhealthy_since is not None and r.ordinal < desired
        },
        # A pod on its way out is the old incarnation still; its successor is the one that counts.
        incarnations={p.name: p.incarnation for p in pods if not p.deleting and p.incarnation},
    )
    return context, health


def _schedule(
    view: PoolView,
    context: PoolContext,
    experiments: Sequence[ExperimentView],
    verdicts: Mapping[str, Verdict],
    health: Sequence[ReplicaHealth],
    memory: PoolMemory,
    *,
    now: float,
) -> scheduler.Decision:
    """Ask the scheduler about every pending experiment, with every kept placement counted."""
    assert context.pool is not None
    kept: Counter[str] = Counter()
    placed: list[tuple[ExperimentView, str]] = []
    pending: list[ExperimentView] = []
    for exp in experiments:
        verdict = verdicts[exp.key]
        if verdict.state == "placed" and verdict.placement is not None:
            kept[verdict.placement.replica] += 1
            placed.append((exp, verdict.placement.replica))
        elif verdict.state == "pending":
            pending.append(exp)
    replicas = [
        scheduler.ReplicaState(
            name=r.name,
            ready=r.ready,
            idle_since=memory.idle_since.get(r.name, now) if kept[r.name] == 0 else None,
        )
        for r in health
    ]
    return scheduler.schedule(context.pool, context.facts, replicas, placed, pending, now=now)


def _outcome(decision: scheduler.Decision, key: str) -> scheduler.Placement | scheduler.Unplaced | None:
    placement = next((p for p in decision.placements if p.key == key), None)
    return placement if placement is not None else decision.unplaced.get(key)


def _experiment_plan(exp: ExperimentView, verdict: Verdict, *, now: float) -> ExperimentPlan:
    """Turn a final verdict into the patches, events and measurements of one experiment."""
    promotion = _promotion(exp)
    owned = owned_status(exp, verdict, promotion, now=now)
    status_patch = minimal_patch(exp.raw_status, owned.wire())

    labels: dict[str, object] = {REPLICA_LABEL: owned.placement.replica if owned.placement else None}
    if exp.spec is not None:
        labels[POOL_LABEL] = exp.spec.pool_ref.name
    metadata_patch: dict[str, object] = {}
    label_patch = minimal_patch(exp.labels, labels)
    if label_patch:
        metadata_patch["labels"] = label_patch
    if promotion.history != exp.history:
        metadata_patch["annotations"] = {HISTORY_ANNOTATION: dump_history(promotion.history)}

    events = list(verdict.events)
    events += condition_events(exp.status.conditions, owned.conditions)
    if promotion.event is not None:
        events.append(promotion.event)

    waited = None
    if owned.placement is not None and exp.status.placement is None:
        # Moves off a lost replica happen without waiting and are not counted.
        waited = now - _waiting_since(exp)
    return ExperimentPlan(
        experiment=exp,
        owned=owned,
        status_patch=status_patch,
        metadata_patch=metadata_patch,
        events=tuple(events),
        waited=waited,
        promotion=promotion.result,
    )


def _promotion(exp: ExperimentView) -> PromotionOutcome:
    spec = exp.spec.promotion if exp.spec is not None else PromotionSpec()
    return decide(spec, exp.status.adapter, exp.history, find(exp.status.conditions, PROMOTED))


def _waiting_since(exp: ExperimentView) -> float:
    """When the experiment started waiting: when it last became unplaced, else when it was created."""
    placed = find(exp.status.conditions, PLACED)
    if placed is not None and placed.status != "True":
        since = from_rfc3339(placed.last_transition_time)
        if since is not None:
            return since
    return exp.created


def _used_bytes(
    context: PoolContext, experiments: Sequence[ExperimentView], verdicts: Mapping[str, Verdict]
) -> int | None:
    """Adapter memory the placed experiments take, when the pool accounts memory."""
    pool = context.pool
    if pool is None or context.facts is None or pool.spec.capacity.adapter_memory_budget_bytes is None:
        return None
    total = 0
    for exp in experiments:
        if verdicts[exp.key].state == "placed":
            cost = scheduler.cost_of(context.facts, exp)
            total += cost.total_bytes if cost is not None else 0
    return total


def _pool_events(
    before: Sequence[Condition], status: Mapping[str, object], scale: scheduler.ScaleRequest | None
) -> tuple[Event, ...]:
    """Events about the pool: scaling, and provisioning or replicas starting to fail."""
    events: list[Event] = []
    if scale is not None:
        events.append(Event("Normal", scale.reason, scale.message))
    raw = status.get("conditions")
    after = [Condition.model_validate(c) for c in raw] if isinstance(raw, list) else []
    for type_ in (PROVISIONED, REPLICA_FAILURE):
        old, new = find(before, type_), find(after, type_)
        bad = "False" if type_ == PROVISIONED else "True"
        if (
            new is not None
            and new.status == bad
            and (old is None or (old.status, old.reason) != (new.status, new.reason))
        ):
            events.append(Event("Warning", new.reason, new.message))
    return tuple(events)
