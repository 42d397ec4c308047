"""Training with vLLM rollouts: the Trainer in this process, then `loraplex train` as a user runs it.

Each engine here is the only one alive in its process (vLLM's process-wide state allows no more).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex_api.experiment import DatasetSpec, LoRAExperimentSpec
from loraplex_trainer.datasets import render_prompt
from loraplex_trainer.experiment import Experiment
from loraplex_trainer.loop import Trainer
from loraplex_trainer.model_host import load_base_model
from loraplex_trainer.rollout.base import EngineLimits
from loraplex_trainer.rollout.vllm_engine import VLLMRolloutEngine
from tests.processes import checkout_env, loraplex

pytestmark = pytest.mark.vllm
LIMITS = EngineLimits(max_adapters=4, max_rank=16, max_model_len=256, enforce_eager=True)
STEPS, MAX_NEW_TOKENS = 3, 6
REWARDS_PY = '''
def hashed(prompt, completion, row):
    """A score that changes with every character: equal means are equal completions, in practice."""
    return sum((i + 1) * ord(c) for i, c in enumerate(completion)) % 997 / 997
'''


def hashed(completion: str) -> float:
    return sum((i + 1) * ord(c) for i, c in enumerate(completion)) % 997 / 997


def test_the_trainer_trains_with_vllm_rollouts_and_reports_sync_and_the_log_prob_gap(
    vllm_model_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(load_base_model(f"file://{vllm_model_dir}"), engine_kind="vllm", engine_limits=LIMITS)
    assert isinstance(trainer.engine, VLLMRolloutEngine)
    spec = LoRAExperimentSpec.model_validate(
        {
            "poolRef": {"name": "p"},
            "lora": {"rank": 4, "alpha": 8},
            "dataset": {"inline": [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]},
            "reward": {"builtin": {"name": "length", "args": {"target": 3}}},
            "algorithm": {"groupSize": 2, "promptsPerStep": 2, "maxSteps": 3, "maxNewTokens": 4, "seed": 1},
            "optimizer": {"learningRate": 0.01},
            "checkpoint": {"everySteps": 3},
        }
    )
    for name in ("x", "y"):
        trainer.add(Experiment(name, spec, tmp_path / name), base_dir=tmp_path)
    too_big = spec.model_copy(update={"lora": spec.lora.model_copy(update={"rank": 64})})
    refused = Experiment("z", too_big, tmp_path / "z")
    trainer.add(refused, base_dir=tmp_path)
    assert refused.message.startswith("rollout engine: spec.lora.rank: 64 is above the vLLM engine's")
    reports = [trainer.step() for _ in range(3)]
    assert all(r.timings.sync > 0 for r in reports)
    for name in ("x", "y"):
        metrics = reports[-1].metrics[name]
        assert metrics["step"] == 3
        assert 0 <= metrics["logprob_diff_max"] < 1e-3  # vLLM and the trainer score alike here
    assert trainer.engine.loaded() == {}  # both finished: nothing left loaded
    trainer.engine.close()


def _manifests(folder: Path, model_dir: Path) -> Path:
    def experiment(name: str, reward: dict, lora: dict) -> dict:
        return {
            "apiVersion": "loraplex.dev/v1alpha1",
            "kind": "LoRAExperiment",
            "metadata": {"name": name},
            "spec": {
                "poolRef": {"name": "tiny"},
                "lora": lora,
                "dataset": {
                    "inline": [{"prompt": f"{i} plus one is", "answer": str(i + 1)} for i in range(8)],
                    "eval": {
                        "inline": [{"prompt": p, "answer": "x"} for p in ("9 plus", "hi", "count: 1 2")]
                    },
                    "chatTemplate": False,
                },
                "reward": reward,
                "algorithm": {
                    "groupSize": 2,
                    "promptsPerStep": 2,
                    "maxSteps": STEPS,
                    "maxNewTokens": MAX_NEW_TOKENS,
                    "temperature": 1.0,
                    "seed": 7,
                },  # fmt: skip
                "optimizer": {"learningRate": 0.05},
                "checkpoint": {"everySteps": STEPS},
            },
        }

    (folder / "rewards.py").write_text(REWARDS_PY)
    pool = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "SharedBasePool",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": "tiny", "uri": f"file://{model_dir}"},
            "capacity": {"maxAdaptersPerReplica": 2, "maxLoRARank": 16},  # standalone makes room for 3
            "trainer": {"rolloutEngine": "vllm", "vllm": {"enforceEager": True, "maxModelLen": 256}},
        },
    }
    python = {"python": {"file": "rewards.py", "function": "hashed"}}
    file = folder / "run.yaml"
    file.write_text(
        yaml.safe_dump_all(
            [
                pool,
                experiment("rank2", python, {"rank": 2, "alpha": 4}),
                experiment("rank8", python, {"rank": 8, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}),
                experiment(
                    "rank16",
                    {"builtin": {"name": "regex_match", "args": {"pattern": "[0-9]"}}},
                    {"rank": 16, "alpha": 16, "targetModules": ["o_proj", "up_proj"]},
                ),
            ]
        )
    )
    return file


def _train(file: Path, out: Path) -> dict:
    done = subprocess.run(
        loraplex("train", str(file), "--output", str(out), "--no-live", "--device", "cpu"),
        env=checkout_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["rollout_engine"] == "vllm"
    assert summary["totals"]["seconds_by_phase"]["sync"] > 0
    return summary


def _peft_greedy_eval(model_dir: Path, adapter: Path, score: Callable[[str], float]) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    dataset = DatasetSpec.model_validate({"inline": [{"prompt": "-"}], "chatTemplate": False})
    scores = []
    for prompt in ("9 plus", "hi", "count: 1 2"):
        ids = tokenizer(render_prompt({"prompt": prompt}, dataset, tokenizer), return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        scores.append(score(str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))))
    return sum(scores) / len(scores)


def test_loraplex_train_with_vllm_rollouts_completes_reproduces_and_evaluates_as_peft(
    vllm_model_dir: Path, tmp_path: Path
) -> None:
    file = _manifests(tmp_path, vllm_model_dir)
    first, second = _train(file, tmp_path / "first"), _train(file, tmp_path / "second")

    def digit(text: str) -> float:
        return float(re.search("[0-9]", text) is not None)

    for name, score in (("rank2", hashed), ("rank8", hashed), ("rank16", digit)):
        assert first["experiments"][name]["state"] == "Completed", first["experiments"][name]
        assert second["experiments"][name]["eval_reward"] == first["experiments"][name]["eval_reward"]
        rows = [json.loads(x) for x in (tmp_path / "first" / name / "metrics.jsonl").read_text().splitlines()]
        again = [
            json.loads(x) for x in (tmp_path / "second" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert all(0 <= r["logprob_diff_max"] < 1e-3 for r in rows), [r["logprob_diff_max"] for r in rows]
        assert [r["reward_mean"] for r in rows] == [
            r["reward_mean"] for r in again
        ]  # same seeds, same samples
        adapter = tmp_path / "first" / name / "adapter"
        peft = _peft_greedy_eval(vllm_model_dir, adapter, score)
        assert first["experiments"][name]["eval_reward"] == pytest.approx(peft, abs=1e-9), name
    assert first["experiments"]["rank2"]["eval_reward"] != first["experiments"]["rank8"]["eval_reward"]
