"""What every rollout engine takes and returns, so the trainer never knows which one runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One row to generate: a tokenized prompt, the adapter to use (None = the base model) and sampling."""

    prompt_ids: list[int]
    adapter: str | None
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same sample, whatever else is in the batch


@dataclass
class Completion:
    """What one request produced.

    logprobs[i] is log p(token_ids[i]) under softmax(logits / temperature), without top-p
    renormalisation, i.e. what `grpo.token_logprobs` recomputes in training; greedy rows
    (temperature 0) report it under temperature 1. A row that stopped at an end-of-sequence
    token ("stop") includes that token, so the policy is trained to stop.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass(frozen=True)
class EngineLimits:
    """What an engine that keeps its own copy of the adapters must have room for (from the pool)."""

    max_adapters: int = 8
    """capacity.maxAdaptersPerReplica: every adapter the replica may host at once."""
    max_rank: int = 64
    """capacity.maxLoRARank."""
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    enforce_eager: bool = False


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates mixed-adapter batches; implemented by the torch engine and, later, the vLLM one.

    A vLLM engine fits behind this interface as follows: each request becomes a vLLM request with
    its own `LoRARequest` (None for base rows), so one `generate` call still mixes adapters; the
    engine is built with `enable_lora=True`, `max_loras` >= the number of active adapters and
    `max_lora_rank` >= the pool's rank limit; `sync_adapter` pushes the adapter's current weights
    after every optimizer step (vLLM serves a copy, unlike the torch engine which shares the
    trained model), without merging them into the base; `remove_adapter` evicts it. Its reported
    logprobs must be the raw ones described on `Completion`, not top-p processed.
    """

    exact_logprobs: bool
    """Whether the log-probs are the trained model's own (torch) or another implementation's
    (vLLM), in which case the trainer recomputes them (see forward_backward)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Return one completion per request, in request order."""
        ...

    def sync_adapter(self, name: str) -> None:
        """Make the next `generate` use the adapter's current weights."""
        ...

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter whose experiment has ended."""
        ...

    def close(self) -> None:
        """Release what the engine holds outside the trained model (memory, folders)."""
        ...
