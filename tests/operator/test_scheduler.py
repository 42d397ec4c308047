"""Tests for the placement scheduler: worked examples, then properties checked with hypothesis."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex_operator.memory import LinearShape, ModelFacts
from loraplex_operator.scheduler import (
    POOL_NOT_FOUND,
    RANK_TOO_LARGE,
    SCALE_DOWN,
    SCALE_UP,
    TOO_LARGE,
    UNKNOWN_TARGET_MODULES,
    WAITING_FOR_CAPACITY,
    Decision,
    ExperimentDemand,
    Placement,
    PoolState,
    ReplicaState,
    ScaleRequest,
    demand_cost,
    schedule,
)

NOW = 10_000.0

# One linear module 1->1 in one layer: 2 parameters per rank, 4 fp32 copies = 32 bytes per rank.
# With no prompt or new tokens the rollout term is 0, so an experiment of rank r costs exactly 32 * r.
UNIT_FACTS = ModelFacts(
    parameter_count=10, linear_modules={"q_proj": LinearShape(1, 1, 1)}, hidden_size=1, num_layers=1
)
RANK_BYTES = 32


def make_pool(
    name: str = "p",
    *,
    replicas: int = 1,
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
) -> PoolState:
    idle_since = idle_since or {}
    states = tuple(
        ReplicaState(name=f"{name}-{i}", ready=i not in not_ready, idle_since=idle_since.get(i))
        for i in range(replicas)
    )
    return PoolState(
        name=name,
        model_name="tiny",
        desired_replicas=replicas,
        ready_replicas=sum(s.ready for s in states),
        replicas=states,
        max_adapters_per_replica=slots,
        max_lora_rank=max_rank,
        adapter_memory_budget=budget,
        autoscaling=autoscaling,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        scale_down_delay_seconds=delay,
        model_facts=facts,
    )


def make_exp(
    name: str,
    *,
    pool: str = "p",
    rank: int = 8,
    modules: tuple[str, ...] | str = ("q_proj",),
    priority: int = 0,
    created: float = 0.0,
) -> ExperimentDemand:
    return ExperimentDemand(
        key=f"ns/{name}",
        pool=pool,
        rank=rank,
        target_modules=modules,
        prompts_per_step=1,
        group_size=1,
        max_prompt_tokens=0,
        max_new_tokens=0,
        priority=priority,
        created=created,
    )


def on(exp: ExperimentDemand, replica: str, pool: str = "p") -> tuple[ExperimentDemand, Placement]:
    return exp, Placement(exp.key, pool, replica)


def where(decision: Decision) -> dict[str, str]:
    return {p.key: p.replica for p in decision.placements}


# ---------------------------------------------------------------- worked examples


def test_higher_priority_goes_first_even_when_newer() -> None:
    old_low = make_exp("old-low", priority=0, created=1.0)
    new_high = make_exp("new-high", priority=5, created=2.0)
    decision = schedule([make_pool(slots=1)], [], [old_low, new_high], now=NOW)
    assert where(decision) == {"ns/new-high": "p-0"}
    assert decision.unplaced["ns/old-low"].reason == WAITING_FOR_CAPACITY


def test_older_goes_first_at_equal_priority() -> None:
    decision = schedule(
        [make_pool(slots=1)], [], [make_exp("b", created=2.0), make_exp("a", created=1.0)], now=NOW
    )
    assert where(decision) == {"ns/a": "p-0"}


def test_best_fit_chooses_the_fullest_replica_that_fits() -> None:
    pool = make_pool(replicas=3, budget=10 * RANK_BYTES, facts=UNIT_FACTS)
    placed = [
        on(make_exp("on0", rank=1), "p-0"),  # 9 ranks free
        on(make_exp("on1", rank=5), "p-1"),  # 5 ranks free
        on(make_exp("on2", rank=7), "p-2"),  # 3 ranks free
    ]
    decision = schedule(
        [pool], placed, [make_exp("four", rank=4, created=1), make_exp("six", rank=6, created=2)], now=NOW
    )
    assert where(decision) == {"ns/four": "p-1", "ns/six": "p-0"}


def test_best_fit_without_memory_chooses_the_replica_with_fewest_free_slots() -> None:
    pool = make_pool(replicas=3, slots=4)
    placed = [on(make_exp("a"), "p-0"), on(make_exp("b"), "p-2"), on(make_exp("c"), "p-2")]
    decision = schedule([pool], placed, [make_exp("new")], now=NOW)
    assert where(decision) == {"ns/new": "p-2"}


def test_ties_go_to_the_lowest_ordinal() -> None:
    decision = schedule([make_pool(replicas=12, slots=1)], [], [make_exp("a")], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}


def test_rank_above_the_pool_limit_is_rejected_with_the_field_and_limit() -> None:
    decision = schedule([make_pool(max_rank=64)], [], [make_exp("big", rank=128)], now=NOW)
    assert decision.placements == ()
    unplaced = decision.unplaced["ns/big"]
    assert unplaced.reason == RANK_TOO_LARGE
    assert unplaced.message == "spec.lora.rank: 128 exceeds pool p capacity.maxLoRARank 64"


def test_slot_limit_per_replica() -> None:
    decision = schedule(
        [make_pool(replicas=1, slots=2)], [], [make_exp(n, created=i) for i, n in enumerate("abc")], now=NOW
    )
    assert where(decision) == {"ns/a": "p-0", "ns/b": "p-0"}
    assert decision.unplaced["ns/c"].reason == WAITING_FOR_CAPACITY
    assert "maxAdaptersPerReplica 2" in decision.unplaced["ns/c"].message
    assert "autoscaling is off" in decision.unplaced["ns/c"].message


def test_memory_budget_per_replica() -> None:
    pool = make_pool(replicas=1, budget=10 * RANK_BYTES, facts=UNIT_FACTS)
    decision = schedule(
        [pool], [], [make_exp("a", rank=6, created=1), make_exp("b", rank=6, created=2)], now=NOW
    )
    assert where(decision) == {"ns/a": "p-0"}
    assert decision.unplaced["ns/b"].reason == WAITING_FOR_CAPACITY
    assert "needs 192B" in decision.unplaced["ns/b"].message


def test_budget_without_model_facts_counts_slots_only() -> None:
    pool = make_pool(replicas=1, slots=3, budget=1, facts=None)
    decision = schedule([pool], [], [make_exp(n, rank=64) for n in "abc"], now=NOW)
    assert len(decision.placements) == 3


def test_larger_than_a_whole_replica_is_too_large() -> None:
    pool = make_pool(budget=10 * RANK_BYTES, facts=UNIT_FACTS, autoscaling=True)
    decision = schedule([pool], [], [make_exp("huge", rank=11)], now=NOW)
    assert decision.unplaced["ns/huge"].reason == TOO_LARGE
    assert "capacity.adapterMemoryBudget" in decision.unplaced["ns/huge"].message
    assert decision.scale == ()


def test_target_modules_the_model_lacks_are_rejected() -> None:
    pool = make_pool(facts=UNIT_FACTS)
    decision = schedule([pool], [], [make_exp("x", modules=("q_proj", "gate_proj"))], now=NOW)
    assert decision.unplaced["ns/x"].reason == UNKNOWN_TARGET_MODULES
    assert decision.unplaced["ns/x"].message.startswith("spec.lora.targetModules: gate_proj")


def test_unknown_pool() -> None:
    decision = schedule([make_pool("p")], [], [make_exp("lost", pool="nope")], now=NOW)
    assert decision.unplaced["ns/lost"].reason == POOL_NOT_FOUND
    assert "'nope'" in decision.unplaced["ns/lost"].message


def test_only_ready_replicas_of_the_desired_range_receive_experiments() -> None:
    pool = dataclasses.replace(make_pool(replicas=3, not_ready=(0,), slots=1), desired_replicas=2)
    decision = schedule([pool], [], [make_exp("a", created=1), make_exp("b", created=2)], now=NOW)
    assert where(decision) == {"ns/a": "p-1"}  # p-0 is not ready, p-2 is being removed
    assert "waiting for 1 replica(s) that are not ready yet" in decision.unplaced["ns/b"].message


def test_placed_experiments_count_on_not_ready_replicas_and_never_move() -> None:
    pool = make_pool(replicas=2, not_ready=(1,), slots=1, autoscaling=True, max_replicas=3)
    placed = [on(make_exp("stays"), "p-1")]
    decision = schedule([pool], placed, [make_exp("a", created=1), make_exp("b", created=2)], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}
    # p-1 is full even though not ready, so b needs a new replica
    assert decision.scale == (ScaleRequest("p", 3, SCALE_UP, decision.scale[0].message),)


def test_pending_experiment_that_is_already_placed_is_left_alone() -> None:
    exp = make_exp("a")
    decision = schedule([make_pool(replicas=2)], [on(exp, "p-1")], [exp], now=NOW)
    assert decision == Decision(placements=(), scale=(), unplaced={})


def test_scale_up_asks_for_enough_replicas_capped_at_max() -> None:
    pool = make_pool(replicas=1, slots=2, autoscaling=True, max_replicas=3)
    pending = [make_exp(f"e{i}", created=i) for i in range(9)]
    decision = schedule([pool], [], pending, now=NOW)
    assert len(decision.placements) == 2
    assert [(s.pool, s.replicas, s.reason) for s in decision.scale] == [("p", 3, SCALE_UP)]
    reasons = {k: u.message for k, u in decision.unplaced.items()}
    assert "scaling pool p up" in reasons["ns/e2"]
    assert "scaling pool p up" in reasons["ns/e5"]
    assert "maxReplicas 3" in reasons["ns/e6"]


def test_scale_up_packs_by_memory() -> None:
    pool = make_pool(replicas=0, budget=10 * RANK_BYTES, facts=UNIT_FACTS, autoscaling=True, max_replicas=10)
    pending = [make_exp(f"e{i}", rank=r, created=i) for i, r in enumerate([6, 6, 4, 4, 5])]
    decision = schedule([pool], [], pending, now=NOW)
    # best fit into new replicas: [6, 4], [6, 4], [5]
    assert decision.scale[0].replicas == 3


def test_starting_replicas_are_coming_capacity_so_the_same_demand_scales_once() -> None:
    pool = make_pool(replicas=1, slots=1, autoscaling=True, max_replicas=5)
    pending = [make_exp(f"e{i}", created=i) for i in range(3)]
    first = schedule([pool], [], pending, now=NOW)
    assert first.scale[0].replicas == 3
    grown = dataclasses.replace(pool, desired_replicas=3)
    placed = [(e, p) for e in pending for p in first.placements if p.key == e.key]
    second = schedule([grown], placed, [e for e in pending if e.key in first.unplaced], now=NOW)
    assert second.placements == () and second.scale == ()


def test_autoscaling_raises_a_pool_below_min_replicas() -> None:
    pool = make_pool(replicas=0, autoscaling=True, min_replicas=2, max_replicas=4)
    assert schedule([pool], [], [], now=NOW).scale[0].replicas == 2


def test_scale_down_removes_only_trailing_idle_replicas_after_the_delay() -> None:
    idle = {1: NOW - 1000, 3: NOW - 1000, 4: NOW - 1000}
    pool = make_pool(replicas=5, idle_since=idle, autoscaling=True, delay=300)
    placed = [on(make_exp("a"), "p-0"), on(make_exp("b"), "p-2")]
    decision = schedule([pool], placed, [], now=NOW)
    # p-1 is idle too but p-2 above it is busy, and a StatefulSet removes the highest ordinals
    assert [(s.replicas, s.reason) for s in decision.scale] == [(3, SCALE_DOWN)]


def test_scale_down_waits_for_the_delay() -> None:
    pool = make_pool(replicas=2, idle_since={1: NOW - 299}, autoscaling=True, delay=300)
    assert schedule([pool], [on(make_exp("a"), "p-0")], [], now=NOW).scale == ()
    assert schedule([pool], [on(make_exp("a"), "p-0")], [], now=NOW + 1).scale[0].replicas == 1


def test_scale_down_stops_at_min_replicas() -> None:
    pool = make_pool(replicas=3, idle_since=dict.fromkeys(range(3), 0.0), autoscaling=True, min_replicas=1)
    assert schedule([pool], [], [], now=NOW).scale[0].replicas == 1


def test_no_scale_down_while_experiments_wait_or_without_autoscaling() -> None:
    idle = {1: 0.0}
    waiting_pool = make_pool(replicas=2, not_ready=(0,), idle_since=idle, autoscaling=True, max_replicas=2)
    full_pool = dataclasses.replace(waiting_pool, max_adapters_per_replica=1)
    # p-0 is not ready and p-1 takes one experiment; the second waits, so nothing is removed
    decision = schedule([full_pool], [], [make_exp("a", created=1), make_exp("b", created=2)], now=NOW)
    assert decision.scale == ()
    assert where(decision) == {"ns/a": "p-1"}
    assert schedule([make_pool(replicas=2, idle_since=idle)], [], [], now=NOW).scale == ()


def test_a_replica_that_receives_an_experiment_now_is_not_idle() -> None:
    pool = make_pool(replicas=1, idle_since={0: 0.0}, autoscaling=True)
    decision = schedule([pool], [], [make_exp("a")], now=NOW)
    assert where(decision) == {"ns/a": "p-0"}
    assert decision.scale == ()


def test_duplicate_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        schedule([make_pool(), make_pool()], [], [], now=NOW)
    with pytest.raises(ValueError, match="listed twice"):
        schedule([make_pool()], [], [make_exp("a"), make_exp("a")], now=NOW)


def test_demand_cost_is_none_without_facts() -> None:
    assert demand_cost(make_pool(facts=None), make_exp("a")) is None
    cost = demand_cost(make_pool(facts=UNIT_FACTS), make_exp("a", rank=3))
    assert cost is not None and cost.total_bytes == 3 * RANK_BYTES


# ---------------------------------------------------------------- properties

PROP_FACTS = ModelFacts(
    parameter_count=1000,
    linear_modules={"q_proj": LinearShape(8, 8, 2), "v_proj": LinearShape(8, 4, 2)},
    hidden_size=8,
    num_layers=2,
)
POOL_NAMES = ("p0", "p1", "p2")
TARGETS: list[tuple[str, ...] | str] = [("q_proj",), "all-linear", ("q_proj", "v_proj"), ("bogus",)]


@st.composite
def pool_states(draw: st.DrawFn, name: str) -> PoolState:
    desired = draw(st.integers(0, 4))
    observed = draw(st.integers(0, desired + 1))
    replicas = tuple(
        ReplicaState(
            name=f"{name}-{i}",
            ready=draw(st.booleans()),
            idle_since=draw(st.sampled_from([None, 0.0, 0.0, NOW - 100, NOW])),
        )
        for i in range(observed)
    )
    min_replicas = draw(st.integers(0, 2))
    return PoolState(
        name=name,
        model_name="tiny",
        desired_replicas=desired,
        ready_replicas=sum(r.ready for r in replicas),
        replicas=replicas,
        max_adapters_per_replica=draw(st.integers(1, 4)),
        max_lora_rank=draw(st.sampled_from([8, 16, 64])),
        adapter_memory_budget=draw(st.sampled_from([None, 8_000, 20_000, 60_000])),
        autoscaling=draw(st.booleans()),
        min_replicas=min_replicas,
        max_replicas=draw(st.integers(min_replicas, 6)),
        scale_down_delay_seconds=draw(st.sampled_from([0.0, 50.0, 500.0])),
        model_facts=draw(st.sampled_from([None, PROP_FACTS])),
    )


@st.composite
def demands(draw: st.DrawFn, key: str) -> ExperimentDemand:
    return ExperimentDemand(
        key=key,
        pool=draw(st.sampled_from((*POOL_NAMES, *POOL_NAMES, "missing"))),
        rank=draw(st.sampled_from([1, 4, 8, 16, 32, 128])),
        target_modules=draw(st.sampled_from(TARGETS)),
        prompts_per_step=draw(st.integers(1, 4)),
        group_size=draw(st.integers(1, 4)),
        max_prompt_tokens=draw(st.integers(0, 8)),
        max_new_tokens=draw(st.integers(0, 8)),
        priority=draw(st.integers(0, 2)),
        created=draw(st.integers(0, 5)),
    )


World = tuple[list[PoolState], list[tuple[ExperimentDemand, Placement]], list[ExperimentDemand]]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    pools = [draw(pool_states(n)) for n in POOL_NAMES if draw(st.integers(0, 5)) > 0]
    placed: list[tuple[ExperimentDemand, Placement]] = []
    for i in range(draw(st.integers(0, 8))):
        demand = draw(demands(f"ns/placed-{i}"))
        replica = f"{demand.pool}-{draw(st.integers(0, 4))}"
        placed.append((demand, Placement(demand.key, demand.pool, replica)))
    pending = [draw(demands(f"ns/e{i}")) for i in range(draw(st.integers(0, 14)))]
    return pools, placed, pending


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def usage(pool: PoolState, placed: list[tuple[ExperimentDemand, Placement]]) -> dict[str, tuple[int, int]]:
    """(slots, bytes) per replica of a pool."""
    out: dict[str, tuple[int, int]] = {}
    for demand, placement in placed:
        if placement.pool == pool.name:
            cost = demand_cost(pool, demand)
            slots, used = out.get(placement.replica, (0, 0))
            out[placement.replica] = (slots + 1, used + (cost.total_bytes if cost else 0))
    return out


def applied(world: World, decision: Decision) -> World:
    """The world after a decision was carried out (added replicas exist but are not ready yet)."""
    pools, placed, pending = world
    by_key = {d.key: d for d in pending}
    scaled = {s.pool: s.replicas for s in decision.scale}
    new_pools = []
    for pool in pools:
        desired = scaled.get(pool.name, pool.desired_replicas)
        added = {f"{pool.name}-{i}" for i in range(pool.desired_replicas, desired)}
        # a StatefulSet recreates a replica it is still removing, so that one is not ready either
        replicas = tuple(dataclasses.replace(r, ready=r.ready and r.name not in added) for r in pool.replicas)
        new_pools.append(dataclasses.replace(pool, desired_replicas=desired, replicas=replicas))
    new_placed = placed + [(by_key[p.key], p) for p in decision.placements]
    placed_now = {p.key for p in decision.placements}
    return new_pools, new_placed, [d for d in pending if d.key not in placed_now]


@PROPERTY
@given(worlds())
def test_every_pending_experiment_is_placed_once_or_has_a_reason(world: World) -> None:
    pools, placed, pending = world
    decision = schedule(pools, placed, pending, now=NOW)
    placed_keys = [p.key for p in decision.placements]
    assert len(placed_keys) == len(set(placed_keys))
    assert set(placed_keys).isdisjoint(decision.unplaced)
    assert set(placed_keys) | set(decision.unplaced) == {d.key for d in pending}
    assert all(u.reason and u.message for u in decision.unplaced.values())


@PROPERTY
@given(worlds())
def test_new_placements_respect_every_limit(world: World) -> None:
    pools, placed, pending = world
    decision = schedule(pools, placed, pending, now=NOW)
    by_key = {d.key: d for d in pending}
    pools_by_name = {p.name: p for p in pools}
    after = placed + [(by_key[p.key], p) for p in decision.placements]
    for placement in decision.placements:
        demand, pool = by_key[placement.key], pools_by_name[placement.pool]
        assert demand.pool == pool.name
        assert demand.rank <= pool.max_lora_rank
        ordinal = int(placement.replica.rsplit("-", 1)[1])
        assert ordinal < pool.desired_replicas
        assert any(r.name == placement.replica and r.ready for r in pool.replicas)
        slots, used = usage(pool, after)[placement.replica]
        assert slots <= pool.max_adapters_per_replica
        if pool.adapter_memory_budget is not None and pool.model_facts is not None:
            assert used <= pool.adapter_memory_budget
    for request in decision.scale:
        pool = pools_by_name[request.pool]
        assert pool.autoscaling
        if request.reason == SCALE_UP:
            assert pool.desired_replicas < request.replicas <= pool.max_replicas
        else:
            assert pool.min_replicas <= request.replicas < pool.desired_replicas


@PROPERTY
@given(worlds(), st.randoms(use_true_random=False))
def test_deterministic_under_input_shuffles(world: World, rnd: random.Random) -> None:
    pools, placed, pending = world
    expected = schedule(pools, placed, pending, now=NOW)
    shuffled_pools = [
        dataclasses.replace(p, replicas=tuple(rnd.sample(p.replicas, len(p.replicas)))) for p in pools
    ]
    for items in (shuffled_pools, placed, pending):
        rnd.shuffle(items)
    assert schedule(shuffled_pools, placed, pending, now=NOW) == expected


@PROPERTY
@given(worlds())
def test_idempotent_once_applied(world: World) -> None:
    decision = schedule(*world, now=NOW)
    again = schedule(*applied(world, decision), now=NOW)
    assert again.placements == ()
    assert again.scale == ()


@PROPERTY
@given(worlds(), demands("ns/latecomer"))
def test_a_newer_lower_priority_experiment_changes_no_other_placement(
    world: World, late: ExperimentDemand
) -> None:
    pools, placed, pending = world
    late = dataclasses.replace(late, priority=-1, created=100)
    before = schedule(pools, placed, pending, now=NOW)
    after = schedule(pools, placed, [*pending, late], now=NOW)
    assert [p for p in after.placements if p.key != late.key] == list(before.placements)


@PROPERTY
@given(worlds(), demands("ns/solo"))
def test_an_experiment_of_another_pool_changes_nothing_else(world: World, solo: ExperimentDemand) -> None:
    pools, placed, pending = world
    solo = dataclasses.replace(solo, pool="solo", rank=1)
    before = schedule(pools, placed, pending, now=NOW)
    after = schedule([*pools, make_pool("solo")], placed, [*pending, solo], now=NOW)
    assert Placement("ns/solo", "solo", "solo-0") in after.placements
    assert [p for p in after.placements if p.key != "ns/solo"] == list(before.placements)
    assert {k: v for k, v in after.unplaced.items() if k != "ns/solo"} == before.unplaced
    assert after.scale == before.scale


@PROPERTY
@given(worlds())
def test_placed_experiments_never_move(world: World) -> None:
    pools, placed, pending = world
    # offer every placed experiment again as pending: none of them may be placed anew
    decision = schedule(pools, placed, pending + [d for d, _ in placed], now=NOW)
    placed_keys = {d.key for d, _ in placed}
    assert placed_keys.isdisjoint(p.key for p in decision.placements)
    assert placed_keys.isdisjoint(decision.unplaced)
