"""Memory model: how many bytes of a trainer replica one experiment occupies.

An experiment's cost on a replica has two parts.

Adapter state
    LoRA adds, to every targeted linear module ``in -> out``, the matrices
    ``A: rank x in`` and ``B: out x rank``: ``rank * (in + out)`` parameters per
    module, times how many layers have that module. The trainer keeps them in
    fp32 (4 bytes) and holds four copies: the weights, their gradient and Adam's
    two moments. So ``adapter_bytes = rank * sum((in + out) * count) * 4 * 4``.

Rollout buffers
    A step generates ``prompts_per_step * group_size`` completions, each up to
    ``max_prompt_tokens + max_new_tokens`` tokens long, all in one generation
    batch, so the KV cache of every one of those tokens is live at once. A
    token's KV cache is a key and a value vector per layer, each ``hidden_size``
    wide, in the 16-bit compute dtype: ``2 * num_layers * hidden_size * 2``
    bytes. This is the term that grows with an experiment's step settings; the
    backward pass is micro-batched by the trainer, so its activations are bounded
    by the micro-batch and are not charged per experiment. Models with
    grouped-query attention keep fewer KV heads than ``hidden_size`` implies, so
    for them the estimate is high, which errs on the side of not overfilling.

The pool's ``status.model`` (measured by a trainer when it loads the base model)
supplies the shapes. Until a trainer has reported them the facts are ``None`` and
the scheduler counts slots only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraplex_api import LoRAExperimentSpec
from loraplex_api.experiment import ALL_LINEAR

ADAPTER_BYTES_PER_PARAM = 4
"""The trainer keeps adapter weights in fp32."""

ADAPTER_COPIES = 4
"""Weights, gradient and Adam's first and second moments."""

KV_BYTES_PER_VALUE = 2
"""KV cache entries are kept in the 16-bit compute dtype (bf16 or fp16)."""


@dataclass(frozen=True)
class LinearShape:
    """Shape of one kind of linear module (e.g. ``q_proj``) and how many layers have it."""

    in_features: int
    out_features: int
    count: int


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about a pool's base model."""

    parameter_count: int
    linear_modules: Mapping[str, LinearShape] = field(hash=False)
    hidden_size: int
    num_layers: int

    @classmethod
    def from_status(cls, model: Mapping[str, Any] | None) -> ModelFacts | None:
        """Read a pool's ``status.model`` (camelCase, as a trainer wrote it); None if anything is missing."""
        if not model:
            return None
        try:
            modules = {
                str(suffix): LinearShape(int(shape["in"]), int(shape["out"]), int(shape["count"]))
                for suffix, shape in (model.get("linearModules") or {}).items()
            }
            facts = cls(
                parameter_count=int(model["parameterCount"]),
                linear_modules=modules,
                hidden_size=int(model["hiddenSize"]),
                num_layers=int(model["numLayers"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return facts if modules else None


@dataclass(frozen=True)
class ExperimentCost:
    """An experiment's bytes on a replica, in its two parts."""

    adapter_bytes: int
    rollout_bytes: int

    @property
    def total_bytes(self) -> int:
        """What the experiment takes from the replica's adapter memory budget."""
        return self.adapter_bytes + self.rollout_bytes


def target_suffixes(facts: ModelFacts, target_modules: str | Iterable[str]) -> tuple[str, ...]:
    """The linear-module suffixes an adapter targets, with ``all-linear`` expanded, sorted."""
    if target_modules == ALL_LINEAR:
        return tuple(sorted(facts.linear_modules))
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    # Exact suffixes only, as the trainer resolves them: a name it would refuse
    # must not be placed.
    return tuple(sorted(set(names)))


def unknown_target_modules(facts: ModelFacts, target_modules: str | Iterable[str]) -> tuple[str, ...]:
    """The targeted suffixes that the base model has no linear module for (empty when all are known)."""
    return tuple(s for s in target_suffixes(facts, target_modules) if s not in facts.linear_modules)


def adapter_parameters(facts: ModelFacts, rank: int, target_modules: str | Iterable[str]) -> int:
    """Number of LoRA parameters (A and B over all layers); unknown target modules count nothing."""
    per_rank = 0
    for suffix in target_suffixes(facts, target_modules):
        shape = facts.linear_modules.get(suffix)
        if shape is not None:
            per_rank += (shape.in_features + shape.out_features) * shape.count
    return rank * per_rank


def kv_bytes_per_token(facts: ModelFacts) -> int:
    """Bytes of KV cache one generated or prompt token holds (a key and a value per layer)."""
    return 2 * facts.num_layers * facts.hidden_size * KV_BYTES_PER_VALUE


def experiment_cost(
    facts: ModelFacts,
    *,
    rank: int,
    target_modules: str | Iterable[str],
    prompts_per_step: int,
    group_size: int,
    max_prompt_tokens: int,
    max_new_tokens: int,
) -> ExperimentCost:
    """Estimate the bytes one experiment occupies on a replica (see the module docstring)."""
    adapter = adapter_parameters(facts, rank, target_modules) * ADAPTER_BYTES_PER_PARAM * ADAPTER_COPIES
    tokens = prompts_per_step * group_size * (max_prompt_tokens + max_new_tokens)
    return ExperimentCost(adapter_bytes=adapter, rollout_bytes=tokens * kv_bytes_per_token(facts))


def spec_cost(facts: ModelFacts, spec: LoRAExperimentSpec) -> ExperimentCost:
    """The cost of an experiment with this spec (its LoRA and step settings)."""
    algorithm = spec.algorithm
    return experiment_cost(
        facts,
        rank=spec.lora.rank,
        target_modules=spec.lora.targets,
        prompts_per_step=algorithm.prompts_per_step,
        group_size=algorithm.group_size,
        max_prompt_tokens=algorithm.max_prompt_tokens,
        max_new_tokens=algorithm.max_new_tokens,
    )


def format_bytes(n: int) -> str:
    """Human-readable size in binary units for messages, e.g. ``1.5GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
