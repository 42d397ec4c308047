"""Placement scheduler: a pure function from pools and experiments to placements and scale requests.

The kopf handlers turn custom resources into the frozen dataclasses below, call
:func:`schedule`, and write what it returns. Nothing here talks to Kubernetes.

How experiments are placed
    Pending experiments are taken in priority order (higher ``priority`` first,
    then older first, then by key), and each goes to the ready replica of its
    pool that fits it with the least free memory left (best fit), ties broken
    by fewer free slots, then the lower ordinal. Within one priority class and
    age this is best-fit decreasing by arrival, not by size: priority order wins
    over size order, because a high-priority experiment must never wait behind
    a lower one that happened to be larger. Best fit keeps replicas full and
    leaves whole replicas empty, which is what lets idle ones be scaled down.

    Only replicas ``0 .. spec.replicas - 1`` that are ready receive experiments.
    Experiments already placed never move and count against their replica even
    when it is not ready. Memory is accounted only when the pool has both an
    ``adapterMemoryBudget`` and model facts from a trainer; otherwise slots are
    the only limit.

How pools scale (only with autoscaling enabled)
    Up: experiments left waiting for capacity are packed, with the same best
    fit, into replicas that exist but are not ready yet (capacity that is
    coming) and then into new empty replicas, up to ``maxReplicas``; the pool
    is asked for as many replicas as that took, and never fewer than
    ``minReplicas``. Because starting replicas count as coming capacity, the
    same demand never asks twice.
    Down: trailing replicas (the StatefulSet removes the highest ordinals
    first) with no experiments, idle for at least ``scaleDownDelaySeconds``,
    are removed down to ``minReplicas``, but only while no experiment of the
    pool waits for capacity.

Why an experiment is not placed (``Unplaced.reason``)
    ``PoolNotFound`` (no pool of that name), ``RankTooLarge`` (above
    ``maxLoRARank``), ``UnknownTargetModules`` (the model has no such linear
    module), ``TooLarge`` (more than a whole replica's budget) never resolve by
    waiting; ``WaitingForCapacity`` does, and its message says whether the pool
    is scaling, waiting for replicas to become ready, at ``maxReplicas`` or not
    autoscaling.

The result is deterministic (independent of input order) and idempotent:
applying a decision and scheduling again yields no new placement or scale.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .memory import ExperimentCost, ModelFacts, experiment_cost, format_bytes, unknown_target_modules

POOL_NOT_FOUND = "PoolNotFound"
RANK_TOO_LARGE = "RankTooLarge"
UNKNOWN_TARGET_MODULES = "UnknownTargetModules"
TOO_LARGE = "TooLarge"
WAITING_FOR_CAPACITY = "WaitingForCapacity"

SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"


@dataclass(frozen=True)
class ReplicaState:
    """One StatefulSet replica of a pool, as observed."""

    name: str
    ready: bool
    idle_since: float | None
    """Unix time since which the replica has had no adapters; None while it has some or when unknown."""


@dataclass(frozen=True)
class PoolState:
    """A SharedBasePool's spec and observed state, as far as placement needs it."""

    name: str
    model_name: str
    desired_replicas: int
    ready_replicas: int
    replicas: tuple[ReplicaState, ...]
    """Observed replicas, named ``f"{name}-{ordinal}"``."""
    max_adapters_per_replica: int
    max_lora_rank: int
    adapter_memory_budget: int | None
    """Bytes per replica for adapters, optimizer state and rollout buffers; None means unlimited."""
    autoscaling: bool
    min_replicas: int
    max_replicas: int
    scale_down_delay_seconds: float
    model_facts: ModelFacts | None
    """From ``status.model``; None until a trainer reported them, and then only slots are counted."""


@dataclass(frozen=True)
class ExperimentDemand:
    """What one LoRAExperiment asks of a pool."""

    key: str
    """``namespace/name``, unique."""
    pool: str
    """``spec.poolRef.name``."""
    rank: int
    target_modules: tuple[str, ...] | str
    """Module names, or ``"all-linear"``."""
    prompts_per_step: int
    group_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    priority: int
    created: float
    """Unix time; older experiments go first among equal priority."""


@dataclass(frozen=True)
class Placement:
    """An experiment assigned to one replica of a pool."""

    key: str
    pool: str
    replica: str


@dataclass(frozen=True)
class Unplaced:
    """Why an experiment was not placed: a condition reason (CamelCase) and a sentence for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class ScaleRequest:
    """A new ``spec.replicas`` for a pool, with an event reason and message."""

    pool: str
    replicas: int
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What :func:`schedule` decided: new placements, scale requests, and why the rest wait."""

    placements: tuple[Placement, ...]
    scale: tuple[ScaleRequest, ...]
    unplaced: Mapping[str, Unplaced] = field(hash=False)
    """Experiment key -> reason, for every pending experiment that got no placement."""


def replica_name(pool: str, ordinal: int) -> str:
    """Name of a pool's replica, as its StatefulSet names the pod."""
    return f"{pool}-{ordinal}"


def demand_cost(pool: PoolState, demand: ExperimentDemand) -> ExperimentCost | None:
    """An experiment's memory cost on this pool's replicas, or None while the pool has no model facts."""
    if pool.model_facts is None:
        return None
    return experiment_cost(
        pool.model_facts,
        rank=demand.rank,
        target_modules=demand.target_modules,
        prompts_per_step=demand.prompts_per_step,
        group_size=demand.group_size,
        max_prompt_tokens=demand.max_prompt_tokens,
        max_new_tokens=demand.max_new_tokens,
    )


class _BestFit:
    """Replicas with a free slot, kept sorted by (free bytes, free slots, ordinal) for bisection.

    Replicas whose memory is not accounted have 0 free bytes and every experiment
    costs 0, so the order degrades to "fewest free slots first".
    """

    def __init__(self) -> None:
        self._keys: list[tuple[int, int, int]] = []

    def add(self, ordinal: int, free_bytes: int, free_slots: int) -> None:
        """Offer a replica for placement (ignored when it has no free slot)."""
        if free_slots > 0:
            insort(self._keys, (free_bytes, free_slots, ordinal))

    def place(self, cost: int) -> int | None:
        """Take ``cost`` bytes and a slot from the fullest replica that fits; its ordinal, or None."""
        i = bisect_left(self._keys, (cost, 0, -1))
        if i == len(self._keys):
            return None
        free_bytes, free_slots, ordinal = self._keys.pop(i)
        self.add(ordinal, free_bytes - cost, free_slots - 1)
        return ordinal

    def most_free_bytes(self) -> int | None:
        """The largest free memory among replicas with a free slot; None when no slot is free."""
        return max((k[0] for k in self._keys), default=None)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class _PoolPlan:
    """Scratch state for one pool while scheduling."""

    pool: PoolState
    tracks_memory: bool
    observed: dict[str, ReplicaState] = field(default_factory=dict)
    used_bytes: dict[str, int] = field(default_factory=dict)
    used_slots: dict[str, int] = field(default_factory=dict)
    ready: _BestFit = field(default_factory=_BestFit)
    waiting: list[tuple[ExperimentDemand, int]] = field(default_factory=list)

    def replica(self, ordinal: int) -> ReplicaState:
        """The observed state of a replica; one not observed yet is neither ready nor known idle."""
        name = replica_name(self.pool.name, ordinal)
        return self.observed.get(name) or ReplicaState(name=name, ready=False, idle_since=None)

    def charge(self, replica: str, cost: int) -> None:
        """Count one experiment against a replica."""
        self.used_bytes[replica] = self.used_bytes.get(replica, 0) + cost
        self.used_slots[replica] = self.used_slots.get(replica, 0) + 1

    def charged_bytes(self, cost: ExperimentCost | None) -> int:
        """Bytes an experiment of this cost takes here; 0 when memory is not accounted."""
        return cost.total_bytes if self.tracks_memory and cost is not None else 0

    def offer(self, into: _BestFit, ordinal: int) -> None:
        """Offer a replica to a best-fit structure with whatever it has left."""
        name = replica_name(self.pool.name, ordinal)
        budget = self.pool.adapter_memory_budget if self.tracks_memory else None
        free_bytes = 0 if budget is None else budget - self.used_bytes.get(name, 0)
        into.add(ordinal, free_bytes, self.pool.max_adapters_per_replica - self.used_slots.get(name, 0))


