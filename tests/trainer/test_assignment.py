"""Which experiments a replica hosts: selection from raw API objects, and the add/remove plan."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from loraplex_api import LoRAExperimentSpec
from loraplex_trainer.assignment import Assignment, config_map_refs, fingerprint, plan, select

SPEC: dict[str, Any] = {
    "poolRef": {"name": "smol"},
    "dataset": {"builtin": {"name": "arithmetic"}},
    "reward": {"builtin": {"name": "numeric_match"}},
}


def raw(name: str = "a", *, replica: str = "smol-0", pool: str = "smol", **status: Any) -> dict[str, Any]:
    """A LoRAExperiment as the API server returns it, placed on ``replica`` as the operator does."""
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": {"loraplex.dev/replica": replica}},
        "spec": copy.deepcopy(SPEC),
        "status": {
            "placement": {"pool": pool, "replica": replica, "placedAt": "2026-01-01T10:00:00Z"},
            **status,
        },
    }


def names(objects: list[dict[str, Any]]) -> list[str]:
    return [a.name for a in select(objects, pool="smol", replica="smol-0").assigned]


def test_selects_experiments_placed_on_this_replica_in_name_order() -> None:
    selection = select([raw("b"), raw("a"), raw("c", replica="smol-1")], pool="smol", replica="smol-0")
    assert [a.name for a in selection.assigned] == ["a", "b"]
    assert selection.assigned[0].uid == "uid-a"
    assert selection.assigned[0].spec.pool_ref.name == "smol"
    assert selection.skipped == {"c": "placed on smol/smol-1"}


def test_a_placement_needs_both_the_status_and_the_label() -> None:
    # The operator writes them in two requests; half a placement is not acted on.
    no_label = raw("a")
    del no_label["metadata"]["labels"]
    no_status = raw("b")
    del no_status["status"]["placement"]
    other_pool = raw("c", pool="big")
    selection = select([no_label, no_status, other_pool], pool="smol", replica="smol-0")
    assert selection.assigned == []
    assert selection.skipped == {
        "a": "label loraplex.dev/replica is None",
        "b": "not placed",
        "c": "placed on big/smol-0",
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda o: o["spec"].update(suspend=True), "spec.suspend is true"),
        (lambda o: o["metadata"].update(deletionTimestamp="2026-01-01T11:00:00Z"), "being deleted"),
        (lambda o: o["status"].update(phase="Succeeded"), "finished"),
        (
            lambda o: o["status"].update(conditions=[{"type": "Failed", "status": "True", "reason": "X"}]),
            "finished",
        ),
        (
            lambda o: o["status"].update(
                training={"state": "Completed", "lastHeartbeatTime": "2026-01-01T10:05:00Z"}
            ),
            "finished",
        ),
    ],
    ids=["suspended", "deleting", "succeeded", "failed-condition", "completed-here"],
)
def test_suspended_deleted_and_finished_experiments_are_not_trained(change: Any, reason: str) -> None:
    obj = raw("a")
    change(obj)
    selection = select([obj], pool="smol", replica="smol-0")
    assert selection.assigned == [] and selection.skipped == {"a": reason}


def test_a_finished_report_of_an_earlier_placement_does_not_count() -> None:
    # Completed on a replica that was lost before the operator saw it, then placed here again.
    obj = raw("a", training={"state": "Failed", "lastHeartbeatTime": "2026-01-01T09:00:00Z"})
    assert names([obj]) == ["a"]


def test_an_unreadable_experiment_is_reported_not_raised() -> None:
    obj = raw("a")
    obj["spec"]["lora"] = {"rank": 0}
    selection = select([obj, raw("b")], pool="smol", replica="smol-0")
    assert [a.name for a in selection.assigned] == ["b"]
    assert selection.invalid["a"].startswith("spec.lora.rank:")


def test_the_candidate_already_in_status_is_carried() -> None:
    obj = raw("a", adapter={"candidate": {"revision": "step-00000010", "uri": "file:///x", "step": 10}})
    (assignment,) = select([obj], pool="smol", replica="smol-0").assigned
    assert assignment.candidate is not None and assignment.candidate.step == 10


def spec(**changes: Any) -> LoRAExperimentSpec:
    return LoRAExperimentSpec.model_validate({**SPEC, **changes})


def test_fingerprint_follows_training_fields_only() -> None:
    base = fingerprint(spec())
    assert fingerprint(spec(promotion={"promotedRevision": "step-00000010"})) == base
    assert fingerprint(spec(priority=10, suspend=False, backoffLimit=1)) == base
    assert fingerprint(spec(algorithm={"maxSteps": 500})) != base
    assert fingerprint(spec(lora={"rank": 8})) != base


def assignment(name: str, uid: str = "u", digest: str = "f") -> Assignment:
    return Assignment(name=name, uid=uid, spec=spec(), fingerprint=digest)


def test_plan_adds_new_removes_gone_and_replaces_changed() -> None:
    hosted = {"keep": ("u", "f"), "gone": ("u", "f"), "recreated": ("old", "f"), "edited": ("u", "old")}
    wanted = [assignment("keep"), assignment("new"), assignment("recreated"), assignment("edited")]
    result = plan(wanted, hosted, {"gone": "spec.suspend is true"})
    assert result.remove == {
        "edited": "training spec changed",
        "gone": "spec.suspend is true",
        "recreated": "recreated (new uid)",
    }
    assert [a.name for a in result.add] == ["new", "recreated", "edited"]


def test_plan_without_changes_is_empty() -> None:
    result = plan([assignment("a")], {"a": ("u", "f")})
    assert result.remove == {} and result.add == []
    assert plan([], {"a": ("u", "f")}).remove == {"a": "no longer listed"}


def test_config_map_refs_name_every_key_and_its_field() -> None:
    body = {
        **SPEC,
        "dataset": {"configMap": {"name": "rows", "key": "train.jsonl"}, "eval": {"file": "eval.jsonl"}},
        "reward": {
            "terms": [
                {"python": {"configMap": {"name": "code", "key": "reward.py"}}},
                {"builtin": {"name": "length", "args": {"target": 10}}, "weight": 0.1},
            ]
        },
    }
    refs = config_map_refs(LoRAExperimentSpec.model_validate(body))
    assert refs == [
        ("rows", "train.jsonl", "spec.dataset.configMap"),
        ("code", "reward.py", "spec.reward.terms[0].python.configMap"),
    ]
    assert config_map_refs(spec()) == []
