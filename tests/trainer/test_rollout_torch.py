"""The torch rollout engine: mixed-adapter batches behave like each row generated alone."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.grpo import token_logprobs
from loraplex_trainer.model_host import BaseModel
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.rollout import Completion, GenerationRequest, RolloutEngine
from loraplex_trainer.rollout.torch_engine import TorchRolloutEngine, sample_next, stop_token_ids

RANKS = {"r2": 2, "r4": 4, "r8": 8}


@pytest.fixture
def multi(tiny_base: BaseModel) -> MultiLoRAModel:
    """The tiny Llama with three adapters of different ranks whose B weights are random (non-trivial)."""
    model = MultiLoRAModel(tiny_base.model)
    generator = torch.Generator().manual_seed(1)
    for seed, (name, rank) in enumerate(RANKS.items()):
        model.add_adapter(name, AdapterConfig(rank=rank, alpha=2.0 * rank), seed=seed)
        with torch.no_grad():
            for param in model.adapter_parameters(name)[1::2]:  # A, B, A, B, ...: the Bs
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


@pytest.fixture
def engine(multi: MultiLoRAModel, tiny_base: BaseModel) -> TorchRolloutEngine:
    return TorchRolloutEngine(multi, tiny_base.tokenizer)


def encode(base: BaseModel, text: str) -> list[int]:
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


def mixed_requests(base: BaseModel, **sampling: float) -> list[GenerationRequest]:
    """Rows of every adapter and the base, with different prompt lengths and budgets."""
    rows = [
        ("r2", "Hi", 9),
        ("r4", "What is seven times six?", 16),
        (None, "Count: 1 2 3", 12),
        ("r8", "The quick brown fox", 5),
        ("r2", "A much longer prompt, so that the others are padded on the left.", 14),
        ("r4", "x", 16),
    ]
    return [
        GenerationRequest(encode(base, text), adapter, max_new_tokens=budget, seed=100 + i, **sampling)
        for i, (adapter, text, budget) in enumerate(rows)
    ]


def test_engine_satisfies_the_protocol(engine: TorchRolloutEngine) -> None:
    assert isinstance(engine, RolloutEngine)


def test_greedy_rows_of_a_mixed_batch_match_each_row_alone(
    engine: TorchRolloutEngine, tiny_base: BaseModel
) -> None:
    requests = mixed_requests(tiny_base, temperature=0.0)
    together = engine.generate(requests)
    for request, mixed in zip(requests, together, strict=True):
        [alone] = engine.generate([request])
        assert mixed.token_ids == alone.token_ids, request.adapter
        assert mixed.finish_reason == alone.finish_reason
        torch.testing.assert_close(
            torch.tensor(mixed.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0
        )
        assert mixed.prompt_ids == request.prompt_ids
    # The adapters really change the output: one prompt under each adapter and the base.
    prompt = requests[1].prompt_ids
    outputs = engine.generate(
        [GenerationRequest(prompt, name, 16, temperature=0.0) for name in [*RANKS, None]]
    )
    assert len({tuple(c.token_ids) for c in outputs}) == len(outputs)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_sharing_a_prompt_and_adapter_prefill_once_and_match_each_row_alone(
    engine: TorchRolloutEngine, tiny_base: BaseModel, temperature: float
) -> None:
    # A GRPO group: one prompt and adapter, several seeds; the same prompt under another adapter
    # and unrelated rows sit between its members.
    prompt = encode(tiny_base, "What is seven times six?")
    group = [GenerationRequest(prompt, "r4", 12, temperature=temperature, seed=s) for s in range(4)]
    other_adapter = GenerationRequest(prompt, "r8", 12, temperature=temperature, seed=0)
    hi, _, base_row, *_ = mixed_requests(tiny_base, temperature=temperature)
    requests = [group[0], hi, group[1], other_adapter, group[2], base_row, group[3]]
    forwards: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        forwards.append(tuple(kwargs["input_ids"].shape))

    hook = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = engine.generate(requests)
    finally:
        hook.remove()
    # One prefill row per distinct (adapter, prompt): the group, the other adapter, hi, base_row.
    assert forwards[0][0] == 4
    assert all(width == 1 for _, width in forwards[1:])  # then only decode steps
    for request, mixed in zip(requests, together, strict=True):
        [alone] = engine.generate([request])
        assert mixed.token_ids == alone.token_ids
        assert mixed.finish_reason == alone.finish_reason
        torch.testing.assert_close(
            torch.tensor(mixed.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0
        )
    group_outputs = {tuple(together[i].token_ids) for i in (0, 2, 4, 6)}
    assert len(group_outputs) == (1 if temperature == 0 else 4)  # shared prefill, own samples
    unshared = TorchRolloutEngine(engine.model, tiny_base.tokenizer, share_prefill=False)
    assert [c.token_ids for c in unshared.generate(requests)] == [c.token_ids for c in together]


def test_sub_batches_fit_max_batch_tokens_and_give_the_same_output(
    multi: MultiLoRAModel, tiny_base: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = mixed_requests(tiny_base, temperature=0.0)
    whole = TorchRolloutEngine(multi, tiny_base.tokenizer).generate(requests)
    engine = TorchRolloutEngine(multi, tiny_base.tokenizer, max_batch_tokens=60)
    batches: list[list[GenerationRequest]] = []
    generate_batch = engine._generate_batch

    def recording(batch: list[GenerationRequest]) -> list[Completion]:
        batches.append(batch)
        return generate_batch(batch)

    monkeypatch.setattr(engine, "_generate_batch", recording)
    split = engine.generate(requests)
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]
    assert sorted(len(b) for b in batches) == [1, 1, 1, 1, 2]
    for batch in batches:
        padded = len(batch) * (max(len(r.prompt_ids) for r in batch) + max(r.max_new_tokens for r in batch))
        assert padded <= 60 or len(batch) == 1  # a row wider than the limit still runs, alone


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(
    engine: TorchRolloutEngine, tiny_base: BaseModel
) -> None:
    others = mixed_requests(tiny_base, temperature=1.0)
    for top_p in (1.0, 0.8):
        probe = GenerationRequest(
            encode(tiny_base, "Tell me"), "r4", 24, temperature=0.9, top_p=top_p, seed=7
        )
        alone = engine.generate([probe])[0].token_ids
        assert engine.generate([probe])[0].token_ids == alone
        assert engine.generate([*others, probe])[-1].token_ids == alone
        assert engine.generate([probe, *reversed(others)])[0].token_ids == alone
        assert engine.generate([dataclasses.replace(probe, seed=8)])[0].token_ids != alone


def test_unseeded_sampling_follows_torch_manual_seed(
    engine: TorchRolloutEngine, tiny_base: BaseModel
) -> None:
    requests = [GenerationRequest(encode(tiny_base, "Tell me"), "r2", 16)] * 3
    torch.manual_seed(3)
    first = [c.token_ids for c in engine.generate(requests)]
    torch.manual_seed(3)
    assert [c.token_ids for c in engine.generate(requests)] == first
    assert len({tuple(t) for t in first}) > 1  # each unseeded row draws its own seed


def test_stops_at_an_end_token_or_at_max_new_tokens(multi: MultiLoRAModel, tiny_base: BaseModel) -> None:
    prompt = encode(tiny_base, "Count: 1 2 3")
    greedy = GenerationRequest(prompt, "r8", 20, temperature=0.0)
    free = TorchRolloutEngine(multi, tiny_base.tokenizer).generate([greedy])[0]
    assert tiny_base.tokenizer.eos_token_id not in free.token_ids  # else pick another prompt
    assert (len(free.token_ids), free.finish_reason) == (20, "length")
    # Declare the third greedy token an end token, as a generation_config with several EOS ids does.
    k = next(k for k in range(2, 20) if free.token_ids[k] not in free.token_ids[:k])
    multi.model.generation_config.eos_token_id = [tiny_base.tokenizer.eos_token_id, free.token_ids[k]]
    engine = TorchRolloutEngine(multi, tiny_base.tokenizer)
    stopped, short, none = engine.generate(
        [greedy, dataclasses.replace(greedy, max_new_tokens=k), dataclasses.replace(greedy, max_new_tokens=0)]
    )
    assert stopped.token_ids == free.token_ids[: k + 1]  # the end token is kept
    assert stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(free.logprobs[: k + 1], abs=1e-4)
    assert (short.token_ids, short.finish_reason) == (free.token_ids[:k], "length")
    assert (none.token_ids, none.logprobs, none.finish_reason) == ([], [], "length")


def test_stop_ids_join_the_tokenizer_and_the_generation_config(
    multi: MultiLoRAModel, tiny_base: BaseModel
) -> None:
    eos = tiny_base.tokenizer.eos_token_id
    multi.model.generation_config.eos_token_id = [5, 6]
    assert stop_token_ids(multi, tiny_base.tokenizer) == {eos, 5, 6}
    multi.model.generation_config.eos_token_id = None
    assert stop_token_ids(multi, tiny_base.tokenizer) == {eos}


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_reported_logprobs_equal_a_full_forward_pass(
    engine: TorchRolloutEngine, multi: MultiLoRAModel, tiny_base: BaseModel, temperature: float, top_p: float
) -> None:
    completions = engine.generate(mixed_requests(tiny_base, temperature=temperature, top_p=top_p))
    scoring_temperature = temperature if temperature > 0 else 1.0
    for request, completion in zip(mixed_requests(tiny_base), completions, strict=True):
        full = torch.tensor([completion.prompt_ids + completion.token_ids])
        with torch.no_grad(), multi.use_adapters([request.adapter]):
            logits = multi(input_ids=full).logits
        p = len(completion.prompt_ids)
        expected = token_logprobs(logits[:, p - 1 : -1], full[:, p:], scoring_temperature)[0]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)


def test_generation_runs_in_eval_mode_and_restores_training(
    engine: TorchRolloutEngine, tiny_base: BaseModel
) -> None:
    engine.model.train()
    engine.generate(mixed_requests(tiny_base)[:2])
    assert engine.model.training


def test_sample_next_greedy_top_p_and_inverse_cdf() -> None:
    # probabilities 0.5, 0.3, 0.2 for tokens 0, 1, 2 (logits are their logs)
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(4, 3)
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6])
    # greedy; CDF 0.5 | 0.8 | 1.0 so u=0.55 -> token 1 and u=0.95 -> token 2;
    # top-p 0.6 keeps {0, 1} (mass 0.8), so u=0.95 -> 0.76 of it -> token 1.
    uniforms = torch.tensor([0.99, 0.55, 0.95, 0.95])
    tokens, logprobs = sample_next(logits, temperature, top_p, uniforms)
    assert tokens.tolist() == [0, 1, 2, 1]
    torch.testing.assert_close(logprobs, torch.tensor([0.5, 0.3, 0.2, 0.3]).log())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt_ids": []}, r"requests\[0\].prompt_ids: empty"),
        ({"max_new_tokens": -1}, r"requests\[0\].max_new_tokens"),
        ({"temperature": -0.5}, r"requests\[0\].temperature"),
        ({"top_p": 0.0}, r"requests\[0\].top_p"),
    ],
)
def test_bad_requests_are_refused_with_the_field(
    engine: TorchRolloutEngine, change: dict[str, Any], message: str
) -> None:
    request = dataclasses.replace(GenerationRequest([1, 2], None, 4), **change)
    with pytest.raises(ValueError, match=message):
        engine.generate([request])
