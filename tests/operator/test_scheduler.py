"""Tests for the placement scheduler: worked examples, then properties checked with hypothesis."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex_api import LoRAExperimentSpec, SharedBasePool
from loraplex_operator.memory import LinearShape, ModelFacts
from loraplex_operator.scheduler import (
    RANK_TOO_LARGE,
    SCALE_DOWN,
    SCALE_UP,
    TOO_LARGE,
    UNKNOWN_TARGET_MODULES,
    WAITING_FOR_CAPACITY,
    Decision,
    ReplicaState,
    ScaleRequest,
    cost_of,
    schedule,
)

NOW = 10_000.0

# One linear module 1->1 in one layer: 2 parameters per rank, 4 fp32 copies = 32 bytes per rank.
# hidden_size 0 means no KV cache, so an experiment of rank r costs exactly 32 * r.
UNIT_FACTS = ModelFacts(
    parameter_count=10, linear_modules={"q_proj": LinearShape(1, 1, 1)}, hidden_size=0, num_layers=1
)
RANK_BYTES = 32


@dataclasses.dataclass(frozen=True)
class Pool:
    """A pool as the planner hands it to the scheduler: the API model, the facts, the observed replicas."""

    pool: SharedBasePool
    facts: ModelFacts | None
    replicas: tuple[ReplicaState, ...]

    @property
    def name(self) -> str:
        return self.pool.metadata.name

    def with_spec(self, **changes: Any) -> Pool:
        """The same pool with spec fields changed (snake_case, nested models as dicts)."""
        spec = self.pool.spec.model_dump()
        for key, value in changes.items():
            if isinstance(value, dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        pool = self.pool.model_copy(update={"spec": type(self.pool.spec).model_validate(spec)})
        return dataclasses.replace(self, pool=pool)


@dataclasses.dataclass(frozen=True)
class Exp:
    """An experiment as the scheduler reads it (observed.ExperimentView has the same attributes)."""

    name: str
    spec: LoRAExperimentSpec
    created: float = 0.0

    @property
    def key(self) -> str:
        return f"ns/{self.name}"


def make_pool(
    name: str = "p",
    *,
    replicas: int = 1,
    observed: int | None = None,
    not_ready: tuple[int, ...] = (),
    idle_since: dict[int, float] | None = None,
    slots: int = 4,
    max_rank: int = 64,
    budget: int | None = None,
    facts: ModelFacts | None = None,
    autoscaling: bool = False,
    min_replicas: int = 0,
    max_replicas: int = 8,
    delay: float = 300.0,
) -> Pool:
    idle_since = idle_since or {}
    states = tuple(
        ReplicaState(name=f"{name}-{i}", ready=i not in not_ready, idle_since=idle_since.get(i))
        for i in range(replicas if observed is None else observed)
    )
    capacity: dict[str, Any] = {"maxAdaptersPerReplica": slots, "maxLoRARank": max_rank}
    if budget is not None:
        capacity["adapterMemoryBudget"] = budget
    pool = SharedBasePool.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
            "spec": {
                "model": {"name": "tiny", "uri": "file:///models/tiny"},
                "replicas": replicas,
                "capacity": capacity,
                "autoscaling": {
                    "enabled": autoscaling,
                    "minReplicas": min_replicas,
                    "maxReplicas": max_replicas,
                    "scaleDownDelaySeconds": delay,
                },
            },
        }
    )
    return Pool(pool, facts, states)


def exp_spec(
    *,
    pool: str = "p",
    rank: int = 8,
    modules: tuple[str, ...] | str = ("q_proj",),
    priority: int = 0,
    prompts: int = 1,
    group: int = 2,
    prompt_tokens: int = 1,
    new_tokens: int = 1,
) -> LoRAExperimentSpec:
    return LoRAExperimentSpec.model_validate(
        {
            "poolRef": {"name": pool},
            "lora": {"rank": rank, "targetModules": [modules] if isinstance(modules, str) else list(modules)},
            "dataset": {"builtin": {"name": "arithmetic"}},
            "reward": {"builtin": {"name": "exact_match"}},
            "algorithm": {
                "promptsPerStep": prompts,
                "groupSize": group,
                "maxPromptTokens": prompt_tokens,
                "maxNewTokens": new_tokens,
            },
            "priority": priority,
        }
    )


def make_exp(name: str, *, created: float = 0.0, **spec: Any) -> Exp:
    return Exp(name, exp_spec(**spec), created)


def run(pool: Pool, placed: list[tuple[Exp, str]], pending: list[Exp], *, now: float = NOW) -> Decision:
    return schedule(pool.pool, pool.facts, pool.replicas, placed, pending, now=now)


def where(decision: Decision) -> dict[str, str]:
    return {p.key: p.replica for p in decision.placements}


# ---------------------------------------------------------------- worked examples


def test_higher_priority_goes_first_even_when_newer() -> None:
    old_low = make_exp("old-low", priority=0, created=1.0)
    new_high = make_exp("new-high", priority=5, created=2.0)
    decision = run(make_pool(slots=1), [], [old_low, new_high], now=NOW)
    assert where(decision) == {"ns/new-high": "p-0"}
    assert decision.unplaced["ns/old-low"].reason == WAITING_FOR_CAPACITY


def test_older_goes_first_at_equal_priority() -> None:
    decision = run(make_pool(slots=1), [], [make_exp("b", created=2.0), make_exp("a", created=1.0)], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}


def test_best_fit_chooses_the_fullest_replica_that_fits() -> None:
    pool = make_pool(replicas=3, budget=10 * RANK_BYTES, facts=UNIT_FACTS)
    placed = [
        (make_exp("on0", rank=1), "p-0"),  # 9 ranks free
        (make_exp("on1", rank=5), "p-1"),  # 5 ranks free
        (make_exp("on2", rank=7), "p-2"),  # 3 ranks free
    ]
    decision = run(
        pool, placed, [make_exp("four", rank=4, created=1), make_exp("six", rank=6, created=2)], now=NOW
    )
    assert where(decision) == {"ns/four": "p-1", "ns/six": "p-0"}


def test_best_fit_without_memory_chooses_the_replica_with_fewest_free_slots() -> None:
    pool = make_pool(replicas=3, slots=4)
    placed = [(make_exp("a"), "p-0"), (make_exp("b"), "p-2"), (make_exp("c"), "p-2")]
    decision = run(pool, placed, [make_exp("new")], now=NOW)
    assert where(decision) == {"ns/new": "p-2"}


def test_ties_go_to_the_lowest_ordinal() -> None:
    decision = run(make_pool(replicas=12, slots=1), [], [make_exp("a")], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}


def test_rank_above_the_pool_limit_is_rejected_with_the_field_and_limit() -> None:
    decision = run(make_pool(max_rank=64), [], [make_exp("big", rank=128)], now=NOW)
    assert decision.placements == ()
    unplaced = decision.unplaced["ns/big"]
    assert unplaced.reason == RANK_TOO_LARGE
    assert unplaced.message == "spec.lora.rank: 128 exceeds pool p capacity.maxLoRARank 64"


def test_slot_limit_per_replica() -> None:
    decision = run(
        make_pool(replicas=1, slots=2), [], [make_exp(n, created=i) for i, n in enumerate("abc")], now=NOW
    )
    assert where(decision) == {"ns/a": "p-0", "ns/b": "p-0"}
    assert decision.unplaced["ns/c"].reason == WAITING_FOR_CAPACITY
    assert "maxAdaptersPerReplica 2" in decision.unplaced["ns/c"].message
    assert "autoscaling is off" in decision.unplaced["ns/c"].message


def test_memory_budget_per_replica() -> None:
    pool = make_pool(replicas=1, budget=10 * RANK_BYTES, facts=UNIT_FACTS)
    decision = run(pool, [], [make_exp("a", rank=6, created=1), make_exp("b", rank=6, created=2)], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}
    assert decision.unplaced["ns/b"].reason == WAITING_FOR_CAPACITY
    assert "needs 192B" in decision.unplaced["ns/b"].message


def test_budget_without_model_facts_counts_slots_only() -> None:
    pool = make_pool(replicas=1, slots=3, budget=1, facts=None)
    decision = run(pool, [], [make_exp(n, rank=64) for n in "abc"], now=NOW)
    assert len(decision.placements) == 3


def test_larger_than_a_whole_replica_is_too_large() -> None:
    pool = make_pool(budget=10 * RANK_BYTES, facts=UNIT_FACTS, autoscaling=True)
    decision = run(pool, [], [make_exp("huge", rank=11)], now=NOW)
    assert decision.unplaced["ns/huge"].reason == TOO_LARGE
    assert "capacity.adapterMemoryBudget" in decision.unplaced["ns/huge"].message
    assert decision.scale is None


def test_target_modules_the_model_lacks_are_rejected() -> None:
    pool = make_pool(facts=UNIT_FACTS)
    decision = run(pool, [], [make_exp("x", modules=("q_proj", "gate_proj"))], now=NOW)
    assert decision.unplaced["ns/x"].reason == UNKNOWN_TARGET_MODULES
    assert decision.unplaced["ns/x"].message.startswith("spec.lora.targetModules: gate_proj")


def test_only_ready_replicas_of_the_desired_range_receive_experiments() -> None:
    pool = make_pool(replicas=2, observed=3, not_ready=(0,), slots=1)
    decision = run(pool, [], [make_exp("a", created=1), make_exp("b", created=2)], now=NOW)
    assert where(decision) == {"ns/a": "p-1"}  # p-0 is not ready, p-2 is being removed
    assert "waiting for 1 replica(s) that are not ready yet" in decision.unplaced["ns/b"].message


def test_placed_experiments_count_on_not_ready_replicas_and_never_move() -> None:
    pool = make_pool(replicas=2, not_ready=(1,), slots=1, autoscaling=True, max_replicas=3)
    placed = [(make_exp("stays"), "p-1")]
    decision = run(pool, placed, [make_exp("a", created=1), make_exp("b", created=2)], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}
    # p-1 is full even though not ready, so b needs a new replica
    assert decision.scale is not None
    assert decision.scale == ScaleRequest(3, SCALE_UP, decision.scale.message)


def test_pending_experiment_that_is_already_placed_is_left_alone() -> None:
    exp = make_exp("a")
    decision = run(make_pool(replicas=2), [(exp, "p-1")], [exp], now=NOW)
    assert decision == Decision(placements=(), scale=None, unplaced={})


def test_scale_up_asks_for_enough_replicas_capped_at_max() -> None:
    pool = make_pool(replicas=1, slots=2, autoscaling=True, max_replicas=3)
    pending = [make_exp(f"e{i}", created=i) for i in range(9)]
    decision = run(pool, [], pending, now=NOW)
    assert len(decision.placements) == 2
    assert decision.scale is not None and (decision.scale.replicas, decision.scale.reason) == (3, SCALE_UP)
    reasons = {k: u.message for k, u in decision.unplaced.items()}
    assert "scaling pool p up" in reasons["ns/e2"]
    assert "scaling pool p up" in reasons["ns/e5"]
    assert "maxReplicas 3" in reasons["ns/e6"]


def test_scale_up_packs_by_memory() -> None:
    pool = make_pool(replicas=0, budget=10 * RANK_BYTES, facts=UNIT_FACTS, autoscaling=True, max_replicas=10)
    pending = [make_exp(f"e{i}", rank=r, created=i) for i, r in enumerate([6, 6, 4, 4, 5])]
    decision = run(pool, [], pending, now=NOW)
    # best fit into new replicas: [6, 4], [6, 4], [5]
    assert decision.scale.replicas == 3


def test_starting_replicas_are_coming_capacity_so_the_same_demand_scales_once() -> None:
    pool = make_pool(replicas=1, slots=1, autoscaling=True, max_replicas=5)
    pending = [make_exp(f"e{i}", created=i) for i in range(3)]
    first = run(pool, [], pending, now=NOW)
    assert first.scale.replicas == 3
    grown = pool.with_spec(replicas=3)
    placed = [(e, p.replica) for e in pending for p in first.placements if p.key == e.key]
    second = run(grown, placed, [e for e in pending if e.key in first.unplaced], now=NOW)
    assert second.placements == () and second.scale is None


def test_autoscaling_raises_a_pool_below_min_replicas() -> None:
    pool = make_pool(replicas=0, autoscaling=True, min_replicas=2, max_replicas=4)
    assert run(pool, [], [], now=NOW).scale.replicas == 2


def test_scale_down_removes_only_trailing_idle_replicas_after_the_delay() -> None:
    idle = {1: NOW - 1000, 3: NOW - 1000, 4: NOW - 1000}
    pool = make_pool(replicas=5, idle_since=idle, autoscaling=True, delay=300)
    placed = [(make_exp("a"), "p-0"), (make_exp("b"), "p-2")]
    decision = run(pool, placed, [], now=NOW)
    # p-1 is idle too but p-2 above it is busy, and a StatefulSet removes the highest ordinals
    assert decision.scale is not None and (decision.scale.replicas, decision.scale.reason) == (3, SCALE_DOWN)


def test_scale_down_waits_for_the_delay() -> None:
    pool = make_pool(replicas=2, idle_since={1: NOW - 299}, autoscaling=True, delay=300)
    assert run(pool, [(make_exp("a"), "p-0")], [], now=NOW).scale is None
    assert run(pool, [(make_exp("a"), "p-0")], [], now=NOW + 1).scale.replicas == 1


def test_scale_down_stops_at_min_replicas() -> None:
    pool = make_pool(replicas=3, idle_since=dict.fromkeys(range(3), 0.0), autoscaling=True, min_replicas=1)
    assert run(pool, [], [], now=NOW).scale.replicas == 1


def test_no_scale_down_while_experiments_wait_or_without_autoscaling() -> None:
    idle = {1: 0.0}
    waiting_pool = make_pool(replicas=2, not_ready=(0,), idle_since=idle, autoscaling=True, max_replicas=2)
    full_pool = waiting_pool.with_spec(capacity={"max_adapters_per_replica": 1})
    # p-0 is not ready and p-1 takes one experiment; the second waits, so nothing is removed
    decision = run(full_pool, [], [make_exp("a", created=1), make_exp("b", created=2)], now=NOW)
    assert decision.scale is None
    assert where(decision) == {"ns/a": "p-1"}
    assert run(make_pool(replicas=2, idle_since=idle), [], [], now=NOW).scale is None


def test_a_replica_that_receives_an_experiment_now_is_not_idle() -> None:
    pool = make_pool(replicas=1, idle_since={0: 0.0}, autoscaling=True)
    decision = run(pool, [], [make_exp("a")], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}
    assert decision.scale is None


def test_duplicate_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        run(make_pool(), [], [make_exp("a"), make_exp("a")], now=NOW)


def test_cost_is_none_without_facts() -> None:
    assert cost_of(None, make_exp("a")) is None
    cost = cost_of(UNIT_FACTS, make_exp("a", rank=3))
    assert cost is not None and cost.total_bytes == 3 * RANK_BYTES


# ---------------------------------------------------------------- properties

PROP_FACTS = ModelFacts(
    parameter_count=1000,
    linear_modules={"q_proj": LinearShape(8, 8, 2), "v_proj": LinearShape(8, 4, 2)},
    hidden_size=8,
    num_layers=2,
)
TARGETS: list[tuple[str, ...] | str] = [("q_proj",), "all-linear", ("q_proj", "v_proj"), ("bogus",)]


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    desired = draw(st.integers(0, 4))
    observed = draw(st.integers(0, desired + 1))
    min_replicas = draw(st.integers(0, 2))
    pool = make_pool(
        replicas=desired,
        observed=observed,
        not_ready=tuple(i for i in range(observed) if draw(st.booleans())),
        idle_since={i: draw(st.sampled_from([None, 0.0, 0.0, NOW - 100, NOW])) for i in range(observed)},
        slots=draw(st.integers(1, 4)),
        max_rank=draw(st.sampled_from([8, 16, 64])),
        budget=draw(st.sampled_from([None, 8_000, 20_000, 60_000])),
        facts=draw(st.sampled_from([None, PROP_FACTS])),
        autoscaling=draw(st.booleans()),
        min_replicas=min_replicas,
        max_replicas=draw(st.integers(max(min_replicas, 1), 6)),
        delay=draw(st.sampled_from([0.0, 50.0, 500.0])),
    )
    return pool


@st.composite
def experiments(draw: st.DrawFn, name: str) -> Exp:
    return make_exp(
        name,
        rank=draw(st.sampled_from([1, 4, 8, 16, 32, 128])),
        modules=draw(st.sampled_from(TARGETS)),
        prompts=draw(st.integers(1, 4)),
        group=draw(st.integers(2, 4)),
        prompt_tokens=draw(st.integers(1, 8)),
        new_tokens=draw(st.integers(1, 8)),
        priority=draw(st.integers(0, 2)),
        created=draw(st.integers(0, 5)),
    )


World = tuple[Pool, list[tuple[Exp, str]], list[Exp]]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    pool = draw(pools())
    placed = [
        (draw(experiments(f"placed-{i}")), f"p-{draw(st.integers(0, 4))}")
        for i in range(draw(st.integers(0, 8)))
    ]
    pending = [draw(experiments(f"e{i}")) for i in range(draw(st.integers(0, 14)))]
    return pool, placed, pending


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def usage(pool: Pool, placed: list[tuple[Exp, str]]) -> dict[str, tuple[int, int]]:
    """(slots, bytes) per replica."""
    out: dict[str, tuple[int, int]] = {}
    for exp, replica in placed:
        cost = cost_of(pool.facts, exp)
        slots, used = out.get(replica, (0, 0))
        out[replica] = (slots + 1, used + (cost.total_bytes if cost else 0))
    return out


def applied(world: World, decision: Decision) -> World:
    """The world after a decision was carried out (added replicas exist but are not ready yet)."""
    pool, placed, pending = world
    by_key = {e.key: e for e in pending}
    desired = pool.pool.spec.replicas
    if decision.scale is not None:
        added = {f"{pool.name}-{i}" for i in range(desired, decision.scale.replicas)}
        # a StatefulSet recreates a replica it is still removing, so that one is not ready either
        replicas = tuple(dataclasses.replace(r, ready=r.ready and r.name not in added) for r in pool.replicas)
        pool = dataclasses.replace(pool.with_spec(replicas=decision.scale.replicas), replicas=replicas)
    new_placed = placed + [(by_key[p.key], p.replica) for p in decision.placements]
    placed_now = {p.key for p in decision.placements}
    return pool, new_placed, [e for e in pending if e.key not in placed_now]


@PROPERTY
@given(worlds())
def test_every_pending_experiment_is_placed_once_or_has_a_reason(world: World) -> None:
    pool, placed, pending = world
    decision = run(pool, placed, pending)
    placed_keys = [p.key for p in decision.placements]
    assert len(placed_keys) == len(set(placed_keys))
    assert set(placed_keys).isdisjoint(decision.unplaced)
    assert set(placed_keys) | set(decision.unplaced) == {e.key for e in pending}
    assert all(u.reason and u.message for u in decision.unplaced.values())


@PROPERTY
@given(worlds())
def test_new_placements_respect_every_limit(world: World) -> None:
    pool, placed, pending = world
    decision = run(pool, placed, pending)
    by_key = {e.key: e for e in pending}
    after = placed + [(by_key[p.key], p.replica) for p in decision.placements]
    spec = pool.pool.spec
    budget = spec.capacity.adapter_memory_budget_bytes
    for placement in decision.placements:
        exp = by_key[placement.key]
        assert exp.spec.lora.rank <= spec.capacity.max_lora_rank
        ordinal = int(placement.replica.rsplit("-", 1)[1])
        assert ordinal < spec.replicas
        assert any(r.name == placement.replica and r.ready for r in pool.replicas)
        slots, used = usage(pool, after)[placement.replica]
        assert slots <= spec.capacity.max_adapters_per_replica
        if budget is not None and pool.facts is not None:
            assert used <= budget
    request = decision.scale
    if request is not None:
        assert spec.autoscaling.enabled
        if request.reason == SCALE_UP:
            assert spec.replicas < request.replicas <= spec.autoscaling.max_replicas
        else:
            assert spec.autoscaling.min_replicas <= request.replicas < spec.replicas


@PROPERTY
@given(worlds(), st.randoms(use_true_random=False))
def test_deterministic_under_input_shuffles(world: World, rnd: random.Random) -> None:
    pool, placed, pending = world
    expected = run(pool, placed, pending)
    shuffled = dataclasses.replace(pool, replicas=tuple(rnd.sample(pool.replicas, len(pool.replicas))))
    for items in (placed, pending):
        rnd.shuffle(items)
    assert run(shuffled, placed, pending) == expected


@PROPERTY
@given(worlds())
def test_idempotent_once_applied(world: World) -> None:
    decision = run(*world)
    again = run(*applied(world, decision))
    assert again.placements == ()
    assert again.scale is None


@PROPERTY
@given(worlds(), experiments("latecomer"))
def test_a_newer_lower_priority_experiment_changes_no_other_placement(world: World, late: Exp) -> None:
    pool, placed, pending = world
    late = Exp(late.name, late.spec.model_copy(update={"priority": -1}), created=100)
    before = run(pool, placed, pending)
    after = run(pool, placed, [*pending, late])
    assert [p for p in after.placements if p.key != late.key] == list(before.placements)


@PROPERTY
@given(worlds())
def test_placed_experiments_never_move(world: World) -> None:
    pool, placed, pending = world
    # offer every placed experiment again as pending: none of them may be placed anew
    decision = run(pool, placed, pending + [e for e, _ in placed])
    placed_keys = {e.key for e, _ in placed}
    assert placed_keys.isdisjoint(p.key for p in decision.placements)
    assert placed_keys.isdisjoint(decision.unplaced)
