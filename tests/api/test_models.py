"""The resource models: defaults, ranges, enums and cross-field rules, with errors that name the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from loraplex_api import LoRAExperiment, ManifestError, SharedBasePool, parse_document, parse_quantity

POOL: dict[str, Any] = {
    "apiVersion": "loraplex.dev/v1alpha1",
    "kind": "SharedBasePool",
    "metadata": {"name": "smollm2"},
    "spec": {"model": {"name": "smollm2", "uri": "builtin://smollm2-135m-instruct"}},
}
EXPERIMENT: dict[str, Any] = {
    "apiVersion": "loraplex.dev/v1alpha1",
    "kind": "LoRAExperiment",
    "metadata": {"name": "arith"},
    "spec": {
        "poolRef": {"name": "smollm2"},
        "dataset": {"builtin": {"name": "arithmetic"}},
        "reward": {"builtin": {"name": "numeric_match"}},
    },
}


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_document(doc)
    return [str(p) for p in info.value.problems]


def with_spec(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out["spec"]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def test_minimal_manifests_get_design_defaults() -> None:
    pool = parse_document(POOL)
    assert isinstance(pool, SharedBasePool)
    assert pool.spec.replicas == 1
    assert pool.spec.capacity.max_lora_rank == 64
    assert pool.spec.trainer.rollout_engine == "auto"
    exp = parse_document(EXPERIMENT)
    assert isinstance(exp, LoRAExperiment)
    assert exp.spec.lora.targets == "all-linear"
    assert exp.spec.algorithm.loss_aggregation == "token-mean"
    assert exp.spec.dataset.prompt_field == "prompt"
    assert exp.spec.promotion.policy == "Manual"


def test_wire_form_is_camel_case_and_round_trips() -> None:
    pool = parse_document(with_spec(POOL, "capacity", {"maxLoRARank": 32, "adapterMemoryBudget": "2Gi"}))
    wire = pool.wire()
    assert wire["spec"]["capacity"]["maxLoRARank"] == 32
    assert "max_lora_rank" not in str(wire)
    assert parse_document(wire) == pool
    assert pool.spec.capacity.adapter_memory_budget_bytes == 2 * 2**30


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            with_spec(EXPERIMENT, "lora.rank", 0),
            "LoRAExperiment/arith: spec.lora.rank: Input should be greater",
        ),
        (with_spec(EXPERIMENT, "lora.rnak", 8), "LoRAExperiment/arith: spec.lora.rnak: unknown field"),
        (
            with_spec(EXPERIMENT, "algorithm.lossAggregation", "mean"),
            "LoRAExperiment/arith: spec.algorithm.lossAggregation: Input should be 'token-mean'",
        ),
        (
            with_spec(EXPERIMENT, "dataset", {"builtin": {"name": "arithmetic"}, "file": "a.jsonl"}),
            "LoRAExperiment/arith: spec.dataset: set exactly one of builtin, inline, file, configMap (got builtin, file)",
        ),
        (
            with_spec(EXPERIMENT, "reward", {"builtin": {"name": "regex_match"}}),
            "LoRAExperiment/arith: spec.reward.builtin.args.pattern: required by the regex_match reward",
        ),
        (
            with_spec(EXPERIMENT, "reward", {"builtin": {"name": "format", "args": {"pattern": "("}}}),
            "LoRAExperiment/arith: spec.reward.builtin.args.pattern: '(' is not accepted by the linear-time "
            "RE2 engine: missing ): (",
        ),
        (
            with_spec(
                EXPERIMENT, "reward", {"builtin": {"name": "regex_match", "args": {"pattern": r"(a)\1"}}}
            ),
            "LoRAExperiment/arith: spec.reward.builtin.args.pattern: '(a)\\\\1' is not accepted by the linear-time RE2 engine: "
            "invalid escape sequence: \\1 (backreferences and lookarounds are not supported)",
        ),
        (
            with_spec(
                EXPERIMENT,
                "reward",
                {"terms": [{"weight": 1, "builtin": {"name": "format", "args": {"pattern": "(?=x)"}}}]},
            ),
            "LoRAExperiment/arith: spec.reward.terms[0].builtin.args.pattern: '(?=x)' is not accepted by the linear-time RE2 engine",
        ),
        (
            with_spec(EXPERIMENT, "reward", {"builtin": {"name": "format", "args": {"pattern": 7}}}),
            "LoRAExperiment/arith: spec.reward.builtin.args.pattern: 7 is not a string",
        ),
        (
            with_spec(EXPERIMENT, "lora.targetModules", ["all-linear", "q_proj"]),
            "LoRAExperiment/arith: spec.lora.targetModules: 'all-linear' cannot be combined",
        ),
        (
            with_spec(EXPERIMENT, "optimizer.betas", [0.9, 1.5]),
            "LoRAExperiment/arith: spec.optimizer.betas[1]: 1.5 must be in [0, 1)",
        ),
        (
            with_spec(
                EXPERIMENT,
                "dataset",
                {"builtin": {"name": "arithmetic"}, "evalFraction": 0.1, "eval": {"file": "e.jsonl"}},
            ),
            "LoRAExperiment/arith: spec.dataset.eval: set evalFraction or eval, not both",
        ),
        (
            with_spec(POOL, "autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
            "SharedBasePool/smollm2: spec.autoscaling: minReplicas 5 must be <= maxReplicas 2",
        ),
        (
            with_spec(POOL, "model", {"name": "x", "uri": "s3://bucket/model"}),
            "SharedBasePool/smollm2: spec.model.uri: String should match pattern",
        ),
        (
            with_spec(POOL, "trainer", {"rewardLimits": {"memory": "16Gi", "maxMemory": "8Gi"}}),
            "SharedBasePool/smollm2: spec.trainer.rewardLimits.memory: 16Gi exceeds maxMemory 8Gi",
        ),
        (
            with_spec(POOL, "capacity", {"adapterMemoryBudget": "lots"}),
            "SharedBasePool/smollm2: spec.capacity.adapterMemoryBudget: 'lots' is not a Kubernetes quantity",
        ),
    ],
)
def test_bad_specs_name_the_field(doc: dict[str, Any], expected: str) -> None:
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_missing_required_field_and_wrong_kind() -> None:
    doc = copy.deepcopy(EXPERIMENT)
    del doc["spec"]["reward"]
    assert problems(doc) == ["LoRAExperiment/arith: spec.reward: required field is missing"]
    assert problems({**EXPERIMENT, "kind": "Experiment"})[0].startswith(
        "Experiment/arith: kind: must be one of"
    )
    assert problems({**EXPERIMENT, "apiVersion": "v1"})[0].startswith(
        "LoRAExperiment/arith: apiVersion: must be"
    )


def test_reward_terms_validate_each_term() -> None:
    doc = with_spec(
        EXPERIMENT, "reward", {"terms": [{"weight": 0.5, "builtin": {"name": "length"}}, {"weight": 1}]}
    )
    assert problems(doc) == [
        "LoRAExperiment/arith: spec.reward.terms[1]: set exactly one of builtin, python, http (got none)"
    ]


@pytest.mark.parametrize(
    ("text", "value"), [("1Gi", 2**30), ("1500M", 1_500_000_000), (1024, 1024), ("0.5Ki", 512)]
)
def test_parse_quantity(text: str | int, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2.5-7B-Instruct", "smollm2-135m-instruct", "meta-llama/Llama-3.1-8B"]
)
def test_model_names_may_be_hugging_face_names(name: str) -> None:
    pool = parse_document(with_spec(POOL, "model", {"name": name, "uri": "builtin://smollm2-135m-instruct"}))
    assert pool.spec.model.name == name  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["", "has space", "-leading", "trailing/", "tab\there", "x" * 254])
def test_model_names_stay_bounded_and_plain(name: str) -> None:
    assert problems(with_spec(POOL, "model", {"name": name, "uri": "builtin://smollm2-135m-instruct"}))
