"""Tests for the operator metrics: names from docs/architecture.md, values, and removal of a deleted pool's series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from loraplex_operator.metrics import OperatorMetrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_names_and_labels_follow_the_design() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.reconciled("SharedBasePool", ok=True)
    metrics.reconciled("LoRAExperiment", ok=False)
    metrics.placed_after(0.3)
    metrics.observe_pool("ns", "p", total_slots=8, used_slots=3, phases={"Training": 2, "Pending": 4})
    metrics.promoted("ns", "p", "promoted")

    assert sample(registry, "loraplex_reconcile_total", kind="SharedBasePool", result="success") == 1
    assert sample(registry, "loraplex_reconcile_total", kind="LoRAExperiment", result="error") == 1
    assert sample(registry, "loraplex_placement_wait_seconds_count") == 1
    assert sample(registry, "loraplex_placement_wait_seconds_bucket", le="0.5") == 1
    assert sample(registry, "loraplex_pool_slots", namespace="ns", pool="p", state="total") == 8
    assert sample(registry, "loraplex_pool_slots", namespace="ns", pool="p", state="used") == 3
    assert sample(registry, "loraplex_pool_slots", namespace="ns", pool="p", state="free") == 5
    assert sample(registry, "loraplex_experiments", namespace="ns", pool="p", phase="Training") == 2
    assert sample(registry, "loraplex_experiments", namespace="ns", pool="p", phase="Failed") == 0
    assert sample(registry, "loraplex_promotions_total", namespace="ns", pool="p", result="promoted") == 1


def test_phase_counts_are_replaced_not_added() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.observe_pool("ns", "p", total_slots=4, used_slots=4, phases={"Pending": 3})
    metrics.observe_pool("ns", "p", total_slots=4, used_slots=1, phases={"Succeeded": 3})
    assert sample(registry, "loraplex_experiments", namespace="ns", pool="p", phase="Pending") == 0
    assert sample(registry, "loraplex_experiments", namespace="ns", pool="p", phase="Succeeded") == 3


def test_forgetting_a_pool_removes_its_series_only() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    for pool in ("gone", "kept"):
        metrics.observe_pool("ns", pool, total_slots=2, used_slots=1, phases={"Training": 1})
        metrics.promoted("ns", pool, "rolled_back")
    metrics.forget_pool("ns", "gone")
    metrics.forget_pool("ns", "never-seen")
    text = generate_latest(registry).decode()
    assert 'pool="gone"' not in text
    assert 'pool="kept"' in text
    assert (
        sample(registry, "loraplex_promotions_total", namespace="ns", pool="kept", result="rolled_back") == 1
    )
