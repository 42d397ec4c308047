"""GRPO maths: group-relative advantages, token log-probabilities, the clipped loss and its aggregation.

Shapes: B rows (one sampled completion each), T completion positions, V vocabulary entries.
Everything here is a pure function of tensors; the trainer owns batching and adapters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

AGGREGATIONS = ("token-mean", "seq-mean", "seq-mean-token-sum")


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Turn rewards [n_prompts, group_size] into advantages relative to each prompt's group."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    # Sample std (Bessel-corrected) as in the GRPO paper and TRL; a group of one has no spread.
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred)
    return centred / (std + eps)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature) gathered at `tokens`, without a second [B, T, V] tensor.

    Autograd through `log_softmax(logits / t).gather(...)` would keep a float copy of the scaled
    logits for backward; here only the caller's logits and a [B, T] log-normaliser are kept, and
    the softmax is recomputed one row at a time in backward.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        lse = torch.stack([torch.logsumexp(row.float() / temperature, dim=-1) for row in logits])  # [B, T]
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() / temperature  # [B, T]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature  # type: ignore[attr-defined]
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, tokens, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        t = ctx.temperature  # type: ignore[attr-defined]
        grad = torch.empty_like(logits)
        for i in range(logits.shape[0]):
            # d logp / d logits = (onehot(token) - softmax(logits / t)) / t
            softmax = torch.exp(logits[i].float() / t - lse[i].unsqueeze(-1))  # [T, V]
            g = grad_out[i].unsqueeze(-1) / t  # [T, 1]
            row = -softmax * g
            row.scatter_add_(-1, tokens[i].unsqueeze(-1), g)
            grad[i] = row.to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability [B, T] (float32) of `tokens` [B, T] under softmax(logits [B, T, V] / temperature)."""
    if temperature <= 0:
        raise ValueError(f"temperature: {temperature} must be > 0 (greedy rollouts are scored at 1.0)")
    return _TokenLogprobs.apply(logits, tokens, temperature)


def per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float | torch.Tensor,
    clip_high: float | torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token, plus an optional k3 KL penalty to a reference policy.

    logprobs, old_logprobs, ref_logprobs: [B, T]; advantages: [B].
    clip_low, clip_high, kl_coef: scalars, or [B, 1] tensors when rows of several experiments
    (each with its own hyperparameters) share the batch.
    Returns (loss [B, T], kl [B, T]); kl is detached, for logging, and zero without a reference.
    """
    adv = advantages.unsqueeze(-1)  # [B, 1], one advantage for every token of a completion
    ratio = torch.exp(logprobs - old_logprobs)
    low = torch.as_tensor(1.0 - clip_low, dtype=ratio.dtype, device=ratio.device)
    high = torch.as_tensor(1.0 + clip_high, dtype=ratio.dtype, device=ratio.device)
    clipped = torch.clamp(ratio, low, high)
    loss = -torch.min(ratio * adv, clipped * adv)
    if ref_logprobs is None:
        return loss, torch.zeros_like(loss).detach()
    # k3 estimator (Schulman): unbiased for KL(policy || ref) and always >= 0.
    delta = ref_logprobs - logprobs
    kl = torch.exp(delta) - delta - 1.0
    return loss + kl_coef * kl, kl.detach()


def row_weights(mask: torch.Tensor, groups: Sequence[Hashable], aggregation: str) -> torch.Tensor:
    """Per-row weights [B] that turn sum(w[:, None] * loss * mask) into each experiment's aggregate loss.

    mask [B, T] marks completion tokens over a whole step batch; groups[i] is the experiment of
    row i. Because the weights are fixed before micro-batching, any split of the rows into
    micro-batches sums to the same per-experiment loss as one big batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"lossAggregation: {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    if len(groups) != mask.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries but mask has {mask.shape[0]} rows")
    lengths = mask.float().sum(dim=1)  # [B] completion tokens per row
    rows_of: dict[Hashable, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        rows_of[group].append(i)
    weights = torch.zeros_like(lengths)
    for rows in rows_of.values():
        idx = torch.tensor(rows, device=mask.device)
        if aggregation == "token-mean":
            weights[idx] = 1.0 / lengths[idx].sum().clamp(min=1.0)
        elif aggregation == "seq-mean":
            # An empty completion counts as a sequence whose mean is 0, as in TRL.
            weights[idx] = 1.0 / (len(rows) * lengths[idx].clamp(min=1.0))
        else:
            weights[idx] = 1.0 / len(rows)
    return weights
