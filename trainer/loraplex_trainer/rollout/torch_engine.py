"""The built-in rollout engine: KV-cached sampling in plain torch, every row with its own adapter.

It shares the trained MultiLoRAModel, so new adapter weights are used the moment an optimizer
steps; it runs wherever torch runs, CPU included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.packing import pack
from loraplex_trainer.prefill import prefill_prompts
from loraplex_trainer.rollout.base import Completion, FinishReason, GenerationRequest

logger = logging.getLogger(__name__)


def sample_next(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's next token and its log-probability under softmax(logits / temperature).

    logits [b, V] float32; temperature, top_p, uniforms [b] (uniforms in [0, 1), one per row).
    Temperature 0 is greedy and scored at temperature 1. Sampling inverts the row's CDF at its
    uniform, so a row's choice depends only on its own logits and draw, never on its neighbours.
    """
    greedy = temperature == 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)  # [b, V]
    probs = logp.exp()
    order: torch.Tensor | None = None  # sorted position -> token id, for nucleus rows
    nucleus = (top_p < 1.0).nonzero().squeeze(-1)
    if nucleus.numel():
        # Only rows that ask for top-p pay for the sort; the others invert their CDF in vocab order.
        sorted_p, sorted_ids = probs[nucleus].sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p[nucleus, None]  # the smallest set reaching top_p
        probs = probs.clone()
        probs[nucleus] = sorted_p * keep
        order = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs).clone()
        order[nucleus] = sorted_ids
    cdf = probs.cumsum(-1)  # [b, V]; unnormalised, so truncated rows need no renormalisation
    target = (uniforms * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
    sampled = choice if order is None else order.gather(-1, choice[:, None]).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class TorchRolloutEngine:
    """Generates mixed-adapter batches with the HF KV cache.

    Rows that share adapter and prompt (a GRPO group) share one prefill; rows leave the batch
    as they finish.
    """

    exact_logprobs = True
    """It samples from the model being trained: its log-probs are the trainer's."""

    def __init__(
        self,
        model: MultiLoRAModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_tokens: int | None = None,
        share_prefill: bool = True,
    ) -> None:
        """Sample from ``model``; ``share_prefill=False`` prefills every row on its own (benchmarks)."""
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens: {max_batch_tokens} must be at least 1")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.share_prefill = share_prefill
        self.stop_ids = stop_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad prompts with")
        self.pad_id: int = pad_id

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Return one completion per request, in request order."""
        for index, request in enumerate(requests):
            check_request(index, request)
        results: dict[int, Completion] = {
            i: Completion(list(r.prompt_ids), [], [], "length")
            for i, r in enumerate(requests)
            if r.max_new_tokens == 0
        }
        todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        # Similar prompt lengths side by side waste less padding, and identical prompts side by
        # side share one prefill even when max_batch_tokens splits the rows; a row's output does
        # not depend on its neighbours (up to float rounding), so the order is free to choose.
        todo.sort(
            key=lambda i: (
                len(requests[i].prompt_ids),
                requests[i].max_new_tokens,
                requests[i].prompt_ids,
                requests[i].adapter or "",
            )
        )

        was_training = self.model.training
        self.model.eval()  # no adapter dropout while sampling
        started = time.perf_counter()
        try:
            sizes = [(len(r.prompt_ids), r.max_new_tokens) for r in requests]
            for batch in pack(todo, sizes, self.max_batch_tokens):
                completions = self._generate_batch([requests[i] for i in batch])
                results.update(zip(batch, completions, strict=True))
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - started
        new_tokens = sum(len(c.token_ids) for c in results.values())
        logger.info(
            "rollout rows=%d new_tokens=%d seconds=%.3f tokens_per_second=%.1f",
            len(requests),
            new_tokens,
            seconds,
            new_tokens / seconds if seconds > 0 else 0.0,
        )
        return [results[i] for i in range(len(requests))]

    def sync_adapter(self, name: str) -> None:
        """Nothing to do: this engine samples from the very model the optimizer updates."""

    def remove_adapter(self, name: str) -> None:
        """Nothing to do: adapters are removed from the shared model by its owner."""

    def close(self) -> None:
        """Nothing to do: the engine holds nothing of its own."""

    @torch.inference_mode()
    def _generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Prefill each distinct prompt once, then decode one token per row per step until all stop."""
        device = self.model.model.device
        n = len(requests)
        cache = DynamicCache(config=self.model.model.config)
        logits, attention_mask, position_ids = self._prefill(requests, cache)
        temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)
        top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=device)
        generators = [row_generator(r.seed) for r in requests]

        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[float]] = [[] for _ in requests]
        finish: list[FinishReason] = ["length"] * n
        active = list(range(n))  # request index of each row still in the batch
        while True:
            # Drawn on the CPU from each row's own generator: same seed, same draws, on any device.
            uniforms = torch.stack([torch.rand((), generator=generators[i]) for i in active]).to(device)
            next_ids, next_logprobs = sample_next(logits, temperature[active], top_p[active], uniforms)
            keep: list[int] = []  # batch positions of rows that go on
            for pos, (i, token, logprob) in enumerate(
                zip(active, next_ids.tolist(), next_logprobs.tolist(), strict=True)
            ):
                tokens[i].append(token)
                logprobs[i].append(logprob)
                if token in self.stop_ids:
                    finish[i] = "stop"
                elif len(tokens[i]) < requests[i].max_new_tokens:
                    keep.append(pos)
            if not keep:
                break
            if len(keep) < len(active):
                # Finished rows leave the batch, so later steps cost only what is still running.
                kept = torch.tensor(keep, device=device)
                cache.batch_select_indices(kept)
                attention_mask, position_ids, next_ids = (
                    attention_mask[kept],
                    position_ids[kept],
                    next_ids[kept],
                )
                active = [active[pos] for pos in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            with self.model.use_adapters([requests[i].adapter for i in active]):
                out = self.model(
                    input_ids=next_ids[:, None],
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits = out.logits[:, -1].float()
        return [
            Completion(list(r.prompt_ids), tokens[i], logprobs[i], finish[i]) for i, r in enumerate(requests)
        ]

    def _prefill(
        self, requests: Sequence[GenerationRequest], cache: DynamicCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill each distinct (adapter, prompt) once; last-position logits [n, V] (float32), mask, positions."""
        done = prefill_prompts(
            self.model,
            [(r.adapter, r.prompt_ids) for r in requests],
            cache,
            self.pad_id,
            share=self.share_prefill,
        )
        return done.logits.float(), done.attention_mask, done.position_ids


def stop_token_ids(model: MultiLoRAModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's EOS plus any extra end tokens the model's generation config names."""
    ids: set[int] = set()
    candidates = [tokenizer.eos_token_id, getattr(model.model.generation_config, "eos_token_id", None)]
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate is not None:
            ids.update(int(c) for c in candidate)
    if not ids:
        logger.warning("rollout no_stop_tokens=true: rows end only at max_new_tokens")
    return frozenset(ids)


def row_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one row; unseeded rows draw their seed from torch's global RNG."""
    if seed is None:
        # From the global RNG rather than the OS, so torch.manual_seed makes a whole run repeatable.
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator().manual_seed(seed)


def check_request(index: int, request: GenerationRequest) -> None:
    """Refuse a request the engine cannot honour, naming it and the rule it breaks."""
    if not request.prompt_ids:
        raise ValueError(f"requests[{index}].prompt_ids: empty; a prompt needs at least one token")
    if request.max_new_tokens < 0:
        raise ValueError(f"requests[{index}].max_new_tokens: {request.max_new_tokens} must be >= 0")
    if request.temperature < 0:
        raise ValueError(f"requests[{index}].temperature: {request.temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < request.top_p <= 1.0:
        raise ValueError(f"requests[{index}].top_p: {request.top_p} must be in (0, 1]")
