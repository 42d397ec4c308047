"""Builtin rewards on hand-made completions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from loraplex_api.experiment import BUILTIN_REWARDS, RewardSpec
from loraplex_trainer.rewards import RewardError, Sample, build_reward, extract_answer, last_number
from loraplex_trainer.rewards.builtin import BUILDERS


def score(name: str, completions: list[str], answer: Any = None, answer_field: str = "answer", **args: Any):
    """Build builtin ``name`` with ``args`` and score ``completions`` against one answer."""
    spec = RewardSpec.model_validate({"builtin": {"name": name, "args": args}})
    reward = build_reward(spec, base_dir=Path("."), answer_field=answer_field)
    row = {} if answer is None else {answer_field: answer}
    return reward([Sample(prompt="p", completion=c, row=row) for c in completions])


def test_every_contract_name_is_implemented() -> None:
    assert set(BUILDERS) == set(BUILTIN_REWARDS)


@pytest.mark.parametrize(
    ("completion", "mode", "expected"),
    [
        ("think...\n<answer> 42 </answer>\nbye", "auto", " 42 "),
        ("a <answer>1</answer> b <answer>2</answer>", "answer_tag", "2"),
        ("so \\boxed{\\frac{1}{2}} done", "auto", "\\frac{1}{2}"),
        ("so \\boxed{12", "boxed", None),
        ("Reasoning.\nFinal answer: 17\nThanks", "auto", " 17"),
        ("line one\n 95 \n\n", "auto", " 95 "),
        ("no tags here", "answer_tag", None),
        ("", "auto", None),
        ("whole\ntext", "none", "whole\ntext"),
    ],
)
def test_extract_answer(completion: str, mode: str, expected: str | None) -> None:
    assert extract_answer(completion, mode) == expected


def test_last_number() -> None:
    assert last_number("3 apples and 1,234.5 pears") == 1234.5
    assert last_number("it is -7.") == -7.0
    assert last_number("3, 8, 15") == 15.0
    assert last_number("none") is None


def test_exact_match() -> None:
    assert score("exact_match", ["95", " 95\n", "The sum is\n95", "<answer>95</answer>", "96", ""], "95") == [
        1.0,
        1.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert score("exact_match", ["Paris"], "paris") == [0.0]
    assert score("exact_match", ["Paris"], "paris", casefold=True) == [1.0]
    assert score("exact_match", [" 7"], "7", strip=False) == [0.0]
    # A numeric answer in the row compares by its text.
    assert score("exact_match", ["7"], 7) == [1.0]
    # With answer_tag, an untagged completion earns nothing.
    assert score("exact_match", ["7"], "7", extract="answer_tag") == [0.0]


def test_numeric_match() -> None:
    completions = ["37 + 58 = 95", "I think 95.0", "95.3", "about 1,000", "no idea"]
    assert score("numeric_match", completions, "95") == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert score("numeric_match", completions, 95, tolerance=0.5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert score("numeric_match", ["about 1,000"], "1010", rel_tolerance=0.01) == [1.0]
    assert score("numeric_match", ["<answer>5</answer> since 2+3"], "5", extract="answer_tag") == [1.0]
    with pytest.raises(RewardError, match="answer 'three' is not a number"):
        score("numeric_match", ["3"], "three")


def test_regex_match() -> None:
    assert score("regex_match", ["the answer is 42", "nope"], pattern=r"\d+") == [1.0, 0.0]
    assert score("regex_match", ["the answer is 42"], pattern=r"\d+", fullmatch=True) == [0.0]
    assert score("regex_match", ["YES"], pattern="yes", ignore_case=True) == [1.0]


def test_format() -> None:
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    completions = [
        "<think>a\nb</think>\n<answer>3</answer>\n",
        "<answer>3</answer>",
        "junk <think>x</think><answer>3</answer>",
    ]
    assert score("format", completions, pattern=pattern) == [1.0, 0.0, 0.0]
    assert score("format", completions, pattern=pattern, partial=0.25) == [1.0, 0.0, 0.25]


def test_length() -> None:
    completions = ["x" * 5, "x" * 10, "x" * 15, "x" * 30, ""]
    assert score("length", completions, target=10) == [1.0, 1.0, 0.5, 0.0, 1.0]
    assert score("length", completions, target=10, falloff=20) == [1.0, 1.0, 0.75, 0.0, 1.0]
    assert score("length", completions, target=10, min=10) == [0.5, 1.0, 0.5, 0.0, 0.0]
    assert score("length", ["one two three", "a b c d e f"], target=3, unit="words") == [1.0, 0.0]


def test_contains_answer() -> None:
    completions = ["so it is 5.", "it is 15", "FIVE!", "5"]
    assert score("contains_answer", completions, "5") == [1.0, 0.0, 0.0, 1.0]
    assert score("contains_answer", completions, "5", whole_word=False) == [1.0, 1.0, 0.0, 1.0]
    assert score("contains_answer", completions, "five", casefold=True) == [0.0, 0.0, 1.0, 0.0]


def test_answer_field_is_read_from_the_row() -> None:
    assert score("exact_match", ["12"], "12", answer_field="solution") == [1.0]
    with pytest.raises(RewardError, match="row has no field 'answer'"):
        score("exact_match", ["12"])


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "exact_match",
            {"strp": True},
            r"reward\.builtin\.args\.strp: unknown argument for the exact_match reward",
        ),
        ("exact_match", {"extract": "first"}, r"reward\.builtin\.args\.extract: 'first' is not one of"),
        ("exact_match", {"casefold": "yes"}, r"reward\.builtin\.args\.casefold: 'yes' is not true or false"),
        ("numeric_match", {"tolerance": -1}, r"reward\.builtin\.args\.tolerance: -1 is below"),
        ("length", {}, r"reward\.builtin\.args\.target: required by the length reward"),
        ("length", {"target": 5, "min": 9}, r"reward\.builtin\.args\.min: 9 exceeds target 5"),
    ],
)
def test_bad_args_name_the_field(name: str, args: dict[str, Any], message: str) -> None:
    spec = RewardSpec.model_validate({"builtin": {"name": name, "args": args}})
    with pytest.raises(RewardError, match=message):
        build_reward(spec, base_dir=Path("."))


def test_results_are_finite_floats() -> None:
    values = score("length", ["abc", "abcdefgh"], target=4)
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)
