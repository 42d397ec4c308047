"""The rewards built into the trainer (``reward.builtin``), each a pure function of one sample.

Arguments (``reward.builtin.args``) per reward; an unknown argument is an error:

``exact_match``: 1.0 when the answer extracted from the completion equals the row's answer.
    ``extract`` (``auto``): how to find the answer in the completion, see ``extract_answer``.
    ``strip`` (true): ignore leading and trailing whitespace on both sides.
    ``casefold`` (false): compare case-insensitively.
``numeric_match``: 1.0 when the last number in the (extracted) completion equals the numeric answer,
    within ``tolerance`` (absolute, 1e-6) or ``rel_tolerance`` (relative to the answer, 0), whichever
    is looser. ``extract`` (``none``: search the whole completion). Thousands commas are accepted.
``regex_match``: 1.0 when ``pattern`` is found in the completion (``re.search``), or covers all of it
    with ``fullmatch`` (false). ``ignore_case`` (false). Other flags go inline, e.g. ``(?s)``.
``format``: 1.0 when ``pattern`` matches the whole completion (``.`` spans lines); ``partial`` (0.0)
    is the credit when the pattern matches only part of it. ``strip`` (true) first trims whitespace.
``length``: 1.0 when the completion's length is within [``min``, ``target``] (``min`` 0, ``target``
    required) in ``unit`` ``chars`` or ``words`` (whitespace-separated); above ``target`` it falls
    linearly to 0 at ``target + falloff`` (``falloff`` defaults to ``target``); below ``min`` it is
    ``length / min``.
``contains_answer``: 1.0 when the row's answer appears in the completion. ``casefold`` (false);
    ``whole_word`` (true) stops answer ``5`` from matching inside ``15``.

Patterns are RE2 syntax (linear-time; no backreferences or lookarounds), which differs from
Python's ``re`` in small ways: ``$`` matches only at the very end of the text, not before a final
newline (write ``\\n?$``), and the end-of-text escape is ``\\z``, not ``\\Z``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from loraplex_api.experiment import BUILTIN_REWARDS
from loraplex_api.experiment import BuiltinReward as BuiltinRewardSpec
from loraplex_api.patterns import compile_pattern

from ..builtin_args import ArgReader
from .base import RewardError, Sample, check_rewards

BATCH_BUDGET_SECONDS = 10.0
"""A builtin reward's time per batch; the slowest builtin takes microseconds per sample."""

Scorer = Callable[[Sample], float]
Answer = Callable[[Sample], Any]  # reads the row's answer, raising RewardError when it is missing

EXTRACT_MODES = ("auto", "answer_tag", "boxed", "answer_colon", "last_line", "none")

