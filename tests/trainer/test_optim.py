"""Per-adapter optimizers: one experiment's step never reaches another experiment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import BaseModel
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.optim import AdapterOptimizer, NonFiniteError, OptimizerConfig

# Weight decay on both: a global AdamW would shrink B's weights on A's step.
CONFIG = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0)


@dataclass
class TwoAdapters:
    """Two adapters of one MultiLoRAModel that share one forward: rows 0-1 use A, rows 2-3 use B."""

    loss: Callable[[], torch.Tensor]
    a: list[nn.Parameter]
    b: list[nn.Parameter]


@pytest.fixture
def two_adapters(tiny_base: BaseModel) -> TwoAdapters:
    model = MultiLoRAModel(tiny_base.model)
    generator = torch.Generator().manual_seed(0)
    for seed, (name, rank) in enumerate([("a", 4), ("b", 2)]):
        model.add_adapter(name, AdapterConfig(rank=rank, alpha=2.0 * rank), seed=seed)
        with torch.no_grad():  # random B (PEFT starts it at zero) so both A and B get gradients
            for param in model.adapter_parameters(name)[1::2]:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    input_ids = torch.randint(0, len(tiny_base.tokenizer), (4, 6), generator=generator)

    def loss() -> torch.Tensor:
        with model.use_adapters(["a", "a", "b", "b"]):
            return model(input_ids=input_ids, labels=input_ids).loss

    return TwoAdapters(loss, model.adapter_parameters("a"), model.adapter_parameters("b"))


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_same(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved, strict=True):
        assert torch.equal(p.detach(), s)


def grad_norm(params: list[nn.Parameter]) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def test_step_of_one_adapter_leaves_the_other_untouched(two_adapters: TwoAdapters) -> None:
    opt_a = AdapterOptimizer(two_adapters.a, CONFIG)
    opt_b = AdapterOptimizer(two_adapters.b, CONFIG)
    # Give B optimizer state first, so there is state to protect.
    two_adapters.loss().backward()
    opt_b.step()
    opt_a.zero_grad()
    opt_b.zero_grad()

    two_adapters.loss().backward()  # both adapters now hold gradients
    b_weights, b_grads = snapshot(two_adapters.b), [p.grad.clone() for p in two_adapters.b]
    b_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt_b.state_dict()["state"].items()}
    a_weights = snapshot(two_adapters.a)
    assert all(g.abs().sum() > 0 for g in b_grads)

    opt_a.step()

    assert not torch.equal(two_adapters.a[0].detach(), a_weights[0])
    assert_same(two_adapters.b, b_weights)
    assert_same([p.grad for p in two_adapters.b], b_grads)  # A's clipping did not scale B's grads
    after = opt_b.state_dict()["state"]
    assert after.keys() == b_state.keys()
    for key, tensors in b_state.items():
        for name, value in tensors.items():
            assert torch.equal(after[key][name], value)


def test_grad_norm_is_clipped_per_adapter(two_adapters: TwoAdapters) -> None:
    opt_a = AdapterOptimizer(two_adapters.a, CONFIG)
    opt_b = AdapterOptimizer(two_adapters.b, CONFIG)
    two_adapters.loss().backward()
    # A large, B small: a global clip would shrink B by A's norm too; here each is clipped on its own.
    for p in two_adapters.a:
        p.grad.mul_(100.0)
    scale_b = 1e-6 / grad_norm(two_adapters.b)
    for p in two_adapters.b:
        p.grad.mul_(scale_b)
    norm_a_before = grad_norm(two_adapters.a)

    assert opt_a.step() == pytest.approx(norm_a_before, rel=1e-5)
    assert grad_norm(two_adapters.a) == pytest.approx(1.0, rel=1e-5)
    assert opt_b.step() == pytest.approx(1e-6, rel=1e-5)
    assert grad_norm(two_adapters.b) == pytest.approx(1e-6, rel=1e-5)


def test_clipping_is_off_without_max_grad_norm(two_adapters: TwoAdapters) -> None:
    opt = AdapterOptimizer(two_adapters.a, OptimizerConfig(learning_rate=1e-2, max_grad_norm=None))
    two_adapters.loss().backward()
    scale = 10.0 / grad_norm(two_adapters.a)  # well above the default limit of 1
    for p in two_adapters.a:
        p.grad.mul_(scale)
    assert opt.step() == pytest.approx(10.0, rel=1e-5)
    assert grad_norm(two_adapters.a) == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_grads_raise_and_do_not_step(two_adapters: TwoAdapters, bad: float) -> None:
    opt = AdapterOptimizer(two_adapters.a, CONFIG)
    two_adapters.loss().backward()
    two_adapters.a[1].grad[0, 0] = bad
    before = snapshot(two_adapters.a)
    with pytest.raises(NonFiniteError, match="gradient norm"):
        opt.step()
    assert_same(two_adapters.a, before)
    assert opt.state_dict()["state"] == {}


def test_state_dict_round_trip_gives_identical_next_steps(two_adapters: TwoAdapters) -> None:
    opt = AdapterOptimizer(two_adapters.a, CONFIG)
    for _ in range(3):
        opt.zero_grad()
        two_adapters.loss().backward()
        opt.step()
    opt.zero_grad()
    two_adapters.loss().backward()
    grads = [p.grad.clone() for p in two_adapters.a]

    # A resumed copy: same weights, fresh optimizer, state loaded from the checkpoint.
    resumed = [nn.Parameter(p.detach().clone()) for p in two_adapters.a]
    resumed_opt = AdapterOptimizer(resumed, CONFIG)
    resumed_opt.load_state_dict(opt.state_dict())
    for p, g in zip(resumed, grads, strict=True):
        p.grad = g.clone()

    opt.step()
    resumed_opt.step()
    assert_same(resumed, snapshot(two_adapters.a))


def test_empty_parameter_list_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one parameter"):
        AdapterOptimizer([], CONFIG)


def test_state_dict_is_a_snapshot(two_adapters: TwoAdapters) -> None:
    opt = AdapterOptimizer(two_adapters.a, CONFIG)
    two_adapters.loss().backward()
    opt.step()
    saved = opt.state_dict()
    moment = saved["state"][0]["exp_avg"].clone()
    opt.step()  # a checkpoint being written must not see this step
    assert torch.equal(saved["state"][0]["exp_avg"], moment)
