"""The real SmolLM2-135M-Instruct learns on CPU (marked slow: minutes; run with `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex_api import LoRAExperimentSpec
from loraplex_trainer.experiment import Experiment, State
from loraplex_trainer.loop import Trainer
from loraplex_trainer.model_host import load_base_model

pytestmark = pytest.mark.slow


def test_smollm2_learns_to_answer_briefly(tmp_path: Path) -> None:
    """A length reward is learnable in a few steps: the mean reward of the last steps beats the first."""
    base = load_base_model("builtin://smollm2-135m-instruct")
    spec = LoRAExperimentSpec.model_validate(
        {
            "poolRef": {"name": "smollm2"},
            "lora": {"rank": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "dataset": {
                "builtin": {"name": "count_letters", "size": 200, "seed": 0},
                "chatTemplate": True,
                "systemPrompt": "Answer briefly.",
            },
            "reward": {"builtin": {"name": "length", "args": {"target": 4, "falloff": 20}}},
            "algorithm": {"groupSize": 4, "promptsPerStep": 2, "maxSteps": 16, "maxNewTokens": 12, "seed": 0},
            "optimizer": {"learningRate": 0.001},
            "checkpoint": {"everySteps": 100},
        }
    )
    trainer = Trainer(base)
    exp = Experiment("short", spec, tmp_path / "short")
    trainer.add(exp, base_dir=tmp_path)
    while trainer.active:
        trainer.step()
    assert exp.state is State.COMPLETED
    rewards = [m["reward_mean"] for m in exp.history]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards
