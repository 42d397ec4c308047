"""What a trainer replica writes: status.training, status.adapter.candidate and the pool's status.model."""

from __future__ import annotations

from pathlib import Path

from loraplex_api import LoRAExperimentSpec, TrainingStatus
from loraplex_api.pool import StorageSpec
from loraplex_trainer.experiment import Experiment, State
from loraplex_trainer.status_patches import (
    MESSAGE_LIMIT,
    candidate_revision,
    checkpoint_uri,
    experiment_status_patch,
    loading_status,
    pool_model_patch,
    training_status,
)

NOW = "2026-01-01T10:00:00Z"
SPEC = LoRAExperimentSpec.model_validate(
    {
        "poolRef": {"name": "smol"},
        "dataset": {"builtin": {"name": "arithmetic"}},
        "reward": {"builtin": {"name": "numeric_match"}},
        "algorithm": {"maxSteps": 40},
    }
)


def experiment(step: int, state: State = State.RUNNING, seconds: float = 2.0) -> Experiment:
    exp = Experiment("a", SPEC, Path("/unused"), state=state, step=step)
    exp.history = [
        {"step": s, "reward_mean": 0.1 * s, "loss": -0.01 * s, "seconds": seconds} for s in range(1, step + 1)
    ]
    return exp


def test_a_running_experiment_reports_progress_pace_and_metrics() -> None:
    exp = experiment(10)
    exp.eval_reward = 0.4123456
    status = training_status(exp, now=NOW)
    assert status == {
        "state": "Running",
        "step": 10,
        "totalSteps": 40,
        "progressPercentage": 25,
        "estimatedRemainingSeconds": 60,  # 30 steps left at 2 s a step
        "lastHeartbeatTime": NOW,
        "metrics": [
            {"name": "reward", "value": "1"},
            {"name": "eval_reward", "value": "0.4123"},
            {"name": "loss", "value": "-0.1"},
        ],
        "message": "",
    }
    TrainingStatus.model_validate(status)  # what the operator reads back


def test_before_a_first_step_there_is_no_pace_and_no_metric() -> None:
    status = training_status(experiment(0), now=NOW)
    assert status["estimatedRemainingSeconds"] is None  # None clears an old estimate in a merge patch
    assert status["metrics"] == [] and status["progressPercentage"] == 0


def test_completed_and_failed_experiments() -> None:
    done = experiment(40, State.COMPLETED)
    done.message = "completed 40 steps"
    status = training_status(done, now=NOW)
    assert status["state"] == "Completed" and status["progressPercentage"] == 100
    assert status["estimatedRemainingSeconds"] == 0 and status["message"] == "completed 40 steps"

    failed = experiment(3, State.FAILED)
    failed.message = "reward: " + "x" * (2 * MESSAGE_LIMIT)
    status = training_status(failed, now=NOW)
    assert status["state"] == "Failed" and status["estimatedRemainingSeconds"] is None
    assert len(status["message"]) == MESSAGE_LIMIT and status["message"].startswith("reward: xxx")


def test_loading_status() -> None:
    status = loading_status(total_steps=40, message="waiting for ConfigMap rows", now=NOW)
    assert status["state"] == "Loading" and status["step"] == 0 and status["totalSteps"] == 40
    assert status["message"] == "waiting for ConfigMap rows" and status["lastHeartbeatTime"] == NOW


def test_checkpoint_uri_names_the_claim_when_storage_is_a_pvc() -> None:
    root = Path("/var/lib/loraplex")
    checkpoint = root / "team-a" / "exp" / "checkpoints" / "step-00000010"
    assert checkpoint_uri(checkpoint, storage_root=root, storage=StorageSpec()) == f"file://{checkpoint}"
    with_claim = StorageSpec(claim_name="adapters")
    assert (
        checkpoint_uri(checkpoint, storage_root=root, storage=with_claim)
        == "pvc://adapters/team-a/exp/checkpoints/step-00000010"
    )
    with_sub_path = StorageSpec(claim_name="adapters", sub_path="/runs/smol/")
    assert (
        checkpoint_uri(checkpoint, storage_root=root, storage=with_sub_path)
        == "pvc://adapters/runs/smol/team-a/exp/checkpoints/step-00000010"
    )


def test_candidate_revision_from_a_checkpoint_folder() -> None:
    root = Path("/data")
    checkpoint = root / "ns" / "exp" / "checkpoints" / "step-00000020"
    candidate = candidate_revision(checkpoint, step=20, metric=0.75, storage_root=root, storage=StorageSpec())
    assert candidate == {
        "revision": "step-00000020",
        "uri": "file:///data/ns/exp/checkpoints/step-00000020",
        "step": 20,
        "metric": 0.75,
    }
    unknown = candidate_revision(
        checkpoint, step=20, metric=float("nan"), storage_root=root, storage=StorageSpec()
    )
    assert unknown["metric"] is None


def test_an_experiment_patch_holds_only_the_trainers_fields() -> None:
    training = loading_status(total_steps=1, message="", now=NOW)
    candidate = {"revision": "step-00000001", "uri": "file:///x", "step": 1, "metric": None}
    assert experiment_status_patch(training) == {"status": {"training": training}}
    assert experiment_status_patch(training, candidate) == {
        "status": {"training": training, "adapter": {"candidate": candidate}}
    }


def test_pool_model_patch_deletes_what_a_previous_model_had() -> None:
    current = {
        "parameterCount": 10,
        "numLayers": 2,
        "linearModules": {
            "c_attn": {"in": 4, "out": 12, "count": 2},
            "q_proj": {"in": 4, "out": 4, "count": 2},
        },
    }
    new = {"parameterCount": 20, "linearModules": {"q_proj": {"in": 8, "out": 8, "count": 2}}}
    assert pool_model_patch(current, new) == {
        "status": {
            "model": {
                "parameterCount": 20,
                "linearModules": {"q_proj": {"in": 8, "out": 8, "count": 2}, "c_attn": None},
                "numLayers": None,
            }
        }
    }
    assert pool_model_patch(None, new) == {"status": {"model": new}}
