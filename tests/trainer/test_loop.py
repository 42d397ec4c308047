"""The concurrent loop on the tiny model: shared steps, hot add/remove, resume, fault isolation."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraplex_api import LoRAExperimentSpec
from loraplex_trainer.checkpoint import list_checkpoints
from loraplex_trainer.experiment import Experiment, State
from loraplex_trainer.loop import Trainer
from loraplex_trainer.model_host import BaseModel

# A smooth reward with spread on a random model: the share of vowels in the completion.
VOWELS = """
def reward(prompt, completion, row):
    return sum(c in "aeiou" for c in completion) / max(len(completion), 1)
"""
HANGS = """
import time

def reward(prompt, completion, row):
    time.sleep(60)
    return 1.0
"""
RAISES = """
def reward(prompt, completion, row):
    raise KeyError("no such field: score")
"""


def spec(reward_file: str = "vowels.py", **overrides: Any) -> LoRAExperimentSpec:
    body: dict[str, Any] = {
        "poolRef": {"name": "tiny"},
        "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj", "down_proj"]},
        "dataset": {
            "inline": [
                {"prompt": f"Q{i}: say {w}", "answer": w} for i, w in enumerate(["cat", "dog", "eel", "ant"])
            ]
        },
        "reward": {"python": {"file": reward_file, "timeoutSeconds": 20}},
        "algorithm": {"groupSize": 3, "promptsPerStep": 2, "maxSteps": 4, "maxNewTokens": 6, "seed": 1},
        "optimizer": {"learningRate": 0.05, "weightDecay": 0.01},
        "checkpoint": {"everySteps": 2, "keepLast": 2},
    }
    for path, value in overrides.items():
        node = body
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return LoRAExperimentSpec.model_validate(body)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "vowels.py").write_text(VOWELS)
    (tmp_path / "raises.py").write_text(RAISES)
    (tmp_path / "hangs.py").write_text(HANGS)
    return tmp_path


def run(trainer: Trainer, *experiments: Experiment, base_dir: Path, max_shared_steps: int = 100) -> None:
    for exp in experiments:
        trainer.add(exp, base_dir=base_dir)
    for _ in range(max_shared_steps):
        if not trainer.active:
            return
        trainer.step()


def adapter_weights(exp: Experiment) -> dict[str, torch.Tensor]:
    return load_file(str(exp.out_dir / "adapter" / "adapter_model.safetensors"))


def test_experiments_train_together_and_write_peft_checkpoints(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base, micro_batch_tokens=200)
    a = Experiment("a", spec(), workdir / "out" / "a")
    b = Experiment(
        "b",
        spec(**{"lora.rank": 2, "algorithm.maxSteps": 2, "algorithm.lossAggregation": "seq-mean"}),
        workdir / "out" / "b",
    )
    trainer.add(a, base_dir=workdir)
    trainer.add(b, base_dir=workdir)
    first = trainer.step()
    assert first.experiments == ["a", "b"]  # one rollout, one backward for both
    assert first.rollout_tokens > 0 and first.train_tokens > 0
    run(trainer, base_dir=workdir)
    assert (a.state, a.step, b.state, b.step) == (State.COMPLETED, 4, State.COMPLETED, 2)
    assert trainer.model.adapter_names() == []  # finished adapters are removed
    lines = [json.loads(x) for x in (a.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"step", "reward_mean", "loss", "kl", "tokens", "seconds"} <= lines[0].keys()
    assert "eval_reward" in lines[-1]
    assert [s for s, _ in list_checkpoints(a.checkpoint_root)] == [2, 4]  # keepLast 2
    config = json.loads((a.out_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert any(
        w.abs().sum() > 0 for k, w in adapter_weights(a).items() if "lora_B" in k
    )  # it learned something


def test_hot_add_joins_the_shared_batch_and_remove_frees_it(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    a = Experiment("a", spec(**{"algorithm.maxSteps": 3}), workdir / "a")
    trainer.add(a, base_dir=workdir)
    trainer.step()
    late = Experiment("late", spec(**{"algorithm.maxSteps": 3}), workdir / "late")
    trainer.add(late, base_dir=workdir)
    assert trainer.step().experiments == ["a", "late"]
    trainer.remove("late")  # e.g. suspended or deleted
    late.state = State.FAILED
    assert "late" not in trainer.model.adapter_names()
    assert trainer.step().experiments == ["a"]
    assert a.state is State.COMPLETED


def test_step_leaves_the_global_rng_as_it_found_it(tiny_base: BaseModel, workdir: Path) -> None:
    # The step seeds torch's RNG for itself; other code in the process must not see that seed.
    trainer = Trainer(tiny_base)
    trainer.add(Experiment("a", spec(**{"algorithm.maxSteps": 1}), workdir / "a"), base_dir=workdir)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    trainer.step()
    assert torch.equal(torch.get_rng_state(), before)


def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir: Path, workdir: Path) -> None:
    from loraplex_trainer.model_host import load_base_model

    def fresh() -> Trainer:
        return Trainer(load_base_model(f"file://{tiny_model_dir}"), micro_batch_tokens=200)

    settings = {"algorithm.maxSteps": 6, "lora.dropout": 0.1}
    whole = [Experiment(n, spec(**settings), workdir / "whole" / n) for n in ("a", "b")]
    run(fresh(), *whole, base_dir=workdir)

    killed = [Experiment(n, spec(**settings), workdir / "killed" / n) for n in ("a", "b")]
    run(fresh(), *killed, base_dir=workdir, max_shared_steps=3)  # dies after step 3; last checkpoint: 2
    assert all(e.step == 3 for e in killed)
    resumed = [Experiment(n, spec(**settings), workdir / "killed" / n) for n in ("a", "b")]
    trainer = fresh()
    for exp in resumed:
        trainer.add(exp, base_dir=workdir)
    assert [e.step for e in resumed] == [2, 2]
    run(trainer, base_dir=workdir)

    for w, r in zip(whole, resumed, strict=True):
        assert r.state is State.COMPLETED
        ours, theirs = adapter_weights(w), adapter_weights(r)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
        steps = [json.loads(x)["step"] for x in (r.out_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6]  # the repeated step 3 is not logged twice


def test_crashing_reward_fails_only_its_experiment(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    good = Experiment("good", spec(**{"algorithm.maxSteps": 2}), workdir / "good")
    bad = Experiment("bad", spec("raises.py"), workdir / "bad")
    run(trainer, good, bad, base_dir=workdir)
    assert good.state is State.COMPLETED
    assert bad.state is State.FAILED
    assert "KeyError" in bad.message and "no such field: score" in bad.message
    assert "bad" not in trainer.model.adapter_names()


def test_hanging_reward_times_out_and_fails_only_its_experiment(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    good = Experiment("good", spec(**{"algorithm.maxSteps": 2}), workdir / "good")
    stuck = Experiment("stuck", spec("hangs.py", **{"reward.python.timeoutSeconds": 1}), workdir / "stuck")
    started = time.monotonic()
    run(trainer, good, stuck, base_dir=workdir)
    assert time.monotonic() - started < 30  # the trainer was not stalled for the sleep's 60 s
    assert good.state is State.COMPLETED
    assert stuck.state is State.FAILED and "did not return within 1s" in stuck.message, stuck.message


def test_a_reward_too_large_for_float32_says_so_and_fails_only_its_experiment(
    tiny_base: BaseModel, workdir: Path
) -> None:
    (workdir / "huge.py").write_text("def reward(prompt, completion, row):\n    return 1e300\n")
    trainer = Trainer(tiny_base)
    good = Experiment("good", spec(**{"algorithm.maxSteps": 2}), workdir / "good")
    huge = Experiment("huge", spec("huge.py"), workdir / "huge")
    run(trainer, good, huge, base_dir=workdir)
    assert good.state is State.COMPLETED
    assert huge.state is State.FAILED and "reward 1e+300 from sample 0 is too large" in huge.message, (
        huge.message
    )


def test_unreadable_dataset_fails_only_its_experiment(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    good = Experiment("good", spec(**{"algorithm.maxSteps": 1}), workdir / "good")
    missing = Experiment("missing", spec(**{"dataset": {"file": "nowhere.jsonl"}}), workdir / "missing")
    run(trainer, good, missing, base_dir=workdir)
    assert good.state is State.COMPLETED
    assert missing.state is State.FAILED and "nowhere.jsonl" in missing.message


def test_nan_loss_fails_only_its_experiment(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    good = Experiment("good", spec(**{"algorithm.maxSteps": 2}), workdir / "good")
    poisoned = Experiment("poisoned", spec(), workdir / "poisoned")
    trainer.add(good, base_dir=workdir)
    trainer.add(poisoned, base_dir=workdir)
    before = {k: v.clone() for k, v in trainer.model.adapter_state_dict("good").items()}
    with torch.no_grad():
        for p in trainer.model.adapter_parameters("poisoned"):
            p.fill_(math.inf)
    run(trainer, base_dir=workdir)
    assert poisoned.state is State.FAILED and "non-finite" in poisoned.message
    assert good.state is State.COMPLETED
    after = adapter_weights(good)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_unknown_target_module_fails_the_experiment(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    exp = Experiment("typo", spec(**{"lora.targetModules": ["q_prj"]}), workdir / "typo")
    trainer.add(exp, base_dir=workdir)
    assert exp.state is State.FAILED
    assert exp.message.startswith("spec.lora.targetModules:") and "q_prj" in exp.message
