"""Tests for a whole reconcile pass, without a server: raw objects in, patches out, applied, planned again."""

from __future__ import annotations

import copy
from typing import Any

from loraplex_operator.lifecycle import Timing
from loraplex_operator.observed import observe_experiment, observe_pod, observe_pool
from loraplex_operator.patches import merge
from loraplex_operator.planner import PoolMemory, PoolPlan, plan_orphan, plan_pool
from loraplex_operator.poolstatus import Provisioning

NOW = 1_750_000_000.0
TIMING = Timing(heartbeat_grace=120, replica_grace=60)
PROVISIONED = Provisioning(True, "StatefulSetCreated", "applied")


def stamp(t: float) -> str:
    from loraplex_operator.clock import to_rfc3339

    return to_rfc3339(t)


def pool_body(replicas: int = 1, slots: int = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "SharedBasePool",
        "metadata": {"name": "p", "namespace": "ns", "uid": "pool-uid", "generation": 1},
        "spec": {
            "model": {"name": "smol", "uri": "builtin://smollm2-135m-instruct"},
            "replicas": replicas,
            "capacity": {"maxAdaptersPerReplica": slots, "maxLoRARank": 64},
        },
    }
    body["spec"].update(spec)
    return body


def exp_body(name: str, created: float = NOW - 100, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": stamp(created),
        },
        "spec": {
            "poolRef": {"name": "p"},
            "lora": {"rank": 8},
            "dataset": {"builtin": {"name": "arithmetic"}},
            "reward": {"builtin": {"name": "exact_match"}},
        },
    }
    body["spec"].update(spec)
    return body


def pod_body(
    ordinal: int, ready: bool = True, since: float = NOW - 1000, uid: str = "", restarts: int = 0
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"p-{ordinal}",
            "namespace": "ns",
            "uid": uid or f"pod-{ordinal}",
            "labels": {"loraplex.dev/pool": "p", "statefulset.kubernetes.io/pod-name": f"p-{ordinal}"},
        },
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": stamp(since)}
            ],
            "containerStatuses": [{"name": "trainer", "restartCount": restarts}],
        },
    }


class World:
    """Raw objects, as a watch would deliver them, and a way to run passes and apply their writes."""

    def __init__(self, pool: dict[str, Any], experiments: list[dict[str, Any]], pods: list[dict[str, Any]]):
        self.pool = pool
        self.experiments = {e["metadata"]["name"]: e for e in experiments}
        self.pods = pods
        self.memory = PoolMemory()

    def plan(self, now: float = NOW) -> PoolPlan:
        return plan_pool(
            observe_pool(self.pool),
            [observe_experiment(e) for e in self.experiments.values()],
            [v for v in (observe_pod(p) for p in self.pods) if v is not None],
            self.memory,
            PROVISIONED,
            now=now,
            timing=TIMING,
        )

    def step(self, now: float = NOW) -> PoolPlan:
        plan = self.plan(now)
        for p in plan.experiments:
            body = self.experiments[p.experiment.name]
            if p.status_patch:
                body["status"] = merge(body.get("status") or {}, p.status_patch)
            if p.metadata_patch:
                body["metadata"] = merge(body["metadata"], p.metadata_patch)
        if plan.status_patch:
            self.pool["status"] = merge(self.pool.get("status") or {}, plan.status_patch)
        if plan.scale is not None:
            self.pool["spec"]["replicas"] = plan.scale.replicas
        self.memory = plan.memory
        return plan

    def status(self, name: str) -> dict[str, Any]:
        return self.experiments[name].get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    def trainer_reports(self, name: str, **training: Any) -> None:
        status = self.experiments[name].setdefault("status", {})
        status["training"] = training


