"""The operator's Prometheus metrics (base units, ``_total`` counters, bounded labels).

Per-pool series carry ``namespace`` and ``pool`` labels and are removed when
the pool goes away, so a cluster that churns pools does not grow the scrape.
Experiments appear only as counts per phase, never as a label of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from loraplex_api.experiment import Phase

PHASES: tuple[str, ...] = get_args(Phase)
SLOT_STATES = ("total", "used", "free")
PLACEMENT_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

PoolKey = tuple[str, str]


class OperatorMetrics:
    """The operator's metrics, registered in one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.reconciles = Counter(
            "loraplex_reconcile_total",
            "Reconciliations by resource kind and result (success or error).",
            ["kind", "result"],
            registry=registry,
        )
        self.placement_wait = Histogram(
            "loraplex_placement_wait_seconds",
            "Time from an experiment waiting for a replica to its placement.",
            buckets=PLACEMENT_WAIT_BUCKETS,
            registry=registry,
        )
        self.pool_slots = Gauge(
            "loraplex_pool_slots",
            "Adapter slots of a pool's ready replicas: total, used and free.",
            ["namespace", "pool", "state"],
            registry=registry,
        )
        self.experiments = Gauge(
            "loraplex_experiments",
            "Experiments of a pool by phase.",
            ["namespace", "pool", "phase"],
            registry=registry,
        )
        self.promotions = Counter(
            "loraplex_promotions_total",
            "Promotion decisions by result (promoted, rolled_back, revision_not_found).",
            ["namespace", "pool", "result"],
            registry=registry,
        )
        self._promotion_results: dict[PoolKey, set[str]] = {}

    def reconciled(self, kind: str, ok: bool) -> None:
        """Count one reconciliation of a SharedBasePool or LoRAExperiment."""
        self.reconciles.labels(kind=kind, result="success" if ok else "error").inc()

    def placed_after(self, seconds: float) -> None:
        """Record how long an experiment waited for its placement."""
        self.placement_wait.observe(max(0.0, seconds))

    def observe_pool(
        self, namespace: str, pool: str, *, total_slots: int, used_slots: int, phases: Mapping[str, int]
    ) -> None:
        """Set a pool's slot and phase gauges (every phase is set, absent ones to 0)."""
        free = max(0, total_slots - used_slots)
        for state, value in zip(SLOT_STATES, (total_slots, used_slots, free), strict=True):
            self.pool_slots.labels(namespace=namespace, pool=pool, state=state).set(value)
        for phase in PHASES:
            self.experiments.labels(namespace=namespace, pool=pool, phase=phase).set(phases.get(phase, 0))

    def promoted(self, namespace: str, pool: str, result: str) -> None:
        """Count a promotion, rollback or unknown revision."""
        self.promotions.labels(namespace=namespace, pool=pool, result=result).inc()
        self._promotion_results.setdefault((namespace, pool), set()).add(result)

    def forget_pool(self, namespace: str, pool: str) -> None:
        """Remove every series of a deleted pool."""
        for state in SLOT_STATES:
            _remove(self.pool_slots, namespace, pool, state)
        for phase in PHASES:
            _remove(self.experiments, namespace, pool, phase)
        for result in self._promotion_results.pop((namespace, pool), set()):
            _remove(self.promotions, namespace, pool, result)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    # Removing a series that was never created is fine: the pool may have had no promotions.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
