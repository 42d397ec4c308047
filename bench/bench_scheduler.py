"""Benchmark for the placement scheduler: 10,000 pending experiments onto 50 pools x 10 replicas.

The scheduler decides one pool at a time, as the operator's pool passes call it; the figure is
the time of all 50 calls.

Prints the scheduler's wall time and placements per second, and the ratio to a naive
first fit per pool (each experiment takes the first replica of its pool with room),
measured side by side in the same run. The naive placer is the floor: it writes no
reasons, plans no scaling and packs worse; the target is the absolute time (< 1 s).
Usage: ``python bench/bench_scheduler.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import loraplex_operator  # noqa: F401
except ImportError:  # running from a checkout without an install
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "api"), str(root / "operator")]

from loraplex_api import LoRAExperimentSpec, SharedBasePool
from loraplex_api.experiment import ALL_LINEAR
from loraplex_operator.memory import LinearShape, ModelFacts
from loraplex_operator.scheduler import Decision, Placement, ReplicaState, cost_of, schedule

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


@dataclass(frozen=True)
class Pending:
    """An experiment as the scheduler reads it (the operator passes observed.ExperimentView)."""

    key: str
    name: str
    created: float
    spec: LoRAExperimentSpec


@dataclass(frozen=True)
class Pool:
    """One pool's pass: what the operator hands the scheduler for it."""

    pool: SharedBasePool
    replicas: tuple[ReplicaState, ...]
    pending: list[Pending]


def make_world(pools: int, replicas: int, experiments: int, seed: int) -> list[Pool]:
    """Pools of ready replicas with a 16 GiB adapter budget, and pending experiments spread over them."""
    rng = random.Random(seed)
    world = [
        Pool(
            pool=SharedBasePool.model_validate(
                {
                    "metadata": {"name": f"pool{p:02d}", "namespace": "team", "uid": f"uid-{p}"},
                    "spec": {
                        "model": {"name": "smollm2-135m-instruct", "uri": "builtin://smollm2-135m-instruct"},
                        "replicas": replicas,
                        "capacity": {
                            "maxAdaptersPerReplica": 32,
                            "maxLoRARank": 64,
                            "adapterMemoryBudget": "16Gi",
                        },
                        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2 * replicas},
                    },
                }
            ),
            replicas=tuple(ReplicaState(f"pool{p:02d}-{i}", True, None) for i in range(replicas)),
            pending=[],
        )
        for p in range(pools)
    ]
    for i in range(experiments):
        target = rng.choice(TARGETS)
        pool = world[rng.randrange(pools)]
        spec = {
            "poolRef": {"name": pool.pool.metadata.name},
            "lora": {
                "rank": rng.choice([4, 8, 16, 32, 64]),
                "targetModules": [target] if isinstance(target, str) else list(target),
            },
            "dataset": {"builtin": {"name": "arithmetic"}},
            "reward": {"builtin": {"name": "exact_match"}},
            "algorithm": {
                "promptsPerStep": rng.choice([2, 4, 8]),
                "groupSize": rng.choice([4, 8]),
                "maxPromptTokens": 256,
                "maxNewTokens": rng.choice([64, 128, 256]),
            },
            "priority": rng.choice([0, 0, 0, 1, 10]),
        }
        name = f"exp{i:05d}"
        created = float(rng.randrange(100_000))
        pool.pending.append(
            Pending(f"team{i % 7}/{name}", name, created, LoRAExperimentSpec.model_validate(spec))
        )
    return world


def schedule_all(world: Sequence[Pool]) -> list[Decision]:
    """One scheduler call per pool, as the operator's pool passes make them."""
    return [schedule(p.pool, SMOLLM2_FACTS, p.replicas, [], p.pending, now=0.0) for p in world]


def naive_first_fit(world: Sequence[Pool]) -> list[Placement]:
    """Reference: in priority order, put each experiment on the first replica of its pool that fits it."""
    placements = []
    for pool in world:
        spec = pool.pool.spec
        slots: dict[str, int] = {}
        used: dict[str, int] = {}
        budget = spec.capacity.adapter_memory_budget_bytes
        ready = [r.name for r in pool.replicas[: spec.replicas] if r.ready]
        for exp in sorted(pool.pending, key=lambda e: (-e.spec.priority, e.created, e.key)):
            if exp.spec.lora.rank > spec.capacity.max_lora_rank:
                continue
            cost = cost_of(SMOLLM2_FACTS, exp)
            need = cost.total_bytes if cost is not None else 0
            for name in ready:
                if slots.get(name, 0) >= spec.capacity.max_adapters_per_replica:
                    continue
                if budget is not None and used.get(name, 0) + need > budget:
                    continue
                slots[name] = slots.get(name, 0) + 1
                used[name] = used.get(name, 0) + need
                placements.append(Placement(exp.key, name))
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

    world = make_world(args.pools, args.replicas, args.experiments, args.seed)
    fast_s, decisions = best_of(args.repeats, lambda: schedule_all(world))
    naive_s, naive = best_of(args.repeats, lambda: naive_first_fit(world))
    assert isinstance(decisions, list) and isinstance(naive, list)

    placed = sum(len(d.placements) for d in decisions)
    waiting = sum(len(d.unplaced) for d in decisions)
    scaled = sum(d.scale is not None for d in decisions)
    print(f"world: {args.pools} pools x {args.replicas} replicas, {args.experiments} pending experiments")
    print(
        f"schedule():       {fast_s * 1000:8.1f} ms  {placed / fast_s:10.0f} placements/s  "
        f"placed {placed}, waiting {waiting}, scale requests {scaled}"
    )
    print(
        f"naive first fit:  {naive_s * 1000:8.1f} ms  {len(naive) / naive_s:10.0f} placements/s  placed {len(naive)}"
    )
    print(f"ratio naive/schedule(): {naive_s / fast_s:.1f}x (best of {args.repeats} each, same process)")
    print(f"target < 1 s: {'met' if fast_s < 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
