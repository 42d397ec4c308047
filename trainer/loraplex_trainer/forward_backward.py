"""The loss phase of a step: one micro-batched, mixed-adapter forward/backward over every training row.

Rows of every experiment train together. Each row runs on its own experiment's adapter, carries
a weight that makes its experiment's loss aggregate the way that experiment asked
(``lossAggregation``), and sends gradient only into that adapter. Shapes: N rows in the step,
B rows in a micro-batch, C completion positions, V vocabulary entries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .adapters import MultiLoRAModel
from .batches import LossReport, MicroBatch, TrainBatch, TrainRow
from .grpo import per_token_loss, token_logprobs
from .packing import pack
from .prefill import prefill_prompts

MAX_PADDING = 0.25
"""How much of a micro-batch's completion positions may be padding before it is split (see below)."""
IMPORTANCE_CAP = 2.0
"""Truncation of the per-token importance weight p_trainer / p_engine (veRL's and TRL's default)."""


@dataclass
class _Tally:
    """Per-experiment sums over the micro-batches of one step."""

    losses: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    kls: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    diff_sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    diff_max: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def report(self, train_tokens: int) -> LossReport:
        def per_token(sums: dict[str, float]) -> dict[str, float]:
            return {name: value / max(self.tokens[name], 1.0) for name, value in sums.items()}

        return LossReport(
            dict(self.losses),
            per_token(self.kls),
            train_tokens,
            logprob_diff_mean=per_token(self.diff_sums),
            logprob_diff_max=dict(self.diff_max),
        )


def forward_backward(
    model: MultiLoRAModel,
    batch: TrainBatch,
    *,
    pad_id: int,
    micro_batch_tokens: int,
    sampler_logprobs: bool = False,
    importance_cap: float = IMPORTANCE_CAP,
) -> LossReport:
    """Accumulate every adapter's gradient over the step's rows; per-experiment loss, KL and log-prob gap.

    ``sampler_logprobs``: the engine's log-probs come from another implementation (vLLM) and
    differ from the trainer's by more than rounding. GRPO's ratio then uses the trainer's own
    log-probs as the old policy (one update per rollout, so the ratio is 1 and the clip inactive
    at this step, as when the old log-probs are recomputed), and each token is weighted by
    ``min(p_trainer / p_engine, importance_cap)``: truncated importance sampling, which corrects
    for the tokens having been sampled from the engine's slightly different distribution.
    """
    tally = _Tally()
    rows = batch.rows
    # Rows with zero advantage and no KL term have zero gradient: skip their forward entirely.
    useful = [
        i for i, r in enumerate(rows)
        if r.completion.token_ids and (r.advantage != 0.0 or r.algorithm.kl_coef > 0)
    ]  # fmt: skip
    # A micro-batch pads every row to its longest completion, and one experiment's short answers
    # next to another's long ones would be mostly padding. So groups (the rows of one prompt, which
    # share a micro-batch and with it one prompt pass) go in order of their longest completion, and
    # a micro-batch ends where the next group would make it more than a quarter padding.
    group = {i: (rows[i].experiment, tuple(rows[i].prompt_ids)) for i in useful}
    longest: dict[tuple[str, tuple[int, ...]], int] = defaultdict(int)
    for i, key in group.items():
        longest[key] = max(longest[key], len(rows[i].completion.token_ids))
    group_tail = {i: longest[key] for i, key in group.items()}
    useful.sort(
        key=lambda i: (group_tail[i], len(rows[i].prompt_ids), rows[i].prompt_ids, rows[i].experiment, i)
    )
    sizes = [(len(r.prompt_ids), group_tail.get(i, 0)) for i, r in enumerate(rows)]
    cap = importance_cap if sampler_logprobs else None
    train_tokens = 0
    model.train()
    for index in pack(useful, sizes, micro_batch_tokens, max_padding=MAX_PADDING):
        micro = batch.micro_batch(index)
        _micro_step(model, micro, pad_id, tally, importance_cap=cap)
        train_tokens += sum(len(r.prompt_ids) + len(r.completion.token_ids) for r in micro.rows)
    model.eval()
    return tally.report(train_tokens)


