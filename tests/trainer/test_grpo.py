"""GRPO maths against small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex_trainer.grpo import group_advantages, per_token_loss, row_weights, token_logprobs


def test_advantages_scaled_by_group_std() -> None:
    # group 0: mean 1, centred [-1, -1, -1, 3], sample std sqrt(12 / 3) = 2
    # group 1: mean 2, centred [-1, 0, 1, 0],   sample std sqrt(2 / 3)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 4.0], [1.0, 2.0, 3.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0)
    s = math.sqrt(2 / 3)
    expected = torch.tensor([[-0.5, -0.5, -0.5, 1.5], [-1 / s, 0.0, 1 / s, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_advantages_eps_is_added_to_std() -> None:
    adv = group_advantages(torch.tensor([[0.0, 0.0, 0.0, 4.0]]), eps=1e-4)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, -1.0, -1.0, 3.0]]) / 2.0001)


def test_advantages_without_std_are_centred_rewards() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 4.0], [1.0, 2.0, 3.0, 2.0]])
    adv = group_advantages(rewards, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, -1.0, -1.0, 3.0], [-1.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_equal_rewards_give_zero_advantages(scale_by_std: bool) -> None:
    rewards = torch.tensor([[0.7, 0.7, 0.7], [0.0, 0.0, 0.0]])
    adv = group_advantages(rewards, scale_by_std=scale_by_std)
    assert torch.equal(adv, torch.zeros(2, 3))


def test_group_of_one_has_zero_advantage() -> None:
    assert torch.equal(group_advantages(torch.tensor([[3.0], [1.0]])), torch.zeros(2, 1))


def test_token_logprobs_match_log_softmax_values_and_gradients() -> None:
    torch.manual_seed(0)
    full = torch.randn(3, 6, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        ours_in = full.clone().requires_grad_(True)
        ref_in = full.clone().requires_grad_(True)
        # a shifted slice, as the trainer takes it, is not contiguous
        ours = token_logprobs(ours_in[:, :-1], tokens, temperature)
        ref = torch.log_softmax(ref_in[:, :-1] / temperature, dim=-1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(ours, ref.float())
        weights = torch.randn(3, 5, dtype=torch.float64)
        (ours.double() * weights).sum().backward()
        (ref * weights).sum().backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad)


def test_token_logprobs_of_bf16_logits_are_float32() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.75)]]), atol=1e-2, rtol=0)


def test_token_logprobs_reject_zero_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


def _ratios(*values: float) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.tensor([[math.log(v) for v in values]], requires_grad=True)
    return logprobs, torch.zeros_like(logprobs)


def test_clipping_with_positive_advantage() -> None:
    # ratios 0.5, 1.0, 1.5 with clip range [0.8, 1.3]; A = +1
    # min(r, clip(r)) = 0.5, 1.0, 1.3  -> loss -0.5, -1.0, -1.3; the 1.5 token is clipped
    logprobs, old = _ratios(0.5, 1.0, 1.5)
    loss, kl = per_token_loss(logprobs, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.3)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.3]]))
    assert torch.equal(kl, torch.zeros(1, 3))
    loss.sum().backward()
    # d(-r A)/d logp = -r A where unclipped, 0 where clipped
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -1.0, 0.0]]))


def test_clipping_with_negative_advantage() -> None:
    # A = -2: r A = -1, -2, -3; clip(r) A = -1.6, -2, -2.6; min = -1.6, -2, -3
    # so the 0.5 token is clipped (no gradient) and the 1.5 token is not.
    logprobs, old = _ratios(0.5, 1.0, 1.5)
    loss, _ = per_token_loss(logprobs, old, torch.tensor([-2.0]), clip_low=0.2, clip_high=0.3)
    torch.testing.assert_close(loss, torch.tensor([[1.6, 2.0, 3.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 3.0]]))


def test_kl_k3_values_are_added_to_the_loss() -> None:
    # delta = ref - logp: log 2 -> 2 - log 2 - 1 = 0.306853; 0 -> 0; -1 -> e^-1 + 1 - 1 = 0.367879
    logprobs = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2.0), 0.0, -1.0]])
    loss, kl = per_token_loss(
        logprobs, logprobs, torch.tensor([1.0]), clip_low=0.2, clip_high=0.2, ref_logprobs=ref, kl_coef=0.1
    )
    torch.testing.assert_close(kl, torch.tensor([[0.306853, 0.0, 0.367879]]))
    # ratio 1 and A = 1 give -1 per token before the penalty
    torch.testing.assert_close(loss, torch.tensor([[-1 + 0.0306853, -1.0, -1 + 0.0367879]]))


# Two experiments interleaved in one batch; 100 marks padding that the mask must hide.
#   a, row 0: tokens [1, 3]          sum 4,  mean 2
#   b, row 1: tokens [3, 3, 3]       sum 9,  mean 3
#   a, row 2: tokens [2, 2, 2, 6]    sum 12, mean 3
#   b, row 3: tokens [6]             sum 6,  mean 6
LOSS = torch.tensor(
    [[1.0, 3.0, 100.0, 100.0], [3.0, 3.0, 3.0, 100.0], [2.0, 2.0, 2.0, 6.0], [6.0, 100.0, 100.0, 100.0]]
)
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
GROUPS = ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    ("aggregation", "expected_a", "expected_b"),
    [
        ("token-mean", 16 / 6, 15 / 4),  # all tokens of the experiment
        ("seq-mean", (2 + 3) / 2, (3 + 6) / 2),  # mean of per-sequence means
        ("seq-mean-token-sum", (4 + 12) / 2, (9 + 6) / 2),  # mean of per-sequence sums
    ],
)
def test_row_weights_give_each_experiments_aggregate(
    aggregation: str, expected_a: float, expected_b: float
) -> None:
    w = row_weights(MASK, GROUPS, aggregation)
    per_row = w * (LOSS * MASK).sum(dim=1)
    assert per_row[[0, 2]].sum().item() == pytest.approx(expected_a)
    assert per_row[[1, 3]].sum().item() == pytest.approx(expected_b)


def test_row_weights_reject_unknown_aggregation() -> None:
    with pytest.raises(ValueError, match="lossAggregation: 'sum'"):
        row_weights(MASK, GROUPS, "sum")


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean", "seq-mean-token-sum"])
def test_micro_batches_sum_to_the_full_batch_loss_and_gradients(aggregation: str) -> None:
    torch.manual_seed(0)
    b, t, v = 6, 5, 7
    tokens = torch.randint(0, v, (b, t))
    mask = (torch.arange(t) < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).float()
    groups = ["x", "y", "x", "z", "y", "x"]
    advantages = torch.randn(b)
    init = torch.randn(b, t, v)
    with torch.no_grad():
        old = token_logprobs(init + 0.1 * torch.randn(b, t, v), tokens)
        ref = token_logprobs(init + 0.1 * torch.randn(b, t, v), tokens)
    weights = row_weights(mask, groups, aggregation)

    def loss_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        logprobs = token_logprobs(logits[rows], tokens[rows])
        loss, _ = per_token_loss(
            logprobs,
            old[rows],
            advantages[rows],
            clip_low=0.2,
            clip_high=0.28,
            ref_logprobs=ref[rows],
            kl_coef=0.05,
        )
        return (weights[rows, None] * loss * mask[rows]).sum()

    whole = init.clone().requires_grad_(True)
    full_loss = loss_of(whole, list(range(b)))
    full_loss.backward()

    split = init.clone().requires_grad_(True)
    micro_total = torch.zeros(())
    for rows in ([0, 3], [1, 5], [2], [4]):
        micro = loss_of(split, rows)
        micro.backward()
        micro_total += micro.detach()

    torch.testing.assert_close(micro_total, full_loss.detach())
    torch.testing.assert_close(split.grad, whole.grad)
