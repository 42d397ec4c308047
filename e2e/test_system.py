"""The whole system as a cluster runs it: the operator and trainer agents as processes, one scenario.

The API server is the emulator (KMock over HTTP); :mod:`e2e.node` plays the
StatefulSet controller and the kubelet, so every trainer is a real
``loraplex agent`` process started from the pod the operator rendered. The
tests below run in order against one system and each picks up where the last
left off: a pool comes up; more experiments than slots wait, the pool scales
up and they are packed; a failing ConfigMap reward fails only its experiment;
Auto promotion fills the ConfigMap; a SIGKILLed trainer and a drained
(SIGTERMed) one resume from their checkpoints; a promotion is rolled back; an
idle replica is scaled away; a new model rolls the pods and training resumes.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from e2e.node import Node
from tests.operator.integration.conftest import Api, EmulatorThread, wait_for, write_kubeconfig
from tests.processes import checkout_env, loraplex
from tests.trainer.conftest import build_tiny_model, build_tiny_tokenizer

T = TypeVar("T")
POOL = "tiny"
RAISES = "def reward(prompt, completion, row):\n    raise RuntimeError('this reward is broken')\n"


@dataclass
class System:
    api: Api
    node: Node
    operator: subprocess.Popen[bytes]
    operator_log: Path

    def experiment(self, name: str) -> dict[str, Any]:
        return self.api.get("LoRAExperiment", name) or {}

    def status(self, name: str) -> dict[str, Any]:
        return self.experiment(name).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})

    def replica_of(self, name: str) -> str:
        return (self.status(name).get("placement") or {}).get("replica", "")

    def step_of(self, name: str) -> int:
        return int((self.status(name).get("training") or {}).get("step") or 0)

    def pool(self) -> dict[str, Any]:
        return self.api.get("SharedBasePool", POOL) or {}

    def diagnose(self) -> str:
        """What to read when a wait fails: the operator's tail and every pod's."""
        parts = [f"node errors: {self.node.errors}", "operator: " + self.operator_log.read_text()[-3000:]]
        for pod in sorted(self.node.containers):
            parts.append(f"{pod}: " + self.node.log(pod)[-3000:])
        return "\n\n".join(parts)


def until(system: System, check: Callable[[], T], *, timeout: float = 90, what: str) -> T:
    try:
        return wait_for(check, timeout=timeout, interval=0.3, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n\n{system.diagnose()}") from None


def experiment(name: str, *, steps: int, reward: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name},
        "spec": {
            "poolRef": {"name": POOL},
            "lora": {"rank": 2, "alpha": 4, "targetModules": ["q_proj", "v_proj"]},
            "dataset": {"builtin": {"name": "arithmetic", "size": 40, "seed": 1}},
            "reward": reward or {"builtin": {"name": "length", "args": {"target": 3}}},
            "algorithm": {"groupSize": 2, "promptsPerStep": 1, "maxSteps": steps, "maxNewTokens": 4},
            "optimizer": {"learningRate": 0.01},
            "evaluation": {"everySteps": 2, "samples": 2},
            "checkpoint": {"everySteps": 2, "keepLast": 3},
            "backoffLimit": 4,
            **spec,
        },
    }


def pool_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "SharedBasePool",
        "metadata": {"name": POOL},
        "spec": {
            "model": {"name": "tiny-llama", "uri": "pvc://models/tiny", "dtype": "float32"},
            "replicas": 1,
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "scaleDownDelaySeconds": 3},
            "capacity": {"maxAdaptersPerReplica": 2, "maxLoRARank": 8},
            "storage": {"claimName": "storage", "subPath": "loraplex"},
            # One CPU each: the node pins each trainer to one core, and torch follows.
            "trainer": {"resources": {"limits": {"cpu": "1", "memory": "4Gi"}}},
        },
    }


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("e2e")
    server = EmulatorThread().start()
    kubeconfig = write_kubeconfig(root / "kubeconfig", server.url)
    api = Api(server.url)
    node = Node(api, root / "node", kubeconfig=kubeconfig, extra_env={"HF_HUB_OFFLINE": "1"})
    tokenizer = build_tiny_tokenizer()
    for name in ("tiny", "tiny-v2"):
        build_tiny_model(tokenizer).save_pretrained(node.pvc("models") / name)
        tokenizer.save_pretrained(node.pvc("models") / name)
    operator_log = root / "operator.log"
    env = checkout_env(
        KUBECONFIG=str(kubeconfig),
        LORAPLEX_RESYNC_SECONDS="0.5",
        LORAPLEX_HEARTBEAT_GRACE_SECONDS="60",
        LORAPLEX_REPLICA_GRACE_SECONDS="45",
    )
    command = loraplex("operator", "--namespace", "default", "--standalone", "--metrics-port", "0")
    command.append("--liveness=http://127.0.0.1:0/healthz")
    with operator_log.open("wb") as out:
        operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    node.start()
    system = System(api=api, node=node, operator=operator, operator_log=operator_log)
    try:
        until(
            system,
            lambda: {"sharedbasepools", "loraexperiments", "pods"} <= server.watched(),
            what="the operator's watches",
        )
        yield system
    finally:
        node.stop()
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()
        server.stop()


def test_a_pool_comes_up_with_a_ready_trainer_that_reports_its_model(system: System) -> None:
    system.api.create(pool_manifest())
    until(system, lambda: system.api.get("StatefulSet", POOL), what="the StatefulSet")
    until(system, lambda: system.pool().get("status", {}).get("readyReplicas") == 1, what="replica 0 ready")
    model = until(system, lambda: system.pool().get("status", {}).get("model"), what="status.model")
    assert model["parameterCount"] > 0
    log = system.node.log(f"{POOL}-0")
    # The pod's env and volumes reached the agent: its identity, the pvc:// model, one CPU.
    assert f"replica={POOL}-0" in log and "event=torch_threads threads=1" in log
    assert re.search(r"event=base_model_loaded uri=file://\S+/pvc/models/tiny ", log), log[-2000:]


def test_more_experiments_than_slots_wait_then_the_pool_scales_up(system: System) -> None:
    api = system.api
    promotion = {"policy": "Auto", "metric": "eval_reward"}
    api.create(experiment("alpha", steps=100_000, promotion=promotion))
    api.create(experiment("beta", steps=100_000))
    until(system, lambda: system.replica_of("alpha") and system.replica_of("beta"), what="two placed")
    api.create(experiment("gamma", steps=100_000))
    waiting = until(system, lambda: system.condition("gamma", "Placed"), what="gamma's Placed condition")
    # Two slots per replica: the first two are packed onto replica 0; the third waits for capacity.
    assert {system.replica_of("alpha"), system.replica_of("beta")} == {f"{POOL}-0"}
    assert (waiting["status"], waiting["reason"]) == ("False", "WaitingForCapacity")
    until(system, lambda: system.replica_of("gamma") == f"{POOL}-1", timeout=120, what="gamma on replica 1")
    assert system.pool()["spec"]["replicas"] == 2
    for name in ("alpha", "beta", "gamma"):
        until(system, lambda n=name: system.condition(n, "Training").get("status") == "True", what=name)


def test_a_failing_configmap_reward_fails_only_its_experiment(system: System) -> None:
    api = system.api
    api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "broken"}, "data": {"r.py": RAISES}}
    )
    api.create(
        experiment("broken", steps=10, reward={"python": {"configMap": {"name": "broken", "key": "r.py"}}})
    )
    failed = until(
        system,
        lambda: (
            system.condition("broken", "Failed").get("status") == "True"
            and system.condition("broken", "Failed")
        ),
        what="broken to fail",
    )
    assert "this reward is broken" in failed["message"]
    for name in ("beta", "gamma"):
        assert system.condition(name, "Training")["status"] == "True", system.status(name)


def test_auto_promotion_fills_the_configmap_with_a_checkpoint_on_the_claim(system: System) -> None:
    promoted = until(
        system, lambda: system.status("alpha").get("adapter", {}).get("promoted"), what="promoted"
    )
    data = until(
        system,
        lambda: (system.api.get("ConfigMap", f"{POOL}-promoted-adapters") or {}).get("data", {}).get("alpha"),
        what="the promoted-adapters ConfigMap",
    )
    assert data.startswith("pvc://storage/loraplex/default/alpha/")
    claim, _, inside = data.removeprefix("pvc://").partition("/")
    folder = system.node.pvc(claim) / inside
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    assert promoted["revision"] == folder.name


def test_a_sigkilled_trainer_restarts_and_resumes_from_its_checkpoint(system: System) -> None:
    pod = system.replica_of("beta")
    until(system, lambda: system.step_of("beta") >= 4, what="beta to pass a checkpoint")
    system.node.kill(pod)
    # Inside the replica grace: the experiment keeps its replica and the restart is counted.
    until(system, lambda: system.status("beta").get("restarts") == 1, what="beta's restart to be counted")
    assert system.replica_of("beta") == pod
    until(
        system, lambda: system.node.log(pod).count("event=agent_started") == 2, what="the container's restart"
    )
    resumed = until(
        system,
        lambda: re.findall(r"event=resume adapter=beta step=(\d+)", system.node.log(pod)),
        what="beta to resume",
    )
    assert int(resumed[-1]) >= 2
    until(system, lambda: system.condition("beta", "Training").get("status") == "True", what="beta training")
    assert any(code == -signal.SIGKILL for name, _, code in system.node.history if name == pod)


def test_a_drained_trainer_checkpoints_on_sigterm_and_its_successor_resumes(system: System) -> None:
    pod = system.replica_of("gamma")
    old = system.node.containers[pod]
    until(system, lambda: system.step_of("gamma") >= 3, what="gamma to train")
    system.node.evict(pod)
    until(system, lambda: (pod, old.uid, 0) in system.node.history, what="a clean exit on SIGTERM")
    old_log = old.log_path().read_text()
    assert "event=stopping signal=SIGTERM" in old_log and "event=interrupted" in old_log
    saved = int(re.findall(r"event=checkpoint adapter=gamma step=(\d+)", old_log)[-1])
    until(
        system,
        lambda: (c := system.node.containers.get(pod)) is not None and c.uid != old.uid,
        what="the StatefulSet to create the pod again",
    )
    resumed = until(
        system,
        lambda: re.findall(r"event=resume adapter=gamma step=(\d+)", system.node.log(pod)),
        what="gamma to resume on the new pod",
    )
    # Nothing trained before the signal is lost: the successor starts at the step the drain saved.
    assert int(resumed[-1]) == saved
    until(system, lambda: system.status("gamma").get("restarts") == 1, what="the recreated pod counted")


def test_a_pinned_revision_is_promoted_and_rolling_back_restores_the_previous(system: System) -> None:
    first = system.status("alpha")["adapter"]["promoted"]
    newer = until(
        system,
        lambda: (c := system.status("alpha")["adapter"].get("candidate")) and c["step"] > first["step"] and c,
        what="a newer candidate",
    )
    system.api.patch(
        "LoRAExperiment", "alpha", {"spec": {"promotion": {"promotedRevision": newer["revision"]}}}
    )
    until(system, lambda: _served(system, "alpha") == newer["uri"], what="the pinned revision served")
    assert system.status("alpha")["adapter"]["previous"]["revision"] == first["revision"]
    # The rollback: pin the previous revision again; the pointer and the ConfigMap move back.
    system.api.patch(
        "LoRAExperiment", "alpha", {"spec": {"promotion": {"promotedRevision": first["revision"]}}}
    )
    until(system, lambda: _served(system, "alpha") == first["uri"], what="the rollback served")
    assert system.status("alpha")["adapter"]["promoted"]["revision"] == first["revision"]
    assert (system.node.pvc("storage") / first["uri"].removeprefix("pvc://storage/")).is_dir()


def _served(system: System, name: str) -> str | None:
    """What the promoted-adapters ConfigMap maps the experiment to, once status agrees with it."""
    data = (system.api.get("ConfigMap", f"{POOL}-promoted-adapters") or {}).get("data") or {}
    promoted = (system.status(name).get("adapter") or {}).get("promoted") or {}
    return data.get(name) if data.get(name) == promoted.get("uri") else None


def test_an_idle_replica_is_scaled_away(system: System) -> None:
    system.api.delete("LoRAExperiment", "gamma")
    until(system, lambda: system.pool()["spec"]["replicas"] == 1, timeout=60, what="scale-down to 1")
    until(system, lambda: f"{POOL}-1" not in system.node.containers, timeout=60, what="replica 1 gone")
    assert system.replica_of("beta") == f"{POOL}-0"


def test_a_new_model_rolls_the_pods_and_training_resumes(system: System) -> None:
    old_uid = system.node.containers[f"{POOL}-0"].uid
    step = system.step_of("beta")
    system.api.patch("SharedBasePool", POOL, {"spec": {"model": {"uri": "pvc://models/tiny-v2"}}})
    until(
        system,
        lambda: (c := system.node.containers.get(f"{POOL}-0")) is not None and c.uid != old_uid,
        timeout=120,
        what="the pod rolled",
    )
    until(
        system,
        lambda: re.search(r"event=base_model_loaded uri=\S+/models/tiny-v2 ", system.node.log(f"{POOL}-0")),
        what="the new model loaded",
    )
    until(
        system,
        lambda: "event=resume adapter=beta" in system.node.log(f"{POOL}-0"),
        what="beta to resume on the new pod",
    )
    until(system, lambda: system.step_of("beta") > step, what="beta to train on the new pod")
    assert system.replica_of("beta") == f"{POOL}-0"
    # SIGKILLed once, recreated for the new model once: both count against backoffLimit.
    until(system, lambda: system.status("beta").get("restarts") == 2, what="the rolled pod counted")


def _checkpoints(system: System, name: str) -> list[Path]:
    uid = system.experiment(name)["metadata"]["uid"]
    folder = system.node.pvc("storage") / "loraplex" / "default" / name / uid
    return [p for p in folder.rglob("step-*") if p.is_dir()]
