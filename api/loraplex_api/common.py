"""Building blocks shared by both custom resources: camelCase models, conditions, quantities."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from .wire import API_VERSION, GROUP, VERSION

# Bounds that keep every list and string in the CRD schema finite (apiserver cost budget for CEL,
# and no unbounded objects in etcd).
NAME_MAX = 63
SHORT_STRING_MAX = 256
URI_MAX = 1024
MESSAGE_MAX = 32768

Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=NAME_MAX,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A DNS-1123 label.",
    ),
]

_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_SUFFIX = {
    None: 1,
    "m": 1e-3,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: str | int | float) -> int:
    """Turn a Kubernetes quantity ("24Gi", "1500M", 1024) into an integer number of units."""
    if isinstance(value, int | float):
        return int(value)
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 24Gi, 1500M, 1073741824)")
    return int(float(match["num"]) * _SUFFIX[match["suffix"]])


def _check_quantity(value: int | str) -> int | str:
    parse_quantity(value)
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$",
        }
    ),
]
Timestamp = Annotated[str, Field(max_length=64, description="RFC 3339 time.")]
LabelValue = Annotated[str, Field(max_length=SHORT_STRING_MAX)]


class CamelModel(BaseModel):
    """A model whose fields are camelCase on the wire and which rejects unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it is written to the API server: camelCase, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def camel_config(**overrides: Any) -> ConfigDict:
    """CamelModel's config with some settings changed (e.g. CEL rules in json_schema_extra)."""
    return ConfigDict(**{**CamelModel.model_config, **overrides})  # type: ignore[typeddict-item]


def cel_rules(*rules: dict[str, str]) -> JsonDict:
    """json_schema_extra carrying CEL validation rules for the generated CRD."""
    return {"x-kubernetes-validations": [dict(rule) for rule in rules]}


PRESERVE_OBJECT: JsonDict = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


class StatusModel(CamelModel):
    """Status is written by our own components; tolerate fields from newer versions."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ObjectMeta(BaseModel):
    """The part of metadata loraplex reads; everything else is kept as-is."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    name: Name
    namespace: str | None = Field(default=None, max_length=NAME_MAX)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    creation_timestamp: str | None = Field(default=None, alias="creationTimestamp")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(max_length=64)
    status: ConditionStatus
    reason: str = Field(default="", max_length=128)
    message: str = Field(default="", max_length=MESSAGE_MAX)
    last_transition_time: Timestamp | None = None
    observed_generation: int | None = None


CONDITIONS_FIELD: JsonDict = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def now_rfc3339() -> str:
    """Current time as Kubernetes writes timestamps (UTC, seconds, Z)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fixed(value: str) -> Any:
    """A field that must hold exactly ``value`` (apiVersion, kind), which it defaults to."""
    return Field(default=value, pattern=f"^{re.escape(value)}$")


class ConfigMapKeyRef(CamelModel):
    """A key of a ConfigMap in the experiment's namespace."""

    name: Name
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class SecretKeyRef(CamelModel):
    """A key of a Secret in the pool's namespace."""

    name: Name
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


def exactly_one(model: BaseModel, fields: tuple[str, ...]) -> None:
    """Raise unless exactly one of ``fields`` is set (the Python twin of the CEL one-of rules)."""
    present = [f for f in fields if getattr(model, f) is not None]
    if len(present) != 1:
        names = ", ".join(to_camel(f) for f in fields)
        got = ", ".join(to_camel(f) for f in present) or "none"
        raise ValueError(f"set exactly one of {names} (got {got})")


def one_of_rule(fields: tuple[str, ...], where: str) -> dict[str, str]:
    """The CEL rule that requires exactly one of ``fields`` (camelCase) to be present."""
    checks = ", ".join(f"has(self.{f})" for f in fields)
    return {
        "rule": f"[{checks}].filter(x, x).size() == 1",
        "message": f"{where}: set exactly one of {', '.join(fields)}",
    }


__all__ = [
    "API_VERSION",
    "CONDITIONS_FIELD",
    "CamelModel",
    "PRESERVE_OBJECT",
    "camel_config",
    "cel_rules",
    "Condition",
    "ConditionStatus",
    "ConfigMapKeyRef",
    "GROUP",
    "Name",
    "ObjectMeta",
    "Quantity",
    "StatusModel",
    "Timestamp",
    "LabelValue",
    "VERSION",
    "exactly_one",
    "fixed",
    "now_rfc3339",
    "one_of_rule",
    "parse_quantity",
]
