"""Generate the CustomResourceDefinitions from the pydantic models (the models are the source of truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from .experiment import LoRAExperimentSpec, LoRAExperimentStatus
from .pool import SharedBasePoolSpec, SharedBasePoolStatus
from .wire import (
    EXPERIMENT_KIND,
    EXPERIMENT_PLURAL,
    EXPERIMENT_SHORT_NAMES,
    EXPERIMENT_SINGULAR,
    GROUP,
    POOL_KIND,
    POOL_PLURAL,
    POOL_SHORT_NAMES,
    POOL_SINGULAR,
    VERSION,
)

# Keys of JSON Schema 2020 that OpenAPI v3 structural schemas either lack or spell differently.
_DROP = {"title", "additionalProperties", "$defs"}
READY = '.status.conditions[?(@.type=="Ready")]'


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a resolved pydantic schema node into a structural OpenAPI v3 schema node."""
    node = dict(node)
    if "default" in node and node["default"] is None:
        del node["default"]
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            # The one union a structural schema allows, spelled as controller-gen spells it.
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            return {k: v for k, v in node.items() if k not in _DROP}
        if len(branches) == 1:
            return _structural({**branches[0], **node})
        elif branches:
            raise ValueError(f"a union of {[b.get('type') for b in branches]} is not structural: {node}")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node = {k: v for k, v in node.items() if k not in ("properties", "additionalProperties", "items")}
        node.setdefault("type", "object")
    elif node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"])
        return {k: v for k, v in node.items() if k not in _DROP - {"additionalProperties"}}
    if "properties" in node:
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _structural(node["items"])
    if node.get("type") == "array" and "maxItems" not in node:
        raise ValueError(f"every list needs maxItems: {node.get('description', node)}")
    return {k: v for k, v in node.items() if k not in _DROP}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})))


def spec_schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """A spec's schema with every default pydantic applies, so the API server stores what the trainer sees."""
    node = schema_of(model)
    _add_factory_defaults(model, node)
    return node


def _add_factory_defaults(model: type[BaseModel], node: dict[str, Any]) -> None:
    """Carry ``default_factory`` defaults into the schema; pydantic's JSON schema leaves them out.

    A nested model's default is ``{}``: the API server defaults top-down, so its own fields'
    defaults then fill it in. Empty lists and maps get none (absent and empty mean the same).
    """
    properties = node.get("properties") or {}
    for name, field in model.model_fields.items():
        sub = properties.get(field.alias or name)
        if sub is None:
            continue
        if field.default_factory is not None and "default" not in sub:
            value = field.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                sub["default"] = {}
            elif value:
                sub["default"] = value
        nested = _model_in(field.annotation)
        if nested is not None:
            _add_factory_defaults(nested, sub["items"] if sub.get("type") == "array" else sub)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, optionally, or as list items), if it holds one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _drop_defaults(node: Any) -> Any:
    """Status is written by controllers: no defaulting there, so kubectl shows what was really written."""
    if isinstance(node, dict):
        return {k: _drop_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_drop_defaults(v) for v in node]
    return node


def _crd(
    kind: str,
    plural: str,
    singular: str,
    short_names: tuple[str, ...],
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
    scale: dict[str, str] | None = None,
) -> dict[str, Any]:
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = scale
    openapi = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema_of(spec),
            "status": _drop_defaults(schema_of(status)),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "loraplex"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": ["loraplex"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi},
                }
            ],
        },
    }


def _col(name: str, path: str, type_: str = "string", priority: int = 0, **extra: str) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path, **extra}
    if priority:
        col["priority"] = priority
    return col


AGE = _col("Age", ".metadata.creationTimestamp", "date")


def pool_crd() -> dict[str, Any]:
    """The SharedBasePool CRD."""
    return _crd(
        POOL_KIND,
        POOL_PLURAL,
        POOL_SINGULAR,
        POOL_SHORT_NAMES,
        SharedBasePoolSpec,
        SharedBasePoolStatus,
        [
            _col("Model", ".spec.model.name"),
            _col("Desired", ".spec.replicas", "integer"),
            _col("Ready", ".status.readyReplicas", "integer"),
            _col("Slots", ".status.capacity.adapterSlots", "integer"),
            _col("Used", ".status.capacity.usedSlots", "integer"),
            _col("Pending", ".status.capacity.pendingExperiments", "integer"),
            _col("Serving", ".status.serving.readyReplicas", "integer", priority=1),
            _col("Status", f"{READY}.reason"),
            AGE,
        ],
        scale={
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    )


def experiment_crd() -> dict[str, Any]:
    """The LoRAExperiment CRD."""
    return _crd(
        EXPERIMENT_KIND,
        EXPERIMENT_PLURAL,
        EXPERIMENT_SINGULAR,
        EXPERIMENT_SHORT_NAMES,
        LoRAExperimentSpec,
        LoRAExperimentStatus,
        [
            _col("Pool", ".spec.poolRef.name"),
            _col("Status", ".status.phase"),
            _col("Ready", f"{READY}.status"),
            _col("Step", ".status.training.step", "integer"),
            _col("Progress", ".status.training.progressPercentage", "integer"),
            _col("Reward", '.status.training.metrics[?(@.name=="reward")].value'),
            _col("Promoted", ".status.adapter.promoted.revision"),
            AGE,
            _col("Rank", ".spec.lora.rank", "integer", priority=1),
            _col("Replica", ".status.placement.replica", priority=1),
            _col("Candidate", ".status.adapter.candidate.revision", priority=1),
        ],
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, as written to crds/."""
    return {f"{POOL_PLURAL}.yaml": pool_crd(), f"{EXPERIMENT_PLURAL}.yaml": experiment_crd()}


def render(crd: dict[str, Any]) -> str:
    """The YAML text of one CRD, stable across runs."""
    header = "# Generated by `loraplex crds` from loraplex_api; do not edit by hand.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=120)


def write_crds(output: Path) -> list[Path]:
    """Write every CRD into ``output``; return the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, crd in all_crds().items():
        path = output / filename
        path.write_text(render(crd))
        written.append(path)
    return written
