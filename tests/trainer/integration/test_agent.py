"""The trainer agent against KMock over real HTTP, training the tiny model.

The test plays the operator: it creates a pool and experiments and writes their placement.
The agent must write the pool's status.model, each experiment's status.training (Loading,
Running, Completed, Failed) and status.adapter.candidate, wait for a ConfigMap that comes
late, and drop an adapter whose placement moves to another replica.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loraplex_api.wire import experiment_folder
from loraplex_trainer.agent import Agent, AgentConfig
from loraplex_trainer.checkpoint import verify
from loraplex_trainer.cluster import ClusterClient
from tests.operator.integration.conftest import NAMESPACE, Cluster, wait_for
from tests.processes import checkout_env, loraplex

T = TypeVar("T")

REPLICA = "tiny-0"
VOWELS = """
def reward(prompt, completion, row):
    return sum(c in "aeiou" for c in completion) / max(len(completion), 1)
"""
ROWS = "\n".join(
    f'{{"prompt": "Q{i}: say {w}", "answer": "{w}"}}' for i, w in enumerate(["cat", "dog", "eel"])
)


def experiment(
    name: str, dataset: dict[str, Any], reward: dict[str, Any], *, max_steps: int
) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name, "labels": {"loraplex.dev/pool": "tiny", "loraplex.dev/replica": REPLICA}},
        "spec": {
            "poolRef": {"name": "tiny"},
            "lora": {"rank": 2, "alpha": 4, "targetModules": ["q_proj", "v_proj"]},
            "dataset": dataset,
            "reward": reward,
            "algorithm": {"groupSize": 2, "promptsPerStep": 1, "maxSteps": max_steps, "maxNewTokens": 4},
            "optimizer": {"learningRate": 0.01},
            "evaluation": {"everySteps": 2, "samples": 2},
            "checkpoint": {"everySteps": 2, "keepLast": 2},
        },
    }


def place(cluster: Cluster, name: str, replica: str = REPLICA) -> None:
    """What the operator does: the replica label and status.placement."""
    cluster.api.patch("LoRAExperiment", name, {"metadata": {"labels": {"loraplex.dev/replica": replica}}})
    cluster.api.patch_status(
        "LoRAExperiment",
        name,
        {"placement": {"pool": "tiny", "replica": replica, "placedAt": "2020-01-01T00:00:00Z"}},
    )


def pool(model_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "SharedBasePool",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"name": "tiny", "uri": f"file://{model_dir}", "dtype": "float32"}},
    }


def pool_status(cluster: Cluster) -> dict[str, Any]:
    return (cluster.api.get("SharedBasePool", "tiny") or {}).get("status") or {}


def candidate(cluster: Cluster, name: str) -> dict[str, Any]:
    status = (cluster.api.get("LoRAExperiment", name) or {}).get("status") or {}
    return (status.get("adapter") or {}).get("candidate") or {}


def training(cluster: Cluster, name: str) -> dict[str, Any]:
    return ((cluster.api.get("LoRAExperiment", name) or {}).get("status") or {}).get("training") or {}


class RecordingClient(ClusterClient):
    """The real client, keeping every experiment status patch it sends."""

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.on_candidate: Callable[[], None] = lambda: None

    def patch_experiment_status(self, name: str, body: Any) -> bool:
        self.sent.append((name, body))
        written = super().patch_experiment_status(name, body)
        if "adapter" in body["status"]:
            self.on_candidate()
        return written


class RunningAgent:
    """An agent in a thread of its own, against the test's cluster."""

    def __init__(
        self, storage: Path, *, stop_at_first_candidate: bool = False, model_retry_seconds: float = 30.0
    ) -> None:
        config = AgentConfig(
            pool="tiny",
            namespace=NAMESPACE,
            replica=REPLICA,
            storage=storage,
            health_port=0,
            metrics_port=None,
            poll_seconds=0.5,
            report_seconds=0.5,
            heartbeat_seconds=1.0,
            device="cpu",
            model_retry_seconds=model_retry_seconds,
        )
        self.client = RecordingClient(NAMESPACE)
        self.agent = Agent(config, self.client, CollectorRegistry())
        if stop_at_first_candidate:  # as SIGTERM would, right after the step that checkpointed
            self.client.on_candidate = self.agent.stop
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.agent.run()), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop as SIGTERM does, and check that the agent stopped cleanly."""
        self.agent.stop()
        self.thread.join(30)
        self.client.close()
        assert not self.thread.is_alive(), "the agent did not stop within 30s"
        assert self.result == [0]


@pytest.fixture
def storage(cluster: Cluster, tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The replica's storage mount (with a reward file on it), and the pool in the cluster."""
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "vowels.py").write_text(VOWELS)
    cluster.api.create(pool(tiny_model_dir))
    return storage


