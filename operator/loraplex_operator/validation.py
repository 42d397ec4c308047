"""Checks of an experiment against its pool that no schema can make (the CRD checks the rest).

Each problem names the field and what would be right, in the form
``loraplex_api.manifests.Problem`` prints:
``LoRAExperiment/x: spec.lora.rank: 128 exceeds pool smollm2 capacity.maxLoRARank 64``.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraplex_api import Problem
from loraplex_api.experiment import LoRAExperimentSpec
from loraplex_api.pool import SharedBasePool

from .memory import ModelFacts, unknown_target_modules


def check_against_pool(
    name: str, spec: LoRAExperimentSpec, pool: SharedBasePool, facts: ModelFacts | None
) -> list[Problem]:
    """Problems with running this experiment on this pool (empty when it fits the pool's limits)."""
    problems: list[Problem] = []
    pool_name = pool.metadata.name
    limit = pool.spec.capacity.max_lora_rank
    if spec.lora.rank > limit:
        problems.append(
            _problem(
                name,
                "spec.lora.rank",
                f"{spec.lora.rank} exceeds pool {pool_name} capacity.maxLoRARank {limit}",
            )
        )
    if facts is not None:
        unknown = unknown_target_modules(facts, spec.lora.targets)
        if unknown:
            known = ", ".join(sorted(facts.linear_modules))
            problems.append(
                _problem(
                    name,
                    "spec.lora.targetModules",
                    f"{', '.join(unknown)} is not a linear module of {pool.spec.model.name} "
                    f"(pool {pool_name}); known: {known}",
                )
            )
    return problems


def describe(problems: Sequence[Problem]) -> str:
    """One message for a condition: every problem, each naming its field."""
    return "; ".join(str(p) for p in problems)


def _problem(name: str, path: str, message: str) -> Problem:
    return Problem(kind="LoRAExperiment", name=name, path=path, message=message)
