"""What a trainer replica writes to the API server, as merge-patch bodies built from plain data.

A replica writes only its own fields (docs/architecture.md, who writes what):
``status.training`` and ``status.adapter.candidate`` of the experiments placed on it, and
``status.model`` of its pool. Each patch here is a whole value of one of those fields, with
``None`` where a value is gone, so a JSON merge patch leaves nothing stale behind and never
touches the operator's fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraplex_api import AdapterRevision, TrainingStatus
from loraplex_api.experiment import MetricValue
from loraplex_api.pool import StorageSpec

from .experiment import Experiment, State

MESSAGE_LIMIT = 4096
"""Longer messages are cut: the API allows more, but a status is read by people in kubectl."""
ETA_WINDOW = 5
"""Steps averaged for the remaining-time estimate."""


def training_status(exp: Experiment, *, now: str) -> dict[str, Any]:
    """The ``status.training`` object of an experiment the trainer holds (camelCase, None = cleared)."""
    total = exp.total_steps
    done = exp.state is State.COMPLETED
    status = TrainingStatus(
        state=exp.state.value,
        step=exp.step,
        total_steps=total,
        progress_percentage=100 if done else min(100, (100 * exp.step) // max(total, 1)),
        estimated_remaining_seconds=0 if done else estimated_remaining_seconds(exp),
        last_heartbeat_time=now,
        metrics=[MetricValue.model_validate(m) for m in metric_values(exp)],
        message=_cut(exp.message),
    )
    return status.model_dump(by_alias=True, mode="json")


def loading_status(*, total_steps: int, message: str, now: str) -> dict[str, Any]:
    """The ``status.training`` object of an experiment whose adapter is not training yet."""
    status = TrainingStatus(
        state="Loading", total_steps=total_steps, last_heartbeat_time=now, message=_cut(message)
    )
    return status.model_dump(by_alias=True, mode="json")


def metric_values(exp: Experiment) -> list[dict[str, str]]:
    """The last step's mean reward, the latest eval reward, the last loss and the engine/trainer
    log-prob gap, as strings (for printer columns and kubectl)."""
    last = exp.history[-1] if exp.history else {}
    values = [
        ("reward", last.get("reward_mean")),
        ("eval_reward", exp.eval_reward),
        ("loss", last.get("loss")),
        ("logprob_diff_max", last.get("logprob_diff_max")),
    ]
    return [{"name": name, "value": format_metric(v)} for name, v in values if v is not None]


def format_metric(value: float) -> str:
    """Four significant digits: enough for a dashboard, short enough for a column."""
    return f"{float(value):.4g}"


def estimated_remaining_seconds(exp: Experiment) -> int | None:
    """Seconds left at the recent pace of this experiment's steps, or None before it has a pace."""
    if exp.state is not State.RUNNING or not exp.history:
        return None
    recent = [float(m.get("seconds", 0.0)) for m in exp.history[-ETA_WINDOW:]]
    per_step = sum(recent) / len(recent)
    remaining = max(exp.total_steps - exp.step, 0) * per_step
    return math.ceil(remaining) if math.isfinite(remaining) else None


def checkpoint_uri(checkpoint: Path, *, storage_root: Path, storage: StorageSpec) -> str:
    """Where a checkpoint lives, as other pods can find it.

    With a PVC the storage mount is ``claimName`` at ``subPath``, so the checkpoint is named by
    claim and path inside the claim; without one it lives in the pod (an emptyDir) and only a
    ``file://`` path can be given.
    """
    if not storage.claim_name:
        return f"file://{checkpoint}"
    relative = checkpoint.relative_to(storage_root).as_posix()
    sub_path = storage.sub_path.strip("/")
    inside = f"{sub_path}/{relative}" if sub_path else relative
    return f"pvc://{storage.claim_name}/{inside}"


def candidate_revision(
    checkpoint: Path, *, step: int, metric: float | None, storage_root: Path, storage: StorageSpec
) -> dict[str, Any]:
    """The ``status.adapter.candidate`` object for a checkpoint folder (``step-00000010``)."""
    revision = AdapterRevision(
        revision=checkpoint.name,
        uri=checkpoint_uri(checkpoint, storage_root=storage_root, storage=storage),
        step=step,
        metric=metric if metric is not None and math.isfinite(metric) else None,
    )
    return revision.model_dump(by_alias=True, mode="json")


def experiment_status_patch(
    training: Mapping[str, Any] | None = None, candidate: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The body of one merge patch to an experiment's status subresource."""
    status: dict[str, Any] = {}
    if training is not None:
        status["training"] = dict(training)
    if candidate is not None:
        status["adapter"] = {"candidate": dict(candidate)}
    return {"status": status}


def pool_model_patch(current: Mapping[str, Any] | None, model: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that makes a pool's ``status.model`` exactly ``model``.

    A merge patch merges maps, so keys of a previous model (a module this one lacks) are
    deleted explicitly with None.
    """
    return {"status": {"model": replacing(current or {}, model)}}


def replacing(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new``, with None for every key (at any depth of nested maps) that only ``current`` has."""
    result: dict[str, Any] = {}
    for key, value in new.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            result[key] = replacing(old, value)
        else:
            result[key] = value
    for key in current:
        if key not in new:
            result[key] = None
    return result


def _cut(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 1] + "…"
