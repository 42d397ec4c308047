"""The operator against KMock: Auto promotion, manual promotion by promotedRevision, rollback, unknown revisions."""

from __future__ import annotations

from .builders import add_pod, condition, experiment, placement, pool, report_candidate
from .conftest import Cluster, Operator, wait_for


def get(cluster: Cluster, name: str) -> dict | None:
    return cluster.api.get("LoRAExperiment", name)


def promoted(cluster: Cluster, name: str) -> str | None:
    adapter = ((get(cluster, name) or {}).get("status") or {}).get("adapter") or {}
    return (adapter.get("promoted") or {}).get("revision")


def served(cluster: Cluster) -> dict:
    return (cluster.api.get("ConfigMap", "smol-promoted-adapters") or {}).get("data") or {}


def start(cluster: Cluster, name: str, **spec: object) -> None:
    api = cluster.api
    api.create(pool("smol"))
    add_pod(api, "smol", 0)
    api.create(experiment(name, "smol", **spec))
    wait_for(lambda: placement(get(cluster, name)), what="placed")


def test_auto_promotes_a_candidate_that_passes_the_threshold(cluster: Cluster, operator: Operator) -> None:
    start(cluster, "auto", promotion={"policy": "Auto", "metric": "eval_reward", "threshold": 0.5})
    api = cluster.api

    report_candidate(api, "auto", "step-10", 0.3, step=10)
    below = wait_for(
        lambda: (
            (e := get(cluster, "auto")) and condition(e, "Promoted").get("reason") == "BelowThreshold" and e
        )
    )
    assert "spec.promotion.threshold 0.5" in condition(below, "Promoted")["message"]
    assert promoted(cluster, "auto") is None

    report_candidate(api, "auto", "step-20", 0.7, step=20)
    wait_for(lambda: promoted(cluster, "auto") == "step-20", what="step-20 promoted")
    wait_for(
        lambda: served(cluster) == {"auto": "file:///var/lib/loraplex/auto/step-20"}, what="ConfigMap entry"
    )
    a = get(cluster, "auto") or {}
    assert condition(a, "Promoted")["status"] == "True"
    assert a["status"]["adapter"]["candidate"]["revision"] == "step-20"  # the trainer's pointer is untouched

    report_candidate(api, "auto", "step-30", 0.9, step=30)
    wait_for(lambda: promoted(cluster, "auto") == "step-30", what="the better candidate promoted")
    assert (get(cluster, "auto") or {})["status"]["adapter"]["previous"]["revision"] == "step-20"
    sample = operator.registry.get_sample_value
    labels = {"namespace": "default", "pool": "smol", "result": "promoted"}
    wait_for(lambda: sample("loraplex_promotions_total", labels) == 2, what="two promotions counted")


def test_manual_promotion_and_rollback_by_promoted_revision(cluster: Cluster, operator: Operator) -> None:
    start(cluster, "manual", promotion={"policy": "Manual"})
    api = cluster.api
    report_candidate(api, "manual", "step-10", 0.4, step=10)
    wait_for(
        lambda: (
            "step-10"
            in ((get(cluster, "manual") or {})["metadata"].get("annotations") or {}).get(
                "loraplex.dev/adapter-revisions", ""
            )
        ),
        what="step-10 remembered",
    )
    report_candidate(api, "manual", "step-20", 0.6, step=20)
    assert promoted(cluster, "manual") is None  # Manual never promotes on its own

    api.patch("LoRAExperiment", "manual", {"spec": {"promotion": {"promotedRevision": "step-10"}}})
    wait_for(lambda: promoted(cluster, "manual") == "step-10", what="step-10 promoted by hand")
    api.patch("LoRAExperiment", "manual", {"spec": {"promotion": {"promotedRevision": "step-20"}}})
    wait_for(lambda: promoted(cluster, "manual") == "step-20", what="step-20 promoted by hand")
    wait_for(lambda: served(cluster).get("manual", "").endswith("/step-20"), what="ConfigMap follows")

    # Rollback: name the previous revision.
    api.patch("LoRAExperiment", "manual", {"spec": {"promotion": {"promotedRevision": "step-10"}}})
    wait_for(lambda: promoted(cluster, "manual") == "step-10", what="rolled back to step-10")
    m = get(cluster, "manual") or {}
    assert m["status"]["adapter"]["previous"]["revision"] == "step-20"
    assert condition(m, "Promoted")["reason"] == "RolledBack"
    wait_for(lambda: served(cluster).get("manual", "").endswith("/step-10"), what="ConfigMap rolled back")
    reasons = lambda: [e["reason"] for e in api.list("Event") if e["involvedObject"]["name"] == "manual"]  # noqa: E731
    wait_for(
        lambda: "RolledBack" in reasons() and "Promoted" in reasons(), what="Promoted and RolledBack events"
    )

    # An unknown revision leaves the served adapter alone.
    api.patch("LoRAExperiment", "manual", {"spec": {"promotion": {"promotedRevision": "step-99"}}})
    m = wait_for(
        lambda: (
            (e := get(cluster, "manual"))
            and condition(e, "Promoted").get("reason") == "RevisionNotFound"
            and e
        )
    )
    assert condition(m, "Promoted")["status"] == "False"
    assert "spec.promotion.promotedRevision: 'step-99'" in condition(m, "Promoted")["message"]
    assert promoted(cluster, "manual") == "step-10"


def test_deleting_an_experiment_removes_its_served_adapter(cluster: Cluster, operator: Operator) -> None:
    start(cluster, "gone", promotion={"policy": "Auto"})
    report_candidate(cluster.api, "gone", "step-5", 0.2, step=5)
    wait_for(lambda: "gone" in served(cluster), what="served")
    cluster.api.delete("LoRAExperiment", "gone")
    wait_for(lambda: "gone" not in served(cluster), what="the ConfigMap entry removed")
