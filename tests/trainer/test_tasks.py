"""Builtin synthetic tasks: exact answers, determinism from the seed, argument checking."""

from __future__ import annotations

import re

import pytest

from loraplex_api.experiment import BUILTIN_DATASETS
from loraplex_trainer.tasks import TASKS, generate


def rows(name: str, size: int = 200, seed: int = 0, **args: object) -> list[dict]:
    return generate(name, size, seed, args, where="dataset.builtin", error=ValueError)


def test_every_contract_name_is_implemented() -> None:
    assert set(TASKS) == set(BUILTIN_DATASETS)


@pytest.mark.parametrize("args", [{}, {"digits": 1, "terms": 3, "ops": "+-*"}, {"digits": 3, "ops": "-"}])
def test_arithmetic_answers_are_correct(args: dict) -> None:
    for row in rows("arithmetic", **args):
        expression = re.fullmatch(r"What is ([0-9+\-* ]+)\? Answer with just the number\.", row["prompt"])
        assert expression is not None, row["prompt"]
        assert row["answer"] == str(eval(expression[1]))  # the prompt holds only digits and + - *


def test_arithmetic_defaults_are_one_and_two_digit_addition() -> None:
    operands = [int(x) for row in rows("arithmetic") for x in re.findall(r"\d+", row["prompt"])]
    assert min(operands) < 10 and max(operands) < 100
    assert all(" + " in row["prompt"] and row["prompt"].count(" + ") == 1 for row in rows("arithmetic"))


@pytest.mark.parametrize("args", [{}, {"count": 6, "max_value": 999}, {"descending": True}])
def test_sort_numbers_answers_are_sorted(args: dict) -> None:
    for row in rows("sort_numbers", **args):
        shown = re.search(r": ([0-9, ]+)\. Answer", row["prompt"])
        assert shown is not None
        numbers = [int(x) for x in shown[1].split(", ")]
        assert len(set(numbers)) == len(numbers) == args.get("count", 3)
        assert max(numbers) <= args.get("max_value", 9)
        expected = sorted(numbers, reverse=bool(args.get("descending")))
        assert row["answer"] == ", ".join(map(str, expected))
        assert ("largest to smallest" in row["prompt"]) == bool(args.get("descending"))


def test_count_letters_answers_are_counts() -> None:
    answers = []
    for row in rows("count_letters"):
        match = re.search(r'letter "(\w)" appear in the word "(\w+)"', row["prompt"])
        assert match is not None
        assert row["answer"] == str(match[2].count(match[1]))
        answers.append(int(row["answer"]))
    assert 0 in answers and max(answers) >= 2  # absent letters and repeated letters both occur


def test_count_letters_custom_words() -> None:
    assert {re.search(r'word "(\w+)"', r["prompt"])[1] for r in rows("count_letters", words="Moon, sun")} == {
        "moon",
        "sun",
    }


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_same_seed_same_rows_other_seed_other_rows(name: str) -> None:
    assert rows(name, seed=7) == rows(name, seed=7)
    assert rows(name, seed=7) != rows(name, seed=8)
    assert rows(name, size=10, seed=7) == rows(name, size=200, seed=7)[:10]


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "arithmetic",
            {"digit": 2},
            r"dataset\.builtin\.args\.digit: unknown argument for the arithmetic dataset",
        ),
        ("arithmetic", {"ops": "/"}, r"dataset\.builtin\.args\.ops: '/' must be made of"),
        ("arithmetic", {"digits": 0}, r"dataset\.builtin\.args\.digits: 0 is below the minimum 1"),
        ("arithmetic", {"terms": 2.5}, r"dataset\.builtin\.args\.terms: 2\.5 is not a whole number"),
        ("sort_numbers", {"count": 20, "max_value": 9}, r"args\.count: 20 distinct numbers do not fit"),
        ("count_letters", {"words": "fine, not-a-word"}, r"args\.words: 'not-a-word' is not a word"),
    ],
)
def test_bad_args_name_the_field(name: str, args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rows(name, **args)
