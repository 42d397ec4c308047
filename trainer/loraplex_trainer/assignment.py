"""Which experiments a trainer replica should host: pure functions of what the API server says.

A LoRAExperiment is this replica's to train when all of these hold:

- the operator placed it here: ``status.placement`` names this pool and replica, and the
  ``loraplex.dev/replica`` label says the same (the operator writes the two in separate
  requests, so the agent waits for both rather than act on half a placement);
- it is not being deleted and ``spec.suspend`` is false;
- it has not finished: no ``Succeeded``/``Failed`` phase or condition, and no ``Completed``
  or ``Failed`` training report written for the current placement (a restarted replica must
  not train a finished experiment again while the operator catches up).

The agent compares that list with what it hosts (:func:`plan`): new names are added, names
no longer listed are removed, and a name whose uid or training spec changed is replaced
(removed, then added again; it resumes from its newest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from loraplex_api import AdapterRevision, LoRAExperiment, LoRAExperimentSpec, TrainingStatus
from loraplex_api.experiment import DataSource, PythonReward
from loraplex_api.wire import REPLICA_LABEL

# The spec fields that change what the adapter learns. A change to any other field (promotion
# pins, priority, deadlines) must not reload an adapter that is training.
TRAINING_FIELDS = frozenset(
    {"lora", "dataset", "reward", "algorithm", "optimizer", "evaluation", "checkpoint"}
)
FINISHED = ("Succeeded", "Failed")
FINISHED_TRAINING = ("Completed", "Failed")


@dataclass(frozen=True)
class Assignment:
    """An experiment the API server says this replica should be training."""

    name: str
    uid: str | None
    spec: LoRAExperimentSpec
    fingerprint: str
    """A digest of the training fields of the spec: a change means the adapter must be reloaded."""
    candidate: AdapterRevision | None = None
    """What ``status.adapter.candidate`` says already, so a restarted replica does not write it again."""
    pinned: frozenset[str] = frozenset()
    """The revisions (checkpoint folder names) that candidate, promoted and previous point to."""

    @property
    def key(self) -> tuple[str | None, str]:
        """What must stay the same for a hosted adapter to go on training."""
        return (self.uid, self.fingerprint)


@dataclass(frozen=True)
class Selection:
    """The outcome of reading a list of LoRAExperiments."""

    assigned: list[Assignment]
    invalid: dict[str, str] = field(default_factory=dict)
    """name -> why its object could not be read (the operator reports such specs as InvalidSpec)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """name -> why an experiment in the list is not this replica's to train (for the logs)."""


@dataclass(frozen=True)
class Plan:
    """What to change in the trainer so that it hosts exactly the assigned experiments."""

    remove: dict[str, str]
    """name -> why it goes."""
    add: list[Assignment]


def select(objects: Iterable[Mapping[str, Any]], *, pool: str, replica: str) -> Selection:
    """Pick the experiments placed on ``replica`` of ``pool`` that should be training now."""
    assigned: list[Assignment] = []
    invalid: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for raw in objects:
        name = str(raw.get("metadata", {}).get("name", ""))
        reason = not_placed_here(raw, pool=pool, replica=replica)
        if reason is not None:
            skipped[name] = reason
            continue
        try:
            exp = LoRAExperiment.model_validate(raw)
        except ValidationError as exc:
            invalid[name] = _first_error(exc)
            continue
        if exp.spec.suspend:
            skipped[name] = "spec.suspend is true"
            continue
        if finished(exp):
            skipped[name] = "finished"
            continue
        assigned.append(
            Assignment(
                name=name,
                uid=exp.metadata.uid,
                spec=exp.spec,
                fingerprint=fingerprint(exp.spec),
                candidate=exp.status.adapter.candidate if exp.status.adapter else None,
                pinned=pinned_revisions(exp),
            )
        )
    return Selection(sorted(assigned, key=lambda a: a.name), invalid, skipped)


def pinned_revisions(exp: LoRAExperiment) -> frozenset[str]:
    """Checkpoint folders the experiment's status points to: pruning must keep them."""
    adapter = exp.status.adapter
    if adapter is None:
        return frozenset()
    return frozenset(
        r.revision for r in (adapter.candidate, adapter.promoted, adapter.previous) if r is not None
    )


def not_placed_here(raw: Mapping[str, Any], *, pool: str, replica: str) -> str | None:
    """Why a raw LoRAExperiment is not placed on this replica (None when it is)."""
    meta = raw.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "being deleted"
    label = (meta.get("labels") or {}).get(REPLICA_LABEL)
    placement = (raw.get("status") or {}).get("placement") or {}
    where = f"{placement.get('pool')}/{placement.get('replica')}"
    if placement.get("replica") != replica or placement.get("pool") != pool:
        return f"placed on {where}" if placement else "not placed"
    if label != replica:
        return f"label {REPLICA_LABEL} is {label!r}"
    return None


def finished(exp: LoRAExperiment) -> bool:
    """Whether the experiment is over, as the operator or this placement's trainer reported it."""
    status = exp.status
    if status.phase in FINISHED:
        return True
    if any(c.type in FINISHED and c.status == "True" for c in status.conditions):
        return True
    return _finished_here(status.training, status.placement.placed_at if status.placement else None)


def _finished_here(training: TrainingStatus | None, placed_at: str | None) -> bool:
    """A Completed/Failed report counts only when it was written since the current placement."""
    if training is None or training.state not in FINISHED_TRAINING:
        return False
    heartbeat, placed = _parse_time(training.last_heartbeat_time), _parse_time(placed_at)
    return heartbeat is None or placed is None or heartbeat >= placed


def fingerprint(spec: LoRAExperimentSpec) -> str:
    """A short digest of the fields of ``spec`` that shape the adapter's training."""
    wire = spec.model_dump(by_alias=False, mode="json", include=set(TRAINING_FIELDS))
    text = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(
    assigned: Sequence[Assignment],
    hosted: Mapping[str, tuple[str | None, str]],
    skipped: Mapping[str, str] | None = None,
) -> Plan:
    """Compare the assigned experiments with the hosted ones (name -> Assignment.key).

    A hosted experiment that finished stays hosted while it is still assigned, so it is not
    trained again before the operator marks it Succeeded or Failed. ``skipped`` (from
    :func:`select`) only explains removals.
    """
    wanted = {a.name: a for a in assigned}
    remove: dict[str, str] = {}
    for name, (uid, digest) in sorted(hosted.items()):
        if name not in wanted:
            remove[name] = (skipped or {}).get(name, "no longer listed")
        elif wanted[name].uid != uid:
            remove[name] = "recreated (new uid)"
        elif wanted[name].fingerprint != digest:
            remove[name] = "training spec changed"
    add = [a for a in assigned if a.name not in hosted or a.name in remove]
    return Plan(remove=remove, add=add)


def config_map_refs(spec: LoRAExperimentSpec) -> list[tuple[str, str, str]]:
    """Every ConfigMap key the experiment reads, as (name, key, spec field), in spec order."""
    refs: list[tuple[str, str, str]] = []

    def data(source: DataSource | None, where: str) -> None:
        if source is not None and source.config_map is not None:
            refs.append((source.config_map.name, source.config_map.key, f"{where}.configMap"))

    def python(reward: PythonReward | None, where: str) -> None:
        if reward is not None and reward.config_map is not None:
            refs.append((reward.config_map.name, reward.config_map.key, f"{where}.python.configMap"))

    data(spec.dataset, "spec.dataset")
    data(spec.dataset.eval, "spec.dataset.eval")
    python(spec.reward.python, "spec.reward")
    for i, term in enumerate(spec.reward.terms or []):
        python(term.python, f"spec.reward.terms[{i}]")
    return refs


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" + (f" ({exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
