"""Regexes a user supplies cannot stall the replica: RE2 matches in linear time, and builtins have a budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from loraplex_trainer.rewards import RewardError, Sample
from loraplex_trainer.rewards.builtin import BuiltinRewardFunction
from tests.processes import checkout_env, loraplex
from tests.trainer.test_standalone import manifests

EVIL = "^(.|.)*X$"  # exponential for a backtracking engine on any text without an X


def test_a_catastrophic_pattern_scores_long_completions_at_once() -> None:
    # In a child process, so that a backtracking engine would fail the test by timing out
    # instead of holding this one (a regex loop in C ignores Python's signals).
    script = textwrap.dedent(
        f"""
        from loraplex_api.experiment import RewardSpec
        from loraplex_trainer.rewards import Sample, build_reward
        from pathlib import Path
        spec = RewardSpec.model_validate({{"builtin": {{"name": "format", "args": {{"pattern": {EVIL!r}}}}}}})
        reward = build_reward(spec, base_dir=Path("."))
        print(reward([Sample("p", "a" * n, {{}}) for n in (30, 40, 5000, 100000)]))
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], env=checkout_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.0, 0.0, 0.0, 0.0]"
    assert time.monotonic() - started < 30


def test_a_builtin_over_its_budget_fails_with_the_limit_named() -> None:
    def slow(sample: Sample) -> float:
        time.sleep(0.05)
        return 1.0

    reward = BuiltinRewardFunction("format", slow, "reward.builtin", budget_seconds=0.1)
    assert reward([Sample("p", "c", {})]) == [1.0]
    with pytest.raises(
        RewardError, match=r"reward\.builtin: the format reward took .* over its budget of 0\.1s"
    ):
        reward([Sample("p", "c", {})] * 10)


def run_pair(tmp_path: Path, model_dir: Path, pattern: str) -> tuple[float, dict[str, str]]:
    """Train a victim and a format reward with ``pattern`` together; the victim's mean step seconds."""
    tmp_path.mkdir()
    file = manifests(tmp_path, model_dir, steps=3)
    docs = list(yaml.safe_load_all(file.read_text()))
    docs[2]["spec"]["reward"] = {"builtin": {"name": "format", "args": {"pattern": pattern}}}
    for doc in docs[1:]:
        doc["spec"]["algorithm"]["maxNewTokens"] = 48  # long completions: 2^48 paths for a backtracker
    file.write_text(yaml.safe_dump_all(docs))
    out = tmp_path / "out"
    command = loraplex("train", str(file), "--output", str(out), "--no-live", "--threads", "1")
    done = subprocess.run(command, env=checkout_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    steps = [json.loads(line) for line in (out / "short" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    states = {name: e["state"] for name, e in summary["experiments"].items()}
    return sum(s["seconds"] for s in steps) / len(steps), states


def test_a_redos_pattern_beside_a_victim_keeps_its_steps_within_twice_a_benign_one(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    benign, benign_states = run_pair(tmp_path / "benign", tiny_model_dir, "^.*X$")
    evil, evil_states = run_pair(tmp_path / "evil", tiny_model_dir, EVIL)
    assert benign_states == evil_states == {"short": "Completed", "digits": "Completed"}
    assert evil < 2 * benign, (evil, benign)
