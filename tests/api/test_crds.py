"""The generated CRDs: in sync with the models, structural, bounded, and their CEL rules agree with pydantic."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from loraplex_api import ManifestError, parse_document
from loraplex_api.crdgen import all_crds, render

from .test_models import EXPERIMENT, POOL, with_spec

ROOT = Path(__file__).resolve().parents[2]


def openapi(filename: str) -> dict[str, Any]:
    return all_crds()[filename]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crds_match_the_command_output(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "loraplex_cli", "crds", "--output", str(tmp_path)],
        check=True,
        cwd=ROOT,
        # Only the API and the command: generating CRDs needs neither the operator nor the trainer.
        env={"PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("api", "cli"))},
        capture_output=True,
    )
    for filename in all_crds():
        generated = (tmp_path / filename).read_text()
        checked_in = (ROOT / "crds" / filename).read_text()
        assert checked_in == generated, f"crds/{filename} is stale: run `loraplex crds --output crds/`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if (
            "type" in node
            or "x-kubernetes-int-or-string" in node
            or "x-kubernetes-preserve-unknown-fields" in node
        ):
            out.append((path, node))
        for key in ("properties",):
            for name, child in node.get(key, {}).items():
                out += _walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("filename", ["sharedbasepools.yaml", "loraexperiments.yaml"])
def test_schema_is_structural_and_bounded(filename: str) -> None:
    for path, node in _walk(openapi(filename)):
        if path in ("", ".metadata", ".apiVersion", ".kind"):
            continue
        assert "$ref" not in node and "title" not in node, path
        if "anyOf" in node:  # the only union a structural schema allows
            assert node.get("x-kubernetes-int-or-string") is True, path
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: list without maxItems"
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: string without maxLength"
        if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, f"{path}: map without maxProperties"


def test_subresources_short_names_and_columns() -> None:
    pool, exp = all_crds()["sharedbasepools.yaml"], all_crds()["loraexperiments.yaml"]
    assert pool["spec"]["names"]["shortNames"] == ["sbp"]
    assert exp["spec"]["names"]["shortNames"] == ["lexp"]
    version = pool["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model",
        "Desired",
        "Ready",
        "Slots",
        "Used",
        "Pending",
        "Serving",
        "Status",
        "Age",
    ]
    serving = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Serving")
    assert serving["jsonPath"] == ".status.serving.readyReplicas" and serving["priority"] == 1  # -o wide
    columns = exp["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Pool",
        "Status",
        "Ready",
        "Step",
        "Progress",
        "Reward",
        "Promoted",
        "Age",
    ]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Rank", "Replica", "Candidate"]
    assert all("[-1:]" not in c["jsonPath"] for c in columns)


def _rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, rule) for rule in schema.get("x-kubernetes-validations", [])]
    for name, child in schema.get("properties", {}).items():
        found += _rules(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        found += _rules(schema["items"], f"{path}[]")
    return found


def _at(obj: Any, path: str) -> list[Any]:
    """Every value at a schema path like spec.reward.terms[] inside a manifest."""
    values = [obj]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part.removesuffix("[]")
        values = [v[key] for v in values if isinstance(v, dict) and key in v]
        if many:
            values = [item for v in values for item in v]
    return values


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: top-down, a default object then filled in."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, child in schema["properties"].items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = apply_defaults(child, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def cel_violations(doc: dict[str, Any], filename: str) -> list[str]:
    """Evaluate every CEL rule of the CRD against a manifest, as the API server would: after defaulting."""
    env = celpy.Environment()
    failed = []
    doc = apply_defaults(openapi(filename), doc)
    for path, rule in _rules(openapi(filename)):
        program = env.program(env.compile(rule["rule"]))
        for value in _at(doc, path):
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                failed.append(rule["message"])
    return failed


CROSS_FIELD_CASES = [
    (
        "loraexperiments.yaml",
        with_spec(EXPERIMENT, "dataset", {"builtin": {"name": "arithmetic"}, "file": "a.jsonl"}),
    ),
    (
        "loraexperiments.yaml",
        with_spec(
            EXPERIMENT,
            "dataset",
            {"inline": [{"prompt": "p", "answer": "a"}], "evalFraction": 0.2, "eval": {"file": "e.jsonl"}},
        ),
    ),
    ("loraexperiments.yaml", with_spec(EXPERIMENT, "lora", {"targetModules": ["all-linear", "q_proj"]})),
    (
        "loraexperiments.yaml",
        with_spec(EXPERIMENT, "reward", {"builtin": {"name": "exact_match"}, "http": {"url": "http://r"}}),
    ),
    (
        "loraexperiments.yaml",
        with_spec(
            EXPERIMENT, "reward", {"terms": [{"builtin": {"name": "length"}, "python": {"file": "r.py"}}]}
        ),
    ),
    (
        "loraexperiments.yaml",
        with_spec(EXPERIMENT, "reward", {"python": {"file": "r.py", "configMap": {"name": "c", "key": "k"}}}),
    ),
    ("sharedbasepools.yaml", with_spec(POOL, "autoscaling", {"minReplicas": 4, "maxReplicas": 2})),
]


def _rule_nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, rule, the schema node that carries it) for every CEL rule."""
    found = [(path, rule, schema) for rule in schema.get("x-kubernetes-validations", [])]
    for name, child in schema.get("properties", {}).items():
        found += _rule_nodes(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        found += _rule_nodes(schema["items"], f"{path}[]")
    return found


@pytest.mark.parametrize("filename", ["loraexperiments.yaml", "sharedbasepools.yaml"])
def test_every_cel_rule_evaluates_on_an_object_that_omits_every_optional_field(filename: str) -> None:
    # The API server runs the rules after applying the schema's defaults, on what was sent: a rule
    # that reads an optional field with no default and no has() fails with "no such key" for every
    # manifest that leaves the field out.
    env = celpy.Environment()
    for path, rule, node in _rule_nodes(openapi(filename)):
        defaulted = {k: v["default"] for k, v in node.get("properties", {}).items() if "default" in v}
        program = env.program(env.compile(rule["rule"]))
        try:
            result = program.evaluate({"self": celpy.json_to_cel(defaulted)})
        except celpy.CELEvalError as exc:
            pytest.fail(f"{path}: {rule['rule']!r} cannot be evaluated without its optional fields: {exc}")
        assert isinstance(result, celpy.celtypes.BoolType), (path, rule["rule"], result)


def _without_empty(value: Any) -> Any:
    """Absent, empty and null mean the same in a manifest."""
    if isinstance(value, dict):
        kept = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in ({}, [], None)}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("filename", "doc"), [("loraexperiments.yaml", EXPERIMENT), ("sharedbasepools.yaml", POOL)]
)
def test_the_api_server_stores_every_default_pydantic_applies(filename: str, doc: dict[str, Any]) -> None:
    # `kubectl get -o yaml` must show the spec the trainer and operator act on, lists and nested
    # objects included (targetModules, betas, algorithm...), not only the scalar defaults.
    stored = apply_defaults(openapi(filename), doc)["spec"]
    parsed = parse_document(doc).spec  # type: ignore[union-attr]
    assert _without_empty(stored) == _without_empty(parsed.model_dump(by_alias=True, mode="json"))


