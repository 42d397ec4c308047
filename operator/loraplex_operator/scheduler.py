"""Placement scheduler: a pure function from one pool and its experiments to placements and a scale request.

The planner hands it the pool (the API model), the model facts a trainer measured, the
observed replicas and the experiments (anything with a key, a creation time and a spec, such
as ``observed.ExperimentView``), calls :func:`schedule`, and writes what it returns. Nothing
here talks to Kubernetes.

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
    ``RankTooLarge`` (above ``maxLoRARank``), ``UnknownTargetModules`` (the
    model has no such linear module), ``TooLarge`` (more than a whole replica's
    budget) never resolve by waiting (``validation.py`` words them);
    ``WaitingForCapacity`` does, and its message says whether the pool is
    scaling, waiting for replicas to become ready, at ``maxReplicas`` or not
    autoscaling.

The result is deterministic (independent of input order) and idempotent:
applying a decision and scheduling again yields no new placement or scale.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loraplex_api import LoRAExperimentSpec, SharedBasePool

from .memory import ExperimentCost, ModelFacts, format_bytes, spec_cost
from .validation import RANK_TOO_LARGE, REWARD_MEMORY_TOO_LARGE, TOO_LARGE, UNKNOWN_TARGET_MODULES, unfit

WAITING_FOR_CAPACITY = "WaitingForCapacity"
UNFIT_REASONS = frozenset({RANK_TOO_LARGE, UNKNOWN_TARGET_MODULES, TOO_LARGE, REWARD_MEMORY_TOO_LARGE})
"""Reasons no amount of waiting fixes: the spec has to change."""

SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"


class Experiment(Protocol):
    """What the scheduler reads of an experiment (``observed.ExperimentView`` is one)."""

    @property
    def key(self) -> str:
        """``namespace/name``, unique."""
        ...

    @property
    def name(self) -> str: ...

    @property
    def created(self) -> float:
        """Unix time; older experiments go first among equal priority."""
        ...

    @property
    def spec(self) -> LoRAExperimentSpec | None:
        """The validated spec; an experiment without one cannot be scheduled."""
        ...


@dataclass(frozen=True)
class ReplicaState:
    """One StatefulSet replica of the pool, as observed."""

    name: str
    ready: bool
    idle_since: float | None
    """Unix time since which the replica has had no adapters; None while it has some or when unknown."""


@dataclass(frozen=True)
class Placement:
    """An experiment assigned to one replica of the pool."""

    key: str
    replica: str


@dataclass(frozen=True)
class Unplaced:
    """Why an experiment was not placed: a condition reason (CamelCase) and a sentence for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class ScaleRequest:
    """A new ``spec.replicas`` for the pool, with an event reason and message."""

    replicas: int
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What :func:`schedule` decided: new placements, a scale request, and why the rest wait."""

    placements: tuple[Placement, ...]
    scale: ScaleRequest | None
    unplaced: Mapping[str, Unplaced] = field(hash=False)
    """Experiment key -> reason, for every pending experiment that got no placement."""


def replica_name(pool: str, ordinal: int) -> str:
    """Name of a pool's replica, as its StatefulSet names the pod."""
    return f"{pool}-{ordinal}"


