"""Reading manifests: YAML files with one or many documents -> typed resources or precise errors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .common import parse_quantity
from .experiment import LoRAExperiment, LoRAExperimentSpec
from .pool import SharedBasePool
from .wire import API_VERSION, EXPERIMENT_KIND, GROUP, POOL_KIND
from .yaml_documents import DocumentError, load_documents

Resource = SharedBasePool | LoRAExperiment
_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*|\[\d+\])*$")
KINDS: dict[str, type[SharedBasePool] | type[LoRAExperiment]] = {
    POOL_KIND: SharedBasePool,
    EXPERIMENT_KIND: LoRAExperiment,
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one manifest, phrased as `Kind/name: field.path: what is wrong`."""

    kind: str
    name: str
    path: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.kind}/{self.name}: {where}{self.message}"


@dataclass(frozen=True)
class Manifest:
    """A validated resource and the file it came from (relative dataset/reward paths resolve there)."""

    resource: Resource
    source: Path


class ManifestError(ValueError):
    """Raised with every problem found, so a user fixes them all in one round."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def rank_problem(name: str, rank: int, pool: SharedBasePool) -> Problem | None:
    """An experiment's adapter rank above its pool's ``capacity.maxLoRARank``, as a Problem; None when it fits."""
    limit = pool.spec.capacity.max_lora_rank
    if rank <= limit:
        return None
    message = f"{rank} exceeds pool {pool.metadata.name} capacity.maxLoRARank {limit}"
    return Problem(EXPERIMENT_KIND, name, "spec.lora.rank", message)


def reward_memory_problems(name: str, spec: LoRAExperimentSpec, pool: SharedBasePool) -> list[Problem]:
    """Python rewards asking for more memory than the pool's ``trainer.rewardLimits.maxMemory``."""
    limit = pool.spec.trainer.reward_limits.max_memory
    sources = [("spec.reward.python", spec.reward.python)]
    sources += [(f"spec.reward.terms[{i}].python", t.python) for i, t in enumerate(spec.reward.terms or [])]
    problems = []
    for where, python in sources:
        if (
            python is not None
            and python.memory is not None
            and parse_quantity(python.memory) > parse_quantity(limit)
        ):
            message = (
                f"{python.memory} exceeds pool {pool.metadata.name} trainer.rewardLimits.maxMemory {limit}"
            )
            problems.append(Problem(EXPERIMENT_KIND, name, f"{where}.memory", message))
    return problems


def field_path(loc: Iterable[int | str]) -> str:
    """Render a pydantic error location as a Kubernetes field path: spec.lora.targetModules[0]."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems_from(error: ValidationError, kind: str, name: str, source: str) -> list[Problem]:
    problems = []
    for err in error.errors():
        # Union branches and validators add their own names to the location; keep only field names.
        loc = [p for p in err["loc"] if isinstance(p, int) or not p.startswith(("function-", "union["))]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "required field is missing"
        elif (
            "input" in err
            and err["type"] not in ("value_error",)
            and not isinstance(err["input"], dict | list)
        ):
            message = f"{message} (got {err['input']!r})"
        path = field_path(loc)
        # Cross-field validators phrase messages as "field.path: problem" relative to their model.
        head, sep, rest = message.partition(": ")
        if sep and _FIELD.match(head):
            if not path.endswith(head):
                path = f"{path}.{head}" if path else head
            message = rest
        problems.append(Problem(kind, name, path, message, source))
    return problems


def parse_document(doc: Any, source: str = "<input>") -> Resource:
    """Validate one decoded YAML document as a loraplex resource, or raise ManifestError."""
    if not isinstance(doc, dict):
        raise ManifestError(
            [Problem("?", "?", "", f"document is a {type(doc).__name__}, not a mapping", source)]
        )
    kind = str(doc.get("kind", "?"))
    name = str((doc.get("metadata") or {}).get("name", "?")) if isinstance(doc.get("metadata"), dict) else "?"
    if doc.get("apiVersion") != API_VERSION:
        raise ManifestError(
            [
                Problem(
                    kind, name, "apiVersion", f"must be {API_VERSION} (got {doc.get('apiVersion')!r})", source
                )
            ]
        )
    model = KINDS.get(kind)
    if model is None:
        raise ManifestError(
            [Problem(kind, name, "kind", f"must be one of {', '.join(KINDS)} (got {kind!r})", source)]
        )
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(_problems_from(exc, kind, name, source)) from None


def load_manifests(paths: Sequence[str | Path]) -> list[Manifest]:
    """Read every document of every file; raise one ManifestError listing all problems."""
    manifests: list[Manifest] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        files = (
            sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        )
        for file in files:
            try:
                docs = load_documents(file.read_bytes())
            except OSError as exc:
                problems.append(Problem("File", str(file), "", f"cannot read: {exc.strerror}", str(file)))
                continue
            except DocumentError as exc:
                problems.append(Problem("File", str(file), "", str(exc), str(file)))
                continue
            for doc in docs:
                if doc is None:
                    continue
                if isinstance(doc, dict) and not str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"):
                    continue  # other kinds (ConfigMaps, Namespaces) may sit in the same file
                try:
                    manifests.append(Manifest(parse_document(doc, str(file)), file.resolve()))
                except ManifestError as exc:
                    problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return manifests
