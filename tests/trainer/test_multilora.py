"""Tests for the multi-LoRA layer: each row gets exactly its own adapter's update, forward and backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex_trainer.multilora import AdapterConfig, AdapterRouting, MultiLoRALinear

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
CONFIGS = {
    "a": AdapterConfig(rank=4, alpha=8.0),
    "b": AdapterConfig(rank=2, alpha=3.0),
    "c": AdapterConfig(rank=8, alpha=4.0),
}
ROWS = ["a", None, "b", "a", "c", None]


def make_layer(configs: dict[str, AdapterConfig] = CONFIGS) -> MultiLoRALinear:
    """A MultiLoRALinear over a random 16 -> 12 linear, with random (non-zero) A and B."""
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(16, 12))
    layer.base_layer.requires_grad_(False)
    for name, config in configs.items():
        layer.add_adapter(name, config)
        with torch.no_grad():
            layer.lora_B[name].weight.normal_()
    return layer


def peft_twin(layer: MultiLoRALinear, name: str) -> PeftLoraLinear:
    """PEFT's own LoRA linear over the same base layer, with the same A and B as one of our adapters."""
    config = CONFIGS[name]
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha)
    twin = PeftLoraLinear(layer.base_layer, name, peft_config, r=config.rank, lora_alpha=config.alpha)
    with torch.no_grad():
        twin.lora_A[name].weight.copy_(layer.lora_A[name].weight)
        twin.lora_B[name].weight.copy_(layer.lora_B[name].weight)
    return twin


