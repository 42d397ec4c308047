"""Tests for promotion decisions: Auto, the manual pin, rollback, unknown revisions and the bounded history."""

from __future__ import annotations

from typing import Any

from loraplex_api import AdapterRevision, Condition
from loraplex_api.experiment import AdapterStatus, PromotionSpec
from loraplex_operator.promotion import (
    HISTORY_LIMIT,
    decide,
    dump_history,
    parse_history,
    remember,
)


def rev(name: str, metric: float | None = None, step: int = 0) -> AdapterRevision:
    return AdapterRevision(revision=name, uri=f"file:///ckpt/{name}", step=step, metric=metric)


def spec(**kwargs: Any) -> PromotionSpec:
    return PromotionSpec.model_validate(kwargs)


def adapter(**kwargs: AdapterRevision | None) -> AdapterStatus:
    return AdapterStatus(**kwargs)


def test_auto_promotes_a_candidate_that_passes_the_threshold() -> None:
    out = decide(spec(policy="Auto", threshold=0.5), adapter(candidate=rev("step-10", 0.6)), ())
    assert out.promoted == rev("step-10", 0.6)
    assert out.previous is None
    assert out.result == "promoted" and out.moved
    assert out.condition is not None and (out.condition.status, out.condition.reason) == ("True", "Promoted")
    assert out.event is not None and out.event.reason == "Promoted"
    assert [r.revision for r in out.history] == ["step-10"]


def test_auto_waits_below_the_threshold_and_says_why() -> None:
    out = decide(spec(policy="Auto", threshold=0.5), adapter(candidate=rev("step-10", 0.4)), ())
    assert out.promoted is None and not out.moved
    assert out.condition is not None and out.condition.reason == "BelowThreshold"
    assert "spec.promotion.threshold 0.5" in out.condition.message
    assert out.event is None


def test_auto_needs_the_candidate_to_beat_the_promoted_one() -> None:
    current = adapter(candidate=rev("step-20", 0.7), promoted=rev("step-10", 0.8))
    out = decide(spec(policy="Auto", threshold=0.5), current, ())
    assert out.promoted == rev("step-10", 0.8)
    assert out.condition is not None and out.condition.status == "True"

    better = adapter(candidate=rev("step-30", 0.9), promoted=rev("step-10", 0.8))
    out = decide(spec(policy="Auto", threshold=0.5), better, ())
    assert out.promoted == rev("step-30", 0.9)
    assert out.previous == rev("step-10", 0.8)
    assert out.condition is not None and "previous step-10" in out.condition.message


def test_auto_without_candidate_or_metric() -> None:
    assert decide(spec(policy="Auto"), None, ()).condition.reason == "NoCandidate"  # type: ignore[union-attr]
    out = decide(spec(policy="Auto"), adapter(candidate=rev("step-1")), ())
    assert out.condition is not None and out.condition.reason == "NoMetric"


def test_auto_without_threshold_promotes_any_metric() -> None:
    out = decide(spec(policy="Auto"), adapter(candidate=rev("step-1", -3.0)), ())
    assert out.promoted is not None and out.promoted.revision == "step-1"


def test_manual_never_moves_on_its_own() -> None:
    out = decide(spec(policy="Manual"), adapter(candidate=rev("step-10", 0.99)), ())
    assert out.promoted is None and out.condition is None and out.result is None
    assert [r.revision for r in out.history] == ["step-10"]


def test_pin_promotes_a_seen_revision_under_any_policy() -> None:
    history = (rev("step-10", 0.5), rev("step-20", 0.6))
    for policy in ("Manual", "Auto"):
        current = adapter(candidate=rev("step-30", 0.9), promoted=rev("step-20", 0.6))
        out = decide(spec(policy=policy, promotedRevision="step-10"), current, history)
        assert out.promoted == rev("step-10", 0.5)
        assert out.previous == rev("step-20", 0.6)
        assert out.result == "promoted"


def test_pin_to_previous_is_a_rollback() -> None:
    current = adapter(promoted=rev("step-20", 0.6), previous=rev("step-10", 0.5))
    out = decide(spec(promotedRevision="step-10"), current, ())
    assert out.promoted == rev("step-10", 0.5)
    assert out.previous == rev("step-20", 0.6)
    assert out.result == "rolled_back"
    assert out.condition is not None and out.condition.reason == "RolledBack"
    assert out.event is not None and out.event.reason == "RolledBack"


def test_pin_is_idempotent_and_keeps_the_rollback_reason() -> None:
    current = adapter(promoted=rev("step-20"), previous=rev("step-10"))
    first = decide(spec(promotedRevision="step-10"), current, ())
    assert first.condition is not None
    condition = Condition(
        type="Promoted", status="True", reason=first.condition.reason, message=first.condition.message
    )
    again = decide(
        spec(promotedRevision="step-10"),
        adapter(promoted=first.promoted, previous=first.previous),
        first.history,
        condition,
    )
    assert again.promoted == first.promoted and again.previous == first.previous
    assert again.result is None and again.event is None
    assert again.condition is not None and again.condition.reason == "RolledBack"


def test_pin_to_an_unknown_revision_leaves_the_pointers() -> None:
    current = adapter(promoted=rev("step-20"), candidate=rev("step-30"))
    out = decide(spec(promotedRevision="step-99"), current, (rev("step-10"),))
    assert out.promoted == rev("step-20") and out.previous is None
    assert out.condition is not None
    assert (out.condition.status, out.condition.reason) == ("False", "RevisionNotFound")
    assert "spec.promotion.promotedRevision: 'step-99'" in out.condition.message
    assert "step-10, step-20, step-30" in out.condition.message
    assert out.result == "revision_not_found"
    # Reported once: the same verdict again posts no second event.
    seen = Condition(
        type="Promoted", status="False", reason="RevisionNotFound", message=out.condition.message
    )
    assert decide(spec(promotedRevision="step-99"), current, out.history, seen).event is None


def test_pin_to_the_candidate_that_appears_later() -> None:
    out = decide(spec(promotedRevision="step-40"), adapter(candidate=rev("step-40", 0.1)), ())
    assert out.promoted is not None and out.promoted.revision == "step-40"


def test_history_is_bounded_and_keeps_promoted_and_previous() -> None:
    history = remember((), [rev(f"step-{i}") for i in range(HISTORY_LIMIT)])
    history = remember(history, [rev("new")], keep=[rev("step-0"), rev("step-1")])
    names = [r.revision for r in history]
    assert len(names) == HISTORY_LIMIT
    assert names[:2] == ["step-0", "step-1"] and "step-2" not in names and names[-1] == "new"


def test_history_updates_an_entry_in_place_of_duplicating_it() -> None:
    history = remember((rev("a", 0.1), rev("b")), [rev("a", 0.2)])
    assert [(r.revision, r.metric) for r in history] == [("b", None), ("a", 0.2)]


def test_history_annotation_round_trip_and_damage() -> None:
    history = (rev("a", 0.5, step=10), rev("b"))
    assert parse_history(dump_history(history)) == history
    assert (
        parse_history(None) == () and parse_history("{not json") == () and parse_history('[{"x": 1}]') == ()
    )