def schedule(
    pools: Sequence[PoolState],
    placed: Sequence[tuple[ExperimentDemand, Placement]],
    pending: Sequence[ExperimentDemand],
    *,
    now: float,
) -> Decision:
    """Place pending experiments onto pool replicas and decide how pools scale (see the module docstring)."""
    plans: dict[str, _PoolPlan] = {}
    for pool in sorted(pools, key=lambda p: p.name):
        if pool.name in plans:
            raise ValueError(f"pool {pool.name!r} is listed twice")
        tracks = pool.model_facts is not None and pool.adapter_memory_budget is not None
        observed = {r.name: r for r in pool.replicas}
        plans[pool.name] = _PoolPlan(pool=pool, tracks_memory=tracks, observed=observed)

    placed_keys: set[str] = set()
    for demand, placement in placed:
        placed_keys.add(placement.key)
        plan = plans.get(placement.pool)
        if plan is not None:
            plan.charge(placement.replica, plan.charged_bytes(demand_cost(plan.pool, demand)))

    for plan in plans.values():
        for ordinal in range(plan.pool.desired_replicas):
            if plan.replica(ordinal).ready:
                plan.offer(plan.ready, ordinal)

    placements: list[Placement] = []
    unplaced: dict[str, Unplaced] = {}
    for demand in _in_priority_order(pending, placed_keys):
        plan = plans.get(demand.pool)
        if plan is None:
            namespace = demand.key.partition("/")[0]
            message = f"spec.poolRef.name: no SharedBasePool {demand.pool!r} in namespace {namespace}"
            unplaced[demand.key] = Unplaced(POOL_NOT_FOUND, message)
            continue
        cost = demand_cost(plan.pool, demand)
        rejected = _reject(plan.pool, demand, cost)
        if rejected is not None:
            unplaced[demand.key] = rejected
            continue
        charged = plan.charged_bytes(cost)
        into = plan.ready.place(charged)
        if into is None:
            plan.waiting.append((demand, charged))
            continue
        replica = replica_name(plan.pool.name, into)
        plan.charge(replica, charged)
        placements.append(Placement(demand.key, plan.pool.name, replica))

    scale: list[ScaleRequest] = []
    for plan in plans.values():
        request = _scale_up(plan, unplaced)
        if request is None and plan.pool.autoscaling and not plan.waiting:
            request = _scale_down(plan, now)
        if request is not None:
            scale.append(request)

    return Decision(
        placements=tuple(placements),
        scale=tuple(scale),
        unplaced=dict(sorted(unplaced.items())),
    )


def _in_priority_order(pending: Iterable[ExperimentDemand], placed_keys: set[str]) -> list[ExperimentDemand]:
    """Pending experiments not yet placed: higher priority first, then older, then by key."""
    seen: set[str] = set()
    for demand in pending:
        if demand.key in seen:
            raise ValueError(f"pending experiment {demand.key!r} is listed twice")
        seen.add(demand.key)
    todo = [d for d in pending if d.key not in placed_keys]
    return sorted(todo, key=lambda d: (-d.priority, d.created, d.key))


def _reject(pool: PoolState, demand: ExperimentDemand, cost: ExperimentCost | None) -> Unplaced | None:
    """Why the experiment can never fit this pool, whatever its load; None when it could."""
    if demand.rank > pool.max_lora_rank:
        return Unplaced(
            RANK_TOO_LARGE,
            f"spec.lora.rank: {demand.rank} exceeds pool {pool.name} capacity.maxLoRARank {pool.max_lora_rank}",
        )
    facts = pool.model_facts
    if facts is not None:
        unknown = unknown_target_modules(facts, demand.target_modules)
        if unknown:
            return Unplaced(
                UNKNOWN_TARGET_MODULES,
                f"spec.lora.targetModules: {', '.join(unknown)} not a linear module of {pool.model_name}; "
                f"known: {', '.join(sorted(facts.linear_modules))}",
            )
    budget = pool.adapter_memory_budget
    if cost is not None and budget is not None and cost.total_bytes > budget:
        return Unplaced(
            TOO_LARGE,
            f"needs {format_bytes(cost.total_bytes)} (adapter and optimizer {format_bytes(cost.adapter_bytes)}, "
            f"rollout KV cache {format_bytes(cost.rollout_bytes)}) but pool {pool.name} "
            f"capacity.adapterMemoryBudget is {format_bytes(budget)} per replica; lower spec.lora.rank, "
            "spec.algorithm.promptsPerStep, groupSize or maxNewTokens",
        )
    return None