def test_config_scaling_and_normalisation() -> None:
    assert AdapterConfig(rank=8, alpha=16).scaling == 2.0
    listed = AdapterConfig(rank=4, alpha=4, target_modules=["v_proj", "q_proj"])  # type: ignore[arg-type]
    assert listed == AdapterConfig(rank=4, alpha=4, target_modules=("q_proj", "v_proj"))
    assert listed.target_modules == ("q_proj", "v_proj")
    assert AdapterConfig(rank=4, alpha=4, target_modules="q_proj").target_modules == ("q_proj",)
    assert AdapterConfig(rank=4, alpha=4).target_modules == "all-linear"
    with pytest.raises(ValueError, match="rank"):
        AdapterConfig(rank=0, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        AdapterConfig(rank=1, alpha=1, dropout=1.0)


def test_routing_groups_rows_by_adapter() -> None:
    routing = AdapterRouting.from_rows(ROWS, "cpu")
    assert routing.batch_size == 6
    assert {name: rows.tolist() for name, rows in routing.rows.items()} == {"a": [0, 3], "b": [2], "c": [4]}


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
@pytest.mark.parametrize("tokens", [5, 1], ids=["prefill", "decode"])
def test_mixed_batch_matches_peft_outputs_and_gradients(tokens: int, batched: bool) -> None:
    layer = make_layer()
    x = torch.randn(len(ROWS), tokens, 16)
    weights = torch.randn(len(ROWS), tokens, 12)  # a different loss weight per output, so rows differ
    layer.routing = AdapterRouting.from_rows(ROWS, "cpu", batched=batched)
    (layer(x) * weights).sum().backward()
    expected_base = layer.base_layer(x)

    for row, name in enumerate(ROWS):
        if name is None:
            torch.testing.assert_close(layer(x)[row], expected_base[row], **TOLERANCE)
    for name in CONFIGS:
        mine = [i for i, row_name in enumerate(ROWS) if row_name == name]
        twin = peft_twin(layer, name)
        output = twin(x[mine])
        (output * weights[mine]).sum().backward()
        torch.testing.assert_close(layer(x)[mine], output, **TOLERANCE)
        torch.testing.assert_close(layer.lora_A[name].weight.grad, twin.lora_A[name].weight.grad, **TOLERANCE)
        torch.testing.assert_close(layer.lora_B[name].weight.grad, twin.lora_B[name].weight.grad, **TOLERANCE)


def _outputs_and_gradients(
    layer: MultiLoRALinear, rows: list[str | None], x: torch.Tensor, batched: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    layer.routing = AdapterRouting.from_rows(rows, "cpu", batched=batched)
    output = layer(x)
    (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum().backward()
    grads = {f"{n}.{k}": getattr(layer, k)[n].weight.grad for n in layer.lora_A for k in ("lora_A", "lora_B")}
    assert x.grad is not None
    return output.detach(), x.grad, grads


@pytest.mark.parametrize("adapters", [1, 4, 8, 16])
def test_the_batched_path_equals_the_loop_for_many_adapters_of_different_ranks(adapters: int) -> None:
    configs = {f"e{i}": AdapterConfig(rank=1 + (5 * i) % 16, alpha=2.0 + i) for i in range(adapters)}
    layer = make_layer(configs)
    # Uneven groups, rows with no adapter, and a name this layer does not hold (it targets other modules).
    names = list(configs)
    rows = [names[(3 * i) % adapters] if i % 5 else None for i in range(3 * adapters + 4)] + ["elsewhere"]
    x = torch.randn(len(rows), 7, 16)
    loop = _outputs_and_gradients(layer, rows, x, batched=False)
    batched = _outputs_and_gradients(layer, rows, x, batched=True)
    torch.testing.assert_close(batched[0], loop[0], **TOLERANCE)
    torch.testing.assert_close(batched[1], loop[1], **TOLERANCE)  # the gradient flowing on to earlier layers
    for key, grad in loop[2].items():
        if grad is None:
            assert batched[2][key] is None or torch.count_nonzero(batched[2][key]) == 0, key
        else:
            torch.testing.assert_close(batched[2][key], grad, **TOLERANCE)
    # A change of one adapter's update shows: the comparison is not vacuous.
    with torch.no_grad():
        layer.lora_B[names[0]].weight.mul_(1.001)
    moved = _outputs_and_gradients(layer, rows, x, batched=True)
    assert not torch.allclose(moved[0], loop[0], atol=1e-6, rtol=1e-6)


def test_the_batched_path_uses_the_loop_while_dropout_is_active() -> None:
    layer = make_layer(
        {"a": AdapterConfig(rank=4, alpha=8.0, dropout=0.5), "b": AdapterConfig(rank=2, alpha=2)}
    )
    layer.routing = AdapterRouting.from_rows(["a", "b"], "cpu", batched=True)
    x = torch.randn(2, 64, 16)
    layer.train()
    torch.manual_seed(1)
    trained = layer(x)
    layer.routing = AdapterRouting.from_rows(["a", "b"], "cpu")
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), trained)  # the same dropout mask: the same path


def test_loss_on_one_adapters_rows_leaves_others_without_gradient() -> None:
    layer = make_layer()
    x = torch.randn(len(ROWS), 3, 16)
    layer.routing = AdapterRouting.from_rows(ROWS, "cpu")
    layer(x)[[0, 3]].pow(2).sum().backward()  # rows 0 and 3 belong to "a"
    assert layer.lora_B["a"].weight.grad.abs().sum() > 0
    for other in ("b", "c"):
        for module in (layer.lora_A[other], layer.lora_B[other]):
            assert module.weight.grad is None or torch.count_nonzero(module.weight.grad) == 0


def test_no_routing_means_base_only() -> None:
    layer = make_layer()
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_dropout_only_in_training_mode() -> None:
    layer = make_layer({"a": AdapterConfig(rank=4, alpha=8.0, dropout=0.5)})
    x = torch.randn(2, 64, 16)
    layer.routing = AdapterRouting.from_rows(["a", None], "cpu")
    layer.eval()
    evaluated = layer(x)
    torch.testing.assert_close(layer(x), evaluated)
    layer.train()
    trained = layer(x)
    assert not torch.allclose(trained[0], evaluated[0])
    torch.testing.assert_close(trained[1], evaluated[1])  # the base row has no dropout to apply


def test_half_precision_base_with_fp32_adapters() -> None:
    layer = make_layer()
    layer.base_layer.to(torch.bfloat16)
    layer.routing = AdapterRouting.from_rows(ROWS, "cpu")
    output = layer(torch.randn(len(ROWS), 2, 16, dtype=torch.bfloat16))
    assert output.dtype == torch.bfloat16
    assert layer.lora_A["a"].weight.dtype == torch.float32


def test_zero_adapter_is_a_no_op() -> None:
    layer = make_layer({})
    layer.add_adapter("noop", AdapterConfig(rank=4, alpha=8.0), zero=True)
    assert torch.count_nonzero(layer.lora_A["noop"].weight) == 0
    layer.routing = AdapterRouting.from_rows(["noop"], "cpu")
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_batch_size_must_match_routing() -> None:
    layer = make_layer()
    layer.routing = AdapterRouting.from_rows(["a", "b"], "cpu")
    with pytest.raises(RuntimeError, match="batch has 3 rows but use_adapters was given 2"):
        layer(torch.randn(3, 1, 16))


def test_remove_adapter_drops_its_parameters() -> None:
    layer = make_layer()
    layer.remove_adapter("b")
    assert set(layer.lora_A) == set(layer.lora_B) == {"a", "c"}
    assert len(list(layer.parameters())) == 2 + 4  # base weight and bias, A and B of two adapters


class _KernelCounter(TorchDispatchMode):
    """Counts aten operations that compute (not views): on a GPU, each is a kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 0 if func.is_view else 1
        return func(*args, **(kwargs or {}))


def _kernels(adapters: int, batched: bool) -> tuple[int, int]:
    """Kernels of one layer's forward and of its backward, for a batch of ``adapters`` adapters."""
    configs = {f"e{i}": AdapterConfig(rank=2 + i % 3, alpha=4.0) for i in range(adapters)}
    layer = make_layer(configs)
    rows: list[str | None] = [name for name in configs for _ in range(2)] + [None]
    layer.routing = AdapterRouting.from_rows(rows, "cpu", batched=batched)
    x = torch.randn(len(rows), 3, 16, requires_grad=True)
    with _KernelCounter() as forward:
        output = layer(x)
    with _KernelCounter() as backward:
        output.sum().backward()
    return forward.count, backward.count


def test_the_batched_path_launches_as_many_kernels_for_16_adapters_as_for_2() -> None:
    batched = {n: _kernels(n, batched=True) for n in (2, 8, 16)}
    loop = {n: _kernels(n, batched=False) for n in (2, 8, 16)}
    assert batched[2][0] == batched[8][0] == batched[16][0], batched  # the forward: constant
    # The backward adds only what separate parameters must: each adapter's B gradient written out.
    assert batched[16][1] - batched[2][1] <= 2 * 14, batched
    assert loop[16][0] - loop[2][0] >= 5 * 14, loop  # the loop launches per adapter, forward and back
    assert loop[16][1] - loop[2][1] >= 10 * 14, loop
