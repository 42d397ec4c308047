"""Checks of an experiment against its pool that no schema can make (the CRD checks the rest).

These are the reasons an experiment can never run on a pool, whatever its load: waiting does
not help, the spec has to change. The lifecycle turns them into ``InvalidSpec`` and the
scheduler refuses to place such an experiment; both take the messages from here. Each names the
field and what would be right, in the form ``loraplex_api.manifests.Problem`` prints:
``LoRAExperiment/x: spec.lora.rank: 128 exceeds pool smollm2 capacity.maxLoRARank 64``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraplex_api import Problem, rank_problem, reward_memory_problems
from loraplex_api.experiment import LoRAExperimentSpec
from loraplex_api.pool import SharedBasePool
from loraplex_api.wire import EXPERIMENT_KIND

from .memory import ExperimentCost, ModelFacts, format_bytes, spec_cost, unknown_target_modules

RANK_TOO_LARGE = "RankTooLarge"
UNKNOWN_TARGET_MODULES = "UnknownTargetModules"
TOO_LARGE = "TooLarge"
REWARD_MEMORY_TOO_LARGE = "RewardMemoryTooLarge"


@dataclass(frozen=True)
class Unfit:
    """One reason an experiment can never run on a pool: a condition reason and the problem."""

    reason: str
    problem: Problem

    @property
    def message(self) -> str:
        """The problem without the ``Kind/name: `` prefix (for a condition on that very object)."""
        where = f"{self.problem.path}: " if self.problem.path else ""
        return f"{where}{self.problem.message}"


def unfit(
    name: str,
    spec: LoRAExperimentSpec,
    pool: SharedBasePool,
    facts: ModelFacts | None,
    cost: ExperimentCost | None = None,
) -> list[Unfit]:
    """Why this experiment can never run on this pool (empty when it fits the pool's limits).

    Target modules and memory can be judged only once a trainer has reported the model's facts;
    ``cost`` is the experiment's cost with those facts, when the caller has it already.
    """
    found: list[Unfit] = []
    rank = rank_problem(name, spec.lora.rank, pool)
    if rank is not None:
        found.append(Unfit(RANK_TOO_LARGE, rank))
    found += [Unfit(REWARD_MEMORY_TOO_LARGE, p) for p in reward_memory_problems(name, spec, pool)]
    if facts is None:
        return found
    unknown = unknown_target_modules(facts, spec.lora.targets)
    if unknown:
        known = ", ".join(sorted(facts.linear_modules))
        message = (
            f"{', '.join(unknown)} is not a linear module of {pool.spec.model.name} "
            f"(pool {pool.metadata.name}); known: {known}"
        )
        found.append(Unfit(UNKNOWN_TARGET_MODULES, _problem(name, "spec.lora.targetModules", message)))
    budget = pool.spec.capacity.adapter_memory_budget_bytes
    cost = cost or spec_cost(facts, spec)
    if budget is not None and cost.total_bytes > budget:
        message = (
            f"needs {format_bytes(cost.total_bytes)} (adapter and optimizer {format_bytes(cost.adapter_bytes)}, "
            f"rollout KV cache {format_bytes(cost.rollout_bytes)}) but pool {pool.metadata.name} "
            f"capacity.adapterMemoryBudget is {format_bytes(budget)} per replica; lower spec.lora.rank, "
            "spec.algorithm.promptsPerStep, groupSize or maxNewTokens"
        )
        found.append(Unfit(TOO_LARGE, _problem(name, "", message)))
    return found


def check_against_pool(
    name: str, spec: LoRAExperimentSpec, pool: SharedBasePool, facts: ModelFacts | None
) -> list[Problem]:
    """Problems with running this experiment on this pool (empty when it fits the pool's limits)."""
    return [u.problem for u in unfit(name, spec, pool, facts)]


def describe(problems: Sequence[Problem]) -> str:
    """One message for a condition: every problem, each naming its field."""
    return "; ".join(str(p) for p in problems)


def _problem(name: str, path: str, message: str) -> Problem:
    return Problem(kind=EXPERIMENT_KIND, name=name, path=path, message=message)
