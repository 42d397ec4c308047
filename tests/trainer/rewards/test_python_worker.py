"""The python reward: user code in a worker process, with its failures turned into RewardErrors."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex_api.experiment import RewardSpec
from loraplex_trainer.rewards import PythonFunctionReward, Reward, RewardError, Sample, build_reward

# Set in the trainer's (test) process; the worker must not be able to see it.
TRAINER_SECRET = "trainer-only"

SAMPLES = [
    Sample(prompt="What is 2 + 2?", completion="4", row={"answer": "4"}),
    Sample(prompt="What is 2 + 3?", completion="6", row={"answer": "5"}),
]

REWARDS = """
import math
import sys
import time
import os

def exact(prompt, completion, row):
    return float(completion.strip() == row["answer"])

def answer_key(prompt, completion, row):
    return float(row["answer"] == "4") + float(row["solution"] == "4")

def raises(prompt, completion, row):
    if completion == "6":
        raise ValueError(f"cannot parse {completion!r}")
    return 1.0

def hangs(prompt, completion, row):
    if completion == "hang":
        time.sleep(60)
    return 1.0

def dies(prompt, completion, row):
    sys.stderr.write("about to exit\\n")
    sys.stderr.flush()
    os._exit(3)

def chatty(prompt, completion, row):
    print("debug output that must not break the protocol")
    return 0.5

def returns_text(prompt, completion, row):
    return "high"

def returns_nan(prompt, completion, row):
    return math.nan

def isolation(prompt, completion, row):
    main = sys.modules.get("__main__")
    leaked = (
        "torch" in sys.modules
        or "loraplex_trainer" in sys.modules
        or hasattr(main, "TRAINER_SECRET")
        or any(hasattr(m, "TRAINER_SECRET") for m in list(sys.modules.values()))
    )
    return 0.0 if leaked else 1.0

def uses_stdlib_http(prompt, completion, row):
    import http.client  # the rewards package has an http.py; it must not shadow the standard library

    return float(hasattr(http.client, "HTTPConnection"))