def test_places_within_capacity_and_the_rest_waits() -> None:
    world = World(
        pool_body(slots=2), [exp_body(f"e{i}", created=NOW - 100 + i) for i in range(3)], [pod_body(0)]
    )
    plan = world.step()
    assert world.status("e0")["placement"]["replica"] == "p-0"
    assert world.status("e1")["placement"]["replica"] == "p-0"
    assert "placement" not in world.status("e2")
    assert world.condition("e2", "Placed")["reason"] == "WaitingForCapacity"  # type: ignore[index]
    assert world.experiments["e0"]["metadata"]["labels"] == {
        "loraplex.dev/pool": "p",
        "loraplex.dev/replica": "p-0",
    }
    assert world.experiments["e2"]["metadata"]["labels"] == {"loraplex.dev/pool": "p"}
    assert world.status("e0")["phase"] == "Placed" and world.status("e2")["phase"] == "Pending"
    assert {p.experiment.name: p.waited for p in plan.experiments}["e0"] == 100
    capacity = world.pool["status"]["capacity"]
    assert (capacity["adapterSlots"], capacity["usedSlots"], capacity["pendingExperiments"]) == (2, 2, 1)
    assert plan.scale is None  # autoscaling is off
    assert [e.reason for e in plan.experiments[0].events] == ["Placed"]


def test_a_second_pass_writes_nothing() -> None:
    world = World(pool_body(slots=2), [exp_body(f"e{i}") for i in range(3)], [pod_body(0)])
    world.step()
    again = world.step(NOW + 5)
    assert all(not p.status_patch and not p.metadata_patch and not p.events for p in again.experiments)
    assert again.status_patch == {}


def test_autoscaling_asks_for_a_replica_when_full() -> None:
    pool = pool_body(slots=1, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3})
    world = World(pool, [exp_body("a"), exp_body("b")], [pod_body(0)])
    plan = world.step()
    assert plan.scale is not None and plan.scale.replicas == 2
    assert world.condition("b", "Placed")["reason"] == "WaitingForCapacity"  # type: ignore[index]
    assert [e.reason for e in plan.events] == ["ScaleUp"]
    world.pods.append(pod_body(1))
    world.step(NOW + 10)
    assert world.status("b")["placement"]["replica"] == "p-1"


def test_trainer_reports_become_conditions_and_completion_frees_the_slot() -> None:
    world = World(pool_body(slots=1), [exp_body("a", created=NOW - 200), exp_body("b")], [pod_body(0)])
    world.step()
    world.trainer_reports("a", state="Running", step=3, totalSteps=10, lastHeartbeatTime=stamp(NOW + 1))
    world.step(NOW + 2)
    assert world.condition("a", "Training")["status"] == "True"  # type: ignore[index]
    assert world.status("a")["phase"] == "Training"
    assert world.condition("a", "Ready")["status"] == "True"  # type: ignore[index]

    world.trainer_reports("a", state="Completed", step=10, totalSteps=10, lastHeartbeatTime=stamp(NOW + 3))
    plan = world.step(NOW + 4)
    assert world.status("a")["phase"] == "Succeeded"
    assert "placement" not in world.status("a")
    assert world.status("a")["completionTime"] == stamp(NOW + 4)
    assert "loraplex.dev/replica" not in world.experiments["a"]["metadata"]["labels"]
    assert world.status("b")["placement"]["replica"] == "p-0"
    reasons = {p.experiment.name: [e.reason for e in p.events] for p in plan.experiments}
    assert reasons == {"a": ["Succeeded"], "b": ["Placed"]}


def test_an_interrupted_report_keeps_the_slot_and_says_training_stopped() -> None:
    world = World(pool_body(), [exp_body("a")], [pod_body(0)])
    world.step()
    world.trainer_reports("a", state="Running", step=3, lastHeartbeatTime=stamp(NOW + 1))
    world.step(NOW + 2)
    message = "stopped by SIGTERM at step 3; resumes from checkpoint step-00000003"
    world.trainer_reports("a", state="Interrupted", step=3, message=message, lastHeartbeatTime=stamp(NOW + 3))
    world.step(NOW + 4)
    training = world.condition("a", "Training")
    assert training is not None and (training["status"], training["reason"]) == ("False", "Interrupted")
    assert world.status("a")["placement"]["replica"] == "p-0"  # not finished: its replica resumes it
    assert world.status("a")["phase"] != "Succeeded"


def test_silence_makes_training_unknown() -> None:
    world = World(pool_body(), [exp_body("a")], [pod_body(0)])
    world.step()
    world.trainer_reports("a", state="Running", step=1, lastHeartbeatTime=stamp(NOW + 1))
    world.step(NOW + 2)
    world.step(NOW + 200)
    assert world.condition("a", "Training")["status"] == "Unknown"  # type: ignore[index]
    assert world.condition("a", "Ready")["status"] == "Unknown"  # type: ignore[index]


