"""The agent's pieces that need no API server: its configuration and the candidate's metric.

The agent against a Kubernetes API (KMock) is in tests/trainer/integration/test_agent.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from loraplex_cli.main import build_parser
from loraplex_trainer.agent import checkpoint_metric, config_from_args
from loraplex_trainer.checkpoint import STATE_FILE


def agent_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["agent", *argv])


def test_identity_comes_from_the_pods_env_unless_flags_say_otherwise() -> None:
    env = {"LORAPLEX_POOL": "smol", "POD_NAMESPACE": "team-a", "POD_NAME": "smol-2"}
    config = config_from_args(agent_args(), env)
    assert (config.pool, config.namespace, config.replica) == ("smol", "team-a", "smol-2")
    assert config.storage == Path("/var/lib/loraplex")
    assert (config.health_port, config.metrics_port) == (8081, 9400)
    assert config.model_uri is None

    flags = agent_args("--pool=big", "--namespace=ns", "--replica=big-0", "--metrics-port=0", "--storage=/s")
    config = config_from_args(flags, {**env, "LORAPLEX_MODEL_URI": "file:///models/claim/smol"})
    assert (config.pool, config.namespace, config.replica) == ("big", "ns", "big-0")
    assert config.metrics_port is None and config.storage == Path("/s")
    assert config.model_uri == "file:///models/claim/smol"  # the operator's mount of a pvc:// model


def test_a_missing_pool_or_namespace_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("loraplex_trainer.agent.SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent")
    with pytest.raises(ValueError, match=r"--pool or set \$LORAPLEX_POOL"):
        config_from_args(agent_args(), {"POD_NAMESPACE": "ns"})
    with pytest.raises(ValueError, match=r"--namespace or set \$POD_NAMESPACE"):
        config_from_args(agent_args(), {"LORAPLEX_POOL": "smol"})


def test_checkpoint_metric_reads_the_promotion_metric(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 4, "extra": {"eval_reward": 0.5}}))
    history = [{"step": 3, "reward_mean": 0.1}, {"step": 4, "reward_mean": 0.2, "loss": 0.01}]
    assert checkpoint_metric("eval_reward", checkpoint, history) == 0.5
    assert checkpoint_metric("reward", checkpoint, history) == 0.2
    assert checkpoint_metric("loss", checkpoint, history) == 0.01
    assert checkpoint_metric("kl", checkpoint, history) is None
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 4, "extra": {"eval_reward": None}}))
    assert checkpoint_metric("eval_reward", checkpoint, history) is None