def _micro_step(
    model: MultiLoRAModel, micro: MicroBatch, pad_id: int, tally: _Tally, *, importance_cap: float | None
) -> None:
    """Forward and backward of one micro-batch; adds its rows' loss, KL and log-prob gap to their experiments'.

    ``importance_cap`` None: the engine's log-probs are the old policy's; else see forward_backward.
    """
    device = micro.mask.device
    algorithms = [r.algorithm for r in micro.rows]
    adapters = [r.experiment for r in micro.rows]
    temps = torch.tensor([_train_temperature(a.temperature) for a in algorithms], device=device)
    advantages = torch.tensor([r.advantage for r in micro.rows], device=device)
    kl_coefs = torch.tensor([a.kl_coef for a in algorithms], device=device)

    logits = completion_logits(model, micro.rows, micro.completion_ids, micro.mask, adapters, pad_id)
    logprobs = _logprobs(logits, micro.completion_ids, temps)  # [B, c]
    del logits
    ref = None
    kl_rows = [i for i, coef in enumerate(kl_coefs.tolist()) if coef > 0]
    if kl_rows:
        # The reference policy is the same model with adapters switched off, needed only on
        # rows that pay a KL term; elsewhere it equals the policy, so their k3 term is 0.
        ref = logprobs.detach().clone()
        width = max(len(micro.rows[i].completion.token_ids) for i in kl_rows)
        ids, mask = micro.completion_ids[kl_rows, :width], micro.mask[kl_rows, :width]
        with torch.no_grad():
            kl_batch = [micro.rows[i] for i in kl_rows]
            ref_logits = completion_logits(model, kl_batch, ids, mask, [None] * len(kl_rows), pad_id)
            ref[kl_rows, :width] = _logprobs(ref_logits, ids, temps[kl_rows])
            del ref_logits
    clip_low = torch.tensor([a.clip_low for a in algorithms], device=device)[:, None]
    clip_high = torch.tensor([a.clip_high for a in algorithms], device=device)[:, None]
    trainer_logprobs = logprobs.detach()
    old = micro.old_logprobs if importance_cap is None else trainer_logprobs
    per_token, kl = per_token_loss(
        logprobs,
        old,
        advantages,
        clip_low=clip_low,
        clip_high=clip_high,
        ref_logprobs=ref,
        kl_coef=kl_coefs[:, None],
    )
    if importance_cap is not None:
        per_token = per_token * torch.exp(trainer_logprobs - micro.old_logprobs).clamp(max=importance_cap)
    per_row = (per_token * micro.mask).sum(-1) * micro.weights  # [B] each row's share of its loss
    per_row.sum().backward()
    gap = (trainer_logprobs - micro.old_logprobs).abs() * micro.mask
    for i, name in enumerate(adapters):
        tally.losses[name] += float(per_row[i].detach())
        tally.kls[name] += float((kl[i] * micro.mask[i]).sum())
        tally.tokens[name] += float(micro.mask[i].sum())
        tally.diff_sums[name] += float(gap[i].sum())
        tally.diff_max[name] = max(tally.diff_max[name], float(gap[i].max()))


def completion_logits(
    model: MultiLoRAModel,
    rows: Sequence[TrainRow],
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    adapters: Sequence[str | None],
    pad_id: int,
) -> torch.Tensor:
    """Logits [B, c, V] predicting each row's completion tokens, running each distinct prompt once.

    ``completion_ids`` and ``mask`` [B, c] hold the completions, right-padded. Column j predicts
    completion token j. The rows of a GRPO group share prompt and adapter, so the prompt runs once
    into a KV cache that is then copied to each row; the copy is differentiable, so every row's
    gradient still reaches the prompt's tokens, and only the completions run per row. Row i uses
    adapter ``adapters[i]`` (None: the base); prompts are left-padded with ``pad_id``.
    """
    device = completion_ids.device
    cache = DynamicCache(config=model.model.config)
    prompts = [(adapter, row.prompt_ids) for row, adapter in zip(rows, adapters, strict=True)]
    done = prefill_prompts(model, prompts, cache, pad_id)
    last = done.logits[:, None]  # [B, 1, V] predicts completion token 0
    c = completion_ids.shape[1]
    if c == 1:
        return last
    # A row's padding comes after its tokens, so they never see it.
    with model.use_adapters(adapters):
        rest = model(
            input_ids=completion_ids,
            attention_mask=torch.cat([done.attention_mask, mask.long()], dim=1),
            position_ids=done.position_ids[:, -1:] + 1 + torch.arange(c, device=device)[None, :],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.arange(c - 1, device=device),  # token c-1 predicts nothing we train on
        ).logits  # [B, c-1, V]
    return torch.cat([last, rest], dim=1)


def _train_temperature(temperature: float) -> float:
    """Greedy rollouts (temperature 0) are scored at temperature 1, as the engines report them."""
    return temperature if temperature > 0 else 1.0


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """token_logprobs with a per-row temperature (rows of different experiments may differ)."""
    if bool((temps == temps[0]).all()):
        return token_logprobs(logits, targets, float(temps[0]))
    # Scaling first keeps one call: per-row calls on logits[i : i + 1] each backpropagate a
    # zero-filled gradient the size of the whole [B, T, V] logits.
    return token_logprobs(logits / temps[:, None, None], targets, 1.0)