def test_trainer_failure_fails_the_experiment() -> None:
    world = World(pool_body(), [exp_body("a")], [pod_body(0)])
    world.step()
    world.trainer_reports("a", state="Failed", message="reward raised ZeroDivisionError")
    world.step(NOW + 1)
    failed = world.condition("a", "Failed")
    assert failed is not None and (failed["reason"], failed["message"]) == (
        "TrainingFailed",
        "reward raised ZeroDivisionError",
    )
    assert world.condition("a", "Stalled")["status"] == "True"  # type: ignore[index]
    assert world.status("a")["phase"] == "Failed"


def test_a_lost_replica_costs_a_restart_and_a_new_placement() -> None:
    world = World(pool_body(replicas=2, slots=1), [exp_body("a")], [pod_body(0), pod_body(1)])
    world.step()
    replica = world.status("a")["placement"]["replica"]
    lost = int(replica.rsplit("-", 1)[1])
    world.pods[lost] = pod_body(lost, ready=False, since=NOW + 10)
    world.step(NOW + 30)  # within the grace period: nothing moves
    assert world.status("a")["placement"]["replica"] == replica
    plan = world.step(NOW + 100)
    assert world.status("a")["restarts"] == 1
    assert world.status("a")["placement"]["replica"] == f"p-{1 - lost}"
    assert [e.reason for e in plan.experiments[0].events][:2] == ["ReplicaLost", "Placed"]


