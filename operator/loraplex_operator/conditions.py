"""Condition maths: set a condition without losing its transition time, and derive phase and summaries.

Conditions follow ``metav1.Condition``: ``lastTransitionTime`` moves only when
``status`` changes, every condition carries the ``observedGeneration`` it was
computed for, and a resource's display ``phase`` and its ``Ready`` summary are
functions of its other conditions, never stored state of their own.

Two more summary conditions, ``Reconciling`` and ``Stalled``, are the ones
kstatus (Flux, kpt, ``kubectl wait --for=condition``) reads: without them
kstatus calls every resource "Current" as soon as ``observedGeneration``
catches up. They are "abnormal-true": present and True only while the resource
is on its way (``Reconciling``) or stuck until a person acts (``Stalled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraplex_api import Condition
from loraplex_api.common import ConditionStatus
from loraplex_api.experiment import Phase

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"

# Experiment conditions.
PLACED = "Placed"
TRAINING = "Training"
SUSPENDED = "Suspended"
PROMOTED = "Promoted"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

# Pool conditions.
PROVISIONED = "Provisioned"
REPLICA_FAILURE = "ReplicaFailure"
MODEL_AVAILABLE = "ModelAvailable"


@dataclass(frozen=True)
class Want:
    """A condition as a decision states it: the timestamps and generation are filled in by :func:`set_condition`."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of this type, or None."""
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    """Whether the condition is present with status True."""
    condition = find(conditions, type_)
    return condition is not None and condition.status == "True"


def set_condition(
    conditions: Sequence[Condition], want: Want, *, generation: int | None, now: str
) -> list[Condition]:
    """Return ``conditions`` with ``want`` applied; lastTransitionTime moves only when the status changes."""
    old = find(conditions, want.type)
    transition = now if old is None or old.status != want.status else old.last_transition_time or now
    new = Condition(
        type=want.type,
        status=want.status,
        reason=want.reason,
        message=want.message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == want.type else c for c in conditions]


def remove_condition(conditions: Sequence[Condition], type_: str) -> list[Condition]:
    """Return ``conditions`` without the condition of this type."""
    return [c for c in conditions if c.type != type_]


def apply_all(
    conditions: Sequence[Condition],
    wants: Sequence[Want],
    *,
    generation: int | None,
    now: str,
    drop: Sequence[str] = (),
) -> list[Condition]:
    """Apply several decisions at once and drop the types in ``drop``."""
    result = [c for c in conditions if c.type not in drop]
    for want in wants:
        result = set_condition(result, want, generation=generation, now=now)
    return result


def experiment_phase(conditions: Sequence[Condition]) -> Phase:
    """The display phase: the first of Failed, Succeeded, Suspended, Training, Placed that is True, else Pending."""
    order: tuple[tuple[str, Phase], ...] = (
        (FAILED, "Failed"),
        (SUCCEEDED, "Succeeded"),
        (SUSPENDED, "Suspended"),
        (TRAINING, "Training"),
        (PLACED, "Placed"),
    )
    for type_, phase in order:
        if is_true(conditions, type_):
            return phase
    return "Pending"


def experiment_summary(conditions: Sequence[Condition]) -> list[Want]:
    """Ready, Reconciling and Stalled of an experiment, from its other conditions.

    Ready is True while the experiment trains or once it succeeded (what Argo CD
    calls Healthy); a failure is Stalled; anything on its way (waiting for a
    replica, loading) is Reconciling. A suspended experiment is neither ready nor
    on its way: it waits for a person.
    """
    failed = find(conditions, FAILED)
    if failed is not None and failed.status == "True":
        return [
            Want(READY, "False", "Failed", failed.message or failed.reason),
            Want(RECONCILING, "False", "Failed"),
            Want(STALLED, "True", failed.reason, failed.message),
        ]
    if is_true(conditions, SUCCEEDED):
        return _settled(Want(READY, "True", "Succeeded", "training completed"))
    suspended = find(conditions, SUSPENDED)
    if suspended is not None and suspended.status == "True":
        return _settled(Want(READY, "False", "Suspended", suspended.message))
    training = find(conditions, TRAINING)
    if training is not None and training.status == "True":
        return _settled(Want(READY, "True", "Training", training.message))
    if training is not None and training.status == "Unknown":
        ready = Want(READY, "Unknown", training.reason, training.message)
        return [ready, Want(RECONCILING, "True", training.reason, training.message), _not_stalled()]
    placed = find(conditions, PLACED)
    if placed is not None and placed.status == "True":
        reason = training.reason if training is not None else "WaitingForTrainer"
        message = training.message if training is not None else placed.message
        return _progressing(reason, message)
    if placed is not None:
        return _progressing(placed.reason, placed.message)
    return _progressing("Pending", "waiting for the operator to place the experiment")


def _settled(ready: Want) -> list[Want]:
    return [ready, Want(RECONCILING, "False", ready.reason), _not_stalled()]


def _progressing(reason: str, message: str) -> list[Want]:
    return [Want(READY, "False", reason, message), Want(RECONCILING, "True", reason, message), _not_stalled()]


def _not_stalled() -> Want:
    return Want(STALLED, "False", "NotStalled")