NOT_A_FUNCTION = 3
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rewards.py holding well- and badly-behaved functions."""
    path = tmp_path_factory.mktemp("manifests") / "rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture
def build(reward_file: Path) -> Iterator:
    """Build python rewards from rewards.py by function name; closes them after the test."""
    built: list[Reward] = []

    def make(function: str, timeout: float = 10.0) -> Reward:
        spec = RewardSpec.model_validate(
            {"python": {"file": reward_file.name, "function": function, "timeoutSeconds": timeout}}
        )
        reward = build_reward(spec, base_dir=reward_file.parent)
        built.append(reward)
        return reward

    yield make
    for reward in built:
        reward.close()


def test_scores_a_batch(build) -> None:
    assert build("exact")(SAMPLES) == [1.0, 0.0]


def test_answer_field_is_copied_to_answer(reward_file: Path) -> None:
    spec = RewardSpec.model_validate({"python": {"file": str(reward_file), "function": "answer_key"}})
    reward = build_reward(spec, base_dir=Path("/nonexistent"), answer_field="solution")
    try:
        assert reward([Sample("p", "c", {"solution": "4"})]) == [2.0]
    finally:
        reward.close()


def test_exception_names_type_message_and_location(build) -> None:
    reward = build("raises")
    with pytest.raises(RewardError) as error:
        reward(SAMPLES)
    message = str(error.value)
    assert "reward.python: rewards.py:raises raised ValueError: cannot parse '6'" in message
    line = REWARDS.splitlines().index('        raise ValueError(f"cannot parse {completion!r}")') + 1
    assert f"(sample 1, rewards.py line {line})" in message
    # The worker survives a user exception.
    assert reward(SAMPLES[:1]) == [1.0]


def test_hang_is_killed_at_the_timeout_and_the_worker_restarts(build) -> None:
    reward = build("hangs", timeout=1.0)
    first_pid = reward._worker.process.pid
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"rewards\.py:hangs did not return within 1s"):
        reward([Sample("p", "hang", {})])
    assert time.monotonic() - started < 2.5
    assert reward(SAMPLES) == [1.0, 1.0]
    assert reward._worker.process.pid != first_pid


def test_dying_worker_raises_and_restarts(build) -> None:
    reward = build("dies")
    with pytest.raises(
        RewardError, match=r"worker running rewards\.py:dies exited with code 3.*\n.*about to exit"
    ):
        reward(SAMPLES)
    with pytest.raises(RewardError, match="exited with code 3"):
        reward(SAMPLES)


def test_user_prints_do_not_break_the_protocol(build) -> None:
    assert build("chatty")(SAMPLES) == [0.5, 0.5]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("returns_text", r"raised TypeError: returned str 'high', expected a float"),
        ("returns_nan", "reward 0 is nan"),
    ],
)
def test_non_numbers_are_rejected(build, function: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        build(function)(SAMPLES)


def test_user_code_imports_the_standard_library_http(build) -> None:
    assert build("uses_stdlib_http")(SAMPLES) == [1.0, 1.0]


def test_worker_cannot_see_the_trainer(build) -> None:
    assert "torch" in sys.modules  # the trainer side has it (conftest imports torch)
    assert build("isolation")(SAMPLES) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("source", "function", "message"),
    [
        (
            "def reward(p, c, r):\n    return 1.0\n",
            "missing",
            r"cannot load rewards\.py:missing: AttributeError: the file defines no 'missing'",
        ),
        (
            "NOT_A_FUNCTION = 3\n",
            "NOT_A_FUNCTION",
            r"TypeError: 'NOT_A_FUNCTION' is not callable: it is the int 3",
        ),
        (
            "def reward(p, c, r)\n    return 1.0\n",
            "reward",
            r"SyntaxError: expected ':' \(rewards\.py line 1\)$",
        ),
        (
            "import no_such_module_xyz\n",
            "reward",
            r"ModuleNotFoundError: No module named 'no_such_module_xyz' \(rewards\.py line 1\)",
        ),
    ],
)
def test_load_errors_are_raised_at_build_time(
    tmp_path: Path, source: str, function: str, message: str
) -> None:
    (tmp_path / "rewards.py").write_text(source)
    spec = RewardSpec.model_validate({"python": {"file": "rewards.py", "function": function}})
    with pytest.raises(RewardError, match=message):
        build_reward(spec, base_dir=tmp_path)


def test_missing_file_names_the_field(tmp_path: Path) -> None:
    spec = RewardSpec.model_validate({"python": {"file": "nope.py"}})
    with pytest.raises(RewardError, match=r"reward\.python\.file: nope\.py: no such file"):
        build_reward(spec, base_dir=tmp_path)


def test_sibling_modules_are_importable(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("BONUS = 0.25\n")
    (tmp_path / "rewards.py").write_text("import helpers\ndef reward(p, c, r):\n    return helpers.BONUS\n")
    reward = build_reward(RewardSpec.model_validate({"python": {"file": "rewards.py"}}), base_dir=tmp_path)
    try:
        assert reward(SAMPLES) == [0.25, 0.25]
    finally:
        reward.close()


def test_config_map_source() -> None:
    spec = RewardSpec.model_validate({"python": {"configMap": {"name": "rewards", "key": "score.py"}}})
    with pytest.raises(
        RewardError, match=r"reward\.python\.configMap: rewards/score\.py cannot be read here"
    ):
        build_reward(spec, base_dir=Path("."))
    with pytest.raises(RewardError, match="ConfigMap rewards has no key 'score.py'"):
        build_reward(spec, base_dir=Path("."), config_maps={})
    source = "def reward(prompt, completion, row):\n    return len(completion)\n"
    reward = build_reward(spec, base_dir=Path("."), config_maps={("rewards", "score.py"): source})
    assert isinstance(reward, PythonFunctionReward)
    temp_dir = reward.path.parent
    try:
        assert reward(SAMPLES) == [1.0, 1.0]
    finally:
        reward.close()
    assert not temp_dir.exists()


def test_close_stops_the_worker(build) -> None:
    reward = build("exact")
    process = reward._worker.process
    reward.close()
    assert process.poll() is not None
    reward.close()  # idempotent
    with pytest.raises(RewardError, match=r"called after close\(\)"):
        reward(SAMPLES)


def test_an_experiments_own_memory_limit_is_the_workers_and_is_named_when_hit(tmp_path: Path) -> None:
    (tmp_path / "greedy.py").write_text("def reward(p, c, r):\n    return float(len(bytearray(400 << 20)))\n")
    spec = RewardSpec.model_validate({"python": {"file": "greedy.py", "memory": "256Mi"}})
    reward = build_reward(spec, base_dir=tmp_path)
    try:
        with pytest.raises(
            RewardError, match=r"MemoryError.*\(limit: memory, 268435456 bytes of address space"
        ):
            reward(SAMPLES)
    finally:
        reward.close()
    roomy = build_reward(
        RewardSpec.model_validate({"python": {"file": "greedy.py", "memory": "1Gi"}}), base_dir=tmp_path
    )
    try:
        assert roomy(SAMPLES[:1]) == [float(400 << 20)]
    finally:
        roomy.close()
