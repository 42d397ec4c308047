"""Tests for the Events derived from condition transitions."""

from __future__ import annotations

from loraplex_operator.conditions import FAILED, PLACED, SUCCEEDED, SUSPENDED, TRAINING, Want, apply_all
from loraplex_operator.events import Event, condition_events


def conds(*wants: Want) -> list:
    return apply_all([], wants, generation=1, now="2025-01-01T00:00:00Z")


def test_placing_waiting_and_moving_replica() -> None:
    waiting = conds(Want(PLACED, "False", "WaitingForCapacity", "full"))
    placed = conds(Want(PLACED, "True", "Scheduled", "placed on replica p-0"))
    moved = conds(Want(PLACED, "True", "Scheduled", "placed on replica p-1"))
    assert condition_events([], waiting) == [Event("Normal", "WaitingForCapacity", "full")]
    assert condition_events(waiting, placed) == [Event("Normal", "Placed", "placed on replica p-0")]
    assert condition_events(placed, moved) == [Event("Normal", "Placed", "placed on replica p-1")]
    assert condition_events(placed, placed) == []


def test_waiting_message_changes_are_not_events_but_reasons_are() -> None:
    a = conds(Want(PLACED, "False", "WaitingForCapacity", "1 waits"))
    b = conds(Want(PLACED, "False", "WaitingForCapacity", "2 wait"))
    gone = conds(Want(PLACED, "False", "PoolNotFound", "no pool"))
    assert condition_events(a, b) == []
    assert condition_events(a, gone) == [Event("Warning", "PoolNotFound", "no pool")]


def test_finishing_suspending_and_losing_the_trainer() -> None:
    running = conds(Want(PLACED, "True", "Scheduled", "x"), Want(TRAINING, "True", "Running"))
    done = conds(
        Want(PLACED, "False", "Finished", "slot freed"),
        Want(TRAINING, "False", "Completed"),
        Want(SUCCEEDED, "True", "Completed", "trained 10/10 steps"),
    )
    assert condition_events(running, done) == [Event("Normal", "Succeeded", "trained 10/10 steps")]
    failed = conds(Want(FAILED, "True", "DeadlineExceeded", "too long"))
    assert condition_events(running, failed) == [Event("Warning", "DeadlineExceeded", "too long")]
    lost = conds(
        Want(PLACED, "True", "Scheduled", "x"), Want(TRAINING, "Unknown", "HeartbeatTimeout", "quiet")
    )
    assert condition_events(running, lost) == [Event("Warning", "HeartbeatTimeout", "quiet")]
    suspended = conds(Want(PLACED, "False", "Suspended"), Want(SUSPENDED, "True", "SpecSuspend", "s"))
    assert condition_events(running, suspended) == [Event("Normal", "Suspended", "s")]
    resumed = conds(
        Want(PLACED, "False", "WaitingForCapacity", "w"), Want(SUSPENDED, "False", "Resumed", "r")
    )
    assert Event("Normal", "Resumed", "r") in condition_events(suspended, resumed)
