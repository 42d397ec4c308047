"""The operator against KMock: a SharedBasePool's children, spec changes, /scale, suspend, status, deletion."""

from __future__ import annotations

from .builders import add_pod, condition, experiment, placement, pool, set_pod_ready
from .conftest import Cluster, Operator, wait_for


def test_a_pool_gets_its_statefulset_services_and_configmap_with_owner_references(
    cluster: Cluster, operator: Operator
) -> None:
    api = cluster.api
    created = api.create(pool("smol", replicas=2))
    uid = created["metadata"]["uid"]

    children = [("StatefulSet", "smol"), ("Service", "smol-headless"), ("Service", "smol-metrics")]
    children.append(("ConfigMap", "smol-promoted-adapters"))
    for kind, name in children:
        child = wait_for(lambda kind=kind, name=name: api.get(kind, name), what=f"{kind} {name}")
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "SharedBasePool",
            "smol",
            uid,
            True,
        )
        assert child["metadata"]["labels"]["loraplex.dev/pool"] == "smol"

    sts = api.get("StatefulSet", "smol")
    assert sts is not None and sts["spec"]["replicas"] == 2
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == "loraplex-trainer"

    status = wait_for(lambda: (api.get("SharedBasePool", "smol") or {}).get("status"), what="pool status")
    assert status["observedGeneration"] == 1
    assert (
        status["selector"]
        == "app.kubernetes.io/name=loraplex-trainer,app.kubernetes.io/instance=smol,loraplex.dev/pool=smol"
    )
    smol = api.get("SharedBasePool", "smol")
    assert condition(smol, "Provisioned")["status"] == "True"
    assert condition(smol, "Ready")["reason"] == "ReplicasStarting"
    assert "loraplex.dev/finalizer" in smol["metadata"]["finalizers"]  # type: ignore[index]


