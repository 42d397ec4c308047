"""Tests for the multi-LoRA layer: each row gets exactly its own adapter's update, forward and backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

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


@pytest.mark.parametrize("tokens", [5, 1], ids=["prefill", "decode"])
def test_mixed_batch_matches_peft_outputs_and_gradients(tokens: int) -> None:
    layer = make_layer()
    x = torch.randn(len(ROWS), tokens, 16)
    weights = torch.randn(len(ROWS), tokens, 12)  # a different loss weight per output, so rows differ
    layer.routing = AdapterRouting.from_rows(ROWS, "cpu")
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
