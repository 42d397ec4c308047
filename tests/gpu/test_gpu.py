"""The GPU path on CUDA: the batched multi-LoRA layer's launches, and vLLM rollouts in bf16.

Marked ``gpu`` (deselected by default): `make test-gpu` on a CUDA machine with the trainer image's
environment (official vLLM). The CPU suite checks the same behaviour on CPU (tests/trainer,
tests/vllm); these check what only a GPU shows: real kernel launches and bf16 numerics.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import load_base_model
from loraplex_trainer.multilora import AdapterConfig, AdapterRouting, MultiLoRALinear
from loraplex_trainer.rollout.base import EngineLimits, GenerationRequest
from loraplex_trainer.rollout.torch_engine import TorchRolloutEngine
from loraplex_trainer.rollout.vllm_engine import VLLMRolloutEngine
from tests.trainer.conftest import save_tiny_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ROWS_PER_ADAPTER = 4


def _layer(adapters: int) -> tuple[MultiLoRALinear, list[str | None]]:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(256, 256)).to(CUDA)
    layer.base_layer.requires_grad_(False)
    for i in range(adapters):
        layer.add_adapter(f"e{i}", AdapterConfig(rank=4 + 4 * (i % 4), alpha=8.0))
        with torch.no_grad():
            layer.lora_B[f"e{i}"].weight.normal_()  # type: ignore[operator]
    layer.to(CUDA)
    rows: list[str | None] = [f"e{i}" for i in range(adapters) for _ in range(ROWS_PER_ADAPTER)] + [None]
    return layer, rows


def _cuda_kernels(adapters: int) -> int:
    layer, rows = _layer(adapters)
    layer.routing = AdapterRouting.from_rows(rows, CUDA, batched=True)
    x = torch.randn(len(rows), 16, 256, device=CUDA)
    with torch.no_grad():
        layer(x)  # warm-up: lazy initialisation launches kernels of its own
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            layer(x)
            torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == DeviceType.CUDA)


def test_on_cuda_the_batched_layer_launches_as_many_kernels_for_16_adapters_as_for_2() -> None:
    counts = {n: _cuda_kernels(n) for n in (2, 8, 16)}
    assert counts[2] == counts[8] == counts[16], counts


def test_on_cuda_the_batched_layer_equals_the_loop_in_fp32() -> None:
    layer, rows = _layer(8)
    x = torch.randn(len(rows), 16, 256, device=CUDA)
    results = []
    for batched in (False, True):
        layer.zero_grad(set_to_none=True)
        layer.routing = AdapterRouting.from_rows(rows, CUDA, batched=batched)
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in layer.parameters() if p.requires_grad]))
    (out_loop, gx_loop, g_loop), (out_batched, gx_batched, g_batched) = results
    torch.testing.assert_close(out_batched, out_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_batched, gx_loop, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(g_batched, g_loop, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-bf16"), head_dim=32)


@dataclass
class Bf16:
    model: MultiLoRAModel
    vllm: VLLMRolloutEngine
    torch: TorchRolloutEngine
    prompts: list[list[int]]


@pytest.fixture(scope="module")
def bf16(bf16_model_dir: Path) -> Iterator[Bf16]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    base = load_base_model(f"file://{bf16_model_dir}", dtype="bfloat16", device="cuda")
    model = MultiLoRAModel(base.model)
    adapters = {
        "math": AdapterConfig(rank=2, alpha=4.0),
        "chat": AdapterConfig(rank=8, alpha=4.0, target_modules=("q_proj", "v_proj")),
        "code": AdapterConfig(rank=16, alpha=16.0, target_modules=("o_proj", "down_proj")),
    }
    for seed, (name, config) in enumerate(adapters.items()):
        model.add_adapter(name, config, seed=seed)
        with torch.no_grad():
            for b in model.adapter_parameters(name)[1::2]:
                b.normal_(std=0.3)
    limits = EngineLimits(max_adapters=4, max_rank=16, max_model_len=256, gpu_memory_utilization=0.2)
    engine = VLLMRolloutEngine(model, base, limits)
    for name in adapters:
        engine.sync_adapter(name)
    prompts = [base.tokenizer(p)["input_ids"] for p in ("2+2=", "hello there, how are you?", "a")]
    yield Bf16(model, engine, TorchRolloutEngine(model, base.tokenizer), prompts)
    engine.close()


def test_vllm_in_bf16_reports_log_probs_close_to_the_trainers_for_every_adapter_and_the_base(
    bf16: Bf16,
) -> None:
    requests = [
        GenerationRequest(p, adapter, 8, temperature=1.0, top_p=0.9, seed=i)
        for i, p in enumerate(bf16.prompts)
        for adapter in ("math", "chat", "code", None)
    ]
    for request, completion in zip(requests, bf16.vllm.generate(requests), strict=True):
        ids = torch.tensor([completion.prompt_ids + completion.token_ids], device=CUDA)
        with bf16.model.use_adapters([request.adapter]), torch.no_grad():
            logits = bf16.model(input_ids=ids).logits[0, len(completion.prompt_ids) - 1 : -1].float()
        tokens = torch.tensor(completion.token_ids, device=CUDA)[:, None]
        mine = torch.log_softmax(logits, -1).gather(1, tokens)[:, 0].cpu()
        gap = (mine - torch.tensor(completion.logprobs)).abs()
        assert gap.mean() < 0.05 and gap.max() < 0.5, (request.adapter, gap)


def test_vllm_in_bf16_serves_the_new_weights_after_a_sync(bf16: Bf16) -> None:
    request = [GenerationRequest(bf16.prompts[1], "math", 8, temperature=0.0)]
    before = bf16.vllm.generate(request)[0].token_ids
    with torch.no_grad():
        for b in bf16.model.adapter_parameters("math")[1::2]:
            b.normal_(std=3.0)
    bf16.vllm.sync_adapter("math")
    after = bf16.vllm.generate(request)[0].token_ids
    assert after != before
    assert after[:2] == bf16.torch.generate(request)[0].token_ids[:2]  # bf16 kernels differ; the start agrees
