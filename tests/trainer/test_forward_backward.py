"""The loss phase with an engine whose log-probs are not the trainer's: truncated importance sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraplex_api.experiment import AlgorithmSpec
from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.batches import LossReport, TrainBatch, TrainRow
from loraplex_trainer.forward_backward import forward_backward
from loraplex_trainer.model_host import BaseModel
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.rollout.base import Completion, GenerationRequest
from loraplex_trainer.rollout.torch_engine import TorchRolloutEngine

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture
def setup(tiny_base: BaseModel) -> tuple[MultiLoRAModel, list[TrainRow]]:
    model = MultiLoRAModel(tiny_base.model)
    model.add_adapter("a", AdapterConfig(rank=4, alpha=8.0), seed=0)
    with torch.no_grad():
        for parameter in model.adapter_parameters("a")[1::2]:
            parameter.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    engine = TorchRolloutEngine(model, tiny_base.tokenizer)
    prompts = [tiny_base.tokenizer(p)["input_ids"] for p in ("2+2=", "hello there")]
    requests = [GenerationRequest(ids, "a", 5, temperature=1.0, seed=s) for s, ids in enumerate(prompts * 2)]
    completions = engine.generate(requests)
    algorithm = AlgorithmSpec()
    advantages = [1.0, -0.5, 0.7, -1.2]
    rows = [
        TrainRow("a", algorithm, req.prompt_ids, c, adv)
        for req, c, adv in zip(requests, completions, advantages, strict=True)
    ]
    return model, rows


def _gradients(
    model: MultiLoRAModel, rows: list[TrainRow], pad_id: int, *, sampler: bool
) -> tuple[list[torch.Tensor], LossReport]:
    model.zero_grad(set_to_none=True)
    batch = TrainBatch.build(rows, pad_id=pad_id, device=torch.device("cpu"))
    report = forward_backward(model, batch, pad_id=pad_id, micro_batch_tokens=4096, sampler_logprobs=sampler)
    grads = [p.grad.clone() for p in model.adapter_parameters("a") if p.grad is not None]
    assert grads
    return grads, report


def _shifted(rows: list[TrainRow], delta: float) -> list[TrainRow]:
    """The same rows as if the engine had given each sampled token log-prob + delta."""
    return [
        dataclasses.replace(r, completion=Completion(
            r.completion.prompt_ids, r.completion.token_ids,
            [lp + delta for lp in r.completion.logprobs], r.completion.finish_reason,
        ))
        for r in rows
    ]  # fmt: skip


def test_importance_weights_correct_for_the_engine_and_are_truncated(
    setup: tuple[MultiLoRAModel, list[TrainRow]], tiny_base: BaseModel
) -> None:
    model, rows = setup
    pad = tiny_base.tokenizer.pad_token_id
    exact, report = _gradients(model, rows, pad, sampler=False)
    assert report.logprob_diff_max["a"] < 1e-5  # the torch engine's log-probs are the trainer's

    # The same log-probs treated as a sampler's: weight 1, the ratio from the trainer: no change.
    same, _ = _gradients(model, rows, pad, sampler=True)
    for mine, theirs in zip(same, exact, strict=True):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)

    # The engine gave every token 0.1 less log-prob: each token weighs e^0.1 more.
    lower, report = _gradients(model, _shifted(rows, -0.1), pad, sampler=True)
    for mine, theirs in zip(lower, exact, strict=True):
        torch.testing.assert_close(mine, theirs * torch.exp(torch.tensor(0.1)), **TOLERANCE)
    assert report.logprob_diff_mean["a"] == pytest.approx(0.1, abs=1e-4)
    assert report.logprob_diff_max["a"] == pytest.approx(0.1, abs=1e-4)

    # Far less (e^5): the weight is truncated at 2.
    capped, _ = _gradients(model, _shifted(rows, -5.0), pad, sampler=True)
    for mine, theirs in zip(capped, exact, strict=True):
        torch.testing.assert_close(mine, theirs * 2.0, **TOLERANCE)
