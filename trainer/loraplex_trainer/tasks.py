"""Builtin synthetic tasks (``dataset.builtin``): verifiable rows generated from a seed.

Every task writes rows ``{"prompt": str, "answer": str}`` whose answer is computed exactly, so
``exact_match`` or ``numeric_match`` can score them. The same (name, size, seed, args) always
gives the same rows, on any machine. Defaults are sized so that SmolLM2-135M-Instruct starts
weak but within reach, so GRPO groups hold some successes to learn from. Mean reward measured
with its chat template at temperature 1: arithmetic 0.06 with numeric_match (0.15 greedy);
sort_numbers 0.27 with contains_answer (0.05 with max_value 99); count_letters 0.06 with
numeric_match, a quarter of the groups of 4 holding a success (16-48 prompts each, 24-32 new tokens).

``arithmetic``: "What is 37 + 58? Answer with just the number." -> "95".
    ``digits`` (2): operands are drawn from 0 .. 10**digits - 1. ``terms`` (2): operands per
    expression. ``ops`` ("+"): the operators to draw from, any of "+-*"; "*" binds tighter, as usual.
``sort_numbers``: "Sort these numbers from smallest to largest: 7, 2, 5. ..." -> "2, 5, 7".
    ``count`` (3): numbers per list, distinct. ``max_value`` (9): numbers lie in 0 .. max_value.
    ``descending`` (false): largest first instead.
``count_letters``: 'How many times does the letter "r" appear in the word "strawberry"? ...' -> "3".
    ``words`` (a built-in list of common English words): a comma-separated list to draw from instead.
    About one row in five asks for a letter that is not in the word (answer "0").
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping
from typing import Any

from loraplex_api.experiment import BUILTIN_DATASETS

from .builtin_args import ArgReader

Row = dict[str, Any]

# Common words, many with repeated letters (the classic "strawberry" question).
_WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon pepper tomato potato onion
garlic carrot broccoli spinach avocado coconut pineapple watermelon mississippi bookkeeper
committee balloon coffee letter yellow bottle butter kitten puppy rabbit giraffe elephant
hippopotamus kangaroo alligator mosquito butterfly caterpillar parallel necessary occasion
accommodate embarrass millennium possession address success assessment tomorrow sheep bubble
chocolate vanilla cinnamon engineer volunteer referee guarantee pioneer career teeth needle
freedom street tree bees level radar rhythm syzygy queue cheese keep seven eleven twelve
thirteen sixteen seventeen mammal summer hammer grammar dilemma llama pizza jazz puzzle dizzy
fuzzy blizzard window school garden planet rocket computer keyboard monitor internet program
python river mountain valley ocean island desert forest jungle meadow canyon glacier volcano
"""


def _arithmetic(rng: random.Random, args: ArgReader) -> Callable[[], Row]:
    digits = args.integer("digits", 2, minimum=1, maximum=9)
    terms = args.integer("terms", 2, minimum=2, maximum=8)
    ops = args.text("ops", "+")
    if not ops or set(ops) - set("+-*"):
        raise args.error("ops", f"{ops!r} must be made of the operators + - *")
    high = 10**digits - 1

    def row() -> Row:
        operands = [rng.randint(0, high) for _ in range(terms)]
        chosen = [rng.choice(ops) for _ in range(terms - 1)]
        expression = str(operands[0]) + "".join(
            f" {op} {x}" for op, x in zip(chosen, operands[1:], strict=True)
        )
        prompt = f"What is {expression}? Answer with just the number."
        return {"prompt": prompt, "answer": str(_evaluate(operands, chosen))}

    return row


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with * before + and -."""
    total, sign, product = 0, 1, operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            product *= x
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), x
    return total + sign * product


def _sort_numbers(rng: random.Random, args: ArgReader) -> Callable[[], Row]:
    count = args.integer("count", 3, minimum=2, maximum=50)
    max_value = args.integer("max_value", 9, minimum=1, maximum=10**9)
    descending = args.flag("descending", False)
    if count > max_value + 1:
        raise args.error("count", f"{count} distinct numbers do not fit in 0 .. {max_value} (max_value)")
    order = "largest to smallest" if descending else "smallest to largest"

    def row() -> Row:
        numbers = rng.sample(range(max_value + 1), count)
        shown = ", ".join(map(str, numbers))
        prompt = (
            f"Sort these numbers from {order}: {shown}. "
            "Answer with just the sorted numbers, separated by commas."
        )
        return {"prompt": prompt, "answer": ", ".join(map(str, sorted(numbers, reverse=descending)))}

    return row


def _count_letters(rng: random.Random, args: ArgReader) -> Callable[[], Row]:
    custom = args.text("words", "")
    words = [w.strip().lower() for w in custom.split(",") if w.strip()] if custom else _WORDS.split()
    bad = [w for w in words if not w.isalpha() or not w.isascii()]
    if bad:
        raise args.error("words", f"{bad[0]!r} is not a word of the letters a-z")

    def row() -> Row:
        word = rng.choice(words)
        absent = sorted(set(string.ascii_lowercase) - set(word))
        # Mostly letters of the word, so the answers are not dominated by 0.
        letter = rng.choice(absent) if absent and rng.random() < 0.2 else rng.choice(word)
        prompt = (
            f'How many times does the letter "{letter}" appear in the word "{word}"? '
            "Answer with just the number."
        )
        return {"prompt": prompt, "answer": str(word.count(letter))}

    return row


TASKS: dict[str, Callable[[random.Random, ArgReader], Callable[[], Row]]] = {
    "arithmetic": _arithmetic,
    "sort_numbers": _sort_numbers,
    "count_letters": _count_letters,
}


def generate(
    name: str, size: int, seed: int, args: Mapping[str, Any], *, where: str, error: type[Exception]
) -> list[Row]:
    """``size`` rows of builtin task ``name``; bad args raise ``error`` naming ``<where>.args.<name>``."""
    if name not in TASKS:
        raise error(f"{where}.name: unknown builtin dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    reader = ArgReader(args, where=where, owner=f"the {name} dataset", error=error)
    # Seeded by name too, so two tasks with one seed are not drawn from the same stream.
    make_row = TASKS[name](random.Random(f"{name}:{seed}"), reader)
    reader.finish()
    return [make_row() for _ in range(size)]