def test_spec_changes_reach_the_statefulset(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol"))
    wait_for(lambda: api.get("StatefulSet", "smol"), what="StatefulSet")
    api.patch(
        "SharedBasePool",
        "smol",
        {
            "spec": {
                "replicas": 3,
                "trainer": {
                    "image": "registry.example/trainer:2",
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                },
            }
        },
    )

    def rolled_out() -> bool:
        sts = api.get("StatefulSet", "smol") or {}
        container = sts["spec"]["template"]["spec"]["containers"][0]
        return (
            sts["spec"]["replicas"] == 3
            and container["image"] == "registry.example/trainer:2"
            and container["resources"].get("limits") == {"nvidia.com/gpu": 1}
        )

    wait_for(rolled_out, what="the StatefulSet to follow the pool spec")
    wait_for(
        lambda: (api.get("SharedBasePool", "smol") or {})["status"]["observedGeneration"] == 2,
        what="generation 2",
    )


def test_the_scale_subresource_drives_the_statefulset(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol"))
    wait_for(lambda: api.get("StatefulSet", "smol"), what="StatefulSet")
    # What `kubectl scale sbp/smol --replicas=3` sends.
    api.patch("SharedBasePool", "smol", {"spec": {"replicas": 3}}, subresource="scale")
    wait_for(lambda: (api.get("StatefulSet", "smol") or {})["spec"]["replicas"] == 3, what="3 replicas")
    assert (api.get("SharedBasePool", "smol") or {})["spec"]["replicas"] == 3


def test_suspending_a_pool_scales_it_to_zero_and_holds_its_experiments(
    cluster: Cluster, operator: Operator
) -> None:
    api = cluster.api
    api.create(pool("smol", replicas=2))
    add_pod(api, "smol", 0)
    api.create(experiment("a", "smol"))
    wait_for(lambda: placement(api.get("LoRAExperiment", "a")), what="placement")

    api.patch("SharedBasePool", "smol", {"spec": {"suspend": True}})
    wait_for(lambda: (api.get("StatefulSet", "smol") or {})["spec"]["replicas"] == 0, what="0 replicas")
    smol = wait_for(
        lambda: (
            (p := api.get("SharedBasePool", "smol"))
            and condition(p, "Suspended").get("status") == "True"
            and p
        ),
        what="Suspended",
    )
    assert condition(smol, "Ready")["reason"] == "Suspended"
    assert smol["spec"]["replicas"] == 2
    a = wait_for(lambda: (e := api.get("LoRAExperiment", "a")) and not placement(e) and e, what="unplaced")
    assert condition(a, "Placed")["reason"] == "PoolSuspended"
    assert a["status"]["restarts"] == 0

    api.patch("SharedBasePool", "smol", {"spec": {"suspend": False}})
    wait_for(lambda: (api.get("StatefulSet", "smol") or {})["spec"]["replicas"] == 2, what="2 replicas again")
    wait_for(lambda: placement(api.get("LoRAExperiment", "a")) == "smol-0", what="placed again")


def test_pool_status_reads_replica_readiness_from_pods(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol", replicas=2, slots=4))
    add_pod(api, "smol", 0)
    add_pod(api, "smol", 1, ready=False)

    def counted() -> dict | None:
        status = (api.get("SharedBasePool", "smol") or {}).get("status") or {}
        return status if (status.get("replicas"), status.get("readyReplicas")) == (2, 1) else None

    status = wait_for(counted, what="2 replicas, 1 ready")
    assert status["capacity"]["adapterSlots"] == 4
    assert status["replicaStatus"] == [
        {"name": "smol-0", "ready": True, "adapters": 0},
        {"name": "smol-1", "ready": False, "adapters": 0},
    ]

    set_pod_ready(
        api, "smol-1", False, reason="CrashLoopBackOff", message="back-off restarting failed container"
    )
    smol = wait_for(
        lambda: (
            (p := api.get("SharedBasePool", "smol"))
            and condition(p, "ReplicaFailure").get("status") == "True"
            and p
        ),
        what="ReplicaFailure",
    )
    assert condition(smol, "ReplicaFailure")["reason"] == "CrashLoopBackOff"
    assert "smol-1" in condition(smol, "ReplicaFailure")["message"]
    assert condition(smol, "Ready")["reason"] == "ReplicasFailing"

    set_pod_ready(api, "smol-1", True)
    wait_for(
        lambda: condition(api.get("SharedBasePool", "smol"), "Ready").get("reason") == "ReplicasReady",
        what="ReplicasReady",
    )


def test_the_trainers_model_facts_are_never_overwritten(cluster: Cluster, operator: Operator) -> None:
    api = cluster.api
    api.create(pool("smol"))
    wait_for(lambda: (api.get("SharedBasePool", "smol") or {}).get("status"), what="pool status")
    facts = {"parameterCount": 134515008, "hiddenSize": 576, "numLayers": 30, "linearModules": {}}
    api.patch_status("SharedBasePool", "smol", {"model": facts})
    add_pod(api, "smol", 0)  # makes the operator rewrite the pool status
    wait_for(
        lambda: (api.get("SharedBasePool", "smol") or {})["status"].get("readyReplicas") == 1, what="ready"
    )
    assert (api.get("SharedBasePool", "smol") or {})["status"]["model"] == facts


def test_deleting_a_pool_releases_its_experiments_and_its_series(
    cluster: Cluster, operator: Operator
) -> None:
    api = cluster.api
    api.create(pool("smol"))
    add_pod(api, "smol", 0)
    api.create(experiment("a", "smol"))
    wait_for(lambda: placement(api.get("LoRAExperiment", "a")), what="placement")
    sample = operator.registry.get_sample_value
    wait_for(
        lambda: sample("loraplex_pool_slots", {"namespace": "default", "pool": "smol", "state": "used"}) == 1
    )

    api.delete("SharedBasePool", "smol")
    wait_for(lambda: api.get("SharedBasePool", "smol") is None, what="the finalizer to be released")
    a = wait_for(
        lambda: (
            (e := api.get("LoRAExperiment", "a"))
            and condition(e, "Placed").get("reason") == "PoolNotFound"
            and e
        ),
        what="PoolNotFound",
    )
    assert placement(a) is None
    assert "loraplex.dev/replica" not in a["metadata"]["labels"]
    wait_for(
        lambda: (
            sample("loraplex_pool_slots", {"namespace": "default", "pool": "smol", "state": "used"}) is None
        ),
        what="the pool's series to be removed",
    )
    # KMock has no garbage collector: the owner references above are what deletes the children.
    assert (api.get("StatefulSet", "smol") or {})["metadata"]["ownerReferences"][0][
        "kind"
    ] == "SharedBasePool"