@pytest.fixture
def start_agent(storage: Path) -> Iterator[Callable[..., RunningAgent]]:
    """Start agents on demand; the ones still running are stopped at the end."""
    started: list[RunningAgent] = []

    def start(**options: Any) -> RunningAgent:
        started.append(RunningAgent(storage, **options))
        return started[-1]

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


@pytest.fixture
def agent(start_agent: Callable[..., RunningAgent]) -> Agent:
    return start_agent().agent


def placed_run(cluster: Cluster, *, max_steps: int, checkpoint: dict[str, int]) -> None:
    """Experiment "x" (one inline row, a length reward) with these checkpoints, placed here."""
    inline = {"inline": [{"prompt": "say a", "answer": "a"}]}
    body = experiment(
        "x", inline, {"builtin": {"name": "length", "args": {"target": 3}}}, max_steps=max_steps
    )
    body["spec"]["checkpoint"] = checkpoint
    cluster.api.create(body)
    place(cluster, "x")


def model_problem(cluster: Cluster) -> dict[str, Any]:
    """The pool's status.model.problem, once a trainer wrote one."""
    return until(
        lambda: pool_status(cluster).get("model", {}).get("problem") or {},
        lambda p: bool(p),
        what="status.model.problem",
    )


def until(fetch: Callable[[], T], ok: Callable[[T], bool], *, timeout: float = 45.0, what: str = "") -> T:
    """Poll ``fetch`` until ``ok`` holds for its value, and return that value (which may be falsy)."""

    def check() -> tuple[T] | None:
        value = fetch()
        return (value,) if ok(value) else None

    found = wait_for(check, timeout=timeout, interval=0.25, what=what)
    assert found is not None  # wait_for returns only a truthy value
    return found[0]


