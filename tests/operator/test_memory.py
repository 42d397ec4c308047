"""Tests for the memory model: costs computed by hand for a tiny model."""

from __future__ import annotations

from typing import Any

import pytest

from loraplex_operator.memory import (
    ALL_LINEAR,
    ExperimentCost,
    LinearShape,
    ModelFacts,
    adapter_parameters,
    experiment_cost,
    format_bytes,
    kv_bytes_per_token,
    unknown_target_modules,
)

# Two layers, hidden size 64: q_proj 64->64, v_proj 64->16 (grouped KV), up_proj 64->128.
STATUS_MODEL: dict[str, Any] = {
    "parameterCount": 50_000,
    "hiddenSize": 64,
    "numLayers": 2,
    "linearModules": {
        "q_proj": {"in": 64, "out": 64, "count": 2},
        "v_proj": {"in": 64, "out": 16, "count": 2},
        "up_proj": {"in": 64, "out": 128, "count": 2},
    },
    "loraBytesPerRank": {"q_proj": 512, "v_proj": 320, "up_proj": 768},
}


@pytest.fixture
def facts() -> ModelFacts:
    parsed = ModelFacts.from_status(STATUS_MODEL)
    assert parsed is not None
    return parsed


def test_from_status_reads_the_camel_case_dict(facts: ModelFacts) -> None:
    assert facts.parameter_count == 50_000
    assert facts.hidden_size == 64
    assert facts.num_layers == 2
    assert facts.linear_modules["v_proj"] == LinearShape(in_features=64, out_features=16, count=2)
    assert set(facts.linear_modules) == {"q_proj", "v_proj", "up_proj"}


@pytest.mark.parametrize(
    "model",
    [
        None,
        {},
        {k: v for k, v in STATUS_MODEL.items() if k != "hiddenSize"},
        {k: v for k, v in STATUS_MODEL.items() if k != "numLayers"},
        {k: v for k, v in STATUS_MODEL.items() if k != "parameterCount"},
        {k: v for k, v in STATUS_MODEL.items() if k != "linearModules"},
        {**STATUS_MODEL, "linearModules": {}},
        {**STATUS_MODEL, "linearModules": {"q_proj": {"in": 64, "count": 2}}},
        {**STATUS_MODEL, "hiddenSize": None},
    ],
)
def test_from_status_gives_none_when_facts_are_incomplete(model: dict[str, Any] | None) -> None:
    assert ModelFacts.from_status(model) is None


def test_subset_of_modules_by_hand(facts: ModelFacts) -> None:
    # rank 8 * ((64+64)*2 + (64+16)*2) = 8 * 416
    assert adapter_parameters(facts, 8, ("q_proj", "v_proj")) == 3328
    cost = experiment_cost(
        facts,
        rank=8,
        target_modules=("q_proj", "v_proj"),
        prompts_per_step=2,
        group_size=4,
        max_prompt_tokens=10,
        max_new_tokens=6,
    )
    # 4 fp32 copies (weights, gradient, two Adam moments) of 4 bytes each
    assert cost.adapter_bytes == 3328 * 16
    # 2 * 4 rows of 16 tokens; per token K and V for 2 layers of width 64 in 2 bytes = 512
    assert kv_bytes_per_token(facts) == 512
    assert cost.rollout_bytes == 128 * 512
    assert cost == ExperimentCost(adapter_bytes=53_248, rollout_bytes=65_536)
    assert cost.total_bytes == 118_784


def test_all_linear_targets_every_module(facts: ModelFacts) -> None:
    # adds up_proj: (64+128)*2 = 384 per rank, so 800 per rank in all
    assert adapter_parameters(facts, 8, ALL_LINEAR) == 6400
    assert adapter_parameters(facts, 8, ALL_LINEAR) == adapter_parameters(
        facts, 8, ("q_proj", "v_proj", "up_proj")
    )
    cost = experiment_cost(
        facts,
        rank=8,
        target_modules=ALL_LINEAR,
        prompts_per_step=2,
        group_size=4,
        max_prompt_tokens=10,
        max_new_tokens=6,
    )
    assert cost.adapter_bytes == 102_400
    assert cost.rollout_bytes == 65_536


def test_cost_is_linear_in_rank(facts: ModelFacts) -> None:
    assert adapter_parameters(facts, 16, ("q_proj",)) == 2 * adapter_parameters(facts, 8, ("q_proj",))


def test_target_names_are_exact_suffixes(facts: ModelFacts) -> None:
    assert adapter_parameters(facts, 4, "q_proj") == adapter_parameters(facts, 4, ("q_proj",))
    assert adapter_parameters(facts, 4, ("q_proj", "q_proj")) == adapter_parameters(facts, 4, ("q_proj",))
    # the trainer resolves exact suffixes only, so a dotted path is not a module of the model
    assert unknown_target_modules(facts, ("self_attn.q_proj",)) == ("self_attn.q_proj",)


def test_unknown_target_modules_are_reported_and_cost_nothing(facts: ModelFacts) -> None:
    assert unknown_target_modules(facts, ("q_proj", "k_proj", "gate_proj")) == ("gate_proj", "k_proj")
    assert unknown_target_modules(facts, ALL_LINEAR) == ()
    assert adapter_parameters(facts, 8, ("q_proj", "k_proj")) == adapter_parameters(facts, 8, ("q_proj",))


def test_format_bytes() -> None:
    assert format_bytes(512) == "512B"
    assert format_bytes(1536) == "1.5KiB"
    assert format_bytes(3 * 1024**3) == "3.0GiB"
    assert format_bytes(2 * 1024**4) == "2.0TiB"