# Ours, but they scan the model's completions, so they run on RE2 too: linear in the completion.
_ANSWER_TAG = compile_pattern(r"<answer>(.*?)</answer>", ignore_case=True, dot_all=True)
# "answer:" up to the end of its line; also catches "Final answer:".
_ANSWER_COLON = compile_pattern(r"answer\s*:(.*)", ignore_case=True)
_BOXED = "\\boxed{"
_NUMBER = compile_pattern(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def extract_answer(completion: str, mode: str = "auto") -> str | None:
    """Find the answer in a completion, or None when the chosen form is absent.

    ``answer_tag``: the last ``<answer>...</answer>``; ``boxed``: the last ``\\boxed{...}`` (nested
    braces allowed); ``answer_colon``: the rest of the line after the last ``answer:``;
    ``last_line``: the last non-blank line; ``none``: the whole completion. ``auto`` tries
    answer_tag, boxed, answer_colon and last_line in that order and takes the first found.
    """
    if mode == "none":
        return completion
    if mode == "auto":
        for each in ("answer_tag", "boxed", "answer_colon", "last_line"):
            found = extract_answer(completion, each)
            if found is not None:
                return found
        return None
    if mode == "answer_tag":
        tags = _ANSWER_TAG.findall(completion)
        return tags[-1] if tags else None
    if mode == "boxed":
        return _last_boxed(completion)
    if mode == "answer_colon":
        colons = _ANSWER_COLON.findall(completion)
        return colons[-1] if colons else None
    if mode == "last_line":
        lines = [line for line in completion.splitlines() if line.strip()]
        return lines[-1] if lines else None
    raise ValueError(f"unknown extract mode {mode!r}; expected one of {', '.join(EXTRACT_MODES)}")


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None  # unclosed: the model ran out of tokens mid-answer


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,234.5`` reads as 1234.5), or None."""
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def _answer_reader(answer_field: str, where: str) -> Answer:
    def answer(sample: Sample) -> Any:
        if answer_field not in sample.row:
            raise RewardError(f"{where}: row has no field {answer_field!r} (dataset answerField)")
        return sample.row[answer_field]

    return answer


def _exact_match(args: ArgReader, answer: Answer, where: str) -> Scorer:
    extract = args.choice("extract", "auto", EXTRACT_MODES)
    strip = args.flag("strip", True)
    casefold = args.flag("casefold", False)

    def normalize(text: str) -> str:
        text = text.strip() if strip else text
        return text.casefold() if casefold else text

    def score(sample: Sample) -> float:
        found = extract_answer(sample.completion, extract)
        if found is None:
            return 0.0
        return float(normalize(found) == normalize(str(answer(sample))))

    return score


def _numeric_match(args: ArgReader, answer: Answer, where: str) -> Scorer:
    tolerance = args.number("tolerance", 1e-6, minimum=0.0)
    rel_tolerance = args.number("rel_tolerance", 0.0, minimum=0.0)
    extract = args.choice("extract", "none", EXTRACT_MODES)

    def score(sample: Sample) -> float:
        raw = answer(sample)
        expected = _as_number(raw)
        if expected is None:
            raise RewardError(f"{where}: the row's answer {raw!r} is not a number")
        found = extract_answer(sample.completion, extract)
        got = last_number(found) if found is not None else None
        if got is None:
            return 0.0
        return float(abs(got - expected) <= max(tolerance, rel_tolerance * abs(expected)))

    return score


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip().replace(",", ""))
    except ValueError:
        return None


def _regex_match(args: ArgReader, answer: Answer, where: str) -> Scorer:
    ignore_case = args.flag("ignore_case", False)
    pattern = args.pattern("pattern", ignore_case=ignore_case)
    match = pattern.fullmatch if args.flag("fullmatch", False) else pattern.search
    return lambda sample: float(match(sample.completion) is not None)


def _format(args: ArgReader, answer: Answer, where: str) -> Scorer:
    pattern = args.pattern("pattern", dot_all=True)
    partial = args.number("partial", 0.0, minimum=0.0)
    strip = args.flag("strip", True)

    def score(sample: Sample) -> float:
        text = sample.completion.strip() if strip else sample.completion
        if pattern.fullmatch(text):
            return 1.0
        return partial if pattern.search(text) else 0.0

    return score


def _length(args: ArgReader, answer: Answer, where: str) -> Scorer:
    target = args.number("target", None, minimum=1)
    low = args.number("min", 0.0, minimum=0.0)
    falloff = args.number("falloff", target, minimum=1e-9)
    unit = args.choice("unit", "chars", ("chars", "words"))
    if low > target:
        raise RewardError(f"{where}.args.min: {low:g} exceeds target {target:g}")

    def score(sample: Sample) -> float:
        size = len(sample.completion) if unit == "chars" else len(sample.completion.split())
        if size > target:
            return max(0.0, 1.0 - (size - target) / falloff)
        if size < low:
            return size / low
        return 1.0

    return score


def _contains_answer(args: ArgReader, answer: Answer, where: str) -> Scorer:
    casefold = args.flag("casefold", False)
    whole_word = args.flag("whole_word", True)
    flags = re.IGNORECASE if casefold else 0

    def score(sample: Sample) -> float:
        expected = str(answer(sample)).strip()
        if not expected:
            raise RewardError(f"{where}: the row's answer is empty")
        needle = re.escape(expected)
        # Lookarounds rather than \b, so answers that start or end with punctuation still work.
        if whole_word:
            needle = rf"(?<!\w){needle}(?!\w)"
        return float(re.search(needle, sample.completion, flags) is not None)

    return score


BUILDERS: dict[str, Callable[[ArgReader, Answer, str], Scorer]] = {
    "exact_match": _exact_match,
    "numeric_match": _numeric_match,
    "regex_match": _regex_match,
    "format": _format,
    "length": _length,
    "contains_answer": _contains_answer,
}


class BuiltinRewardFunction:
    """A builtin reward: one scorer applied to every sample of the batch, within a time budget.

    The scorers are linear in the completion (RE2 for patterns), so the budget is a backstop: it
    is checked after every sample, so an overrun costs at most one sample's time and fails only
    this experiment.
    """

    def __init__(
        self, name: str, score: Scorer, where: str, *, budget_seconds: float = BATCH_BUDGET_SECONDS
    ) -> None:
        self.name = name
        self._score = score
        self._where = where
        self.budget_seconds = budget_seconds

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        """Score each sample; the scorers are pure, so this never leaves state behind."""
        started = time.perf_counter()
        rewards = []
        for i, sample in enumerate(samples):
            rewards.append(self._score(sample))
            elapsed = time.perf_counter() - started
            if elapsed > self.budget_seconds:
                raise RewardError(
                    f"{self._where}: the {self.name} reward took {elapsed:.1f}s for {i + 1} of {len(samples)} "
                    f"samples, over its budget of {self.budget_seconds:g}s per batch"
                )
        return check_rewards(rewards, len(samples), self._where)

    def close(self) -> None:
        """Nothing to release."""


def build_builtin(spec: BuiltinRewardSpec, *, where: str, answer_field: str) -> BuiltinRewardFunction:
    """Build the builtin reward ``spec.name`` from its args; ``where`` is the spec's field path."""
    args = ArgReader(spec.args, where=where, owner=f"the {spec.name} reward", error=RewardError)
    answer = _answer_reader(answer_field, where)
    if spec.name not in BUILDERS:
        raise RewardError(f"{where}.name: unknown builtin {spec.name!r}; known: {', '.join(BUILTIN_REWARDS)}")
    score = BUILDERS[spec.name](args, answer, where)
    args.finish()
    return BuiltinRewardFunction(spec.name, score, where)