def test_a_restarted_trainer_costs_a_restart_inside_the_grace_and_keeps_its_replica() -> None:
    world = World(pool_body(replicas=1, slots=1), [exp_body("a", backoffLimit=2)], [pod_body(0)])
    world.step()
    assert world.status("a")["placement"]["replicaIncarnation"] == "pod-0/0"
    world.step(NOW + 1)
    assert world.status("a")["restarts"] == 0  # the same pod, seen again, is no restart

    # The container exits and the kubelet restarts it: seconds later, well inside the 60 s grace.
    world.pods[0] = pod_body(0, ready=False, since=NOW + 2, restarts=1)
    plan = world.step(NOW + 3)
    assert world.status("a")["restarts"] == 1
    assert world.status("a")["placement"]["replica"] == "p-0"
    assert world.status("a")["placement"]["replicaIncarnation"] == "pod-0/1"
    assert [e.reason for e in plan.experiments[0].events][:1] == ["ReplicaRestarted"]
    world.step(NOW + 4)
    assert world.status("a")["restarts"] == 1  # counted once per restart

    # The pod is deleted and the StatefulSet creates it again: a new uid.
    world.pods[0] = pod_body(0, ready=False, since=NOW + 5, uid="pod-0-again")
    world.step(NOW + 6)
    assert world.status("a")["restarts"] == 2

    # A crash loop: the third restart exceeds backoffLimit 2.
    world.pods[0] = pod_body(0, ready=False, since=NOW + 7, uid="pod-0-again", restarts=1)
    world.step(NOW + 8)
    failed = world.condition("a", "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert "restarted (container restarts 0 -> 1)" in failed["message"]
    assert "backoffLimit is 2" in failed["message"]


def test_a_placement_without_a_recorded_pod_records_it_without_a_restart() -> None:
    # As an operator from before replicaIncarnation existed wrote it.
    world = World(pool_body(replicas=1, slots=1), [exp_body("a", backoffLimit=0)], [pod_body(0, restarts=3)])
    world.experiments["a"]["status"] = {"placement": {"pool": "p", "replica": "p-0", "placedAt": stamp(NOW)}}
    world.step(NOW + 1)
    assert world.status("a")["restarts"] == 0
    assert world.status("a")["placement"]["replicaIncarnation"] == "pod-0/3"
    assert world.condition("a", "Failed") is None


def test_scaling_away_a_replica_replaces_at_once_and_backoff_limit_fails() -> None:
    world = World(
        pool_body(replicas=2, slots=1),
        [exp_body("a", backoffLimit=0), exp_body("b")],
        [pod_body(0), pod_body(1)],
    )
    world.step()
    on_1 = next(n for n in ("a", "b") if world.status(n)["placement"]["replica"] == "p-1")
    world.pool["spec"]["replicas"] = 1
    world.step(NOW + 1)
    if on_1 == "a":
        assert world.condition("a", "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]
    else:
        assert world.status("b")["restarts"] == 1
        assert world.condition("b", "Placed")["reason"] == "WaitingForCapacity"  # type: ignore[index]


def test_suspend_unplaces_without_a_restart_and_resume_places_again() -> None:
    world = World(pool_body(), [exp_body("a")], [pod_body(0)])
    world.step()
    world.experiments["a"]["spec"]["suspend"] = True
    world.experiments["a"]["metadata"]["generation"] = 2
    world.step(NOW + 1)
    assert world.status("a")["phase"] == "Suspended"
    assert "placement" not in world.status("a") and "startTime" not in world.status("a")
    assert world.status("a")["restarts"] == 0
    world.experiments["a"]["spec"]["suspend"] = False
    world.experiments["a"]["metadata"]["generation"] = 3
    world.step(NOW + 2)
    assert world.status("a")["placement"]["replica"] == "p-0"
    assert world.condition("a", "Suspended")["status"] == "False"  # type: ignore[index]
    assert world.status("a")["observedGeneration"] == 3


def test_a_reward_asking_for_more_memory_than_the_pool_allows_is_invalid() -> None:
    greedy = exp_body("greedy", reward={"python": {"file": "r.py", "memory": "16Gi"}})
    terms = [{"weight": 1, "python": {"file": "r.py", "memory": "4Gi"}}]
    fine = exp_body("fine", reward={"terms": terms})
    world = World(pool_body(trainer={"rewardLimits": {"maxMemory": "8Gi"}}), [greedy, fine], [pod_body(0)])
    world.step()
    failed = world.condition("greedy", "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec"
    assert (
        "spec.reward.python.memory: 16Gi exceeds pool p trainer.rewardLimits.maxMemory 8Gi"
        in failed["message"]
    )
    assert world.status("fine")["placement"]["replica"] == "p-0"


def test_deadline_counts_from_the_start() -> None:
    world = World(pool_body(), [exp_body("a", activeDeadlineSeconds=60)], [pod_body(0)])
    world.step()
    world.step(NOW + 59)
    assert world.condition("a", "Failed") is None
    world.step(NOW + 61)
    assert world.condition("a", "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]
    assert "placement" not in world.status("a")


def test_invalid_specs_name_the_field_and_a_fix_is_judged_again() -> None:
    bad_schema = exp_body("schema", lora={"rank": 0})
    too_big = exp_body("rank", lora={"rank": 128})
    world = World(pool_body(), [bad_schema, too_big], [pod_body(0)])
    world.step()
    schema_failed = world.condition("schema", "Failed")
    assert schema_failed is not None and schema_failed["reason"] == "InvalidSpec"
    assert "spec.lora.rank" in schema_failed["message"]
    rank_failed = world.condition("rank", "Failed")
    assert rank_failed is not None
    assert "spec.lora.rank: 128 exceeds pool p capacity.maxLoRARank 64" in rank_failed["message"]

    world.experiments["rank"]["spec"]["lora"]["rank"] = 16
    world.experiments["rank"]["metadata"]["generation"] = 2
    world.step(NOW + 1)
    assert world.condition("rank", "Failed") is None
    assert world.status("rank")["placement"]["replica"] == "p-0"


def test_unknown_target_modules_fail_once_the_model_facts_are_known() -> None:
    pool = pool_body()
    pool["status"] = {
        "model": {
            "parameterCount": 1000,
            "hiddenSize": 8,
            "numLayers": 1,
            "linearModules": {"q_proj": {"in": 8, "out": 8, "count": 1}},
        }
    }
    world = World(pool, [exp_body("a", lora={"rank": 8, "targetModules": ["gate_proj"]})], [pod_body(0)])
    world.step()
    failed = world.condition("a", "Failed")
    assert failed is not None and "spec.lora.targetModules: gate_proj" in failed["message"]
    assert world.pool["status"]["model"]["hiddenSize"] == 8  # the trainer's facts are never overwritten


def test_orphans_wait_for_their_pool() -> None:
    plan = plan_orphan(observe_experiment(exp_body("a")), now=NOW, timing=TIMING)
    placed = next(c for c in plan.owned.conditions if c.type == "Placed")
    assert (placed.status, placed.reason) == ("False", "PoolNotFound")
    assert "spec.poolRef.name: no SharedBasePool 'p' in namespace ns" in placed.message
    assert plan.owned.phase == "Pending"


def test_a_deleted_pool_releases_its_experiments() -> None:
    world = World(pool_body(), [exp_body("a")], [pod_body(0)])
    world.step()
    world.pool["metadata"]["deletionTimestamp"] = stamp(NOW + 1)
    world.step(NOW + 2)
    assert "placement" not in world.status("a")
    assert world.condition("a", "Placed")["reason"] == "PoolNotFound"  # type: ignore[index]
    assert world.status("a")["restarts"] == 0


def test_suspended_pool_holds_experiments_and_says_so() -> None:
    world = World(pool_body(suspend=True), [exp_body("a")], [])
    world.step()
    assert world.condition("a", "Placed")["reason"] == "PoolSuspended"  # type: ignore[index]
    conditions = {c["type"]: c for c in world.pool["status"]["conditions"]}
    assert conditions["Suspended"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "Suspended"


def test_pool_status_counts_and_conditions() -> None:
    pods = [pod_body(0), pod_body(1, ready=False)]
    pods[1]["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}}
    ]
    world = World(pool_body(replicas=2), [exp_body("a")], pods)
    world.step()
    status = world.pool["status"]
    assert (status["replicas"], status["readyReplicas"]) == (2, 1)
    assert status["observedGeneration"] == 1
    assert status["selector"].endswith("loraplex.dev/pool=p")
    assert status["replicaStatus"] == [
        {"name": "p-0", "ready": True, "adapters": 1},
        {"name": "p-1", "ready": False, "adapters": 0},
    ]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["ReplicaFailure"]["status"] == "True"
    assert conditions["ReplicaFailure"]["reason"] == "CrashLoopBackOff"
    assert conditions["Ready"]["reason"] == "ReplicasFailing"
    assert conditions["Provisioned"]["status"] == "True"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_a_model_that_cannot_be_had_is_a_pool_condition_not_a_crash_loop() -> None:
    world = World(pool_body(), [], [pod_body(0, ready=False)])
    uri = "hf://meta-llama/Llama-3.2-1B"
    message = f"model uri {uri!r}: meta-llama/Llama-3.2-1B is gated and the token was refused or missing"
    problem = {"reason": "ModelAccessDenied", "message": message, "uri": uri}
    world.pool["status"] = {"model": {"problem": problem}}
    world.step()
    conditions = {c["type"]: c for c in world.pool["status"]["conditions"]}
    assert (conditions["ModelAvailable"]["status"], conditions["ModelAvailable"]["reason"]) == (
        "False",
        "ModelAccessDenied",
    )
    assert uri in conditions["ModelAvailable"]["message"]
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "ModelAccessDenied")
    assert conditions["Stalled"]["status"] == "True"

    # A trainer that loads it replaces status.model with the facts (the problem goes with it).
    world.pool["status"]["model"] = {"parameterCount": 1000}
    world.pods[0] = pod_body(0)
    world.step(NOW + 1)
    conditions = {c["type"]: c for c in world.pool["status"]["conditions"]}
    assert (conditions["ModelAvailable"]["status"], conditions["ModelAvailable"]["reason"]) == (
        "True",
        "ModelLoaded",
    )
    assert conditions["Ready"]["status"] == "True"


def test_promotion_moves_pointers_and_fills_the_configmap_data() -> None:
    world = World(pool_body(), [exp_body("a", promotion={"policy": "Auto", "threshold": 0.5})], [pod_body(0)])
    world.step()
    world.experiments["a"]["status"]["adapter"] = {
        "candidate": {"revision": "step-10", "uri": "file:///ckpt/a/10", "step": 10, "metric": 0.7}
    }
    plan = world.step(NOW + 1)
    assert world.status("a")["adapter"]["promoted"]["revision"] == "step-10"
    assert world.status("a")["adapter"]["candidate"]["revision"] == "step-10"  # the trainer's, kept
    assert plan.adapters == {"a": "file:///ckpt/a/10"}
    assert plan.experiments[0].promotion == "promoted"
    assert "loraplex.dev/adapter-revisions" in world.experiments["a"]["metadata"]["annotations"]
    before = copy.deepcopy(world.experiments["a"])
    world.step(NOW + 2)
    assert world.experiments["a"] == before
