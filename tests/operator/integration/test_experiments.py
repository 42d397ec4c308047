"""The operator against KMock: placing experiments, capacity and scale-up, the trainer's reports, lost replicas."""

from __future__ import annotations

import statistics
import time

from .builders import add_pod, condition, experiment, placement, pool, report_training, set_pod_ready
from .conftest import Cluster, Operator, wait_for


def get(cluster: Cluster, name: str) -> dict | None:
    return cluster.api.get("LoRAExperiment", name)


def events_for(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.api.list("Event") if e.get("involvedObject", {}).get("name") == name]


def test_experiments_are_placed_labelled_and_timed(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol", replicas=2, slots=8))
    add_pod(api, "smol", 0)
    add_pod(api, "smol", 1)
    wait_for(lambda: (api.get("SharedBasePool", "smol") or {}).get("status", {}).get("readyReplicas") == 2)

    # Time from creating an experiment to seeing its placement, one at a time, then in a burst.
    singles = []
    for i in range(5):
        started = time.perf_counter()
        api.create(experiment(f"one-{i}", "smol"))
        wait_for(lambda i=i: placement(get(cluster, f"one-{i}")), interval=0.01, what=f"one-{i} placed")
        singles.append(time.perf_counter() - started)

    a = get(cluster, "one-4")
    assert a is not None
    assert a["metadata"]["labels"]["loraplex.dev/pool"] == "smol"
    assert a["metadata"]["labels"]["loraplex.dev/replica"] == placement(a)
    assert a["status"]["placement"]["pool"] == "smol" and a["status"]["placement"]["placedAt"]
    assert condition(a, "Placed")["reason"] == "Scheduled"
    assert a["status"]["phase"] == "Placed" and a["status"]["observedGeneration"] == 1
    assert condition(a, "Ready")["reason"] == "WaitingForTrainer"
    assert a["status"]["startTime"]

    started = time.perf_counter()
    for i in range(10):
        api.create(experiment(f"burst-{i}", "smol"))
    wait_for(
        lambda: all(placement(get(cluster, f"burst-{i}")) for i in range(10)),
        interval=0.01,
        what="burst placed",
    )
    burst = time.perf_counter() - started
    print(
        f"\ntime to placement against KMock: single median {statistics.median(singles) * 1000:.0f} ms "
        f"(max {max(singles) * 1000:.0f} ms); 10 created at once all placed after {burst * 1000:.0f} ms"
    )

    # Best fit fills one replica before the next (15 experiments, 8 slots each).
    replicas = [
        placement(get(cluster, n)) for n in [f"one-{i}" for i in range(5)] + [f"burst-{i}" for i in range(10)]
    ]
    assert sorted(replicas.count(r) for r in set(replicas)) == [7, 8]
    wait_for(lambda: "Placed" in events_for(cluster, "one-0"), what="a Placed event")
    assert operator.registry.get_sample_value("loraplex_placement_wait_seconds_count") == 15


def test_exhausting_capacity_waits_and_scales_the_pool_up(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol", slots=1, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3}))
    add_pod(api, "smol", 0)
    api.create(experiment("first", "smol"))
    wait_for(lambda: placement(get(cluster, "first")), what="first placed")
    api.create(experiment("second", "smol"))

    second = wait_for(
        lambda: (
            (e := get(cluster, "second"))
            and condition(e, "Placed").get("reason") == "WaitingForCapacity"
            and e
        ),
        what="WaitingForCapacity",
    )
    assert second["status"]["phase"] == "Pending"
    assert "scaling pool smol up" in condition(second, "Placed")["message"]
    wait_for(
        lambda: (api.get("SharedBasePool", "smol") or {})["spec"]["replicas"] == 2, what="scale-up request"
    )
    wait_for(
        lambda: (api.get("StatefulSet", "smol") or {})["spec"]["replicas"] == 2, what="StatefulSet scaled"
    )
    smol = api.get("SharedBasePool", "smol") or {}
    assert smol["status"]["capacity"]["pendingExperiments"] == 1

    add_pod(api, "smol", 1)  # the StatefulSet controller's and the kubelet's part
    wait_for(lambda: placement(get(cluster, "second")) == "smol-1", what="second placed on the new replica")


def test_a_completed_experiment_frees_its_slot_for_the_next(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol", slots=1))
    add_pod(api, "smol", 0)
    api.create(experiment("first", "smol"))
    wait_for(lambda: placement(get(cluster, "first")), what="first placed")
    api.create(experiment("next", "smol"))
    wait_for(lambda: condition(get(cluster, "next"), "Placed").get("reason") == "WaitingForCapacity")

    report_training(api, "first", "Running", step=4)
    first = wait_for(
        lambda: (e := get(cluster, "first")) and e["status"].get("phase") == "Training" and e, what="Training"
    )
    assert condition(first, "Ready")["status"] == "True"
    assert condition(first, "Training")["reason"] == "Running"

    report_training(api, "first", "Completed", step=10)
    # Status, then the replica label: two writes, so wait for both.
    first = wait_for(
        lambda: (
            (e := get(cluster, "first"))
            and e["status"].get("phase") == "Succeeded"
            and "loraplex.dev/replica" not in e["metadata"]["labels"]
            and e
        ),
        what="Succeeded and unlabelled",
    )
    assert placement(first) is None and first["status"]["completionTime"]
    assert condition(first, "Succeeded")["reason"] == "Completed"
    wait_for(lambda: placement(get(cluster, "next")) == "smol-0", what="next placed in the freed slot")
    wait_for(lambda: "Succeeded" in events_for(cluster, "first"), what="a Succeeded event")


def test_a_lost_replica_puts_its_experiments_elsewhere_with_a_restart(
    cluster: Cluster, operator: Operator
) -> None:
    api = cluster.api
    api.create(pool("smol", replicas=2, slots=1))
    add_pod(api, "smol", 0)
    add_pod(api, "smol", 1)
    api.create(experiment("a", "smol", backoffLimit=2))
    replica = wait_for(lambda: placement(get(cluster, "a")), what="placed")
    other = "smol-1" if replica == "smol-0" else "smol-0"

    set_pod_ready(api, replica, False)
    moved = wait_for(
        lambda: (e := get(cluster, "a")) and placement(e) == other and e,
        timeout=10,
        what="placed on the other replica",
    )
    assert moved["status"]["restarts"] == 1
    wait_for(lambda: "ReplicaLost" in events_for(cluster, "a"), what="a ReplicaLost event")


def test_silence_from_the_trainer_makes_training_unknown(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol"))
    add_pod(api, "smol", 0)
    api.create(experiment("a", "smol"))
    wait_for(lambda: placement(get(cluster, "a")), what="placed")
    report_training(api, "a", "Running", step=1)
    wait_for(lambda: condition(get(cluster, "a"), "Training").get("status") == "True", what="Training")
    a = wait_for(
        lambda: (e := get(cluster, "a")) and condition(e, "Training").get("status") == "Unknown" and e,
        timeout=10,
        what="the heartbeat grace to pass",
    )
    assert condition(a, "Training")["reason"] == "HeartbeatTimeout"
    assert condition(a, "Ready")["status"] == "Unknown"


def test_an_invalid_spec_fails_with_the_field_named_and_never_loops(
    cluster: Cluster, operator: Operator
) -> None:
    api = cluster.api
    api.create(pool("smol", max_rank=32))
    add_pod(api, "smol", 0)
    api.create(experiment("too-big", "smol", rank=64))
    bad = experiment("two-datasets", "smol")
    bad["spec"]["dataset"]["inline"] = [{"prompt": "1+1", "answer": "2"}]  # KMock does not enforce the schema
    api.create(bad)

    too_big = wait_for(lambda: (e := get(cluster, "too-big")) and condition(e, "Failed") and e, what="Failed")
    assert condition(too_big, "Failed")["reason"] == "InvalidSpec"
    assert (
        "spec.lora.rank: 64 exceeds pool smol capacity.maxLoRARank 32"
        in condition(too_big, "Failed")["message"]
    )
    assert too_big["status"]["phase"] == "Failed" and placement(too_big) is None
    two = wait_for(
        lambda: (e := get(cluster, "two-datasets")) and condition(e, "Failed") and e, what="Failed"
    )
    assert condition(two, "Failed")["reason"] == "InvalidSpec"
    assert (
        "spec.dataset: set exactly one of builtin, inline, file, configMap"
        in condition(two, "Failed")["message"]
    )

    # Its status, then its labels are written once; after that, passes leave it alone.
    settled = wait_for(lambda: (e := get(cluster, "too-big")) and e["metadata"].get("labels") and e)
    version = settled["metadata"]["resourceVersion"]
    time.sleep(1.5)  # three resync periods
    assert (get(cluster, "too-big") or {})["metadata"]["resourceVersion"] == version

    api.patch("LoRAExperiment", "too-big", {"spec": {"lora": {"rank": 16}}})
    wait_for(lambda: placement(get(cluster, "too-big")) == "smol-0", what="the fixed spec placed")
    assert not condition(get(cluster, "too-big"), "Failed")


def test_an_experiment_waits_for_its_pool(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(experiment("early", "later"))
    early = wait_for(
        lambda: (e := get(cluster, "early")) and condition(e, "Placed").get("reason") == "PoolNotFound" and e
    )
    assert "spec.poolRef.name: no SharedBasePool 'later'" in condition(early, "Placed")["message"]
    assert early["status"]["phase"] == "Pending"
    api.create(pool("later"))
    add_pod(api, "later", 0)
    wait_for(lambda: placement(get(cluster, "early")) == "later-0", what="placed once the pool exists")


def test_suspend_unplaces_and_resume_places_again(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol"))
    add_pod(api, "smol", 0)
    api.create(experiment("a", "smol"))
    wait_for(lambda: placement(get(cluster, "a")), what="placed")
    api.patch("LoRAExperiment", "a", {"spec": {"suspend": True}})
    a = wait_for(lambda: (e := get(cluster, "a")) and e["status"].get("phase") == "Suspended" and e)
    assert placement(a) is None and a["status"]["restarts"] == 0
    assert condition(a, "Suspended")["status"] == "True"
    assert a["status"]["observedGeneration"] == 2
    api.patch("LoRAExperiment", "a", {"spec": {"suspend": False}})
    wait_for(lambda: placement(get(cluster, "a")) == "smol-0", what="placed after resuming")


def test_deleting_an_experiment_frees_its_slot(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol", slots=1))
    add_pod(api, "smol", 0)
    api.create(experiment("first", "smol"))
    wait_for(lambda: placement(get(cluster, "first")), what="first placed")
    api.create(experiment("next", "smol", priority=5))
    wait_for(lambda: condition(get(cluster, "next"), "Placed").get("reason") == "WaitingForCapacity")
    api.delete("LoRAExperiment", "first")
    wait_for(lambda: placement(get(cluster, "next")) == "smol-0", what="next placed")
    phases = {"namespace": "default", "pool": "smol", "phase": "Placed"}
    wait_for(lambda: operator.registry.get_sample_value("loraplex_experiments", phases) == 1)
