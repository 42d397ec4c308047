"""The batches one training step hands from phase to phase, each named and typed.

rollout -> :class:`Rollouts` -> reward -> :class:`Scored` -> advantage -> :class:`TrainBatch`
-> loss (split into :class:`MicroBatch` es) -> :class:`LossReport` -> optimizer.
Shapes: N rows in the step, B rows in a micro-batch, C completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex_api import AlgorithmSpec

from .grpo import row_weights
from .rollout.base import Completion, GenerationRequest


@dataclass
class Rollout:
    """One sampled completion and what it was sampled for."""

    experiment: str
    row: dict[str, Any]
    """The dataset row, as the reward sees it."""
    prompt: str
    """The rendered prompt text."""
    request: GenerationRequest
    completion: Completion


@dataclass
class Rollouts:
    """Phase 1 -> 2: every active experiment's rollouts of this step, experiment by experiment."""

    of: dict[str, list[Rollout]]

    @property
    def tokens(self) -> int:
        """New tokens the engine generated."""
        return sum(len(r.completion.token_ids) for rows in self.of.values() for r in rows)


@dataclass
class Scored:
    """Phase 2 -> 3: the rollouts of the experiments whose rewards came back, with those rewards."""

    rollouts: dict[str, list[Rollout]]
    rewards: dict[str, list[float]]
    """One reward per rollout, in rollout order."""


Planned = tuple[dict[str, Any], str, GenerationRequest]
"""A request before it runs: (dataset row, rendered prompt, request)."""


@dataclass
class TrainRow:
    """One sampled completion with its advantage, on its way to the loss."""

    experiment: str
    algorithm: AlgorithmSpec
    prompt_ids: list[int]
    completion: Completion
    advantage: float


@dataclass
class MicroBatch:
    """Rows that run in one forward/backward, and their completions as tensors."""

    rows: list[TrainRow]
    completion_ids: torch.Tensor  # [B, c] right-padded with the pad id; c = longest completion here
    mask: torch.Tensor  # [B, c] 1.0 on completion tokens
    old_logprobs: torch.Tensor  # [B, c] the engine's log-probs of the same tokens (0 on padding)
    weights: torch.Tensor  # [B] each row's share of its experiment's loss


@dataclass
class TrainBatch:
    """Every row of one step that trains, with its completions padded into tensors once.

    Column j of ``completion_ids``, ``mask`` and ``old_logprobs`` is completion token j; rows are
    right-padded to the longest completion of the step, and a micro-batch takes its rows and the
    leading columns it needs.
    """

    rows: list[TrainRow]
    completion_ids: torch.Tensor  # [N, C]
    mask: torch.Tensor  # [N, C]
    old_logprobs: torch.Tensor  # [N, C]
    weights: torch.Tensor  # [N]

    @classmethod
    def build(cls, rows: list[TrainRow], *, pad_id: int, device: torch.device) -> TrainBatch:
        """Pad every row's completion and fix the loss weights before any micro-batching."""
        width = max((len(r.completion.token_ids) for r in rows), default=0) or 1
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), width, device=device)
        old = torch.zeros(len(rows), width, device=device)
        for i, row in enumerate(rows):
            c = len(row.completion.token_ids)
            if c:
                ids[i, :c] = torch.tensor(row.completion.token_ids, device=device)
                mask[i, :c] = 1.0
                old[i, :c] = torch.tensor(row.completion.logprobs, device=device)
        # Fixed over the whole step, so any split into micro-batches sums to the same loss.
        weights = torch.zeros(len(rows), device=device)
        for aggregation in {r.algorithm.loss_aggregation for r in rows}:
            idx = [i for i, r in enumerate(rows) if r.algorithm.loss_aggregation == aggregation]
            weights[idx] = row_weights(mask[idx], [rows[i].experiment for i in idx], aggregation)
        return cls(rows, ids, mask, old, weights)

    def micro_batch(self, index: list[int]) -> MicroBatch:
        """The rows at ``index``, cut to their own longest completion."""
        c = max(len(self.rows[i].completion.token_ids) for i in index)
        return MicroBatch(
            rows=[self.rows[i] for i in index],
            completion_ids=self.completion_ids[index, :c],
            mask=self.mask[index, :c],
            old_logprobs=self.old_logprobs[index, :c],
            weights=self.weights[index],
        )


@dataclass
class LossReport:
    """What the loss phase measured, per experiment."""

    losses: dict[str, float]
    kls: dict[str, float]
    """Mean k3 KL per completion token (0 for experiments without klCoef)."""
    train_tokens: int
    """Prompt and completion tokens that went through the forward pass."""
    logprob_diff_mean: dict[str, float] = field(default_factory=dict)
    """Mean |engine log-prob - trainer log-prob| over the experiment's trained completion tokens."""
    logprob_diff_max: dict[str, float] = field(default_factory=dict)