def test_agent_trains_reports_and_follows_placements(cluster: Cluster, agent: Agent) -> None:
    api = cluster.api
    inline = {"inline": [{"prompt": "say a", "answer": "a"}]}
    api.create(experiment("short", inline, {"python": {"file": "vowels.py"}}, max_steps=4))
    from_config_map = {"configMap": {"name": "rows", "key": "rows.jsonl"}}
    api.create(
        experiment(
            "long", from_config_map, {"builtin": {"name": "length", "args": {"target": 3}}}, max_steps=100_000
        )
    )
    broken = experiment("broken", {"file": "missing.jsonl"}, {"python": {"file": "vowels.py"}}, max_steps=4)
    api.create(broken)
    for name in ("short", "long", "broken"):
        place(cluster, name)

    # Loaded once: the pool learns the model's facts, /readyz turns ready.
    model: dict[str, Any] = until(lambda: pool_status(cluster).get("model") or {}, bool, what="status.model")
    assert model["parameterCount"] > 0 and set(model["linearModules"]) >= {"q_proj", "v_proj"}
    assert (model["hiddenSize"], model["numLayers"]) == (64, 2)
    assert agent.health is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.health.port}/readyz", timeout=5) as response:
        assert response.status == 200

    # The ConfigMap comes late: the experiment waits for it, saying so, then starts.
    waiting = until(lambda: training(cluster, "long"), lambda t: "ConfigMap" in t.get("message", ""))
    assert waiting["state"] == "Loading"
    assert waiting["message"] == "waiting for spec.dataset.configMap: ConfigMap rows does not exist"
    api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"}, "data": {"rows.jsonl": ROWS}}
    )

    # A bad input fails that experiment alone, with the reason.
    failed = until(lambda: training(cluster, "broken"), lambda t: t.get("state") == "Failed")
    assert "missing.jsonl" in failed["message"]

    done = until(lambda: training(cluster, "short"), lambda t: t.get("state") == "Completed", timeout=90)
    assert done["step"] == done["totalSteps"] == 4 and done["progressPercentage"] == 100
    assert done["lastHeartbeatTime"].endswith("Z") and done["message"] == "completed 4 steps"
    assert {m["name"] for m in done["metrics"]} == {"reward", "loss", "eval_reward", "logprob_diff_max"}
    short = api.get("LoRAExperiment", "short")
    assert short is not None
    candidate = short["status"]["adapter"]["candidate"]
    # Under the experiment's uid: one created again under the same name starts fresh.
    folder = experiment_folder(NAMESPACE, "short", short["metadata"]["uid"])
    checkpoint = agent.config.storage / folder / "checkpoints" / "step-00000004"
    assert candidate["revision"] == "step-00000004" and candidate["step"] == 4
    assert candidate["uri"] == f"file://{checkpoint}" and (checkpoint / "adapter_model.safetensors").is_file()
    assert isinstance(candidate["metric"], float)
    # The trainer wrote only its own fields: the operator's are as the test left them.
    assert short["status"]["placement"]["replica"] == REPLICA and "conditions" not in short["status"]

    running = until(
        lambda: training(cluster, "long"), lambda t: t.get("state") == "Running" and t["step"] >= 2
    )
    assert running["totalSteps"] == 100_000 and running["estimatedRemainingSeconds"] > 0
    assert agent.trainer is not None and "long" in agent.trainer.model.adapter_names()
    assert 'loraplex_trainer_steps_total{experiment="long"}' in generate_latest(agent.registry).decode()

    # The operator moves "long" to another replica: this one drops its adapter and its series,
    # and writes nothing more to it.
    place(cluster, "long", replica="tiny-1")
    until(lambda: agent.hosted, lambda hosted: "long" not in hosted, timeout=30)
    assert "long" not in agent.trainer.model.adapter_names()
    assert 'experiment="long"' not in generate_latest(agent.registry).decode()
    last = training(cluster, "long")
    time.sleep(1.0)
    assert training(cluster, "long") == last


