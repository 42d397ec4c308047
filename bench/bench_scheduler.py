"""Benchmark for the placement scheduler: 10,000 pending experiments onto 50 pools x 10 replicas.

Prints the scheduler's wall time and placements per second, and the ratio to a
naive first-fit reference (every experiment scans every replica) measured side
by side in the same run. Usage: ``python bench/bench_scheduler.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

try:
    import loraplex_operator  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from loraplex_operator.memory import ALL_LINEAR, LinearShape, ModelFacts
from loraplex_operator.scheduler import (
    Decision,
    ExperimentDemand,
    Placement,
    PoolState,
    ReplicaState,
    demand_cost,
    schedule,
)

GIB = 1024**3

# Shapes of SmolLM2-135M (30 layers, hidden 576, 3 KV heads of 64).
SMOLLM2_FACTS = ModelFacts(
    parameter_count=134_515_008,
    linear_modules={
        "q_proj": LinearShape(576, 576, 30),
        "k_proj": LinearShape(576, 192, 30),
        "v_proj": LinearShape(576, 192, 30),
        "o_proj": LinearShape(576, 576, 30),
        "gate_proj": LinearShape(576, 1536, 30),
        "up_proj": LinearShape(576, 1536, 30),
        "down_proj": LinearShape(1536, 576, 30),
    },
    hidden_size=576,
    num_layers=30,
)
TARGETS: list[tuple[str, ...] | str] = [
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ALL_LINEAR,
]


def make_world(
    pools: int, replicas: int, experiments: int, seed: int
) -> tuple[list[PoolState], list[ExperimentDemand]]:
    """Pools of ready replicas with a 16 GiB adapter budget, and pending experiments spread over them."""
    rng = random.Random(seed)
    pool_states = [
        PoolState(
            name=f"pool{p:02d}",
            model_name="smollm2-135m-instruct",
            desired_replicas=replicas,
            ready_replicas=replicas,
            replicas=tuple(ReplicaState(f"pool{p:02d}-{i}", True, None) for i in range(replicas)),
            max_adapters_per_replica=32,
            max_lora_rank=64,
            adapter_memory_budget=16 * GIB,
            autoscaling=True,
            min_replicas=1,
            max_replicas=2 * replicas,
            scale_down_delay_seconds=300.0,
            model_facts=SMOLLM2_FACTS,
        )
        for p in range(pools)
    ]
    demands = [
        ExperimentDemand(
            key=f"team{i % 7}/exp{i:05d}",
            pool=f"pool{rng.randrange(pools):02d}",
            rank=rng.choice([4, 8, 16, 32, 64]),
            target_modules=rng.choice(TARGETS),
            prompts_per_step=rng.choice([2, 4, 8]),
            group_size=rng.choice([4, 8]),
            max_prompt_tokens=256,
            max_new_tokens=rng.choice([64, 128, 256]),
            priority=rng.choice([0, 0, 0, 1, 10]),
            created=float(rng.randrange(100_000)),
        )
        for i in range(experiments)
    ]
    return pool_states, demands


def naive_first_fit(pools: Sequence[PoolState], pending: Sequence[ExperimentDemand]) -> list[Placement]:
    """Reference: in priority order, put each experiment on the first replica anywhere that fits it."""
    slots: dict[str, int] = {}
    used: dict[str, int] = {}
    replicas = [(pool, r.name) for pool in pools for r in pool.replicas[: pool.desired_replicas] if r.ready]
    placements = []
    for demand in sorted(pending, key=lambda d: (-d.priority, d.created, d.key)):
        for pool, name in replicas:
            if pool.name != demand.pool or demand.rank > pool.max_lora_rank:
                continue
            cost = demand_cost(pool, demand)
            need = cost.total_bytes if cost is not None else 0
            budget = pool.adapter_memory_budget
            if slots.get(name, 0) >= pool.max_adapters_per_replica:
                continue
            if budget is not None and used.get(name, 0) + need > budget:
                continue
            slots[name] = slots.get(name, 0) + 1
            used[name] = used.get(name, 0) + need
            placements.append(Placement(demand.key, pool.name, name))
            break
    return placements


def best_of(repeats: int, run: Callable[[], object]) -> tuple[float, object]:
    """The fastest wall time of ``repeats`` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    """Run both placers on the same world, alternating, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--experiments", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pools, pending = make_world(args.pools, args.replicas, args.experiments, args.seed)
    fast_s, decision = best_of(args.repeats, lambda: schedule(pools, [], pending, now=0.0))
    naive_s, naive = best_of(args.repeats, lambda: naive_first_fit(pools, pending))
    assert isinstance(decision, Decision) and isinstance(naive, list)

    placed = len(decision.placements)
    print(f"world: {args.pools} pools x {args.replicas} replicas, {args.experiments} pending experiments")
    print(
        f"schedule():       {fast_s * 1000:8.1f} ms  {placed / fast_s:10.0f} placements/s  "
        f"placed {placed}, waiting {len(decision.unplaced)}, scale requests {len(decision.scale)}"
    )
    print(
        f"naive first fit:  {naive_s * 1000:8.1f} ms  {len(naive) / naive_s:10.0f} placements/s  placed {len(naive)}"
    )
    print(f"ratio naive/schedule(): {naive_s / fast_s:.1f}x (best of {args.repeats} each, same process)")
    print(f"target < 1 s: {'met' if fast_s < 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
