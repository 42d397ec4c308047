"""Tests for merge patches and the ledger of the operator's own writes."""

from __future__ import annotations

from loraplex_operator.patches import Ledger, merge, minimal_patch


def test_merge_follows_rfc7386() -> None:
    target = {"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]}
    assert merge(target, {"a": None, "b": {"c": None, "e": 4}, "l": [3]}) == {"b": {"d": 3, "e": 4}, "l": [3]}
    assert target == {"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]}


def test_minimal_patch_names_only_differences_and_leaves_other_keys() -> None:
    observed = {"phase": "Placed", "training": {"step": 3}, "adapter": {"candidate": {"revision": "r1"}}}
    desired = {"phase": "Training", "placement": None, "adapter": {"promoted": None, "previous": None}}
    assert minimal_patch(observed, desired) == {"phase": "Training"}
    assert minimal_patch(observed, {"adapter": {"promoted": {"revision": "r1"}}}) == {
        "adapter": {"promoted": {"revision": "r1"}}
    }
    assert minimal_patch({"placement": {"replica": "p-0"}}, {"placement": None}) == {"placement": None}
    assert minimal_patch({}, {"adapter": {"promoted": None}}) == {}


def test_minimal_patch_then_merge_reaches_the_desired_state() -> None:
    observed = {"a": {"b": 1, "keep": True}, "gone": 1, "list": [1]}
    desired = {"a": {"b": 2}, "gone": None, "list": [1, 2], "new": {"x": None, "y": 1}}
    patched = merge(observed, minimal_patch(observed, desired))
    assert patched == {"a": {"b": 2, "keep": True}, "list": [1, 2], "new": {"y": 1}}
    assert minimal_patch(patched, desired) == {}


def test_ledger_overlays_unseen_writes_until_the_watch_shows_them() -> None:
    now = [0.0]
    ledger = Ledger(ttl=10, clock=lambda: now[0])
    stale = {"status": {"phase": "Pending"}, "spec": {"x": 1}}
    ledger.record("k", {"status": {"phase": "Placed", "placement": {"replica": "p-0"}}})
    assert ledger.overlay("k", stale)["status"] == {"phase": "Placed", "placement": {"replica": "p-0"}}
    assert ledger.overlay("k", stale)["spec"] == {"x": 1}
    echoed = {"status": {"phase": "Placed", "placement": {"replica": "p-0"}, "training": {}}}
    assert ledger.overlay("k", echoed) == echoed
    assert len(ledger) == 0


def test_ledger_combines_writes_and_expires() -> None:
    now = [0.0]
    ledger = Ledger(ttl=10, clock=lambda: now[0])
    ledger.record("k", {"status": {"placement": {"replica": "p-0"}, "phase": "Placed"}})
    ledger.record("k", {"status": {"placement": None}})
    assert ledger.overlay("k", {"status": {"placement": {"replica": "p-0"}}}) == {
        "status": {"phase": "Placed"}
    }
    now[0] = 11
    assert ledger.overlay("k", {"status": {}}) == {"status": {}}
    ledger.record("j", {"a": 1})
    ledger.forget("j")
    assert len(ledger) == 0