def test_a_lora_block_without_target_modules_passes_cel() -> None:
    doc = with_spec(EXPERIMENT, "lora", {"rank": 8})
    assert cel_violations(doc, "loraexperiments.yaml") == []
    assert parse_document(doc).spec.lora.targets == "all-linear"  # type: ignore[union-attr]


@pytest.mark.parametrize(("filename", "doc"), CROSS_FIELD_CASES)
def test_cel_rules_and_pydantic_reject_the_same_manifests(filename: str, doc: dict[str, Any]) -> None:
    assert cel_violations(doc, filename), "the API server would have accepted this manifest"
    with pytest.raises(ManifestError):
        parse_document(doc)


def _examples() -> list[dict[str, Any]]:
    docs = []
    for file in sorted((ROOT / "examples").rglob("*.yaml")):
        docs += [
            d
            for d in yaml.safe_load_all(file.read_text())
            if d and d.get("apiVersion", "").startswith("loraplex")
        ]
    return docs


@pytest.mark.parametrize("doc", [POOL, EXPERIMENT, *_examples()], ids=lambda d: d["metadata"]["name"])
def test_valid_manifests_pass_schema_cel_and_pydantic(doc: dict[str, Any]) -> None:
    filename = {"SharedBasePool": "sharedbasepools.yaml", "LoRAExperiment": "loraexperiments.yaml"}[
        doc["kind"]
    ]
    schema = copy.deepcopy(openapi(filename))
    jsonschema.Draft4Validator(schema).validate(doc)
    jsonschema.Draft4Validator(schema).validate(apply_defaults(schema, doc))
    assert cel_violations(doc, filename) == []
    parse_document(doc)


def test_schema_rejects_what_it_can_see() -> None:
    schema = openapi("loraexperiments.yaml")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(with_spec(EXPERIMENT, "lora.rank", 0))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(
            with_spec(EXPERIMENT, "algorithm.lossAggregation", "mean")
        )


def test_render_is_stable() -> None:
    crd = all_crds()["loraexperiments.yaml"]
    assert render(crd) == render(copy.deepcopy(crd))