def cost_of(facts: ModelFacts | None, experiment: Experiment) -> ExperimentCost | None:
    """An experiment's memory cost on the pool's replicas, or None while the pool has no model facts."""
    return None if facts is None else spec_cost(facts, _spec(experiment))


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
class _Plan:
    """Scratch state of the pool while scheduling."""

    pool: SharedBasePool
    facts: ModelFacts | None
    observed: dict[str, ReplicaState]
    budget: int | None
    """Bytes per replica when memory is accounted (a budget and model facts), else None."""
    used_bytes: dict[str, int] = field(default_factory=dict)
    used_slots: dict[str, int] = field(default_factory=dict)
    ready: _BestFit = field(default_factory=_BestFit)
    waiting: list[tuple[Experiment, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.pool.metadata.name

    @property
    def desired(self) -> int:
        return self.pool.spec.replicas

    def replica(self, ordinal: int) -> ReplicaState:
        """The observed state of a replica; one not observed yet is neither ready nor known idle."""
        name = replica_name(self.name, ordinal)
        return self.observed.get(name) or ReplicaState(name=name, ready=False, idle_since=None)

    def charge(self, replica: str, cost: int) -> None:
        """Count one experiment against a replica."""
        self.used_bytes[replica] = self.used_bytes.get(replica, 0) + cost
        self.used_slots[replica] = self.used_slots.get(replica, 0) + 1

    def charged_bytes(self, cost: ExperimentCost | None) -> int:
        """Bytes an experiment of this cost takes here; 0 when memory is not accounted."""
        return cost.total_bytes if self.budget is not None and cost is not None else 0

    def offer(self, into: _BestFit, ordinal: int) -> None:
        """Offer a replica to a best-fit structure with whatever it has left."""
        name = replica_name(self.name, ordinal)
        free_bytes = 0 if self.budget is None else self.budget - self.used_bytes.get(name, 0)
        slots = self.pool.spec.capacity.max_adapters_per_replica
        into.add(ordinal, free_bytes, slots - self.used_slots.get(name, 0))


def schedule(
    pool: SharedBasePool,
    facts: ModelFacts | None,
    replicas: Sequence[ReplicaState],
    placed: Sequence[tuple[Experiment, str]],
    pending: Sequence[Experiment],
    *,
    now: float,
) -> Decision:
    """Place the pool's pending experiments on its replicas and decide how it scales (see the module docstring).

    ``placed`` pairs each experiment that keeps its placement with its replica's name.
    """
    budget = pool.spec.capacity.adapter_memory_budget_bytes if facts is not None else None
    plan = _Plan(pool=pool, facts=facts, observed={r.name: r for r in replicas}, budget=budget)
    placed_keys: set[str] = set()
    for experiment, replica in placed:
        placed_keys.add(experiment.key)
        plan.charge(replica, plan.charged_bytes(cost_of(facts, experiment)))
    for ordinal in range(plan.desired):
        if plan.replica(ordinal).ready:
            plan.offer(plan.ready, ordinal)

    placements: list[Placement] = []
    unplaced: dict[str, Unplaced] = {}
    for experiment in _in_priority_order(pending, placed_keys):
        cost = cost_of(facts, experiment)
        rejected = unfit(experiment.name, _spec(experiment), pool, facts, cost)
        if rejected:
            unplaced[experiment.key] = Unplaced(rejected[0].reason, rejected[0].message)
            continue
        charged = plan.charged_bytes(cost)
        into = plan.ready.place(charged)
        if into is None:
            plan.waiting.append((experiment, charged))
            continue
        replica = replica_name(plan.name, into)
        plan.charge(replica, charged)
        placements.append(Placement(experiment.key, replica))

    scale = _scale_up(plan, unplaced)
    if scale is None and pool.spec.autoscaling.enabled and not plan.waiting:
        scale = _scale_down(plan, now)
    return Decision(placements=tuple(placements), scale=scale, unplaced=dict(sorted(unplaced.items())))


def _spec(experiment: Experiment) -> LoRAExperimentSpec:
    if experiment.spec is None:
        raise ValueError(f"experiment {experiment.key} has an invalid spec and asks for nothing")
    return experiment.spec


def _in_priority_order(pending: Iterable[Experiment], placed_keys: set[str]) -> list[Experiment]:
    """Pending experiments not yet placed: higher priority first, then older, then by key."""
    seen: set[str] = set()
    for experiment in pending:
        if experiment.key in seen:
            raise ValueError(f"pending experiment {experiment.key!r} is listed twice")
        seen.add(experiment.key)
    todo = [e for e in pending if e.key not in placed_keys]
    return sorted(todo, key=lambda e: (-_spec(e).priority, e.created, e.key))


def _scale_up(plan: _Plan, unplaced: dict[str, Unplaced]) -> ScaleRequest | None:
    """Pack waiting experiments into not-ready and new replicas, say why each waits; the request, if any."""
    autoscaling = plan.pool.spec.autoscaling
    coming = _BestFit()
    for i in range(plan.desired):
        if not plan.replica(i).ready:
            plan.offer(coming, i)
    not_ready = len(coming)
    target = plan.desired
    why_full = _why_full(plan)
    for experiment, cost in plan.waiting:
        into = coming.place(cost)
        # A replica beyond spec.replicas may still hold placed experiments, so
        # opening it again need not make room: keep opening up to the cap.
        while into is None and autoscaling.enabled and target < autoscaling.max_replicas:
            plan.offer(coming, target)
            target += 1
            into = coming.place(cost)
        if into is not None and into < plan.desired:
            outlook = f"waiting for {not_ready} replica(s) that are not ready yet"
        elif into is not None:
            outlook = f"scaling pool {plan.name} up"
        elif autoscaling.enabled:
            outlook = f"pool {plan.name} is at spec.autoscaling.maxReplicas {autoscaling.max_replicas}"
        else:
            outlook = "autoscaling is off (spec.autoscaling.enabled)"
        need = f"needs {format_bytes(cost)}; " if plan.budget is not None else ""
        unplaced[experiment.key] = Unplaced(WAITING_FOR_CAPACITY, f"{need}{why_full}; {outlook}")

    if autoscaling.enabled:
        target = max(target, min(autoscaling.min_replicas, autoscaling.max_replicas))
    if target <= plan.desired:
        return None
    cause = (
        f"{len(plan.waiting)} experiment(s) wait for capacity"
        if plan.waiting
        else f"below spec.autoscaling.minReplicas {autoscaling.min_replicas}"
    )
    return ScaleRequest(
        replicas=target,
        reason=SCALE_UP,
        message=f"{cause}; scaling from {plan.desired} to {target} replicas",
    )


def _why_full(plan: _Plan) -> str:
    """A clause saying why no ready replica of the pool takes more experiments."""
    ready = sum(1 for i in range(plan.desired) if plan.replica(i).ready)
    if ready == 0:
        return f"pool {plan.name} has no ready replica ({plan.desired} desired)"
    most_free = plan.ready.most_free_bytes()
    if most_free is None or plan.budget is None:
        slots = plan.pool.spec.capacity.max_adapters_per_replica
        return f"all {ready} ready replica(s) of pool {plan.name} hold capacity.maxAdaptersPerReplica {slots} experiments"
    return (
        f"the most free adapter memory on a ready replica of pool {plan.name} with a free slot "
        f"is {format_bytes(most_free)}"
    )


def _scale_down(plan: _Plan, now: float) -> ScaleRequest | None:
    """Remove trailing replicas that have been empty for the delay, down to minReplicas; the request, if any."""
    autoscaling = plan.pool.spec.autoscaling
    delay = float(autoscaling.scale_down_delay_seconds)
    target = plan.desired
    while target > autoscaling.min_replicas:
        replica = plan.replica(target - 1)
        idle = (
            plan.used_slots.get(replica.name, 0) == 0
            and replica.idle_since is not None
            and now - replica.idle_since >= delay
        )
        if not idle:
            break
        target -= 1
    if target == plan.desired:
        return None
    return ScaleRequest(
        replicas=target,
        reason=SCALE_DOWN,
        message=f"replicas {replica_name(plan.name, target)} to {replica_name(plan.name, plan.desired - 1)} "
        f"have been idle for at least {delay:g}s; scaling from {plan.desired} to {target} replicas",
    )
