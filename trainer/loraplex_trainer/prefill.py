"""Shared prompt prefill: each distinct (adapter, prompt) runs once, its KV cache copied to every row.

The rows of a GRPO group differ only in their sampling seeds, so rollout and training both divide
their prompt work by groupSize this way. A copied cache holds exactly what the row's own prefill
would, and the copy is differentiable, so in training every row's gradient still reaches the
prompt's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .adapters import MultiLoRAModel


@dataclass
class Prefill:
    """The state of every row after its prompt: rows in the order they were given."""

    logits: torch.Tensor  # [n, V] last-position logits (predicting the first new token)
    attention_mask: torch.Tensor  # [n, width] 1 on real prompt tokens (prompts are left-padded)
    position_ids: torch.Tensor  # [n, width] positions counting real tokens only


def prefill_prompts(
    model: MultiLoRAModel,
    prompts: Sequence[tuple[str | None, Sequence[int]]],
    cache: DynamicCache,
    pad_id: int,
    *,
    share: bool = True,
) -> Prefill:
    """Fill ``cache`` with the prompts (row i: adapter prompts[i][0], token ids prompts[i][1]).

    With ``share=False`` every row runs its own prefill (for benchmarks).
    """
    device = model.model.device
    unique: list[tuple[str | None, Sequence[int]]] = []  # the prompts that run
    source: list[int] = []  # row -> the position of its prompt in unique
    seen: dict[tuple[str | None, tuple[int, ...]], int] = {}
    for adapter, ids in prompts:
        key = (adapter, tuple(ids))
        if key not in seen or not share:
            seen[key] = len(unique)
            unique.append((adapter, ids))
        source.append(seen[key])
    width = max(len(ids) for _, ids in unique)
    input_ids = torch.full((len(unique), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(unique), width), dtype=torch.long, device=device)
    for row, (_, ids) in enumerate(unique):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), device=device)
        attention_mask[row, width - len(ids) :] = 1
    # Positions count real tokens only, so a left-padded row sees the positions it would alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with model.use_adapters([adapter for adapter, _ in unique]):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            # An index tensor rather than logits_to_keep=1: the head then sees a contiguous
            # [m, 1, hidden] copy and runs as one matrix product, where the strided slice of
            # an int makes torch.matmul fall back to a batched product, ~9x slower on CPU.
            logits_to_keep=torch.tensor([width - 1], device=device),
        ).logits[:, -1]
    if len(unique) < len(prompts):
        index = torch.tensor(source, device=device)
        cache.batch_select_indices(index)
        logits, attention_mask, position_ids = logits[index], attention_mask[index], position_ids[index]
    return Prefill(logits, attention_mask, position_ids)
