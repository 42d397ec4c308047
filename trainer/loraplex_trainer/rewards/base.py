"""What every reward takes and returns: samples in, one finite float per sample out."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class RewardError(RuntimeError):
    """A reward could not be built or could not score a batch; the trainer fails that experiment only."""


@dataclass(frozen=True)
class Sample:
    """One completion to score.

    ``row`` is the dataset row exactly as loaded (the answer sits under the dataset's
    ``answerField``). Builtin rewards read the answer through the ``answer_field`` given to
    ``build_reward``; user code (python and http rewards) gets a copy of the row with an
    ``answer`` key added when the row has none, so it can always read ``row["answer"]``.
    """

    prompt: str
    completion: str
    row: dict[str, Any]


class Reward(Protocol):
    """A batch reward function owned by one experiment."""

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        """Score a batch: one float per sample, in order. Raises RewardError on any failure."""
        ...

    def close(self) -> None:
        """Release what the reward holds (worker processes, temporary files). Idempotent."""
        ...


def user_row(row: dict[str, Any], answer_field: str) -> dict[str, Any]:
    """The row as user code sees it: a copy, with ``answer`` set from ``answer_field`` when absent."""
    shown = dict(row)
    if "answer" not in shown and answer_field in row:
        shown["answer"] = row[answer_field]
    return shown


MAX_REWARD = 1e15
"""Beyond this, a group's variance overflows float32 and the loss turns into NaN."""


def check_rewards(values: Any, expected: int, where: str) -> list[float]:
    """Return ``values`` as a list of floats, or raise RewardError unless it holds ``expected`` finite numbers."""
    if not isinstance(values, list | tuple):
        raise RewardError(f"{where}: returned {type(values).__name__}, expected a list of {expected} numbers")
    if len(values) != expected:
        raise RewardError(f"{where}: returned {len(values)} rewards for {expected} samples")
    checked = []
    for i, value in enumerate(values):
        # bool is a Number too; True/False as 1.0/0.0 is what a user returning a comparison means.
        if not isinstance(value, numbers.Real):
            raise RewardError(f"{where}: reward {i} is {type(value).__name__} {value!r}, expected a number")
        number = float(value)
        if not math.isfinite(number):
            raise RewardError(f"{where}: reward {i} is {number}, expected a finite number")
        if abs(number) > MAX_REWARD:
            raise RewardError(
                f"{where}: reward {number:g} from sample {i} is too large; keep rewards within "
                f"±{MAX_REWARD:g} (advantages and the loss are computed in float32)"
            )
        checked.append(number)
    return checked