def test_loraplex_agent_process_stops_on_sigterm(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The real entry point: identity from the env the pod sets, exit code 0 after SIGTERM."""
    cluster.api.create(pool(tiny_model_dir))
    env = checkout_env(
        KUBECONFIG=str(cluster.kubeconfig), LORAPLEX_POOL="tiny", POD_NAMESPACE=NAMESPACE, POD_NAME=REPLICA
    )
    command = loraplex("agent", f"--storage={tmp_path}")
    process = subprocess.Popen(
        [*command, "--health-port=0", "--metrics-port=0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        until(
            lambda: pool_status(cluster).get("model"),
            bool,
            timeout=120,
            what="the agent process to load the model",
        )
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output.decode()[-3000:]
    assert b"event=agent_stopped replica=tiny-0" in output


def test_a_restarted_replica_resumes_from_the_newest_checkpoint(
    cluster: Cluster, start_agent: Callable[..., RunningAgent]
) -> None:
    inline = {"inline": [{"prompt": "say a", "answer": "a"}]}
    cluster.api.create(
        experiment("x", inline, {"builtin": {"name": "length", "args": {"target": 3}}}, max_steps=6)
    )
    place(cluster, "x")
    first = start_agent(stop_at_first_candidate=True)  # whatever the pace of the steps
    first.thread.join(90)
    first.stop()
    resumed_from = candidate(cluster, "x")["step"]
    stopped = training(cluster, "x")
    assert resumed_from == 2 and stopped["state"] == "Interrupted" and stopped["step"] == 2
    assert stopped["message"] == "stopped at step 2; resumes from checkpoint step-00000002"

    second = start_agent()
    until(lambda: training(cluster, "x"), lambda t: t.get("state") == "Completed", timeout=90)
    reports = [body["status"] for name, body in second.client.sent if name == "x"]
    running = [s["training"] for s in reports if s.get("training", {}).get("state") == "Running"]
    assert running[0]["step"] == resumed_from  # continued where the checkpoint left off, not at 0
    # The candidate the first replica reported is not reported again; only newer ones are.
    steps = [s["adapter"]["candidate"]["step"] for s in reports if "adapter" in s]
    assert steps and min(steps) > resumed_from and steps[-1] == 6


def test_stopping_mid_run_checkpoints_the_step_and_reports_interrupted(
    cluster: Cluster, start_agent: Callable[..., RunningAgent]
) -> None:
    """A drain or scale-down: the step in flight is finished, checkpointed and named as the candidate."""
    placed_run(cluster, max_steps=1000, checkpoint={"everySteps": 500, "keepLast": 2})  # none before the stop
    first = start_agent()
    until(
        lambda: training(cluster, "x"), lambda t: t.get("state") == "Running" and t["step"] >= 3, timeout=90
    )
    first.stop()
    stopped = training(cluster, "x")
    step = stopped["step"]
    assert stopped["state"] == "Interrupted" and step >= 3
    assert candidate(cluster, "x")["step"] == step  # the checkpoint the stop wrote
    uid = (cluster.api.get("LoRAExperiment", "x") or {})["metadata"]["uid"]
    folder = (
        first.agent.config.storage
        / experiment_folder(NAMESPACE, "x", uid)
        / "checkpoints"
        / f"step-{step:08d}"
    )
    assert verify(folder) is None
    assert not first.agent.trainer or "x" not in first.agent.trainer.model.adapter_names()

    second = start_agent()
    until(
        lambda: training(cluster, "x"), lambda t: t.get("state") == "Running" and t["step"] > step, timeout=90
    )
    running = [
        b["status"]["training"] for n, b in second.client.sent if n == "x" and "training" in b["status"]
    ]
    assert [t["step"] for t in running if t["state"] == "Running"][0] == step  # not one step lost


def test_an_experiment_created_again_under_the_same_name_starts_fresh(
    cluster: Cluster, start_agent: Callable[..., RunningAgent]
) -> None:
    inline = {"inline": [{"prompt": "say a", "answer": "a"}]}
    body = experiment("x", inline, {"builtin": {"name": "length", "args": {"target": 3}}}, max_steps=6)
    cluster.api.create(copy.deepcopy(body))
    place(cluster, "x")
    first = start_agent(stop_at_first_candidate=True)
    first.thread.join(90)
    first.stop()
    old_uid = (cluster.api.get("LoRAExperiment", "x") or {})["metadata"]["uid"]
    assert candidate(cluster, "x")["step"] == 2

    cluster.api.delete("LoRAExperiment", "x")
    cluster.api.create(copy.deepcopy(body))
    place(cluster, "x")
    new_uid = (cluster.api.get("LoRAExperiment", "x") or {})["metadata"]["uid"]
    assert new_uid != old_uid
    second = start_agent()
    until(lambda: training(cluster, "x"), lambda t: t.get("state") == "Completed", timeout=90)
    running = [
        b["status"]["training"] for n, b in second.client.sent if n == "x" and "training" in b["status"]
    ]
    assert [t["step"] for t in running if t["state"] == "Running"][0] == 0  # not the old run's step 2
    storage = second.agent.config.storage
    assert (storage / experiment_folder(NAMESPACE, "x", old_uid) / "checkpoints" / "step-00000002").is_dir()


def test_a_candidate_promoted_between_two_polls_survives_pruning(
    cluster: Cluster, start_agent: Callable[..., RunningAgent]
) -> None:
    """The operator may promote a candidate before the agent's next poll shows it: keep it till then."""
    placed_run(
        cluster, max_steps=100_000, checkpoint={"everySteps": 1, "keepLast": 1}
    )  # each prunes the last
    running = start_agent()
    promoted: list[dict[str, Any]] = []

    def promote_the_first_candidate() -> None:  # as the operator does, at once
        if not promoted:
            promoted.append(candidate(cluster, "x"))
            cluster.api.patch_status("LoRAExperiment", "x", {"adapter": {"promoted": promoted[0]}})

    running.client.on_candidate = promote_the_first_candidate
    until(lambda: training(cluster, "x"), lambda t: bool(promoted) and t["step"] >= promoted[0]["step"] + 20)
    folder = Path(promoted[0]["uri"].removeprefix("file://"))
    assert verify(folder) is None  # still complete, though 20 newer checkpoints pruned their elders
    # The other early candidates are pruned once a poll has shown nobody points at them.
    first = promoted[0]["step"]

    def early_ones() -> list[str]:
        steps = [int(p.name.removeprefix("step-")) for p in folder.parent.glob("step-*")]
        return [f"step-{s:08d}" for s in steps if first < s <= first + 10]

    until(early_ones, lambda early: not early, timeout=30, what="the unpromoted early checkpoints pruned")
    assert verify(folder) is None


def test_a_model_that_cannot_be_had_is_reported_on_the_pool_and_retried_without_exiting(
    cluster: Cluster, start_agent: Callable[..., RunningAgent], tiny_model_dir: Path
) -> None:
    # The tests run with HF_HUB_OFFLINE=1: a hub model that is not in the cache cannot be had.
    absent = "hf://loraplex-tests/not-in-the-cache"
    cluster.api.patch("SharedBasePool", "tiny", {"spec": {"model": {"uri": absent}}})
    running = start_agent(model_retry_seconds=0.2)
    problem = model_problem(cluster)
    assert problem["reason"] == "ModelNotCached" and problem["uri"] == absent
    assert absent in problem["message"]
    time.sleep(1.0)  # several retries later: alive, not ready, no crash
    assert running.thread.is_alive() and not running.agent.ready.is_set()

    # The model becomes available (here: the URI is fixed; a restart is what a spec change brings,
    # but a retry also picks up a cache filled meanwhile): the facts replace the problem.
    cluster.api.patch("SharedBasePool", "tiny", {"spec": {"model": {"uri": f"file://{tiny_model_dir}"}}})
    running.stop()
    start_agent()
    model = until(
        lambda: pool_status(cluster).get("model") or {},
        lambda m: bool(m.get("parameterCount")),
        what="status.model facts",
    )
    assert "problem" not in model


def test_a_rollout_engine_that_is_not_installed_is_a_pool_problem_not_a_crash(
    cluster: Cluster, start_agent: Callable[..., RunningAgent]
) -> None:
    cluster.api.patch("SharedBasePool", "tiny", {"spec": {"trainer": {"rolloutEngine": "vllm"}}})
    running = start_agent(model_retry_seconds=0.2)
    problem = model_problem(cluster)
    assert problem["reason"] == "RolloutEngineUnavailable"
    assert "pip install vllm" in problem["message"]
    assert running.thread.is_alive() and not running.agent.ready.is_set()


def test_the_pools_report_to_writes_tensorboard_runs_under_the_storage(
    cluster: Cluster, storage: Path, start_agent: Callable[..., RunningAgent]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cluster.api.patch("SharedBasePool", "tiny", {"spec": {"trainer": {"reportTo": ["tensorboard"]}}})
    placed_run(cluster, max_steps=2, checkpoint={"everySteps": 2})
    start_agent()
    until(lambda: training(cluster, "x"), lambda t: t.get("state") == "Completed", timeout=90)
    runs = storage / "tracking" / NAMESPACE / "tensorboard"
    until(lambda: sorted(p.name for p in runs.iterdir()) if runs.is_dir() else [], lambda n: n == ["x"])
    events = EventAccumulator(str(runs / "x"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2]
