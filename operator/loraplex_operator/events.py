"""Which Kubernetes Events a change of an experiment's conditions deserves.

Events are for transitions a user cares about (placed, waiting, suspended,
succeeded, failed, a lost trainer); they are derived from the conditions before
and after a decision, so a decision that changes nothing posts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from loraplex_api import Condition

from .conditions import FAILED, PLACED, SUCCEEDED, SUSPENDED, TRAINING, find

EventType = Literal["Normal", "Warning"]
WARNING_WAITS = frozenset({"PoolNotFound"})


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event about one object."""

    type: EventType
    reason: str
    message: str


def condition_events(before: Sequence[Condition], after: Sequence[Condition]) -> list[Event]:
    """Events for the transitions between two condition lists of the same experiment."""
    events: list[Event] = []

    placed_old, placed = find(before, PLACED), find(after, PLACED)
    if placed is not None and _changed(placed_old, placed, message=placed.status == "True"):
        if placed.status == "True":
            events.append(Event("Normal", "Placed", placed.message))
        elif placed.reason not in ("Suspended", "Finished"):
            kind: EventType = "Warning" if placed.reason in WARNING_WAITS else "Normal"
            events.append(Event(kind, placed.reason, placed.message))

    suspended_old, suspended = find(before, SUSPENDED), find(after, SUSPENDED)
    if suspended is not None and _changed(suspended_old, suspended):
        if suspended.status == "True":
            events.append(Event("Normal", "Suspended", suspended.message))
        elif suspended_old is not None:
            events.append(Event("Normal", "Resumed", suspended.message))

    training_old, training = find(before, TRAINING), find(after, TRAINING)
    if training is not None and training.status == "Unknown" and _changed(training_old, training):
        events.append(Event("Warning", training.reason, training.message))

    finished: tuple[tuple[str, EventType], ...] = ((SUCCEEDED, "Normal"), (FAILED, "Warning"))
    for type_, severity in finished:
        old, new = find(before, type_), find(after, type_)
        if new is not None and new.status == "True" and _changed(old, new):
            events.append(Event(severity, type_ if type_ == SUCCEEDED else new.reason, new.message))
    return events


def _changed(old: Condition | None, new: Condition, *, message: bool = False) -> bool:
    """Whether the condition moved: status or reason, and the message too when ``message``."""
    if old is None:
        return True
    return (old.status, old.reason) != (new.status, new.reason) or (message and old.message != new.message)
