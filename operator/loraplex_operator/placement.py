"""Translate observed pools and experiments into the scheduler's vocabulary.

The scheduler (``scheduler.py``) is a pure function over frozen dataclasses;
these functions build them from the views in ``observed.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraplex_api.pool import SharedBasePool

from .memory import ModelFacts
from .observed import ExperimentView, PoolView
from .scheduler import ExperimentDemand, PoolState, ReplicaState


def model_facts(view: PoolView) -> ModelFacts | None:
    """The base model's facts as the trainer reported them in ``status.model``; None until it has."""
    if view.status.model is None:
        return None
    return ModelFacts.from_status(view.status.model.wire())


def pool_state(pool: SharedBasePool, facts: ModelFacts | None, replicas: Sequence[ReplicaState]) -> PoolState:
    """A validated pool and its observed replicas as the scheduler sees them."""
    spec = pool.spec
    return PoolState(
        name=pool.metadata.name,
        model_name=spec.model.name,
        desired_replicas=spec.replicas,
        ready_replicas=sum(1 for r in replicas if r.ready),
        replicas=tuple(replicas),
        max_adapters_per_replica=spec.capacity.max_adapters_per_replica,
        max_lora_rank=spec.capacity.max_lora_rank,
        adapter_memory_budget=spec.capacity.adapter_memory_budget_bytes,
        autoscaling=spec.autoscaling.enabled,
        min_replicas=spec.autoscaling.min_replicas,
        max_replicas=spec.autoscaling.max_replicas,
        scale_down_delay_seconds=float(spec.autoscaling.scale_down_delay_seconds),
        model_facts=facts,
    )


def demand(experiment: ExperimentView) -> ExperimentDemand:
    """What a validated experiment asks of its pool."""
    spec = experiment.spec
    if spec is None:
        raise ValueError(f"experiment {experiment.key} has an invalid spec and asks for nothing")
    algorithm = spec.algorithm
    return ExperimentDemand(
        key=experiment.key,
        pool=spec.pool_ref.name,
        rank=spec.lora.rank,
        target_modules=spec.lora.targets,
        prompts_per_step=algorithm.prompts_per_step,
        group_size=algorithm.group_size,
        max_prompt_tokens=algorithm.max_prompt_tokens,
        max_new_tokens=algorithm.max_new_tokens,
        priority=spec.priority,
        created=experiment.created,
    )