def _scale_up(plan: _PoolPlan, unplaced: dict[str, Unplaced]) -> ScaleRequest | None:
    """Pack waiting experiments into not-ready and new replicas, say why each waits; the request, if any."""
    pool = plan.pool
    coming = _BestFit()
    for i in range(pool.desired_replicas):
        if not plan.replica(i).ready:
            plan.offer(coming, i)
    not_ready = len(coming)
    target = pool.desired_replicas
    why_full = _why_full(plan)
    for demand, cost in plan.waiting:
        into = coming.place(cost)
        # A replica beyond spec.replicas may still hold placed experiments, so
        # opening it again need not make room: keep opening up to the cap.
        while into is None and pool.autoscaling and target < pool.max_replicas:
            plan.offer(coming, target)
            target += 1
            into = coming.place(cost)
        if into is not None and into < pool.desired_replicas:
            outlook = f"waiting for {not_ready} replica(s) that are not ready yet"
        elif into is not None:
            outlook = f"scaling pool {pool.name} up"
        elif pool.autoscaling:
            outlook = f"pool {pool.name} is at spec.autoscaling.maxReplicas {pool.max_replicas}"
        else:
            outlook = "autoscaling is off (spec.autoscaling.enabled)"
        need = f"needs {format_bytes(cost)}; " if plan.tracks_memory else ""
        unplaced[demand.key] = Unplaced(WAITING_FOR_CAPACITY, f"{need}{why_full}; {outlook}")

    if pool.autoscaling:
        target = max(target, min(pool.min_replicas, pool.max_replicas))
    if target <= pool.desired_replicas:
        return None
    cause = (
        f"{len(plan.waiting)} experiment(s) wait for capacity"
        if plan.waiting
        else f"below spec.autoscaling.minReplicas {pool.min_replicas}"
    )
    return ScaleRequest(
        pool=pool.name,
        replicas=target,
        reason=SCALE_UP,
        message=f"{cause}; scaling from {pool.desired_replicas} to {target} replicas",
    )


def _why_full(plan: _PoolPlan) -> str:
    """A clause saying why no ready replica of the pool takes more experiments."""
    pool = plan.pool
    ready = sum(1 for i in range(pool.desired_replicas) if plan.replica(i).ready)
    if ready == 0:
        return f"pool {pool.name} has no ready replica ({pool.desired_replicas} desired)"
    most_free = plan.ready.most_free_bytes()
    if most_free is None or not plan.tracks_memory:
        return (
            f"all {ready} ready replica(s) of pool {pool.name} hold "
            f"capacity.maxAdaptersPerReplica {pool.max_adapters_per_replica} experiments"
        )
    return (
        f"the most free adapter memory on a ready replica of pool {pool.name} with a free slot "
        f"is {format_bytes(most_free)}"
    )


def _scale_down(plan: _PoolPlan, now: float) -> ScaleRequest | None:
    """Remove trailing replicas that have been empty for the delay, down to minReplicas; the request, if any."""
    pool = plan.pool
    target = pool.desired_replicas
    while target > pool.min_replicas:
        replica = plan.replica(target - 1)
        idle = (
            plan.used_slots.get(replica.name, 0) == 0
            and replica.idle_since is not None
            and now - replica.idle_since >= pool.scale_down_delay_seconds
        )
        if not idle:
            break
        target -= 1
    if target == pool.desired_replicas:
        return None
    return ScaleRequest(
        pool=pool.name,
        replicas=target,
        reason=SCALE_DOWN,
        message=f"replicas {replica_name(pool.name, target)} to {replica_name(pool.name, pool.desired_replicas - 1)} "
        f"have been idle for at least "
        f"{pool.scale_down_delay_seconds:g}s; scaling from {pool.desired_replicas} to {target} replicas",
    )
