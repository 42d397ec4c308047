"""Tests for condition maths: transition times, phase and the Ready/Reconciling/Stalled summary."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex_api import Condition
from loraplex_operator.conditions import (
    FAILED,
    PLACED,
    READY,
    RECONCILING,
    STALLED,
    SUCCEEDED,
    SUSPENDED,
    TRAINING,
    Want,
    apply_all,
    experiment_phase,
    experiment_summary,
    find,
    remove_condition,
    set_condition,
)

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"


def conds(*wants: Want, now: str = T0) -> list[Condition]:
    return apply_all([], wants, generation=1, now=now)


def test_new_condition_gets_now_and_the_generation() -> None:
    [c] = set_condition([], Want(PLACED, "True", "Scheduled", "on r-0"), generation=3, now=T0)
    assert (c.type, c.status, c.reason, c.message) == (PLACED, "True", "Scheduled", "on r-0")
    assert c.last_transition_time == T0
    assert c.observed_generation == 3


def test_same_status_keeps_the_transition_time_but_takes_reason_message_and_generation() -> None:
    before = conds(Want(PLACED, "False", "WaitingForCapacity", "full"))
    [after] = set_condition(before, Want(PLACED, "False", "PoolNotFound", "gone"), generation=2, now=T1)
    assert after.last_transition_time == T0
    assert (after.reason, after.message, after.observed_generation) == ("PoolNotFound", "gone", 2)


def test_status_change_moves_the_transition_time() -> None:
    before = conds(Want(PLACED, "False", "WaitingForCapacity"))
    [after] = set_condition(before, Want(PLACED, "True", "Scheduled"), generation=1, now=T1)
    assert after.last_transition_time == T1


def test_order_is_kept_and_new_types_append() -> None:
    before = conds(Want(PLACED, "True", "Scheduled"), Want(TRAINING, "False", "Loading"))
    after = set_condition(before, Want(PLACED, "False", "Suspended"), generation=1, now=T1)
    after = set_condition(after, Want(SUSPENDED, "True", "SpecSuspend"), generation=1, now=T1)
    assert [c.type for c in after] == [PLACED, TRAINING, SUSPENDED]


def test_remove_and_drop() -> None:
    before = conds(Want(PLACED, "True", "Scheduled"), Want(FAILED, "True", "InvalidSpec"))
    assert [c.type for c in remove_condition(before, FAILED)] == [PLACED]
    after = apply_all(before, [Want(TRAINING, "False", "Pending")], generation=1, now=T1, drop=[FAILED])
    assert [c.type for c in after] == [PLACED, TRAINING]


wants = st.builds(
    Want,
    type=st.sampled_from([PLACED, TRAINING, SUSPENDED, FAILED]),
    status=st.sampled_from(["True", "False", "Unknown"]),
    reason=st.sampled_from(["A", "B"]),
    message=st.sampled_from(["", "m"]),
)


@given(st.lists(wants, max_size=12), wants)
def test_setting_is_idempotent_and_types_stay_unique(history: Sequence[Want], last: Want) -> None:
    conditions = apply_all([], history, generation=1, now=T0)
    once = set_condition(conditions, last, generation=1, now=T1)
    twice = set_condition(once, last, generation=1, now="2030-01-01T00:00:00Z")
    assert once == twice
    assert len({c.type for c in once}) == len(once)


@pytest.mark.parametrize(
    ("wants", "phase"),
    [
        ([], "Pending"),
        ([Want(PLACED, "False", "WaitingForCapacity")], "Pending"),
        ([Want(PLACED, "True", "Scheduled"), Want(TRAINING, "False", "Loading")], "Placed"),
        ([Want(PLACED, "True", "Scheduled"), Want(TRAINING, "True", "Running")], "Training"),
        ([Want(SUSPENDED, "True", "SpecSuspend"), Want(PLACED, "False", "Suspended")], "Suspended"),
        ([Want(SUCCEEDED, "True", "Completed"), Want(SUSPENDED, "True", "SpecSuspend")], "Succeeded"),
        ([Want(FAILED, "True", "InvalidSpec"), Want(SUCCEEDED, "True", "Completed")], "Failed"),
    ],
)
def test_phase_from_conditions(wants: list[Want], phase: str) -> None:
    assert experiment_phase(conds(*wants)) == phase


def summary(*wants: Want) -> dict[str, tuple[str, str]]:
    return {w.type: (w.status, w.reason) for w in experiment_summary(conds(*wants))}


def test_summary_training_is_ready_and_settled() -> None:
    s = summary(Want(PLACED, "True", "Scheduled"), Want(TRAINING, "True", "Running", "step 3/10"))
    assert s == {
        READY: ("True", "Training"),
        RECONCILING: ("False", "Training"),
        STALLED: ("False", "NotStalled"),
    }


def test_summary_waiting_is_reconciling_with_the_placed_reason() -> None:
    s = summary(Want(PLACED, "False", "WaitingForCapacity", "full"))
    assert s[READY] == ("False", "WaitingForCapacity")
    assert s[RECONCILING] == ("True", "WaitingForCapacity")


def test_summary_placed_waits_for_the_trainer() -> None:
    assert summary(Want(PLACED, "True", "Scheduled"))[READY] == ("False", "WaitingForTrainer")
    s = summary(Want(PLACED, "True", "Scheduled"), Want(TRAINING, "False", "Loading"))
    assert s[READY] == ("False", "Loading")


def test_summary_failed_is_stalled_with_the_failure_reason() -> None:
    failed = experiment_summary(conds(Want(FAILED, "True", "InvalidSpec", "spec.lora.rank: too big")))
    by_type = {w.type: w for w in failed}
    assert (by_type[READY].status, by_type[READY].reason) == ("False", "Failed")
    assert by_type[READY].message == "spec.lora.rank: too big"
    assert (by_type[STALLED].status, by_type[STALLED].reason) == ("True", "InvalidSpec")
    assert by_type[RECONCILING].status == "False"


def test_summary_succeeded_and_suspended_and_lost_heartbeat() -> None:
    assert summary(Want(SUCCEEDED, "True", "Completed"))[READY] == ("True", "Succeeded")
    s = summary(Want(SUSPENDED, "True", "SpecSuspend"))
    assert s[READY] == ("False", "Suspended") and s[RECONCILING] == ("False", "Suspended")
    s = summary(Want(PLACED, "True", "Scheduled"), Want(TRAINING, "Unknown", "HeartbeatTimeout"))
    assert s[READY] == ("Unknown", "HeartbeatTimeout")


def test_find() -> None:
    c = conds(Want(PLACED, "True", "Scheduled"))
    assert find(c, PLACED) is not None and find(c, TRAINING) is None
